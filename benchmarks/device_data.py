"""Carry the benchmark data to a GPU machine that cannot see ../shared (issue 9's CUDA figures).

The device tool sends the working tree and at most 64 MiB of it, so the data travels as one packed
file per dataset (the files' bytes back to back plus a JSON index), not as 60,000 small files:

    .venv/bin/python benchmarks/device_data.py pack                 # here: writes device_data/ (git-ignored)
    python3 benchmarks/device_data.py unpack device_data /tmp/data  # there: rebuilds the folders

What is packed: all of CIFAR-10 (train + test JPEGs, 52.7 MiB: the time-to-accuracy run needs every
image) and a spread subset of VOC2007 (``--voc-train`` train and ``--voc-val`` val images with their
labels.csv rows, ~19 KiB an image: enough for throughput, which is what the GPU figures need from VOC).
Bytes are copied unchanged, so the pixels there are the pixels here.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import io
import itertools
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# multitag's pure-Python needs that the GPU machine's image may lack (it has torch, timm, numpy, ...);
# gpu_check.sh installs them from device_data/wheels without an index.
WHEELS = ("iterative-stratification==0.1.9",)
PACK_SUFFIX, INDEX_SUFFIX = ".pack", ".index.json.gz"     # the index gzipped: 60,000 paths are 2 MiB as text


def pack(name: str, root: Path, relpaths: list[str], out_dir: Path, extra: dict[str, bytes] | None = None) -> int:
    """Write ``out_dir/name.pack`` (the files' bytes back to back) and its index (relpath and length
    per file, in pack order); ``extra`` adds generated files (relpath → bytes). Returns the packed bytes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    index, total = [], 0
    with open(out_dir / f"{name}{PACK_SUFFIX}", "wb") as f:
        blobs = itertools.chain(((rel, (root / rel).read_bytes()) for rel in relpaths), (extra or {}).items())
        for rel, data in blobs:                     # one file in memory at a time
            f.write(data)
            index.append([rel, len(data)])
            total += len(data)
    with gzip.open(out_dir / f"{name}{INDEX_SUFFIX}", "wt") as f:
        json.dump({"name": name, "files": index}, f)
    return total


def unpack(pack_dir: Path, dest: Path) -> list[Path]:
    """Rebuild every packed dataset under ``dest/<name>/``; returns the dataset folders."""
    folders = []
    for index_path in sorted(pack_dir.glob(f"*{INDEX_SUFFIX}")):
        with gzip.open(index_path, "rt") as f:
            index = json.load(f)
        folder = dest / index["name"]
        with open(pack_dir / f"{index['name']}{PACK_SUFFIX}", "rb") as f:
            for rel, length in index["files"]:          # in pack order: each file follows the last
                target = folder / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(f.read(length))
        folders.append(folder)
    return folders


def cifar_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.glob("*/*/*.jpg"))


def voc_subset(root: Path, n_train: int, n_val: int) -> tuple[list[str], bytes]:
    """Every k-th image of each official split (spread over the list, not its first rows), and the
    labels.csv holding just their rows."""
    with open(root / "labels.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows, fields = list(reader), reader.fieldnames
    chosen = []
    for split, n in (("train", n_train), ("val", n_val)):
        part = [r for r in rows if r["split"] == split]
        chosen += part[::max(1, len(part) // n)][:n]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(chosen)
    return [f"images/{r['image']}" for r in chosen], text.getvalue().encode()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="pack CIFAR-10 and a VOC2007 subset into device_data/")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=ROOT / "device_data")
    p.add_argument("--voc-train", type=int, default=256)
    p.add_argument("--voc-val", type=int, default=64)
    p.add_argument("--no-cifar", action="store_true", help="VOC only (a smaller carry)")
    p.add_argument("--no-wheels", action="store_true", help=f"skip downloading {', '.join(WHEELS)}")
    u = sub.add_parser("unpack", help="rebuild the dataset folders from a pack folder")
    u.add_argument("pack_dir", type=Path)
    u.add_argument("dest", type=Path)
    a = ap.parse_args(argv)
    if a.command == "unpack":
        for folder in unpack(a.pack_dir, a.dest):
            print(f"unpacked {folder}")
        return
    if not (a.data / "voc2007" / "labels.csv").exists():
        sys.exit(f"no VOC2007 under {a.data}: pass --data pointing at the shared data folder")
    voc = a.data / "voc2007"
    files, labels = voc_subset(voc, a.voc_train, a.voc_val)
    total = pack("voc2007", voc, files, a.out, {"labels.csv": labels})
    print(f"voc2007: {len(files)} images, {total / 2**20:.1f} MiB")
    if not a.no_cifar:
        cifar = a.data / "cifar10"
        files = cifar_files(cifar)
        total += (size := pack("cifar10", cifar, files, a.out))
        print(f"cifar10: {len(files)} images, {size / 2**20:.1f} MiB")
    if not a.no_wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", str(a.out / "wheels"), *WHEELS], check=True)
        print(f"wheels: {', '.join(WHEELS)} in {a.out / 'wheels'}")
    print(f"{a.out}: {total / 2**20:.1f} MiB in all (the device tool carries at most 64 MiB with the repo)")


if __name__ == "__main__":
    main()

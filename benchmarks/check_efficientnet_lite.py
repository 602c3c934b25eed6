"""Are the EfficientNet-Lite ImageNet weights loaded right? Classify VOC2007 images with the 1000-class head.

    python benchmarks/check_efficientnet_lite.py [--variants 0 1 2]

For each variant: top-5 ImageNet classes of 8 VOC2007 images that each show one obvious object
(picked from labels.csv rows with a single label, then looked at), and whether top-1 is one of
the ImageNet classes that object can be. Then, if the weights' own model code
(``efficientnet-lite-pytorch``, not a multitag dependency) is installed, the largest logit
difference between it and multitag's timm-based model on the same input. Also prints how often
top-1 is right with the ImageNet mean/std instead of (0.5, 0.5), to show which normalisation the
weights expect. Needs ../shared/data/voc2007; downloads nothing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from multitag.data.decode import load_and_resize
from multitag.models.efficientnet_lite import (
    INPUT_MEAN,
    INPUT_STD,
    NATIVE_SIZES,
    build_efficientnet_lite,
    weights_path,
)
from multitag.models.weights import load_state_file

VOC_IMAGES = ROOT.parent / "shared" / "data" / "voc2007" / "images"

# ImageNet-1k indices that count as a correct top-1 for each VOC class.
IMAGENET_CLASSES = {
    "cat": set(range(281, 286)),                                   # tabby ... Egyptian cat
    "dog": set(range(151, 269)),                                   # the dog breeds
    "aeroplane": {404, 895, 908},                                  # airliner, warplane, wing
    "bird": set(range(7, 25)) | set(range(80, 101)) | set(range(127, 147)),
    "car": {407, 436, 468, 479, 511, 581, 609, 627, 656, 661, 717, 751, 817},  # cab, convertible, sports car, ...
    "train": {466, 547, 565, 705, 820, 829},                       # bullet train ... steam locomotive, streetcar
    "bus": {654, 779, 874},                                        # minibus, school bus, trolleybus
    "sheep": {348, 349},                                           # ram, bighorn
}
# One image per class, each with a single unambiguous object (viewed before choosing).
IMAGES = [("000019", "cat"), ("000036", "dog"), ("000033", "aeroplane"), ("000064", "bird"),
          ("000007", "car"), ("000034", "train"), ("000132", "bus"), ("000225", "sheep")]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def batch(size: int, mean=INPUT_MEAN, std=INPUT_STD) -> torch.Tensor:
    """The check images as one normalised float batch (B, 3, size, size), preprocessed as multitag does."""
    x = torch.stack([load_and_resize(VOC_IMAGES / f"{name}.jpg", size) for name, _ in IMAGES]).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def expected_mass(probs: torch.Tensor) -> float:
    """Mean over images of the softmax probability summed over the classes that count as correct."""
    return sum(float(p[sorted(IMAGENET_CLASSES[voc])].sum()) for p, (_, voc) in zip(probs, IMAGES)) / len(IMAGES)


def reference_model(variant: int):
    """The weights' own model code with the package weights, or None when it is not installed."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        return None
    model = EfficientNet.from_name(f"efficientnet-lite{variant}")
    model.load_state_dict(load_state_file(weights_path(variant)))   # strict: every key must fit
    return model.eval()


def check_variant(variant: int, names) -> int:
    """Print top-5 per image and the agreement checks; return the number of correct top-1."""
    size = NATIVE_SIZES[variant]
    model = build_efficientnet_lite(variant, 1000).eval()
    x = batch(size)
    with torch.no_grad():
        logits = model(x)
    probs = logits.softmax(1)
    print(f"\n== EfficientNet-Lite{variant} @ {size}px, mean/std {INPUT_MEAN}/{INPUT_STD} ==")
    hits = 0
    for (name, voc), p in zip(IMAGES, probs):
        top = p.topk(5)
        ok = int(top.indices[0]) in IMAGENET_CLASSES[voc]
        hits += ok
        shown = ", ".join(f"{int(i)} {names(int(i))} {float(v):.2f}" for v, i in zip(top.values, top.indices))
        print(f"{name}.jpg {voc:9s} top-1 {'OK  ' if ok else 'MISS'} | {shown}")
    print(f"top-1 matches the obvious object: {hits}/{len(IMAGES)}")

    with torch.no_grad():
        other = model(batch(size, IMAGENET_MEAN, IMAGENET_STD)).softmax(1)
    other_hits = sum(int(i) in IMAGENET_CLASSES[voc] for i, (_, voc) in zip(other.argmax(1), IMAGES))
    print(f"probability on the expected classes, mean over images: {expected_mass(probs):.3f} with (0.5, 0.5); "
          f"{expected_mass(other):.3f} with ImageNet mean/std ({other_hits}/{len(IMAGES)} top-1 correct)")

    ref = reference_model(variant)
    if ref is None:
        print("efficientnet-lite-pytorch not installed: reference comparison skipped")
    else:
        with torch.no_grad():
            ref_logits = ref(x)
        diff = (ref_logits - logits).abs().max().item()
        same_top1 = bool((ref_logits.argmax(1) == logits.argmax(1)).all())
        print(f"vs efficientnet-lite-pytorch on the same input: max |logit diff| {diff:.2e} "
              f"(logits span {logits.min():.1f}..{logits.max():.1f}), same top-1 for all: {same_top1}")
    return hits


def check_se_mapping() -> None:
    """The same key map on a lukemelas EfficientNet-B0 (has squeeze-excite; random weights) into timm's."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        return
    import timm

    from multitag.models.weights import load_pretrained, lukemelas_to_timm

    ref = EfficientNet.from_name("efficientnet-b0").eval()
    ref.set_swish(memory_efficient=False)
    for m in ref.modules():   # non-default BN statistics, so a BN mapped to the wrong place shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    model = timm.create_model("tf_efficientnet_b0", pretrained=False).eval()
    report = load_pretrained(model, ref.state_dict(), key_map=lukemelas_to_timm(model), allow_new_head=False)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        diff = (model(x) - ref(x)).abs().max().item()
    print(f"\nlukemelas EfficientNet-B0 (random weights, with SE) -> timm tf_efficientnet_b0: "
          f"{len(report.loaded)} tensors mapped, max |logit diff| {diff:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    if not VOC_IMAGES.is_dir():
        sys.exit(f"{VOC_IMAGES} not found; this check needs the shared VOC2007 images.")
    torch.manual_seed(0)
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    total = sum(check_variant(v, info.index_to_description) for v in args.variants)
    print(f"\ntotal top-1 correct: {total}/{len(IMAGES) * len(args.variants)}")
    check_se_mapping()


if __name__ == "__main__":
    main()

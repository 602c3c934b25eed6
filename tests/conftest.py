"""Shared fixtures: an isolated cache per test session and a tiny real multi-label dataset."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

# Idle OpenMP threads must sleep, not spin: several torch/onnxruntime pools live in one test process
# (and other jobs may share the 2 cores), and spinning pools make each other 10-100x slower.
# Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Image cache, precision choices and demo data go to a temp dir, never the user's ~/.cache."""
    root = tmp_path_factory.mktemp("multitag_cache")
    old = os.environ.get("MULTITAG_CACHE")
    os.environ["MULTITAG_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("MULTITAG_CACHE", None)
    else:
        os.environ["MULTITAG_CACHE"] = old


@pytest.fixture(scope="session")
def digits_csv(tmp_path_factory) -> Path:
    """200 digit mosaics (120 train / 40 val / 40 test) written as PNGs + labels.csv."""
    from multitag.demo_data import make_digit_mosaics

    return make_digit_mosaics(tmp_path_factory.mktemp("digits"), {"train": 120, "val": 40, "test": 40}, seed=1)


@pytest.fixture(scope="session")
def tiny_run(digits_csv, tmp_path_factory) -> Path:
    """A 1-epoch demo run (with its report) shared by tests that only read it. Tests that change a
    run directory (export, calibrate, resume) train their own."""
    from multitag.api import train

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    return train("demo", data=str(digits_csv), out=out,
                 overrides=["train.epochs=1", "train.batch_size=32", "train.precision=fp32"], log=lambda *a: None)


@pytest.fixture(scope="session")
def tiny_model(tiny_run):
    """The tiny run loaded for inference (multitag.predict.load)."""
    from multitag.predict import load

    return load(tiny_run)


@pytest.fixture
def steady_load(monkeypatch):
    """Other processes' load held at 0 cores: a cached runtime choice is measured again when the load
    changes by 0.75 cores (runtime.LOAD_CHANGE), which another job on a shared CI machine can do between
    two calls of a test that expects the cached choice (seen while a training run shared the cores)."""
    from multitag import runtime
    monkeypatch.setattr(runtime, "cpu_sample", lambda: None)              # so the measurement's load is other_load's
    monkeypatch.setattr(runtime, "other_load", lambda seconds=0.5: 0.0)


@pytest.fixture
def stop_after_checkpoint(monkeypatch):
    """``stop_after_checkpoint(epoch)``: the next training run raises KeyboardInterrupt right after
    the checkpoint of ``epoch`` is written, as a kill at that moment would leave it; returns
    ``undo()`` that restores the real checkpoint writer for the resume."""
    from multitag import engine

    real_save = engine._save_checkpoint

    def arm(epoch: int):
        def save_then_die(run, model, optimizer, scheduler, state, rt, *ema):
            real_save(run, model, optimizer, scheduler, state, rt, *ema)
            if state.epoch == epoch:
                raise KeyboardInterrupt

        monkeypatch.setattr(engine, "_save_checkpoint", save_then_die)
        return lambda: monkeypatch.setattr(engine, "_save_checkpoint", real_save)
    return arm


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory):
    """A CIFAR-shaped folder dataset: train/ and test/, 3 classes told apart by colour, 32 px PNGs."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny_cifar")
    rng = np.random.RandomState(0)
    for split, n in (("train", 30), ("test", 8)):
        for c in range(3):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.randint(0, 90, (32, 32, 3)).astype(np.uint8)
                pixels[..., c] += 120
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture()
def browser(tmp_path):
    """Debian's headless Chromium through its own chromedriver (selenium-manager never downloads one)."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("needs Debian chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver") or CHROMEDRIVER),
                              options=options)
    try:
        yield driver
    finally:
        driver.quit()

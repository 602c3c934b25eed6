"""The run report: every figure the page shows exists, the page parses, and a browser renders it."""
from __future__ import annotations

import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from multitag import api, plots
from multitag.cli import main
from multitag.predict import score_vs_threshold
from multitag.report import (CAPTION_CHARS, ReportData, _cam_caption, error_caption, predicted_vs_true,
                             worst_errors, write_report)

QUIET = {"log": lambda *a, **k: None}
FAST = ["train.epochs=2", "train.batch_size=32", "train.precision=fp32", "train.channels_last=false"]
MULTI_LABEL_FIGURES = {"learning_curves.png", "per_class.png", "pr_curves.png", "predicted_vs_true.png",
                       "label_counts.png", "label_cooccurrence.png", "labels_per_image.png", "worst_fp.png",
                       "worst_fn.png", "gradcam.png"}
SINGLE_LABEL_FIGURES = {"learning_curves.png", "per_class.png", "confusion_matrix.png", "label_counts.png",
                        "worst_fp.png", "worst_fn.png", "gradcam.png"}


class PageParser(HTMLParser):
    """Collects <img> sources, <a href>s and <script>/<link> tags of a page."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.external = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
        elif tag == "a":
            self.links.append(a.get("href", ""))
        elif tag in ("script", "link", "iframe"):
            self.external.append(tag)


def parse_page(index: Path) -> PageParser:
    parser = PageParser()
    parser.feed(index.read_text(encoding="utf-8"))
    parser.close()
    return parser


def check_report(index: Path, expected: set[str]) -> dict:
    """The page links exactly the expected figures, each a real PNG beside it; returns metrics.json."""
    page = parse_page(index)
    assert set(page.images) == expected
    for src in page.images:
        assert "/" not in src and not src.startswith(("http", "file:"))          # relative, in the folder
        with Image.open(index.parent / src) as im:
            assert im.format == "PNG" and min(im.size) > 50
    assert not page.external                                                  # no JS/CSS/fonts to fetch
    anchors = {h[1:] for h in page.links if h.startswith("#")}
    assert anchors and all(f'id="{a}"' in index.read_text() for a in anchors)
    metrics = json.loads((index.parent / "metrics.json").read_text())
    assert set(metrics["figures"]) == expected
    return metrics


# ----------------------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def multi_run(digits_csv, tmp_path_factory) -> Path:
    """A 2-epoch demo run on the digit mosaics (multi-label, with a test split)."""
    out = tmp_path_factory.mktemp("report_multi") / "run"
    return api.train("demo", data=str(digits_csv), out=out, overrides=FAST, **QUIET)


@pytest.fixture(scope="module")
def multi_report(multi_run) -> Path:
    """The report, written through the CLI as users would."""
    assert main(["report", str(multi_run), "--json"]) == 0
    return multi_run / "report" / "index.html"


def _coloured_squares(root: Path, per_split: dict[str, int]) -> Path:
    """Folder-per-class data (red / green / blue square on grey, non-square images), train and val only."""
    rng = np.random.default_rng(0)
    colours = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 220)}
    for split, n in per_split.items():
        for name, colour in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                img = np.full((40, 56, 3), 120, np.uint8) + rng.integers(0, 20, (40, 56, 3), dtype=np.uint8)
                y, x = rng.integers(0, 24), rng.integers(0, 40)
                img[y:y + 16, x:x + 16] = colour
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    data = _coloured_squares(tmp_path_factory.mktemp("squares"), {"train": 10, "val": 4})
    out = tmp_path_factory.mktemp("report_single") / "run"
    return api.train("demo", data=str(data), out=out, overrides=FAST, **QUIET)


# ----------------------------------------------------------------------------- tests

def test_multilabel_report(multi_report):
    metrics = check_report(multi_report, MULTI_LABEL_FIGURES)
    assert metrics["split"] == "test" and metrics["num_images"] == 40
    assert {"mAP", "at_0.5", "calibrated", "top3", "per_class"} <= set(metrics)
    c = len(metrics["per_class"])
    counts = {k: np.array(v) for k, v in metrics["counts"].items()}
    assert all(v.shape == (c,) for v in counts.values())
    assert (sum(counts.values()) == 40).all()                                 # TP+FP+FN+TN = images (no ignores)
    np.testing.assert_array_equal(counts["TP"] + counts["FN"], [r["support"] for r in metrics["per_class"]])
    text = multi_report.read_text()
    for heading in ("Learning curves", "Precision–recall curves", "Label statistics", "Worst errors", "Grad-CAM"):
        assert heading in text
    assert "no test split" not in text


def test_single_label_report_falls_back_to_val(single_run):
    index = write_report(single_run, **QUIET)
    metrics = check_report(index, SINGLE_LABEL_FIGURES)
    assert metrics["split"] == "val" and metrics["num_images"] == 12
    assert "accuracy" in metrics and "confusion_matrix" in metrics
    text = index.read_text()
    assert "no test split" in text and "top-5 accuracy" in text


def test_predicted_vs_true_counts_only_wrong_predictions():
    # 3 images, 3 classes: image 0 has a+b and predicts a+b+c; image 1 has a and predicts b; image 2 has c
    positive = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1]], bool)
    predicted = np.array([[1, 1, 1], [0, 1, 0], [0, 0, 1]], bool)
    d = SimpleNamespace(positive=positive, predicted=predicted, ignore=np.zeros_like(positive))
    m = predicted_vs_true(d)
    np.testing.assert_allclose(m[0], [0.5, 0.5, 0.5])     # a true twice: recall 1/2; b wrong once, c once
    np.testing.assert_allclose(m[1], [0.0, 1.0, 1.0])     # b true once (image 0): found; a not wrong; c wrong
    np.testing.assert_allclose(m[2], [0.0, 0.0, 1.0])
    d.scores = np.array([[0.9, 0.8, 0.7], [0.2, 0.6, 0.1], [0.1, 0.1, 0.9]])
    assert worst_errors(d, "fp") == [(0, 2), (1, 1)]                      # c at 0.7, then b at 0.6
    assert worst_errors(d, "fn") == [(1, 0)]


def fake_report(names: list[str], scores, targets, thresholds, multi_label: bool = True) -> ReportData:
    """A ReportData over given scores, without a model or images (enough for captions)."""
    targets = np.asarray(targets, dtype=np.float32)
    model = SimpleNamespace(multi_label=multi_label, class_names=names, thresholds=np.asarray(thresholds))
    prepared = SimpleNamespace(table=SimpleNamespace(targets=targets, ignore=np.zeros(targets.shape, bool)))
    return ReportData(model, prepared, "test", np.arange(len(targets)), np.asarray(scores, dtype=np.float32),
                      {}, Path("."), [])


def test_captions_of_30_classes_list_a_few_true_labels_and_count_the_rest():
    names = [f"category_{k:02d}" for k in range(30)]
    targets = np.zeros((1, 30))
    targets[0, :12] = 1                                                       # 12 true labels
    d = fake_report(names, np.full((1, 30), 0.1), targets, np.full(30, 0.5))
    line = error_caption(d, 0, 0).split("\n")[1]
    assert line.startswith("true: category_00") and line.endswith(" more") and len(line) <= CAPTION_CHARS
    listed, more = line[len("true: "):].rsplit(" +", 1)
    assert all(n in names for n in listed.split(", "))                        # whole names, none cut in two
    assert len(listed.split(", ")) + int(more.split()[0]) == 12


def test_score_below_its_threshold_never_reads_as_equal():
    assert score_vs_threshold(0.0496, 0.0504) == "0.0496 < 0.0504"             # not "0.05 < 0.05"
    assert score_vs_threshold(0.3449, 0.3451) == "0.34 < 0.35"                 # two decimals where they tell
    assert score_vs_threshold(0.0504, 0.0504) == "0.05 ≥ 0.05"                 # equal is a label: ≥ is true
    assert score_vs_threshold(0.5, np.nextafter(0.5, 1)).startswith("0.5 <")   # beyond 12 decimals: repr
    d = fake_report(["a", "b"], [[0.0496, 0.9]], [[1, 0]], [0.0504, 0.5])
    assert error_caption(d, 0, 0).startswith("a: 0.0496 < 0.0504\n")         # the false negative
    assert error_caption(d, 0, 1).startswith("b: 0.90 ≥ 0.50\n")             # the false positive


def test_gradcam_captions_say_whether_a_top_class_is_predicted():
    d = fake_report(["a", "b"], [[0.02, 0.9]], [[0, 1]], [0.3, 0.5])
    cam = lambda name, score: SimpleNamespace(class_name=name, score=score, heatmap=np.ones((2, 2)))   # noqa: E731
    assert _cam_caption(d, 0, cam("b", 0.9)) == "b: 0.90 ≥ 0.50 (true)"
    assert _cam_caption(d, 0, cam("a", 0.02)) == "a: 0.02 < 0.30"              # a top class, not a label


def test_label_counts_legend_hides_no_total(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, out, tight=True: figures.append(fig) or Path(out))
    even = np.full(10, 100)                                   # bars of one length: all reach the lower right
    plots.label_counts([f"d{i}" for i in range(10)], {"train": even, "val": even // 4, "test": even // 4},
                       tmp_path / "counts.png")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = figures[0]
    renderer = FigureCanvasAgg(fig).get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    totals = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(totals) == 10 and not any(legend.overlaps(t) for t in totals)


def test_learning_curves_mark_stages(tmp_path):
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_mAP": 0.5 + e / 20, "lr": 1e-3 / e,
                "seconds": 1.0, "stage": s} for e, s in zip(range(1, 8), ["head"] * 2 + ["full"] * 3 + ["polish"] * 2)]
    assert plots.stage_spans(history) == [("head", 1, 2), ("full", 3, 5), ("polish", 6, 7)]
    assert plots.stage_spans([{k: v for k, v in h.items() if k != "stage"} for h in history]) == []
    path = plots.learning_curves(history, tmp_path / "curves.png", best_epoch=5)
    with Image.open(path) as im:
        assert im.size[0] > 600


# ----------------------------------------------------------------------------- in a browser

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(not (os.path.exists(CHROMEDRIVER) and os.path.exists(CHROMIUM)),
                    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
def test_report_renders_in_headless_chromium(multi_report, tmp_path, monkeypatch):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e .[test])")
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")               # selenium-manager must never download a browser
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,2000",
                f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get(multi_report.resolve().as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]);")
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    assert {src for src, _, _ in images} == MULTI_LABEL_FIGURES
    assert all(done and width > 0 for _, done, width in images), images
    assert not severe, severe
    with Image.open(shot) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 24)
    assert colours is not None and len(colours) > 10                         # not a blank page

"""Streamlit app: upload images, see their labels and scores, move the threshold, look at Grad-CAM.

Start it with ``multitag app RUN_DIR`` (``launch`` below runs ``streamlit run`` on this file).
The script reads the run directory from ``-- --run RUN_DIR`` after the script name, or from
the ``MULTITAG_APP_RUN`` environment variable (how the tests and other launchers pass it).

What it shows, per uploaded image: the labels (scores at or above each class's calibrated
threshold from the run, or one global threshold set with the slider), every class's score as
a sorted bar chart with the threshold ticks, and Grad-CAM for a chosen class at the image's own
size next to it (via ``multitag.explain`` when installed). A "Model card" tab lists the classes
with their thresholds and the metrics stored in model.json and, when present, report/metrics.json.

Uploads get the same limits as the HTTP service (``multitag.serve.Limits``: bytes per file,
pixels read from the header before decoding, images shown at once); a refused file gets a
message and the others still show. Devices: the app only hands uint8 images to the predictor
and to Grad-CAM, which move them to the model's device, so it runs the same on CPU and GPU.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import streamlit as st

from multitag.errors import UserError
from multitag.serve import MB, Limits, RejectedInput, decode_upload

RUN_ENV = "MULTITAG_APP_RUN"
TITLE = "multitag"
LABELS_PREFIX = "**Labels:**"
MAX_BARS = 20  # classes shown in each score chart (the highest-scoring ones)
IMAGE_TYPES = ["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"]
LIMITS = Limits()


# --- launching -----------------------------------------------------------------------------------

def streamlit_command(run_dir: str | Path, port: int = 8501, limits: Limits = LIMITS) -> list[str]:
    """The ``streamlit run`` command line serving this app for ``run_dir`` on 127.0.0.1:``port``."""
    return [sys.executable, "-m", "streamlit", "run", str(Path(__file__).resolve()),
            "--server.port", str(port), "--server.address", "127.0.0.1", "--server.headless", "true",
            # Streamlit refuses bigger uploads in the browser; decode_upload checks again in Python.
            "--server.maxUploadSize", str(max(1, math.ceil(limits.max_bytes / MB))),
            # The installed package does not change while serving: watching it only costs CPU.
            "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false",
            "--", "--run", str(Path(run_dir).resolve())]


def launch(run_dir: str | Path, port: int = 8501) -> int:
    """Run the app in a ``streamlit run`` subprocess until it exits (Ctrl-C); returns its exit code."""
    if not (Path(run_dir) / "model.json").is_file():
        raise UserError(f"{run_dir} has no model.json; point to a run directory made by `multitag train`.")
    from multitag.serve import bound_socket

    bound_socket("127.0.0.1", port).close()     # a busy port is one line here, not Streamlit's exit 0
    print(f"multitag app for {run_dir}: http://127.0.0.1:{port}")
    server = subprocess.Popen(streamlit_command(run_dir, port))
    # SIGTERM (kill, a service manager, timeout) reaches only this process: pass it on, or Streamlit would
    # outlive it holding the port. (Ctrl-C signals the whole process group, Streamlit included.)
    previous = signal.signal(signal.SIGTERM, lambda *_: server.terminate())
    try:
        return server.wait()
    except KeyboardInterrupt:  # Streamlit got the same Ctrl-C and stops by itself
        server.wait()
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server.poll() is None:
            server.kill()


def run_dir_from_argv(argv: list[str]) -> Path | None:
    """``--run RUN_DIR`` from the script's arguments, else $MULTITAG_APP_RUN, else None."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--run")
    known, _ = parser.parse_known_args(argv)  # other arguments (e.g. pytest's under AppTest) are not ours
    value = known.run or os.environ.get(RUN_ENV)
    return Path(value) if value else None


# --- cached work: the model once per process; predictions and Grad-CAM once per image -------------

@st.cache_resource(show_spinner="Loading the model ...")
def load_model(run_dir: str):
    """The run's predictor, loaded once and shared by every session (device chosen automatically)."""
    from multitag.predict import load

    return load(run_dir, device="auto")


@st.cache_resource(max_entries=512, show_spinner=False)
def cached_prediction(run_dir: str, digest: str, threshold: str | float, _model, _image: np.ndarray):
    """``model.predict`` for one image, keyed by the image's digest: moving the slider back is free."""
    return _model.predict([_image], threshold=threshold)[0]


@st.cache_resource(max_entries=128, show_spinner="Grad-CAM ...")
def cached_gradcam(run_dir: str, digest: str, class_name: str, _model, _image: np.ndarray):
    """(overlay (H0, W0, 3) uint8, score) of Grad-CAM for ``class_name`` on one image."""
    from multitag.explain import gradcam

    result = gradcam(_model, _image, class_name=class_name)
    return result.overlay, float(result.score)


def explain_missing() -> str | None:
    """Why Grad-CAM is unavailable (multitag.explain not importable), or None when it is available."""
    try:
        import multitag.explain  # noqa: F401
    except ImportError as e:
        return f"Grad-CAM needs multitag.explain, which cannot be imported here ({e})."
    return None


# --- pieces of the page --------------------------------------------------------------------------

def threshold_control(model) -> str | float:
    """Sidebar: the run's calibrated per-class thresholds, or one global threshold from the slider."""
    st.sidebar.header("Thresholds")
    if not model.multi_label:
        st.sidebar.caption("Single-label model: the label is the top-scoring class; no thresholds apply.")
        return "calibrated"
    override = st.sidebar.checkbox("Use one threshold for every class", key="override",
                                   help="Off: each class's threshold calibrated on the validation split.")
    value = st.sidebar.slider("Global threshold", 0.0, 1.0, 0.5, 0.01, key="threshold", disabled=not override)
    return float(value) if override else "calibrated"


def thresholds_for(model, threshold: str | float) -> np.ndarray:
    """The (C,) thresholds a prediction was made with, for drawing them."""
    return model.thresholds if threshold == "calibrated" else np.full(len(model.class_names), float(threshold))


def labels_markdown(labels: list[str]) -> str:
    """One line naming the predicted labels (the tests look for LABELS_PREFIX)."""
    shown = ", ".join(f"`{name}`" for name in labels) if labels else "none above the threshold"
    return f"{LABELS_PREFIX} {shown}"


def score_chart(scores: dict[str, float], labels: list[str], thresholds: np.ndarray | None, class_names: list[str]):
    """Horizontal bars, highest score first (top MAX_BARS), labels coloured, thresholds as black ticks."""
    import altair as alt
    import pandas as pd

    table = pd.DataFrame({"class": class_names, "score": [scores[c] for c in class_names],
                          "decision": ["label" if c in labels else "not a label" for c in class_names]})
    if thresholds is not None:
        table["threshold"] = thresholds
    table = table.sort_values("score", ascending=False, kind="stable").head(MAX_BARS)
    y = alt.Y("class:N", sort=list(table["class"]), title=None)
    bars = alt.Chart(table).mark_bar().encode(
        x=alt.X("score:Q", scale=alt.Scale(domain=[0, 1]), title="score (black tick: threshold)"), y=y,
        color=alt.Color("decision:N", scale=alt.Scale(domain=["label", "not a label"], range=["#e4572e", "#9db4c0"]),
                        legend=alt.Legend(title=None, orient="bottom")),
        tooltip=list(table.columns))
    layers = bars if thresholds is None else bars + alt.Chart(table).mark_tick(
        color="black", thickness=2).encode(x="threshold:Q", y=y, tooltip=list(table.columns))
    return layers.properties(height=alt.Step(22))  # one 22 px row per class, so every name shows


def show_image(model, run_dir: str, name: str, data: bytes, threshold: str | float, show_cam: bool, key: str) -> None:
    """One uploaded image: the image, its labels and score chart, and Grad-CAM for a chosen class.

    ``key`` makes this image's widgets unique on the page (the same file may be uploaded twice).
    """
    st.subheader(name)
    try:
        image = decode_upload(data, name, LIMITS)
    except RejectedInput as e:
        st.error(str(e))
        return
    digest = hashlib.sha256(data).hexdigest()
    pred = cached_prediction(run_dir, digest, threshold, model, image)
    pictures, results = st.columns([1, 1])
    with results:
        st.markdown(labels_markdown(pred.labels))
        st.altair_chart(score_chart(pred.scores, pred.labels, thresholds_for(model, threshold) if model.multi_label
                                    else None, list(model.class_names)), width="stretch")
    with pictures:
        image_col, cam_col = st.columns(2)
        image_col.image(image, caption=f"{image.shape[1]}×{image.shape[0]}", width="stretch")
        if show_cam:
            with cam_col:
                show_gradcam(model, run_dir, digest, image, pred.scores, key)


def show_gradcam(model, run_dir: str, digest: str, image: np.ndarray, scores: dict[str, float], key: str) -> None:
    """Grad-CAM overlay at the image's own size (so it lines up with the image beside it)."""
    missing = explain_missing()
    if missing:
        st.info(missing)
        return
    by_score = sorted(scores, key=scores.get, reverse=True)
    chosen = st.selectbox("Grad-CAM class", by_score, key=f"cam-{key}")
    try:
        overlay, score = cached_gradcam(run_dir, digest, chosen, model, image)
    except UserError as e:  # e.g. a backend without gradients: say so, keep the rest of the page
        st.warning(f"Grad-CAM unavailable: {e}")
        return
    st.image(overlay, caption=f"Grad-CAM: {chosen} ({score:.2f})", width="stretch")


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Nested metric dicts -> {"val.calibrated.CF1": 0.49, ...}; lists (per-class tables) are left out."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def metrics_caption(source: str, metrics: dict, multi_label: bool) -> str:
    """What a metrics table measured: model.json's are val (which chose the epoch and fitted the thresholds),
    a report's the split its metrics.json names: test, or val where the data has no test split."""
    if "split" not in metrics:          # model.json: {"val": {...}}
        fitted = " and fitted the thresholds, so its calibrated metrics are optimistic" if multi_label else ""
        return f"Metrics from {source}: the val split, which chose the best epoch{fitted}"
    return f"Metrics from {source}: the {metrics['split']} split, {metrics.get('num_images', '?')} images"


def model_card(model, run_dir: str) -> None:
    """Architecture, classes with their thresholds, and the stored metrics."""
    import pandas as pd

    meta = model.meta
    kind = "multi-label" if model.multi_label else "single-label"
    st.markdown(f"**{meta.get('model', {}).get('name', '?')}** · {len(model.class_names)} classes · {kind} · "
                f"input {model.input_size} px · backend {getattr(model, 'backend', 'torch')} · "
                f"run `{run_dir}`")
    classes = {"class": model.class_names}
    if model.multi_label:                  # single-label: the top class is the label, no threshold applies
        classes["threshold"] = model.thresholds
    st.dataframe(pd.DataFrame(classes), hide_index=True)
    sources = {"model.json": meta.get("metrics") or {}}
    report = Path(run_dir) / "report" / "metrics.json"
    if report.is_file():
        sources["report/metrics.json"] = json.loads(report.read_text())
    for source, metrics in sources.items():
        flat = flatten_metrics(metrics)
        if flat:
            st.caption(metrics_caption(source, metrics, model.multi_label))
            st.dataframe(pd.DataFrame({"metric": list(flat), "value": list(flat.values())}), hide_index=True)


def main() -> None:
    """The page: title, sidebar controls, an upload tab and a model-card tab."""
    st.set_page_config(page_title=TITLE, layout="wide")
    run = run_dir_from_argv(sys.argv[1:])
    st.title(f"{TITLE} · {run.name if run else 'no run'}")
    if run is None:
        st.error(f"No run directory: start the app with `multitag app RUN_DIR` (or set {RUN_ENV}).")
        return
    try:
        model = load_model(str(run))
    except UserError as e:
        st.error(str(e))
        return
    threshold = threshold_control(model)
    show_cam = st.sidebar.toggle("Grad-CAM", value=True, help="Explain a chosen class on each image.")
    predict_tab, card_tab = st.tabs(["Predict", "Model card"])
    with predict_tab:
        files = st.file_uploader(f"Images (up to {LIMITS.max_batch} at once, {LIMITS.max_bytes // MB} MB and "
                                 f"{LIMITS.max_pixels / 1e6:.0f} megapixels each)",
                                 type=IMAGE_TYPES, accept_multiple_files=True, key="images") or []
        if len(files) > LIMITS.max_batch:
            st.warning(f"{len(files)} images uploaded; showing the first {LIMITS.max_batch}.")
        for i, f in enumerate(files[:LIMITS.max_batch]):
            show_image(model, str(run), f.name, f.getvalue(), threshold, show_cam, key=f"{i}-{f.name}")
    with card_tab:
        model_card(model, str(run))


if __name__ == "__main__":  # `streamlit run` executes this file as __main__; importing it runs nothing
    main()

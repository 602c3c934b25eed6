"""The Streamlit app: simulated with streamlit.testing (upload, slider), then once in real headless Chromium."""
import io
import socket
import subprocess
import time

import httpx
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from image_bytes import png_header_only
from multitag import app



@pytest.fixture(scope="module")
def image_paths(digits_csv):
    return sorted((digits_csv.parent / "images").glob("test_*.png"))[:2]


@pytest.fixture()
def app_test(tiny_run, monkeypatch):
    monkeypatch.setenv(app.RUN_ENV, str(tiny_run))
    return AppTest.from_file(app.__file__, default_timeout=60)


def shown_labels(at) -> list[list[str]]:
    """The label list printed for each uploaded image, in upload order."""
    lines = [m.value for m in at.markdown if m.value.startswith(app.LABELS_PREFIX)]
    return [[part.strip(" `") for part in line[len(app.LABELS_PREFIX):].split(",")]
            if "`" in line else [] for line in lines]


def test_without_a_run_the_app_says_how_to_start_it(monkeypatch):
    monkeypatch.delenv(app.RUN_ENV, raising=False)
    at = AppTest.from_file(app.__file__, default_timeout=60).run()
    assert not at.exception
    assert "multitag app RUN_DIR" in at.error[0].value


def test_upload_slider_gradcam_and_model_card(app_test, tiny_model, image_paths):
    at = app_test.run()
    assert not at.exception and at.title[0].value.startswith(app.TITLE)
    uploads = [(p.name, p.read_bytes(), "image/png") for p in image_paths]
    uploads += [("notes.png", b"not an image", "image/png"), ("bomb.png", png_header_only(7000, 7000), "image/png")]
    at.file_uploader(key="images").set_value(uploads).run()
    assert not at.exception

    # calibrated per-class thresholds by default, exactly what the predictor decides
    assert shown_labels(at) == [p.labels for p in tiny_model.predict(image_paths)]
    errors = [e.value for e in at.error]
    assert any("notes.png is not an image" in e for e in errors)
    assert any("bomb.png has 49,000,000 pixels" in e for e in errors)

    # one global threshold from the slider: labels follow it
    at.checkbox(key="override").check().run()
    seen = {}
    for t in (0.0, 0.3, 1.0):
        at.slider(key="threshold").set_value(t).run()
        seen[t] = shown_labels(at)
        assert seen[t] == [p.labels for p in tiny_model.predict(image_paths, threshold=t)]
    assert all(set(labels) == set(tiny_model.class_names) for labels in seen[0.0])
    assert seen[0.0] != seen[0.3]

    # Grad-CAM next to each readable image when multitag.explain is there, else a note saying why not
    if app.explain_missing() is None:
        boxes = at.selectbox
        assert len(boxes) == len(image_paths) and len(at.image) == 2 * len(image_paths)
        scores = tiny_model.predict(image_paths[:1])[0].scores
        assert boxes[0].options == sorted(scores, key=scores.get, reverse=True)
        boxes[0].set_value(boxes[0].options[-1]).run()
        assert not at.exception and len(at.image) == 2 * len(image_paths)
    else:
        assert any("multitag.explain" in i.value for i in at.info)

    # the model card lists every class with its threshold, and names the split of each metrics table
    assert len(at.tabs[1].dataframe[0].value) == len(tiny_model.class_names)
    captions = [c.value for c in at.tabs[1].caption]
    assert "Metrics from report/metrics.json: the test split, 40 images" in captions
    assert any(c.startswith("Metrics from model.json: the val split") for c in captions)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"streamlit exited with {proc.returncode}: {proc.stdout.read()}"
        try:
            if httpx.get(f"{url}/_stcore/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"streamlit did not answer at {url} within {seconds:.0f} s")


@pytest.fixture()
def streamlit_server(tiny_run):
    """`streamlit run` of the app (the exact command `multitag app` runs), stopped at the end."""
    port = free_port()
    proc = subprocess.Popen(app.streamlit_command(tiny_run, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_sigterm_to_multitag_app_stops_its_streamlit_server(tiny_run):
    """kill / a service manager signal `multitag app` alone: the Streamlit child must not outlive it."""
    import os
    import signal
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "multitag.cli", "app", str(tiny_run), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{url}/_stcore/health", timeout=1)
            except httpx.TransportError:
                break                                      # nobody holds the port any more
            time.sleep(0.3)
        else:
            pytest.fail("the Streamlit server still answers after multitag app was sent SIGTERM")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)            # an orphaned server, if the test failed
        except ProcessLookupError:
            pass


def test_real_browser_renders_the_app_and_a_prediction(streamlit_server, browser, image_paths, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(streamlit_server)
    wait = WebDriverWait(browser, 60)
    wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "h1"), app.TITLE))
    # the uploader appears once the tiny_model has loaded
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]"))).send_keys(str(image_paths[0]))
    wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "body"), "Labels:"))
    for drawn in ("[data-testid=stImage] img", ".vega-embed"):  # the image and its score chart
        wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, drawn)))
    shot = tmp_path / "app.png"  # kept in pytest's tmp dir for a look when this fails
    assert browser.save_screenshot(str(shot))
    image = Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 10, "the screenshot is (nearly) one colour: nothing rendered"


def test_model_card_of_a_single_label_model_lists_no_thresholds(tmp_path, monkeypatch):
    """The sidebar says no thresholds apply to a single-label model; the card listed 0.5 for each class."""
    from multitag.api import train

    for c, colour in enumerate(((200, 40, 40), (40, 200, 40), (40, 40, 200))):
        for split in ("train", "val"):
            (tmp_path / "data" / split / f"c{c}").mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (24, 24), colour).save(tmp_path / "data" / split / f"c{c}" / f"{i}.png")
    run = train("demo", data=str(tmp_path / "data"), out=tmp_path / "run", log=lambda *a: None,
                overrides=["train.epochs=1", "train.precision=fp32", "train.channels_last=false", "train.report=false"])
    monkeypatch.setenv(app.RUN_ENV, str(run))
    at = AppTest.from_file(app.__file__, default_timeout=60).run()
    assert not at.exception
    card = at.tabs[1].dataframe[0].value
    assert list(card["class"]) == ["c0", "c1", "c2"] and "threshold" not in card.columns

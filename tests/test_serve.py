"""The HTTP service on a tiny trained run: happy paths, every kind of bad input, concurrency, a real server."""
import io
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from image_bytes import png_header_only
from multitag.serve import create_app

MAX_PIXELS = 64 * 64  # the digit mosaics are 32x32; anything bigger than 64x64 is "huge" here
MAX_BATCH = 4
MAX_BYTES = 100_000


@pytest.fixture(scope="module")
def image_paths(digits_csv):
    return sorted((digits_csv.parent / "images").glob("test_*.png"))[:8]


@pytest.fixture(scope="module")
def client(tiny_model):
    with TestClient(create_app(tiny_model, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, max_batch=MAX_BATCH)) as c:
        yield c


def png_bytes(size=(32, 32), frames=1, fmt="PNG") -> bytes:
    """An encoded image of ``size``; ``frames`` > 1 makes an animated GIF."""
    images = [Image.new("RGB", size, (i * 40 % 256, 90, 200)) for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, fmt, save_all=frames > 1, append_images=images[1:])
    return buf.getvalue()


def one(path):
    return {"file": (path.name, path.read_bytes(), "image/png")}


def many(paths):
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


def assert_matches(response_pred, expected, name):
    assert response_pred["image"] == name          # the key predict --format json uses
    assert response_pred["labels"] == expected.labels
    got = np.array([response_pred["scores"][c] for c in expected.scores])
    np.testing.assert_allclose(got, list(expected.scores.values()), atol=1e-5)


def test_predict_one_image_matches_the_model(client, tiny_model, image_paths):
    r = client.post("/predict", files=one(image_paths[0]))
    assert r.status_code == 200, r.text
    [pred] = r.json()["predictions"]
    assert_matches(pred, tiny_model.predict([image_paths[0]])[0], image_paths[0].name)


def test_predict_batch_threshold_and_top_k(client, tiny_model, image_paths):
    paths = image_paths[:3]
    r = client.post("/predict", files=many(paths))
    assert r.status_code == 200, r.text
    for pred, expected, p in zip(r.json()["predictions"], tiny_model.predict(paths), paths):
        assert_matches(pred, expected, p.name)

    everything = client.post("/predict", params={"threshold": 0}, files=one(paths[0])).json()["predictions"][0]
    assert set(everything["labels"]) == set(tiny_model.class_names)
    custom = client.post("/predict", params={"threshold": 0.3}, files=one(paths[0])).json()["predictions"][0]
    assert custom["labels"] == tiny_model.predict([paths[0]], threshold=0.3)[0].labels

    top = client.post("/predict", params={"top_k": 2}, files=one(paths[0])).json()["predictions"][0]
    scores = top["scores"]
    assert top["labels"] == sorted(scores, key=scores.get, reverse=True)[:2]


def test_labels_health_and_docs(client, tiny_model):
    labels = client.get("/labels").json()
    assert labels["class_names"] == list(tiny_model.class_names) and labels["multi_label"] is True
    np.testing.assert_allclose(labels["thresholds"], tiny_model.thresholds, atol=1e-6)
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "simple_cnn" and health["backend"]
    assert client.get("/docs").status_code == 200
    assert {"/predict", "/labels", "/health"} <= set(client.get("/openapi.json").json()["paths"])


def truncated_png() -> bytes:
    data = png_bytes((48, 48))
    return data[: len(data) // 2]  # a valid header, then the pixel data stops


@pytest.mark.parametrize("request_kwargs,status,fragment", [
    pytest.param({"content": b""}, 400, "no image in the request", id="empty-body"),
    pytest.param({"files": {"file": ("a.png", b"", "image/png")}}, 400, "a.png is empty", id="empty-file"),
    pytest.param({"files": {"file": ("a.txt", b"hello, not pixels", "text/plain")}}, 415, "not an image",
                 id="non-image"),
    pytest.param({"files": {"file": ("t.png", truncated_png(), "image/png")}}, 415, "not a readable image",
                 id="truncated"),
    pytest.param({"files": {"file": ("big.png", png_bytes((100, 100)), "image/png")}}, 413, "10,000 pixels",
                 id="huge-image"),
    pytest.param({"files": {"file": ("bomb.png", png_header_only(30000, 30000), "image/png")}}, 413,
                 "bomb.png has 900,000,000 pixels; the limit is 4,096", id="bomb-past-pils-guard"),
    pytest.param({"files": {"file": ("anim.gif", png_bytes((32, 32), frames=6, fmt="GIF"), "image/gif")}}, 413,
                 "6,144 pixels in 6 frames; the limit is 4,096; send a still image", id="gif-frames-count"),
    pytest.param({"content": png_bytes(), "headers": {"content-type": "image/png"}}, 400,
                 "(the body was sent as image/png, not multipart/form-data)", id="raw-image-body"),
    pytest.param({"files": {"image": ("a.png", png_bytes(), "image/png")}}, 400, "got field: image",
                 id="wrong-field"),
    pytest.param({"files": [("files", (f"{i}.png", png_bytes(), "image/png")) for i in range(MAX_BATCH + 1)]}, 413,
                 f"the limit is {MAX_BATCH}", id="too-many-files"),
    pytest.param({"files": {"file": ("a.png", b"x" * (MAX_BYTES + 1), "image/png")}}, 413, "request body over",
                 id="body-too-large"),
    pytest.param({"data": {"file": "just text"}}, 400, "file", id="text-instead-of-file"),
    pytest.param({"files": {"file": ("a.png", png_bytes(), "image/png")}, "params": {"threshold": "high"}}, 400,
                 "threshold='high' is invalid", id="bad-threshold"),
    pytest.param({"files": {"file": ("a.png", png_bytes(), "image/png")}, "params": {"top_k": 0}}, 400, "top_k",
                 id="bad-top-k"),
])
def test_bad_input_is_a_4xx_with_a_json_error(client, request_kwargs, status, fragment):
    r = client.post("/predict", **request_kwargs)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]


def test_raw_bytes_posted_as_a_form_are_not_echoed_back(client):
    """curl --data-binary sends form-urlencoded: its bytes parse as field names, which are not repeated."""
    body = png_bytes((60, 60))
    r = client.post("/predict", content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and len(r.text) < 300
    assert "sent as application/x-www-form-urlencoded, not multipart/form-data" in r.json()["error"]


def test_every_part_of_a_repeated_file_field_is_predicted(client, tiny_model, image_paths):
    parts = [("file", (p.name, p.read_bytes(), "image/png")) for p in image_paths[:2]]
    r = client.post("/predict", files=parts)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["image"] for p in preds] == [p.name for p in image_paths[:2]]


def test_images_are_shrunk_to_the_input_before_inference_with_the_same_result(tiny_model, image_paths):
    """A request holds each decoded image only until it is resized (memory), and the labels do not change."""
    seen = []

    class Recorder:
        def __getattr__(self, name):
            return getattr(tiny_model, name)

        def predict(self, images, **kw):
            seen.extend(tuple(im.shape) for im in images)
            return tiny_model.predict(images, **kw)

    big = Image.open(image_paths[0]).resize((60, 44))
    buf = io.BytesIO()
    big.save(buf, "PNG")
    with TestClient(create_app(Recorder(), max_pixels=MAX_PIXELS)) as c:
        r = c.post("/predict", files={"file": ("big.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    size = tiny_model.input_size
    assert seen == [(3, size, size)]
    assert_matches(r.json()["predictions"][0], tiny_model.predict([big])[0], "big.png")


class ConcurrencyProbe:
    """A model stand-in recording how many ``predict`` calls overlap (the service must allow one)."""

    def __init__(self, model):
        self.model, self.active, self.most = model, 0, 0
        self._count = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.model, name)

    def predict(self, images, **kwargs):
        with self._count:
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            time.sleep(0.02)  # widen the window in which overlapping calls would be caught
            return self.model.predict(images, **kwargs)
        finally:
            with self._count:
                self.active -= 1


def test_concurrent_requests_succeed_agree_and_never_overlap_inference(tiny_model, image_paths):
    probe = ConcurrencyProbe(tiny_model)
    expected = tiny_model.predict(image_paths)
    with TestClient(create_app(probe)) as c, ThreadPoolExecutor(max_workers=4) as pool:
        responses = list(pool.map(lambda p: c.post("/predict", files=one(p)), image_paths))
    assert [r.status_code for r in responses] == [200] * len(image_paths)
    for r, e, p in zip(responses, expected, image_paths):
        assert_matches(r.json()["predictions"][0], e, p.name)
    assert probe.most == 1


@pytest.fixture()
def live_server(tiny_model):
    """uvicorn on 127.0.0.1 with an OS-chosen port, in a thread; stopped when the test ends."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(tiny_model), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    assert not thread.is_alive(), "uvicorn did not stop"


def test_real_server_over_http(live_server, image_paths, tiny_model):
    assert httpx.get(f"{live_server}/health", timeout=10).json()["status"] == "ok"
    r = httpx.post(f"{live_server}/predict", files=one(image_paths[0]), timeout=30)
    assert r.status_code == 200
    assert r.json()["predictions"][0]["labels"] == tiny_model.predict([image_paths[0]])[0].labels


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_their_scripts_from_the_service_itself(client, page):
    """The docs must work offline: every script and stylesheet they load is served by the app."""
    html = client.get(page).text
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and all(a.startswith("/") for a in assets), assets
    for asset in assets:
        r = client.get(asset)
        assert r.status_code == 200 and len(r.content) > 500, asset


def test_real_browser_renders_the_docs_offline(live_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{live_server}/docs")
    wait = WebDriverWait(browser, 60)
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, ".swagger-ui .info .title"), "multitag"))
    paths = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/predict", "/labels", "/health"} <= paths


@pytest.mark.parametrize("command", ["serve", "app"])
def test_a_busy_port_is_one_line_before_the_model_loads(tmp_path, capsys, command):
    import socket

    from multitag.cli import main

    (tmp_path / "model.json").write_text("{}")          # the app checks for a run; nothing else is read
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main([command, str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0] and "--port" in err[0]


@pytest.mark.parametrize("flag", ["--max-batch=0", "--max-mb=-1", "--max-megapixels=0"])
def test_serve_limits_must_be_above_zero(tmp_path, capsys, flag):
    from multitag.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(tmp_path), flag])
    assert exit_.value.code == 2 and "above 0" in capsys.readouterr().err


def test_serve_port_zero_prints_the_real_port(tiny_model, monkeypatch, capsys):
    import uvicorn

    from multitag import serve as serve_module

    ran = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: ran.update(port=sockets[0].getsockname()[1]))
    serve_module.serve(tiny_model.run_dir, port=0)
    assert ran["port"] > 0 and f"http://127.0.0.1:{ran['port']} " in capsys.readouterr().out


def test_top_k_with_a_threshold_is_refused_not_ignored(client, image_paths, tiny_run, capsys):
    from multitag.cli import main

    r = client.post("/predict", params={"threshold": 0.1, "top_k": 2}, files=one(image_paths[0]))
    assert r.status_code == 400 and "give top_k or threshold, not both" in r.json()["error"]
    assert main(["predict", str(tiny_run), str(image_paths[0]), "--threshold", "0.1", "--top-k", "2"]) == 2
    assert "give --top-k or --threshold, not both" in capsys.readouterr().err

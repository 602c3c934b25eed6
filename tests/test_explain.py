"""Grad-CAM / Grad-CAM++: the peak lands where the evidence is, on the original image's pixels."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from multitag.checkpoint import MODEL_META, MODEL_WEIGHTS, model_state, save_tensors, write_json
from multitag.data.decode import load_image
from multitag.data.transforms import normalize
from multitag.errors import UserError
from multitag.explain import cam_maps, explain_images, explain_to_png, gradcam, overlay, to_original
from multitag.models import build_model
from multitag.predict import load
from multitag.runtime import Runtime

METHODS = ("gradcam", "gradcam++")
SIZE = 32                         # model input size
SQUARE_CLASSES = ("red", "green")
COLOURS = ((230, 30, 30), (30, 230, 30))


# ----------------------------------------------------------------------------- a hand-made model

class ChannelMeans(nn.Module):
    """Logit c = mean of input channel c over a 4×-downsampled map: class c's evidence is exactly
    where channel c is bright, so the CAM must reproduce that region on the original image."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(x, 4)                     # (B, 3, S/4, S/4)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))                                 # (B, 3) logits

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class HandModel:
    """Just what explain needs from a multitag Model, with the shared preprocessing."""

    def __init__(self, network: nn.Module, class_names, input_size: int = SIZE):
        self.network, self.class_names, self.multi_label = network.eval(), list(class_names), True
        self.input_size, self.mean, self.std = input_size, [0.0] * 3, [1.0] * 3
        self.runtime = Runtime(torch.device("cpu"), "fp32", False)

    def preprocess(self, images) -> torch.Tensor:
        """(B, 3, S, S) normalised: decode → squash-resize → normalise, as multitag.predict.Model does."""
        return normalize(torch.stack([load_image(im, self.input_size) for im in images]), self.mean, self.std)


def _patch_image(h: int, w: int, patches: dict[int, tuple[int, int, int, int]]) -> np.ndarray:
    """(h, w, 3) black uint8 image with channel c set to 255 in each (top, left, bottom, right) box."""
    img = np.zeros((h, w, 3), np.uint8)
    for c, (t, l, b, r) in patches.items():
        img[t:b, l:r, c] = 255
    return img


@pytest.mark.parametrize("method", METHODS)
def test_heatmap_sits_on_the_evidence_of_a_non_square_image(method):
    # red box in the upper right, green box lower left, of a 50×80 (H×W) image squashed to 32×32
    red, green = (10, 50, 22, 70), (30, 5, 46, 25)
    image = _patch_image(50, 80, {0: red, 1: green})
    model = HandModel(ChannelMeans(), ["red", "green", "blue"])
    for name, (t, l, b, r) in (("red", red), ("green", green)):
        result = gradcam(model, image, name, method=method)
        heat = result.heatmap
        assert heat.shape == (50, 80) and heat.dtype == np.float32
        assert result.overlay.shape == (50, 80, 3) and result.overlay.dtype == np.uint8
        assert 0.0 <= heat.min() and heat.max() == pytest.approx(1.0)
        peak = np.unravel_index(heat.argmax(), heat.shape)
        assert t <= peak[0] < b and l <= peak[1] < r, (name, peak)
        ys, xs = np.mgrid[:50, :80]
        centroid = ((heat * ys).sum() / heat.sum(), (heat * xs).sum() / heat.sum())
        # an offset of half a feature cell (3 px here), a flip or a transpose all fail this
        assert abs(centroid[0] - (t + b - 1) / 2) < 1.5 and abs(centroid[1] - (l + r - 1) / 2) < 1.5, centroid
        far = heat[:, :40] if name == "red" else heat[:, 40:]
        assert far.max() < 0.05                                   # nothing on the other box


# ----------------------------------------------------------------------------- a trained model

def _square_batch(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n 32×32 noisy dark images, each with a red and/or a green square anywhere; (n, 2) labels."""
    images = rng.integers(0, 40, size=(n, SIZE, SIZE, 3), dtype=np.uint8)
    labels = rng.random((n, 2)) < 0.5
    for img, lab in zip(images, labels):
        for k in np.flatnonzero(lab):
            side = int(rng.integers(5, 10))
            y, x = rng.integers(0, SIZE - side, size=2)
            img[y:y + side, x:x + side] = COLOURS[k]
    return images, labels.astype(np.float32)


@pytest.fixture(scope="module")
def squares_run(tmp_path_factory):
    """A simple_cnn trained for a few dozen steps to tell red from green squares, saved as a run directory."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = build_model("simple_cnn", 2)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    mean, std = [0.2] * 3, [0.3] * 3
    net.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # the same weights on any machine, and faster for a net this small
    try:
        for _ in range(40):
            images, labels = _square_batch(32, rng)
            x = normalize(torch.from_numpy(images).permute(0, 3, 1, 2), mean, std)
            loss = nn.functional.binary_cross_entropy_with_logits(net(x), torch.from_numpy(labels))
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    run = tmp_path_factory.mktemp("squares_run")
    save_tensors(run / MODEL_WEIGHTS, model_state(net))
    write_json(run / MODEL_META, {"model": {"name": "simple_cnn", "args": {}}, "class_names": list(SQUARE_CLASSES),
                                  "multi_label": True, "input_size": SIZE, "mean": mean, "std": std,
                                  "thresholds": None})
    return run


def _two_squares(h: int, w: int) -> np.ndarray:
    """(h, w, 3) dark image: a red square in the top-right quadrant, a green one in the bottom-left."""
    img = np.full((h, w, 3), 20, np.uint8)
    sy, sx = h // 4, w // 4
    img[h // 8:h // 8 + sy, w // 2 + w // 8:w // 2 + w // 8 + sx] = COLOURS[0]
    img[h // 2 + h // 8:h // 2 + h // 8 + sy, w // 8:w // 8 + sx] = COLOURS[1]
    return img


@pytest.mark.parametrize("method", METHODS)
def test_trained_model_looks_at_the_class_region(squares_run, method):
    # The two squares differ only in colour, so only the class's gradients can tell the CAM which
    # one to show; the image is 50×80, so the map must also be un-squashed to land on it.
    model = load(squares_run, device="cpu")
    image = _two_squares(50, 80)
    scores = model.predict_scores([image])[0]
    assert (scores > 0.5).all(), f"the tiny model did not learn the task: {scores}"
    top_right, bottom_left = (slice(0, 25), slice(40, 80)), (slice(25, 50), slice(0, 40))
    for name, own, other in (("red", top_right, bottom_left), ("green", bottom_left, top_right)):
        heat = gradcam(model, image, name, method=method).heatmap
        assert heat.shape == (50, 80)
        peak = np.unravel_index(heat.argmax(), heat.shape)
        assert own[0].start <= peak[0] < own[0].stop and own[1].start <= peak[1] < own[1].stop, (name, peak)
        assert heat[own].mean() > 2 * heat[other].mean(), (name, heat[own].mean(), heat[other].mean())


def test_inputs_png_and_errors(squares_run, tmp_path):
    model = load(squares_run, device="cpu")
    image = _two_squares(50, 80)
    path = tmp_path / "wide.png"
    Image.fromarray(image).save(path)
    from_path = gradcam(model, str(path))                         # no class: the top one
    assert from_path.class_name in SQUARE_CLASSES
    for same in (Image.fromarray(image), image):
        other = gradcam(model, same, from_path.class_name)
        np.testing.assert_allclose(other.heatmap, from_path.heatmap, atol=1e-5)
        assert other.score == pytest.approx(from_path.score, abs=1e-6)

    out = explain_to_png(squares_run, str(path), "red", out=tmp_path / "cam.png")
    with Image.open(out) as im:
        assert im.size == (80, 50) and im.mode == "RGB"           # PIL size is (W, H): the original's
    (tmp_path / "maps").mkdir()
    assert explain_to_png(squares_run, str(path), "red", out=tmp_path / "maps") == tmp_path / "maps" / f"{path.stem}.red.cam.png"
    assert explain_to_png(squares_run, str(path), "red", out=f"{tmp_path}/new/") == tmp_path / "new" / f"{path.stem}.red.cam.png"
    assert explain_to_png(squares_run, str(path), "red", out=tmp_path / "heat") == tmp_path / "heat.png"
    with pytest.raises(UserError, match="written as PNG"):
        explain_to_png(squares_run, str(path), "red", out=tmp_path / "cam.jpg")

    with pytest.raises(UserError, match='did you mean "green"'):
        gradcam(model, image, "gren")
    with pytest.raises(UserError, match="unknown explanation method"):
        gradcam(model, image, method="saliency")


def test_cli_explain(squares_run, tmp_path, capsys):
    from multitag.cli import main

    path = tmp_path / "img.png"
    Image.fromarray(_two_squares(40, 30)).save(path)
    out = tmp_path / "out" / "cam.png"
    assert main(["explain", str(squares_run), str(path), "--class", "green", "--method", "gradcam++",
                 "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["png"] == str(out)
    with Image.open(out) as im:
        assert im.size == (30, 40)
    assert main(["explain", str(squares_run), str(path), "--class", "nope"]) == 2


# ----------------------------------------------------------------------------- every family

@pytest.mark.parametrize("name", ["simple_cnn", "timm/resnet18", "timm/efficientnet_b0"])
def test_cam_maps_for_each_family(name):
    torch.manual_seed(0)
    net = build_model(name, 5).eval()
    x = torch.randn(2, 3, 64, 64)
    for method in METHODS:
        maps, classes, logits = cam_maps(net, x, top_k=2, method=method)
        assert maps.shape[:2] == (2, 2) and maps.ndim == 4 and classes.shape == (2, 2)
        assert torch.isfinite(maps).all() and (maps >= 0).all()
        torch.testing.assert_close(logits, net(x), rtol=1e-4, atol=1e-4)   # head(features) is the model
        assert (classes == logits.topk(2, dim=1).indices).all()
        heat = to_original(maps[0, 0], 37, 91)
        assert heat.shape == (37, 91) and heat.min() >= 0 and heat.max() <= 1


def test_batch_matches_single_images():
    torch.manual_seed(0)
    model = HandModel(build_model("simple_cnn", 3).eval(), ["a", "b", "c"])
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in ((20, 30), (45, 17))]
    together = explain_images(model, images, top_k=3)
    for image, row in zip(images, together):
        for cam in row:
            alone = gradcam(model, image, cam.class_name)
            np.testing.assert_allclose(alone.heatmap, cam.heatmap, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    net = build_model("timm/resnet18", 4).eval()
    x = torch.randn(2, 3, 64, 64)
    cpu, _, _ = cam_maps(net, x, top_k=2)
    gpu, _, _ = cam_maps(net.cuda(), x.cuda(), top_k=2)
    assert gpu.device.type == "cpu"
    # cuDNN may use TF32: equal to a percent of the largest value, not bit for bit
    torch.testing.assert_close(gpu, cpu, rtol=1e-2, atol=1e-2 * float(cpu.max()))


def test_scores_and_default_class_follow_the_models_test_time_views():
    """airbench's tta_flip averages the image and its mirror in forward; forward_head alone does not."""
    torch.manual_seed(0)
    net = build_model("airbench", 4, tta_flip=True).eval()
    model = HandModel(net, ["a", "b", "c", "d"], input_size=32)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(4)]
    with torch.no_grad():
        expected = torch.sigmoid(net(model.preprocess(images)))          # what predict reports
        head_only = torch.sigmoid(net.forward_head(net.forward_features(model.preprocess(images))))
    assert not torch.allclose(expected, head_only, atol=1e-4)            # the views matter here
    for row, scores in zip(explain_images(model, images, top_k=2), expected):
        assert [cam.class_name for cam in row] == [model.class_names[i] for i in scores.topk(2).indices]
        np.testing.assert_allclose([cam.score for cam in row], scores.topk(2).values.numpy(), atol=1e-5)


def test_a_one_by_one_feature_map_is_said_to_be_unable_to_localise():
    torch.manual_seed(0)
    model = HandModel(build_model("advanced_cnn", 3).eval(), ["a", "b", "c"], input_size=32)
    image = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    with pytest.warns(UserWarning, match="feature map is 1×1 at 32 px"):
        explain_images(model, [image])


def test_overlay_of_a_large_photo_needs_a_few_bytes_per_pixel():
    """The blend runs in float32 row bands: at full size in float64 it took ~74 B/px (0.9 GB for
    12 MP); now the temporaries are bounded by the band, so the peak is the uint8 result plus a band."""
    import tracemalloc
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (2000, 3000, 3), dtype=np.uint8)            # 6 MP
    heat = rng.random((2000, 3000), dtype=np.float32)
    tracemalloc.start()
    blended = overlay(image, heat)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < image.nbytes + 32e6               # the uint8 result + ~15 MB of band temporaries (was 432 MB)
    reference = np.clip(0.5 * image + 0.5 * 255.0 * np.clip(1.5 - np.abs(heat[..., None] * 4 - [3.0, 2.0, 1.0]), 0, 1)
                        + 0.5, 0, 255).astype(np.uint8)                  # the float64 blend, in one go
    assert np.abs(blended.astype(int) - reference).max() <= 1

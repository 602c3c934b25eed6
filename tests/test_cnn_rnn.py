"""CNN-RNN: label sequences, END and padding, beam vs greedy search, per-class scores, training
through the engine with a save/load round-trip, and a decoder that learns a label co-occurrence."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from multitag.errors import UserError
from multitag.export import _torch_export
from multitag.finetune import apply_freeze
from multitag.models import build_model
from multitag.models.cnn_rnn import (
    CNNRNN,
    PAD,
    beam_search,
    greedy_search,
    label_order,
    target_sequences,
)

SMALL = {"backbone": "simple_cnn", "embed_dim": 32, "hidden": 64}   # fast CPU-sized CNN-RNN


@pytest.fixture(autouse=True)
def one_thread():
    """The machine is shared: one thread is faster for these small steps than fighting for two."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def small_model(num_classes=5, seed=0, **kw) -> CNNRNN:
    torch.manual_seed(seed)
    return build_model("cnn_rnn", num_classes, **{**SMALL, **kw}).eval()


def varied_model(num_classes=6) -> CNNRNN:
    """A random model with peaky next-label distributions that depend on the image, so that images
    decode to different label sets of several labels (checked where it matters)."""
    model = small_model(num_classes)
    with torch.no_grad():
        model.decoder.image_proj.weight.mul_(10)
        model.decoder.label_embed.weight.mul_(20)
    return model


# --- label sequences -------------------------------------------------------------------------------

def test_label_order_by_frequency_ties_by_index_and_rare_first():
    counts = [3, 5, 5, 0, 1]
    assert label_order(counts).tolist() == [1, 2, 0, 4, 3]               # 5, 5 (ties: index 1 before 2), 3, 1, 0
    assert label_order(counts, "rare_first").tolist() == [3, 4, 0, 1, 2]  # ties still by index
    assert label_order([0, 0, 0]).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="order"):
        label_order(counts, "random")


def test_target_sequences_order_end_padding_and_ignore():
    order = label_order([3, 5, 5, 0, 1])                                  # 1, 2, 0, 4, 3
    targets = torch.tensor([[1, 1, 0, 0, 1], [0, 0, 0, 0, 0], [0, 1, 1, 0, 0]], dtype=torch.float32)
    ignore = torch.zeros_like(targets, dtype=torch.bool)
    ignore[2, 1] = True                                                   # a positive marked "difficult"
    seq = target_sequences(targets, ignore, order)
    END = 5
    assert seq.dtype == torch.int64
    assert seq.tolist() == [[1, 0, 4, END],                               # frequency order, then END
                            [END, PAD, PAD, PAD],                         # no labels: just END
                            [2, END, PAD, PAD]]                           # the ignored label is left out
    rare = target_sequences(targets, None, label_order([3, 5, 5, 0, 1], "rare_first"))
    assert rare[0].tolist() == [4, 0, 1, END] and rare[2].tolist() == [1, 2, END, PAD]
    assert target_sequences(torch.zeros(2, 3), None, label_order([1, 1, 1])).tolist() == [[3], [3]]


def test_sequence_loss_is_a_mean_over_real_tokens_padding_ignored():
    """Padding contributes nothing: the loss of a batch is the token-weighted mean of its rows'."""
    model = small_model()                                                 # eval: BN/dropout independent of batch
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.float32)   # 2 and 5 tokens
    ig = torch.zeros_like(t, dtype=torch.bool)
    both = model.sequence_loss(x, t, ig)
    one, two = model.sequence_loss(x[:1], t[:1], ig[:1]), model.sequence_loss(x[1:], t[1:], ig[1:])
    assert both.item() == pytest.approx((2 * one.item() + 5 * two.item()) / 7, rel=1e-5)


def test_ignored_pairs_are_neither_positive_nor_negative():
    """Changing the decoder's score of an ignored class changes nothing in the loss."""
    model = small_model()
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([[1, 0, 0, 0, 0]], dtype=torch.float32)
    ig = torch.tensor([[False, False, True, False, False]])
    before = model.sequence_loss(x, t, ig).item()
    with torch.no_grad():
        model.decoder.out_bias[2] += 10.0
    assert model.sequence_loss(x, t, ig).item() == pytest.approx(before, rel=1e-6)
    assert model.sequence_loss(x, t, None).item() > before + 1               # unmasked, it is a negative


# --- search on a hand-built scorer ------------------------------------------------------------------

# Three labels (0, 1, 2), END = 3, START = 4. The next-token distribution depends on the last token:
#   START → 0: .5, 1: .4, END: .1     after 0 → 1: .3, 2: .3, END: .4
#   after 1 → 2: .9, END: .1          after 2 → END: 1
# Greedy takes 0 then END: p([0]) = .5 × .4 = .20. The best sequence is [1, 2]: .4 × .9 × 1 = .36.
TOY = torch.tensor([[0.0, 0.3, 0.3, 0.4], [0.0, 0.0, 0.9, 0.1], [0.0, 0.0, 0.0, 1.0],
                    [0.25, 0.25, 0.25, 0.25], [0.5, 0.4, 0.0, 0.1]])


def toy_step(tokens, state):
    return TOY[tokens].log(), state                                       # log 0 = -inf: impossible


def toy_state(batch=2):
    return (torch.zeros(batch, 1),)


def test_beam_search_finds_the_best_sequence_greedy_does_not():
    greedy = greedy_search(toy_step, toy_state(), num_classes=3, max_len=3)
    beam = beam_search(toy_step, toy_state(), num_classes=3, max_len=3, beam_size=2)
    assert greedy.label_sets() == [[0], [0]]
    assert beam.label_sets() == [[1, 2], [1, 2]]
    # m_c: best next-label probability along the kept hypotheses ([0] and [1, 2]); 2 has .9 after 1
    assert beam.max_prob[0].tolist() == pytest.approx([0.5, 0.4, 0.9])
    assert greedy.max_prob[0].tolist() == pytest.approx([0.5, 0.4, 0.3])
    assert beam.class_scores()[0].tolist() == pytest.approx([0.25, 0.7, 0.95])  # (m + decoded) / 2


def test_beam_one_is_greedy_on_the_toy_scorer():
    beam = beam_search(toy_step, toy_state(), num_classes=3, max_len=3, beam_size=1)
    greedy = greedy_search(toy_step, toy_state(), num_classes=3, max_len=3)
    assert beam.label_sets() == greedy.label_sets()
    assert torch.equal(beam.max_prob, greedy.max_prob)


def test_max_len_forces_end():
    beam = beam_search(toy_step, toy_state(1), num_classes=3, max_len=1, beam_size=2)
    assert beam.label_sets() == [[0]]                                     # [1, 2] is too long now; [0] > [1]


# --- the model's own decoding -----------------------------------------------------------------------

def test_beam_one_equals_greedy_on_the_model():
    model = varied_model()
    x = torch.randn(6, 3, 32, 32)
    greedy = model.decode(x, greedy=True)
    assert model.decode(x, beam_size=1) == greedy
    assert len({tuple(s) for s in greedy}) > 1 and max(map(len, greedy)) > 2   # varied, several labels
    with torch.no_grad():
        feats = model.forward_features(x)
        a, b = model.search(feats, beam_size=1), model.search(feats, greedy=True)
    assert torch.allclose(a.max_prob, b.max_prob)


def test_no_duplicate_labels_and_max_len():
    model = small_model(num_classes=5)
    with torch.no_grad():
        model.decoder.out_bias[5] = -1e4                                  # END (index C) almost never chosen
    x = torch.randn(3, 3, 32, 32)
    for sets in (model.decode(x), model.decode(x, greedy=True)):
        assert all(sorted(s) == [0, 1, 2, 3, 4] for s in sets)            # every label once, then forced END
    model.max_len = 2
    assert all(len(s) == 2 and len(set(s)) == 2 for s in model.decode(x))


def test_forward_gives_per_class_logits_decoded_labels_score_higher():
    model = varied_model()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (6, 6) and torch.isfinite(logits).all()
    score, sets = torch.sigmoid(logits), model.decode(x)
    assert sum(0 < len(d) < 6 for d in sets) >= 3                         # the comparison below is not vacuous
    for s, decoded in zip(score, sets):
        chosen = torch.zeros(6, dtype=torch.bool)
        chosen[decoded] = True
        assert torch.equal(s >= 0.5, chosen)                             # threshold 0.5 = the decoded set
        if decoded and not chosen.all():
            assert s[chosen].min() > s[~chosen].max()


def test_head_is_differentiable_not_exportable_and_freezing_keeps_the_decoder(tmp_path):
    model = small_model()
    feats = model.forward_features(torch.randn(2, 3, 32, 32)).detach().requires_grad_(True)
    logits = model.forward_head(feats)
    grad, = torch.autograd.grad(logits[:, 0].sum(), feats)
    assert grad.abs().sum() > 0
    with pytest.raises(UserError, match="cannot be traced or exported"):  # a trace would fix the step count
        _torch_export(model, str(tmp_path / "model.onnx"), 32)
    apply_freeze(model, ["backbone"])
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"decoder"}


# --- training ---------------------------------------------------------------------------------------

def test_decoder_learns_a_label_co_occurrence():
    """Images with label 0 always also have label 1; after overfitting a handful of them, greedy
    decoding gives both, and the other images' sets exactly."""
    sets = [[0, 1], [0, 1], [0, 1], [1], [1], [2], [2, 3], [3]]
    targets = torch.zeros(len(sets), 4)
    for i, s in enumerate(sets):
        targets[i, s] = 1
    model = small_model(num_classes=4, label_counts=targets.sum(0).int().tolist(),
                        backbone_args={"drop_rate": 0.0}).train()            # no dropout: a quick, clean overfit
    torch.manual_seed(1)
    x = torch.randn(len(sets), 3, 32, 32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):
        loss = model.sequence_loss(x, targets, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert loss.item() < 0.05
    assert [sorted(s) for s in model.decode(x, greedy=True)] == sets
    assert [sorted(s) for s in model.decode(x)] == sets
    assert model.decode(x[:3], greedy=True) == [[1, 0]] * 3             # frequency order: 1 (5×) before 0 (3×)


def test_trains_through_the_engine_and_reloads_with_the_same_scores(digits_csv, tmp_path):
    from multitag.api import train
    from multitag.predict import load

    overrides = ["train.epochs=1", "train.batch_size=32", "train.precision=fp32", "train.channels_last=false",
                 "data.image_size=32", "stages=[]", "data.mean=[0.1,0.1,0.1]", "data.std=[0.25,0.25,0.25]",
                 "model.args.backbone=simple_cnn", "model.args.embed_dim=32", "model.args.hidden=64",
                 "train.report=false"]
    run = train("cnn_rnn", data=digits_csv, out=tmp_path / "run", overrides=overrides, log=lambda *a: None)
    meta = json.loads((run / "model.json").read_text())
    args = meta["model"]["args"]
    assert meta["model"]["name"] == "cnn_rnn" and len(args["label_counts"]) == 10 and sum(args["label_counts"]) > 0

    # an independent rebuild: the registry builder with model.json's args and the saved tensors
    net = CNNRNN(10, **{**args, "pretrained": False})
    net.load_state_dict(load_file(str(run / "model.safetensors")))
    net.eval()
    model = load(run, device="cpu", backend="torch")
    images = sorted(digits_csv.parent.glob("**/*.png"))[:12]
    x = model.preprocess(images)
    with torch.no_grad():
        expected = torch.sigmoid(net(x)).numpy()
    np.testing.assert_allclose(model.predict_scores(images), expected, atol=1e-6)
    # the model's own decoded sets are exactly the labels at threshold 0.5
    decoded = [sorted(model.class_names[c] for c in s) for s in net.decode(x)]
    assert [sorted(p.labels) for p in model.predict(images, threshold=0.5)] == decoded
    assert net.order.tolist() == label_order(args["label_counts"]).tolist()
    assert not math.isnan(meta["best_value"])
    # no ONNX: export says so before reading any image, and asking for the onnx backend names the reason
    from multitag.export import export_onnx

    with pytest.raises(UserError, match="cnn_rnn model cannot be exported to ONNX"):
        export_onnx(run, log=lambda *a: None)
    with pytest.raises(UserError, match="torch backend only"):
        load(run, device="cpu", backend="onnx")

    # val_loss is the objective train_loss measures (teacher-forced label sequences), on the val rows
    from multitag import engine
    from multitag.runtime import Runtime

    cfg = engine.resolved_config(engine.load_run_config(run))
    _, val_loader = engine.make_loaders(cfg, engine.prepare_in_turn(cfg, run, True, lambda *a: None), lambda *a: None)
    expected_loss = engine.own_objective_loss(net, None, val_loader, Runtime(torch.device("cpu"), "fp32", False))
    (row,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert row["val_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert net.sequence_loss(x, torch.zeros(len(x), 10), torch.zeros(len(x), 10, dtype=torch.bool)).item() > 0


def test_pretrained_backbone_load_says_its_head_is_dropped_not_replaced(capsys):
    """The decoder replaces the backbone's classifier; the weight load must not announce a 1-class head."""
    model = build_model("cnn_rnn", 4, label_counts=[1, 2, 3, 4])
    out = capsys.readouterr().out
    assert "pretrained head dropped (the model uses the features only)" in out and "new head" not in out
    assert not any(k.startswith("backbone.classifier") for k in model.state_dict())


def test_a_saturated_score_keeps_its_gradient_for_grad_cam(monkeypatch):
    """Scores past the clamp (1 - 1e-6) are the most confident labels; their Grad-CAM was blank."""
    model = small_model()
    feats = model.forward_features(torch.randn(2, 3, 32, 32)).detach().requires_grad_(True)

    class Saturated:                     # a search result whose scores depend on the features, saturated
        def class_scores(self):
            return 1 - 1e-9 * torch.sigmoid(feats.mean((2, 3))[:, :5])

    monkeypatch.setattr(model, "search", lambda features: Saturated())
    logits = model.forward_head(feats)
    assert torch.isfinite(logits).all() and torch.allclose(logits, torch.logit(torch.tensor(1 - 1e-6)))
    grad, = torch.autograd.grad(logits[:, 0].sum(), feats)
    assert grad.abs().sum() > 0

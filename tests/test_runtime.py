"""Precision / memory-format choice: explicit settings are obeyed, auto measures once and caches."""
import json
from pathlib import Path

import pytest
import torch

from multitag import runtime
from multitag.errors import UserError
from multitag.losses import MaskedBCE
from multitag.models import build_model


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    """These are the CPU's choices; on a machine with a GPU, device auto would be CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def setup():
    model = build_model("simple_cnn", 4)
    return model, MaskedBCE(), torch.randn(8, 3, 32, 32), torch.randint(0, 2, (8, 4)).float()


def test_explicit_choice_is_not_measured(monkeypatch):
    monkeypatch.setattr(runtime, "time_train_step", lambda *a, **k: pytest.fail("measured"))
    rt = runtime.choose_runtime(*setup(), precision="fp32", channels_last="false", log=lambda *a: None)
    assert (rt.device.type, rt.precision, rt.channels_last) == ("cpu", "fp32", False)


def test_auto_measures_picks_fastest_and_caches(tmp_path, monkeypatch, steady_load):
    monkeypatch.setenv("MULTITAG_CACHE", str(tmp_path))
    fake = {("fp32", False): 0.3, ("fp32", True): 0.1, ("bf16", True): 0.2}
    monkeypatch.setattr(runtime, "time_train_step", lambda m, l, x, y, rt, **k: fake[(rt.precision, rt.channels_last)])
    logs = []
    rt = runtime.choose_runtime(*setup(), log=logs.append)
    assert (rt.precision, rt.channels_last) == ("fp32", True)
    assert "measured" in logs[0]
    cached = json.loads((tmp_path / "precision.json").read_text())
    assert list(cached.values())[0]["choice"] == ["fp32", True]
    # second call: no measuring
    monkeypatch.setattr(runtime, "time_train_step", lambda *a, **k: pytest.fail("measured twice"))
    assert runtime.choose_runtime(*setup(), log=logs.append) == rt


def test_a_choice_made_under_another_malloc_setting_is_measured_again(tmp_path, monkeypatch, steady_load):
    """allocator.py's setting moves the candidates by different amounts (1.05-1.41x): not one cache entry."""
    from multitag import allocator

    monkeypatch.setenv("MULTITAG_CACHE", str(tmp_path))
    measured = []
    monkeypatch.setattr(runtime, "time_train_step", lambda *a, **k: measured.append(1) or 0.1)
    monkeypatch.setattr(allocator, "state", "glibc defaults")
    runtime.choose_runtime(*setup(), log=lambda *a: None)
    first = len(measured)
    runtime.choose_runtime(*setup(), log=lambda *a: None)
    assert len(measured) == first                                     # same setting: the cached choice
    monkeypatch.setattr(allocator, "state", "glibc, freed memory kept (no mmap, no trim)")
    runtime.choose_runtime(*setup(), log=lambda *a: None)
    assert len(measured) == 2 * first
    assert len(json.loads((tmp_path / "precision.json").read_text())) == 2


def test_a_choice_made_under_another_openmp_wait_policy_is_measured_again(tmp_path, monkeypatch, steady_load):
    """openmp.py's policy moves 2-thread candidates (1.05-1.33x) and not 1-thread ones: not one cache entry."""
    monkeypatch.setenv("MULTITAG_CACHE", str(tmp_path))
    measured = []
    monkeypatch.setattr(runtime, "time_train_step", lambda *a, **k: measured.append(1) or 0.1)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    runtime.choose_runtime(*setup(), log=lambda *a: None)
    first = len(measured)
    monkeypatch.delenv("OMP_WAIT_POLICY")
    runtime.choose_runtime(*setup(), log=lambda *a: None)
    assert len(measured) == 2 * first and len(json.loads((tmp_path / "precision.json").read_text())) == 2
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")                       # libgomp's other knob counts too
    runtime.choose_runtime(*setup(), log=lambda *a: None)
    assert len(measured) == 3 * first and len(json.loads((tmp_path / "precision.json").read_text())) == 3


# /proc/cpuinfo blocks, trimmed: this session's AMD machine's as it reads, and an Intel one with AMX
# (its model name is an example: the AMX machine's was never recorded)
INTEL = ("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n"
         "model name\t: Intel(R) Xeon(R) Platinum 8488C\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n\n"
         "processor\t: 1\nvendor_id\t: GenuineIntel\n")
AMD = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
       "flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")


def test_the_cpu_is_named_by_model_vendor_and_family():
    assert runtime.cpu_model(INTEL) == "Intel(R) Xeon(R) Platinum 8488C (GenuineIntel family 6 model 143)"
    assert runtime.cpu_model(AMD) == "AMD EPYC (AuthenticAMD family 26 model 2)"
    assert runtime.cpu_flags(INTEL) == ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    assert runtime.cpu_flags(AMD) == ["avx2", "avx512f", "avx512_bf16", "avx512_vnni"]
    assert runtime.cpu_model("") not in ("", " ()")                     # no /proc/cpuinfo: the platform's name


def test_a_choice_made_on_another_cpu_is_not_read(monkeypatch):
    """Two CPUs whose flags the runtime would not tell apart still get their own cache entries."""
    fingerprints = []
    for text in (INTEL.replace(" amx_bf16 amx_tile", ""), AMD.replace(" avx512_vnni", "")):
        monkeypatch.setattr(runtime, "_cpuinfo", lambda text=text: text)
        fingerprints.append(runtime.machine_fingerprint(torch.device("cpu")))
        assert "avx512_bf16" in runtime.describe_cpu()
    assert fingerprints[0] != fingerprints[1]


def test_a_large_batch_is_measured_on_its_first_images(tmp_path, monkeypatch):
    monkeypatch.setenv("MULTITAG_CACHE", str(tmp_path))
    monkeypatch.setattr(runtime, "MEASURE_MAX_IMAGES", 5)
    sizes = []
    monkeypatch.setattr(runtime, "time_train_step", lambda m, l, x, y, rt, **k: sizes.append((len(x), len(y))) or 0.1)
    logs = []
    runtime.choose_runtime(*setup(), log=logs.append)                  # a batch of 8
    assert set(sizes) == {(5, 5)} and "'cpu fp32 NCHW': 50.0" in logs[0]   # img/s of the 5 images timed


def test_a_choice_is_measured_again_when_the_load_has_changed(tmp_path, monkeypatch):
    monkeypatch.setenv("MULTITAG_CACHE", str(tmp_path))
    fake = {("fp32", False): 0.3, ("fp32", True): 0.1, ("bf16", True): 0.2}
    measured = []
    monkeypatch.setattr(runtime, "time_train_step",
                        lambda m, l, x, y, rt, **k: measured.append(1) or fake[(rt.precision, rt.channels_last)])
    load = {"now": 1.0}
    monkeypatch.setattr(runtime, "other_load", lambda seconds=0.5: load["now"])
    logs = []
    runtime.choose_runtime(*setup(), log=logs.append)                 # measured with a core busy elsewhere
    assert list(json.loads((tmp_path / "precision.json").read_text()).values())[0]["other_load"] == 1.0
    first = len(measured)
    load["now"] = 1.5                                                  # about as busy: the cached choice
    runtime.choose_runtime(*setup(), log=logs.append)
    assert len(measured) == first and "measured before" in logs[-1]
    load["now"] = 0.0                                                  # the other job has gone: measure again
    runtime.choose_runtime(*setup(), log=logs.append)
    assert len(measured) == 2 * first
    assert any("measuring again" in line and "0.0 cores busy now, 1.0 when" in line for line in logs)
    assert list(json.loads((tmp_path / "precision.json").read_text()).values())[0]["other_load"] == 0.0


def test_other_cores_takes_out_this_process():
    a = runtime.CpuSample(wall=0.0, busy=10.0, own=2.0)
    b = runtime.CpuSample(wall=2.0, busy=14.0, own=4.0)             # 4 CPU-s busy in 2 s, 2 of them ours
    assert runtime.other_cores(a, b) == pytest.approx(1.0)
    assert runtime.other_cores(None, b) is None
    if Path("/proc/stat").exists():
        assert runtime.other_load(0.05) >= 0.0


def test_real_step_timing_leaves_model_untouched():
    model, loss, x, y = setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = runtime.time_train_step(model, loss, x, y, runtime.Runtime(torch.device("cpu"), "fp32", False), steps=1)
    assert t > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_settings():
    with pytest.raises(UserError, match='did you mean "bf16"'):
        runtime.choose_runtime(*setup(), precision="bf61")
    with pytest.raises(UserError, match="channels_last must be auto, true or false"):
        runtime.choose_runtime(*setup(), channels_last="maybe")


def test_the_second_round_skips_candidates_far_behind(tmp_path, monkeypatch):
    """Candidates more than RETRY_WITHIN x slower than the best after round 1 are timed once."""
    monkeypatch.setenv("MULTITAG_CACHE", str(tmp_path))
    fake = {("fp32", False): 0.9, ("fp32", True): 0.15, ("bf16", True): 0.1}   # fp32 NCHW 9x behind
    calls = []
    monkeypatch.setattr(runtime, "time_train_step",
                        lambda m, l, x, y, rt, **k: calls.append((rt.precision, rt.channels_last, rt.layer_tweaks))
                        or fake[(rt.precision, rt.channels_last)])
    rt = runtime.choose_runtime(*setup(), threads=1, log=lambda *a: None)
    assert (rt.precision, rt.channels_last) == ("bf16", True)
    assert calls.count(("fp32", False, ())) == 1 and calls.count(("fp32", True, ())) == 2
    assert calls.count(("bf16", True, ())) == calls.count(("bf16", True, ("fused_batchnorm",))) == 2   # with its tweak


def test_a_cache_file_cut_short_is_measured_again_and_rewritten_whole(tmp_path, monkeypatch, steady_load):
    """A version that wrote precision.json in place could leave half a file when killed: not a traceback."""
    monkeypatch.setenv("MULTITAG_CACHE", str(tmp_path))
    (tmp_path / "precision.json").write_text('{"0123456789abcdef": {"choice": ["bf')
    monkeypatch.setattr(runtime, "time_train_step", lambda m, l, x, y, rt, **k: 0.2 if rt.channels_last else 0.3)
    rt = runtime.choose_runtime(*setup(), log=lambda *a: None)
    assert rt.channels_last
    assert [v["choice"][1] for v in json.loads((tmp_path / "precision.json").read_text()).values()] == [True]


def test_a_slow_warm_up_step_does_not_rule_a_candidate_out(monkeypatch):
    """On CUDA a candidate's first step loads its kernels and autotunes cuDNN: only timed steps may give up
    (a bf16 candidate was once 'measured' by its warm-up alone, at 1/28 of its speed)."""
    import time as time_module

    calls = []

    def loss_after_warm_up(model, loss_fn, x, y, ignore):
        calls.append(1)
        if len(calls) == 1:
            time_module.sleep(0.2)                  # the warm-up: far over give_up_after
        return model(x).sum()

    monkeypatch.setattr(runtime, "training_loss", loss_after_warm_up)
    model, loss_fn, x, y = setup()
    rt = runtime.Runtime(torch.device("cpu"), "fp32", False)
    seconds = runtime.time_train_step(model, loss_fn, x, y, rt, steps=3, give_up_after=0.1)
    assert len(calls) == 4 and seconds < 0.1

"""ddpm/precision.py and the CUDA-only paths it decides, checked on the CPU.

- the autocast dtype of each precision choice (``torch.cuda`` queries faked): bf16 only where it is native (sm80
  and newer; ``is_bf16_supported()``'s default counts emulated bf16), else one line naming the card and the fix;
  fp16 only on CUDA; ``tools.bench``'s sampling part by the same rule;
- a checkpoint resumes across fp16 (scaler on) and bf16/fp32 (scaler state ``{}``) in both directions;
- TF32 ("tf32") or full fp32 ("ieee") matmuls and convolutions after each entry point's setup: the trainer,
  ``ddpm.sample``, ``ddpm.evaluate``; FID's Inception always "ieee", and its statistics record it; after every
  setting, each of torch's readers, the legacy ones Inductor calls and the per-backend strings, answers and agrees
  (in a fresh process for each order), and a compile runs;
- ``training.deterministic`` and ``infrastructure.channels_last: null`` (on for CPU, off for CUDA).

The flags are process-wide: every test gets them back as they were.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY_CONFIG

import ddpm.train
from ddpm import fid, inception
from ddpm.checkpoint import load_checkpoint
from ddpm.config import DataConfig, InfrastructureConfig, SamplingConfig, TrainingConfig, load_config
from ddpm.envcheck import SetupError
from ddpm.precision import (
    amp_dtype,
    autocast_dtype,
    channels_last,
    configure_backends,
    describe_precision,
    fp32_views,
    full_fp32,
    memory_format,
    restore_scaler,
    set_fp32_precision,
    tf32_in_effect,
)

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def tf32_flags() -> tuple[str, str]:
    """(cuBLAS matmul, cuDNN conv): "tf32" or "ieee", once every reader of torch's has answered and agreed
    (:func:`agreed`)."""
    matmul, conv = agreed(fp32_views())
    assert tf32_in_effect() == (matmul, conv)
    return "tf32" if matmul else "ieee", "tf32" if conv else "ieee"


def agreed(views: dict[str, object]) -> tuple[bool, bool]:
    """(matmul, conv) in TF32, from :func:`ddpm.precision.fp32_views`' answers, after checking that none raised
    and that the legacy readers and the per-backend strings say the same."""
    assert not [v for v in views.values() if str(v).startswith("raised")], views
    matmul, conv = views["matmul.allow_tf32"], views["cudnn.allow_tf32"]
    assert isinstance(matmul, bool) and isinstance(conv, bool), views
    assert views["get_float32_matmul_precision()"] == ("high" if matmul else "highest"), views
    assert (views["matmul.fp32_precision"] == "tf32") == matmul, views
    assert (views["cudnn.conv.fp32_precision"] == "tf32") == conv, views
    return matmul, conv


@pytest.fixture(autouse=True)
def restore_backend_flags(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # monkeypatch restores it afterwards
    saved = (tf32_in_effect(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled())
    yield
    (matmul, conv), det, bench, algorithms = saved
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, conv  # both views, as set
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = det, bench
    torch.use_deterministic_algorithms(algorithms)


# ---- 1. each precision choice; bf16 only where it is native; resume across fp16 and bf16 -------------------


def fake_card(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int]) -> None:
    """``torch.cuda`` answers as a card of ``capability`` would: bf16 native from sm80, emulated (True by
    default, as torch's ``including_emulation=True``) below."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: capability[0] >= 8 or including_emulation)
    name = "Tesla V100" if capability < (8, 0) else "H100"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


@pytest.mark.parametrize("capability", [(7, 0), (7, 5), (8, 0), (9, 0)])
def test_each_precision_choice_and_no_silent_fallback_from_bf16(monkeypatch, capability):
    fake_card(monkeypatch, capability)
    assert torch.cuda.is_bf16_supported()  # the default counts emulation: the old check said bf16 on every card
    sm, native = f"sm{capability[0]}{capability[1]}", capability[0] >= 8
    assert amp_dtype(InfrastructureConfig(precision="fp32"), CUDA) is None
    assert amp_dtype(InfrastructureConfig(precision="fp16"), CUDA) == torch.float16
    assert describe_precision(torch.float16, CUDA) == f"fp16 autocast + grad scaler ({sm})"
    if native:
        assert amp_dtype(InfrastructureConfig(precision="bf16"), CUDA) == torch.bfloat16
        assert describe_precision(torch.bfloat16, CUDA) == f"bf16 autocast ({sm})"
    else:  # asked for bf16 on a V100 or T4: one line naming the card, the ask and the fix; never fp16 silently
        with pytest.raises(SetupError) as info:
            amp_dtype(InfrastructureConfig(precision="bf16"), CUDA)
        assert str(info.value) == (f"infrastructure.precision=bf16: the Tesla V100 ({sm}) has no native bf16 "
                                   "(emulated, slow); set infrastructure.precision=fp16 (autocast with a grad scaler) "
                                   "or fp32")
        with pytest.raises(SetupError, match=r"^sampling.precision=bf16: the Tesla V100 .* sampling.precision=fp16"):
            autocast_dtype("bf16", "cuda", "sampling.precision")
    assert describe_precision(None, CPU) == "fp32"


def test_precision_on_the_cpu_bf16_when_asked_fp16_never():
    assert amp_dtype(InfrastructureConfig(num_gpus=0, precision="bf16"), CPU) == torch.bfloat16  # the user's choice
    assert amp_dtype(InfrastructureConfig(num_gpus=0, precision="fp32"), CPU) is None
    with pytest.raises(SetupError, match=r"^infrastructure.precision=fp16: fp16 autocast runs on CUDA only, this "
                                         r"process runs on cpu \(set infrastructure.precision=bf16 or fp32\)$"):
        amp_dtype(InfrastructureConfig(num_gpus=1, precision="fp16"), CPU)  # a GPU config run with --device cpu
    assert autocast_dtype("fp16", "cuda", "sampling.precision") == torch.float16


@pytest.mark.parametrize("capability", [(7, 0), (7, 5), (8, 0), (9, 0)])
def test_bench_sampling_takes_trainings_bf16_rule(monkeypatch, capability):
    """tools.bench's sampling part on CUDA: bf16 (its default when sampling.precision is unset) only on a card with
    native bf16; elsewhere training's line, before any work on the card; fp16 when asked."""
    from tools.bench_sampling import report_sampling, sampling_autocast

    fake_card(monkeypatch, capability)
    args = argparse.Namespace(config=str(TINY_CONFIG), overrides=[], quick=True, repeats=1, sample_batch_sizes=[2])
    cfg = load_config(TINY_CONFIG)
    if capability >= (8, 0):
        assert sampling_autocast(cfg, args, CUDA)[:2] == ("bf16", torch.bfloat16)
    else:
        with pytest.raises(SetupError) as rule:
            autocast_dtype("bf16", CUDA, "sampling.precision")
        with pytest.raises(SetupError) as bench:  # the net is never called: no CUDA work before the check
            report_sampling(cfg, torch.nn.Identity(), CUDA, args)
        assert str(bench.value) == str(rule.value)
    fp16 = ["infrastructure.num_gpus=1", "sampling.precision=fp16"]
    asked = sampling_autocast(load_config(TINY_CONFIG, fp16), argparse.Namespace(config=str(TINY_CONFIG),
                                                                                 overrides=fp16), CUDA)
    assert asked == ("fp16", torch.float16, "sampling.precision")


def steps(trainer: ddpm.train.Trainer, n: int) -> None:
    for _ in range(n):
        trainer.train_step(*trainer.next_batch())


def test_resume_across_fp16_and_bf16_both_ways(make_trainer, tmp_path, monkeypatch, capsys):
    """fp32 (scaler state {}) -> fp16 (a fresh, enabled scaler) -> fp32 again (the fp16 state is not needed)."""
    run = tmp_path / "run"
    plain = make_trainer(run)  # tiny_cpu: fp32 on CPU, the scaler disabled, as under bf16
    steps(plain, 2)
    assert plain.save() is not None and plain.state_dict()["scaler"] == {}

    with monkeypatch.context() as m:  # this "card" has no bf16: the trainer picks fp16 and a grad scaler
        m.setattr(ddpm.train, "amp_dtype", lambda infra, device: torch.float16)
        half = make_trainer(run)
    out = capsys.readouterr().out
    assert "starting a fresh grad scaler" in out and "at step 2" in out
    assert half.step == 2 and half.amp_dtype == torch.float16 and half.scaler.is_enabled()
    assert half.scaler.get_scale() == 65536.0
    steps(half, 1)  # fp16 autocast and the scaler on the CPU
    scaler_state = half.state_dict()["scaler"]
    assert scaler_state["scale"] > 0 and half.save() is not None

    back = make_trainer(run)
    assert "fp16 grad-scaler state: not needed" in capsys.readouterr().out
    assert back.step == 3 and not back.scaler.is_enabled()
    steps(back, 1)
    assert back.step == 4

    again = make_trainer(tmp_path / "other")  # fp16 -> fp16: the saved scale is loaded, as before
    again.scaler = torch.amp.GradScaler("cpu", enabled=True)
    again.load_state_dict({**plain.state_dict(), "scaler": {**scaler_state, "scale": 1024.0}})
    assert again.scaler.get_scale() == 1024.0


def test_restore_scaler_replaces_an_incomplete_state(capsys):
    used = torch.amp.GradScaler("cpu", enabled=True)
    used.scale(torch.ones(()))  # creates the scale tensor
    used.update(new_scale=8.0)
    fresh = restore_scaler(used, {"scale": 2.0}, "cpu", print)  # mismatched: no partial load
    assert fresh is not used and fresh.is_enabled() and fresh.get_scale() == 65536.0
    assert capsys.readouterr().out.count("\n") == 1


# ---- 2. TF32 both ways, in every entry point; Inception always fp32 ----------------------------------------


# a fresh process sets TF32 in the given order and reads every view after each setting, inside full_fp32 and after it
ORDER_SCRIPT = """
import json, sys
from ddpm.precision import fp32_views, full_fp32, set_fp32_precision
steps = []
for tf32 in json.loads(sys.argv[1]):
    set_fp32_precision(tf32)
    after = fp32_views()
    with full_fp32():
        inside = fp32_views()
    steps.append([tf32, after, inside, fp32_views()])
print(json.dumps(steps))
"""


@pytest.mark.parametrize("order", [(True, False), (False, True)])
def test_every_tf32_reader_agrees_after_each_setting_in_a_fresh_process(order):
    """Torch's legacy readers (Inductor's: ``allow_tf32``, ``get_float32_matmul_precision()``) and the per-backend
    ``fp32_precision`` strings answer, and agree, after each setting in either order; ``full_fp32`` turns every view
    off and puts each back. A fresh process, so no flag another test set can mask a mix of APIs."""
    proc = subprocess.run([sys.executable, "-c", ORDER_SCRIPT, json.dumps(order)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads(proc.stdout.splitlines()[-1])
    assert [tf32 for tf32, *_ in steps] == list(order)
    for tf32, after, inside, restored in steps:
        assert agreed(after) == (tf32, tf32)
        assert agreed(inside) == (False, False)
        assert restored == after


@pytest.mark.parametrize("tf32", [True, False])
def test_set_fp32_precision_sets_matmul_and_conv(tf32):
    set_fp32_precision(tf32)
    assert tf32_flags() == (("tf32",) * 2 if tf32 else ("ieee",) * 2)
    set_fp32_precision(not tf32)
    assert tf32_flags() == (("ieee",) * 2 if tf32 else ("tf32",) * 2)


def test_full_fp32_puts_back_tf32_that_a_library_set_through_the_per_backend_api():
    torch.backends.cuda.matmul.fp32_precision = "tf32"  # as code that uses only torch's new API leaves them
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    with full_fp32():  # reads the state without the legacy readers, which may raise here
        assert tf32_flags() == ("ieee", "ieee")
    assert tf32_flags() == ("tf32", "tf32")  # the same TF32, now readable both ways


def test_a_compile_after_the_setting_runs():
    """Inductor on the CPU (as ``sampling.compile``) after TF32 was set: Dynamo and Inductor read the flags."""
    set_fp32_precision(True)
    net = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(net)(x), net(x))
    assert tf32_flags() == ("tf32", "tf32")


@pytest.mark.parametrize("tf32", [True, False])
def test_trainer_sets_tf32(make_trainer, tmp_path, tf32):
    set_fp32_precision(not tf32)
    make_trainer(tmp_path / "run", f"infrastructure.tf32={str(tf32).lower()}")
    assert tf32_flags() == ((("tf32",) if tf32 else ("ieee",)) * 2)


def tiny_sampling() -> SamplingConfig:
    return SamplingConfig(num_steps=2, sampler="ddim", num_samples=2, num_shards=1, batch_size=2)


@pytest.mark.parametrize("tf32", [True, False, None])
def test_sample_sets_tf32_from_the_checkpoint(checkpoint, tmp_path, tf32):
    from ddpm.shards import sample_loaded

    state = load_checkpoint(checkpoint)
    infra = state["config"]["infrastructure"]
    if tf32 is None:
        del infra["tf32"]  # a checkpoint from before the key: TF32 on, as the default
    else:
        infra["tf32"] = tf32
    set_fp32_precision(tf32 is False)
    sample_loaded(checkpoint, state, tmp_path / "out", 0, tiny_sampling(), "cpu", progress=False)
    assert tf32_flags() == ((("ieee",) if tf32 is False else ("tf32",)) * 2)


@pytest.mark.parametrize("tf32", [True, False])
def test_evaluate_sets_tf32_from_the_run_config(checkpoint, tmp_path, monkeypatch, tf32):
    """evaluate_step samples with the run's infrastructure.tf32 (the checkpoint's config says true)."""
    import ddpm.shards
    from ddpm.evaluate import evaluate_step
    from ddpm.rundir import RunDir

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint, run / "checkpoints" / "step_00000005.pt")
    reference = tmp_path / "ref.npz"
    fid.FIDStats(sum=np.zeros(2), sum_outer=np.zeros((2, 2)), signature="x").update(np.eye(2)).save(reference)
    cfg = load_config(TINY_CONFIG, [f"sampling.fid_reference={reference}", f"infrastructure.tf32={tf32}".lower()])
    real, seen = ddpm.shards.sample_loaded, []

    class Sampled(Exception):
        pass

    def sample_without_fid(ckpt, state, out, shard, s, *args, **kwargs):  # the real one, minus Inception
        real(ckpt, state, out, shard, dataclasses.replace(tiny_sampling(), seed_base=s.seed_base), *args, **kwargs)
        seen.append(tf32_flags())
        raise Sampled

    monkeypatch.setattr(ddpm.shards, "sample_loaded", sample_without_fid)  # evaluate_step's own import
    set_fp32_precision(not tf32)
    with pytest.raises(Sampled):
        evaluate_step(RunDir(run), cfg, 5, device="cpu", progress=False)
    assert seen == [(("tf32",) if tf32 else ("ieee",)) * 2]


class FlagRecorder(torch.nn.Module):
    """Stands in for Inception: records the flags and autocast state its forward runs under."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[tuple[str, str], bool]] = []

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.seen.append((tf32_flags(), torch.is_autocast_enabled("cpu")))
        return [x.new_zeros(x.shape[0], inception.FEATURE_DIM, 1, 1)]


def test_inception_runs_in_full_fp32_and_stats_record_it(images):
    model = FlagRecorder()
    set_fp32_precision(True)  # as a TF32 sampler left them
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inception.inception_features(model, np.zeros((3, 8, 8, 3), dtype=np.uint8), batch_size=2)
    assert model.seen == [(("ieee", "ieee"), False)] * 2
    assert tf32_flags() == ("tf32", "tf32")  # put back afterwards
    with full_fp32():
        assert tf32_flags() == ("ieee", "ieee")

    data = DataConfig(source="folder", path=str(images), image_size=8, center_crop=None)
    stats = fid.reference_stats(data, model, max_images=4, batch_size=2, progress=False)  # `python -m ddpm.fid ref`
    assert stats.n == 4 and model.seen[-1] == (("ieee", "ieee"), False)
    assert stats.signature == fid.stats_signature(data) and stats.signature.split("|")[0].endswith("/fp32")
    assert stats.device == "cpu"


def test_fid_stats_record_the_device_but_compare_across_devices(tmp_path):
    f = np.random.default_rng(0).standard_normal((6, 3))
    a = fid.FIDStats(sum=np.zeros(3), sum_outer=np.zeros((3, 3)), signature="s", device="cpu").update(f)
    b = fid.FIDStats(sum=np.zeros(3), sum_outer=np.zeros((3, 3)), signature="s", device="cuda").update(f)
    assert fid.fid_from_stats(a, b) == pytest.approx(0.0, abs=1e-9)  # the device is a record, not a signature
    assert a.merge(b).device == "cpu+cuda" and a.merge(a).device == "cpu"
    a.save(tmp_path / "a.npz")
    assert fid.FIDStats.load(tmp_path / "a.npz").device == "cpu"
    with np.load(tmp_path / "a.npz") as data:  # a file from before the field
        old = {k: data[k] for k in data.files if k != "fid_device"}
    assert fid.FIDStats.from_arrays(old).device == ""


# ---- 4. training.deterministic, channels_last by device ----------------------------------------------------


def test_deterministic_training_flags(make_trainer, tmp_path):
    trainer = make_trainer(tmp_path / "det", "training.deterministic=true")
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    steps(trainer, 2)  # every op of a CPU training step has a deterministic kernel

    make_trainer(tmp_path / "free")  # the default: back to torch's defaults (no benchmark on the CPU)
    assert not torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.are_deterministic_algorithms_enabled()


def test_cudnn_benchmark_on_cuda_unless_deterministic():
    infra = InfrastructureConfig()
    configure_backends(infra, TrainingConfig(), CUDA)  # flags only: no GPU needed
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    configure_backends(infra, TrainingConfig(deterministic=True), CUDA)
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic


def test_channels_last_null_is_on_for_cpu_off_for_cuda(tmp_path, make_trainer):
    infra = load_config(TINY_CONFIG, ["infrastructure.channels_last=null"]).infrastructure
    assert infra.channels_last is None and InfrastructureConfig().channels_last is None
    assert channels_last(infra, CPU) and not channels_last(infra, CUDA)
    assert memory_format(infra, CUDA) == torch.contiguous_format
    for value in (True, False):
        fixed = dataclasses.replace(infra, channels_last=value)
        assert channels_last(fixed, CPU) == channels_last(fixed, CUDA) == value
    yaml = tmp_path / "null.yaml"
    yaml.write_text("infrastructure:\n  channels_last: null\n")
    assert load_config(yaml).infrastructure.channels_last is None
    trainer = make_trainer(tmp_path / "run", "infrastructure.channels_last=null")
    assert trainer.memory_format == torch.channels_last
    assert trainer.model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

"""The doctor's node probe (ddpm/cluster/probe.py) keeps its report whatever the card cannot do, checked on the CPU
with the device's answers faked in this process (torch.cuda's count, names, capability, arch list, bf16).

- bf16 on a T4 (sm75): the precision is a FAIL line with training's own fix, and the torch, driver, gpus, kernels,
  all-reduce, storage, speed (timed in fp16, which the line says) and checkpoint lines are all still there, in
  ``probe.json`` and in the doctor's rendering; on an H100 the same config passes and is timed in bf16;
- a V100 (sm70) under a build compiled for sm75 and newer: a kernels FAIL line naming the card, its sm, the build,
  its archs and the install route; what needs no kernels (driver, storage, checkpoint) is still measured, the
  all-reduce and the speed say they were skipped and why;
- a rank whose GPU check fails in ``dist.init_distributed`` (``envcheck.require_gpus``) is a FAIL line too.

The trainer's step itself (``probe.training_speed``) is the one part replaced: a fake card cannot run kernels. The
rest runs as on a node: the real checks, the real process setup (world size 1, so no process group), storage
(2 MiB instead of 256) and a real checkpoint save of the tiny model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import TINY_CONFIG, run_main

from ddpm import dist, envcheck
from ddpm.cluster import probe
from ddpm.cluster.doctor import Report
from ddpm.config import dump_config, load_config
from ddpm.envcheck import SetupError, kernel_problem
from ddpm.precision import autocast_dtype, describe_precision
from ddpm.routes import install_route
from ddpm.rundir import RunDir

CUDA13 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]  # PyPI's cu130 torch 2.14
DRIVER = "580.95.05"
T4 = ("Tesla T4", (7, 5), 16)
H100 = ("NVIDIA H100 80GB HBM3", (9, 0), 80)
V100 = ("Tesla V100-SXM2-32GB", (7, 0), 32)
EVERY_LINE = ["torch", "driver", "gpus", "kernels", "precision", "all-reduce", "run.root", "node scratch",
              "training speed", "checkpoint save"]


def fake_node(monkeypatch: pytest.MonkeyPatch, card: tuple[str, tuple[int, int], int], count: int = 1) -> None:
    """This process sees ``count`` cards ``card`` (name, sm, GiB) under the arch list of a CUDA 13 build, with the
    NVIDIA driver :data:`DRIVER`; taking a card (``set_device``) does nothing, so no real CUDA call is made."""
    name, (major, minor), gib = card
    props = SimpleNamespace(name=name, major=major, minor=minor, total_memory=gib * 2**30)
    cuda = torch.cuda
    for attr, fake in [("is_available", lambda: True), ("device_count", lambda: count),
                       ("get_device_capability", lambda device=None: (major, minor)),
                       ("get_device_properties", lambda device=None: props),
                       ("get_device_name", lambda device=None: name), ("get_arch_list", lambda: list(CUDA13)),
                       ("is_bf16_supported", lambda including_emulation=True: major >= 8 or including_emulation),
                       ("set_device", lambda device: None)]:
        monkeypatch.setattr(cuda, attr, fake)
    # the CPU optimizer step of the checkpoint save asks torch.accelerator (CUDA graph capture): none here
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: None)
    for module in (envcheck, probe):
        monkeypatch.setattr(module, "nvidia_driver", lambda: DRIVER)
    real = probe.storage_speed
    monkeypatch.setattr(probe, "storage_speed", lambda directory: real(directory, size_mb=2))


class FakeSpeed:
    """Stands in for ``probe.training_speed`` (the trainer's step would run kernels on the card): records the
    precision it was asked to time and answers a rate and a peak memory."""

    def __init__(self, rate: float = 321.5, peak_gib: float = 3.25) -> None:
        self.rate, self.peak_gib, self.precisions = rate, peak_gib, []

    def __call__(self, cfg: Any, env: Any, run_dir: Path) -> tuple[float, float]:
        assert env.device.type == "cuda"
        self.precisions.append(cfg.infrastructure.precision)
        return self.rate, self.peak_gib


def run_probe(tmp_path: Path, capsys: pytest.CaptureFixture[str], *overrides: str) -> tuple[dict[str, Any], str]:
    """``python -m ddpm.cluster.probe`` (rank 0, world size 1) in this process with the GPU config of
    configs/tiny_cpu.yaml plus ``overrides``; then probe.json and its lines as the doctor prints them."""
    cfg = load_config(TINY_CONFIG, ["infrastructure.num_gpus=1", f"run.root={tmp_path / 'root'}", *overrides])
    run_dir = tmp_path / "node"
    run_dir.mkdir()
    dump_config(cfg, RunDir(run_dir).config)
    proc = run_main(probe.main, ["--config", RunDir(run_dir).config, "--run-dir", run_dir], capsys)
    assert proc.code == 0, proc.err[-3000:]
    result = json.loads(RunDir(run_dir).probe.read_text())
    report = Report()
    for kind, what, detail in result["lines"]:
        report(kind, what, detail)
    out = capsys.readouterr().out
    assert report.failed == any(kind == "FAIL" for kind, _, _ in result["lines"])
    return result, out


def line(out: str, what: str) -> tuple[str, str]:
    """(kind, detail) of the doctor's one line about ``what``."""
    found = re.findall(rf"^(ok|note|FAIL) +{re.escape(what)} +(.*)$", out, flags=re.M)
    assert len(found) == 1, f"{len(found)} lines for {what}:\n{out}"
    return found[0]


@pytest.mark.parametrize("card", [T4, H100], ids=["t4", "h100"])
def test_bf16_on_each_card_every_line_and_the_precision_verdict(monkeypatch, tmp_path, capsys, card):
    fake_node(monkeypatch, card)
    speed = FakeSpeed()
    monkeypatch.setattr(probe, "training_speed", speed)
    result, out = run_probe(tmp_path, capsys, "infrastructure.precision=bf16")
    assert [what for _, what, _ in result["lines"]] == EVERY_LINE, out
    name, (major, minor), gib = card
    kind, detail = line(out, "gpus")
    assert kind == "ok" and f"{name} ({gib} GiB, sm{major}{minor})" in detail
    kind, detail = line(out, "kernels")
    assert kind == "ok" and detail.startswith(f"GPU 0 ({name}, sm{major}{minor}): ") and " ".join(CUDA13) in detail
    assert line(out, "driver") == ("ok", f"NVIDIA driver {DRIVER}")
    assert line(out, "all-reduce")[0] == "note"  # one rank: nothing to reduce, as on any single-GPU node
    for what in ("run.root", "node scratch", "checkpoint save"):
        assert line(out, what)[0] == "ok"
    speed_kind, speed_detail = line(out, "training speed")
    assert speed_detail.startswith(f"{speed.rate:.1f} img/s, global batch ")
    assert f"peak memory {speed.peak_gib:.1f} GiB" in speed_detail
    assert result["img_per_s"] == speed.rate and result["save_s"] is not None
    if major >= 8:  # native bf16: the configured precision passes and is what was timed
        bf16 = describe_precision(torch.bfloat16, torch.device("cuda", 0))
        assert line(out, "precision") == ("ok", f"infrastructure.precision=bf16: {bf16}")
        assert speed.precisions == ["bf16"] and speed_kind == "ok" and "precision bf16, peak memory" in speed_detail
        assert "FAIL" not in out
    else:  # training's own line and fix; the step timed in the fix's fp16, and the speed line says so
        with pytest.raises(SetupError) as rule:
            autocast_dtype("bf16", torch.device("cuda", 0), "infrastructure.precision")
        assert line(out, "precision") == ("FAIL", str(rule.value))
        assert "infrastructure.precision=fp16" in str(rule.value)
        assert speed.precisions == ["fp16"] and result["speed_precision"] == "fp16" and speed_kind == "note"
        assert "precision fp16 (infrastructure.precision=bf16 cannot run on this card" in speed_detail
        assert [what for kind, what, _ in result["lines"] if kind == "FAIL"] == ["precision"]


def test_a_v100_under_a_cuda13_build_fails_its_kernels_and_keeps_the_rest(monkeypatch, tmp_path, capsys):
    fake_node(monkeypatch, V100, count=2)

    def no_step(*args: object) -> None:
        raise AssertionError("the training step ran on a card without kernels")

    monkeypatch.setattr(probe, "training_speed", no_step)
    result, out = run_probe(tmp_path, capsys, "infrastructure.precision=fp16")  # the V100's precision
    assert [what for _, what, _ in result["lines"]] == EVERY_LINE, out
    kind, detail = line(out, "kernels")
    assert kind == "FAIL" and detail.startswith(kernel_problem(0)) and detail.endswith("(the same for GPU 1)")
    name, (major, minor), _ = V100
    for fact in (f"the {name} (GPU 0, sm{major}{minor})", f"torch {torch.__version__}",
                 f"CUDA {torch.version.cuda} build", f"archs {' '.join(CUDA13)}", install_route(70, DRIVER)):
        assert fact in detail, fact
    kind, detail = line(out, "precision")
    fp16 = describe_precision(torch.float16, torch.device("cuda", 0))
    assert kind == "ok" and detail.startswith(f"infrastructure.precision=fp16: {fp16}") and "no native bf16" in detail
    for what in ("all-reduce", "training speed"):
        kind, detail = line(out, what)
        assert kind == "note" and detail.startswith("skipped: ") and "the kernels line" in detail
    for what in ("driver", "run.root", "node scratch", "checkpoint save"):
        assert line(out, what)[0] == "ok"
    assert result["img_per_s"] is None and result["speed_precision"] is None and result["save_s"] is not None
    assert [what for kind, what, _ in result["lines"] if kind == "FAIL"] == ["kernels"]


def test_a_rank_that_cannot_take_its_gpu_is_a_fail_line(monkeypatch, tmp_path, capsys):
    """``dist.init_distributed`` raises ``envcheck.require_gpus``'s SetupError (here: two local ranks, one card):
    the probe writes it as a FAIL line, skips what needs the GPU and still measures storage and the save."""
    fake_node(monkeypatch, H100)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(probe, "training_speed", FakeSpeed())
    with pytest.raises(SetupError) as setup:
        dist.init_distributed(True, timeout_s=60)
    result, out = run_probe(tmp_path, capsys)
    assert line(out, "rank setup") == ("FAIL", str(setup.value))
    for what in ("all-reduce", "training speed"):
        kind, detail = line(out, what)
        assert kind == "note" and detail.startswith("skipped: ") and "the rank setup line" in detail
    for what in ("gpus", "kernels", "precision", "run.root", "node scratch", "checkpoint save"):
        assert line(out, what)[0] == "ok"
    assert result["img_per_s"] is None

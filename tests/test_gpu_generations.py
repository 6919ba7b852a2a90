"""Issue 33 on the CPU: what a first GPU run meets on the cards a university cluster has, with the device's
answers faked (torch.cuda's capability, arch list, memory error), never by installing another torch.

- the build's kernels cover the card (``envcheck.arch_covers``/``kernel_problem``): a V100 (sm70) under a CUDA 13
  build (sm75 and newer) stops with one line (card, sm, build, archs, route) in ``python -m ddpm.train``, a
  sampling task and an eval task; sm75/80/90/100/120 under their own builds pass;
- an out-of-memory is a failure with its fix (``status.json``: failed), not a lost rank;
- ``infrastructure.fused_adam`` may change across a resume;
- a training grid slower than ``training.watchdog_s`` keeps the heartbeat: the wrapper does not kill it.

The processes started here get their fake from tests/fakes/sitecustomize.py (``DDPM_FAKE``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY_CONFIG

from ddpm import envcheck
from ddpm.config import dump_config, load_config
from ddpm.envcheck import SetupError, arch_covers, kernel_problem, require_gpus

FAKES = ROOT / "tests" / "fakes"
CUDA13 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]  # PyPI's cu130 torch 2.14
CUDA126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]  # the cu126 index
V100 = {"name": "Tesla V100-SXM2-32GB", "sm": [7, 0], "archs": CUDA13, "memory_gib": 32}


def fake_env(**fake: object) -> dict[str, str]:
    """The environment of a process that sees ``fake`` (tests/fakes/sitecustomize.py)."""
    path = os.pathsep.join(p for p in (str(FAKES), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "DDPM_FAKE": json.dumps(fake)}


def run(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


@pytest.mark.parametrize(("sm", "archs", "covered"), [
    ((7, 0), CUDA13, False), ((6, 0), CUDA13, False),  # V100, P100 under a CUDA 13 build
    ((7, 0), CUDA126, True), ((7, 5), CUDA13, True), ((8, 0), CUDA13, True), ((9, 0), CUDA13, True),
    ((10, 0), CUDA13, True), ((12, 0), CUDA13, True),
    ((8, 6), ["sm_80"], True),  # a cubin runs on later minors of its major
    ((8, 9), ["sm_90"], False),  # never on an earlier sm
    ((12, 0), CUDA126, False),  # Blackwell under cu126: no sm_120, no PTX
    ((10, 0), ["sm_90", "compute_90"], True),  # PTX is compiled by the driver for any later sm
    ((9, 0), ["sm_90a"], True), ((10, 0), ["sm_90a"], False),  # an arch-specific cubin: its own sm only
    ((12, 1), ["sm_120"], True), ((10, 0), ["sm_120"], False),
])
def test_arch_covers(sm: tuple[int, int], archs: list[str], covered: bool) -> None:
    assert arch_covers(sm, archs) is covered


def fake_card(monkeypatch: pytest.MonkeyPatch, sm: tuple[int, int], archs: list[str], name: str,
              count: int = 1) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: sm)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: archs)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(envcheck, "nvidia_driver", lambda: "590.48.01")


def test_a_v100_under_a_cuda13_build_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_card(monkeypatch, (7, 0), CUDA13, "Tesla V100-SXM2-32GB")
    line = kernel_problem(0)
    assert line is not None and "\n" not in line
    assert "Tesla V100-SXM2-32GB" in line and "sm70" in line and f"torch {torch.__version__}" in line
    assert f"CUDA {torch.version.cuda} build" in line and "sm_75 sm_80" in line and "compute_120" in line
    assert "download.pytorch.org/whl/cu126" in line and "<2.15" in line  # the route that has sm70 kernels
    with pytest.raises(SetupError) as err:
        require_gpus(1, "training (1 local rank(s), one GPU each)")
    assert str(err.value) == f"training (1 local rank(s), one GPU each): {line}"


@pytest.mark.parametrize(("sm", "archs"), [((7, 5), CUDA13), ((8, 0), CUDA13), ((9, 0), CUDA13),
                                           ((10, 0), CUDA13), ((7, 0), CUDA126), ((8, 6), CUDA126)])
def test_covered_cards_pass(monkeypatch: pytest.MonkeyPatch, sm: tuple[int, int], archs: list[str]) -> None:
    fake_card(monkeypatch, sm, archs, "a card", count=2)
    assert kernel_problem(0) is None
    require_gpus(2, "training")  # no raise


def test_every_asked_card_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_card(monkeypatch, (8, 0), CUDA13, "A100")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0) if device == 0 else (7, 0))
    with pytest.raises(SetupError, match=r"GPU 1, sm70"):
        require_gpus(2, "training")


def _one_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stdout + proc.stderr
    return lines[0].removeprefix("error: ")


def test_train_on_a_v100_stops_failed(images: Path, tmp_path: Path) -> None:
    (tmp_path / "tiny").mkdir()  # as the job wrapper made it
    proc = run(["-m", "ddpm.train", "--config", str(TINY_CONFIG), f"data.path={images}", f"run.root={tmp_path}",
                "infrastructure.num_gpus=1"], fake_env(gpu=V100))
    line = _one_error(proc)
    assert line.startswith("training (1 local rank(s), one GPU each): the Tesla V100-SXM2-32GB (GPU 0, sm70)"), line
    assert "archs sm_75 sm_80 sm_86 sm_90 sm_100 sm_120 compute_120" in line and "cu126" in line
    status = json.loads((tmp_path / "tiny" / "status.json").read_text())
    assert status["state"] == "failed" and status["error"] == line  # the wrapper ends the job, never requeues
    assert not (tmp_path / "tiny" / "checkpoints").exists()


@pytest.mark.parametrize("task", ["sample", "eval"])
def test_sampling_and_eval_tasks_on_a_v100_stop(task: str, checkpoint: Path, tmp_path: Path) -> None:
    if task == "sample":
        args = ["-m", "ddpm.sample", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "shards"),
                "--shard", "0", "--device", "cuda"]
        what = "sampling"
    else:  # a run directory whose config asks eval tasks for a GPU (the checks run before any checkpoint is read)
        run_dir = tmp_path / "tiny"
        shutil.copytree(checkpoint.parent, run_dir / "checkpoints")
        dump_config(load_config(TINY_CONFIG, ["infrastructure.num_gpus=1", "eval.enabled=true"]),
                    run_dir / "config.yaml")
        args = ["-m", "ddpm.evaluate", "task", str(run_dir), "--index", "0"]
        what = "eval task 0"
    proc = run(args, fake_env(gpu=V100))
    line = _one_error(proc)
    assert line.startswith(f"{what}: the Tesla V100-SXM2-32GB (GPU 0, sm70)"), line
    assert not (tmp_path / "shards").exists() and not (tmp_path / "tiny" / "eval").exists()


def test_an_out_of_memory_is_a_failure_with_its_fix(images: Path, tmp_path: Path) -> None:
    proc = run(["-m", "ddpm.train", "--config", str(TINY_CONFIG), f"data.path={images}", f"run.root={tmp_path}",
                "training.save_every=3"], fake_env(oom_after_steps=4))
    line = _one_error(proc)
    assert line.startswith("out of memory at step 4 (rank 0) on the CPU: batch 8 (8 per rank), image size 8, "
                           "fp32 (infrastructure.precision): lower training.batch_size (now 8), "
                           "set infrastructure.precision=bf16"), line
    status = json.loads((tmp_path / "tiny" / "status.json").read_text())
    assert status == {**status, "state": "failed", "error": line}
    assert (tmp_path / "tiny" / "checkpoints" / "step_00000003.pt").is_file()  # what was written stays


def test_a_grid_slower_than_the_watchdog_is_not_a_hang(images: Path, tmp_path: Path) -> None:
    """The job wrapper (as SLURM runs it) around a run whose grid takes ~15 s (each network call 1.5 s slower: a
    slow card) against training.watchdog_s=10: the grid beats the heartbeat, the run ends done."""
    proc = run(["-m", "ddpm.cluster", "train", "--config", str(TINY_CONFIG), f"data.path={images}",
                f"run.root={tmp_path}", "training.num_iterations=6", "training.sample_every=6",
                "training.watchdog_s=10", "sampling.num_steps=10"], fake_env(slow_forward_s=1.5), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "watchdog" not in proc.stdout and "training done at step 6" in proc.stdout, proc.stdout[-3000:]
    assert (tmp_path / "tiny" / "grids" / "step_6.png").is_file() or any((tmp_path / "tiny" / "grids").iterdir())


def _train(make_trainer, run_dir: Path, steps: int, fused: bool) -> dict[str, torch.Tensor]:
    """``steps`` more steps of the run in ``run_dir`` (resumed when it has a checkpoint), saved; its weights and
    AdamW moments."""
    trainer = make_trainer(run_dir, f"infrastructure.fused_adam={str(fused).lower()}", "training.num_iterations=10")
    assert all(bool(g["fused"]) == fused for g in trainer.optimizer.param_groups)  # the setting of this run
    for _ in range(steps):
        trainer.train_step(*trainer.next_batch())
    trainer.save()
    out = {f"model.{k}": v.clone() for k, v in trainer.model.state_dict().items()}
    for i, state in trainer.optimizer.state_dict()["state"].items():
        out.update({f"adam.{i}.{k}": v.clone().float().cpu() for k, v in state.items()})
    return out


@pytest.mark.parametrize("first", [False, True], ids=["unfused-then-fused", "fused-then-unfused"])
def test_fused_adam_may_change_across_a_resume(make_trainer, tmp_path: Path, first: bool) -> None:
    """Saved with one AdamW implementation, resumed with the other: the run goes on (torch restores the saved
    groups' flags; the resuming run's setting wins). Which equality holds: resuming with the same setting is
    bitwise (test_train's resume tests); across the switch, the step after the resume agrees with the unswitched
    step to 1e-6 (fused and unfused AdamW round differently: measured ~1e-10 per step, while 10 steps of the two
    from scratch drift ~2e-3 apart on this tiny model at lr 1e-3), so only one step is compared."""
    _train(make_trainer, tmp_path / "same", 5, first)
    shutil.copytree(tmp_path / "same", tmp_path / "switched")
    same = _train(make_trainer, tmp_path / "same", 1, first)
    switched = _train(make_trainer, tmp_path / "switched", 1, not first)
    assert same.keys() == switched.keys()
    worst = max((same[k] - switched[k]).abs().max().item() for k in same)
    assert worst <= 1e-6, f"one step after the switch: {worst:.2e} from the unswitched step"
    _train(make_trainer, tmp_path / "switched", 4, not first)  # and it goes on to the end
    assert (tmp_path / "switched" / "checkpoints" / "step_00000010.pt").is_file()

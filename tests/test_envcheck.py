"""The torch floor, the GPU fail-fast line and the disk plan: what stops a run before any work, in one line."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from helpers import BABEL_CONFIG as BABEL
from helpers import ROOT, run_main
from helpers import TINY_CONFIG as TINY

from ddpm import envcheck
from ddpm.config import load_config
from ddpm.envcheck import SetupError, driver_problem, pick_device, torch_floor_problem
from ddpm.plan import disk_plan, run_plan, time_plan


def _run(args: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """A real ``python ARGS`` (import-time checks, the wall time of a start): the CLI cases run in process."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def old_torch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """PYTHONPATH with a fake ``torch-2.9.0.dist-info`` first: the metadata says 2.9.0, the real torch imports."""
    site = tmp_path_factory.mktemp("fake-torch")
    info = site / "torch-2.9.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.9.0\n")
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


@pytest.mark.parametrize("command", [
    ["launch.py", "--config", str(BABEL), "--dry-run"],
    ["-m", "ddpm.train", "--config", str(BABEL)],
    ["-m", "ddpm.cluster", "train", "--config", str(BABEL)],
], ids=["launch", "train", "wrapper"])
def test_a_torch_below_the_floor_is_one_line(command, old_torch, tmp_path):
    proc = _run([*command, f"run.root={tmp_path}"], env=old_torch)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert "torch 2.9.0 is installed" in lines[0] and "torch >= 2.10" in lines[0]
    assert "--signals-to-handle" in lines[0] and "pip install" in lines[0]
    assert "running:" not in proc.stdout and not any(tmp_path.iterdir())  # torchrun never started, nothing written


def test_the_floor_reads_versions():
    assert torch_floor_problem("2.10.0+cu126") is None and torch_floor_problem("2.14.1") is None
    assert torch_floor_problem("3.0.0") is None and torch_floor_problem("2.10.0a0+git123") is None
    assert "torch 2.5.1 is installed" in torch_floor_problem("2.5.1")
    assert "not installed" in torch_floor_problem(None)
    assert envcheck.installed_torch() == torch.__version__.split("+")[0] or envcheck.installed_torch() == \
        torch.__version__


def test_training_that_asks_for_a_gpu_stops_before_any_work(tmp_path):
    """The GPU line comes before the data is opened (its path does not exist here) and before anything is written:
    no work is done, however fast the machine (the time it took is printed, not asserted)."""
    t0 = time.monotonic()
    proc = _run(["-m", "ddpm.train", "--config", str(BABEL), "infrastructure.num_gpus=1", f"run.root={tmp_path}",
                 f"data.path={tmp_path / 'no_such_images'}"])
    print(f"the GPU check stopped training in {time.monotonic() - t0:.1f} s")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    line = lines[0]
    assert line.startswith("error: infrastructure.num_gpus: training") and "asks for 1 GPU(s)" in line
    assert "this process sees 0" in line and "CUDA_VISIBLE_DEVICES=" in line and "job gres: not a SLURM job" in line
    assert f"torch {torch.__version__}" in line and "infrastructure.num_gpus=0" in line
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("status.json"))


def test_sampling_and_eval_that_ask_for_a_gpu_stop(checkpoint, tmp_path, capsys):
    """``python -m ddpm.sample`` (a checkpoint whose config asks for a GPU, or ``--device cuda``) and the eval
    task (a run whose config asks for GPUs): one line, exit 2, no shard written."""
    import ddpm.evaluate
    import ddpm.sample

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["config"]["infrastructure"]["num_gpus"] = 1
    gpu_ckpt = tmp_path / "gpu.pt"
    torch.save(state, gpu_ckpt)
    for args in (["--checkpoint", str(gpu_ckpt)], ["--checkpoint", str(checkpoint), "--device", "cuda"]):
        proc = run_main(ddpm.sample.main, [*args, "--out", tmp_path / "shards", "--shard", "0"], capsys)
        assert proc.code == 2 and len(proc.err_lines) == 1, proc.out + proc.err
        assert "sampling asks for 1 GPU(s), this process sees 0" in proc.err_lines[0]
    assert not (tmp_path / "shards").exists()
    run_dir = tmp_path / "run"
    cfg = load_config(TINY, ["infrastructure.num_gpus=1", f"run.root={tmp_path}", "run.name=run"])
    run_dir.mkdir()
    from ddpm.config import dump_config

    dump_config(cfg, run_dir / "config.yaml")
    proc = run_main(ddpm.evaluate.main, ["task", run_dir, "--index", "0"], capsys)
    assert proc.code == 2 and len(proc.err_lines) == 1, proc.out + proc.err
    assert proc.err_lines[0].startswith("error: infrastructure.num_gpus: eval task 0 asks for 1 GPU(s)"), proc.err
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]
    assert pick_device("cpu", 1, "x") == "cpu" and pick_device(None, 0, "x") == "cpu"


def test_the_line_names_an_old_driver_and_the_fix(monkeypatch):
    """A CUDA 13 build on a node whose driver is 550 (the default PyPI wheels on many clusters)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(envcheck, "nvidia_driver", lambda: "550.54.15")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_JOB_GPUS", "0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(SetupError) as err:
        pick_device(None, 1, "sampling task 3")
    line = str(err.value)
    assert "sampling task 3 asks for 1 GPU(s), this process sees 0" in line and "job gres: SLURM_JOB_GPUS=0" in line
    assert "the driver 550.54.15 is older than this torch's CUDA 13.0 build needs (>= 580.65)" in line
    assert "--index-url https://download.pytorch.org/whl/cu126" in line
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.version, "cuda", None)
    line = envcheck.gpu_problem(2, "training", "infrastructure.num_gpus")
    assert "CUDA_VISIBLE_DEVICES is empty" in line and "a CPU-only build" in line and "install a CUDA build" in line
    assert driver_problem("12.6", "550.54.15") is None and driver_problem("12.6", "470.82") is not None
    assert "newer driver" in driver_problem("12.6", "470.82")


def test_run_plan_arithmetic():
    cfg = load_config(BABEL, ["slurm.time_min=60", "slurm.signal_delay_s=180", "slurm.max_restarts=2",
                              "training.milestone_every=10000", "sampling.num_samples=50000"])
    ckpt = 16 * 77_531_523
    disk = disk_plan(cfg)
    assert (disk.checkpoint, disk.kept, disk.milestones) == (ckpt, 3, 10)
    assert disk.samples == 2 * 50_000 * 64 * 64 * 3 and disk.eval == 0
    assert disk.total == 13 * ckpt + 2 * 50_000 * 64 * 64 * 3
    fast = time_plan(cfg, img_per_s=2500.0, save_s=4.0)  # 6.4M images: 2,560 s, one job of 3,420 s
    assert (fast.wall_s, fast.jobs) == (2560.0, 1) and fast.gpu_hours == pytest.approx(2560 / 3600)
    slow = time_plan(cfg, img_per_s=500.0, save_s=4.0)  # 12,800 s: 4 jobs, 3 requeues > max_restarts 2
    assert slow.jobs == 4
    lines = {what: (kind, detail) for kind, what, detail in run_plan(cfg, 500.0, 160.0)}
    assert lines["wall time"] == ("ok", "3 h 33 min for 100000 steps of 64 at 500.0 img/s")
    assert lines["gpu-hours"] == ("ok", "3.6 GPU-hours (1 GPUs)")
    assert lines["requeues"][0] == "FAIL" and "raise slurm.max_restarts to 3" in lines["requeues"][1]
    assert lines["save window"][0] == "FAIL" and "slurm.signal_delay_s=180 s leaves 20 s" in lines["save window"][1]
    assert "14.98 GiB" in lines["disk"][1] or f"{disk.total / 2**30:.2f} GiB" in lines["disk"][1]
    ok = {what: kind for kind, what, _ in run_plan(cfg, 2500.0, 4.0)}
    assert set(ok.values()) == {"ok"}


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (root, as in CI), unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_preflight_refuses_a_run_root_too_small(images, tiny_disk, capsys):
    import launch

    proc = run_main(launch.main, ["--config", TINY, f"data.path={images}", f"run.root={tiny_disk}",
                                  "--cluster", "local"], capsys)
    assert proc.code == 2 and len(proc.err_lines) == 1, proc.out + proc.err
    assert proc.err_lines[0].startswith(f"error: run.root: {tiny_disk} has 1.0 MiB free, the run needs about ")
    assert "checkpoints 2.9 MiB x 3 kept" in proc.err_lines[0] and "training.keep_last" in proc.err_lines[0]
    assert "train: job" not in proc.out and not (tiny_disk / "tiny").exists()  # nothing queued or written

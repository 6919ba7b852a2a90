"""GPUs on the local executor (``launch.py --cluster local``) and the gres check of the SLURM preflight.

- a local job gets the GPUs its stage asks for: the user's ``CUDA_VISIBLE_DEVICES`` when set, else this
  machine's GPUs, else (none found) 0..n-1 for the n the config asks for; the job then stops with the GPU line
  of ddpm.envcheck, which shows the devices it was given (never "every GPU hidden");
- each task of a sampling or eval array gets devices of its own, in waves of at most one task per device set;
- ``slurm.gres`` must ask for ``infrastructure.num_gpus`` GPUs per node: one line before anything is queued.

The launch.py runs on this CPU machine fail fast at the GPU check (no real work); they are skipped where GPUs
are found, since there the jobs would really train and sample.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, TINY_CONFIG

from ddpm.cluster import executors, preflight, submit
from ddpm.cluster.executors import local_gpus, local_slots, make_executor
from ddpm.cluster.preflight import Partition, check_gres, gres_gpus, gres_kind
from ddpm.config import Config, load_config
from ddpm.errors import ConfigError, DDPMError
from ddpm.rundir import RunDir

no_gpus_here = pytest.mark.skipif(executors.gpus_found() > 0, reason="GPUs here: the jobs would really run")


def run_launch(*args: str, visible: str | None = None) -> subprocess.CompletedProcess[str]:
    """``launch.py`` on tiny_cpu.yaml, with ``CUDA_VISIBLE_DEVICES`` set to ``visible`` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update({"OMP_NUM_THREADS": "1"}, **({} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}))
    return subprocess.run([sys.executable, "launch.py", "--config", str(TINY_CONFIG), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, env=env)


def tiny(*overrides: str) -> Config:
    """tiny_cpu.yaml with ``section.key=value`` overrides."""
    return load_config(TINY_CONFIG, list(overrides))


def test_local_gpus_honour_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert local_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == (2, 3)
    assert local_gpus({"CUDA_VISIBLE_DEVICES": " 1 "}) == (1,)
    assert local_gpus({"CUDA_VISIBLE_DEVICES": ""}) == ()  # the user hid every GPU: so do the jobs
    with pytest.raises(DDPMError, match=r"^CUDA_VISIBLE_DEVICES=GPU-8f2a: --cluster local hands GPUs .* by index"):
        local_gpus({"CUDA_VISIBLE_DEVICES": "GPU-8f2a"})
    monkeypatch.setattr(executors, "gpus_found", lambda: 0)
    assert local_gpus({}) is None
    monkeypatch.setattr(executors, "gpus_found", lambda: 3)
    assert local_gpus({}) == (0, 1, 2)


def test_gpus_found_counts_nvidia_smi_lines(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-a)'\necho '  MIG 1g.10gb Device 0: (UUID: MIG-b)'\n"
                   "echo 'GPU 1: NVIDIA H100 (UUID: GPU-c)'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert executors.gpus_found() == 2


def test_local_slots_split_the_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executors, "local_gpus", lambda: (0, 1, 2, 3))
    two = tiny("infrastructure.num_gpus=2")
    assert local_slots(two, "train") == [(0, 1)]
    assert local_slots(two, "sample", 8) == [(0,), (1,), (2,), (3,)]  # one device per task, four at once
    assert local_slots(two, "eval", 3) == [(0,), (1,), (2,)]
    assert local_slots(tiny("infrastructure.num_gpus=2", "slurm.sample_gpus=2"), "sample", 8) == [(0, 1), (2, 3)]
    assert local_slots(two, "assemble") == [()] and local_slots(tiny(), "sample", 3) == [(), (), ()]
    assert local_slots(tiny("infrastructure.num_gpus=8"), "train") == [(0, 1, 2, 3)]  # too few: the job says so
    monkeypatch.setattr(executors, "local_gpus", lambda: None)  # none found: the config's count
    assert local_slots(two, "sample", 3) == [(0,), (1,)] and local_slots(two, "train") == [(0, 1)]
    monkeypatch.setattr(executors, "local_gpus", lambda: ())  # CUDA_VISIBLE_DEVICES="": hidden, as asked
    assert local_slots(two, "sample", 3) == [()]


def test_local_executor_gets_the_devices(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(executors, "local_gpus", lambda: (2, 3))
    cfg = tiny("infrastructure.num_gpus=2")
    ex = make_executor(cfg, RunDir(tmp_path), "train", "local")
    assert (ex.parameters["gpus_per_node"], ex.parameters["visible_gpus"]) == (2, (2, 3))
    ex = make_executor(cfg, RunDir(tmp_path), "sample", "local", gpus=(3,))
    assert (ex.parameters["gpus_per_node"], ex.parameters["visible_gpus"]) == (1, (3,))
    ex = make_executor(cfg, RunDir(tmp_path), "assemble", "local")
    assert (ex.parameters["gpus_per_node"], ex.parameters["visible_gpus"]) == (0, ())


class FakeJob:
    """A finished local job as submit.follow sees it; records when its result was collected."""

    def __init__(self, record: list[tuple[int, tuple[int, ...]]], index: int, devices: tuple[int, ...],
                 folder: Path):
        self.record, self.entry, self.job_id = record, (index, devices), f"job{index}"
        self.paths = type("Paths", (), {"stdout": folder / f"{index}.out", "stderr": folder / f"{index}.err"})()

    def done(self) -> bool:
        return True

    def result(self) -> str:
        self.record.remove(self.entry)  # no longer running
        return "ok"


def test_array_tasks_run_in_waves_on_their_own_devices(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Five sampling tasks on three GPUs: at most three run at once, never two on one device."""
    monkeypatch.setattr(executors, "local_gpus", lambda: (5, 6, 7))
    running: list[tuple[int, tuple[int, ...]]] = []
    started: list[tuple[int, tuple[int, ...]]] = []

    class FakeExecutor:
        def __init__(self, devices: tuple[int, ...]):
            self.devices = devices

        def submit(self, _task: Any, index: int) -> FakeJob:
            assert len(running) < 3 and self.devices not in {d for _, d in running}
            running.append((index, self.devices))
            started.append((index, self.devices))
            return FakeJob(running, index, self.devices, tmp_path)

    monkeypatch.setattr(submit, "make_executor", lambda cfg, run_dir, stage, cluster, gpus: FakeExecutor(gpus))
    jobs: dict[str, Any] = {}
    submit.run_local(tiny("infrastructure.num_gpus=1", "sampling.num_shards=5"), RunDir(tmp_path), "sample", 5, jobs)
    assert started == [(0, (5,)), (1, (6,)), (2, (7,)), (3, (5,)), (4, (6,))] and not running
    assert jobs["sample_tasks"] == [f"job{i}" for i in range(5)] and jobs["sample"] == "job0"


@no_gpus_here
def test_local_training_sees_the_gpus_it_asks_for(images: Path, tmp_path: Path) -> None:
    proc = run_launch("--cluster", "local", "infrastructure.num_gpus=1", "sampling.num_shards=2",
                      f"data.path={images}", f"run.root={tmp_path}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert "train: job" in proc.stdout and "(CUDA_VISIBLE_DEVICES=0)" in proc.stdout, proc.stdout
    assert lines[0].startswith("error: train job ") and "infrastructure.num_gpus: training (1 local rank(s)" in lines[0]
    assert "this process sees 0: CUDA_VISIBLE_DEVICES=0," in lines[0] and "empty" not in lines[0], lines[0]
    assert "sample: " not in proc.stdout  # nothing after the failed training


@pytest.fixture
def trained_run(checkpoint: Path, tmp_path: Path) -> Path:
    """run.root holding a run ``tiny`` with the session's checkpoints (a copy: the fixture's is read-only)."""
    shutil.copytree(checkpoint.parent, tmp_path / "tiny" / "checkpoints")
    return tmp_path


def task_logs(stdout: str, run_dir: Path) -> dict[int, str]:
    """Each task's stdout and stderr, found from launch.py's ``sample: task K: job ID`` lines."""
    found = re.findall(r"^sample: task (\d+): job (\d+)", stdout, flags=re.M)
    return {int(k): "".join(p.read_text() for p in sorted((run_dir / "logs" / j).glob(f"{j}_0_log.*")))
            for k, j in found}


@no_gpus_here
@pytest.mark.parametrize(("visible", "devices"), [(None, ["0", "1"]), ("2,3", ["2", "3"])])
def test_each_sampling_task_gets_its_own_gpu(images: Path, trained_run: Path, visible: str | None,
                                             devices: list[str]) -> None:
    proc = run_launch("--cluster", "local", "--stage", "sample", "--only", "infrastructure.num_gpus=2",
                      "sampling.num_shards=2", f"data.path={images}", f"run.root={trained_run}", visible=visible)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    logs = task_logs(proc.stdout, trained_run / "tiny")
    assert sorted(logs) == [0, 1], proc.stdout
    for k, device in enumerate(devices):
        assert f"sample: task {k}: job " in proc.stdout and f"(CUDA_VISIBLE_DEVICES={device})" in proc.stdout
        assert (f"infrastructure.num_gpus: sampling task {k} asks for 1 GPU(s), this process sees 0: "
                f"CUDA_VISIBLE_DEVICES={device},") in logs[k], logs[k][-2000:]
    line = proc.stderr.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("error: sample job ") and "CUDA_VISIBLE_DEVICES=" in line[0], line


def test_gres_counts() -> None:
    assert [gres_gpus(g) for g in ("gpu:a100:4", "gpu:2", "gpu", "gpu:a100", "shard:2", None)] == [4, 2, 1, 1, 0, 0]
    assert [gres_kind(g) for g in ("gpu:a100:4", "gpu:2", "gpu:a100", None)] == ["gpu:a100", "gpu", "gpu:a100", "gpu"]


@pytest.mark.parametrize(("overrides", "message"), [
    (("infrastructure.num_gpus=2", "slurm.gres=gpu:a100:4"),
     "slurm.gres: gpu:a100:4 asks for 4 GPU(s) per node, infrastructure.num_gpus is 2 (the ranks torchrun starts "
     "per node, one GPU each); fix: set slurm.gres=gpu:a100:2 or infrastructure.num_gpus=4"),
    (("infrastructure.num_gpus=4", "slurm.gres=gpu:2"), "fix: set slurm.gres=gpu:4 or infrastructure.num_gpus=2"),
    (("infrastructure.num_gpus=0", "slurm.gres=gpu:1"),
     "slurm.gres: gpu:1 asks for 1 GPU(s) per node, but infrastructure.num_gpus is 0 (a CPU run: the GPUs would "
     "sit idle); fix: set slurm.gres=null for a CPU run, or infrastructure.num_gpus=1"),
])
def test_preflight_refuses_a_gres_that_is_not_num_gpus(monkeypatch: pytest.MonkeyPatch, images: Path,
                                                       tmp_path: Path, overrides: tuple[str, ...],
                                                       message: str) -> None:
    monkeypatch.setattr(preflight, "partitions", lambda: {"gpu": Partition("gpu", 4, 64, 512_000, 2880, 8)})
    monkeypatch.setattr(preflight, "default_partition", lambda: "gpu")
    cfg = tiny(f"data.path={images}", f"run.root={tmp_path}", "slurm.partition=null", *overrides)
    with pytest.raises(ConfigError) as err:
        preflight.preflight(cfg, "slurm", ["train", "sample", "assemble"])
    assert message in str(err.value) and "\n" not in str(err.value)
    check_gres(cfg, ["sample", "assemble"])  # no training job: its gres is not asked for


def test_preflight_passes_a_matching_gres(monkeypatch: pytest.MonkeyPatch, images: Path, tmp_path: Path) -> None:
    monkeypatch.setattr(preflight, "partitions", lambda: {"gpu": Partition("gpu", 4, 64, 512_000, 2880, 8)})
    monkeypatch.setattr(preflight, "default_partition", lambda: "gpu")
    for overrides in (("infrastructure.num_gpus=4", "slurm.gres=gpu:a100:4"), ("infrastructure.num_gpus=2",),
                      ("infrastructure.num_gpus=0",), ("infrastructure.num_gpus=1", "slurm.gres=gpu")):
        cfg = tiny(f"data.path={images}", f"run.root={tmp_path}", "slurm.partition=null", *overrides)
        preflight.preflight(cfg, "slurm", ["train", "sample", "assemble"])


def test_dry_run_refuses_a_gres_mismatch(images: Path, tmp_path: Path) -> None:
    proc = run_launch("--dry-run", "--cluster", "local", "infrastructure.num_gpus=2", "slurm.gres=gpu:a100:4",
                      f"data.path={images}", f"run.root={tmp_path}")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: slurm.gres: gpu:a100:4 asks for 4 GPU(s) per node, infrastructure.num_gpus is 2 (the ranks "
        "torchrun starts per node, one GPU each); fix: set slurm.gres=gpu:a100:2 or infrastructure.num_gpus=4"]
    assert "#SBATCH" not in proc.stdout and not (tmp_path / "tiny").exists()

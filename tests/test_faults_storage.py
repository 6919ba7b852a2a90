"""Faults of the storage and of the sampling stage, on the local SLURM (and the CLI where it says so):

- a full disk while a checkpoint is written (a small tmpfs as ``run.root``): one line, non-zero exit, the
  previous checkpoint loadable, nothing deleted;
- every checkpoint unreadable: one line naming the directory and why, non-zero exit, every file as it was;
- a sampling array task preempted mid-shard: requeued, resumed from its partial file, the assembled npz equal
  to an uninterrupted run's;
- ``launch.py status`` shows a run whose heartbeat is older than ``training.watchdog_s`` as stalled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, TINY_CONFIG, launch
from slurm_helpers import (
    BACKGROUND,
    TERMINAL_STATES,
    job_state,
    preempt,
    restarts,
    wait_for_job,
    wait_for_restart,
    wait_for_state,
)
from slurm_runs import GRACE_S, WORKERS, Pace, wait_for_step

from ddpm.checkpoint import list_checkpoints, load_checkpoint
from ddpm.rundir import RunDir
from ddpm.status import write_status


def train_locally(images: Path, root: Path, *overrides: str) -> Path:
    """A short run with ``python -m ddpm.train`` (no SLURM); its run directory."""
    proc = subprocess.run([sys.executable, "-m", "ddpm.train", "--config", str(TINY_CONFIG), f"data.path={images}",
                           f"run.root={root}", *overrides], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root / "tiny"


@pytest.fixture(scope="module")
def trained(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 10-step local run, trained once for the tests that only need a run with checkpoints: copy it
    (:func:`copy_run`), never change it."""
    return train_locally(images, tmp_path_factory.mktemp("trained"), "training.num_iterations=10")


def copy_run(trained: Path, root: Path) -> Path:
    """A copy of the ``trained`` run as ``root/tiny`` (file times kept); its run directory."""
    shutil.copytree(trained, root / "tiny")
    return root / "tiny"


def snapshot(directory: Path) -> dict[str, tuple[int, str, int]]:
    """name -> (size, sha256, mtime_ns) of every file: what "nothing was touched" compares."""
    return {p.name: (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(directory.iterdir())}


def job_of(run_dir: Path, stage: str = "train") -> tuple[str, Path]:
    job = json.loads((run_dir / "jobs.json").read_text())[stage]
    return job, run_dir / "logs" / job / f"{job}_0_log.out"


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs (root only, as in CI), unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slurm
def test_full_disk_during_checkpoint(slurm_cluster, images, small_disk, pace):
    proc = launch(f"data.path={images}", f"run.root={small_disk}", *WORKERS, "--stage", "train", "--only",
                  "training.num_iterations=2000", "training.save_every=100", "training.log_every=10")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = small_disk / "tiny"
    job, log = job_of(run_dir)
    assert wait_for_state(job, {"RUNNING"}, timeout=pace.bound()) == "RUNNING"
    wait_for_step(log, 110, timeout=pace.bound(steps=110), job=job)  # step_100 is durable
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    with open(small_disk / "filler", "wb") as f:  # leave 1 MiB: logs still fit, a ~3 MiB checkpoint does not
        f.write(b"\0" * (free - 2**20))
    before = snapshot(run_dir / "checkpoints")
    assert wait_for_job(job, timeout=pace.bound(steps=100, starts=0)) == "FAILED"
    text = log.read_text()
    errors = [ln for ln in text.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "no space left on the device for step_00000200.pt" in errors[0], text[-3000:]
    assert "step_00000100.pt is intact and nothing was deleted" in errors[0]
    assert "training failed: " in text and restarts(job) == 0  # a full disk is not requeued
    assert snapshot(run_dir / "checkpoints") == before
    assert load_checkpoint(run_dir / "checkpoints" / "step_00000100.pt")["step"] == 100
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"


def _truncate_all(run_dir: Path) -> dict[str, tuple[int, str, int]]:
    for _, path in list_checkpoints(RunDir(run_dir)):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    return snapshot(run_dir / "checkpoints")


def test_unreadable_checkpoints_cli(images, trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    before = _truncate_all(run_dir)
    proc = subprocess.run([sys.executable, "-m", "ddpm.train", "--config", str(TINY_CONFIG), f"data.path={images}",
                           f"run.root={tmp_path}", "training.num_iterations=20"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.count("Traceback") == 0, proc.stderr
    assert errors[0].startswith(f"error: {run_dir}/checkpoints: no checkpoint can be loaded (step_00000010.pt: "
                                "corrupt or truncated checkpoint")
    assert "nothing was deleted" in errors[0] and "new run.name" in errors[0]
    assert snapshot(run_dir / "checkpoints") == before  # it did not start over: nothing new, nothing pruned
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"


@pytest.mark.slurm
def test_unreadable_checkpoints_slurm(slurm_cluster, images, trained, tmp_path, pace):
    run_dir = copy_run(trained, tmp_path)
    before = _truncate_all(run_dir)
    proc = launch(f"data.path={images}", f"run.root={tmp_path}", "training.num_iterations=20", "--stage", "train",
                  "--only")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job, log = job_of(run_dir)
    assert wait_for_job(job, timeout=pace.bound()) == "FAILED"
    text = log.read_text()
    assert f"training failed: {run_dir}/checkpoints: no checkpoint can be loaded" in text, text[-3000:]
    assert restarts(job) == 0 and snapshot(run_dir / "checkpoints") == before
    shown = subprocess.run([sys.executable, "launch.py", "status", str(run_dir)], capture_output=True, text=True,
                           cwd=ROOT, timeout=60).stdout
    assert "training: failed" in shown and "no checkpoint can be loaded" in shown


SAMPLING = ["sampling.sampler=ddpm", "sampling.num_steps=50", "sampling.num_samples=200", "sampling.num_shards=2",
            "sampling.batch_size=4", "sampling.seed_base=7"]
SHARD_STEPS = 25 * 50  # network evaluations of one shard: 25 batches of 4, 50 steps each (each cheaper than a
# training step: a forward pass of a batch of 4, no backward), what the bounds of its waits count in training steps


def sample_reference(run_dir: Path, out: Path) -> list[subprocess.Popen[str]]:
    """The uninterrupted reference of SAMPLING: its two shards by the CLI into ``out``, started in the background
    at a lower priority (they sample while the SLURM tasks do)."""
    return [subprocess.Popen([*BACKGROUND, sys.executable, "-m", "ddpm.sample", "--checkpoint", str(run_dir),
                              "--out", str(out), "--shard", str(k), "--num-shards", "2", "--num-samples", "200",
                              "--sampler", "ddpm", "--steps", "50", "--batch-size", "4", "--seed-base", "7"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}) for k in range(2)]


@pytest.mark.slurm
def test_sampling_task_preempted_mid_shard(slurm_cluster, images, trained, tmp_path, pace):
    run_dir = copy_run(trained, tmp_path)
    ref = tmp_path / "ref"
    references = sample_reference(run_dir, ref)
    try:
        preempted_shard(images, tmp_path, run_dir, pace)
        for proc in references:
            out, _ = proc.communicate(timeout=pace.bound(steps=SHARD_STEPS))
            assert proc.returncode == 0, out
    finally:
        for proc in references:
            proc.kill()
            proc.wait()
    expected = np.concatenate([np.load(ref / f"shard_{k}.npz")["arr_0"] for k in range(2)])
    got = np.load(run_dir / "samples" / "samples_200x8x8x3.npz")["arr_0"]
    assert np.array_equal(got, expected)


def preempted_shard(images: Path, root: Path, run_dir: Path, pace: Pace) -> None:
    """SAMPLING on the local SLURM, shard 0 preempted once it has a partial file; returns once assembly is done."""
    proc = launch(f"data.path={images}", f"run.root={root}", *WORKERS, *SAMPLING, "--stage", "sample")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = json.loads((run_dir / "jobs.json").read_text())
    task0 = jobs["sample_tasks"][0]
    partial = run_dir / "samples" / "shards" / "shard_0.partial.npz"
    deadline = time.monotonic() + pace.bound(steps=SHARD_STEPS // 25)
    while not partial.is_file():  # at least one batch of shard 0 is durable (of 25)
        assert time.monotonic() < deadline and job_state(task0) not in TERMINAL_STATES, \
            "shard 0 never wrote a partial file"
        time.sleep(0.2)
    preempt()
    wait_for_restart(task0, 1, timeout=GRACE_S + pace.bound(steps=SHARD_STEPS // 25, starts=0))
    # task 0 released from BeginTime; its shard resumes, the other may still run
    assert wait_for_job(jobs["sample"], timeout=pace.bound(steps=SHARD_STEPS), release=True) == "COMPLETED"
    assert wait_for_job(jobs["assemble"], timeout=pace.bound()) == "COMPLETED"
    log = run_dir / "logs" / task0 / f"{task0}_0_log.out"
    logs = "".join(p.read_text() for p in (run_dir / "logs").rglob("*.out"))
    assert "shard 0: stopped by SIGTERM" in logs and "shard_0.partial.npz: resuming after" in logs, log


def test_status_shows_stale_heartbeat_as_stalled(images, tmp_path):
    # watchdog_s 60: a busy machine may take seconds to start `launch.py status`; the fresh beat stays fresh
    run_dir = train_locally(images, tmp_path, "training.num_iterations=2", "training.watchdog_s=60")
    write_status(RunDir(run_dir), "running", 1, 0)
    status = json.loads((run_dir / "status.json").read_text())
    status["heartbeat"] -= 120  # the trainer last beat two minutes ago
    (run_dir / "status.json").write_text(json.dumps(status))
    shown = subprocess.run([sys.executable, "launch.py", "status", str(run_dir)], capture_output=True, text=True,
                           cwd=ROOT, timeout=60)
    assert shown.returncode == 0, shown.stderr
    stalled = re.search(r"^training: stalled \(no heartbeat for (\d+) s, more than training.watchdog_s=60\) at step "
                        r"1/2", shown.stdout, flags=re.M)
    assert stalled and 120 <= int(stalled.group(1)) < 180, shown.stdout
    write_status(RunDir(run_dir), "running", 1, 0)  # a fresh beat is not stalled
    shown = subprocess.run([sys.executable, "launch.py", "status", str(run_dir)], capture_output=True, text=True,
                           cwd=ROOT, timeout=60)
    assert "training: running at step 1/2" in shown.stdout

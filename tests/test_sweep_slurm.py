"""``launch.py sweep`` on the real local SLURM: a 2 x 2 grid of tiny runs as one training array (one task at a time)
plus a chain per point (one sampling shard with Inception statistics, the assembly's FID), then the results job.

- point 0's training task is preempted by a job of the urgent partition (PreemptMode=REQUEUE: SIGTERM, GraceTime,
  requeue exactly once) and resumes from the checkpoint it saved to the same training state as an uninterrupted
  run of its settings (the plain job's PreemptMode=CANCEL case: test_faults_slurm.py);
- point 3's run directory holds only an unreadable checkpoint when its task starts (a file corrupted on shared
  storage): the task ends FAILED with the trainer's one line, SLURM cancels its chain (``--kill-on-invalid-dep``),
  the other points complete;
- results.csv holds the three scored points and the failed one; results.png has one panel per swept key; the
  status of the sweep shows every point and the best.
"""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
from helpers import ROOT, TINY_CONFIG
from PIL import Image
from slurm_helpers import (
    assert_same_training_state,
    job_state,
    next_job_id,
    preempt,
    restarts,
    wait_for_job,
    wait_for_restart,
    wait_for_state,
)
from slurm_runs import GRACE_S, WORKERS, wait_for_step

from ddpm.checkpoint import load_latest
from ddpm.rundir import RunDir, SweepDir
from ddpm.sweepresults import plot, read_sweep

pytestmark = pytest.mark.slurm
GRID = ["--grid", "training.learning_rate=[1e-3,2e-3]", "--grid", "training.ema_decay=[0.9,0.99]"]
SAMPLING = ["sampling.fid=true", "sampling.num_shards=1", "sampling.num_samples=8", "sampling.batch_size=8",
            "slurm.sample_cpus_per_task=1", "slurm.array_parallelism=1"]


def test_a_sweep_survives_a_preemption_and_a_failed_point(slurm_cluster, images, fid_inputs, tmp_path, reference,
                                                           pace):
    n = pace.run_length(150, at_least=300)
    common = [*WORKERS, f"training.num_iterations={n}", "training.log_every=10", "training.save_every=100"]
    ref = reference(*common, "training.learning_rate=0.001", "training.ema_decay=0.9")
    argv = [sys.executable, "launch.py", "sweep", "--config", str(TINY_CONFIG), "--cluster", "slurm", *GRID,
            f"data.path={images}", f"run.root={tmp_path}", *common, *SAMPLING, *fid_inputs]
    before = next_job_id()
    dry = subprocess.run([*argv, "--dry-run"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert dry.returncode == 0 and "#SBATCH --array=0-3%1" in dry.stdout, dry.stdout + dry.stderr
    assert next_job_id() == before and list(tmp_path.iterdir()) == []  # the dry run submits and writes nothing
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sweep = SweepDir(tmp_path / "tiny")
    record = read_sweep(sweep.path)
    points, array = record["points"], record["train_array"]
    tasks = [p["jobs"]["train"] for p in points]
    assert tasks == [f"{array}_{k}" for k in range(4)]  # one array, one task per point

    # point 3: only an unreadable checkpoint when its task starts (the array runs one task at a time: it waits)
    bad = RunDir(points[3]["run_dir"])
    bad.checkpoints.mkdir()
    bad.checkpoint(100).write_bytes(b"not a checkpoint")
    bad.latest.write_text(bad.checkpoint(100).name)
    assert job_state(tasks[3]) == "PENDING"

    log0 = sweep.logs / tasks[0] / f"{tasks[0]}_0_log.out"
    assert wait_for_state(tasks[0], {"RUNNING"}, timeout=pace.bound()) == "RUNNING"
    at = wait_for_step(log0, 150, timeout=pace.bound(steps=150), job=tasks[0])
    preempt()
    wait_for_restart(tasks[0], 1, timeout=GRACE_S + pace.bound(steps=10, starts=0))
    stopped = load_latest(RunDir(points[0]["run_dir"]))[1]["step"]  # the task waits for its BeginTime: no newer one
    assert at <= stopped < n
    assert wait_for_job(tasks[0], timeout=pace.bound(steps=n), release=True) == "COMPLETED"
    # every task: n steps each, one start each, two for point 0; each chain an Inception start-up or two
    state = wait_for_job(record["results_job"], timeout=pace.bound(steps=4 * n, starts=13) + 240, release=True)
    logs = "".join(p.read_text() for p in sweep.logs.rglob("*.out"))
    assert state == "COMPLETED", logs[-4000:]

    text0 = log0.read_text()
    assert restarts(tasks[0]) == 1, text0[-3000:]  # requeued exactly once, by SLURM or by the wrapper, never both
    assert "received SIGTERM" in text0 and f"step_{stopped:08d}.pt in" in text0, text0[-3000:]
    assert "stop: checkpoint durable" in text0 and \
        f"resumed from {points[0]['run_dir']}/checkpoints/step_{stopped:08d}.pt" in text0, text0[-3000:]
    assert_same_training_state(ref.state(), load_latest(RunDir(points[0]["run_dir"]))[1])
    assert [job_state(t) for t in tasks] == ["COMPLETED"] * 3 + ["FAILED"]
    assert {job_state(points[3]["jobs"][s]) for s in ("sample", "assemble")} == {"CANCELLED"}

    rows = list(csv.DictReader(sweep.results_csv.open()))
    assert [r["state"] for r in rows] == ["done", "done", "done", "failed"]
    assert all(float(r["fid"]) > 0 and r["fid_source"] == "final samples" for r in rows[:3]) and rows[3]["fid"] == ""
    assert "no checkpoint can be loaded" in rows[3]["error"] and all(float(r["wall_s"]) > 0 for r in rows[:3])
    assert [r["training.ema_decay"] for r in rows] == ["0.9", "0.99", "0.9", "0.99"]
    with Image.open(sweep.results_png) as png:
        assert png.format == "PNG"
    assert plot(record, rows, tmp_path / "again.png") == ["training.learning_rate", "training.ema_decay"]

    shown = subprocess.run([sys.executable, "launch.py", "status", str(sweep.path)], capture_output=True, text=True,
                           cwd=ROOT, timeout=60).stdout
    best = min(rows[:3], key=lambda r: float(r["fid"]))
    assert f"best so far: point {best['point']} ({best['name']})" in shown, shown
    assert "point 3: failed: " in shown and shown.count("; FID ") == 4 and f"results: {sweep.results_csv}" in shown

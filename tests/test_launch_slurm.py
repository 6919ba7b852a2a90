"""launch.py and slurm/*.sbatch against a real SLURM cluster (tests/slurm/cluster.sh), tiny CPU config.

- the full pipeline: train -> array of 3 sampling shards -> assembly, every artifact checked;
- (stops, preemption and other faults: tests/test_faults_slurm.py and tests/test_faults_storage.py);
- a failed array task re-run alone (the sbatch template) completes the set; assembly with the shard
  missing fails naming it;
- preflight: a wrong partition, an unreachable data path and a config typo stop launch.py before
  anything is queued.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, launch
from PIL import Image
from slurm_helpers import (
    next_job_id,
    sbatch,
    show_job,
    template_without_gres,
    wait_for_job,
)

from ddpm.checkpoint import load_latest
from ddpm.rundir import RunDir

pytestmark = pytest.mark.slurm
ONE_THREAD = "slurm.setup=[export OMP_NUM_THREADS=1]"  # same float reductions in the job and the reference


def jobs_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "jobs.json").read_text())


@pytest.fixture(scope="module")
def pipeline(slurm_cluster, images, tmp_path_factory) -> Path:
    """One full run through launch.py; returns its run directory once assembly completed."""
    root = tmp_path_factory.mktemp("slurm_runs")
    proc = launch(f"data.path={images}", f"run.root={root}", ONE_THREAD)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = root / "tiny"
    jobs = jobs_of(run_dir)
    for line in (f"train: job {jobs['train']}", f"sample: job {jobs['sample']}", f"tensorboard --logdir {run_dir}/tb",
                 f"run dir:      {run_dir}"):
        assert line in proc.stdout
    # chained with afterok (training takes longer than this check)
    assert show_job(jobs["sample_tasks"][0])["Dependency"].startswith(f"afterok:{jobs['train']}")
    assert show_job(jobs["assemble"])["Dependency"].startswith(f"afterok:{jobs['sample']}")
    state = wait_for_job(jobs["assemble"], timeout=400, release=True)
    assert state == "COMPLETED", "".join(p.read_text() for p in (run_dir / "logs").rglob("*.out"))
    return run_dir


def test_full_pipeline_artifacts(pipeline):
    run_dir, jobs = pipeline, jobs_of(pipeline)
    assert wait_for_job(jobs["train"]) == "COMPLETED"
    assert len(jobs["sample_tasks"]) == 3 and wait_for_job(jobs["sample"]) == "COMPLETED"
    # training
    path, state = load_latest(RunDir(run_dir))
    assert state["step"] == 12 and path.name == "step_00000012.pt"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert prov["starts"][0]["slurm"]["SLURM_JOB_ID"] == jobs["train"]
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "config.yaml").is_file()
    # sampling shards and assembly
    for k in range(3):
        meta = json.loads((run_dir / "samples" / "shards" / f"shard_{k}.json").read_text())
        assert meta["complete"] and meta["shard"] == k
    samples = np.load(run_dir / "samples" / "samples_12x8x8x3.npz")["arr_0"]
    assert samples.shape == (12, 8, 8, 3) and samples.dtype == np.uint8 and samples.std() > 0
    assert Image.open(run_dir / "samples" / "grid.png").size[0] > 8
    metrics = json.loads((run_dir / "samples" / "metrics.json").read_text())
    assert metrics["num_samples"] == 12 and metrics["step"] == 12
    # logs of every stage in RUN_DIR/logs
    logs = "".join(p.read_text() for p in (run_dir / "logs").rglob("*.out"))
    assert "training done at step 12" in logs and "assembled 12 samples" in logs
    status = subprocess.run([sys.executable, "launch.py", "status", str(run_dir)], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert status.returncode == 0 and f"{jobs['train']}=COMPLETED" in status.stdout
    assert "3/3 shards complete" in status.stdout and "samples_12x8x8x3.npz" in status.stdout
    assert RunDir(run_dir).undeclared() == []  # every file of the run is one ddpm/rundir.py declares


def test_failed_array_task_rerun_alone(pipeline, images, tmp_path):
    """Shard 1 fails (its output path is blocked); assembly names it; the task re-run alone completes."""
    run_dir = pipeline
    shards = run_dir / "samples" / "shards"
    for k in range(3):  # a fresh sampling round with other settings
        for suffix in (".npz", ".json"):
            (shards / f"shard_{k}{suffix}").unlink()
    (shards / "shard_1.npz").mkdir()  # blocks the final rename of shard 1
    proc = launch(f"data.path={images}", f"run.root={run_dir.parent}", ONE_THREAD, "--stage", "sample")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = jobs_of(run_dir)
    assert wait_for_job(jobs["sample_tasks"][0], timeout=300) == "COMPLETED"
    assert wait_for_job(jobs["sample_tasks"][2], timeout=300) == "COMPLETED"
    assert wait_for_job(jobs["sample_tasks"][1], timeout=300) == "FAILED"
    # its afterok can never be satisfied: SLURM cancels it (--kill-on-invalid-dep), nothing waits forever
    assert wait_for_job(jobs["assemble"], timeout=60) == "CANCELLED"

    (shards / "shard_1.npz").rmdir()
    asm = subprocess.run([sys.executable, "-m", "ddpm.assemble", str(run_dir)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert asm.returncode == 2 and len(asm.stderr.strip().splitlines()) == 1
    assert "shard 1 of 3 missing" in asm.stderr

    rerun = sbatch("--array=1", "--partition=debug", "--cpus-per-task=1", "--mem=1G", f"--output={tmp_path}/%A_%a.out",
                   f"--export=ALL,OMP_NUM_THREADS=1,PATH={Path(sys.executable).parent}:{os.environ['PATH']}",
                   str(template_without_gres(tmp_path, "sample_array.sbatch")),
                   str(run_dir), cwd=ROOT)
    assert wait_for_job(rerun, timeout=300, release=True) == "COMPLETED"
    asm = subprocess.run([sys.executable, "-m", "ddpm.assemble", str(run_dir)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert asm.returncode == 0, asm.stderr
    assert np.load(run_dir / "samples" / "samples_12x8x8x3.npz")["arr_0"].shape == (12, 8, 8, 3)


@pytest.mark.parametrize("override, message", [
    ("slurm.partition=nosuch",
     "slurm.partition: partition 'nosuch' does not exist (available: cancel, debug, nopreempt, urgent)"),
    ("data.path=/nonexistent/celeba", "data.path: /nonexistent/celeba does not exist"),
    ("training.lerning_rate=1", "training.lerning_rate: unknown key (did you mean training.learning_rate?)"),
    ("slurm.cpus_per_task=512", "slurm.cpus_per_task: 512 CPUs requested, nodes of partition debug have"),
])
def test_preflight_stops_before_queueing(slurm_cluster, images, tmp_path, override, message):
    before = next_job_id()
    proc = launch(f"data.path={images}", f"run.root={tmp_path}", override)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert next_job_id() == before  # nothing was queued

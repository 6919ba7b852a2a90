"""On the local SLURM (no GPUs): a training job whose config asks for a GPU the job does not have ends FAILED,
not requeued, with the one line in its log and in ``launch.py status``; the dry run prints the disk plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, TINY_CONFIG
from slurm_helpers import restarts, sbatch, template_without_gres, wait_for_job

pytestmark = pytest.mark.slurm


def test_a_job_without_the_gpu_it_asks_for_fails_with_one_line(slurm_cluster, images, tmp_path):
    """The sbatch route with no --gres (a user who forgot it): the trainer stops before any work."""
    job = sbatch("--partition=debug", "--cpus-per-task=1", "--mem=1G", f"--output={tmp_path}/job-%j.out",
                 f"--export=ALL,PATH={Path(sys.executable).parent}:{os.environ['PATH']}",
                 str(template_without_gres(tmp_path, "train.sbatch")), str(TINY_CONFIG), f"data.path={images}",
                 f"run.root={tmp_path}", "infrastructure.num_gpus=1", cwd=ROOT)
    assert wait_for_job(job, timeout=180) == "FAILED"
    run_dir = tmp_path / "tiny"
    text = (run_dir / "logs" / f"train-{job}-0.out").read_text()
    errors = [ln for ln in text.splitlines() if ln.startswith("error: ")]
    assert errors and errors[0].startswith("error: infrastructure.num_gpus: training (1 local rank(s), one GPU "
                                           "each) asks for 1 GPU(s), this process sees 0"), text[-3000:]
    assert "job gres: none (the job asked for no --gres)" in errors[0]
    assert f"error: training failed: {errors[0].removeprefix('error: ')}" in errors, text[-3000:]
    assert restarts(job) == 0 and "requeuing" not in text  # fix and resubmit: never requeued
    assert not (run_dir / "checkpoints").exists()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["error"] == errors[0].removeprefix("error: ")
    shown = subprocess.run([sys.executable, "launch.py", "status", str(run_dir)], capture_output=True, text=True,
                           cwd=ROOT, timeout=60).stdout
    assert f"  error: {status['error']}" in shown, shown


def test_dry_run_prints_the_disk_plan(slurm_cluster, tmp_path):
    proc = subprocess.run([sys.executable, "launch.py", "--config", str(ROOT / "configs" / "ddpm_babel.yaml"),
                           "--dry-run", "slurm.partition=debug", f"run.root={tmp_path}", f"data.path={tmp_path}",
                           "infrastructure.num_gpus=0", "slurm.gres=null", "slurm.cpus_per_task=1", "slurm.mem_gb=1",
                           "training.milestone_every=25000"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "disk: checkpoints 1.16 GiB x 3 kept + 4 milestones = 8.09 GiB; samples" in proc.stdout, proc.stdout

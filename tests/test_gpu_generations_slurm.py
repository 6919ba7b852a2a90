"""Issue 33 on the local SLURM (no GPUs; the card's answers and the faults come from tests/fakes/sitecustomize.py,
carried into the job by ``sbatch --export=ALL``): what a first GPU run meets ends the job as a user needs it to.

- a V100 (sm70) under a build whose arch list starts at sm75: FAILED with the one line, never requeued;
- a ``torch.OutOfMemoryError`` mid-training: FAILED with the fix line, never requeued;
- a run that stalls at the same step three times (its grid hangs; no new checkpoint): the wrapper's watchdog ends
  each attempt, the third stops the requeues with one line naming where, and the job ends FAILED.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from helpers import ROOT, TINY_CONFIG
from slurm_helpers import restarts, sbatch, template_without_gres, wait_for_job
from test_gpu_generations import FAKES, V100

pytestmark = pytest.mark.slurm


def submit(tmp_path: Path, images: Path, fake: dict, *overrides: str) -> str:
    """The sbatch route (slurm/train.sbatch without its --gres) with ``fake`` in the job's environment."""
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(FAKES), os.environ.get("PYTHONPATH", "")) if p),
           "DDPM_FAKE": json.dumps(fake), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # --export=ALL: the job gets the submitting environment
    try:
        return sbatch("--partition=debug", "--cpus-per-task=1", "--mem=1G", f"--output={tmp_path}/job-%j.out",
                      "--export=ALL", str(template_without_gres(tmp_path, "train.sbatch")), str(TINY_CONFIG),
                      f"data.path={images}", f"run.root={tmp_path}", *overrides, cwd=ROOT)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def job_log(tmp_path: Path, job: str) -> str:
    return (tmp_path / "tiny" / "logs" / f"train-{job}-0.out").read_text()


def failed_line(tmp_path: Path, job: str) -> tuple[str, str]:
    """(the trainer's one line, the whole log) of a job that ended FAILED; status.json says failed with it."""
    text = job_log(tmp_path, job)
    errors = [ln.removeprefix("error: ") for ln in text.splitlines() if ln.startswith("error: ")]
    assert errors and f"training failed: {errors[0]}" in errors, text[-3000:]
    status = json.loads((tmp_path / "tiny" / "status.json").read_text())
    assert status["state"] == "failed" and status["error"] == errors[0], status
    assert restarts(job) == 0 and "requeuing" not in text, text[-3000:]  # fix and resubmit: never requeued
    return errors[0], text


def test_a_v100_under_a_cuda13_build_ends_failed(slurm_cluster, images, tmp_path):
    job = submit(tmp_path, images, {"gpu": V100}, "infrastructure.num_gpus=1")
    assert wait_for_job(job, timeout=180) == "FAILED"
    line, _ = failed_line(tmp_path, job)
    assert line.startswith("training (1 local rank(s), one GPU each): the Tesla V100-SXM2-32GB (GPU 0, sm70)"), line
    assert "sm_75" in line and "cu126" in line and "'torch>=2.10,<2.15'" in line


def test_an_out_of_memory_ends_failed_with_its_fix(slurm_cluster, images, tmp_path):
    job = submit(tmp_path, images, {"oom_after_steps": 6}, "training.num_iterations=20", "training.save_every=5")
    assert wait_for_job(job, timeout=180) == "FAILED"
    line, _ = failed_line(tmp_path, job)
    assert line.startswith("out of memory at step 6 (rank 0) on the CPU: batch 8"), line
    assert "lower training.batch_size (now 8)" in line and line.endswith("not requeued")
    assert (tmp_path / "tiny" / "checkpoints" / "step_00000005.pt").is_file()


def test_a_run_that_stalls_at_the_same_step_three_times_stops(slurm_cluster, images, tmp_path):
    job = submit(tmp_path, images, {"grid_hang": True}, "training.num_iterations=20", "training.sample_every=4",
                 "training.save_every=100", "training.watchdog_s=10", "slurm.max_restarts=5")
    assert wait_for_job(job, timeout=420, release=True) == "FAILED"
    text = job_log(tmp_path, job)
    assert text.count("watchdog: no heartbeat from the trainer") == 3 and restarts(job) == 2, text[-4000:]
    assert ("training failed: a crash loop, not requeued: 3 attempts in a row stalled without a new checkpoint "
            "(last: no heartbeat for 10 s after step 4 (training.watchdog_s))") in text, text[-3000:]
    assert not (tmp_path / "tiny" / "checkpoints").exists()

"""Every way a real cluster stops a training job, delivered the way the cluster does it, on the local SLURM.

Loader workers are on in every test (``data.num_workers=1``, two CPUs per task), and each run that can
resume exactly ends bitwise equal (model, EMA, AdamW moments) to an uninterrupted run of the same config:

- preemption by a higher-priority job (SIGTERM + GraceTime), on a PreemptMode=REQUEUE and a CANCEL partition;
- the time limit: a 2-minute ``time_min`` and submitit's ``--signal=USR2@59``, no scancel (``scancel
  --signal=USR2``, the same path, is test_doctor_slurm.py's stop);
- a dead node: slurmd, slurmstepd and every process of the job SIGKILLed, the node DOWN, then back;
- a hung rank (SIGSTOP on rank 1 of 2): the watchdog ends the job within ``training.watchdog_s`` and it is requeued.

Full disks, unreadable checkpoints and a preempted sampling task are in tests/test_faults_storage.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, launch
from slurm_helpers import (
    CLUSTER_SH,
    assert_same_training_state,
    job_pids,
    logged_step,
    preempt,
    restarts,
    show_job,
    wait_for_job,
    wait_for_restart,
    wait_for_state,
    wait_for_step,
)

from ddpm.checkpoint import load_latest

pytestmark = pytest.mark.slurm
N = 300  # steps of the short runs (~15 s on one core); faults land after step 150, the rest resumes
N2 = 200  # steps of the 2-rank runs; faults land after step 110 (step_100 durable)
WORKERS = ["data.num_workers=1", "slurm.cpus_per_task=2", "slurm.setup=[export OMP_NUM_THREADS=1]",
           "training.log_every=10", "training.save_every=100"]


def start_training(images: Path, root: Path, *overrides: str) -> tuple[Path, str, Path]:
    """launch.py --stage train on the local SLURM; (run dir, job id, job log) once the job runs."""
    proc = launch("--stage", "train", "--only", f"data.path={images}", f"run.root={root}", *overrides)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = root / "tiny"
    job = json.loads((run_dir / "jobs.json").read_text())["train"]
    assert wait_for_state(job, {"RUNNING"}, timeout=120) == "RUNNING"
    return run_dir, job, run_dir / "logs" / job / f"{job}_0_log.out"


def finish(job: str, log: Path, timeout: float = 400) -> str:
    """Let the requeued job start at once (no BeginTime wait) and wait until it ends; its log text."""
    state = wait_for_job(job, timeout=timeout, release=True)
    text = log.read_text()
    assert state == "COMPLETED", text[-3000:]
    assert "DataLoader worker" not in text and "Traceback" not in text, text[-3000:]
    return text


@pytest.mark.parametrize("partition", ["debug", "cancel"])
def test_preemption_by_higher_priority_job(slurm_cluster, images, tmp_path, reference, partition):
    """A job of the urgent partition takes the CPUs: SIGTERM to every process, GraceTime, requeue, exact resume."""
    common = [*WORKERS, f"training.num_iterations={N}"]
    ref = reference(*common)
    run_dir, job, log = start_training(images, tmp_path, *common, f"slurm.partition={partition}")
    at = wait_for_step(log, 150)
    preempt()
    wait_for_restart(job, 1)
    stopped = load_latest(run_dir)[1]["step"]
    assert at <= stopped < N
    text = finish(job, log)
    assert "received SIGTERM" in text and f"step_{stopped:08d}.pt in" in text and "stop: checkpoint durable" in text
    assert f"resumed from {run_dir}/checkpoints/step_{stopped:08d}.pt" in text
    assert restarts(job) == 1  # requeued exactly once, by SLURM or by the wrapper, never both
    if partition == "cancel":  # SLURM would cancel it at the end of the grace time: the wrapper requeued it first
        assert f"requeuing job {job} (restart 1/3)" in text
    assert_same_training_state(ref.state(), load_latest(run_dir)[1])


def steps_lasting(seconds: float, make_trainer, run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """The number of WORKERS' training steps (one torch thread, as in the job) that take about ``seconds`` on
    this machine, rounded up to a multiple of 100, from the fastest of three runs of 30 timed steps in this process
    (a busy moment during one of them makes the job longer, never shorter)."""
    import torch

    threads = torch.get_num_threads()
    with monkeypatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")
        trainer = make_trainer(run_dir, *WORKERS)
    try:
        for _ in range(10):  # warm-up: the worker's start, the first allocations
            trainer.train_step(*trainer.next_batch())
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(30):
                trainer.train_step(*trainer.next_batch())
            times.append((time.perf_counter() - t0) / 30)
        per_step = min(times)
    finally:
        trainer.close()
        torch.set_num_threads(threads)
    return 100 * -(-int(seconds / per_step) // 100)


def test_time_limit_signal(slurm_cluster, images, tmp_path, reference, make_trainer, monkeypatch):
    """A 2-minute limit: SLURM sends USR2 59 s (up to 60 s more) before it; save, requeue, resume, repeat."""
    # slurmctld checks the limits every 30 s and signals a job once it is within signal_delay_s + 30 s of its end:
    # USR2 at 31-61 s after the start (59 s: the most a 2-minute limit allows, slurm.signal_delay_s + 60 s <
    # time_min). 65 s of training at this machine's uncontended rate (more where the reference shares the CPUs),
    # plus ~5-10 s of start-up, outlast the latest possible first signal on a fast machine as on a slow one:
    # a fixed 1,800 steps ended in 51 s, before any signal, on a fast one
    n = min(8000, steps_lasting(65, make_trainer, tmp_path / "calibration", monkeypatch))
    print(f"time limit: {n} steps")
    common = [*WORKERS, f"training.num_iterations={n}"]
    ref = reference(*common)
    run_dir, job, log = start_training(images, tmp_path, *common, "slurm.time_min=2", "slurm.signal_delay_s=59",
                                       "slurm.max_restarts=8")  # a stop every 31-61 s: 2-3 attempts
    text = finish(job, log, timeout=900)
    assert "received SIGUSR2" in text and "SLURM ends this job in" in text
    assert restarts(job) >= 1 and "TIMEOUT" not in show_job(job)["JobState"]
    # requeued by the wrapper on the signal (``scancel --signal=USR2`` takes the same path: test_doctor_slurm.py)
    assert f"requeuing job {job} (restart 1/8)" in text
    restarts_seen = [s["slurm"].get("SLURM_RESTART_COUNT", "0") for s in
                     json.loads((run_dir / "provenance.json").read_text())["starts"]]
    assert restarts_seen == [str(k) for k in range(restarts(job) + 1)]
    assert_same_training_state(ref.state(), load_latest(run_dir)[1])


def test_dead_node(slurm_cluster, images, tmp_path, reference):
    """The node dies (slurmd, slurmstepd and the job's processes SIGKILLed; nothing can save), is set DOWN
    and comes back: SLURM requeues the job (NODE_FAIL) and it resumes from the last durable checkpoint."""
    common = [*WORKERS, f"training.num_iterations={N}"]
    ref = reference(*common)
    run_dir, job, log = start_training(images, tmp_path, *common)
    wait_for_step(log, 150)
    node = slurm_cluster.node
    daemons = subprocess.run(["pgrep", "-x", "slurmd|slurmstepd"], capture_output=True, text=True).stdout.split()
    for pid in [*map(int, daemons), *job_pids(job)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    killed_at = logged_step(log)
    durable = load_latest(run_dir)[1]["step"]
    try:
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=DOWN", "Reason=dead-node-test"], check=True)
        wait_for_restart(job, 1, timeout=60)
    finally:  # the node comes back
        subprocess.run(["bash", str(CLUSTER_SH), "start"], check=True, capture_output=True, timeout=240)
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], capture_output=True)
    text = finish(job, log)
    assert f"resumed from {run_dir}/checkpoints/step_{durable:08d}.pt" in text
    print(f"dead node: killed at step >= {killed_at}, resumed from {durable}: {killed_at - durable}+ steps lost")
    assert_same_training_state(ref.state(), load_latest(run_dir)[1])


def test_hung_rank_watchdog(slurm_cluster, images, tmp_path, reference):
    """Rank 1 of 2 is SIGSTOPped: no heartbeat -> the wrapper kills the ranks within training.watchdog_s,
    marks the run stalled, requeues it, and it resumes from the last checkpoint."""
    bound = 10  # heartbeats every 5 s while training
    common = [*WORKERS, f"training.num_iterations={N2}", "infrastructure.nproc_per_node=2"]
    ref = reference(*common)  # the watchdog is the wrapper's: the abort tests' reference trains the same
    run_dir, job, log = start_training(images, tmp_path, *common, f"training.watchdog_s={bound}")
    wait_for_step(log, 110)
    assert restarts(job) == 0, log.read_text()[-3000:]
    rank1 = [p for p in job_pids(job) if b"RANK=1\0" in Path(f"/proc/{p}/environ").read_bytes()
             and b"torch.distributed.run" in Path(f"/proc/{_ppid(p)}/cmdline").read_bytes()]
    assert len(rank1) == 1, rank1
    os.kill(rank1[0], signal.SIGSTOP)
    t0 = time.monotonic()
    wait_for_restart(job, 1, timeout=bound + 60)
    ended_after = time.monotonic() - t0
    assert ended_after < bound + 30, f"the hung job held its allocation {ended_after:.0f} s"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stalled"
    shown = subprocess.run([sys.executable, "launch.py", "status", str(run_dir)], capture_output=True, text=True,
                           cwd=ROOT, timeout=60).stdout
    assert "training: stalled" in shown
    text = finish(job, log)
    assert text.count("watchdog: no heartbeat from the trainer") == 1 and "resumed from" in text
    print(f"hung rank: job ended {ended_after:.1f} s after SIGSTOP (training.watchdog_s={bound})")
    assert_same_training_state(ref.state(), load_latest(run_dir)[1])


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_plain_scancel_is_not_undone(slurm_cluster, images, tmp_path):
    """``scancel JOB`` is the user's decision: the trainer saves on its SIGTERM, the job is not requeued, and
    ``launch.py status`` prints the command that resumes it."""
    run_dir, job, log = start_training(images, tmp_path, *WORKERS, f"training.num_iterations={N}")
    wait_for_step(log, 50)
    subprocess.run(["scancel", job], check=True)
    assert wait_for_job(job, timeout=60) == "CANCELLED"
    deadline = time.monotonic() + 10
    while "not requeuing job" not in log.read_text() and time.monotonic() < deadline:  # the wrapper's last lines
        time.sleep(0.1)
    assert restarts(job) == 0 and "not requeuing job" in log.read_text()
    assert load_latest(run_dir)[1]["step"] >= 50  # saved at the stop
    shown = subprocess.run([sys.executable, "launch.py", "status", str(run_dir)], capture_output=True, text=True,
                           cwd=ROOT, timeout=60).stdout
    assert f"resume: python launch.py --config {run_dir}/config.yaml" in shown, shown


def _ranks(job: str) -> list[int]:
    """The trainer ranks of a job: children of torchrun's agent with a RANK in their environment."""
    return [p for p in job_pids(job) if b"\0RANK=" in b"\0" + Path(f"/proc/{p}/environ").read_bytes()
            and b"torch.distributed.run" in Path(f"/proc/{_ppid(p)}/cmdline").read_bytes()]


def _abort(pids: list[int]) -> None:
    """What NCCL's watchdog does to every rank when a collective fails: SIGABRT, nothing written."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGABRT)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("when", ["mid-training", "start-up"])
def test_ranks_aborted_are_requeued_by_the_wrapper(slurm_cluster, images, tmp_path, reference, when):
    """Both ranks of a 2-process job abort (SIGABRT) with status.json still ``running`` (mid-training) or
    ``starting`` (before the first step: imports, rendezvous, DDP construction): the wrapper takes torchrun's
    non-zero exit as a lost rank, requeues the job, and it resumes from the last durable checkpoint (or step 0)
    to the same weights as an uninterrupted run."""
    common = [*WORKERS, f"training.num_iterations={N2}", "infrastructure.nproc_per_node=2"]
    ref = reference(*common)
    run_dir, job, log = start_training(images, tmp_path, *common)
    if when == "mid-training":
        wait_for_step(log, 110)
    deadline = time.monotonic() + 120
    while len(ranks := _ranks(job)) < 2 or (when == "start-up" and
                                             json.loads((run_dir / "status.json").read_text())["state"] != "starting"):
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    state = json.loads((run_dir / "status.json").read_text())["state"]
    _abort(ranks)
    assert state == {"mid-training": "running", "start-up": "starting"}[when]
    wait_for_restart(job, 1, timeout=120)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] in ("lost", "starting"), status  # "starting": the requeued attempt began
    assert wait_for_job(job, timeout=400, release=True) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()  # torchrun's own ChildFailedError traceback is in it: not finish()'s check
    assert f"torchrun exited with 1 while the trainer was {state}" in text, text[-3000:]
    assert f"requeuing job {job} (restart 1/3)" in text and restarts(job) == 1
    assert ("resumed from" in text) == (when == "mid-training")
    assert_same_training_state(ref.state(), load_latest(run_dir)[1])

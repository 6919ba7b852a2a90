"""Every way a real cluster stops a training job, delivered the way the cluster does it, on the local SLURM.

Loader workers are on in every test (``data.num_workers=1``, two CPUs per task), and each run that can
resume exactly ends bitwise equal (model, EMA, AdamW moments) to an uninterrupted run of the same config:

- preemption by a higher-priority job (SIGTERM + GraceTime), on a PreemptMode=REQUEUE and a CANCEL partition;
- the time limit: a 2-minute ``time_min`` and submitit's ``--signal=USR2@59``, no scancel (``scancel
  --signal=USR2``, the same path, is test_doctor_slurm.py's stop);
- a dead node: slurmd, slurmstepd and every process of the job SIGKILLed, the node DOWN, then back;
- a hung rank (SIGSTOP on rank 1 of 2): the watchdog ends the job within ``training.watchdog_s`` and it is requeued.

Full disks, unreadable checkpoints and a preempted sampling task are in tests/test_faults_storage.py.

Every wait is for an event (a step in the log, a requeue, the job's end) and bounded by this machine's measured
pace (tests/slurm_runs.py); a run whose fault lands after a step it waited for is long enough that it cannot end
before the fault reaches it (``Pace.run_length``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT
from slurm_helpers import (
    CLUSTER_SH,
    assert_same_training_state,
    preempt,
    restarts,
    resume_node,
    scancel,
    show_job,
    wait_for_job,
    wait_for_restart,
)
from slurm_runs import (
    CLUSTER_S,
    GRACE_S,
    Pace,
    finish,
    job_pids,
    logged_step,
    rank_pids,
    start_training,
    wait_for_step,
)
from slurm_runs import WORKERS as RUN_WORKERS

from ddpm.checkpoint import load_latest
from ddpm.rundir import RunDir

pytestmark = pytest.mark.slurm
N2 = 200  # steps of the 2-rank runs; faults land after step 110 (step_100 durable) on ranks that cannot go on
WORKERS = [*RUN_WORKERS, "training.log_every=10", "training.save_every=100"]


@pytest.fixture(scope="module")
def n(pace: Pace) -> int:
    """Steps of the short runs (300: ~10-15 s on one core): faults land after step 150, the rest resumes."""
    return pace.run_length(150, at_least=300)


@pytest.mark.parametrize("partition", ["cancel"])
def test_preemption_by_higher_priority_job(slurm_cluster, images, tmp_path, reference, pace, n, partition):
    """A job of the urgent partition takes the CPUs: SIGTERM to every process, GraceTime, requeue, exact resume.
    PreemptMode=CANCEL here (SLURM would cancel it: the wrapper requeues it first); PreemptMode=REQUEUE (partition
    debug) is the sweep's array task in test_sweep_slurm.py, and a two-node job's in test_multinode_slurm.py."""
    common = [*WORKERS, f"training.num_iterations={n}"]
    ref = reference(*common)
    run_dir, job, log = start_training(images, tmp_path, pace, *common, f"slurm.partition={partition}")
    at = wait_for_step(log, 150, timeout=pace.bound(steps=150), job=job)
    preempt()
    wait_for_restart(job, 1, timeout=GRACE_S + pace.bound(steps=10, starts=0))
    stopped = load_latest(RunDir(run_dir))[1]["step"]
    assert at <= stopped < n
    text = finish(job, log, timeout=pace.bound(steps=n))
    assert "received SIGTERM" in text and f"step_{stopped:08d}.pt in" in text and "stop: checkpoint durable" in text
    assert f"resumed from {run_dir}/checkpoints/step_{stopped:08d}.pt" in text
    assert restarts(job) == 1  # requeued exactly once, by SLURM or by the wrapper, never both
    if partition == "cancel":  # SLURM would cancel it at the end of the grace time: the wrapper requeued it first
        assert f"requeuing job {job} (restart 1/3)" in text
    assert_same_training_state(ref.state(), load_latest(RunDir(run_dir))[1])


def test_time_limit_signal(slurm_cluster, images, tmp_path, reference, pace):
    """A 2-minute limit: SLURM sends USR2 59 s (up to 60 s more) before it; save, requeue, resume, repeat."""
    # slurmctld checks the limits every 30 s and signals a job once it is within signal_delay_s + 30 s of its end:
    # USR2 at 31-61 s after the start (59 s: the most a 2-minute limit allows, slurm.signal_delay_s + 60 s <
    # time_min). 65 s of training at this machine's fastest measured rate (more where the reference shares the
    # CPUs), plus the start-up, outlast the latest possible first signal on a fast machine as on a slow one:
    # a fixed 1,800 steps ended in 51 s, before any signal, on a fast one
    n = min(8000, pace.steps_lasting(65))
    print(f"time limit: {n} steps")
    common = [*WORKERS, f"training.num_iterations={n}"]
    ref = reference(*common)
    restarts_max = 8  # a stop every 31-61 s: 2-3 attempts
    run_dir, job, log = start_training(images, tmp_path, pace, *common, "slurm.time_min=2", "slurm.signal_delay_s=59",
                                       f"slurm.max_restarts={restarts_max}")
    text = finish(job, log, timeout=pace.bound(steps=n, starts=restarts_max + 1))
    assert "received SIGUSR2" in text and "SLURM ends this job in" in text
    assert restarts(job) >= 1 and "TIMEOUT" not in show_job(job)["JobState"]
    # requeued by the wrapper on the signal (``scancel --signal=USR2`` takes the same path: test_doctor_slurm.py)
    assert f"requeuing job {job} (restart 1/{restarts_max})" in text
    restarts_seen = [s["slurm"].get("SLURM_RESTART_COUNT", "0") for s in
                     json.loads((run_dir / "provenance.json").read_text())["starts"]]
    assert restarts_seen == [str(k) for k in range(restarts(job) + 1)]
    assert_same_training_state(ref.state(), load_latest(RunDir(run_dir))[1])


def test_dead_node(slurm_cluster, images, tmp_path, reference, pace, n):
    """The node dies (slurmd, slurmstepd and the job's processes SIGKILLed; nothing can save), is set DOWN
    and comes back: SLURM requeues the job (NODE_FAIL) and it resumes from the last durable checkpoint."""
    common = [*WORKERS, f"training.num_iterations={n}"]
    ref = reference(*common)
    run_dir, job, log = start_training(images, tmp_path, pace, *common)
    wait_for_step(log, 150, timeout=pace.bound(steps=150), job=job)
    node = slurm_cluster.node
    daemons = subprocess.run(["pgrep", "-x", "slurmd|slurmstepd"], capture_output=True, text=True).stdout.split()
    for pid in [*map(int, daemons), *job_pids(job)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # exited since it was listed
            pass
    killed_at = logged_step(log)
    durable = load_latest(RunDir(run_dir))[1]["step"]
    try:
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=DOWN", "Reason=dead-node-test"], check=True)
        wait_for_restart(job, 1, timeout=CLUSTER_S)  # slurmctld requeues the node's job when it is set DOWN
    finally:  # the node comes back (cluster.sh start may have resumed it already: resume_node goes on)
        subprocess.run(["bash", str(CLUSTER_SH), "start"], check=True, capture_output=True, timeout=240)
        resume_node(node, timeout=CLUSTER_S)
    text = finish(job, log, timeout=pace.bound(steps=n))
    assert f"resumed from {run_dir}/checkpoints/step_{durable:08d}.pt" in text
    print(f"dead node: killed at step >= {killed_at}, resumed from {durable}: {killed_at - durable}+ steps lost")
    assert_same_training_state(ref.state(), load_latest(RunDir(run_dir))[1])


def test_hung_rank_watchdog(slurm_cluster, images, tmp_path, reference, pace):
    """Rank 1 of 2 is SIGSTOPped: no heartbeat -> the wrapper kills the ranks within training.watchdog_s,
    marks the run stalled, requeues it, and it resumes from the last checkpoint."""
    bound = 10  # heartbeats every 5 s while training
    common = [*WORKERS, f"training.num_iterations={N2}", "infrastructure.nproc_per_node=2"]
    ref = reference(*common)  # the watchdog is the wrapper's: the abort tests' reference trains the same
    run_dir, job, log = start_training(images, tmp_path, pace, *common, f"training.watchdog_s={bound}")
    wait_for_step(log, 110, timeout=pace.bound(steps=110, ranks=2), job=job)
    assert restarts(job) == 0, log.read_text()[-3000:]
    ranks = rank_pids(job)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGSTOP)
    t0 = time.monotonic()
    wait_for_restart(job, 1, timeout=bound + pace.bound())
    ended_after = time.monotonic() - t0
    # what the wrapper left for `launch.py status`, read before the requeued job starts and rewrites it: held (it
    # waits out its BeginTime, 11 s, for ms more) until the checks are done
    subprocess.run(["scontrol", "hold", job], check=True)
    try:
        assert ended_after < bound + 30, f"the hung job held its allocation {ended_after:.0f} s"
        status = json.loads((run_dir / "status.json").read_text())
        assert status["state"] == "stalled"
        shown = subprocess.run([sys.executable, "launch.py", "status", str(run_dir)], capture_output=True, text=True,
                               cwd=ROOT, timeout=60).stdout
        assert "training: stalled" in shown
    finally:
        subprocess.run(["scontrol", "release", job], check=True)
    text = finish(job, log, timeout=pace.bound(steps=N2, ranks=2))
    assert text.count("watchdog: no heartbeat from the trainer") == 1 and "resumed from" in text
    print(f"hung rank: job ended {ended_after:.1f} s after SIGSTOP (training.watchdog_s={bound})")
    assert_same_training_state(ref.state(), load_latest(RunDir(run_dir))[1])


def test_plain_scancel_is_not_undone(slurm_cluster, images, tmp_path, pace, n):
    """``scancel JOB`` is the user's decision: the trainer saves on its SIGTERM, the job is not requeued, and
    ``launch.py status`` prints the command that resumes it."""
    run_dir, job, log = start_training(images, tmp_path, pace, *WORKERS, f"training.num_iterations={n}")
    wait_for_step(log, 50, timeout=pace.bound(steps=50), job=job)
    scancel(job)
    assert wait_for_job(job, timeout=pace.bound(steps=10, starts=0)) == "CANCELLED"
    deadline = time.monotonic() + pace.bound(starts=0)
    while "not requeuing job" not in log.read_text() and time.monotonic() < deadline:  # the wrapper's last lines
        time.sleep(0.1)
    assert restarts(job) == 0 and "not requeuing job" in log.read_text()
    assert load_latest(RunDir(run_dir))[1]["step"] >= 50  # saved at the stop
    shown = subprocess.run([sys.executable, "launch.py", "status", str(run_dir)], capture_output=True, text=True,
                           cwd=ROOT, timeout=60).stdout
    assert f"resume: python launch.py --config {run_dir}/config.yaml" in shown, shown


def _signal(pids: list[int], signum: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("when", ["mid-training", "start-up"])
def test_ranks_aborted_are_requeued_by_the_wrapper(slurm_cluster, images, tmp_path, reference, pace, when):
    """Both ranks of a 2-process job abort (SIGABRT, what NCCL's watchdog does when a collective fails: nothing
    written) with status.json still ``running`` (mid-training) or ``starting`` (before the first step: imports,
    rendezvous, DDP construction): the wrapper takes torchrun's non-zero exit as a lost rank, requeues the job,
    and it resumes from the last durable checkpoint (or step 0) to the same weights as an uninterrupted run."""
    common = [*WORKERS, f"training.num_iterations={N2}", "infrastructure.nproc_per_node=2"]
    ref = reference(*common)
    run_dir, job, log = start_training(images, tmp_path, pace, *common)
    if when == "mid-training":
        wait_for_step(log, 110, timeout=pace.bound(steps=110, ranks=2), job=job)
    deadline = time.monotonic() + pace.bound()
    while len(ranks := list(rank_pids(job).values())) < 2:  # both ranks up: seconds before their first step
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    # stopped first, so that the state read is the one they die in (a rank could take its first step between a
    # read and the abort); a stopped process dies of SIGABRT once continued (or at once without a handler)
    _signal(ranks, signal.SIGSTOP)
    state = json.loads((run_dir / "status.json").read_text())["state"]
    _signal(ranks, signal.SIGABRT)
    _signal(ranks, signal.SIGCONT)
    assert state == {"mid-training": "running", "start-up": "starting"}[when], log.read_text()[-3000:]
    wait_for_restart(job, 1, timeout=pace.bound())
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] in ("lost", "starting"), status  # "starting": the requeued attempt began
    assert wait_for_job(job, timeout=pace.bound(steps=N2, ranks=2), release=True) == "COMPLETED", \
        log.read_text()[-3000:]
    text = log.read_text()  # torchrun's own ChildFailedError traceback is in it: not finish()'s check
    assert f"torchrun exited with 1 while the trainer was {state}" in text, text[-3000:]
    assert f"requeuing job {job} (restart 1/3)" in text and restarts(job) == 1
    assert ("resumed from" in text) == (when == "mid-training")
    assert_same_training_state(ref.state(), load_latest(RunDir(run_dir))[1])

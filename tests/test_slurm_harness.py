"""The SLURM test harness acts on what it read a moment before: each helper that reads a job's (or node's) state and
then acts on it goes on when that state has changed in between, on the real local SLURM.

Each test reads first, then makes the change happen itself (a job released, started, requeued again, cancelled,
ended; a node resumed; a log that appears late), then calls the helper's act on the stale read: what a slow machine
does to these windows by chance, done deterministically. The jobs are ``sleep`` scripts: seconds each.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from slurm_helpers import (
    CLUSTER_SH,
    SlurmError,
    held,
    in_service,
    job_state,
    next_job_id,
    node_state,
    release_held,
    release_requeued,
    request_resume,
    resume_node,
    sbatch,
    scancel,
    show_job,
    unfinished_since,
    wait_for_file,
    wait_for_job,
    wait_for_restart,
    wait_for_state,
)
from slurm_runs import parent_pid, proc_bytes, rank_pids, wait_for_step

# a job that runs until it is requeued, ``runs - 1`` times, then ends at once; each run appends its restart count
_REQUEUED = """#!/bin/bash
echo "${{SLURM_RESTART_COUNT:-0}}" >> {runs}
[ "${{SLURM_RESTART_COUNT:-0}}" -ge {last} ] && exit 0
for i in $(seq 1 600); do sleep 0.1; done
exit 1
"""


def _requeue_until_held(job: str, count: int) -> dict[str, str]:
    """``scontrol requeue`` the running job (its ``count``-th requeue) and read it while SLURM holds it (11 s)."""
    subprocess.run(["scontrol", "requeue", job], check=True)
    deadline = time.monotonic() + 11
    while not held(rec := show_job(job)) or int(rec["Restarts"]) < count:
        assert time.monotonic() < deadline, f"job {job} never held after its requeue: {rec}"
        time.sleep(0.1)
    return rec


def _held_job(tmp_path: Path, runs: int) -> tuple[str, dict[str, str], Path]:
    """A --requeue job of ``runs`` runs, requeued once and read while held: (its id, that record, its runs log)."""
    log, script = tmp_path / "runs.log", tmp_path / "requeued.sh"
    script.write_text(_REQUEUED.format(runs=log, last=runs - 1))
    job = sbatch("--requeue", f"--chdir={tmp_path}", "--output=/dev/null", "--mem=100M", str(script))
    wait_for_file(log, timeout=60)
    return job, _requeue_until_held(job, 1), log


def _runs(log: Path, count: int, timeout: float = 30) -> list[str]:
    """The runs log once ``count`` runs have started."""
    deadline = time.monotonic() + timeout
    while len(lines := log.read_text().split()) < count:
        assert time.monotonic() < deadline, f"{count} runs expected, got {lines}"
        time.sleep(0.1)
    return lines


def test_release_of_a_job_that_started_first(slurm_cluster, tmp_path):
    """Read held; someone else releases the job and it starts: releasing from the stale read is refused by slurmctld
    ("Job is no longer pending execution": the failure of issue 36) and goes on. Requeued again after the read, it
    is released from the new requeue (not 2 s after the first: its credential would be revoked, the job FAILED)."""
    job, stale, log = _held_job(tmp_path, runs=3)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+2"], check=True)  # not the helper
    assert wait_for_state(job, {"RUNNING"}, timeout=30) == "RUNNING"
    assert _runs(log, 2) == ["0", "1"]
    assert release_held(stale) is False
    assert release_requeued(job) is False and job_state(job) == "RUNNING"  # a fresh read: nothing to release
    _requeue_until_held(job, 2)
    release_held(stale)  # the first requeue's record: True (released 2-3 s from now) or False (its BeginTime is due)
    assert wait_for_job(job, timeout=60, release=True) == "COMPLETED"
    assert log.read_text().split() == ["0", "1", "2"]
    # requeued, then ended: requeued (one read, whatever the job did since), and a count it never reached fails fast
    assert wait_for_restart(job, 2, timeout=5)["JobState"] == "COMPLETED"
    t0 = time.monotonic()
    with pytest.raises(SlurmError, match="not requeued 3x: COMPLETED"):
        wait_for_restart(job, 3, timeout=60)
    assert time.monotonic() - t0 < 5


def test_release_of_a_job_that_ended_first(slurm_cluster, tmp_path):
    """Read held; the job is cancelled ("Job has already finished"), or was never known to slurmctld (purged after
    MinJobAge: "Invalid job id"): releasing from the stale read goes on, and waiting for it returns its end."""
    job, stale, _ = _held_job(tmp_path, runs=2)
    scancel(job)
    assert wait_for_state(job, {"CANCELLED"}, timeout=30) == "CANCELLED"
    assert release_held(stale) is False
    assert wait_for_job(job, timeout=10, release=True) == "CANCELLED"
    gone = {**stale, "JobId": str(next_job_id() + 100_000)}
    assert release_held(gone) is False and release_requeued(gone["JobId"]) is False


def test_scancel_of_jobs_already_gone(slurm_cluster, tmp_path):
    """Unfinished jobs read; then one ends, and one was never known (purged): the scancel of them all goes on and
    reaches the one still running."""
    first = next_job_id()
    common = [f"--chdir={tmp_path}", "--output=/dev/null", "--mem=100M"]
    running = sbatch(*common, "--wrap=sleep 60")
    ending = sbatch(*common, f"--wrap=while [ ! -e {tmp_path}/go ]; do sleep 0.1; done")
    for job in (running, ending):
        assert wait_for_state(job, {"RUNNING"}, timeout=30) == "RUNNING"
    ids = unfinished_since(first)
    assert ids == [running, ending]
    (tmp_path / "go").touch()
    assert wait_for_job(ending, timeout=30) == "COMPLETED"
    scancel(*ids, str(next_job_id() + 100_000))
    assert wait_for_job(running, timeout=30) == "CANCELLED" and unfinished_since(first) == []


def test_wait_for_step_on_a_late_log_and_an_ended_job(slurm_cluster, tmp_path):
    """The log appears only after the wait began; a job that ends before the step fails the wait at once."""
    late, short = tmp_path / "late.log", tmp_path / "short.log"
    common = [f"--chdir={tmp_path}", "--mem=100M", "--output=/dev/null"]
    job = sbatch(*common, f"--wrap=sleep 2; printf 'step 10/20\\nstep 20/20\\n' > {late}")
    assert not late.exists() and wait_for_step(late, 20, timeout=60, job=job) == 20
    job = sbatch(*common, f"--wrap=printf 'step 10/20\\n' > {short}")
    t0 = time.monotonic()
    with pytest.raises(SlurmError, match=f"job {job} ended COMPLETED at step 10"):
        wait_for_step(short, 20, timeout=120, job=job)
    assert time.monotonic() - t0 < 10


def test_resume_of_a_node_already_back(slurm_cluster):
    """Read out of service (drained: its jobs run on); back in service before the RESUME: slurmctld refuses it,
    the helper goes on."""
    node = slurm_cluster.node
    subprocess.run(["scontrol", "update", f"NodeName={node}", "State=DRAIN", "Reason=harness-test"], check=True)
    try:
        assert not in_service(node_state(node))
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], check=True)  # not the helper
        assert request_resume(node) is False
        assert in_service(resume_node(node, timeout=30))
    finally:
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], capture_output=True)


def test_cluster_daemons_inherit_no_descriptor(tmp_path):
    """A daemon started by cluster.sh keeps none of its starter's open files: munged kept the fd of a ``flock FILE
    pytest`` and held that lock for its whole life."""
    probe = tmp_path / "open"
    script = (f"source {CLUSTER_SH}; exec 7>>{probe}; test -e /proc/$BASHPID/fd/7 || exit 3; "
              "( close_inherited_fds; exec test -e /proc/self/fd/7 )")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # 0: fd 7 reached the exec'd program


def test_processes_that_exit_while_looked_at():
    """A process listed, then gone before its /proc files are read (a job's short-lived helper, a rank that
    died): read as nothing, not an error; a job with no process here has no ranks."""
    proc = subprocess.Popen(["sleep", "0"])
    proc.wait()
    assert proc_bytes(proc.pid, "environ") == b"" and parent_pid(proc.pid) == 0
    assert rank_pids("999999999") == {}


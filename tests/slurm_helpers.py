"""Helpers for tests that run jobs on the local SLURM cluster (tests/slurm/cluster.sh).

Import them from test files with ``from slurm_helpers import ...`` (tests/ is on sys.path in pytest's
default import mode). The fixture itself (``slurm_cluster``) lives in tests/conftest.py.

The test cluster has no accounting (accounting_storage/none), so ``sacct`` fails; everything here asks
``scontrol show job -o`` instead. Finished jobs stay visible to scontrol for MinJobAge=300 s.

A job moves on its own between a read of its state and an act on it: a requeued job starts when its BeginTime
comes, a job ends, a node comes back. Every helper that acts on a read (``release_held``, ``scancel``,
``request_resume``) takes what slurmctld answers for a state that has moved on as that state, reads again and
goes on; waits take one read per poll (tests/test_slurm_harness.py makes each change happen in between). The
measured pace that bounds the waits of training runs is in tests/slurm_runs.py.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from helpers import TINY_CONFIG

REPO_ROOT = Path(__file__).resolve().parent.parent
CLUSTER_SH = REPO_ROOT / "tests" / "slurm" / "cluster.sh"
PARTITION = "debug"

# JobState values after which a job never runs again on its own
TERMINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                             "DEADLINE", "OUT_OF_MEMORY", "SPECIAL_EXIT", "REVOKED"})


class SlurmError(RuntimeError):
    pass


@dataclass(frozen=True)
class SlurmCluster:
    """What the ``slurm_cluster`` fixture yields."""

    partition: str
    node: str
    cpus: int
    real_memory_mb: int
    conf: str = "/etc/slurm/slurm.conf"


def _run(args: list[str], timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise SlurmError(f"{' '.join(args)} failed (rc={proc.returncode}): {proc.stderr.strip()}")
    return proc


def parse_scontrol_line(line: str) -> dict[str, str]:
    """``Key=Value Key2=Value2 ...`` (one line of ``scontrol show ... -o``) -> dict.

    Values may contain spaces only for a few keys at the end of the line (e.g. Command=, WorkDir=), which
    we do not rely on; a token without '=' is appended to the previous value.
    """
    out: dict[str, str] = {}
    last = None
    for tok in line.split():
        key, sep, val = tok.partition("=")
        if sep and key and (key[0].isalpha()):
            out[key] = val
            last = key
        elif last is not None:
            out[last] += " " + tok
    return out


def show_jobs(job_id: str | int | None = None) -> list[dict[str, str]]:
    """Records of ``scontrol show job -o [job_id]`` (an array job id gives one record per task/range).

    Returns [] when the job is unknown (never existed, or purged MinJobAge after it ended).
    """
    args = ["scontrol", "show", "job", "-o"] + ([str(job_id)] if job_id is not None else [])
    proc = _run(args, check=False)
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return []
        raise SlurmError(f"{' '.join(args)} failed: {proc.stderr.strip()}")
    return [parse_scontrol_line(ln) for ln in proc.stdout.splitlines() if ln.startswith("JobId=")]


def show_job(job_id: str | int) -> dict[str, str]:
    """The single record of a (non-array) job, or of one array task given as ``<array>_<task>``."""
    recs = show_jobs(job_id)
    if not recs:
        raise SlurmError(f"job {job_id} not known to slurmctld (never submitted, or purged after MinJobAge)")
    if len(recs) > 1:
        raise SlurmError(f"job {job_id} has {len(recs)} records (an array? use array_states)")
    return recs[0]


def job_state(job_id: str | int) -> str:
    return show_job(job_id)["JobState"]


def array_states(job_id: str | int) -> dict[str, str]:
    """``{task_id: JobState}`` for an array job (pending ranges such as ``1-2`` stay one key)."""
    return {r.get("ArrayTaskId", r["JobId"]): r["JobState"] for r in show_jobs(job_id)}


def sbatch(*args: str, cwd: str | Path | None = None) -> str:
    """Run ``sbatch --parsable ARGS`` and return the job id."""
    proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=30, cwd=cwd)
    if proc.returncode != 0:
        raise SlurmError(f"sbatch {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def held(rec: dict[str, str]) -> bool:
    """A requeued job waiting out its BeginTime delay (PENDING, Reason=BeginTime)."""
    return rec.get("JobState") == "PENDING" and rec.get("Reason") == "BeginTime"


def release_held(rec: dict[str, str], min_gap_s: float = 2.0, attempts: int = 3) -> bool:
    """Start the requeued job of ``rec`` (a record read before) ``min_gap_s`` from now instead of after the
    requeue delay; True when this call moved its start earlier.

    A requeued job (``scontrol requeue``, or a preempted/failed --requeue job) waits PENDING with
    Reason=BeginTime for cred_expire+1 s (121 s by default, 11 s on the test cluster). That delay is
    there for a reason: slurmd revokes the job's credential when the old run is killed, and refuses a
    new launch whose credential is from the same second or earlier ("Killing non-startable batch
    JobId=N: Job credential revoked" in slurmctld.log -> the job ends FAILED). Releasing it ``min_gap_s``
    (rounded up to a second) after this call is after that kill whatever happened since ``rec`` was read,
    a new requeue included; a job already due to start by then is left alone (releasing it again at every poll
    would push its start back each time).

    Between the read and the update the job may have moved on: started on its own (its BeginTime came),
    released by someone else, ended, purged, or requeued again. slurmctld then refuses the update ("Job is no
    longer pending execution", "Job has already finished", "Invalid job id"): the job is read again and, no
    longer held, left as it is; held again (a new requeue), released from the new record.
    """
    job_id = rec["JobId"]
    for _ in range(attempts):
        if not held(rec):
            return False
        start = (datetime.now() + timedelta(seconds=math.ceil(min_gap_s) + 1)).replace(microsecond=0)
        try:
            due = datetime.fromisoformat(rec["StartTime"])
        except (KeyError, ValueError):  # "Unknown": its begin time has passed, the scheduler is about to start it
            return False
        if due <= start:  # due by then already: released before, or its BeginTime comes first
            return False
        update = _run(["scontrol", "update", f"JobId={job_id}", f"StartTime={start.isoformat()}"], check=False)
        if update.returncode == 0:
            return True
        recs = show_jobs(job_id)
        if not recs:  # purged
            return False
        rec = recs[0]
    raise SlurmError(f"scontrol update JobId={job_id} StartTime: {update.stderr.strip()} "
                     f"(the job is still {rec['JobState']}, Reason={rec.get('Reason')})")


def release_requeued(job_id: str | int, min_gap_s: float = 2.0) -> bool:
    """:func:`release_held` on the job's current record; False when it is not held (or no longer known)."""
    recs = show_jobs(job_id)
    return len(recs) == 1 and release_held(recs[0], min_gap_s)


def wait_for_state(job_id: str | int, states: Iterable[str], timeout: float = 30, poll: float = 0.2) -> str:
    """Poll until the job's JobState is one of ``states`` (or terminal); return that state."""
    want = set(states)
    deadline = time.monotonic() + timeout
    state = "?"
    while True:
        state = job_state(job_id)
        if state in want or state in TERMINAL_STATES:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {state} after {timeout}s (wanted {sorted(want)})")
        time.sleep(poll)


def wait_for_job(job_id: str | int, timeout: float = 30, poll: float = 0.2, release: bool = False) -> str:
    """Poll ``scontrol show job -o`` (not sacct: no accounting here) until the job is terminal.

    For an array job id, waits for every task and returns COMPLETED if all completed, else the first
    other terminal state. ``release=True`` also calls :func:`release_held` on the records of requeued jobs.
    Raises TimeoutError (with the last record) when the job is still not terminal after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        recs = show_jobs(job_id)
        if not recs:
            raise SlurmError(f"job {job_id} not known to slurmctld (purged after MinJobAge?)")
        states = [r["JobState"] for r in recs]
        if all(s in TERMINAL_STATES for s in states):
            bad = [s for s in states if s != "COMPLETED"]
            return bad[0] if bad else "COMPLETED"
        if release:
            for r in recs:
                release_held(r)
        if time.monotonic() > deadline:
            summary = "; ".join(f"{r['JobId']} {r['JobState']} Reason={r.get('Reason')}" for r in recs)
            raise TimeoutError(f"job {job_id} not finished after {timeout}s: {summary}")
        time.sleep(poll)


def wait_for_file(path: str | Path, timeout: float = 30, poll: float = 0.1) -> Path:
    path = Path(path)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        time.sleep(poll)
    return path


def next_job_id() -> int:
    """The id slurmctld will give the next job (``scontrol show config`` NEXT_JOB_ID)."""
    for line in _run(["scontrol", "show", "config"]).stdout.splitlines():
        key, _, val = line.partition("=")
        if key.strip() == "NEXT_JOB_ID":
            return int(val.strip())
    raise SlurmError("NEXT_JOB_ID not in `scontrol show config`")


def unfinished_since(first_id: int) -> list[str]:
    """The ids of every unfinished job with id >= first_id (jobs submitted after that point); arrays once."""
    ids = {r.get("ArrayJobId") or r["JobId"] for r in show_jobs()
           if int(r.get("ArrayJobId") or r["JobId"]) >= first_id and r["JobState"] not in TERMINAL_STATES}
    return sorted(ids, key=int)


def scancel(*job_ids: str, args: Iterable[str] = ()) -> None:
    """``scancel [ARGS] JOB...`` (e.g. ``args=["--signal=USR2"]``) for jobs read before: a job that has ended or been
    purged since is not an error (scancel then fails on it, or not, depending on the SLURM version); a job still
    unfinished that scancel could not reach is."""
    if not job_ids:
        return
    proc = _run(["scancel", *args, *job_ids], check=False)
    if proc.returncode == 0:
        return
    live = [j for j in job_ids if any(r["JobState"] not in TERMINAL_STATES | {"COMPLETING"} for r in show_jobs(j))]
    if live:
        raise SlurmError(f"scancel {' '.join([*args, *live])} failed: {proc.stderr.strip()}")


def cancel_jobs_since(first_id: int) -> list[str]:
    """scancel every unfinished job with id >= first_id (jobs submitted after that point)."""
    ids = unfinished_since(first_id)
    scancel(*ids)
    return ids


def node_state(node: str) -> str:
    """The node's State as ``scontrol show node`` gives it: IDLE, MIXED, IDLE+DRAIN, DOWN*, ..."""
    return parse_scontrol_line(_run(["scontrol", "show", "node", "-o", node]).stdout)["State"]


def in_service(state: str) -> bool:
    """A node state that takes jobs: IDLE, MIXED or ALLOCATED, not drained, failed or unresponsive (``*``)."""
    base, *flags = state.split("+")
    return base in {"IDLE", "MIXED", "ALLOCATED"} and not {"DRAIN", "FAIL", "NOT_RESPONDING"} & set(flags)


def request_resume(node: str) -> bool:
    """``scontrol update NodeName=NODE State=RESUME`` for a node read out of service: True when slurmctld took it.
    The node may be back already (ReturnToService=2 returns a DOWN node when its slurmd registers, ``cluster.sh
    start`` resumes it too); slurmctld then refuses ("Invalid node state specified"): not an error."""
    return _run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], check=False).returncode == 0


def resume_node(node: str, timeout: float = 60) -> str:
    """Bring ``node`` back in service (:func:`request_resume` while it is out) and wait until it is; its state."""
    deadline = time.monotonic() + timeout
    while not in_service(state := node_state(node)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"node {node} still {state} after {timeout:.0f} s")
        request_resume(node)
        time.sleep(0.5)
    return state


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None and shutil.which("scontrol") is not None


# ------------------------------------------------------------------------------------------------ faults
def preempt(cpus: int = 1, seconds: int = 1, partition: str = "urgent") -> str:
    """Submit a short job to the higher-priority partition: SLURM preempts what holds the CPUs it needs (the
    preempted job may run again once this one, started when the preempted job has ended, is done)."""
    return sbatch(f"--partition={partition}", f"--cpus-per-task={cpus}", "--mem=100M", "--output=/dev/null",
                  f"--wrap=sleep {seconds}")


def restarts(job_id: str | int) -> int:
    return int(show_job(job_id).get("Restarts", "0"))


def wait_for_restart(job_id: str | int, count: int = 1, timeout: float = 120) -> dict[str, str]:
    """Wait until the job has been requeued ``count`` times; its record then (whatever the job did since: held,
    running again, even ended). Fails fast when it ended without that many requeues. One read per poll: a job
    requeued and ended between two reads is requeued."""
    deadline = time.monotonic() + timeout
    while True:
        rec = show_job(job_id)
        if int(rec.get("Restarts", "0")) >= count:
            return rec
        if rec["JobState"] in TERMINAL_STATES or time.monotonic() > deadline:
            raise SlurmError(f"job {job_id} not requeued {count}x: {rec['JobState']} Restarts={rec.get('Restarts')}")
        time.sleep(0.2)


def assert_same_training_state(a: dict, b: dict) -> None:
    """Model, EMA and AdamW moments of two checkpoints bitwise equal (and the same step)."""
    import torch

    assert a["step"] == b["step"], (a["step"], b["step"])
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), f"model.{k} differs"
    for k, v in a["ema"]["shadow"].items():
        assert torch.equal(v, b["ema"]["shadow"][k]), f"ema.{k} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for m in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[i][m], sb[i][m]), f"optimizer.state[{i}].{m} differs"


# niceness of the processes a test runs beside its SLURM jobs (references): the job's path, whose waits and
# step counts the test times, gets the CPUs first; the reference fills the gaps (start-ups, requeues)
BACKGROUND = ["nice", "-n", "10"]


class Reference:
    """An uninterrupted run of the same config (same code path: the wrapper, torchrun, one thread per rank),
    started in the background (at a lower priority: ``BACKGROUND``) so it trains while the faulted job does."""

    def __init__(self, root: Path, overrides: list[str]):
        self.run_dir = root / "tiny"
        self.proc = subprocess.Popen(
            [*BACKGROUND, sys.executable, "-m", "ddpm.cluster", "train", "--config", str(TINY_CONFIG), *overrides,
             f"run.root={root}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"})

    def state(self) -> dict:
        from ddpm.checkpoint import load_latest
        from ddpm.rundir import RunDir

        out, _ = self.proc.communicate(timeout=600)
        assert self.proc.returncode == 0, out
        return load_latest(RunDir(self.run_dir))[1]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def template_without_gres(tmp_path: Path, name: str) -> Path:
    """The sbatch template minus its GPU request (the test cluster has no GPUs)."""
    text = (REPO_ROOT / "slurm" / name).read_text().replace("#SBATCH --gres=gpu:1\n", "")
    out = tmp_path / name
    out.write_text(text)
    return out

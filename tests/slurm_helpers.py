"""Helpers for tests that run jobs on the local SLURM cluster (tests/slurm/cluster.sh).

Import them from test files with ``from slurm_helpers import ...`` (tests/ is on sys.path in pytest's
default import mode). The fixture itself (``slurm_cluster``) lives in tests/conftest.py.

The test cluster has no accounting (accounting_storage/none), so ``sacct`` fails; everything here asks
``scontrol show job -o`` instead. Finished jobs stay visible to scontrol for MinJobAge=300 s.
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
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "OUT_OF_MEMORY",
        "SPECIAL_EXIT",
        "REVOKED",
    }
)


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


def release_requeued(job_id: str | int, min_gap_s: float = 2.0) -> bool:
    """Start a requeued job now instead of after the requeue delay.

    A requeued job (``scontrol requeue``, or a preempted/failed --requeue job) waits PENDING with
    Reason=BeginTime for cred_expire+1 s (121 s by default, 11 s on the test cluster). That delay is
    there for a reason: slurmd revokes the job's credential when the old run is killed, and refuses a
    new launch whose credential is from the same second or earlier ("Killing non-startable batch
    JobId=N: Job credential revoked" in slurmctld.log -> the job ends FAILED). So the job is released
    at ``max(now, requeue time + min_gap_s)``; the requeue time is the record's SubmitTime.
    Returns True when it was released (i.e. it was pending on BeginTime).
    """
    rec = show_job(job_id)
    if rec.get("JobState") != "PENDING" or rec.get("Reason") != "BeginTime":
        return False
    start = "now"
    try:
        requeued_at = datetime.fromisoformat(rec["SubmitTime"])
    except (KeyError, ValueError):
        requeued_at = None
    if requeued_at is not None:
        earliest = requeued_at + timedelta(seconds=math.ceil(min_gap_s))
        if earliest > datetime.now():
            start = earliest.isoformat(timespec="seconds")
    _run(["scontrol", "update", f"JobId={job_id}", f"StartTime={start}"])
    return True


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
    other terminal state. ``release=True`` also calls :func:`release_requeued` on requeued jobs.
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
                if r["JobState"] == "PENDING" and r.get("Reason") == "BeginTime":
                    release_requeued(r["JobId"])
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


def cancel_jobs_since(first_id: int) -> list[str]:
    """scancel every unfinished job with id >= first_id (jobs submitted after that point)."""
    ids = []
    for r in show_jobs():
        jid = r.get("ArrayJobId") or r["JobId"]
        if int(jid) >= first_id and r["JobState"] not in TERMINAL_STATES:
            ids.append(jid)
    ids = sorted(set(ids), key=int)
    if ids:
        _run(["scancel", *ids], check=False)
    return ids


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None and shutil.which("scontrol") is not None


# --------------------------------------------------------------------------------------------- submitit
def scontrol_watcher(delay_s: int = 2):
    """A submitit info watcher that asks ``scontrol show job -o`` instead of ``sacct``.

    Why: submitit's SlurmInfoWatcher polls ``sacct``, which fails without accounting
    ("Slurm accounting storage is disabled"). submitit then logs "Bypassing sacct error" and
    ``job.state`` stays "UNKNOWN", which submitit counts as *not done*. ``job.result()`` still works for
    jobs that wrote their result pickle (success, or a Python exception -> FailedJobError), but a job
    that dies without one (scancel, time limit, os._exit, OOM kill, node failure) makes
    ``job.wait()``/``job.result()`` hang forever.

    Use per job (``job.watcher = scontrol_watcher()``), or for all jobs of the process
    (``submitit.SlurmJob.watcher = scontrol_watcher()``). Jobs that slurmctld no longer knows
    (purged MinJobAge after the end) are reported as state "PURGED", which counts as done.
    """
    from submitit.slurm.slurm import SlurmInfoWatcher

    class ScontrolInfoWatcher(SlurmInfoWatcher):
        def _make_command(self) -> list[str] | None:
            if not self._registered - self._finished:
                return None
            return ["scontrol", "show", "job", "-o"]  # all jobs in one call

        def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
            if not isinstance(string, str):
                string = string.decode()
            info: dict[str, dict[str, str]] = {}
            for line in string.splitlines():
                if not line.startswith("JobId="):
                    continue
                rec = parse_scontrol_line(line)
                stats = {"JobID": rec["JobId"], "State": rec["JobState"], "NodeList": rec.get("NodeList", "")}
                array_id, tasks = rec.get("ArrayJobId"), rec.get("ArrayTaskId")
                if array_id and tasks:
                    for task in _expand_task_ids(tasks):
                        info[f"{array_id}_{task}"] = stats
                else:
                    info[rec["JobId"]] = stats
            for job_id in self._registered - self._finished:
                if job_id not in info:
                    info[job_id] = {"JobID": job_id, "State": "PURGED", "NodeList": ""}
            return info

    return ScontrolInfoWatcher(delay_s=delay_s)


def _expand_task_ids(spec: str) -> list[int]:
    """``0-3,7,9-11%2`` -> [0, 1, 2, 3, 7, 9, 10, 11]."""
    out: list[int] = []
    for part in spec.split("%")[0].split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


# ------------------------------------------------------------------------------------------------ faults
def preempt(cpus: int = 1, seconds: int = 1, partition: str = "urgent") -> str:
    """Submit a short job to the higher-priority partition: SLURM preempts what holds the CPUs it needs (the
    preempted job may run again once this one, started when the preempted job has ended, is done)."""
    return sbatch(f"--partition={partition}", f"--cpus-per-task={cpus}", "--mem=100M", "--output=/dev/null",
                  f"--wrap=sleep {seconds}")


def restarts(job_id: str | int) -> int:
    return int(show_job(job_id).get("Restarts", "0"))


def wait_for_restart(job_id: str | int, count: int = 1, timeout: float = 120) -> None:
    """Wait until the job has been requeued ``count`` times (fails fast if it ended instead)."""
    deadline = time.monotonic() + timeout
    while restarts(job_id) < count:
        rec = show_job(job_id)
        if rec["JobState"] in TERMINAL_STATES or time.monotonic() > deadline:
            raise SlurmError(f"job {job_id} not requeued {count}x: {rec['JobState']} Restarts={rec.get('Restarts')}")
        time.sleep(0.2)


def job_pids(job_id: str | int) -> list[int]:
    """Every process of a job on this node: those whose environment has SLURM_JOB_ID=<job_id>."""
    needle = f"SLURM_JOB_ID={job_id}\0".encode()
    pids = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in env.read_bytes():
                pids.append(int(env.parent.name))
        except OSError:
            continue
    return pids


def logged_step(log: Path) -> int:
    """The last ``step N/`` progress line of a training log (0 before the first)."""
    import re

    found = re.findall(r"^step (\d+)/", log.read_text() if log.is_file() else "", flags=re.M)
    return int(found[-1]) if found else 0


def wait_for_step(log: Path, step: int, timeout: float = 120) -> int:
    """Wait until the training log has reached ``step``; returns the step seen."""
    deadline = time.monotonic() + timeout
    while (seen := logged_step(log)) < step:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{log} never reached step {step} (last: {seen})")
        time.sleep(0.2)
    return seen


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

        out, _ = self.proc.communicate(timeout=600)
        assert self.proc.returncode == 0, out
        return load_latest(self.run_dir)[1]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def template_without_gres(tmp_path: Path, name: str) -> Path:
    """The sbatch template minus its GPU request (the test cluster has no GPUs)."""
    text = (REPO_ROOT / "slurm" / name).read_text().replace("#SBATCH --gres=gpu:1\n", "")
    out = tmp_path / name
    out.write_text(text)
    return out

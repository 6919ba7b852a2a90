"""What SLURM says about a job, from either side: the job wrapper asks before it requeues itself, and the login
side (``launch.py status``, the doctor) when it reports. No torch, nothing of the login side.

:class:`JobState` is the one reading of squeue's answer: every caller asks it ``.alive``, ``.requeueing`` or
``.ended`` instead of keeping its own list of state names."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

# squeue/scontrol's JobState values (slurm.schedmd.com/squeue.html#SECTION_JOB-STATE-CODES), by what they mean
REQUEUEING = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"})  # it will (again) run
ALIVE = REQUEUEING | {"RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT",
                      "STOPPED"}  # queued or on a node: not ended yet
GONE = "GONE"  # neither squeue nor scontrol knows the job (purged after MinJobAge, or they did not answer)


@dataclass(frozen=True)
class JobState:
    """A job's state as squeue/scontrol gave it: ``name`` (``RUNNING``, ``PENDING``, ... or ``GONE``) and
    squeue's reason (``BeginTime`` for a requeued job on hold), printed as ``PENDING(BeginTime)``."""

    name: str
    reason: str = ""

    @property
    def alive(self) -> bool:
        """Queued, running or finishing: the job has not ended (``GONE`` is not alive)."""
        return self.name in ALIVE

    @property
    def requeueing(self) -> bool:
        """Pending a (re)start: SLURM already requeued it, e.g. on preemption."""
        return self.name in REQUEUEING

    @property
    def ended(self) -> bool:
        """Ended for good (COMPLETED, FAILED, CANCELLED, TIMEOUT, NODE_FAIL, ... or GONE)."""
        return not self.alive

    def __str__(self) -> str:
        return f"{self.name}({self.reason})" if self.reason else self.name


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout


def job_state(job_id: str) -> JobState:
    """A job's state from squeue, then scontrol (``sacct`` is often restricted); ``GONE`` if neither knows it."""
    try:
        out = _run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"]).strip()
        if out:
            state, reason = out.splitlines()[0].split("|")
            return JobState(state, "" if reason in ("None", "") else reason)
        out = _run(["scontrol", "show", "job", "-o", job_id])
        for field in out.split():
            if field.startswith("JobState="):
                return JobState(field.split("=", 1)[1])
    except (subprocess.SubprocessError, OSError):
        pass
    return JobState(GONE)

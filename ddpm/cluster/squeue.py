"""What SLURM says about a job, from either side: the job wrapper asks before it requeues itself, and the login
side (``launch.py status``, the doctor) when it reports. No torch, nothing of the login side."""

from __future__ import annotations

import subprocess


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout


def job_state(job_id: str) -> str:
    """A job's state from squeue, then scontrol (``sacct`` is often restricted); ``GONE`` if neither knows it.

    ``PENDING(Reason)`` when squeue gives a reason, e.g. ``PENDING(BeginTime)`` for a requeued job on hold."""
    try:
        out = _run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"]).strip()
        if out:
            state, reason = out.splitlines()[0].split("|")
            return f"{state}({reason})" if reason not in ("None", "") else state
        out = _run(["scontrol", "show", "job", "-o", job_id])
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
    except (subprocess.SubprocessError, OSError):
        pass
    return "GONE"

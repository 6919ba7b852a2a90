"""The run's state machine: how one training attempt ended, and what the job does next.

The trainer writes its state to ``status.json`` (:class:`ddpm.status.RunState`); the wrapper adds how torchrun
ended (its exit code, or None when the watchdog killed it). :func:`judge` maps the two to one :class:`Verdict`:

=======================================  ===========  ===========================================================
the attempt                              ends as      next
=======================================  ===========  ===========================================================
exit 0, ``done``                         done         the job succeeds (its afterok dependents start)
``stopped`` (a stop signal, saved)       stopped      requeue (up to ``slurm.max_restarts``)
``failed`` with the trainer's one line   failed       the job fails with that line; never requeued (fix, resubmit)
no heartbeat for ``training.watchdog_s``  stalled      requeue from the last checkpoint, or a crash loop
exit != 0 while ``starting``/``running``  lost         requeue from the last checkpoint, or a crash loop
/``lost`` (a rank or node died)
anything else                            failed       the job fails, naming torchrun's exit and the state
=======================================  ===========  ===========================================================

A crash loop: :data:`CRASH_LOOP` attempts in a row stalled or lost a rank without a new durable checkpoint; the
job fails with one line instead of requeuing the same failure again. Pure: no SLURM, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ddpm.checkpoint import list_checkpoints
from ddpm.rundir import RunDir
from ddpm.status import RunState, read_status

CRASH_LOOP = 3  # attempts in a row that lose a rank or stall without a new durable checkpoint: stop requeuing

Next = Literal["done", "requeue", "fail", "error"]  # fail: the trainer's one line; error: a crash loop, the unknown


@dataclass(frozen=True)
class Attempt:
    """What an attempt starts from: the newest checkpoint's step, and how many attempts before it in a row lost a
    rank or stalled without adding a checkpoint (``lost_streak`` in ``status.json``)."""

    checkpoint_step: int
    lost_streak: int

    @staticmethod
    def read(run: RunDir) -> Attempt:
        """The attempt that starts now in ``run`` (its status.json and checkpoints)."""
        status, ckpts = read_status(run) or {}, list_checkpoints(run)
        counted = (RunState.LOST, RunState.STALLED, RunState.STARTING)
        streak = int(status.get("lost_streak") or 0) if status.get("state") in counted else 0
        return Attempt(ckpts[-1][0] if ckpts else -1, streak)


def lost_streak(before: Attempt, after: Attempt) -> int:
    """The streak after an attempt that lost a rank or stalled: 1 when it wrote a new checkpoint, else one more."""
    return 1 if after.checkpoint_step > before.checkpoint_step else before.lost_streak + 1


@dataclass(frozen=True)
class Verdict:
    """How an attempt ended (``state``), what comes next, and the one line that says why.

    ``why`` and ``streak`` (stalled and lost only): the error and the ``lost_streak`` to record in ``status.json``."""

    state: str
    next: Next
    line: str
    why: str = ""
    streak: int = 0


def judge(rc: int | None, status: dict[str, Any], before: Attempt, after: Attempt, watchdog_s: int,
          logs: Path | str) -> Verdict:
    """The verdict on one attempt: torchrun's exit code ``rc`` (None: the watchdog killed it), the trainer's last
    ``status`` (status.json as read), the attempt's start (``before``) and end (``after``)."""
    state, step = status.get("state"), status.get("step")
    if rc == 0 and state == RunState.DONE:
        return Verdict(RunState.DONE, "done", f"training done at step {step}")
    if rc is None:  # a stall without a new checkpoint counts toward the crash loop: the same hang every attempt
        why = f"no heartbeat for {watchdog_s} s after step {step} (training.watchdog_s)"  # (a grid, a deadlock)
        return _counted(RunState.STALLED, why, f"training stalled after step {step}", before, after, logs, "stalled")
    if state == RunState.STOPPED:
        return Verdict(RunState.STOPPED, "requeue", f"training stopped at step {step}; checkpoint is durable")
    if state == RunState.FAILED and status.get("error"):  # the trainer's one line (no GPU, unreadable checkpoints,
        return Verdict(RunState.FAILED, "fail", f"training failed: {status['error']}")  # a full disk): fix, resubmit
    if rc != 0 and state in (RunState.LOST, RunState.STARTING, RunState.RUNNING):  # a rank died (or NCCL's
        why = status.get("error") or f"torchrun exited with {rc} while the trainer was {state}"  # watchdog aborted
        return _counted(RunState.LOST, why, f"training lost a rank after step {step} ({why})", before, after, logs,
                        "lost a rank")  # them all before Python could write anything)
    return Verdict(RunState.FAILED, "error",
                   f"training failed: torchrun exited with {rc}, status '{state}'; see {logs}")


def _counted(state: str, why: str, said: str, before: Attempt, after: Attempt, logs: Path | str,
             verb: str) -> Verdict:
    """A stalled or lost attempt: requeue from the last checkpoint, or the crash-loop line at the third in a row."""
    streak = lost_streak(before, after)
    if streak >= CRASH_LOOP:
        return Verdict(state, "error", f"training failed: a crash loop, not requeued: {streak} attempts in a "
                       f"row {verb} without a new checkpoint (last: {why}); see {logs}", why, streak)
    return Verdict(state, "requeue", f"{said}; resuming from the last checkpoint", why, streak)

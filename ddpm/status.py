"""A run's state: ``status.json``, written by the trainer and the wrapper, read by the wrapper, the doctor and
``launch.py status``; and the one line a failure leaves there.

    <run>/status.json           {"schema": 1, "state": RunState, "step": N, "heartbeat": t, "error": line, ...}

No torch at import: launch.py and the job wrapper read it (seconds of start-up on every job).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from enum import Enum
from typing import TYPE_CHECKING, Any

from ddpm.config import Config
from ddpm.errors import DDPMError
from ddpm.fsio import atomic_write_text
from ddpm.rundir import RunDir

if TYPE_CHECKING:
    from ddpm import dist


class RunState(str, Enum):
    """A training run's state in ``status.json``: the trainer and the wrapper write it, the wrapper, the doctor
    and ``launch.py status`` read it."""

    STARTING = "starting"  # the wrapper started torchrun; the trainer has not written yet
    RUNNING = "running"  # training; ``heartbeat`` (a Unix time) refreshed every few seconds
    DONE = "done"
    STOPPED = "stopped"  # a stop signal; the checkpoint is durable: requeue
    STALLED = "stalled"  # no heartbeat for training.watchdog_s: the wrapper killed it; requeue
    LOST = "lost"  # a rank died (or NCCL's watchdog aborted them): requeue from the last checkpoint
    FAILED = "failed"  # ``error``: one line a user must act on; never requeued

    def __str__(self) -> str:  # f-strings and format() print the value (Python 3.11 would print RunState.DONE)
        return self.value


STATUS_SCHEMA = 1  # the layout of status.json; a reader refuses a newer one in one line


def write_status(run: RunDir, state: RunState, step: int, skipped_steps: int, **extra: Any) -> None:
    """``run``'s status.json, what the wrapper and ``launch.py status`` read: ``state``, ``step``, the heartbeat,
    and ``extra`` (``error``, ``last_save_s``, ``lost_streak``)."""
    atomic_write_text(run.status, json.dumps(
        {"schema": STATUS_SCHEMA, "state": RunState(state).value, "step": step, "skipped_steps": skipped_steps,
         "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "heartbeat": time.time(),
         "slurm_job_id": os.environ.get("SLURM_JOB_ID"), **extra}) + "\n")


def stalled_for(status: dict[str, Any], watchdog_s: int) -> float | None:
    """Seconds since a running trainer's last heartbeat when more than ``watchdog_s`` (0 = off), else None.

    Start-up (rendezvous, data, resume) is not watched: torchrun's and the process group's timeouts bound it.
    """
    age = time.time() - float(status.get("heartbeat") or time.time())
    return age if watchdog_s and status.get("state") == RunState.RUNNING and age > watchdog_s else None


def read_status(run: RunDir) -> dict[str, Any] | None:
    """``run``'s status.json with ``state`` as a :class:`RunState`; None when there is none (or it is being
    replaced). A newer schema or an unknown state is one DDPMError line, not a guess."""
    path = run.status
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    schema, state = status.get("schema", 1), status.get("state")
    known = {s.value for s in RunState}
    if not isinstance(schema, int) or schema > STATUS_SCHEMA or state not in known:
        raise DDPMError(f"{path}: unknown run state {state!r} (status schema {schema!r}; this version reads schema "
                        f"{STATUS_SCHEMA}, states {', '.join(sorted(known))}): written by a newer ddpm-slurm?")
    return {**status, "state": RunState(state)}


def record_failure(run: RunDir, env: dist.DistEnv, step: int, err: Exception,
                   state: RunState = RunState.FAILED) -> None:
    """``run``'s status.json says ``state`` (failed; lost: a peer died), with the one-line error, for the wrapper and
    ``launch.py status`` (best effort: on a full disk even this small file may not fit).

    Any rank records a failure (a node without its GPUs, an out-of-memory on one rank): rank 0 may be blocked
    in a collective waiting for it, and every node's wrapper reads the file and ends the job. A lost peer is
    rank 0's to record."""
    line = str(err).partition("\n")[0]
    if state == RunState.LOST:
        print(f"[rank {env.rank}] lost a peer after step {step}: {line}", flush=True)
    with contextlib.suppress(OSError):
        if (env.is_main or state == RunState.FAILED) and run.path.is_dir():
            write_status(run, state, step, 0, error=line)


def as_failure(err: Exception, cfg: Config, env: dist.DistEnv, step: int) -> DDPMError:
    """``err`` as the one-line failure a user acts on: a :class:`DDPMError` as it is; a ``torch.OutOfMemoryError``
    as where it happened (step, rank, the card and its memory), the batch, the precision and the fix."""
    if isinstance(err, DDPMError):
        return err
    import torch

    tc, infra = cfg.training, cfg.infrastructure
    where = "the CPU"
    if env.device.type == "cuda":
        props = torch.cuda.get_device_properties(env.device)
        where = f"the {props.name} ({props.total_memory / 2**30:.0f} GiB, GPU {env.local_rank})"
    fixes = [f"lower training.batch_size (now {tc.batch_size})"]
    if infra.precision == "fp32":
        fixes.append("set infrastructure.precision=bf16 (fp16 on cards without native bf16)")
    fixes.append("or spread the batch over more GPUs (infrastructure.num_gpus, infrastructure.num_nodes)")
    return DDPMError(f"out of memory at step {step} (rank {env.rank}) on {where}: batch {tc.batch_size} "
                     f"({tc.batch_size // env.world_size} per rank), image size {cfg.data.image_size}, "
                     f"{infra.precision} (infrastructure.precision): {', '.join(fixes)}; not requeued")

"""What a run writes besides checkpoints: TensorBoard, console progress, provenance, status.

    <run_dir>/tb/               TensorBoard events (rank 0; purge_step on resume: no duplicate points)
    <run_dir>/provenance.json   git commit + dirty flag, package versions, hosts, SLURM job ids, per start
    <run_dir>/status.json       {"schema": 1, "state": RunState, "step": N, "heartbeat": t, "error": line, ...}
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import time
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddpm.config import Config, TrainingConfig
from ddpm.errors import DDPMError
from ddpm.fsio import atomic_write_text
from ddpm.rundir import RunDir

# torch is imported where it is used: the status functions serve launch.py and the job wrapper, which do not
# load torch (seconds of start-up on every job).
if TYPE_CHECKING:
    import torch

    from ddpm import dist

PACKAGES = ("torch", "torchvision", "numpy", "submitit", "datasets", "pyyaml", "pillow", "tensorboard")
CONSOLE = ("loss", "grad_norm", "lr")  # the scalars of the console line
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
              "SLURM_JOB_PARTITION", "SLURM_JOB_NODELIST", "SLURM_NNODES")


class RunLogger:
    """Scalars -> TensorBoard and a console line; rank 0 writes, every rank may call.

    It logs whatever it is given (the trainer reduces over ranks and decides what to log and when) and adds
    ``train/images_per_s`` (and ``train/gpu_mem_gb`` on CUDA) from the steps and the time since the previous
    log. The first log counts from the step the run started or resumed at and the time training began: the
    trainer calls :meth:`mark_start` as its loop begins (after data, model and resume set-up). A log with no
    step behind it prints ``- img/s eta -``, never a rate of 0 and an ETA of centuries.
    """

    def __init__(self, run_dir: Path, tc: TrainingConfig, env: dist.DistEnv, start_step: int = 0):
        """``start_step``: the step the run starts or resumes at (TensorBoard drops points after it)."""
        self.env, self.total, self.global_batch = env, tc.num_iterations, tc.batch_size
        self.writer = None
        if env.is_main:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events at steps > start_step (written after that checkpoint) are dropped.
            self.writer = SummaryWriter(str(RunDir(run_dir).tb), purge_step=start_step + 1 if start_step else None)
        self._last_time, self._last_step = time.perf_counter(), start_step

    def mark_start(self, step: int, started: float | None = None) -> None:
        """Training begins (or resumes) at ``step`` now (``started``: a ``time.perf_counter()`` reading): the next
        log's rate and ETA count from here."""
        self._last_time, self._last_step = time.perf_counter() if started is None else started, step

    def _rate(self, step: int, now: float) -> float | None:
        """Images per second from the last mark (or log) to ``step`` at ``now``; None with no step in between."""
        steps, seconds = step - self._last_step, now - self._last_time
        return steps * self.global_batch / seconds if steps > 0 and seconds > 0 else None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Write ``scalars`` at ``step`` (names starting with "loss" under loss/, the rest under train/)."""
        now = time.perf_counter()
        images_per_s = self._rate(step, now)
        self._last_time, self._last_step = now, step
        if self.writer is None:
            return
        scalars = dict(scalars) if images_per_s is None else {**scalars, "images_per_s": images_per_s}
        if self.env.device.type == "cuda":
            import torch

            scalars["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
        for name, value in scalars.items():
            self.writer.add_scalar(f"{'loss' if name.startswith('loss') else 'train'}/{name}", value, step)
        print(progress_line(step, self.total, self.global_batch, scalars, images_per_s), flush=True)

    def image(self, step: int, images: torch.Tensor) -> None:
        """A grid of [N,C,H,W] images in [-1,1] into TensorBoard, images under 32 pixels enlarged by whole pixels."""
        if self.writer is None:
            return
        from ddpm.data import make_grid
        from ddpm.outputs import enlarge_factor

        k = enlarge_factor(max(images.shape[-2:]))
        images = images.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1) if k > 1 else images
        self.writer.add_image("samples/ema", (make_grid(images) + 1) / 2, step)

    def close(self) -> None:
        """Flush and close the TensorBoard writer (rank 0)."""
        if self.writer is not None:
            self.writer.close()


def progress_line(step: int, total: int, global_batch: int, scalars: dict[str, float],
                  images_per_s: float | None) -> str:
    """``step N/TOTAL (P%) loss L grad_norm G lr LR R img/s eta H:MM:SS`` (the scalars of CONSOLE it is given);
    without a rate (no step since the last mark or log) ``- img/s eta -``."""
    shown = " ".join(f"{k} {scalars[k]:.4g}" for k in CONSOLE if k in scalars)
    speed = "- img/s eta -"
    if images_per_s is not None:
        speed = f"{images_per_s:.1f} img/s eta {_hms((total - step) * global_batch / images_per_s)}"
    return f"step {step}/{total} ({100 * step / total:.1f}%) {shown} {speed}"


def _hms(seconds: float) -> str:
    """``h:mm:ss`` of a non-negative duration (negative: 0:00:00)."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _git_state() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(dirty) if dirty is not None else None}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_provenance(run_dir: Path, cfg: Config, env: dist.DistEnv) -> None:
    """Append this start (hosts of every rank, SLURM ids, versions, git) to provenance.json.

    Collective: every rank calls it; rank 0 writes.
    """
    import torch

    from ddpm import dist

    hosts = dist.gather_objects(socket.gethostname())
    if not env.is_main:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = RunDir(run_dir).provenance
    record = json.loads(path.read_text()) if path.is_file() else {"starts": []}
    record["starts"].append({
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git": _git_state(),
        "packages": package_versions(),
        "world_size": env.world_size,
        "hosts": sorted(set(hosts)),
        "device": str(env.device) if env.device.type != "cuda" else torch.cuda.get_device_name(env.device),
        "slurm": {k: os.environ[k] for k in SLURM_VARS if k in os.environ},
        "run_name": cfg.run.name,
    })
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def add_to_provenance(run_dir: Path, **fields: Any) -> None:
    """Add ``fields`` (plain types) to this start's record of provenance.json, e.g. the weights a new run started
    from (``training.init_from``). Rank 0 only, after :func:`write_provenance`."""
    path = RunDir(run_dir).provenance
    record = json.loads(path.read_text()) if path.is_file() else {"starts": [{}]}
    record["starts"][-1].update(fields)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


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


def write_status(run_dir: Path, state: RunState, step: int, skipped_steps: int, **extra: Any) -> None:
    """What the wrapper and ``launch.py status`` read: ``state``, ``step``, the heartbeat, and ``extra`` (``error``,
    ``last_save_s``, ``lost_streak``)."""
    atomic_write_text(RunDir(run_dir).status, json.dumps(
        {"schema": STATUS_SCHEMA, "state": RunState(state).value, "step": step, "skipped_steps": skipped_steps,
         "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "heartbeat": time.time(),
         "slurm_job_id": os.environ.get("SLURM_JOB_ID"), **extra}) + "\n")


def stalled_for(status: dict[str, Any], watchdog_s: int) -> float | None:
    """Seconds since a running trainer's last heartbeat when more than ``watchdog_s`` (0 = off), else None.

    Start-up (rendezvous, data, resume) is not watched: torchrun's and the process group's timeouts bound it.
    """
    age = time.time() - float(status.get("heartbeat") or time.time())
    return age if watchdog_s and status.get("state") == RunState.RUNNING and age > watchdog_s else None


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """``status.json`` with ``state`` as a :class:`RunState`; None when there is none (or it is being replaced).
    A newer schema or an unknown state is one DDPMError line, not a guess."""
    path = RunDir(run_dir).status
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


def record_failure(run_dir: Path, env: dist.DistEnv, step: int, err: Exception,
                   state: RunState = RunState.FAILED) -> None:
    """``status.json`` says ``state`` (failed; lost: a peer died), with the one-line error, for the wrapper and
    ``launch.py status`` (best effort: on a full disk even this small file may not fit).

    Any rank records a failure (a node without its GPUs, an out-of-memory on one rank): rank 0 may be blocked
    in a collective waiting for it, and every node's wrapper reads the file and ends the job. A lost peer is
    rank 0's to record."""
    line = str(err).partition("\n")[0]
    if state == RunState.LOST:
        print(f"[rank {env.rank}] lost a peer after step {step}: {line}", flush=True)
    with contextlib.suppress(OSError):
        if (env.is_main or state == RunState.FAILED) and run_dir.is_dir():
            write_status(run_dir, state, step, 0, error=line)


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

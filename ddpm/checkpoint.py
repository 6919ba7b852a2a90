"""Atomic checkpoints, the LATEST pointer, retention, and newest-valid loading.

Layout inside a run directory::

    checkpoints/step_00010000.pt   a dict of plain types and tensors (torch.load(weights_only=True))
    checkpoints/LATEST             the file name of the newest durable checkpoint

A checkpoint is written to a temporary file in the same directory, fsynced,
renamed into place, and only then named by LATEST; a process killed at any
moment leaves the previous checkpoint loadable. A full disk is one
CheckpointError line, with the previous checkpoint intact and nothing deleted.
A run whose checkpoints all fail to load is an error, never a silent start
from step 0. Contents (see docs/design.md)::

    format, step, model, model_config, ddpm, ema, optimizer, scaler, rng, data, config, counters
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ddpm.errors import CheckpointError, DDPMError
from ddpm.fsio import atomic_write_bytes, atomic_write_text, file_sha256_once
from ddpm.jobconfig import read_checkpoint_ref
from ddpm.rundir import RunDir

# torch is imported where tensors are read or written: listing checkpoints (launch.py's preflight and status)
# does not load it.
if TYPE_CHECKING:
    import torch

FORMAT = "ddpm-slurm/1"
REQUIRED_KEYS = ("format", "step", "model", "model_config", "ddpm", "config")


def list_checkpoints(run: RunDir) -> list[tuple[int, Path]]:
    """All ``step_<N>.pt`` files of ``run``, sorted by step (oldest first)."""
    ckpt_dir = run.checkpoints
    if not ckpt_dir.is_dir():
        return []
    found = [(step, p) for p in ckpt_dir.iterdir() if (step := RunDir.checkpoint_step(p)) is not None]
    return sorted(found)


def _estimated_bytes(state: Any) -> int:
    """Bytes of tensor data in a (nested) state dict: what ``torch.save`` writes, give or take metadata."""
    import torch

    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_estimated_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_estimated_bytes(v) for v in state)
    return 0


def save_checkpoint(run: RunDir, state: dict[str, Any], keep_last: int = 2, milestone_every: int = 0) -> Path:
    """Write ``state`` as ``step_<N>.pt`` of ``run`` atomically, point LATEST at it, prune old ones.

    The newest ``keep_last`` checkpoints up to this step are kept, plus every step that is a
    multiple of ``milestone_every`` (when > 0). Returns the checkpoint path. A full disk raises
    CheckpointError before or while writing; the checkpoints already there stay as they were.
    """
    step = int(state["step"])
    ckpt_dir = run.checkpoints
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = run.checkpoint(step)
    need, free = _estimated_bytes(state), shutil.disk_usage(ckpt_dir).free
    if need > free:
        raise CheckpointError(_no_space(run, path, need, free))
    import torch

    try:
        atomic_write_bytes(path, lambda f: torch.save(state, f))
        atomic_write_text(run.latest, path.name + "\n")
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise CheckpointError(_no_space(run, path, need, shutil.disk_usage(ckpt_dir).free)) from None
    older = [(s, p) for s, p in list_checkpoints(run) if s < step]
    for old_step, old_path in older[:max(len(older) - (max(keep_last, 1) - 1), 0)]:
        if milestone_every > 0 and old_step % milestone_every == 0:
            continue
        old_path.unlink(missing_ok=True)
    return path


def _no_space(run: RunDir, path: Path, need: int, free: int) -> str:
    kept, ckpt_dir = list_checkpoints(run), run.checkpoints
    prev = f"the previous checkpoint {kept[-1][1].name} is intact" if kept else "no earlier checkpoint exists"
    return (f"{ckpt_dir}: no space left on the device for {path.name} (needs about {need / 2**20:.1f} MiB, "
            f"{free / 2**20:.1f} MiB free); {prev} and nothing was deleted: free space or move run.root")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one checkpoint with ``weights_only=True``; a bad file raises one CheckpointError line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    import torch

    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, wrong magic: all the same to a user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({reason[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a ddpm-slurm checkpoint (expected format {FORMAT})")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint is missing {', '.join(missing)}")
    return state


def load_latest(run: RunDir, map_location: str | torch.device = "cpu",
                warn: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]] | None:
    """Newest checkpoint of ``run`` that loads, or None when the run has none.

    LATEST is tried first, then every ``step_<N>.pt`` from the newest down; a
    corrupt or truncated one is reported through ``warn`` and skipped. When
    checkpoints exist (or LATEST names one) but none loads, CheckpointError:
    the caller must not start over on its own.
    """
    ckpt_dir = run.checkpoints
    candidates = [p for _, p in reversed(list_checkpoints(run))]
    latest = run.latest
    named = ckpt_dir / latest.read_text().strip() if latest.is_file() else None
    if named in candidates:
        candidates.remove(named)
        candidates.insert(0, named)
    reasons = []
    for path in candidates:
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as err:
            warn(f"warning: skipping {err}")
            reasons.append(str(err).removeprefix(f"{path.parent}/"))
    if not candidates and named is None:
        return None
    why = "; ".join(reasons) if reasons else f"LATEST names {named.name}, which does not exist"
    raise CheckpointError(
        f"{ckpt_dir}: no checkpoint can be loaded ({why}); nothing was deleted. Restore the files, or start "
        "over explicitly with a new run.name")


def load_resolved(checkpoint: str | Path | RunDir,
                  map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]]:
    """(path, state) of a checkpoint file as given, or of the newest valid checkpoint of a run directory (a
    :class:`RunDir`, or a path to one: what a user names, ``--checkpoint``).

    Each file is read once: the state that proved the checkpoint valid is the one returned.
    """
    run = checkpoint if isinstance(checkpoint, RunDir) else None
    p = run.path if run is not None else Path(checkpoint)
    if run is None and p.is_file():
        return p, load_checkpoint(p, map_location)
    if p.is_dir():
        run = run or RunDir(p)  # the edge: a run directory named by a path
        found = load_latest(run, map_location, warn=lambda msg: print(msg, flush=True))
        if found is None:
            raise CheckpointError(f"{p}: no loadable checkpoint in {run.checkpoints}")
        return found
    raise CheckpointError(f"{p}: no such checkpoint file or run directory")


@dataclass(frozen=True)
class CheckpointRef:
    """``sampling.checkpoint`` read: ``latest`` (the newest valid checkpoint), ``best`` (the eval stage's choice,
    eval/fid.json), ``step_<N>`` (that step's checkpoint) or a path to a checkpoint file."""

    kind: Literal["latest", "best", "step", "path"]
    step: int | None = None
    path: str | None = None

    @classmethod
    def parse(cls, text: str) -> CheckpointRef:
        """The reference ``text`` names (:func:`ddpm.jobconfig.read_checkpoint_ref`); ValueError when it is none
        of the four forms."""
        kind, step, path = read_checkpoint_ref(text)
        return cls(kind, step=step, path=path)

    def resolve(self, run: RunDir) -> tuple[Path | RunDir, str]:
        """(checkpoint file, or ``run`` itself for ``latest``: its newest valid one, why) in ``run``; either goes
        to :func:`load_resolved`.

        One line when the file is missing, eval/fid.json is unreadable, or the file it scored has changed."""
        if self.kind == "latest":
            return run, "latest: the newest valid checkpoint"
        if self.kind in ("step", "path"):
            path = run.checkpoint(self.step) if self.kind == "step" else Path(self.path).expanduser()
            name = f"step_{self.step}" if self.kind == "step" else self.path
            if not path.is_file():
                raise CheckpointError(f"sampling.checkpoint={name}: {path} does not exist")
            return path, f"{name}: sampling.checkpoint"
        try:
            best = json.loads(run.fid.read_text())["best"]
        except (OSError, ValueError, KeyError, TypeError):
            raise DDPMError(f"sampling.checkpoint=best: no readable {run.fid} (run the eval stage: launch.py "
                            "--stage eval with eval.enabled=true, or set sampling.checkpoint=latest)") from None
        path = Path(best["checkpoint"])
        # remembered: the sampling task that asked goes on to hash the same file (ddpm.shards.sample_loaded)
        if not path.is_file() or file_sha256_once(path) != best["checkpoint_sha256"]:
            raise CheckpointError(f"sampling.checkpoint=best: {path} is missing or not the file "
                                  f"{run.fid.relative_to(run.path)} scored")
        return path, (f"best: lowest mean FID of the eval stage ({best['mean']:.3f} at step {best['step']}, "
                      f"{run.fid.relative_to(run.path)})")


def final_reference(checkpoint: str | None, eval_enabled: bool) -> CheckpointRef:
    """The final set's checkpoint: ``sampling.checkpoint``, or when null best if the eval stage runs, else latest."""
    return CheckpointRef.parse(checkpoint or ("best" if eval_enabled else "latest"))

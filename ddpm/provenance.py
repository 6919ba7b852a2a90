"""Where a run came from: ``provenance.json``, one entry per start (git commit and dirty flag, package versions,
hosts, SLURM job ids), and the package versions that outputs record.

    <run>/provenance.json       {"config_sha256": ..., "starts": [{"time", "git", "versions", "hosts", "slurm"}]}
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddpm.config import Config
from ddpm.fsio import atomic_write_text
from ddpm.rundir import RunDir

if TYPE_CHECKING:
    from ddpm import dist

PACKAGES = ("torch", "torchvision", "numpy", "submitit", "datasets", "pyyaml", "pillow", "tensorboard")
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
              "SLURM_JOB_PARTITION", "SLURM_JOB_NODELIST", "SLURM_NNODES")


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


def write_provenance(run: RunDir, cfg: Config, env: dist.DistEnv) -> None:
    """Append this start (hosts of every rank, SLURM ids, versions, git) to ``run``'s provenance.json.

    Collective: every rank calls it; rank 0 writes.
    """
    import torch

    from ddpm import dist

    hosts = dist.gather_objects(socket.gethostname())
    if not env.is_main:
        return
    run.path.mkdir(parents=True, exist_ok=True)
    path = run.provenance
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


def add_to_provenance(run: RunDir, **fields: Any) -> None:
    """Add ``fields`` (plain types) to this start's record of ``run``'s provenance.json, e.g. the weights a new run
    started from (``training.init_from``). Rank 0 only, after :func:`write_provenance`."""
    path = run.provenance
    record = json.loads(path.read_text()) if path.is_file() else {"starts": [{}]}
    record["starts"][-1].update(fields)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")




def add_attempt_seconds(run: RunDir, seconds: float) -> None:
    """``train_s``, this attempt's seconds from torchrun's start to its end, on the start the trainer recorded
    (a sweep's results sum them). Nothing when this attempt's trainer never wrote its start (the last one already
    has its seconds) or the file cannot be read."""
    path = run.provenance
    try:
        last = json.loads(path.read_text())["starts"][-1]
    except (OSError, ValueError, KeyError, IndexError):
        return
    if "train_s" not in last:
        add_to_provenance(run, train_s=round(seconds, 1))

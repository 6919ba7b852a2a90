"""The run plan: what a config will cost in disk, wall time, GPU-hours and requeues, before it is queued.

    disk = disk_plan(cfg)                    # torch-free: checkpoint size from the architecture
    print("\n".join(disk.lines()))           # launch.py --dry-run
    check_free_space(cfg)                    # preflight: one line when run.root cannot hold the run
    print("\n".join(run_plan(cfg, img_per_s=2500.0, save_s=4.0)))   # the doctor, from its measurements

Pure arithmetic on the config and on measured speeds, so a unit test can check every figure.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from ddpm.architecture import checkpoint_bytes
from ddpm.config import Config
from ddpm.errors import DDPMError
from ddpm.evaluate import eval_steps

GiB = 2**30


def human_size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class DiskPlan:
    """Bytes a run writes to ``run.root`` at most (every figure an upper bound)."""

    checkpoint: int  # one checkpoint: weights, EMA, AdamW moments (fp32)
    kept: int  # training.keep_last, plus the one being written before the oldest is pruned
    milestones: int  # checkpoints kept for good (training.milestone_every)
    samples: int  # the shards and the assembled npz (uint8)
    eval: int  # the eval stage's sample sets

    @property
    def checkpoints(self) -> int:
        return self.checkpoint * (self.kept + self.milestones)

    @property
    def total(self) -> int:
        return self.checkpoints + self.samples + self.eval

    def lines(self) -> list[str]:
        return [f"disk: checkpoints {human_size(self.checkpoint)} x {self.kept} kept"
                + (f" + {self.milestones} milestones" if self.milestones else "")
                + f" = {human_size(self.checkpoints)}; samples {human_size(self.samples)}"
                + (f"; eval {human_size(self.eval)}" if self.eval else "") + f"; in all about {human_size(self.total)}"]


def disk_plan(cfg: Config) -> DiskPlan:
    """What ``cfg`` writes: checkpoints (size from the U-Net's shape), shards + npz, and eval sample sets."""
    tc, s = cfg.training, cfg.data.image_size
    image = s * s * cfg.model.in_channels  # bytes of one uint8 image
    milestones = tc.num_iterations // tc.milestone_every if tc.milestone_every > 0 else 0
    evals = 0
    if cfg.eval.enabled:
        evals = len(eval_steps(cfg)) * cfg.eval.num_seeds * cfg.eval.sampling.num_samples * image
    return DiskPlan(checkpoint=checkpoint_bytes(cfg.model, s), kept=tc.keep_last + 1, milestones=milestones,
                    samples=2 * cfg.sampling.num_samples * image, eval=evals)


def _used_bytes(directory: Path) -> int:
    """Bytes already under ``directory`` (a resumed run has written part of its plan)."""
    if not directory.is_dir():
        return 0
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def check_free_space(cfg: Config) -> DiskPlan:
    """Refuse, in one line, a run whose ``run.root`` has less free space than the run still needs."""
    plan = disk_plan(cfg)
    root = Path(cfg.run.root)
    need = max(plan.total - _used_bytes(cfg.run_dir.path), 0)
    free = shutil.disk_usage(root).free
    if free < need:
        raise DDPMError(f"run.root: {root.resolve()} has {human_size(free)} free, the run needs about "
                        f"{human_size(need)} ({plan.lines()[0].removeprefix('disk: ')}): free space, move run.root, "
                        "or lower training.keep_last / training.milestone_every / sampling.num_samples")
    return plan


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(round(seconds)), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


@dataclass(frozen=True)
class TimePlan:
    """Training time for ``training.num_iterations`` at a measured speed, and what SLURM makes of it."""

    wall_s: float
    gpu_hours: float
    jobs: int  # time-limited jobs the training needs (1 + requeues)
    save_s: float
    signal_delay_s: int


def time_plan(cfg: Config, img_per_s: float, save_s: float) -> TimePlan:
    """``img_per_s``: the whole job's training speed; ``save_s``: one checkpoint on ``run.root``.

    Each job trains until ``slurm.signal_delay_s`` before its limit, then saves and is requeued.
    """
    tc, sc, infra = cfg.training, cfg.slurm, cfg.infrastructure
    wall = tc.num_iterations * tc.batch_size / img_per_s
    per_job = max(sc.time_min * 60 - sc.signal_delay_s, 1)
    return TimePlan(wall_s=wall, gpu_hours=wall / 3600 * infra.num_gpus * infra.num_nodes,
                    jobs=max(math.ceil(wall / per_job), 1), save_s=save_s, signal_delay_s=sc.signal_delay_s)


def run_plan(cfg: Config, img_per_s: float, save_s: float) -> list[tuple[str, str, str]]:
    """(kind, what, detail) lines of the plan: ``ok``, ``note`` or ``FAIL`` (with the key to change)."""
    tp, disk, sc = time_plan(cfg, img_per_s, save_s), disk_plan(cfg), cfg.slurm
    gpus = cfg.infrastructure.num_gpus * cfg.infrastructure.num_nodes
    out = [("ok", "wall time", f"{_duration(tp.wall_s)} for {cfg.training.num_iterations} steps of "
            f"{cfg.training.batch_size} at {img_per_s:.1f} img/s"),
           ("ok", "gpu-hours", f"{tp.gpu_hours:.1f} GPU-hours ({gpus} GPUs)" if gpus else
            "none: a CPU run (infrastructure.num_gpus=0)")]
    requeues = tp.jobs - 1
    detail = f"{tp.jobs} job(s) of slurm.time_min={sc.time_min}: {requeues} requeue(s)"
    if requeues > sc.max_restarts:
        out.append(("FAIL", "requeues", f"{detail}, more than slurm.max_restarts={sc.max_restarts}: raise "
                    f"slurm.max_restarts to {requeues} or slurm.time_min"))
    else:
        out.append(("ok", "requeues", f"{detail} (slurm.max_restarts={sc.max_restarts})"))
    out.append(("ok", "disk", disk.lines()[0].removeprefix("disk: ")))
    margin = tp.signal_delay_s - tp.save_s
    if margin < 30:
        out.append(("FAIL", "save window", f"a checkpoint takes {tp.save_s:.1f} s on run.root, "
                    f"slurm.signal_delay_s={tp.signal_delay_s} s leaves {margin:.0f} s for the step in flight: "
                    "raise slurm.signal_delay_s"))
    else:
        out.append(("ok", "save window", f"a checkpoint takes {tp.save_s:.1f} s on run.root, within the "
                    f"{tp.signal_delay_s} s of slurm.signal_delay_s"))
    return out

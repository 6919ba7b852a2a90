"""The sections of the jobs around the model: ``slurm`` (sbatch options per stage), ``eval`` (the checkpoint
evaluation stage) and ``run`` (where the run directory lives). Part of :mod:`ddpm.config`, which re-exports
them and builds the tree; split out to keep each file readable."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ddpm.configtools import require

Sampler = Literal["ddpm", "ddim", "dpmpp_2m"]
Spacing = Literal["leading", "trailing"]
PATH = {"path": True}  # field metadata: "~" and "$VAR" are expanded on the machine that loads the config


@dataclass(frozen=True)
class SlurmConfig:
    """sbatch options; placeholders a user edits for their cluster."""

    partition: str | None = None
    """Partition of every job; null = the cluster's default."""
    account: str | None = None
    """sbatch --account."""
    qos: str | None = None
    """sbatch --qos."""
    gres: str | None = None
    """GPUs of the training job, e.g. gpu:A6000:1; null = gpu:<infrastructure.num_gpus>."""
    cpus_per_task: int = 8
    """CPUs of each task (loader workers and torch threads share them)."""
    mem_gb: int = 64
    """Memory per node."""
    time_min: int = 1440
    """Time limit of each job in minutes; a timed-out job is requeued from its checkpoint."""
    signal_delay_s: int = 180
    """Seconds before the time limit that training.stop_signal arrives (time to save)."""
    max_restarts: int = 10
    """Requeues per job (preemptions, time limits, watchdog kills) before giving up."""
    array_parallelism: int = 4
    """Sampling tasks running at once."""
    sample_cpus_per_task: int | None = None
    """CPUs of each sampling task; null = min(cpus_per_task, 4) (no loader: the sampler's threads only)."""
    sample_mem_gb: int | None = None
    """Memory of each sampling task; null = min(mem_gb, 16) (the network, a batch, one shard's images)."""
    sample_time_min: int | None = None
    """Time limit of each sampling task; null = min(time_min, 240) (a stopped shard resumes where it was)."""
    sample_gpus: int | None = None
    """GPUs of each sampling task; null = 1 when infrastructure.num_gpus > 0, else 0."""
    assemble_cpus_per_task: int | None = None
    """CPUs of the assembly job; null = min(cpus_per_task, 4)."""
    assemble_mem_gb: int | None = None
    """Memory of the assembly job; null = 2 GB plus 3x the npz, at most mem_gb."""
    assemble_time_min: int | None = None
    """Time limit of the assembly job; null = min(time_min, 30)."""
    additional: dict[str, str] = field(default_factory=dict)
    """Extra sbatch options, e.g. {constraint: A6000}."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before each job (module load, conda activate)."""

    def __post_init__(self) -> None:
        for key in ("cpus_per_task", "mem_gb", "time_min", "array_parallelism"):
            require(getattr(self, key) >= 1, f"slurm.{key}", getattr(self, key), "an integer >= 1")
        for key in ("sample_cpus_per_task", "sample_mem_gb", "sample_time_min", "sample_gpus",
                    "assemble_cpus_per_task", "assemble_mem_gb", "assemble_time_min"):
            low = 0 if key == "sample_gpus" else 1
            require(getattr(self, key) is None or getattr(self, key) >= low, f"slurm.{key}", getattr(self, key),
                    f"null or an integer >= {low}")
        require(self.signal_delay_s >= 30, "slurm.signal_delay_s", self.signal_delay_s,
                "an integer >= 30 (seconds before the time limit)")
        # Slurm may send the --signal up to 60 s before the requested time (sbatch(1), --signal): a limit
        # shorter than that would stop the job as it starts.
        require(self.time_min * 60 > self.signal_delay_s + 60, "slurm.time_min", self.time_min,
                f"more than {(self.signal_delay_s + 60) / 60:g} minutes: slurm.signal_delay_s + 60 s")
        require(self.max_restarts >= 0, "slurm.max_restarts", self.max_restarts, "an integer >= 0")


@dataclass(frozen=True)
class EvalConfig:
    """The eval stage: FID of each milestone checkpoint from a few cheap samples; the best one is sampled."""

    enabled: bool = False
    """Run the eval array (a task per milestone checkpoint) and the selection job before sampling."""
    num_samples: int = 1000
    """Images per seed and checkpoint (FID is biased upwards at small n: compare only at equal n)."""
    num_seeds: int = 1
    """Independent sample sets per checkpoint; fid.json reports each, their mean and spread."""
    sampler: Sampler = "ddim"
    """A cheap sampler: ddim or dpmpp_2m at few steps (ddpm works too)."""
    num_steps: int = 50
    """Denoising steps of the eval sampler."""
    timestep_spacing: Spacing = "trailing"
    """Timesteps the respaced eval sampler visits."""
    batch_size: int = 250
    """Images per forward pass (any value gives the same images)."""
    seed_base: int = 1_000_000
    """Image i of seed set s is drawn with seed seed_base + s * num_samples + i (apart from the final set's)."""

    def __post_init__(self) -> None:
        for key in ("num_samples", "num_seeds", "num_steps", "batch_size"):
            require(getattr(self, key) >= 1, f"eval.{key}", getattr(self, key), "an integer >= 1")
        require(self.num_samples >= 2, "eval.num_samples", self.num_samples, "an integer >= 2 (a covariance)")
        require(self.seed_base >= 0, "eval.seed_base", self.seed_base, "an integer >= 0")


@dataclass(frozen=True)
class RunConfig:
    """Where the run directory lives: <root>/<name>, on shared storage."""

    root: str = field(default="runs", metadata=PATH)
    """Directory holding the runs (shared storage on a cluster)."""
    name: str = "ddpm"
    """The run's name; requeues and resubmissions with the same name continue it."""

    def __post_init__(self) -> None:
        require(bool(self.name) and "/" not in self.name, "run.name", self.name, "a non-empty name without '/'")

"""The sections of the jobs around the model: ``sampling`` (the sampler and the final sample set), ``eval`` (the
checkpoint evaluation stage, with a sampling section of its own), ``slurm`` (sbatch options per stage) and ``run``
(where the run directory lives). Part of :mod:`ddpm.config`, which re-exports them and builds the tree; split out
to keep each file readable."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Literal

from ddpm.configtools import FrozenMap, check_fields, require
from ddpm.samplers import SPACINGS, sampler_names

Sampler = Literal[sampler_names()]  # the registry's names (ddpm.samplers): a new sampler module adds its own
Spacing = Literal[SPACINGS]
Precision = Literal["fp32", "bf16", "fp16"]
PATH = {"path": True}  # field metadata: "~" and "$VAR" are expanded on the machine that loads the config


def read_checkpoint_ref(text: str) -> tuple[Literal["latest", "best", "step", "path"], int | None, str | None]:
    """The grammar of ``sampling.checkpoint``: (kind, step, path) of ``latest``, ``best``, ``step_<N>`` or a path
    to a checkpoint file; ValueError when ``text`` is none of the four. :class:`ddpm.checkpoint.CheckpointRef`
    resolves it in a run."""
    if text in ("latest", "best"):
        return text, None, None  # type: ignore[return-value]
    if text.startswith("step_") and text[5:].isdigit():
        return "step", int(text[5:]), None
    if text.endswith(".pt") or "/" in text:
        return "path", None, text
    raise ValueError(text)


def _is_reference(text: str) -> bool:
    try:
        read_checkpoint_ref(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class SamplingConfig:
    """The sampler and how the final sample set is sharded; one object from the config to the shard json."""

    num_steps: int = field(default=1000, metadata={"pixels": True})
    """Denoising steps (<= ddpm.num_timesteps); fewer steps respace the schedule."""
    sampler: Sampler = field(default="ddpm", metadata={"pixels": True})
    """A sampler of ddpm.samplers: ddpm (ancestral, Ho et al. Algorithm 2), ddim (Song et al. 2021), dpmpp_2m
    (DPM-Solver++(2M), Lu 2022), dpmpp_2m_sde (its SDE variant), or any module added there."""
    eta: float = field(default=0.0, metadata={"pixels": True})
    """DDIM stochasticity: 0 deterministic, 1 matches DDPM's variance."""
    timestep_spacing: Spacing = field(default="leading", metadata={"pixels": True})
    """Which timesteps a sampler visits, as diffusers' scheduler for that sampler picks them (timestep_spacing):
    trailing T-1 down by T/S; leading multiples of T//S from 0 (ddpm, ddim), of T//(S+1) from T//(S+1) (DPM-Solver)."""
    num_samples: int = field(default=10000, metadata={"pixels": True})
    """Images in the final set (the npz)."""
    num_shards: int = field(default=8, metadata={"pixels": True})
    """Tasks of the sampling array; shard k draws a contiguous range of image indices."""
    batch_size: int = 250
    """Images per forward pass of one shard (any value gives the same images)."""
    seed_base: int = field(default=0, metadata={"pixels": True})
    """Image i is drawn with seed seed_base + i, whatever the shard count or batch size."""
    use_ema: bool = field(default=True, metadata={"pixels": True})
    """Sample with the EMA weights (else the raw weights)."""
    precision: Precision = field(default="fp32", metadata={"pixels": True})
    """The network's autocast: fp32 none; bf16 (CUDA cards with native bf16, sm >= 80, and the CPU); fp16 (CUDA
    only). The sampler's arithmetic stays fp32/fp64. A card without native bf16 asked for bf16 stops with one line."""
    compile: bool = False
    """torch.compile the network for the fixed sampling shape (mode reduce-overhead on CUDA: CUDA graphs)."""
    fid: bool = False
    """Store Inception statistics with each shard and compute FID at assembly."""
    fid_weights: str | None = field(default=None, metadata=PATH)
    """The pt_inception-2015-12-05 weights file; null = the torch hub cache."""
    fid_reference: str | None = field(default=None, metadata=PATH)
    """Reference statistics npz from `python -m ddpm.fid ref`."""
    checkpoint: str | None = field(default=None, metadata=PATH)
    """The final set's checkpoint (ddpm.checkpoint.CheckpointRef): best (eval/fid.json), latest, step_<N>, or a
    path to a .pt file; null: best if eval.enabled, else latest."""

    def __post_init__(self) -> None:
        check_fields(self, "sampling")
        require(self.num_steps >= 1, "sampling.num_steps", self.num_steps, "an integer >= 1")
        require(0.0 <= self.eta <= 1.0, "sampling.eta", self.eta, "a float in [0, 1]")
        for key in ("num_samples", "num_shards", "batch_size"):
            require(getattr(self, key) >= 1, f"sampling.{key}", getattr(self, key), "an integer >= 1")
        require(self.num_shards <= self.num_samples, "sampling.num_shards", self.num_shards,
                f"at most sampling.num_samples ({self.num_samples})")
        require(self.seed_base >= 0, "sampling.seed_base", self.seed_base, "an integer >= 0")
        require(self.checkpoint is None or _is_reference(self.checkpoint), "sampling.checkpoint", self.checkpoint,
                "null, best, latest, step_<N> or a path to a checkpoint file (.pt)")

    def pixel_settings(self) -> dict[str, Any]:
        """The fields that decide a shard's pixels (a partial or complete shard is reused only if all match)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("pixels")}


@dataclass(frozen=True)
class EvalSamplingConfig:
    """The eval stage's sampler: the keys of a sampling section it reads, with cheap defaults (DDIM, 50 trailing
    steps, 1000 images per seed set from seeds far from the final set's). The stage draws one shard per seed set,
    always scores FID, with sampling.fid_weights and sampling.fid_reference, from every milestone checkpoint
    (:func:`ddpm.evaluate.eval_sampling` makes the SamplingConfig it runs)."""

    FIXED: ClassVar[Mapping[str, str]] = MappingProxyType({  # sampling keys the eval stage decides itself
        "num_shards": "the eval stage draws one shard per seed set (eval.num_seeds)",
        "fid": "the eval stage always scores FID",
        "fid_weights": "the eval stage uses sampling.fid_weights",
        "fid_reference": "the eval stage uses sampling.fid_reference",
        "checkpoint": "the eval stage scores every milestone checkpoint"})

    num_steps: int = 50
    """Denoising steps (<= ddpm.num_timesteps)."""
    sampler: Sampler = "ddim"
    """A sampler of ddpm.samplers (as sampling.sampler)."""
    eta: float = 0.0
    """DDIM stochasticity: 0 deterministic, 1 matches DDPM's variance."""
    timestep_spacing: Spacing = "trailing"
    """Which timesteps the sampler visits (as sampling.timestep_spacing)."""
    num_samples: int = 1000
    """Images per seed set and checkpoint (FID is biased upwards at small n: compare only at equal n)."""
    batch_size: int = 250
    """Images per forward pass (any value gives the same images)."""
    seed_base: int = 1_000_000
    """Image i of seed set s is drawn with seed seed_base + s * num_samples + i (away from the final set's)."""
    use_ema: bool = True
    """Sample with the EMA weights (else the raw weights)."""
    precision: Precision = "fp32"
    """The network's autocast (as sampling.precision)."""
    compile: bool = False
    """torch.compile the network for the fixed sampling shape."""

    def __post_init__(self) -> None:
        check_fields(self, "eval.sampling")
        require(self.num_steps >= 1, "eval.sampling.num_steps", self.num_steps, "an integer >= 1")
        require(0.0 <= self.eta <= 1.0, "eval.sampling.eta", self.eta, "a float in [0, 1]")
        require(self.num_samples >= 2, "eval.sampling.num_samples", self.num_samples, "an integer >= 2 (a covariance)")
        require(self.batch_size >= 1, "eval.sampling.batch_size", self.batch_size, "an integer >= 1")
        require(self.seed_base >= 0, "eval.sampling.seed_base", self.seed_base, "an integer >= 0")


@dataclass(frozen=True)
class EvalConfig:
    """The eval stage: FID of each milestone checkpoint from a few cheap samples; the best one is sampled."""

    MOVED: ClassVar[Mapping[str, str]] = MappingProxyType(
        {k: f"eval.sampling.{k}" for k in ("sampler", "num_steps", "timestep_spacing", "batch_size", "seed_base",
                                            "num_samples")})

    enabled: bool = False
    """Run the eval array (a task per milestone checkpoint) and the selection job before sampling."""
    num_seeds: int = 1
    """Independent sample sets per checkpoint; fid.json reports each, their mean and spread."""
    sampling: EvalSamplingConfig = field(default_factory=EvalSamplingConfig)
    """The eval sampler (cheap defaults: ddim, 50 trailing steps, 1000 images per seed set)."""

    def __post_init__(self) -> None:
        check_fields(self, "eval")
        require(self.num_seeds >= 1, "eval.num_seeds", self.num_seeds, "an integer >= 1")


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
    additional: Mapping[str, str] = field(default_factory=FrozenMap)
    """Extra sbatch options, e.g. {constraint: A6000} (read-only once built; values are strings)."""
    setup: tuple[str, ...] = ()
    """Shell lines run before each job (module load, conda activate)."""

    def __post_init__(self) -> None:
        check_fields(self, "slurm")
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
class RunConfig:
    """Where the run directory lives: <root>/<name>, on shared storage."""

    root: str = field(default="runs", metadata=PATH)
    """Directory holding the runs (shared storage on a cluster)."""
    name: str = "ddpm"
    """The run's name (letters, digits, '.', '_', '-'); requeues and resubmissions with the same name continue it."""

    NAME_CHARS: ClassVar[str] = "letters, digits, '.', '_' and '-'"  # what a path, a job name and a shell take as is

    def __post_init__(self) -> None:
        check_fields(self, "run")
        name = self.name
        require(bool(name), "run.name", name, f"a non-empty name of {self.NAME_CHARS}")
        bad = next((c for c in name if not (c.isascii() and (c.isalnum() or c in "._-"))), None)
        require(bad is None, "run.name", name, f"{self.NAME_CHARS} only, not {bad!r}: the name becomes a directory, "
                "SLURM job names and the commands printed to copy")
        require(name not in (".", ".."), "run.name", name, "a directory of its own under run.root, not '.' or '..'")

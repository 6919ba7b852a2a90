"""One typed config tree: a frozen dataclass per section, YAML files plus dotted overrides.

    cfg = load_config("configs/ddpm_babel.yaml", ["training.batch_size=8"])
    cfg.training.learning_rate  # 0.0002 (a float, also when YAML read "2e-4" as a string)
    dataclasses.replace(cfg.sampling, num_steps=50)  # a new, validated section

Every key is declared here (or, for the job sections ``sampling``, ``eval``, ``slurm``, ``run``, in
:mod:`ddpm.jobconfig`), once, with the docstring under it. A section checks its own values in ``__post_init__``:
first each value's type (a ``Literal``'s choices, ``int`` never ``bool``; lists become tuples, mappings read-only),
then ranges, so one built in Python is as valid as one read from YAML and fails with the same line. :class:`Config`
checks what spans sections (the U-Net's attention resolutions and heads against the image size, for ``sampling`` and
``eval.sampling`` a registered sampler and its own limit on ``num_steps`` against ``ddpm.num_timesteps``
(:mod:`ddpm.samplers`), fp16 only with a GPU). Unknown keys, wrong types and
bad values raise :class:`ConfigError` with one line naming the key; a key that moved names its new home
(``eval.num_steps moved: use eval.sampling.num_steps``). ``to_dict`` gives plain YAML types (lists, dicts).
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Literal

import yaml

from ddpm.architecture import architecture_problem
from ddpm.configtools import apply_overrides, check_fields, describe, plain, read_yaml, require, tree_from_dict
from ddpm.fsio import atomic_write_text
from ddpm.jobconfig import PATH, EvalConfig, Precision, RunConfig, Sampler, SamplingConfig, SlurmConfig, Spacing
from ddpm.rundir import RunDir
from ddpm.samplers import get_sampler, sampler_names

__all__ = ["Config", "EvalConfig", "Precision", "RunConfig", "Sampler", "SamplingConfig", "SlurmConfig", "Spacing",
           "choices", "dump_config", "load_config"]

Variance = Literal["fixed_small", "fixed_large"]
Source = Literal["folder", "celeba", "hf", "packed"]
StopSignal = Literal["USR1", "USR2", "TERM", "INT"]


@dataclass(frozen=True)
class ModelConfig:
    """U-Net architecture (improved-diffusion's UNetModel hyperparameters)."""

    in_channels: int = 3
    """Image channels: 3 for RGB, 1 to train on greyscale (the mean of the RGB channels the loader reads)."""
    base_channels: int = 128
    """Width of the first level; level i has channel_mult[i] * base_channels."""
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    """Width multiplier per resolution level; len(channel_mult) - 1 downsamplings."""
    num_res_blocks: int = 2
    """ResBlocks per level in the encoder (the decoder has one more)."""
    attention_resolutions: tuple[int, ...] = (16, 8)
    """Feature-map sizes (pixels) with self-attention after each ResBlock."""
    num_heads: int = 4
    """Attention heads; must divide the channels at every attention."""
    num_head_channels: int | None = None
    """Fixed attention head size (improved-diffusion's option): width / num_head_channels heads at each attention;
    null = model.num_heads everywhere. diffusers' UNet2DModel has one head size (README, Share a model)."""
    dropout: float = 0.1
    """Dropout inside the ResBlocks."""
    use_scale_shift_norm: bool = True
    """FiLM-style time conditioning: GroupNorm(h) * (1 + scale) + shift (improved-diffusion)."""

    def __post_init__(self) -> None:
        check_fields(self, "model")
        require(self.in_channels in (1, 3), "model.in_channels", self.in_channels, "1 (greyscale) or 3 (RGB)")
        for key in ("base_channels", "num_res_blocks", "num_heads"):
            require(getattr(self, key) >= 1, f"model.{key}", getattr(self, key), "an integer >= 1")
        require(bool(self.channel_mult) and min(self.channel_mult) >= 1, "model.channel_mult",
                self.channel_mult, "a non-empty list of integers >= 1")
        require(all(r >= 1 for r in self.attention_resolutions), "model.attention_resolutions",
                self.attention_resolutions, "a list of resolutions >= 1")
        require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "a float in [0, 1)")
        require(self.num_head_channels is None or self.num_head_channels >= 1, "model.num_head_channels",
                self.num_head_channels, "null or an integer >= 1")


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation, EMA, logging and checkpoint cadence."""

    batch_size: int = 64
    """Images per step, summed over all ranks (divisible by the world size)."""
    learning_rate: float = 2e-4
    """AdamW learning rate after warm-up."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: tuple[float, ...] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps; 0 = none."""
    cooldown_steps: int = 0
    """Linear learning-rate decay to 0 over the run's last steps; 0 = none (constant, as Ho et al.)."""
    ema_decay: float = 0.9999
    """EMA decay of the sampling weights (Ho et al. Appendix B)."""
    ema_start: int = 5000
    """Step from which the EMA averages; before it, the EMA copies the weights."""
    gradient_clip_norm: float = 1.0
    """Global gradient-norm clip; 0 disables clipping."""
    num_iterations: int = 100000
    """Optimizer steps in the whole run."""
    log_every: int = 100
    """Steps between log lines and TensorBoard scalars."""
    sample_every: int = 5000
    """Steps between the periodic sample grids (grids/ and TensorBoard)."""
    save_every: int = 10000
    """Steps between checkpoints (a stop signal and the last step also save)."""
    num_samples: int = 64
    """Images in each periodic grid (seeds 0..num_samples-1)."""
    keep_last: int = 2
    """Newest checkpoints kept besides milestones (>= 2, so one always survives a bad write)."""
    milestone_every: int = 0
    """Steps whose checkpoints are never deleted; 0 = none."""
    seed: int = 0
    """Seed of the data order, the noise and timesteps of every step, and dropout."""
    stop_signal: StopSignal = "USR2"
    """The signal SLURM sends every training, eval and sampling job before its time limit (sbatch --signal): the
    trainer saves, a sampling task keeps its partial shard; SIGTERM (preemption) always stops too."""
    watchdog_s: int = 600
    """No trainer heartbeat for this long (a hung or lost rank): processes killed, job requeued; 0 = off."""
    deterministic: bool = False
    """Deterministic kernels only (cuDNN, torch.use_deterministic_algorithms; slower): bitwise-exact resume on
    GPUs too (CPU runs are exact either way); false = cuDNN benchmark on CUDA."""
    init_from: str | None = field(default=None, metadata=PATH)
    """A diffusers UNet2DModel folder (published, or an export of ours) a new run starts from (a run that has a
    checkpoint resumes from it instead); the model section must describe the same network."""

    def __post_init__(self) -> None:
        check_fields(self, "training")
        for key in ("batch_size", "num_iterations", "log_every", "sample_every", "save_every", "num_samples"):
            require(getattr(self, key) >= 1, f"training.{key}", getattr(self, key), "an integer >= 1")
        require(self.learning_rate > 0, "training.learning_rate", self.learning_rate, "a float > 0")
        require(self.weight_decay >= 0, "training.weight_decay", self.weight_decay, "a float >= 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "training.betas",
                self.betas, "two floats in [0, 1)")
        for key in ("warmup_steps", "cooldown_steps", "ema_start", "milestone_every"):
            require(getattr(self, key) >= 0, f"training.{key}", getattr(self, key), "an integer >= 0")
        require(0 <= self.ema_decay < 1, "training.ema_decay", self.ema_decay, "a float in [0, 1)")
        require(self.gradient_clip_norm >= 0, "training.gradient_clip_norm", self.gradient_clip_norm,
                "a float >= 0 (0 disables clipping)")
        require(self.keep_last >= 2, "training.keep_last", self.keep_last, "an integer >= 2")
        require(self.watchdog_s == 0 or self.watchdog_s >= 10, "training.watchdog_s", self.watchdog_s,
                "0 (off) or an integer >= 10 (seconds)")
        require(self.warmup_steps + self.cooldown_steps <= self.num_iterations, "training.cooldown_steps",
                self.cooldown_steps, f"an integer <= num_iterations - warmup_steps ({self.num_iterations}"
                f" - {self.warmup_steps})")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): linear warm-up, constant, linear cool-down to 0."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        cool = min(1.0, (self.num_iterations - step) / self.cooldown_steps) if self.cooldown_steps else 1.0
        return self.learning_rate * min(warm, cool)


@dataclass(frozen=True)
class DDPMConfig:
    """Noise schedule (Ho et al. 2020, linear betas)."""

    num_timesteps: int = 1000
    """T, the number of diffusion steps."""
    beta_start: float = 1e-4
    """beta_1 of the linear schedule."""
    beta_end: float = 0.02
    """beta_T of the linear schedule."""
    variance: Variance = "fixed_small"
    """Reverse-process variance: beta~_t (fixed_small) or beta_t (fixed_large), Ho et al. Sec. 3.2."""

    def __post_init__(self) -> None:
        check_fields(self, "ddpm")
        require(self.num_timesteps >= 2, "ddpm.num_timesteps", self.num_timesteps, "an integer >= 2")
        require(0 < self.beta_start < 1, "ddpm.beta_start", self.beta_start, "a float in (0, 1)")
        require(self.beta_start <= self.beta_end < 1, "ddpm.beta_end", self.beta_end, "a float in [beta_start, 1)")


@dataclass(frozen=True)
class InfrastructureConfig:
    """Processes, devices, precision and the fast paths."""

    MOVED: ClassVar[Mapping[str, str]] = MappingProxyType({
        "mixed_precision": "infrastructure.precision (fp32, bf16 or fp16)",
        "mixed_precision_on_cpu": "infrastructure.precision (bf16 autocasts on the CPU too)"})

    num_gpus: int = 1
    """GPUs (ranks) per node; 0 = CPU."""
    num_nodes: int = 1
    """Nodes of the training job (one torchrun per node)."""
    nproc_per_node: int = 1
    """CPU ranks per node when num_gpus is 0."""
    precision: Precision = "bf16"
    """Training's autocast: fp32 none; bf16 on CUDA cards with native bf16 (sm >= 80) and on the CPU (where it is
    asked for: CPU configs say fp32); fp16 with a grad scaler, CUDA only (cards without native bf16: V100, T4).
    bf16 on a card without native bf16 stops before any work with one line (the fix: fp16)."""
    channels_last: bool | None = None
    """NHWC activations; null = by device: on for CPU (measured there: +5-13%, python -m tools.bench), off for
    CUDA (not measured there; GroupNorm makes NHWC inputs contiguous, a copy per norm)."""
    compile: bool = False
    """torch.compile the network."""
    fused_adam: bool = True
    """One fused AdamW kernel, on CUDA and on CPU."""
    tf32: bool = True
    """TF32 matmuls and convolutions on CUDA Ampere and newer (training, sampling, eval); false = full fp32.
    FID's Inception always runs in full fp32."""

    def __post_init__(self) -> None:
        check_fields(self, "infrastructure")
        require(self.num_gpus >= 0, "infrastructure.num_gpus", self.num_gpus, "an integer >= 0")
        for key in ("num_nodes", "nproc_per_node"):
            require(getattr(self, key) >= 1, f"infrastructure.{key}", getattr(self, key), "an integer >= 1")
        require(self.num_gpus > 0 or self.precision != "fp16", "infrastructure.precision", self.precision,
                "fp32 or bf16 when infrastructure.num_gpus is 0: fp16 and its grad scaler need a CUDA GPU")

    @property
    def world_size(self) -> int:
        """Training ranks: nodes x (GPUs, or CPU processes, per node)."""
        return self.num_nodes * (self.num_gpus if self.num_gpus > 0 else self.nproc_per_node)


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are prepared (ddpm.data.sources explains each source)."""

    source: Source = "celeba"
    """folder, celeba (torchvision's layout), hf (a datasets dataset) or packed (python -m ddpm.data pack)."""
    path: str | None = field(default=None, metadata=PATH)
    """The folder, CelebA root, dataset directory or packed .npy file."""
    hf_name: str | None = None
    """A Hugging Face hub dataset name (source hf without a local path)."""
    image_column: str = "image"
    """The image column of an hf dataset."""
    split: str = "train"
    """Split of celeba (train, valid, test, all) or hf; folder and packed ignore it."""
    image_size: int = 64
    """Side of the square training images."""
    center_crop: int | None = 140
    """Side of the square crop in source pixels before resizing (aligned CelebA: 140); null = no crop."""
    crop_center: tuple[int, ...] | None = None
    """[x, y] of the crop box's centre in source pixels; null = the image centre."""
    random_flip: bool = True
    """Random horizontal flips (a pure function of seed, epoch and image)."""
    num_workers: int | None = None
    """Loader worker processes; null = the CPU budget's (ddpm.cpus: 1 on CPU, CPUs - 2 up to 8 on a GPU)."""
    skip_bad_images: bool = False
    """Drop unreadable images with a warning instead of stopping."""

    def __post_init__(self) -> None:
        check_fields(self, "data")
        require(self.image_size >= 1, "data.image_size", self.image_size, "an integer >= 1")
        require(self.center_crop is None or self.center_crop >= 1, "data.center_crop", self.center_crop,
                "null or an integer >= 1")
        require(self.crop_center is None or (len(self.crop_center) == 2 and min(self.crop_center) >= 0),
                "data.crop_center", self.crop_center, "null or [x, y], two integers >= 0")
        require(self.crop_center is None or self.center_crop is not None, "data.crop_center", self.crop_center,
                "null when data.center_crop is null (it places the crop box)")
        require(self.num_workers is None or self.num_workers >= 0, "data.num_workers", self.num_workers,
                "null or an integer >= 0")


@dataclass(frozen=True)
class Config:
    """The whole tree; each component receives only its own section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    ddpm: DDPMConfig = field(default_factory=DDPMConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    infrastructure: InfrastructureConfig = field(default_factory=InfrastructureConfig)
    data: DataConfig = field(default_factory=DataConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        """Checks that span sections (each section has checked itself; given as mappings, they are built here)."""
        check_fields(self, "")
        m = self.model
        problem = architecture_problem(self.data.image_size, list(m.channel_mult), list(m.attention_resolutions),
                                       m.base_channels, m.num_heads, m.num_head_channels)
        if problem is not None:
            require(False, *problem)
        T = self.ddpm.num_timesteps
        gpus, gpus_key = self.task_gpus
        for key, part in (("sampling", self.sampling), ("eval.sampling", self.eval.sampling)):
            require(part.sampler in sampler_names(), f"{key}.sampler", part.sampler,
                    f"one of {', '.join(sampler_names())} (the samplers of ddpm.samplers)")
            most, why = get_sampler(part.sampler).most_steps(T, part.timestep_spacing)  # the sampler's own limit
            require(part.num_steps <= most, f"{key}.num_steps", part.num_steps, f"at most ddpm.num_timesteps ({T})"
                    if why is None else f"at most ddpm.num_timesteps - {T - most} ({most}) for {part.sampler} {why}")
            require(gpus > 0 or part.precision != "fp16", f"{key}.precision", part.precision,
                    f"fp32 or bf16 for a CPU task ({gpus_key} gives it no GPU): fp16 autocast needs a CUDA GPU")
        world = self.infrastructure.world_size
        require(self.training.batch_size % world == 0, "training.batch_size", self.training.batch_size,
                f"divisible by the {world} training ranks (infrastructure.num_nodes x GPUs or nproc_per_node)")

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types only (safe for YAML and ``torch.load(weights_only=True)``)."""
        return plain(self)

    @property
    def run_dir(self) -> RunDir:
        """The run directory this config names, ``<run.root>/<run.name>``, with every path in it."""
        return RunDir(Path(self.run.root) / self.run.name)

    @property
    def task_gpus(self) -> tuple[int, str]:
        """(GPUs of one sampling or eval task, the key that says so): :func:`task_gpus`."""
        return task_gpus(self.slurm.sample_gpus, self.infrastructure.num_gpus)


def task_gpus(sample_gpus: int | None, num_gpus: int) -> tuple[int, str]:
    """(GPUs of one sampling or eval task, the key that says so): ``slurm.sample_gpus``, else one GPU when training
    uses GPUs (``infrastructure.num_gpus`` > 0). The rule of :attr:`Config.task_gpus`, also for a checkpoint's
    plain config dict."""
    if sample_gpus is not None:
        return sample_gpus, "slurm.sample_gpus"
    return int(num_gpus > 0), "infrastructure.num_gpus"


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from nested plain types; unknown names are errors."""
    return tree_from_dict(Config, raw)


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> Config:
    """Load ``path`` (or the defaults when None), apply ``section.key=value`` overrides, validate."""
    raw = read_yaml(path) if path is not None else {}
    return config_from_dict(apply_overrides(raw, overrides))


def dump_config(cfg: Config, path: str | Path | None = None) -> str:
    """Resolved config as YAML text (sections in declaration order); written to ``path`` if given."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
    if path is not None:  # atomically: several nodes may write the same file
        atomic_write_text(path, text)
    return text


def choices(literal: Any) -> tuple[str, ...]:
    """The strings of a ``Literal`` alias: ``choices(Spacing) == ("leading", "trailing")``."""
    return typing.get_args(literal)


if __name__ == "__main__":  # python -m ddpm.config: every key, its type, default and meaning
    print(describe(Config))

"""One typed config tree: a dataclass per section, YAML files plus dotted overrides.

    cfg = load_config("configs/ddpm_babel.yaml", ["training.batch_size=8"])
    cfg.training.learning_rate  # 0.0002 (a float, also when YAML read "2e-4" as a string)

Every key is declared here and only here. Unknown sections or keys, wrong types and out-of-range
values raise :class:`ConfigError` with one line that names the key, the value and what was expected.
"""

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ddpm.checkpoint import atomic_write_text
from ddpm.errors import ConfigError

_PATH_KEYS = (("run", "root"), ("data", "path"), ("sampling", "fid_weights"), ("sampling", "fid_reference"))


@dataclass
class ModelConfig:
    """U-Net architecture (improved-diffusion's UNetModel hyperparameters)."""

    in_channels: int = 3
    base_channels: int = 128
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 4])
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [16, 8])
    num_heads: int = 4
    dropout: float = 0.1
    use_scale_shift_norm: bool = True

    def validate(self) -> None:
        _require(self.in_channels >= 1, "model.in_channels", self.in_channels, "an integer >= 1")
        _require(self.base_channels >= 1, "model.base_channels", self.base_channels, "an integer >= 1")
        _require(bool(self.channel_mult) and min(self.channel_mult) >= 1, "model.channel_mult",
                 self.channel_mult, "a non-empty list of integers >= 1")
        _require(self.num_res_blocks >= 1, "model.num_res_blocks", self.num_res_blocks, "an integer >= 1")
        _require(all(r >= 1 for r in self.attention_resolutions), "model.attention_resolutions",
                 self.attention_resolutions, "a list of resolutions >= 1")
        _require(self.num_heads >= 1, "model.num_heads", self.num_heads, "an integer >= 1")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "a float in [0, 1)")


@dataclass
class TrainingConfig:
    """Optimisation, EMA, logging and checkpoint cadence."""

    batch_size: int = 64  # per step, summed over all ranks
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    ema_decay: float = 0.9999
    ema_start: int = 5000
    gradient_clip_norm: float = 1.0  # 0 disables clipping
    num_iterations: int = 100000
    log_every: int = 100
    sample_every: int = 5000
    save_every: int = 10000
    num_samples: int = 64  # images in the periodic training grids
    keep_last: int = 2  # newest checkpoints kept besides milestones
    milestone_every: int = 0  # steps whose checkpoints are never deleted; 0 = none
    seed: int = 0
    stop_signal: str = "USR2"
    watchdog_s: int = 600  # no step for this long (above a grid or a save): hung, ended, requeued; 0 = off

    def validate(self) -> None:
        for key in ("batch_size", "num_iterations", "log_every", "sample_every", "save_every", "num_samples"):
            _require(getattr(self, key) >= 1, f"training.{key}", getattr(self, key), "an integer >= 1")
        _require(self.learning_rate > 0, "training.learning_rate", self.learning_rate, "a float > 0")
        _require(self.weight_decay >= 0, "training.weight_decay", self.weight_decay, "a float >= 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "training.betas",
                 self.betas, "two floats in [0, 1)")
        for key in ("warmup_steps", "ema_start", "milestone_every"):
            _require(getattr(self, key) >= 0, f"training.{key}", getattr(self, key), "an integer >= 0")
        _require(0 <= self.ema_decay < 1, "training.ema_decay", self.ema_decay, "a float in [0, 1)")
        _require(self.gradient_clip_norm >= 0, "training.gradient_clip_norm", self.gradient_clip_norm,
                 "a float >= 0 (0 disables clipping)")
        _require(self.keep_last >= 2, "training.keep_last", self.keep_last, "an integer >= 2")
        _require(self.watchdog_s == 0 or self.watchdog_s >= 10, "training.watchdog_s", self.watchdog_s,
                 "0 (off) or an integer >= 10 (seconds)")
        _require(self.stop_signal in ("USR1", "USR2", "TERM", "INT"), "training.stop_signal",
                 self.stop_signal, "one of USR1, USR2, TERM, INT")


@dataclass
class DDPMConfig:
    """Noise schedule (Ho et al. 2020, linear betas)."""

    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    variance: str = "fixed_small"

    def validate(self) -> None:
        _require(self.num_timesteps >= 2, "ddpm.num_timesteps", self.num_timesteps, "an integer >= 2")
        _require(0 < self.beta_start < 1, "ddpm.beta_start", self.beta_start, "a float in (0, 1)")
        _require(self.beta_start <= self.beta_end < 1, "ddpm.beta_end", self.beta_end,
                 "a float in [beta_start, 1)")
        _require(self.variance in ("fixed_small", "fixed_large"), "ddpm.variance", self.variance,
                 "fixed_small or fixed_large")


@dataclass
class SamplingConfig:
    """Final sampling: sampler settings and how the work is sharded."""

    num_steps: int = 1000
    sampler: str = "ddpm"
    eta: float = 0.0
    timestep_spacing: str = "leading"
    num_samples: int = 10000
    num_shards: int = 8
    batch_size: int = 250
    seed_base: int = 0
    use_ema: bool = True
    fid: bool = False
    fid_weights: str | None = None  # pt_inception-2015-12-05 file; None = torch hub cache
    fid_reference: str | None = None  # npz from `python -m ddpm.fid ref`

    def validate(self) -> None:
        _require(self.num_steps >= 1, "sampling.num_steps", self.num_steps, "an integer >= 1")
        _require(self.sampler in ("ddpm", "ddim"), "sampling.sampler", self.sampler, "ddpm or ddim")
        _require(0.0 <= self.eta <= 1.0, "sampling.eta", self.eta, "a float in [0, 1]")
        _require(self.timestep_spacing in ("leading", "trailing"), "sampling.timestep_spacing",
                 self.timestep_spacing, "leading or trailing")
        for key in ("num_samples", "num_shards", "batch_size"):
            _require(getattr(self, key) >= 1, f"sampling.{key}", getattr(self, key), "an integer >= 1")
        _require(self.num_shards <= self.num_samples, "sampling.num_shards", self.num_shards,
                 f"at most sampling.num_samples ({self.num_samples})")
        _require(self.seed_base >= 0, "sampling.seed_base", self.seed_base, "an integer >= 0")


@dataclass
class InfrastructureConfig:
    """Processes, devices, precision and the fast paths."""

    num_gpus: int = 1  # per node; 0 = CPU
    num_nodes: int = 1
    nproc_per_node: int = 1  # CPU processes per node when num_gpus == 0
    mixed_precision: bool = True  # bf16 autocast on CUDA (fp16 + scaler where bf16 is missing)
    mixed_precision_on_cpu: bool = False
    channels_last: bool = True  # NHWC activations: +5-13% training speed on CPU (python -m ddpm.bench)
    compile: bool = False
    fused_adam: bool = True  # one fused AdamW kernel (CUDA; CPU too: 113 -> 37 ms per step at 77.5M)
    tf32: bool = True  # CUDA Ampere and newer

    def validate(self) -> None:
        _require(self.num_gpus >= 0, "infrastructure.num_gpus", self.num_gpus, "an integer >= 0")
        for key in ("num_nodes", "nproc_per_node"):
            _require(getattr(self, key) >= 1, f"infrastructure.{key}", getattr(self, key), "an integer >= 1")


@dataclass
class DataConfig:
    """Where the images come from and how they are prepared."""

    source: str = "celeba"
    path: str | None = None
    hf_name: str | None = None
    image_column: str = "image"
    split: str = "train"
    image_size: int = 64
    center_crop: int | None = 140  # source pixels; aligned CelebA: the 140 centre crop
    crop_center: list[int] | None = None  # [x, y] of the crop box in source pixels; None = image centre
    random_flip: bool = True
    num_workers: int | None = None  # None = SLURM_CPUS_PER_TASK (or 0 outside SLURM)
    skip_bad_images: bool = False

    def validate(self) -> None:
        _require(self.source in ("folder", "celeba", "hf", "packed"), "data.source", self.source,
                 "one of folder, celeba, hf, packed")
        _require(self.image_size >= 1, "data.image_size", self.image_size, "an integer >= 1")
        _require(self.center_crop is None or self.center_crop >= 1, "data.center_crop", self.center_crop,
                 "null or an integer >= 1")
        _require(self.crop_center is None or (len(self.crop_center) == 2 and min(self.crop_center) >= 0),
                 "data.crop_center", self.crop_center, "null or [x, y], two integers >= 0")
        _require(self.crop_center is None or self.center_crop is not None, "data.crop_center", self.crop_center,
                 "null when data.center_crop is null (it places the crop box)")
        _require(self.num_workers is None or self.num_workers >= 0, "data.num_workers", self.num_workers,
                 "null or an integer >= 0")


@dataclass
class SlurmConfig:
    """sbatch options; placeholders a user edits for their cluster."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gres: str | None = None  # e.g. "gpu:A6000:1"; None = gpu:<num_gpus> when num_gpus > 0
    cpus_per_task: int = 8
    mem_gb: int = 64
    time_min: int = 1440
    signal_delay_s: int = 180
    max_restarts: int = 10
    array_parallelism: int = 4
    additional: dict[str, str] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)

    def validate(self) -> None:
        for key in ("cpus_per_task", "mem_gb", "time_min", "array_parallelism"):
            _require(getattr(self, key) >= 1, f"slurm.{key}", getattr(self, key), "an integer >= 1")
        _require(self.signal_delay_s >= 30, "slurm.signal_delay_s", self.signal_delay_s,
                 "an integer >= 30 (seconds before the time limit)")
        # Slurm may send the --signal up to 60 s before the requested time (sbatch(1), --signal): a limit
        # shorter than that would stop the job as it starts.
        _require(self.time_min * 60 > self.signal_delay_s + 60, "slurm.time_min", self.time_min,
                 f"more than {(self.signal_delay_s + 60) / 60:g} minutes: slurm.signal_delay_s + 60 s")
        _require(self.max_restarts >= 0, "slurm.max_restarts", self.max_restarts, "an integer >= 0")


@dataclass
class RunConfig:
    """Where the run directory lives: <root>/<name>, on shared storage."""

    root: str = "runs"
    name: str = "ddpm"

    def validate(self) -> None:
        _require(bool(self.name) and "/" not in self.name, "run.name", self.name,
                 "a non-empty name without '/'")


@dataclass
class Config:
    """The whole tree; each component receives only its own section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    ddpm: DDPMConfig = field(default_factory=DDPMConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    infrastructure: InfrastructureConfig = field(default_factory=InfrastructureConfig)
    data: DataConfig = field(default_factory=DataConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        levels = len(self.model.channel_mult)
        _require(self.data.image_size % 2 ** (levels - 1) == 0, "data.image_size", self.data.image_size,
                 f"divisible by 2^(len(model.channel_mult)-1) = {2 ** (levels - 1)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types only (safe for YAML and ``torch.load(weights_only=True)``)."""
        return dataclasses.asdict(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name


def _require(ok: bool, key: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: invalid value {value!r} (expected {expected})")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "int", float: "float", bool: "bool", str: "str", type(None): "null"}[tp]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to type ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: invalid value {value!r} (expected {_type_name(tp)})")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: invalid value {value!r} (expected a mapping)")
        return {str(k): str(v) for k, v in value.items()}
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "2e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: invalid value {value!r} (expected {_type_name(tp)})")


def _did_you_mean(name: str, choices: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else f" (valid: {', '.join(choices)})"


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from nested plain types; unknown names are errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
    hints = typing.get_type_hints(Config)
    sections: dict[str, Any] = {}
    for sec_name, sec_raw in raw.items():
        if sec_name not in hints:
            raise ConfigError(f"{sec_name}: unknown section{_did_you_mean(str(sec_name), list(hints), '')}")
        sec_cls = hints[sec_name]
        if sec_raw is None:
            sec_raw = {}
        if not isinstance(sec_raw, dict):
            raise ConfigError(f"{sec_name}: expected a mapping of keys, got {sec_raw!r}")
        fields = typing.get_type_hints(sec_cls)
        kwargs = {}
        for key, value in sec_raw.items():
            if key not in fields:
                hint = _did_you_mean(str(key), list(fields), f"{sec_name}.")
                raise ConfigError(f"{sec_name}.{key}: unknown key{hint}")
            kwargs[key] = _coerce(value, fields[key], f"{sec_name}.{key}")
        sections[sec_name] = sec_cls(**kwargs)
    cfg = Config(**sections)
    for sec, key in _PATH_KEYS:  # "${USER}/runs" and "~/data" resolve on the machine that loads
        value = getattr(getattr(cfg, sec), key)
        if value is not None:
            setattr(getattr(cfg, sec), key, os.path.expanduser(os.path.expandvars(value)))
    cfg.validate()
    return cfg


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"training.batch_size=8"`` -> ``("training", "batch_size", 8)``; the value is parsed as YAML."""
    path, sep, value = text.partition("=")
    parts = path.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: expected section.key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err.__class__.__name__})") from None
    return parts[0], parts[1], parsed


def apply_overrides(raw: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Return a copy of the nested dict with every ``section.key=value`` applied."""
    out = {k: dict(v or {}) if isinstance(v, dict) or v is None else v for k, v in raw.items()}
    for text in overrides:
        section, key, value = parse_override(text)
        if not isinstance(out.setdefault(section, {}), dict):
            raise ConfigError(f"{section}: expected a mapping of keys")
        out[section][key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML file into a dict; a missing file or malformed YAML names the file (and line)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        problem = getattr(err, "problem", None) or err.__class__.__name__
        raise ConfigError(f"{where}: malformed YAML ({problem})") from None
    return raw or {}


def load_config(path: str | Path | None, overrides: typing.Iterable[str] = ()) -> Config:
    """Load ``path`` (or the defaults when None), apply overrides, validate."""
    raw = read_yaml(path) if path is not None else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return config_from_dict(apply_overrides(raw, overrides))


def dump_config(cfg: Config, path: str | Path | None = None) -> str:
    """Resolved config as YAML text (sections in declaration order); written to ``path`` if given."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
    if path is not None:  # atomically: several nodes may write the same file
        atomic_write_text(path, text)
    return text

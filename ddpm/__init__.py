"""ddpm-slurm: a DDPM (Ho et al. 2020) trained and sampled as a SLURM batch workflow.

The public API (docs/design.md, Contracts), imported on first use so that ``import ddpm`` stays cheap::

    from ddpm import UNet, DDPM, EMA, load_config, create_dataloader_from_config, save_image
    cfg = load_config("configs/tiny_cpu.yaml")
    model = UNet.from_config(cfg.model, cfg.data.image_size)
    images = DDPM.from_config(cfg.ddpm, model).sample(4, (3, 16, 16), num_steps=10, sampler="ddim")

Layout: model and math (``unet``, ``diffusion``, ``ema``), ``data/``, the run (``train``, ``sample``,
``assemble``, ``checkpoint``, ``status``, ``runlog``, ``dist``, ``fid``), ``cluster/`` (SLURM), and below them all
``config``, ``configtools``, ``errors``, ``fsio``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "UNet": "ddpm.unet", "DDPM": "ddpm.diffusion", "EMA": "ddpm.ema",
    "Config": "ddpm.config", "SamplingConfig": "ddpm.config", "load_config": "ddpm.config",
    "dump_config": "ddpm.config", "DDPMError": "ddpm.errors", "ConfigError": "ddpm.errors",
    "normalize": "ddpm.data", "unnormalize": "ddpm.data", "save_image": "ddpm.data", "make_grid": "ddpm.data",
    "create_dataloader": "ddpm.data", "create_dataloader_from_config": "ddpm.data",
    "Trainer": "ddpm.train", "sample_shard": "ddpm.shards", "assemble": "ddpm.assemble",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ddpm' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

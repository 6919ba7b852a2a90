"""The training grid: EMA samples from fixed seeds, drawn as the run samples (its sampler and autocast dtype).

    images = draw_grid(cfg, model, ema, ddpm_state, amp_dtype, beat)   # [N, C, S, S] in [-1, 1]

A grid on a slow card takes minutes (64 images x 1000 ancestral steps: about 10 min on a T4 in fp32), longer
than the wrapper's watchdog (``training.watchdog_s``) allows between heartbeats: ``beat`` is called before each
network evaluation (the trainer's heartbeat limits itself to one write every few seconds), so a grid never looks
like a hung rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ddpm.config import Config
from ddpm.diffusion import DDPM
from ddpm.ema import EMA
from ddpm.unet import UNet


class Beating(torch.nn.Module):
    """``model`` that calls ``beat()`` before each forward: long work that is not a training step keeps the
    heartbeat fresh."""

    def __init__(self, model: torch.nn.Module, beat: Callable[[], Any]):
        super().__init__()
        self.model, self.beat = model, beat

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W], t [B] or [1] -> eps [B, C, H, W]."""
        self.beat()
        return self.model(x, t)


@torch.no_grad()
def draw_grid(cfg: Config, model: UNet, ema: EMA, ddpm_state: dict[str, Any], amp_dtype: torch.dtype | None,
              beat: Callable[[], Any]) -> torch.Tensor:
    """``training.num_samples`` images [N, C, S, S] in [-1, 1] from the EMA weights of ``model`` (seeds 0..N-1),
    with ``cfg.sampling``'s sampler under ``amp_dtype`` autocast (None: fp32), calling ``beat`` as it goes.

    The EMA network is built under a forked RNG (UNet's initialisation draws): the training run's dropout RNG stays
    as it was, so a resumed run stays exact whether or not it drew a grid.
    """
    n, device = cfg.training.num_samples, next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        ema_model = UNet(**model.config_dict()).to(device)
    ema.copy_to(ema_model)
    size = cfg.data.image_size
    return DDPM(Beating(ema_model, beat), **ddpm_state).sample(
        n, (cfg.model.in_channels, size, size), sampler=cfg.sampling, seeds=list(range(n)), progress=False,
        autocast_dtype=amp_dtype)

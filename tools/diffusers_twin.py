"""The diffusers twin of our U-Net for ``python -m tools.bench``: same architecture, same weights.

``diffusers_unet`` builds ``UNet2DModel`` to the config's model section; ``diffusers_to_ours`` (``ddpm.export``'s
weight mapping, the one exports use) renames its state dict to ours, so ``build_pair`` can load one set of weights
into both and check they agree; ``diffusers_loop`` is diffusers' scheduler loop (``DDPMScheduler`` /
``DDIMScheduler.step``) around a network. Needs the ``bench`` extra (diffusers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ddpm.architecture import heads_at, unet2d_config
from ddpm.config import Config, ModelConfig
from ddpm.diffusers_keys import diffusers_to_ours
from ddpm.errors import ConfigError
from ddpm.export import scheduler_config
from ddpm.unet import UNet

__all__ = ["build_pair", "diffusers_loop", "diffusers_to_ours", "diffusers_unet", "sample_of"]


# ---- the two networks ---------------------------------------------------------------------------------
def diffusers_unet(mc: ModelConfig, image_size: int) -> nn.Module:
    """diffusers' ``UNet2DModel`` with our architecture (``ddpm.architecture.unet2d_config``).

    Where the model section fixes no head size (``model.num_head_channels`` null) and attention runs at several
    widths, ``UNet2DModel`` (one ``attention_head_dim``) cannot hold it as configured: every ``Attention`` is
    then set to our head count after construction (parameters do not depend on it), a twin for timing that
    ``ddpm.export`` never writes.
    """
    from diffusers import UNet2DModel
    from diffusers.models.attention_processor import Attention

    cfg, why = unet2d_config(mc, image_size, exact_heads=False)
    if cfg is None:
        raise ConfigError(f"model: no UNet2DModel twin: {why}")
    net = UNet2DModel(**cfg)
    for m in net.modules():
        if isinstance(m, Attention):
            heads = heads_at(m.inner_dim, mc.num_heads, mc.num_head_channels)
            m.heads, m.scale = heads, (m.inner_dim // heads) ** -0.5
    return net


def sample_of(net: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """diffusers' ``net(x, t) -> UNet2DOutput`` as ``(x, t) -> eps``."""
    return lambda x, t: net(x, t, return_dict=False)[0]


def build_pair(cfg: Config, device: torch.device) -> tuple[UNet, nn.Module, float]:
    """(ours, diffusers', max |difference| of their outputs) holding the same weights (diffusers' init).

    ``load_state_dict(strict=True)`` of the renamed weights checks that every parameter has its twin.
    """
    torch.manual_seed(0)
    theirs = diffusers_unet(cfg.model, cfg.data.image_size)
    ours = UNet.from_config(cfg.model, cfg.data.image_size)
    ours.load_state_dict(diffusers_to_ours(theirs.state_dict(), len(cfg.model.channel_mult),
                                           cfg.model.num_res_blocks))
    ours.to(device).eval()
    theirs.to(device).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size, generator=g).to(device)
    t = torch.tensor([10, 900], device=device)
    with torch.no_grad():
        diff = (ours(x, t) - sample_of(theirs)(x, t)).abs().max().item()
    return ours.train(), theirs.train(), diff


def diffusers_loop(net: nn.Module, cfg: Config, sampler: str, num_steps: int, run_steps: int,
                   shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The first ``run_steps`` steps of diffusers' scheduler loop around ``net``: our samplers' settings
    (tests/test_diffusers_parity.py checks that the full loops agree)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if sampler == "ddpm":  # the scheduler an export ships
        sched = DDPMScheduler(**scheduler_config(cfg))
    else:
        sched = DDIMScheduler(num_train_timesteps=cfg.ddpm.num_timesteps, beta_start=cfg.ddpm.beta_start,
                              beta_end=cfg.ddpm.beta_end, beta_schedule="linear", clip_sample=True,
                              timestep_spacing=cfg.sampling.timestep_spacing, set_alpha_to_one=True)
    sched.set_timesteps(num_steps, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=g, device=device)
    # our DDIM re-derives eps from the clipped x0 (improved-diffusion): diffusers' use_clipped_model_output=True
    extra = {"eta": cfg.sampling.eta, "use_clipped_model_output": True} if sampler == "ddim" else {}
    with torch.no_grad():
        for t in sched.timesteps[:run_steps]:
            x = sched.step(net(x, t.reshape(1)), t, x, generator=g, **extra).prev_sample
    return x

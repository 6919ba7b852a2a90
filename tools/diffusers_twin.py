"""The diffusers twin of our U-Net for ``python -m tools.bench``: same architecture, same weights.

``diffusers_unet`` builds ``UNet2DModel`` to the config's model section; ``diffusers_to_ours`` renames its
state dict to ours, so ``build_pair`` can load one set of weights into both and check they agree;
``diffusers_loop`` is diffusers' scheduler loop (``DDPMScheduler`` / ``DDIMScheduler.step``) around a network.
Needs the ``bench`` extra (diffusers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ddpm.config import Config, ModelConfig
from ddpm.errors import ConfigError
from ddpm.unet import UNet

_RES = {"norm1": "norm1", "conv1": "conv1", "time_emb_proj": "emb_proj", "norm2": "norm2", "conv2": "conv2",
        "conv_shortcut": "skip"}


# ---- the two networks ---------------------------------------------------------------------------------
def diffusers_unet(mc: ModelConfig, image_size: int) -> nn.Module:
    """diffusers' ``UNet2DModel`` with our architecture (see the module docstring of ``ddpm.unet``).

    Two settings differ from diffusers' defaults: ``attn_norm_num_groups=32`` (with ``scale_shift`` its
    middle attention has no GroupNorm; ours has) and the number of heads, which diffusers derives per block
    from a fixed head size (``channels // attention_head_dim``): every ``Attention`` is set to
    ``num_heads`` heads after construction (parameters do not depend on it).
    """
    from diffusers import UNet2DModel
    from diffusers.models.attention_processor import Attention

    chans = [mc.base_channels * m for m in mc.channel_mult]
    if any(c % 32 for c in chans):
        raise ConfigError(f"model.base_channels: diffusers needs widths divisible by 32, got {chans}")
    attn = [image_size // 2**i in mc.attention_resolutions for i in range(len(chans))]
    net = UNet2DModel(
        sample_size=image_size, in_channels=mc.in_channels, out_channels=mc.in_channels,
        block_out_channels=tuple(chans), layers_per_block=mc.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        resnet_time_scale_shift="scale_shift" if mc.use_scale_shift_norm else "default",
        dropout=mc.dropout, norm_num_groups=32, attn_norm_num_groups=32,
        attention_head_dim=chans[-1] // mc.num_heads)
    for m in net.modules():
        if isinstance(m, Attention):
            m.heads, m.scale = mc.num_heads, (m.inner_dim // mc.num_heads) ** -0.5
    return net


def diffusers_to_ours(sd: dict[str, torch.Tensor], levels: int, blocks: int) -> dict[str, torch.Tensor]:
    """A ``UNet2DModel`` state dict renamed to ours (q, k, v stacked into ``qkv``)."""
    out: dict[str, torch.Tensor] = {}

    def put(dst: str, src: str) -> None:
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = sd[f"{src}.{p}"]

    def res(dst: str, src: str) -> None:
        for theirs, ours in _RES.items():
            if f"{src}.{theirs}.weight" in sd:
                put(f"{dst}.{ours}", f"{src}.{theirs}")

    def attn(dst: str, src: str) -> None:
        if f"{src}.to_q.weight" in sd:
            put(f"{dst}.norm", f"{src}.group_norm")
            put(f"{dst}.proj", f"{src}.to_out.0")
            for p in ("weight", "bias"):
                out[f"{dst}.qkv.{p}"] = torch.cat([sd[f"{src}.to_{c}.{p}"] for c in "qkv"])

    put("time_mlp.0", "time_embedding.linear_1")
    put("time_mlp.2", "time_embedding.linear_2")
    for name, theirs in (("conv_in", "conv_in"), ("norm_out", "conv_norm_out"), ("conv_out", "conv_out")):
        put(name, theirs)
    for i in range(levels):
        for j in range(blocks + 1):
            if j < blocks:
                res(f"down.{i}.res.{j}", f"down_blocks.{i}.resnets.{j}")
                attn(f"down.{i}.attn.{j}", f"down_blocks.{i}.attentions.{j}")
            res(f"up.{i}.res.{j}", f"up_blocks.{i}.resnets.{j}")
            attn(f"up.{i}.attn.{j}", f"up_blocks.{i}.attentions.{j}")
        if i < levels - 1:
            put(f"down.{i}.resample.conv", f"down_blocks.{i}.downsamplers.0.conv")
            put(f"up.{i}.resample.conv", f"up_blocks.{i}.upsamplers.0.conv")
    res("mid_block1", "mid_block.resnets.0")
    attn("mid_attn", "mid_block.attentions.0")
    res("mid_block2", "mid_block.resnets.1")
    return out


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

    common = dict(num_train_timesteps=cfg.ddpm.num_timesteps, beta_start=cfg.ddpm.beta_start,
                  beta_end=cfg.ddpm.beta_end, beta_schedule="linear", clip_sample=True,
                  timestep_spacing=cfg.sampling.timestep_spacing)
    if sampler == "ddpm":
        sched = DDPMScheduler(variance_type=cfg.ddpm.variance, **common)
    else:
        sched = DDIMScheduler(set_alpha_to_one=True, **common)
    sched.set_timesteps(num_steps, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, generator=g, device=device)
    # our DDIM re-derives eps from the clipped x0 (improved-diffusion): diffusers' use_clipped_model_output=True
    extra = {"eta": cfg.sampling.eta, "use_clipped_model_output": True} if sampler == "ddim" else {}
    with torch.no_grad():
        for t in sched.timesteps[:run_steps]:
            x = sched.step(net(x, t.reshape(1)), t, x, generator=g, **extra).prev_sample
    return x

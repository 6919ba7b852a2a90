"""The DDPM U-Net: eps_theta(x_t, t) of Ho et al. 2020 (Sec. 4, Appendix B).

Architecture as in improved-diffusion's ``UNetModel`` (Nichol & Dhariwal 2021):
sinusoidal time embedding + MLP; an encoder of ``len(channel_mult)`` levels of
``num_res_blocks`` ResBlocks (multi-head self-attention after each block at the
resolutions listed in ``attention_resolutions``) with strided-conv downsampling
between levels; a middle ResBlock -> attention -> ResBlock; a decoder that
mirrors the encoder with ``num_res_blocks + 1`` blocks per level fed with the
concatenated skips, and nearest-neighbour upsampling; GroupNorm -> SiLU ->
zero-initialised output conv.

    model = UNet.from_config(cfg.model, image_size=cfg.data.image_size)
    eps = model(x_t, t)                     # x_t [B, C, H, W], t LongTensor [B] -> [B, C, H, W]
    UNet(**model.config_dict())             # rebuilds the architecture from a checkpoint

This file ships verbatim inside exports of shapes diffusers' ``UNet2DModel`` cannot express (``ddpm.export``,
loaded with ``trust_remote_code=True``): it imports torch and, relatively, ``ddpm.architecture`` only.

The forward has no data-dependent Python control flow (``torch.compile``
friendly) and keeps ``channels_last`` inputs in that layout: attention works on
``[B, HW, C]`` token views, which are free views of a ``channels_last`` tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import ModelShape, architecture_problem, heads_at, num_groups

__all__ = ["UNet", "num_groups"]


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups(channels), channels, eps=1e-5)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module``: the block starts as the identity (improved-diffusion)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Transformer positional encoding; Ho et al. Sec. 4).

    t: [B] (int or float) -> [B, dim] float32, ``[cos(t * f_k), sin(t * f_k)]`` with
    ``f_k = max_period^(-k / half)`` for k < half.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, time embedding injected, GroupNorm -> SiLU -> dropout -> zero conv, + skip.

    With ``use_scale_shift_norm`` the embedding gives (scale, shift) applied as
    ``norm2(h) * (1 + scale) + shift`` (improved-diffusion / FiLM); otherwise it is added before norm2.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float, use_scale_shift_norm: bool):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_ch, 2 * out_ch if use_scale_shift_norm else out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        """x: [B, in_ch, H, W]; emb_act: SiLU(time embedding) [B or 1, emb_ch] -> [B, out_ch, H, W]."""
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb_proj(emb_act)[:, :, None, None].to(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual, zero-initialised output projection."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_init(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> [B, C, H, W]."""
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]; a free view when channels_last
        qkv = self.qkv(tokens).unflatten(2, (3, self.num_heads, c // self.num_heads))  # [B, HW, 3, nh, d]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, nh, HW, d], d contiguous
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        out = self.proj(out.transpose(1, 2).flatten(2))  # [B, HW, C]
        return x + out.transpose(1, 2).unflatten(2, (h, w))  # channels_last-strided view, no copy


class Downsample(nn.Module):
    """3x3 conv with stride 2: [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 conv: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: ResBlocks, each followed by attention or Identity."""

    def __init__(self, res: list[ResBlock], attn: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        self.resample = resample


class UNet(nn.Module):
    """eps_theta(x_t, t): [B, C, H, W], [B] -> [B, C, H, W]. See the module docstring."""

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16, 8),
        num_heads: int = 4,
        dropout: float = 0.1,
        use_scale_shift_norm: bool = True,
        image_size: int = 64,
        num_head_channels: int | None = None,
    ):
        super().__init__()
        self._config = dict(
            in_channels=int(in_channels), base_channels=int(base_channels),
            channel_mult=[int(m) for m in channel_mult], num_res_blocks=int(num_res_blocks),
            attention_resolutions=[int(r) for r in attention_resolutions], num_heads=int(num_heads),
            dropout=float(dropout), use_scale_shift_norm=bool(use_scale_shift_norm), image_size=int(image_size),
        )
        if num_head_channels is not None:  # absent when null: the config of every checkpoint before the option
            self._config["num_head_channels"] = int(num_head_channels)
        mults = self._config["channel_mult"]
        attn_res = set(self._config["attention_resolutions"])
        _validate(image_size, mults, attn_res, base_channels, num_heads, num_head_channels)
        emb_ch = 4 * base_channels
        self.base_channels = base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_ch, dropout, use_scale_shift_norm)

        def attn(ch: int, res: int) -> nn.Module:
            return AttentionBlock(ch, heads_at(ch, num_heads, num_head_channels)) if res in attn_res else nn.Identity()

        # Encoder: remember the width of every skip (conv_in, each block, each downsample).
        ch, res, skips = base_channels, image_size, [base_channels]
        self.down = nn.ModuleList()
        for i, mult in enumerate(mults):
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(block(ch, mult * base_channels))
                ch = mult * base_channels
                attns.append(attn(ch, res))
                skips.append(ch)
            last = i == len(mults) - 1
            self.down.append(Level(blocks, attns, None if last else Downsample(ch)))
            if not last:
                res //= 2
                skips.append(ch)
        self.mid_block1 = block(ch, ch)
        self.mid_attn = AttentionBlock(ch, heads_at(ch, num_heads, num_head_channels))
        self.mid_block2 = block(ch, ch)
        # Decoder: num_res_blocks + 1 blocks per level, each consuming one skip.
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(mults))):
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(block(ch + skips.pop(), mult * base_channels))
                ch = mult * base_channels
                attns.append(attn(ch, res))
            self.up.append(Level(blocks, attns, Upsample(ch) if i > 0 else None))
            if i > 0:
                res *= 2
        self.norm_out = group_norm(ch)
        self.conv_out = zero_init(nn.Conv2d(ch, in_channels, 3, padding=1))

    @classmethod
    def from_config(cls, model_cfg: ModelShape, image_size: int) -> UNet:
        """Build from the ``model`` config section (``ddpm.config.ModelConfig``) and ``data.image_size``."""
        return cls(
            in_channels=model_cfg.in_channels, base_channels=model_cfg.base_channels,
            channel_mult=model_cfg.channel_mult, num_res_blocks=model_cfg.num_res_blocks,
            attention_resolutions=model_cfg.attention_resolutions, num_heads=model_cfg.num_heads,
            dropout=model_cfg.dropout, use_scale_shift_norm=model_cfg.use_scale_shift_norm,
            image_size=image_size, num_head_channels=model_cfg.num_head_channels,
        )

    def config_dict(self) -> dict[str, Any]:
        """Constructor kwargs as plain Python types: ``UNet(**model.config_dict())`` rebuilds the model."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._config.items()}

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] noisy images x_t; t: [B] integer timesteps -> eps [B, C, H, W].

        t may also be [1] or 0-dim (one timestep for the whole batch, as the samplers pass it): the
        embedding is then computed once ([1, 4 * base]) and broadcast, which is cheaper and keeps every
        image's output independent of the batch size (small-M matmuls are not batch-invariant).
        """
        emb = timestep_embedding(t.reshape(-1), self.base_channels)  # float32, like diffusers' UNet2DModel
        emb = self.time_mlp(emb.to(self.conv_in.weight.dtype))  # [B or 1, 4 * base]; a no-op unless model.double()
        emb_act = F.silu(emb)  # every ResBlock's embedding projection starts with SiLU: apply it once
        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for res_block, attn in zip(level.res, level.attn, strict=True):
                h = attn(res_block(h, emb_act))
                skips.append(h)
            if level.resample is not None:  # fixed by the architecture, not by the data
                h = level.resample(h)
                skips.append(h)
        h = self.mid_block2(self.mid_attn(self.mid_block1(h, emb_act)), emb_act)
        for level in self.up:
            for res_block, attn in zip(level.res, level.attn, strict=True):
                h = attn(res_block(torch.cat([h, skips.pop()], dim=1), emb_act))
            if level.resample is not None:
                h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _validate(image_size: int, mults: list[int], attn_res: set[int], base: int, num_heads: int,
              num_head_channels: int | None) -> None:
    """Raise ValueError naming the value when the architecture cannot be built for ``image_size``."""
    if not mults or min(mults) < 1 or image_size < 1 or num_heads < 1:
        raise ValueError(f"channel_mult={mults}, image_size={image_size}, num_heads={num_heads}: expected a "
                         "non-empty list of integers >= 1, an image size >= 1 and num_heads >= 1")
    if num_head_channels is not None and num_head_channels < 1:
        raise ValueError(f"num_head_channels={num_head_channels}: expected None or an integer >= 1")
    problem = architecture_problem(image_size, mults, sorted(attn_res), base, num_heads, num_head_channels)
    if problem is not None:
        key, value, expected = problem
        raise ValueError(f"{key.split('.')[-1]}={value!r}: expected {expected}")

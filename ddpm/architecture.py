"""Which U-Net shapes exist, and how big one is: the check both the config and :class:`ddpm.unet.UNet` apply.

Kept apart from both (no imports beyond the standard library), so ``ddpm.config`` can check a config before any
network is built and ``ddpm.unet`` can check its own arguments, without either importing the other; and so the login
node can size a checkpoint (:func:`num_parameters`, :func:`checkpoint_bytes`) and tell whether diffusers'
``UNet2DModel`` can hold the network (:func:`unet2d_config`) without importing torch. It ships with ``ddpm/unet.py``
inside exports of our U-Net (``ddpm.export``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol


def num_groups(channels: int, max_groups: int = 32) -> int:
    """GroupNorm groups of a ``channels``-wide norm: the largest divisor <= ``max_groups`` (32 for the usual widths)."""
    return max(g for g in range(1, max_groups + 1) if channels % g == 0)


def heads_at(channels: int, num_heads: int, num_head_channels: int | None) -> int:
    """Attention heads at a ``channels``-wide attention: ``channels / num_head_channels`` when that is set (a
    fixed head size, improved-diffusion's option and diffusers' ``attention_head_dim``), else ``num_heads``."""
    return channels // num_head_channels if num_head_channels else num_heads


def architecture_problem(image_size: int, channel_mult: list[int], attention_resolutions: list[int],
                         base_channels: int, num_heads: int,
                         num_head_channels: int | None = None) -> tuple[str, object, str] | None:
    """(key, value, expected) of the first reason the U-Net cannot be built for ``image_size``, or None."""
    levels = len(channel_mult)
    if image_size % 2 ** (levels - 1):
        return "data.image_size", image_size, f"divisible by 2^(len(model.channel_mult)-1) = {2 ** (levels - 1)}"
    resolutions = [image_size // 2**i for i in range(levels)]
    for r in attention_resolutions:
        if r not in resolutions:
            return "model.attention_resolutions", attention_resolutions, (
                f"resolutions the U-Net has for data.image_size={image_size}: a subset of {resolutions}")
    key, value = ("model.num_head_channels", num_head_channels) if num_head_channels else ("model.num_heads", num_heads)
    for i, r in enumerate(resolutions):  # attention at each listed resolution, and always in the middle
        ch = channel_mult[i] * base_channels
        if (r in attention_resolutions or i == levels - 1) and ch % value:
            return key, value, f"a divisor of the {ch} channels of the attention at resolution {r}"
    return None


class ModelShape(Protocol):
    """The attributes of ``ddpm.config.ModelConfig`` that build a U-Net (``num_parameters``, ``UNet.from_config``)."""

    in_channels: int
    base_channels: int
    channel_mult: list[int]
    num_res_blocks: int
    attention_resolutions: list[int]
    num_heads: int
    num_head_channels: int | None
    dropout: float
    use_scale_shift_norm: bool


def layers(model: ModelShape, image_size: int) -> Iterator[tuple[str, int, int]]:
    """The U-Net's blocks in construction order as (kind, in channels, out channels), kind "res" (a ResBlock),
    "attn" (attention; in = out), "down" or "up" (the resampling convs); without time_mlp, conv_in, norm_out and
    conv_out. Mirrors the construction loop of ``ddpm.unet.UNet.__init__`` (tests/test_architecture.py checks it)."""
    base, mults, blocks, attn_res = model.base_channels, list(model.channel_mult), model.num_res_blocks, \
        set(model.attention_resolutions)
    ch, res, skips = base, image_size, [base]
    for i, mult in enumerate(mults):  # encoder
        for _ in range(blocks):
            yield "res", ch, mult * base
            ch = mult * base
            if res in attn_res:
                yield "attn", ch, ch
            skips.append(ch)
        if i < len(mults) - 1:
            yield "down", ch, ch
            res //= 2
            skips.append(ch)
    yield from (("res", ch, ch), ("attn", ch, ch), ("res", ch, ch))  # middle
    for i, mult in reversed(list(enumerate(mults))):  # decoder: one more block per level, each eats a skip
        for _ in range(blocks + 1):
            yield "res", ch + skips.pop(), mult * base
            ch = mult * base
            if res in attn_res:
                yield "attn", ch, ch
        if i > 0:
            yield "up", ch, ch
            res *= 2


def _conv(cin: int, cout: int, kernel: int) -> int:
    """Parameters of ``nn.Conv2d(cin, cout, kernel)`` with bias."""
    return cin * cout * kernel * kernel + cout


def _linear(cin: int, cout: int) -> int:
    """Parameters of ``nn.Linear(cin, cout)`` with bias."""
    return cin * cout + cout


def _norm(channels: int) -> int:
    """Parameters of an affine ``nn.GroupNorm`` (weight and bias; it keeps no running statistics)."""
    return 2 * channels


def _res_block(cin: int, cout: int, emb_ch: int, scale_shift: bool) -> int:
    """Parameters of ``ddpm.unet.ResBlock``: norm1, conv1, emb_proj, norm2, conv2, 1x1 skip when widths differ."""
    return (_norm(cin) + _conv(cin, cout, 3) + _linear(emb_ch, 2 * cout if scale_shift else cout)
            + _norm(cout) + _conv(cout, cout, 3) + (0 if cin == cout else _conv(cin, cout, 1)))


def _attention(channels: int) -> int:
    """Parameters of ``ddpm.unet.AttentionBlock``: norm, qkv, proj (the head count does not change them)."""
    return _norm(channels) + _linear(channels, 3 * channels) + _linear(channels, channels)


def _check(model: ModelShape, image_size: int) -> None:
    """Raise ValueError (as ``ddpm.unet.UNet`` does) when the U-Net cannot be built for ``image_size``."""
    mults = list(model.channel_mult)
    if not mults or min(mults) < 1 or image_size < 1 or model.num_heads < 1:
        raise ValueError(f"channel_mult={mults}, image_size={image_size}, num_heads={model.num_heads}: "
                         "expected a non-empty list of integers >= 1, an image size >= 1 and num_heads >= 1")
    problem = architecture_problem(image_size, mults, sorted(set(model.attention_resolutions)), model.base_channels,
                                   model.num_heads, model.num_head_channels)
    if problem is not None:
        key, value, expected = problem
        raise ValueError(f"{key}={value!r}: expected {expected}")


def num_parameters(model: ModelShape, image_size: int) -> int:
    """``sum(p.numel() for p in UNet.from_config(model, image_size).parameters())``, without torch.

    ``model`` is the ``model`` config section (or anything with its attributes); ``dropout`` does not
    change the weights. Raises ValueError when the U-Net cannot be built for ``image_size``.
    """
    _check(model, image_size)
    base, emb_ch, ss = model.base_channels, 4 * model.base_channels, model.use_scale_shift_norm
    total = _linear(base, emb_ch) + _linear(emb_ch, emb_ch) + _conv(model.in_channels, base, 3)  # time_mlp, conv_in
    for kind, cin, cout in layers(model, image_size):
        total += (_res_block(cin, cout, emb_ch, ss) if kind == "res" else _attention(cin) if kind == "attn"
                  else _conv(cin, cout, 3))
    ch = model.channel_mult[0] * base
    return total + _norm(ch) + _conv(ch, model.in_channels, 3)  # norm_out, conv_out


def unet2d_config(model: ModelShape, image_size: int, exact_heads: bool = True) -> tuple[dict[str, Any] | None, str]:
    """(diffusers ``UNet2DModel`` config of the same network, "") or (None, why it has none).

    ``UNet2DModel`` computes what ours does (tests/test_export.py) but has one GroupNorm group count and one
    attention head size for the whole network; ours takes ``num_groups(width)`` per norm and ``num_heads`` heads
    at every attention unless ``model.num_head_channels`` fixes the head size. ``exact_heads=False`` (the
    benchmark twin, which sets the heads of each attention after construction) skips the head check and gives
    the middle attention's head size. Every key is written out but ``mid_block_type`` (diffusers >= 0.33; its
    default is ours), so the config does not depend on diffusers' defaults.
    """
    _check(model, image_size)
    chans = [m * model.base_channels for m in model.channel_mult]
    seen = list(layers(model, image_size))
    groups = sorted({num_groups(c) for kind, cin, cout in seen if kind in ("res", "attn") for c in (cin, cout)}
                    | {num_groups(chans[0])})
    if len(groups) > 1:
        return None, (f"its GroupNorms have {groups} groups by width, UNet2DModel one norm_num_groups (widths "
                      "model.base_channels x channel_mult and their sums divisible by 32 give 32 everywhere)")
    heads = {c: heads_at(c, model.num_heads, model.num_head_channels) for kind, c, _ in seen if kind == "attn"}
    sizes = sorted({c // h for c, h in heads.items()})
    if exact_heads and len(sizes) > 1:
        where = ", ".join(f"{h} at width {c}" for c, h in heads.items())
        return None, (f"its attention heads have sizes {sizes} (heads: {where}), UNet2DModel one attention_head_dim "
                      "(model.num_head_channels fixes the head size)")
    attn = [image_size // 2**i in model.attention_resolutions for i in range(len(chans))]
    return dict(  # what our config sets first, then what our U-Net always is
        sample_size=image_size, in_channels=model.in_channels, out_channels=model.in_channels,
        block_out_channels=chans, layers_per_block=model.num_res_blocks,
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        attention_head_dim=chans[-1] // heads[chans[-1]],
        resnet_time_scale_shift="scale_shift" if model.use_scale_shift_norm else "default", dropout=model.dropout,
        center_input_sample=False, time_embedding_type="positional", time_embedding_dim=4 * model.base_channels,
        freq_shift=0, flip_sin_to_cos=True,  # ours: [cos, sin] of t * 10000^(-k / half)
        mid_block_scale_factor=1, downsample_padding=1, downsample_type="conv",
        upsample_type="conv", act_fn="silu", norm_num_groups=groups[0], attn_norm_num_groups=groups[0],
        norm_eps=1e-5, add_attention=True, class_embed_type=None, num_class_embeds=None, num_train_timesteps=None,
    ), ""


def checkpoint_bytes(model: ModelShape, image_size: int) -> int:
    """Bytes of the fp32 tensors a training checkpoint of this U-Net holds: 16 per parameter.

    Four float32 copies of every parameter: the weights, the EMA shadow, and AdamW's ``exp_avg`` and
    ``exp_avg_sq``. The U-Net has no buffers (GroupNorm keeps no running statistics), so the EMA shadow,
    a copy of the state dict, is parameters only. Left out, being kilobytes: AdamW's one scalar ``step`` per
    parameter tensor, the noise schedule, the RNG states, the config and the data-loader position.
    """
    return 16 * num_parameters(model, image_size)

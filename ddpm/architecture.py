"""Which U-Net shapes exist, and how big one is: the check both the config and :class:`ddpm.unet.UNet` apply.

Kept apart from both (no imports beyond ``typing``), so ``ddpm.config`` can check a config before any network
is built and ``ddpm.unet`` can check its own arguments, without either importing the other; and so the login
node can size a checkpoint (:func:`num_parameters`, :func:`checkpoint_bytes`) without importing torch.
"""

from __future__ import annotations

from typing import Protocol


def architecture_problem(image_size: int, channel_mult: list[int], attention_resolutions: list[int],
                         base_channels: int, num_heads: int) -> tuple[str, object, str] | None:
    """(key, value, expected) of the first reason the U-Net cannot be built for ``image_size``, or None."""
    levels = len(channel_mult)
    if image_size % 2 ** (levels - 1):
        return "data.image_size", image_size, f"divisible by 2^(len(model.channel_mult)-1) = {2 ** (levels - 1)}"
    resolutions = [image_size // 2**i for i in range(levels)]
    for r in attention_resolutions:
        if r not in resolutions:
            return "model.attention_resolutions", attention_resolutions, (
                f"resolutions the U-Net has for data.image_size={image_size}: a subset of {resolutions}")
    for i, r in enumerate(resolutions):  # attention at each listed resolution, and always in the middle
        ch = channel_mult[i] * base_channels
        if (r in attention_resolutions or i == levels - 1) and ch % num_heads:
            return "model.num_heads", num_heads, f"a divisor of the {ch} channels of the attention at resolution {r}"
    return None


class ModelShape(Protocol):
    """What :func:`num_parameters` reads: the attributes of ``ddpm.config.ModelConfig`` that fix the weights."""

    in_channels: int
    base_channels: int
    channel_mult: list[int]
    num_res_blocks: int
    attention_resolutions: list[int]
    num_heads: int
    use_scale_shift_norm: bool


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


def num_parameters(model: ModelShape, image_size: int) -> int:
    """``sum(p.numel() for p in UNet.from_config(model, image_size).parameters())``, without torch.

    ``model`` is the ``model`` config section (or anything with its attributes); ``dropout`` does not
    change the weights. Mirrors the construction loop of ``ddpm.unet.UNet.__init__``; tests/test_architecture.py
    checks it against the real module. Raises ValueError when the U-Net cannot be built for ``image_size``.
    """
    base, mults, blocks = model.base_channels, list(model.channel_mult), model.num_res_blocks
    attn_res, ss = set(model.attention_resolutions), model.use_scale_shift_norm
    if not mults or min(mults) < 1 or image_size < 1 or model.num_heads < 1:
        raise ValueError(f"channel_mult={mults}, image_size={image_size}, num_heads={model.num_heads}: "
                         "expected a non-empty list of integers >= 1, an image size >= 1 and num_heads >= 1")
    problem = architecture_problem(image_size, mults, sorted(attn_res), base, model.num_heads)
    if problem is not None:
        key, value, expected = problem
        raise ValueError(f"{key}={value!r}: expected {expected}")
    emb_ch = 4 * base
    total = _linear(base, emb_ch) + _linear(emb_ch, emb_ch) + _conv(model.in_channels, base, 3)  # time_mlp, conv_in
    ch, res, skips = base, image_size, [base]
    for i, mult in enumerate(mults):  # encoder
        for _ in range(blocks):
            total += _res_block(ch, mult * base, emb_ch, ss)
            ch = mult * base
            total += _attention(ch) if res in attn_res else 0
            skips.append(ch)
        if i < len(mults) - 1:
            total += _conv(ch, ch, 3)  # Downsample
            res //= 2
            skips.append(ch)
    total += 2 * _res_block(ch, ch, emb_ch, ss) + _attention(ch)  # middle
    for i, mult in reversed(list(enumerate(mults))):  # decoder: one more block per level, each eats a skip
        for _ in range(blocks + 1):
            total += _res_block(ch + skips.pop(), mult * base, emb_ch, ss)
            ch = mult * base
            total += _attention(ch) if res in attn_res else 0
        if i > 0:
            total += _conv(ch, ch, 3)  # Upsample
            res *= 2
    return total + _norm(ch) + _conv(ch, model.in_channels, 3)  # norm_out, conv_out


def checkpoint_bytes(model: ModelShape, image_size: int) -> int:
    """Bytes of the fp32 tensors a training checkpoint of this U-Net holds: 16 per parameter.

    Four float32 copies of every parameter: the weights, the EMA shadow, and AdamW's ``exp_avg`` and
    ``exp_avg_sq``. The U-Net has no buffers (GroupNorm keeps no running statistics), so the EMA shadow,
    a copy of the state dict, is parameters only. Left out, being kilobytes: AdamW's one scalar ``step`` per
    parameter tensor, the noise schedule, the RNG states, the config and the data-loader position.
    """
    return 16 * num_parameters(model, image_size)

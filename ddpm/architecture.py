"""Which U-Net shapes exist: the one check that both the config and :class:`ddpm.unet.UNet` apply.

Kept apart from both (no imports), so ``ddpm.config`` can check a config before any network is built and
``ddpm.unet`` can check its own arguments, without either importing the other.
"""

from __future__ import annotations


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

"""Our U-Net and diffusers' ``UNet2DModel``: the names of the same weights both ways, and which config key of ours
sets each ``UNet2DModel`` field. :mod:`ddpm.export` writes a run as a diffusers folder with them,
:mod:`ddpm.init_from` starts a run from one.
"""

from __future__ import annotations

import torch

WEIGHTS = "diffusion_pytorch_model.safetensors"  # the weights file of a diffusers model folder
_RES = {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
        "skip": "conv_shortcut"}  # ResBlock: ours -> diffusers' ResnetBlock2D
CONFIG_KEYS = {"sample_size": "data.image_size", "in_channels": "model.in_channels",
                "block_out_channels": "model.base_channels and channel_mult",
                "layers_per_block": "model.num_res_blocks",
                "down_block_types": "model.attention_resolutions", "up_block_types": "model.attention_resolutions",
                "attention_head_dim": "model.num_heads or num_head_channels",
                "resnet_time_scale_shift": "model.use_scale_shift_norm"}  # UNet2DModel key -> the key that sets it


# ---- UNet2DModel <-> ours: the names of the same weights -------------------------------------------------
def module_pairs(levels: int, blocks: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(plain, attention) pairs of module names (ours, diffusers' ``UNet2DModel``) for ``len(channel_mult)`` levels
    of ``num_res_blocks`` blocks. A plain pair holds the same ``weight`` and ``bias``; an attention pair maps our
    ``norm``, ``qkv`` (q, k, v stacked on dim 0) and ``proj`` to ``group_norm``, ``to_q/k/v`` and ``to_out.0``.
    Pairs of modules a given shape lacks (a 1x1 skip, attention off) are listed too: the converters skip them."""
    plain = [("time_mlp.0", "time_embedding.linear_1"), ("time_mlp.2", "time_embedding.linear_2"),
             ("conv_in", "conv_in"), ("norm_out", "conv_norm_out"), ("conv_out", "conv_out")]
    attn = [("mid_attn", "mid_block.attentions.0")]
    res = [("mid_block1", "mid_block.resnets.0"), ("mid_block2", "mid_block.resnets.1")]
    for i in range(levels):
        for side, theirs, n in (("down", "down_blocks", blocks), ("up", "up_blocks", blocks + 1)):
            res += [(f"{side}.{i}.res.{j}", f"{theirs}.{i}.resnets.{j}") for j in range(n)]
            attn += [(f"{side}.{i}.attn.{j}", f"{theirs}.{i}.attentions.{j}") for j in range(n)]
        if i < levels - 1:
            plain += [(f"down.{i}.resample.conv", f"down_blocks.{i}.downsamplers.0.conv"),
                      (f"up.{i}.resample.conv", f"up_blocks.{i}.upsamplers.0.conv")]
    plain += [(f"{o}.{a}", f"{t}.{b}") for o, t in res for a, b in _RES.items()]
    return plain, attn


def _convert(sd: dict[str, torch.Tensor], levels: int, blocks: int, to_ours: bool) -> dict[str, torch.Tensor]:
    """``sd`` renamed by :func:`module_pairs`, in either direction; weights without a pair are left out."""
    out: dict[str, torch.Tensor] = {}
    plain, attn = module_pairs(levels, blocks)
    for ours, theirs in plain + [(f"{o}.norm", f"{t}.group_norm") for o, t in attn] + [
            (f"{o}.proj", f"{t}.to_out.0") for o, t in attn]:
        src, dst = (theirs, ours) if to_ours else (ours, theirs)
        for p in ("weight", "bias"):
            if f"{src}.{p}" in sd:
                out[f"{dst}.{p}"] = sd[f"{src}.{p}"]
    for ours, theirs in attn:
        for p in ("weight", "bias"):
            if to_ours and f"{theirs}.to_q.{p}" in sd:
                out[f"{ours}.qkv.{p}"] = torch.cat([sd[f"{theirs}.to_{c}.{p}"] for c in "qkv"])
            elif not to_ours and f"{ours}.qkv.{p}" in sd:
                for c, part in zip("qkv", sd[f"{ours}.qkv.{p}"].chunk(3), strict=True):
                    out[f"{theirs}.to_{c}.{p}"] = part.clone()
    return out


def diffusers_to_ours(sd: dict[str, torch.Tensor], levels: int, blocks: int) -> dict[str, torch.Tensor]:
    """A ``UNet2DModel`` state dict under our names (q, k, v stacked into ``qkv``). Raises KeyError naming the
    first weight of ``sd`` with no place in ours."""
    out = _convert(sd, levels, blocks, to_ours=True)
    used = set(_convert(out, levels, blocks, to_ours=False))
    extra = [k for k in sd if k not in used]
    if extra:
        raise KeyError(f"{extra[0]} has no counterpart in our U-Net ({len(extra)} such weights)")
    return out


def ours_to_diffusers(sd: dict[str, torch.Tensor], levels: int, blocks: int) -> dict[str, torch.Tensor]:
    """Our state dict under ``UNet2DModel``'s names (``qkv`` split into ``to_q``, ``to_k``, ``to_v``)."""
    return _convert(sd, levels, blocks, to_ours=False)


# ---- the pipeline's parts ---------------------------------------------------------------------------------

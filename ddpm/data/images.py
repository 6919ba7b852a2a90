"""Image helpers shared by training grids, sampling and assembly: value ranges, uint8, grids, PNGs.

Tensors in the model's range are float [-1, 1] ``[N, C, H, W]``; stored images are np.uint8 ``[N, H, W, C]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ddpm.imagegrid import enlarge, tile, write_png


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1], any shape."""
    return x * 2.0 - 1.0


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped, any shape."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] (or [C, H, W]) in [-1, 1] -> np.uint8 [N, H, W, C] (or [H, W, C]), rounded."""
    y = ((x.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return y.movedim(-3, -1).cpu().numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2,
              pad_value: float = -1.0) -> torch.Tensor:
    """[N, C, H, W] in [-1, 1] -> one image [C, H', W'] with ``nrow`` images a row (ceil(sqrt(N)))."""
    if images.dim() == 3:
        images = images.unsqueeze(0)
    nhwc = images.detach().float().cpu().movedim(1, -1).numpy()  # numpy has no bf16
    grid = torch.from_numpy(tile(nhwc, nrow, padding, pad_value)).movedim(-1, 0)
    return grid.to(device=images.device, dtype=images.dtype)


def save_image(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write [C, H, W] or a batch [N, C, H, W] (as a grid) in [-1, 1] to a PNG, atomically; a batch of images
    smaller than 32 pixels is enlarged by whole pixels first (:func:`ddpm.imagegrid.enlarge`)."""
    pixels = to_uint8(images if images.dim() == 4 else images.unsqueeze(0))  # [N, H, W, C]
    pixels = enlarge(pixels) if len(pixels) > 1 else pixels
    return write_png(tile(pixels, nrow) if len(pixels) > 1 else pixels[0], path)  # pad 0 = -1 in [-1, 1]

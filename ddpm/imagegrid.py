"""Pictures of samples without torch: small images enlarged by whole pixels, tiled into one grid, written as a PNG
(the assembly job's grid, the data's preview grid; TensorBoard's grids use the same factor).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from ddpm.fsio import atomic_write_bytes


def enlarge_factor(side: int, min_side: int = 32) -> int:
    """The whole-pixel factor that brings an image side up to at least ``min_side`` (1 if it already is)."""
    return max(1, -(-min_side // max(side, 1)))


def enlarge(images: np.ndarray, min_side: int = 32) -> np.ndarray:
    """[N, H, W, C] -> [N, kH, kW, C], each pixel a k x k block (nearest, no blur; k = :func:`enlarge_factor`
    of the longer side), so that a grid of 8x8 digits reads on screen; images already ``min_side`` are kept."""
    k = enlarge_factor(max(images.shape[1], images.shape[2]), min_side)
    return images if k == 1 else images.repeat(k, axis=1).repeat(k, axis=2)


def tile(images: np.ndarray, nrow: int | None = None, padding: int = 2, pad_value: float = 0) -> np.ndarray:
    """[N, H, W, C] -> one image [H', W', C] of the same dtype, ``nrow`` images a row (ceil(sqrt(N))),
    ``padding`` pixels of ``pad_value`` around each."""
    n, h, w, c = images.shape
    nrow = max(1, min(nrow or math.ceil(math.sqrt(n)), n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value,
                   dtype=images.dtype)
    for i in range(n):
        top, left = (i // nrow) * (h + padding) + padding, (i % nrow) * (w + padding) + padding
        grid[top:top + h, left:left + w] = images[i]
    return grid


def write_png(pixels: np.ndarray, path: str | Path) -> Path:
    """Write uint8 [H, W, C] (C = 1 grey, 3 RGB) to a PNG, atomically."""
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    path = Path(path)
    atomic_write_bytes(path, lambda f: image.save(f, format="PNG"))
    return path

"""What the sampling tasks write and the assembly job reads, without torch (the assembly job does not load it).

    <run>/samples/shards/shard_<k>.npz          arr_0: uint8 [stop-start, H, W, C]
    <run>/samples/shards/shard_<k>.json         settings (SETTINGS_KEYS), seeds, versions; written last
    <run>/samples/shards/shard_<k>.partial.npz  images done so far (while a task runs)
    <run>/samples/grid.png                      the first images, enlarged (:func:`enlarge`) and tiled

Shard k of K covers the global indices ``[start, stop)`` of :func:`shard_range`; ``ddpm.sample`` writes
shards, ``ddpm.assemble`` checks and merges them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from ddpm.config import SamplingConfig
from ddpm.fsio import atomic_write_bytes

# The settings that determine a shard's pixels; a partial or complete shard is reused only if all match.
SETTINGS_KEYS = ("checkpoint_sha256", "image_shape", *SamplingConfig().pixel_settings(), "shard", "start", "stop")
# The subset every shard of one sample set shares (checked by ddpm.assemble).
SHARED_KEYS = tuple(k for k in SETTINGS_KEYS if k not in ("shard", "start", "stop"))


def shard_range(num_samples: int, num_shards: int, shard: int) -> tuple[int, int]:
    """[start, stop) of shard ``shard``: balanced like ``np.array_split`` (first N % K shards get one more)."""
    q, r = divmod(num_samples, num_shards)
    start = shard * q + min(shard, r)
    return start, start + q + (1 if shard < r else 0)


def shard_paths(out_dir: str | Path, shard: int) -> dict[str, Path]:
    """The three files of shard ``shard`` in ``out_dir`` (complete npz, its json, the partial npz)."""
    out = Path(out_dir)
    return {"npz": out / f"shard_{shard}.npz", "json": out / f"shard_{shard}.json",
            "partial": out / f"shard_{shard}.partial.npz"}


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

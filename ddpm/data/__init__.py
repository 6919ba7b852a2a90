"""Training images: sources (:mod:`.sources`, :mod:`.hf`), the pixel pipeline (:mod:`.base`), the sharded
resumable loader (:mod:`.loader`), image helpers (:mod:`.images`) and ``python -m ddpm.data`` (:mod:`.pack`).

    loader = create_dataloader_from_config(cfg.data, batch_size, rank, world_size, seed=0)
    x0 = next(loader)   # float32 [B, C, S, S] in [-1, 1]
"""

from ddpm.data.base import ImageSource, preprocess
from ddpm.data.images import make_grid, normalize, save_image, to_uint8, unnormalize
from ddpm.data.loader import (
    InfiniteLoader,
    ShardedBatchSampler,
    create_dataloader,
    create_dataloader_from_config,
    default_num_workers,
)
from ddpm.data.sources import build_source, preprocess_signature

__all__ = [
    "ImageSource", "InfiniteLoader", "ShardedBatchSampler", "build_source", "create_dataloader",
    "create_dataloader_from_config", "default_num_workers", "make_grid", "normalize", "preprocess",
    "preprocess_signature", "save_image", "to_uint8", "unnormalize",
]

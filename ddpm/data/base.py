"""The pixel pipeline every source shares, and the base class of image sources.

:func:`preprocess`: RGB -> square crop of ``data.center_crop`` source pixels (clamped to the shorter side;
null = no crop; the box from :func:`crop_box`) -> resize to ``data.image_size`` squared with PIL BICUBIC.
:class:`ImageSource` is a map-style dataset of such images (``source[i]`` -> np.uint8 [S, S, 3]); the
concrete sources are in :mod:`ddpm.data.sources` and :mod:`ddpm.data.hf`.
"""

from __future__ import annotations

import io
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ddpm.config import DataConfig
from ddpm.errors import DataError

_PREPROCESS_VERSION = "v1"
_BAD_IMAGE = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)




def crop_box(width: int, height: int, size: int, centre: list[int] | None = None) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) square crop box of side ``min(size, width, height)``.

    ``centre`` None: the image centre, rounded as torchvision's CenterCrop. ``centre`` (x, y): the box
    centred there (left = x - c // 2), shifted inside the image where it would cross an edge.
    """
    c = min(size, width, height)
    if centre is None:
        left, top = int(round((width - c) / 2.0)), int(round((height - c) / 2.0))
    else:
        left = min(max(centre[0] - c // 2, 0), width - c)
        top = min(max(centre[1] - c // 2, 0), height - c)
    return left, top, left + c, top + c


def preprocess(image: Image.Image, image_size: int, center_crop: int | None,
               crop_center: list[int] | None = None) -> np.ndarray:
    """RGB -> square crop (source pixels, clamped) -> BICUBIC resize; returns np.uint8 [S, S, 3]."""
    image = image.convert("RGB")
    if center_crop is not None:
        image = image.crop(crop_box(image.width, image.height, center_crop, crop_center))
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8).copy()


def pipeline_signature(image_size: int, center_crop: int | None, crop_center: list[int] | None = None) -> str:
    """The name of the pixel pipeline (crop box, resize, version) for statistics and packed files."""
    crop = "none" if center_crop is None else f"center{center_crop}"
    if center_crop is not None and crop_center is not None:
        crop = f"box{center_crop}@{crop_center[0]},{crop_center[1]}"
    return f"ddpm-preprocess-{_PREPROCESS_VERSION}:rgb:crop={crop}:resize=pil-bicubic-{image_size}:uint8"


class ImageSource:
    """A map-style dataset of preprocessed images: ``source[i]`` -> np.uint8 [S, S, 3].

    Subclasses hold one key per image (a path, a row number) and implement :meth:`open_key` and
    :meth:`describe_key`; ``where`` names the dataset in messages.
    """

    def __init__(self, keys: list[Any], where: str, cfg: DataConfig) -> None:
        self.keys = keys
        self.where = where
        self.cfg = cfg  # the pixel pipeline: image_size, center_crop, crop_center; skip_bad_images
        self.image_size = cfg.image_size
        self.skip_bad_images = cfg.skip_bad_images
        if not keys:
            raise DataError(f"data.path: no images in {where}")
        if self.skip_bad_images:
            self._drop_unreadable()

    def __len__(self) -> int:
        return len(self.keys)

    def open_key(self, key: Any) -> Image.Image:
        """Open the image behind ``key`` (lazily: the header only); may raise an OSError."""
        raise NotImplementedError

    def describe_key(self, key: Any) -> str:
        """The file or row behind ``key``, for messages."""
        return str(key)

    def decode(self, index: int) -> np.ndarray:
        """Image ``index`` preprocessed, np.uint8 [S, S, 3]; DataError naming the file if unreadable."""
        key = self.keys[index]
        try:
            with self.open_key(key) as image:
                return preprocess(image, self.image_size, self.cfg.center_crop, self.cfg.crop_center)
        except _BAD_IMAGE as err:
            raise DataError(f"unreadable image {self.describe_key(key)} ({_reason(err)}); "
                            "set data.skip_bad_images=true to skip such images") from None

    def __getitem__(self, index: int) -> np.ndarray:
        if not self.skip_bad_images:
            return self.decode(index)
        n = len(self.keys)
        for step in range(n):  # a late failure: the next readable image, a pure function of index
            try:
                return self.decode((index + step) % n)
            except DataError as err:
                warnings.warn(f"data: {err}; using the next image instead", stacklevel=2)
        raise DataError(f"data.path: no readable image in {self.where}")

    def get_batch(self, indices: list[int]) -> np.ndarray:
        """Images ``indices``: np.uint8 [B, S, S, 3]."""
        return np.stack([self[int(i)] for i in indices])

    def _check_key(self, key: Any) -> str | None:
        try:
            with self.open_key(key) as image:
                image.verify()
        except _BAD_IMAGE as err:
            return _reason(err)
        return None

    def _drop_unreadable(self) -> None:
        with ThreadPoolExecutor(max_workers=16) as pool:  # I/O bound: file opens on shared storage
            reasons = list(pool.map(self._check_key, self.keys, chunksize=64))
        bad = [(k, r) for k, r in zip(self.keys, reasons, strict=True) if r is not None]
        if not bad:
            return
        total = len(self.keys)
        self.keys = [k for k, r in zip(self.keys, reasons, strict=True) if r is None]
        first, why = bad[0]
        warnings.warn(f"data: skipped {len(bad)} unreadable image(s) of {total} in {self.where} "
                      f"(first: {self.describe_key(first)}: {why})", stacklevel=3)
        if not self.keys:
            raise DataError(f"data.path: no readable images in {self.where}")


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def require_path(cfg: DataConfig, what: str) -> Path:
    """``data.path`` as a Path that exists; DataError naming it otherwise."""
    if cfg.path is None:
        raise DataError(f"data.path: not set (source {cfg.source} reads {what} from data.path)")
    path = Path(cfg.path)
    if not path.exists():
        raise DataError(f"data.path: {path} does not exist")
    return path


def image_from_value(value: Any) -> Image.Image:
    """A PIL image from a dataset cell: PIL image, {'bytes', 'path'} dict, bytes, a path or an array."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        return Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, str):
        return Image.open(value)
    if isinstance(value, (np.ndarray, list)):
        return Image.fromarray(np.asarray(value, dtype=np.uint8))
    raise ValueError(f"cell holds {type(value).__name__}, not an image")

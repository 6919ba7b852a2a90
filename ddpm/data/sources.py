"""Image sources: every way of reading training images, all giving the same preprocessed uint8 pixels.

    source = build_source(cfg.data)            # cfg.data: DataConfig
    len(source)                                 # number of images
    source[i]                                   # np.uint8 [S, S, 3], cropped and resized
    source.get_batch([3, 1, 4])                 # np.uint8 [3, S, S, 3]

Sources (``data.source``):

- ``folder``: every jpg/jpeg/png/webp file under ``data.path`` (recursively, following links, hidden
  files and folders skipped), sorted by path. ``data.split`` is ignored: a folder is one set.
- ``celeba``: torchvision's CelebA layout, ``<path>/img_align_celeba/*.jpg`` plus
  ``<path>/list_eval_partition.txt`` (or the same under ``<path>/celeba/``, as torchvision's ``root``);
  ``data.split`` is train (0), valid (1), test (2) or all.
- ``hf``: a Hugging Face ``datasets`` dataset (see :mod:`ddpm.data.hf`).
- ``packed``: one ``.npy`` uint8 array [N, S, S, 3] written by ``python -m ddpm.data pack``, memory-mapped,
  with a ``<file>.json`` sidecar; its pixels are already preprocessed (``data.split`` is ignored).

Preprocessing (:func:`preprocess`: every source, ``pack`` and FID reference statistics share it):
convert to RGB -> square crop of ``data.center_crop`` source pixels (clamped to the shorter side; null =
no crop) -> resize to ``data.image_size`` squared with PIL BICUBIC (antialiased when downscaling). The
crop's top-left corner is (round((W - c) / 2), round((H - c) / 2)), as torchvision's CenterCrop, unless
``data.crop_center`` places the box (:func:`crop_box`).

Aligned CelebA (178x218) and FID: the crop changes the face framing and so the FID. The default here is
the 140x140 centre crop, box (19, 39, 159, 179), the common CelebA-64 protocol. DDIM and StyleGAN
instead crop the 128x128 box centred at (89, 121), box (25, 57, 153, 185): tighter and lower; select it
with ``data.center_crop: 128`` and ``data.crop_center: [89, 121]`` (the box's centre in source pixels,
shifted inside the image if it would cross an edge). FID numbers from the two protocols are not
comparable. :func:`preprocess_signature` names the protocol so reference statistics record it.

Unreadable images raise :class:`DataError` naming the file. With ``data.skip_bad_images`` the source
first checks every file's header (one pass), drops the bad ones with a warning giving the count, and
replaces an image that still fails to decode later by the next readable one (deterministically).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ddpm.config import DataConfig
from ddpm.data.base import ImageSource, pipeline_signature, require_path
from ddpm.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CELEBA_SPLITS = {"train": 0, "valid": 1, "test": 2}
PACKED_FORMAT = "ddpm-packed-v1"








def preprocess_signature(cfg: DataConfig) -> str:
    """A string naming the pixel pipeline of ``cfg`` (for hashing FID reference statistics).

    For a packed source this is the signature recorded when the file was packed.
    """
    if cfg.source == "packed" and cfg.path is not None:
        return str(read_packed_meta(Path(cfg.path))["preprocess"])
    return pipeline_signature(cfg.image_size, cfg.center_crop, cfg.crop_center)






class FileSource(ImageSource):
    """Images stored as files; the keys are paths."""

    def open_key(self, key: str) -> Image.Image:
        return Image.open(key)

    def describe_key(self, key: str) -> str:
        return key




def list_images(root: Path) -> list[str]:
    """Paths of all images under ``root`` (recursive, hidden entries skipped), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(os.path.join(dirpath, f) for f in filenames
                     if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(found)


def folder_source(cfg: DataConfig) -> FileSource:
    root = require_path(cfg, "a folder of images")
    if not root.is_dir():
        raise DataError(f"data.path: {root} is not a folder (source folder needs a directory of images)")
    paths = list_images(root)
    if not paths:
        raise DataError(f"data.path: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return FileSource(paths, str(root), cfg)


def celeba_root(path: Path) -> Path:
    """The folder holding ``img_align_celeba/``: ``path`` itself or ``path/celeba`` (torchvision root)."""
    for candidate in (path, path / "celeba"):
        if (candidate / "img_align_celeba").is_dir():
            return candidate
    raise DataError(f"data.path: {path} has no img_align_celeba/ folder (expected the torchvision CelebA "
                    "layout: <path>/img_align_celeba/*.jpg + list_eval_partition.txt, or <path>/celeba/...)")


def read_celeba_partition(path: Path) -> list[tuple[str, int]]:
    """``list_eval_partition.txt`` as (file name, partition) pairs; 0 train, 1 valid, 2 test."""
    entries = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DataError(f"{path}:{lineno}: malformed partition line {line.strip()!r} "
                            "(expected '<file>.jpg <0|1|2>')")
        entries.append((parts[0], int(parts[1])))
    return entries


def celeba_source(cfg: DataConfig) -> FileSource:
    if cfg.split not in (*CELEBA_SPLITS, "all"):
        raise DataError(f"data.split: unknown split {cfg.split!r} for source celeba "
                        f"(valid: {', '.join(CELEBA_SPLITS)}, all)")
    root = celeba_root(require_path(cfg, "the torchvision CelebA layout"))
    images = root / "img_align_celeba"
    if (images / "img_align_celeba").is_dir():  # the Kaggle zip nests the folder once more
        images = images / "img_align_celeba"
    partition = root / "list_eval_partition.txt"
    if partition.is_file():
        wanted = CELEBA_SPLITS.get(cfg.split)
        names = sorted(name for name, part in read_celeba_partition(partition)
                       if wanted is None or part == wanted)
    elif cfg.split == "all":
        names = sorted(f for f in os.listdir(images) if f.lower().endswith(IMAGE_EXTENSIONS))
    else:
        raise DataError(f"{partition}: not found (needed for data.split={cfg.split}; "
                        "data.split=all reads every image without it)")
    if not names:
        raise DataError(f"data.path: no images for split {cfg.split!r} in {root}")
    paths = [str(images / name) for name in names]
    where = f"{root} (split {cfg.split})"
    return FileSource(paths, where, cfg)


def sidecar_path(path: Path) -> Path:
    """The json sidecar of a packed file: ``<file>.json``."""
    return path.with_name(path.name + ".json")


def read_packed_meta(path: Path) -> dict[str, Any]:
    """The sidecar of packed file ``path``: format, image_size, center_crop, source, count, preprocess."""
    side = sidecar_path(path)
    if not path.is_file():
        raise DataError(f"data.path: {path} does not exist (make it with `python -m ddpm.data pack`)")
    if not side.is_file():
        raise DataError(f"{side}: packed file sidecar not found (re-run `python -m ddpm.data pack`)")
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{side}: malformed packed sidecar ({err})") from None
    missing = [k for k in ("format", "image_size", "count", "preprocess") if k not in meta]
    if missing or meta.get("format") != PACKED_FORMAT:
        raise DataError(f"{side}: not a {PACKED_FORMAT} sidecar (missing {', '.join(missing) or 'format'})")
    return meta


class PackedSource(ImageSource):
    """A memory-mapped uint8 array [N, S, S, 3] of preprocessed images (``python -m ddpm.data pack``)."""

    def __init__(self, path: Path, image_size: int) -> None:
        meta = read_packed_meta(path)
        self.path = path
        self.meta = meta
        self._array: np.ndarray | None = None
        array = self.array
        n, size = int(meta["count"]), int(meta["image_size"])
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != (size, size, 3):
            raise DataError(f"data.path: {path} holds {array.dtype} {list(array.shape)}, "
                            f"expected uint8 [N, {size}, {size}, 3]")
        if array.shape[0] != n:
            raise DataError(f"data.path: {path} holds {array.shape[0]} images but its sidecar says {n} "
                            "(interrupted pack? re-run `python -m ddpm.data pack`)")
        if size != image_size:
            raise DataError(f"data.image_size: {image_size} but {path} holds {size}x{size} images "
                            f"(set data.image_size={size} or re-pack)")
        # the pixels are already preprocessed: no crop, nothing to skip
        super().__init__(list(range(n)), str(path),
                         DataConfig(source="packed", path=str(path), image_size=size, center_crop=None))

    @property
    def array(self) -> np.ndarray:
        """The memory-mapped array, opened lazily (again in each worker process)."""
        if self._array is None:
            try:
                self._array = np.load(self.path, mmap_mode="r")
            except (ValueError, OSError) as err:
                raise DataError(f"data.path: {self.path} is not a .npy array file ({err})") from None
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}  # never pickle the mapped pixels into workers

    def decode(self, index: int) -> np.ndarray:
        return np.array(self.array[index])

    def __getitem__(self, index: int) -> np.ndarray:
        return self.decode(index)

    def get_batch(self, indices: list[int]) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64)
        order = np.argsort(idx, kind="stable")  # read the map in file order
        out = np.empty((len(idx), *self.array.shape[1:]), dtype=np.uint8)
        out[order] = self.array[idx[order]]
        return out


def build_source(cfg: DataConfig) -> ImageSource:
    """The :class:`ImageSource` that ``cfg.source`` names; DataError naming what is wrong."""
    if cfg.source == "folder":
        return folder_source(cfg)
    if cfg.source == "celeba":
        return celeba_source(cfg)
    if cfg.source == "packed":
        return PackedSource(require_path(cfg, "a packed .npy file"), cfg.image_size)
    if cfg.source == "hf":
        from ddpm.data.hf import hf_source  # imports `datasets` only when used

        return hf_source(cfg)
    raise DataError(f"data.source: unknown source {cfg.source!r} (valid: folder, celeba, hf, packed)")



"""The ``hf`` image source: a Hugging Face ``datasets`` dataset, from the hub or from a local copy.

Compute nodes often have no internet, so the usual route is a copy on shared storage at ``data.path``:

- a ``save_to_disk`` folder (a ``Dataset`` or a ``DatasetDict``), read with ``load_from_disk``;
- a folder (or one file) of ``.parquet`` files, read with ``load_dataset("parquet")`` (which converts
  them once into the ``datasets`` cache, ``HF_DATASETS_CACHE``);
- a folder (or one file) of ``.arrow`` files, memory-mapped in place with ``Dataset.from_file``.

For loose files the split is read from the file and folder names (``train-00000-of-00004.parquet``,
``test/part.arrow``: a ``-``/``_``/``.``-separated token train, validation, valid, val or test); files
with no split token form the ``train`` split. Without ``data.path``, ``data.hf_name`` names a hub dataset
loaded with ``load_dataset`` (downloaded into the cache; needs internet).

``data.split`` picks one split (valid/validation/val are aliases of each other); ``all`` joins every
split. A dataset saved without splits is the ``train`` split. ``data.image_column`` may hold ``Image``
features (read undecoded and decoded here, so an unreadable image names its row), bytes, paths or arrays.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from PIL import Image

from ddpm.config import DataConfig
from ddpm.data.base import ImageSource, image_from_value, require_path
from ddpm.errors import DataError

_SPLIT_TOKENS = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
                 "test": "test"}
_ALIASES = {"valid": ("valid", "validation", "val"), "validation": ("validation", "valid", "val"),
            "val": ("val", "validation", "valid")}


class HFSource(ImageSource):
    """Rows of a ``datasets.Dataset``; the keys are row numbers, ``image_column`` holds the image."""

    def __init__(self, dataset: Any, column: str, where: str, cfg: DataConfig) -> None:
        self.dataset = dataset
        self.column = column
        super().__init__(list(range(len(dataset))), where, cfg)

    def open_key(self, key: int) -> Image.Image:
        return image_from_value(self.dataset[int(key)][self.column])

    def describe_key(self, key: int) -> str:
        return f"row {key} of {self.where}"


def _split_of(path: Path, root: Path) -> str | None:
    rel = path.relative_to(root) if path != root else Path(path.name)
    for part in rel.parts:
        for token in re.split(r"[-_.]", part.lower()):
            if token in _SPLIT_TOKENS:
                return _SPLIT_TOKENS[token]
    return None


def _group_files(root: Path, suffix: str) -> dict[str, list[str]]:
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob(f"*{suffix}") if not any(s.startswith(".") for s in p.relative_to(root).parts))
    groups: dict[str, list[str]] = {}
    for f in files:
        groups.setdefault(_split_of(f, root if root.is_dir() else root.parent) or "train", []).append(str(f))
    order = ["train", "validation", "test"]  # the usual order, whatever the file names sort as
    return {k: groups[k] for k in sorted(groups, key=lambda k: order.index(k))}


def load_local(path: Path) -> Any:
    """A ``Dataset`` or ``DatasetDict`` from a ``save_to_disk`` folder or parquet/arrow files."""
    import datasets

    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        try:
            return datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as err:
            raise DataError(f"data.path: {path} is not a readable save_to_disk dataset ({err})") from None
    suffix = path.suffix if path.is_file() else None
    if suffix is None:
        suffix = ".parquet" if any(path.rglob("*.parquet")) else ".arrow"
    groups = _group_files(path, suffix) if suffix in (".parquet", ".arrow") else {}
    if not groups:
        raise DataError(f"data.path: {path} holds no save_to_disk dataset, .parquet or .arrow files "
                        "(source hf)")
    try:
        if suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files=groups)
        return datasets.DatasetDict({
            split: datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in files])
            for split, files in groups.items()})
    except (ValueError, OSError) as err:
        raise DataError(f"data.path: cannot read {suffix} files under {path} ({err})") from None


def select_split(data: Any, split: str, where: str) -> Any:
    """One split of a ``DatasetDict`` (or the ``train`` split = a bare ``Dataset``); ``all`` joins them."""
    import datasets

    splits = dict(data) if isinstance(data, (dict, datasets.DatasetDict)) else {"train": data}
    if split == "all":
        parts = list(splits.values())
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    for name in _ALIASES.get(split, (split,)):
        if name in splits:
            return splits[name]
    raise DataError(f"data.split: unknown split {split!r} in {where} (valid: {', '.join(splits)}, all)")


def hf_source(cfg: DataConfig) -> HFSource:
    """The ``hf`` source of ``cfg``: ``data.path`` (local copy) if set, else ``data.hf_name``."""
    import datasets

    if cfg.path is not None:
        path = require_path(cfg, "a local datasets copy")
        where = str(path)
        data = load_local(path)
    elif cfg.hf_name is not None:
        where = f"hub dataset {cfg.hf_name}"
        try:
            data = datasets.load_dataset(cfg.hf_name)
        except (FileNotFoundError, ValueError, OSError, ConnectionError) as err:
            raise DataError(f"data.hf_name: cannot load {cfg.hf_name!r} ({type(err).__name__}: {err}); "
                            "compute nodes without internet need a local copy in data.path") from None
    else:
        raise DataError("data.path: not set (source hf reads a local copy from data.path: a save_to_disk "
                        "folder or parquet/arrow files; or set data.hf_name to load from the hub)")
    dataset = select_split(data, cfg.split, where)
    if cfg.image_column not in dataset.column_names:
        raise DataError(f"data.image_column: column {cfg.image_column!r} not found in {where} "
                        f"(available: {', '.join(dataset.column_names)})")
    dataset = dataset.select_columns([cfg.image_column])
    if isinstance(dataset.features[cfg.image_column], datasets.Image):
        dataset = dataset.cast_column(cfg.image_column, datasets.Image(decode=False))
    if len(dataset) == 0:
        raise DataError(f"data.split: split {cfg.split!r} of {where} is empty")
    return HFSource(dataset, cfg.image_column, f"{where} (split {cfg.split})", cfg)

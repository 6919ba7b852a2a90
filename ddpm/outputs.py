"""What the sampling tasks write and the assembly job reads, without torch (the assembly job does not load it).

A shard's files (:class:`ddpm.rundir.ShardFiles`) are ``shard_<k>.npz`` (arr_0: uint8 [stop-start, H, W, C]),
``shard_<k>.json`` (its :class:`ShardSpec`, seeds, versions; written last) and ``shard_<k>.partial.npz`` (the
images done so far, while a task runs). Shard k of K covers the global indices ``[start, stop)`` of
:func:`shard_range`; :mod:`ddpm.shards` writes shards, :mod:`ddpm.assemble` checks and merges them, and both
decide staleness with :func:`first_difference`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ddpm.config import SamplingConfig
from ddpm.errors import ShardError

# The settings that determine a shard's pixels; a partial or complete shard is reused only if all match.
SETTINGS_KEYS = ("checkpoint_sha256", "image_shape", *SamplingConfig().pixel_settings(), "shard", "start", "stop")
# The subset every shard of one sample set shares (checked by ddpm.assemble).
SHARED_KEYS = tuple(k for k in SETTINGS_KEYS if k not in ("shard", "start", "stop"))


def shard_range(num_samples: int, num_shards: int, shard: int) -> tuple[int, int]:
    """[start, stop) of shard ``shard``: balanced like ``np.array_split`` (first N % K shards get one more)."""
    q, r = divmod(num_samples, num_shards)
    start = shard * q + min(shard, r)
    return start, start + q + (1 if shard < r else 0)


def first_difference(recorded: Mapping[str, Any] | None, expected: Mapping[str, Any],
                     keys: tuple[str, ...] = SETTINGS_KEYS) -> str | None:
    """The one staleness rule: ``"key a vs b"`` for the first of ``keys`` whose recorded value differs from the
    expected one (a shard made with other settings, or a shard inconsistent with shard 0), else None."""
    recorded = recorded or {}
    for k in keys:
        if recorded.get(k) != expected.get(k):
            return f"{k} {recorded.get(k)!r} vs {expected.get(k)!r}"
    return None


@dataclass(frozen=True)
class ShardSpec:
    """What shard ``shard`` is: the checkpoint (sha256), the image shape, the sampler settings that decide the
    pixels (``SamplingConfig.pixel_settings()``: seeds, steps, sampler, ...) and its index range ``[start, stop)``.

    Written by :mod:`ddpm.shards` into the shard's json and the partial npz, read by :mod:`ddpm.assemble` and
    the eval stage; :meth:`stale_reason` says whether files on disk were made with this spec.
    """

    checkpoint_sha256: str
    image_shape: tuple[int, int, int]
    pixels: tuple[tuple[str, Any], ...]
    shard: int
    start: int
    stop: int

    @classmethod
    def of(cls, checkpoint_sha256: str, image_shape: tuple[int, int, int], sampling: SamplingConfig,
           shard: int) -> ShardSpec:
        """Shard ``shard`` of ``sampling.num_shards`` of the set ``sampling`` describes."""
        start, stop = shard_range(sampling.num_samples, sampling.num_shards, shard)
        return cls(checkpoint_sha256, tuple(image_shape), tuple(sampling.pixel_settings().items()), shard, start,
                   stop)

    @classmethod
    def from_dict(cls, meta: Mapping[str, Any], where: str) -> ShardSpec:
        """The spec recorded in a shard json; a missing key is one ShardError line naming ``where``."""
        absent = [k for k in SETTINGS_KEYS if k not in meta]
        if absent:
            raise ShardError(f"{where} lacks {', '.join(absent)}")
        pixel_keys = [k for k in SETTINGS_KEYS if k not in ("checkpoint_sha256", "image_shape", "shard", "start",
                                                            "stop")]
        return cls(meta["checkpoint_sha256"], tuple(meta["image_shape"]), tuple((k, meta[k]) for k in pixel_keys),
                   meta["shard"], meta["start"], meta["stop"])

    def get(self, key: str) -> Any:
        """A setting by its json name (``num_samples``, ``seed_base``, ...)."""
        return dict(self.pixels)[key]

    @property
    def count(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict[str, Any]:
        """The flat json form (``image_shape`` a list), keys in :data:`SETTINGS_KEYS` order."""
        return {"checkpoint_sha256": self.checkpoint_sha256, "image_shape": list(self.image_shape),
                **dict(self.pixels), "shard": self.shard, "start": self.start, "stop": self.stop}

    def stale_reason(self, recorded: Mapping[str, Any] | None) -> str | None:
        """Why files recorded with ``recorded`` settings are not this shard (None: they are)."""
        return first_difference(recorded, self.to_dict())

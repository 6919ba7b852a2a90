"""The sharded, resumable training loader over an image source.

    loader = create_dataloader_from_config(cfg.data, batch_size=64 // world_size, rank=rank,
                                           world_size=world_size, seed=cfg.training.seed, device=device)
    x0 = next(loader)                  # float32 [B, 3, S, S] in [-1, 1], forever, epoch after epoch
    position = loader.state_dict()     # {"epoch": e, "offset": k}: the next batch to be yielded
    loader.load_state_dict(position)   # after a restart: continues exactly there

Order: epoch ``e`` is the permutation ``perm`` of the dataset drawn from a ``torch.Generator`` seeded with
(seed, e); global batch ``k`` is ``perm[k*W*B : (k+1)*W*B]`` (W ranks of B images) and rank ``r`` takes
``perm[k*W*B + r*B : k*W*B + (r+1)*B]``; the tail that does not fill a global batch is dropped. The
horizontal flip of image ``i`` in epoch ``e`` is drawn from the same generator, so the batches are a pure
function of (seed, epoch, offset): independent of worker count, and 2 ranks x B images see exactly what
1 rank x 2B sees.

Pixels: :func:`preprocess` (RGB -> centre crop ``data.center_crop`` -> BICUBIC resize to
``data.image_size``) -> random horizontal flip -> float [3, S, S] in [-1, 1]. For aligned CelebA the
default is the 140x140 centre crop; DDIM/StyleGAN use the 128x128 box centred at (89, 121) instead
(``data.crop_center``), and FID depends on that choice (:mod:`ddpm.data.sources` explains;
:func:`preprocess_signature` records it).

Command line (``python -m ddpm.data``, see :mod:`ddpm.data.pack`): ``pack`` decodes, crops and resizes
a source once into a memory-mapped uint8 file; ``bench`` measures images/second per source.
"""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ddpm.config import DataConfig
from ddpm.cpus import cpu_budget
from ddpm.data.base import ImageSource
from ddpm.data.sources import build_source
from ddpm.errors import DataError


def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.blake2b(f"ddpm-data:{seed}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ShardedBatchSampler:
    """Rank ``rank``'s batches of (dataset index, flip) pairs, forever, from position ``start``."""

    def __init__(self, num_images: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, random_flip: bool = True) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.num_images, self.batch_size, self.rank, self.world_size = num_images, batch_size, rank, world_size
        self.seed, self.random_flip = seed, random_flip
        self.batches_per_epoch = num_images // (batch_size * world_size)
        self.start = (0, 0)  # (epoch, offset) of the first batch the next iterator yields

    def epoch_order(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(perm int64 [N], flip bool [N] indexed by dataset index) of ``epoch``."""
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        perm = torch.randperm(self.num_images, generator=g)
        flips = torch.randint(0, 2, (self.num_images,), generator=g).bool()
        return perm, flips & self.random_flip

    def batch(self, perm: torch.Tensor, flips: torch.Tensor, k: int) -> list[tuple[int, bool]]:
        """Batch ``k`` of this rank in the epoch given by (perm, flips)."""
        first = k * self.world_size * self.batch_size + self.rank * self.batch_size
        idx = perm[first:first + self.batch_size]
        return list(zip(idx.tolist(), flips[idx].tolist(), strict=True))

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        epoch, offset = self.start
        while True:
            perm, flips = self.epoch_order(epoch)
            for k in range(offset, self.batches_per_epoch):
                yield self.batch(perm, flips, k)
            epoch, offset = epoch + 1, 0


class _Failure:
    """A DataError raised in a worker, carried back as a value so its one-line message survives."""

    def __init__(self, message: str) -> None:
        self.message = message


class _FlipView:
    """Map-style view of an :class:`ImageSource` fetched by (index, flip): float [B, 3, S, S] batches."""

    def __init__(self, source: ImageSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, keys: Sequence[tuple[int, bool]]) -> torch.Tensor | _Failure:
        try:
            ids = [i for i, _ in keys]
            get_batch = getattr(self.source, "get_batch", None)  # any dataset of uint8 [S, S, 3] works
            pixels = get_batch(ids) if get_batch else np.stack([np.array(self.source[i]) for i in ids])
        except DataError as err:
            return _Failure(str(err))
        x = torch.from_numpy(pixels)
        flips = torch.tensor([f for _, f in keys], dtype=torch.bool)
        if flips.any():
            x[flips] = x[flips].flip(2)  # horizontal: the W axis of [B, H, W, C]
        out = torch.empty((x.shape[0], x.shape[3], x.shape[1], x.shape[2]), dtype=torch.float32)
        out.copy_(x.permute(0, 3, 1, 2))  # one pass: HWC -> CHW and uint8 -> float
        return out.div_(127.5).sub_(1.0)

    def __getitem__(self, key: tuple[int, bool]) -> torch.Tensor | _Failure:
        out = self.__getitems__([key])
        return out if isinstance(out, _Failure) else out[0]


def _keep(batch: Any) -> Any:
    return batch


def _as_array(batch: Any) -> Any:
    """``collate_fn`` of a worker that does not pin: the batch leaves as a numpy array, pickled whole through
    the worker's pipe. A tensor would go into shared memory instead, and the consumer would fetch its file
    descriptor from the worker: a round trip that waits until the worker is scheduled, a few ms a batch on a
    CPU whose cores the network keeps busy (``python -m tools.throughput``). A pinning (CUDA) loader keeps
    tensors: its pin thread takes that wait, off the training thread."""
    return batch.numpy() if isinstance(batch, torch.Tensor) else batch


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def _worker_leaves_stop_signals(_worker_id: int) -> None:
    """``worker_init_fn``: a loader worker ignores stop signals and leaves the stop to the trainer.

    SLURM signals every process of a job step (a preemption's SIGTERM, the time limit's ``--signal``).
    PyTorch's worker sets a SIGTERM handler that exits unless its parent sent the signal, and the trainer
    then dies with "DataLoader worker ... is killed by signal" before it can save. A worker still exits
    with its parent (the loader's watchdog), so ignoring costs nothing.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class InfiniteLoader:
    """Yields float [B, 3, S, S] batches in [-1, 1] forever; its position is (epoch, offset).

    ``offset`` counts the batches of ``epoch`` already handed to the consumer (prefetched ones do
    not count), so ``load_state_dict(state_dict())`` in a new process continues without replay or skip.
    """

    def __init__(self, source: ImageSource, sampler: ShardedBatchSampler, num_workers: int = 0,
                 pin_memory: bool = False, persistent_workers: bool = False, prefetch_factor: int = 4) -> None:
        self.dataset = source
        self.sampler = sampler
        self._loader_kwargs: dict[str, Any] = dict(
            batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
            collate_fn=_as_array if num_workers > 0 and not pin_memory else _keep,
            persistent_workers=persistent_workers and num_workers > 0, worker_init_fn=_worker_leaves_stop_signals,
            prefetch_factor=prefetch_factor if num_workers > 0 else None)
        self._loader: DataLoader | None = None
        self.epoch, self.offset = 0, 0
        self._iterator: Iterator[Any] | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank gets per epoch (the remainder of a global batch is dropped)."""
        return self.sampler.batches_per_epoch

    def __iter__(self) -> InfiniteLoader:
        return self

    def __next__(self) -> torch.Tensor:
        if self._iterator is None:
            self.sampler.start = (self.epoch, self.offset)
            if self._loader is None:
                self._loader = DataLoader(_FlipView(self.dataset), **self._loader_kwargs)
            self._iterator = iter(self._loader)
        batch = next(self._iterator)
        if isinstance(batch, _Failure):
            self._iterator = None
            raise DataError(batch.message)
        if isinstance(batch, np.ndarray):  # from a worker (_as_array): no copy
            batch = torch.from_numpy(batch)
        self.offset += 1
        if self.offset == self.batches_per_epoch:
            self.epoch, self.offset = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict[str, int]:
        """Position of the next batch to be yielded: {"epoch": e, "offset": k}."""
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at ``state`` (from :meth:`state_dict`); prefetched batches are dropped."""
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset <= self.batches_per_epoch:
            raise DataError(f"data position epoch={epoch} offset={offset} is outside this dataset "
                            f"({self.batches_per_epoch} batches per epoch; did the data or batch size change?)")
        self.epoch, self.offset = (epoch + 1, 0) if offset == self.batches_per_epoch else (epoch, offset)
        self._iterator = None

    def close(self) -> None:
        """Stop the worker processes now (a later ``next`` starts them again).

        Dropping the iterator is not enough after an exception: its traceback may still hold it, and at exit
        ``multiprocessing`` would SIGTERM the workers, which ignore it, then wait for them forever.
        """
        shutdown = getattr(self._iterator, "_shutdown_workers", None)  # torch's multiprocess iterator
        if shutdown is not None:
            shutdown()
        self._iterator = None
        self._loader = None


def create_dataloader(dataset: ImageSource, batch_size: int, rank: int = 0, world_size: int = 1,
                      seed: int = 0, num_workers: int = 0, random_flip: bool = True,
                      pin_memory: bool = False) -> InfiniteLoader:
    """An :class:`InfiniteLoader` over ``dataset`` (items np.uint8 [S, S, 3]); ``batch_size`` per rank.

    DataError if the dataset holds fewer images than one global batch (``world_size * batch_size``).
    Workers persist across ``load_state_dict`` when ``pin_memory`` (a CUDA run) and ``num_workers > 0``.
    """
    n = len(dataset)
    if n < batch_size * world_size:
        where = getattr(dataset, "where", type(dataset).__name__)
        raise DataError(f"data: {where} holds {n} images, fewer than one global batch "
                        f"({world_size} rank(s) x {batch_size} = {world_size * batch_size})")
    sampler = ShardedBatchSampler(n, batch_size, rank, world_size, seed, random_flip)
    return InfiniteLoader(dataset, sampler, num_workers, pin_memory=pin_memory,
                          persistent_workers=pin_memory and num_workers > 0)


def default_num_workers(configured: int | None, device: torch.device | str | None = None,
                        source: str = "folder") -> int:
    """``data.num_workers``, or (null) the CPU budget's workers for training on ``device`` from ``source``
    (``data.source``; ``packed`` decodes nothing, see :func:`ddpm.cpus.default_workers`)."""
    return cpu_budget("train", device, configured, decodes=source != "packed").workers


def create_dataloader_from_config(data_cfg: DataConfig, batch_size: int, rank: int = 0, world_size: int = 1,
                                  seed: int = 0, device: torch.device | None = None) -> InfiniteLoader:
    """The loader of ``data_cfg`` for one rank; ``batch_size`` is the per-rank batch size."""
    source = build_source(data_cfg)
    cuda = device is not None and torch.device(device).type == "cuda"
    return create_dataloader(source, batch_size, rank, world_size, seed,
                             num_workers=default_num_workers(data_cfg.num_workers, device, data_cfg.source),
                             random_flip=data_cfg.random_flip, pin_memory=cuda)

"""The loader contract the trainer relies on: order, flips, sharding over ranks, and exact resume.

The fixture is a packed file of N images whose pixels encode their index: image i is i in its left
half and 255 - i in its right half, so every yielded image tells (index, flipped).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ddpm.config import DataConfig
from ddpm.data import InfiniteLoader, create_dataloader, create_dataloader_from_config, to_uint8
from ddpm.data.sources import PACKED_FORMAT, build_source, sidecar_path
from ddpm.errors import DataError

N, S = 40, 4


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    path = tmp_path_factory.mktemp("coded") / "coded.npy"
    images = np.zeros((N, S, S, 3), dtype=np.uint8)
    for i in range(N):
        images[i, :, : S // 2], images[i, :, S // 2:] = i, 255 - i
    np.save(path, images)
    meta = {"format": PACKED_FORMAT, "image_size": S, "center_crop": None, "source": "test", "count": N,
            "preprocess": "coded"}
    sidecar_path(path).write_text(json.dumps(meta))
    return DataConfig(source="packed", path=str(path), image_size=S, num_workers=0)


def decode(batch: torch.Tensor) -> list[tuple[int, bool]]:
    """[B, 3, S, S] in [-1, 1] -> (index, flipped) per image."""
    left = to_uint8(batch)[:, 0, 0, 0].tolist()
    return [(v, False) if v < 128 else (255 - v, True) for v in left]


def take(loader: InfiniteLoader, n: int) -> list[list[tuple[int, bool]]]:
    return [decode(next(loader)) for _ in range(n)]


def make(cfg: DataConfig, batch: int, rank: int = 0, world: int = 1, seed: int = 0, workers: int = 0,
         flip: bool = True) -> InfiniteLoader:
    return create_dataloader(build_source(cfg), batch, rank, world, seed, num_workers=workers, random_flip=flip)


def test_epochs_are_seeded_permutations(packed: DataConfig) -> None:
    loader = make(packed, 8, seed=1)
    assert loader.batches_per_epoch == 5
    epoch0, epoch1 = take(loader, 5), take(loader, 5)
    for epoch in (epoch0, epoch1):
        assert sorted(i for batch in epoch for i, _ in batch) == list(range(N))
    assert epoch0 != epoch1
    assert take(make(packed, 8, seed=1), 5) == epoch0  # deterministic for a seed
    assert take(make(packed, 8, seed=2), 5) != epoch0
    flips = [f for batch in epoch0 for _, f in batch]
    assert 5 < sum(flips) < 35  # about half flipped
    assert not any(f for batch in take(make(packed, 8, seed=1, flip=False), 5) for _, f in batch)
    ids = [i for b in take(make(packed, 8, seed=1, flip=False), 5) for i, _ in b]
    assert ids == [i for b in epoch0 for i, _ in b]  # flips never change the order


def test_remainder_dropped(packed: DataConfig) -> None:
    loader = make(packed, 6)  # 40 // 6 = 6 batches, 4 images dropped per epoch
    assert loader.batches_per_epoch == 6
    seen = [i for batch in take(loader, 6) for i, _ in batch]
    assert len(seen) == len(set(seen)) == 36
    assert loader.state_dict() == {"epoch": 1, "offset": 0}


def test_two_ranks_are_disjoint_and_equal_one_rank_of_twice_the_batch(packed: DataConfig) -> None:
    one = take(make(packed, 8, seed=5), 4)  # two epochs of 2 global batches (16 of 40 dropped)
    rank0 = take(make(packed, 4, rank=0, world=2, seed=5), 4)
    rank1 = take(make(packed, 4, rank=1, world=2, seed=5), 4)
    for k in range(4):
        assert rank0[k] + rank1[k] == one[k]  # same images, same flips
        assert not {i for i, _ in rank0[k]} & {i for i, _ in rank1[k]}
    epoch = rank0[:2] + rank1[:2]
    assert len({i for b in epoch for i, _ in b}) == 16  # disjoint over the epoch, 2 x (2 x 4) images
    three = [make(packed, 4, rank=r, world=3, seed=5) for r in range(3)]
    cover = [i for loader in three for batch in take(loader, loader.batches_per_epoch) for i, _ in batch]
    assert len(cover) == len(set(cover)) == 36  # 3 ranks x 4 images x 3 batches


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_unseen_batches(packed: DataConfig, workers: int) -> None:
    reference = take(make(packed, 8, seed=7), 13)  # 2 epochs and 3 batches
    for stop in (3, 4, 5, 9):  # mid-epoch, last batch of an epoch, epoch boundary, second epoch
        loader = make(packed, 8, seed=7, workers=workers)
        assert take(loader, stop) == reference[:stop]
        state = loader.state_dict()
        assert state == {"epoch": stop // 5, "offset": stop % 5}  # counts yielded, not prefetched
        resumed = make(packed, 8, seed=7, workers=workers)
        resumed.load_state_dict(state)
        assert take(resumed, 13 - stop) == reference[stop:]
        if workers and stop == 4:  # rewinding a live loader (persistent workers are reset too)
            loader.load_state_dict({"epoch": 0, "offset": 1})
            assert take(loader, 2) == reference[1:3]
        loader.close()


def test_a_worker_hands_over_the_same_float_tensors(packed: DataConfig) -> None:
    """A worker sends numpy arrays through its pipe (no shared-memory round trip); the consumer still gets
    float32 tensors, equal to the ones read in the training process, and may write to them."""
    inline, worker = make(packed, 8, seed=2), make(packed, 8, seed=2, workers=1)
    for _ in range(6):
        x, y = next(inline), next(worker)
        assert isinstance(y, torch.Tensor) and y.dtype == torch.float32 and torch.equal(x, y)
        y.mul_(2)  # writable: the trainer may transform a batch in place
    worker.close()


@pytest.mark.filterwarnings("ignore:.*pin_memory")
def test_persistent_workers_resume(packed: DataConfig) -> None:
    reference = take(make(packed, 8, seed=3), 8)
    # pin_memory (a CUDA run) -> persistent workers; on a machine without CUDA torch only drops the pinning
    loader = create_dataloader(build_source(packed), 8, seed=3, num_workers=2, pin_memory=True)
    assert take(loader, 2) == reference[:2]
    loader.load_state_dict({"epoch": 0, "offset": 4})
    assert take(loader, 4) == reference[4:]
    loader.load_state_dict({"epoch": 0, "offset": 5})  # offset == batches_per_epoch: next epoch
    assert loader.state_dict() == {"epoch": 1, "offset": 0}
    with pytest.raises(DataError, match="outside this dataset"):
        loader.load_state_dict({"epoch": 0, "offset": 6})
    loader.close()


def test_from_config_matches_create_dataloader(packed: DataConfig) -> None:
    cfg = DataConfig(**{**vars(packed), "random_flip": False})
    a = create_dataloader_from_config(cfg, 4, rank=1, world_size=2, seed=9, device=torch.device("cpu"))
    b = make(packed, 4, rank=1, world=2, seed=9, flip=False)
    assert take(a, 6) == take(b, 6)
    x = next(a)
    assert x.shape == (4, 3, S, S) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1", "SIGUSR2"])
def test_workers_survive_stop_signals_from_slurm(packed, signame):
    """SLURM signals every process of a step; a worker must not die of it (PyTorch's own SIGTERM handler exits
    unless the parent sent it): here another process sends it, and the loader goes on with the same batches."""
    import dataclasses
    import subprocess

    cfg = dataclasses.replace(packed, num_workers=1)
    loader = create_dataloader_from_config(cfg, batch_size=4, seed=3)
    reference = create_dataloader_from_config(packed, batch_size=4, seed=3)
    first = next(loader)
    workers = [w.pid for w in loader._iterator._workers]
    subprocess.run(["kill", f"-{signame.removeprefix('SIG')}", *map(str, workers)], check=True)  # not the parent
    assert torch.equal(first, next(reference))
    for _ in range(2 * N // 4):  # across an epoch boundary (new workers) and back
        assert torch.equal(next(loader), next(reference))
    loader.close()

"""Assembly: exact coverage, refusals naming the shard, outputs, FID merged from shard statistics."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CHECKPOINT_STEPS, run_main
from PIL import Image

from ddpm import assemble as asm
from ddpm import fid, inception
from ddpm.checkpoint import load_checkpoint
from ddpm.config import SamplingConfig
from ddpm.errors import ShardError
from ddpm.shards import checkpoint_sampling, sample_shard


@pytest.fixture(scope="module")
def ckpts(checkpoint: Path, make_checkpoint: Callable[..., Path]) -> tuple[Path, Path]:
    """Two checkpoints real Trainers saved: A (the shared one) and B (another training seed)."""
    return checkpoint, make_checkpoint("training.seed=1")


@pytest.fixture(scope="module")
def s3(checkpoint: Path) -> SamplingConfig:
    """The checkpoint's sampling section: ddim, 10 steps, 12 samples in 3 shards."""
    s = dataclasses.replace(checkpoint_sampling(load_checkpoint(checkpoint)), num_samples=12, num_shards=3)
    assert (s.sampler, s.num_steps, s.eta, s.timestep_spacing) == ("ddim", 10, 0.0, "leading")
    return s


def shard(ckpt: Path, out: Path, k: int, s: SamplingConfig, **changes: object) -> Path:
    return sample_shard(ckpt, out, k, dataclasses.replace(s, **changes), device="cpu", progress=False)


@pytest.fixture(scope="module")
def good(ckpts: tuple[Path, Path], s3: SamplingConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """samples/shards of 3 complete shards (N=12) from checkpoint A, read-only for the tests."""
    shards = tmp_path_factory.mktemp("good") / "samples" / "shards"
    for k in range(3):
        shard(ckpts[0], shards, k, s3)
    return shards


def copy_shards(src: Path, dst: Path, which: range = range(3)) -> Path:
    dst.mkdir(parents=True)
    for k in which:
        for ext in ("npz", "json"):
            (dst / f"shard_{k}.{ext}").write_bytes((src / f"shard_{k}.{ext}").read_bytes())
    return dst


def test_assemble_outputs(good: Path, tmp_path: Path) -> None:
    shards = copy_shards(good, tmp_path / "run" / "samples" / "shards")
    parts = [np.load(shards / f"shard_{k}.npz")["arr_0"] for k in range(3)]
    for where in (tmp_path / "run", tmp_path / "run" / "samples", shards):  # all three spellings work
        assert asm.locate(where) == (shards, tmp_path / "run" / "samples")
    path = asm.assemble(tmp_path / "run")
    assert path == tmp_path / "run" / "samples" / "samples_12x8x8x3.npz"
    with np.load(path) as d:
        assert list(d.keys()) == ["arr_0"]
        np.testing.assert_array_equal(d["arr_0"], np.concatenate(parts))
    grid = np.asarray(Image.open(path.parent / "grid.png"))
    assert grid.shape == (3 * 34 + 2, 4 * 34 + 2, 3)  # 12 images enlarged 8 -> 32, 4 a row (3 rows), padding 2
    np.testing.assert_array_equal(grid[2:34, 2:34], parts[0][0].repeat(4, axis=0).repeat(4, axis=1))
    metrics = json.loads((path.parent / "metrics.json").read_text())
    meta = json.loads((shards / "shard_0.json").read_text())
    assert metrics["num_samples"] == 12 and metrics["step"] == CHECKPOINT_STEPS and metrics["fid"] is None
    assert metrics["checkpoint_sha256"] == meta["checkpoint_sha256"]
    assert metrics["sampler"] == {"sampler": "ddim", "num_steps": 10, "eta": 0.0, "timestep_spacing": "leading"}
    allpix = np.concatenate(parts).reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(metrics["channel_mean"], allpix.mean(0))
    np.testing.assert_allclose(metrics["channel_std"], allpix.std(0))
    # Re-assembling the same shards is idempotent and keeps nothing aside.
    asm.assemble(shards)
    assert not (path.parent / "previous").exists()


def test_different_assembly_keeps_previous(ckpts: tuple[Path, Path], s3: SamplingConfig, good: Path,
                                           tmp_path: Path) -> None:
    shards = copy_shards(good, tmp_path / "samples" / "shards")
    first = asm.assemble(tmp_path)
    old = first.read_bytes(), (tmp_path / "samples" / "metrics.json").read_text()
    for k in range(3):  # the same run re-sampled with other seeds: a different sample set
        shard(ckpts[0], shards, k, s3, seed_base=1000)
    asm.assemble(tmp_path)
    (kept,) = (tmp_path / "samples" / "previous").iterdir()
    assert (kept / first.name).read_bytes() == old[0] and (kept / "metrics.json").read_text() == old[1]
    assert (kept / "grid.png").is_file() and first.read_bytes() != old[0]
    assert json.loads((tmp_path / "samples" / "metrics.json").read_text())["seed_base"] == 1000


def test_missing_shard_named(good: Path, tmp_path: Path) -> None:
    shards = copy_shards(good, tmp_path / "shards", range(0, 3, 2))
    with pytest.raises(ShardError, match=r"shard 1 of 3 missing: .*shard_1\.npz"):
        asm.assemble(shards)
    with pytest.raises(ShardError, match=r"shard 3 of 4 missing"):
        copy_shards(good, tmp_path / "four", range(3))
        asm.assemble(tmp_path / "four", expect_shards=4)
    assert not (tmp_path / "samples_12x8x8x3.npz").exists()


def test_cli_missing_shard_exit_2(good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards = copy_shards(good, tmp_path / "run" / "samples" / "shards", range(2))
    proc = run_main(asm.main, [tmp_path / "run", "--expect-shards", "3"], capsys)
    assert proc.code == 2
    assert proc.err.strip().count("\n") == 0
    assert proc.err.startswith("error: shard 2 of 3 missing:") and str(shards / "shard_2.npz") in proc.err
    assert not list((tmp_path / "run" / "samples").glob("samples_*.npz"))


def test_overlap_refused(good: Path, tmp_path: Path) -> None:
    shards = copy_shards(good, tmp_path / "shards")
    meta = json.loads((shards / "shard_1.json").read_text())
    meta["start"] = 3  # shard 1 now claims [3, 8) while shard 0 holds [0, 4)
    (shards / "shard_1.json").write_text(json.dumps(meta))
    with pytest.raises(ShardError, match=r"shard 1 overlaps shard 0"):
        asm.assemble(shards)
    meta["start"] = 5
    (shards / "shard_1.json").write_text(json.dumps(meta))
    with pytest.raises(ShardError, match=r"shard 1: indices \[4, 5\) are in no shard"):
        asm.assemble(shards)


def test_inconsistent_shards_refused(ckpts: tuple[Path, Path], s3: SamplingConfig, good: Path,
                                    tmp_path: Path) -> None:
    other_ckpt = copy_shards(good, tmp_path / "ckpt", range(2))
    shard(ckpts[1], other_ckpt, 2, s3)
    with pytest.raises(ShardError, match=r"shard 2 inconsistent with shard 0: checkpoint_sha256"):
        asm.assemble(other_ckpt)
    other_sampler = copy_shards(good, tmp_path / "sampler", range(0, 3, 2))
    shard(ckpts[0], other_sampler, 1, s3, num_steps=5)
    with pytest.raises(ShardError, match=r"shard 1 inconsistent with shard 0: num_steps 5 vs 10"):
        asm.assemble(other_sampler)
    tampered = copy_shards(good, tmp_path / "tampered")
    with np.load(tampered / "shard_0.npz") as d:
        np.savez(tampered / "shard_0.npz", arr_0=d["arr_0"][:3])
    with pytest.raises(ShardError, match=r"shard 0: .*does not match the sha256"):
        asm.assemble(tampered)


def test_fid_from_merged_shard_stats(ckpts: tuple[Path, Path], s3: SamplingConfig, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    weights = tmp_path / inception.WEIGHTS_NAME
    torch.save(inception.FIDInceptionV3().state_dict(), weights)  # random init: right keys and shapes
    shards = tmp_path / "run" / "samples" / "shards"
    s2 = dataclasses.replace(s3, num_shards=2, num_samples=4)
    shard(ckpts[0], shards, 0, s2, fid=False)
    shard(ckpts[0], shards, 1, s2, fid=True, fid_weights=str(weights))
    # Shard 0 was complete without statistics: adding them must not resample (same pixels, stats added).
    before = np.load(shards / "shard_0.npz")["arr_0"]
    shard(ckpts[0], shards, 0, s2, fid=True, fid_weights=str(weights))
    with np.load(shards / "shard_0.npz") as d:
        np.testing.assert_array_equal(d["arr_0"], before)
        assert int(d["fid_n"]) == 2

    # The Frechet distance itself is checked in test_fid.py; sqrtm of 2048x2048 takes ~20 s on 2 cores,
    # so here record what reaches it and return a cheap stand-in.
    seen = []

    def fake_frechet(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
        seen.append((mu1, s1, mu2, s2))
        return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2))

    monkeypatch.setattr(fid, "frechet_distance", fake_frechet)
    meta = json.loads((shards / "shard_0.json").read_text())
    rng = np.random.default_rng(0)
    ref = fid.FIDStats(signature=meta["fid_signature"]).update(rng.standard_normal((50, 2048)))
    ref.save(tmp_path / "ref.npz")
    asm.assemble(tmp_path / "run", fid_reference=str(tmp_path / "ref.npz"))
    metrics = json.loads((tmp_path / "run" / "samples" / "metrics.json").read_text())
    assert metrics["fid_num_samples"] == 4 and metrics["fid"] == pytest.approx(fake_frechet(*seen[0]))
    # What reached the distance is the single-pass mean/covariance of all assembled images' features.
    images = np.load(tmp_path / "run" / "samples" / "samples_4x8x8x3.npz")["arr_0"]
    feats = inception.inception_features(inception.load_inception(weights), images)
    mu, cov = seen[0][0], seen[0][1]
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(cov, np.cov(feats, rowvar=False), rtol=1e-6, atol=1e-6 * np.abs(cov).max())
    np.testing.assert_allclose(seen[0][2], ref.mean_cov()[0])

    wrong = fid.FIDStats(signature="other preprocessing").update(rng.standard_normal((5, 2048)))
    wrong.save(tmp_path / "wrong.npz")
    with pytest.raises(ShardError, match="different preprocessing"):
        asm.assemble(tmp_path / "run", fid_reference=str(tmp_path / "wrong.npz"))
    assert json.loads((tmp_path / "run" / "samples" / "metrics.json").read_text()) == metrics  # untouched

"""Work done once per task: one eval task hashes its checkpoint once and loads the FID Inception once, however
many seed sets it draws, with the same shards and FIDs as before; ``sampling.checkpoint: best`` followed by the
sampling of a shard hashes the file once; tools/ imports one way (``tools.bench`` -> ``tools.bench_sampling``).

The Inception weights are the session's ``fid_weights`` (tests/conftest.py: random init, BatchNorm statistics
from one random batch: features that depend on the image), and the reference statistics are random
features with the checkpoint's preprocessing signature: no download, no ``ddpm.fid ref`` run.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import CHECKPOINT_STEPS, ROOT, TINY_CONFIG

import ddpm.evaluate
import ddpm.fsio
import ddpm.inception
import ddpm.sample
import ddpm.shards
from ddpm.checkpoint import CheckpointRef
from ddpm.config import Config, load_config
from ddpm.rundir import RunDir

NUM_SEEDS = 2


@pytest.fixture(scope="module")
def fid_files(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, fid_weights: Path) -> tuple[Path, Path]:
    """(Inception weights, reference statistics) written offline: the session's ``fid_weights`` (features that
    depend on the image) and the statistics of 8 random feature vectors under the checkpoint's data signature."""
    from ddpm.checkpoint import load_checkpoint
    from ddpm.fid import FEATURE_DIM, FIDStats, stats_signature

    signature = stats_signature(load_checkpoint(checkpoint)["config"]["data"])
    ref = tmp_path_factory.mktemp("fid_once") / "ref.npz"
    FIDStats(signature=signature, device="cpu").update(np.random.default_rng(0).normal(size=(8, FEATURE_DIM))).save(ref)
    return fid_weights, ref


@pytest.fixture
def run(tmp_path: Path, images: Path, checkpoint: Path, fid_files: tuple[Path, Path]) -> tuple[Path, Config]:
    """(run dir, config): a copy of the session checkpoint as ``checkpoints/step_<N>.pt`` (the session's run
    directory stays read-only) and an eval section of ``NUM_SEEDS`` tiny seed sets with FID on."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint, RunDir(run_dir).checkpoint(CHECKPOINT_STEPS))
    weights, ref = fid_files
    cfg = load_config(TINY_CONFIG, [f"data.path={images}", f"training.num_iterations={CHECKPOINT_STEPS}",
                                    "eval.enabled=true", f"eval.num_seeds={NUM_SEEDS}", "eval.sampling.num_samples=2",
                                    "eval.sampling.num_steps=3", "eval.sampling.batch_size=2",
                                    f"sampling.fid_weights={weights}", f"sampling.fid_reference={ref}"])
    return run_dir, cfg


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Counting wrappers around the real hash and Inception loader, in every module that calls them, and an empty
    per-process hash memo: ``counts["sha"]`` lists the resolved paths hashed, ``counts["inception"]`` the loads."""
    seen: dict[str, list] = {"sha": [], "inception": []}
    real_sha, real_load = ddpm.fsio.file_sha256, ddpm.inception.load_inception

    def sha(path: str | Path) -> str:
        seen["sha"].append(Path(path).resolve())
        return real_sha(path)

    def load(*args: object, **kwargs: object) -> ddpm.inception.FIDFeatures:
        seen["inception"].append(args)
        return real_load(*args, **kwargs)

    for module in (ddpm.fsio, ddpm.evaluate, ddpm.shards):  # file_sha256_once calls ddpm.fsio's
        monkeypatch.setattr(module, "file_sha256", sha)
    monkeypatch.setattr(ddpm.inception, "load_inception", load)  # evaluate and shards import it when called
    monkeypatch.setattr(ddpm.fsio, "_SHA256_SEEN", {})
    return seen


@pytest.fixture
def digest_fid(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ddpm.fid.frechet_distance`` replaced by a digest of its exact inputs (a float in [0, 1)): equal FIDs mean
    bit-equal statistics. The distance itself is tested in tests/test_fid.py; here its eigendecompositions of
    2048x2048 matrices (~2 s each on one CPU, four of them) would only be waited for."""
    import hashlib

    import ddpm.fid

    def digest(*arrays: np.ndarray) -> float:
        h = hashlib.sha256()
        for a in arrays:
            h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
        return int.from_bytes(h.digest()[:6], "big") / 2**48

    monkeypatch.setattr(ddpm.fid, "frechet_distance", digest)


def shard_meta(out: Path, shard: int) -> dict:
    """The json of shard ``shard`` in ``out``."""
    return json.loads((out / f"shard_{shard}.json").read_text())


def fid_of(npz: Path, cfg: Config) -> float:
    """FID of a shard's Inception statistics against the config's reference, as evaluate_step computes it."""
    from ddpm.fid import FIDStats, fid_from_stats

    with np.load(npz, allow_pickle=False) as data:
        stats = FIDStats.from_arrays(data)
    return fid_from_stats(stats, FIDStats.load(cfg.sampling.fid_reference))


def test_an_eval_task_hashes_its_checkpoint_once_and_loads_inception_once(
        run: tuple[Path, Config], counts: dict[str, list], digest_fid: None) -> None:
    """``eval.num_seeds`` 2 with FID: 1 hash, 1 Inception load; shards and FIDs equal to two independent
    ``sample_loaded`` calls (each hashing and loading for itself, as every seed set did before)."""
    run_dir, cfg = run
    ckpt = RunDir(run_dir).checkpoint(CHECKPOINT_STEPS)
    row = ddpm.evaluate.evaluate_step(RunDir(run_dir), cfg, CHECKPOINT_STEPS, device="cpu", progress=False)
    assert counts["sha"].count(ckpt.resolve()) == 1, counts["sha"]
    assert len(counts["inception"]) == 1
    assert len(row["fid"]) == NUM_SEEDS and all(np.isfinite(row["fid"]))
    assert row["checkpoint_sha256"] == row["settings"]["checkpoint_sha256"] == ddpm.fsio.file_sha256(ckpt)

    # the previous behaviour: each seed set an independent sample_loaded that hashes and loads Inception itself
    from ddpm.checkpoint import load_checkpoint

    state, sampling = load_checkpoint(ckpt), ddpm.evaluate.eval_sampling(cfg)
    eval_dir, alone_dir = run_dir / "eval" / f"step_{CHECKPOINT_STEPS:08d}", run_dir / "alone"
    before = len(counts["inception"])
    for seed_set in range(NUM_SEEDS):
        npz = ddpm.shards.sample_loaded(ckpt, state, alone_dir, seed_set, sampling, "cpu", progress=False,
                                        choice=f"eval of step {CHECKPOINT_STEPS}, seed set {seed_set}",
                                        tf32=cfg.infrastructure.tf32)
        assert fid_of(npz, cfg) == row["fid"][seed_set]  # bit for bit: same images, same Inception
        with np.load(npz) as alone, np.load(eval_dir / f"shard_{seed_set}.npz") as ours:
            assert sorted(alone.files) == sorted(ours.files)
            assert all(np.array_equal(alone[k], ours[k]) for k in alone.files)
        a, b = shard_meta(alone_dir, seed_set), shard_meta(eval_dir, seed_set)
        assert sorted(a) == sorted(b) and a["checkpoint_sha256"] == b["checkpoint_sha256"] == row["checkpoint_sha256"]
        varies = {"images_per_second", "versions"}  # a timing; the package list is the same run's
        assert {k: v for k, v in a.items() if k not in varies} == {k: v for k, v in b.items() if k not in varies}
    assert len(counts["inception"]) == before + NUM_SEEDS  # without one passed in, each call loads its own

    # a re-run task (a new process: an empty memo) hashes the checkpoint and the reference (the settings) and skips
    counts["sha"].clear()
    counts["inception"].clear()
    ddpm.fsio._SHA256_SEEN.clear()
    again = ddpm.evaluate.evaluate_step(RunDir(run_dir), cfg, CHECKPOINT_STEPS, device="cpu", progress=False)
    assert again == json.loads(json.dumps(row)) and counts["inception"] == []
    assert sorted(counts["sha"]) == sorted([ckpt.resolve(), Path(cfg.sampling.fid_reference).resolve()])


def test_best_then_sampling_hashes_the_checkpoint_once(run: tuple[Path, Config], counts: dict[str, list],
                                                       tmp_path: Path) -> None:
    """SampleTask's path: resolve ``sampling.checkpoint: best`` (checks the file's sha256), then sample a shard
    from it (records its sha256): one read of the file."""
    run_dir, cfg = run
    ckpt = RunDir(run_dir).checkpoint(CHECKPOINT_STEPS)
    sha = ddpm.fsio.file_sha256(ckpt)
    counts["sha"].clear()
    best = {"step": CHECKPOINT_STEPS, "checkpoint": str(ckpt), "checkpoint_sha256": sha, "mean": 1.0}
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "fid.json").write_text(json.dumps({"best": best}))
    cfg = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, checkpoint="best"))
    path, why = CheckpointRef.parse(cfg.sampling.checkpoint).resolve(RunDir(run_dir))
    assert path == ckpt and why.startswith("best: ")
    sampling = dataclasses.replace(cfg.sampling, num_samples=2, num_shards=1, num_steps=2, batch_size=2, fid=False)
    ddpm.shards.sample_shard(path, tmp_path / "shards", 0, sampling, device="cpu", progress=False, choice=why)
    assert counts["sha"] == [ckpt.resolve()]
    assert shard_meta(tmp_path / "shards", 0)["checkpoint_sha256"] == sha


def test_a_changed_file_is_hashed_again(tmp_path: Path, counts: dict[str, list]) -> None:
    """The memo reads a file once while it stays the same, and again once it is replaced."""
    f = tmp_path / "x.bin"
    f.write_bytes(b"a")
    first = [ddpm.fsio.file_sha256_once(f) for _ in range(3)]
    ddpm.fsio.atomic_write_bytes(f, lambda fh: fh.write(b"b"))  # same size, a new inode
    assert len(set(first)) == 1 and ddpm.fsio.file_sha256_once(f) != first[0] and len(counts["sha"]) == 2


@pytest.mark.parametrize("argv", [["-m", "tools.bench", "--help"], ["-c", "import tools.bench_sampling"]])
def test_the_bench_modules_start_alone(argv: list[str]) -> None:
    """The bench's CLI and its sampling part, each imported first (tests/test_layout.py checks the graph)."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]

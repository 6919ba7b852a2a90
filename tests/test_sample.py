"""Sampling shards: invariance to sharding and batch size, skip, resume after SIGKILL, bad input.

The checkpoint is the ``checkpoint`` fixture (tests/conftest.py): a file a real Trainer saved after a few
training steps on configs/tiny_cpu.yaml (8x8 images, T=50; sampling: ddim, 10 steps, 12 samples, 3 shards).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import CHECKPOINT_STEPS, ROOT, TINY_CONFIG
from PIL import Image

from ddpm import sample as sample_mod
from ddpm import shards
from ddpm.checkpoint import load_checkpoint
from ddpm.config import SamplingConfig, load_config
from ddpm.diffusion import DDPM
from ddpm.errors import CheckpointError, ConfigError, DDPMError, ShardError
from ddpm.fsio import file_sha256
from ddpm.outputs import shard_range
from ddpm.provenance import package_versions
from ddpm.shards import build_from_checkpoint, checkpoint_sampling, sample_shard


@pytest.fixture(scope="module")
def base(checkpoint: Path) -> SamplingConfig:
    """The checkpoint's own sampling section; tests derive variants with dataclasses.replace."""
    return checkpoint_sampling(load_checkpoint(checkpoint))


def run_shards(ckpt: Path, out: Path, s: SamplingConfig) -> np.ndarray:
    """Sample every shard of ``s`` and concatenate them in index order."""
    parts = []
    for k in range(s.num_shards):
        path = sample_shard(ckpt, out, k, s, device="cpu", progress=False)
        with np.load(path) as data:
            parts.append(data["arr_0"])
    return np.concatenate(parts)


def test_shard_range_matches_array_split() -> None:
    for n, k in ((12, 3), (10, 3), (7, 7), (5, 1), (10000, 8)):
        splits = np.array_split(np.arange(n), k)
        assert [shard_range(n, k, i) for i in range(k)] == [(int(s[0]), int(s[-1]) + 1) for s in splits]


def test_checkpoint_sampling_and_rebuild(checkpoint: Path) -> None:
    state = load_checkpoint(checkpoint)
    assert checkpoint_sampling(state) == load_config(TINY_CONFIG).sampling  # what the trainer ran with
    # keys a newer version dropped are ignored, keys it added take their defaults
    old = {k: v for k, v in state["config"]["sampling"].items() if k != "batch_size"}
    s = checkpoint_sampling({**state, "config": {**state["config"], "sampling": {**old, "gone": 1}}})
    assert (s.batch_size, s.num_steps, s.sampler) == (SamplingConfig().batch_size, 10, "ddim")
    # The premise of the invariance tests: the trained weights make eps_theta far from the zero-initialised
    # output, and the EMA weights differ from the raw ones.
    x, t = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(0, 48, 6)
    eps = {}
    for use_ema in (True, False):
        model, diffusion = build_from_checkpoint(state, use_ema=use_ema)
        assert not model.training and diffusion.num_timesteps == 50
        with torch.no_grad():
            eps[use_ema] = model(x, t)
        assert eps[use_ema].std() > 0.1, float(eps[use_ema].std())
    assert not torch.allclose(eps[True], eps[False], atol=1e-3)
    bad = {**state, "model_config": {**state["model_config"], "base_channels": 32}}
    with pytest.raises(CheckpointError, match="weights do not match its model_config"):
        build_from_checkpoint(bad)


@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("ddpm", 50), ("dpmpp_2m", 10)])
def test_shard_and_batch_invariance(checkpoint: Path, base: SamplingConfig, tmp_path: Path, sampler: str,
                                    steps: int) -> None:
    s = dataclasses.replace(base, num_samples=12, sampler=sampler, num_steps=steps, seed_base=100)
    one = run_shards(checkpoint, tmp_path / "a", dataclasses.replace(s, num_shards=1, batch_size=12))
    three = run_shards(checkpoint, tmp_path / "b", dataclasses.replace(s, num_shards=3, batch_size=5))
    batched = run_shards(checkpoint, tmp_path / "c", dataclasses.replace(s, num_shards=1, batch_size=5))
    assert one.shape == (12, 8, 8, 3) and one.dtype == np.uint8
    assert one.std() > 5 and len({im.tobytes() for im in one}) == 12  # non-trivial, one image per seed
    np.testing.assert_array_equal(one, three)
    np.testing.assert_array_equal(one, batched)
    other_seeds = run_shards(checkpoint, tmp_path / "d", dataclasses.replace(s, num_shards=1, seed_base=104))
    np.testing.assert_array_equal(other_seeds[:8], one[4:])  # image i is seed seed_base + i, nothing else
    meta = json.loads((tmp_path / "b" / "shard_1.json").read_text())
    assert (meta["start"], meta["stop"], meta["complete"], meta["step"]) == (4, 8, True, CHECKPOINT_STEPS)
    assert meta["seeds"] == {"seed_base": 100, "first": 104, "last": 107}
    assert meta["sampler"] == sampler and meta["use_ema"] is True and meta["num_steps"] == steps
    assert (meta["num_shards"], meta["batch_size"]) == (3, 5)
    assert meta["checkpoint_sha256"] == file_sha256(checkpoint)
    assert meta["versions"] == package_versions() and {"python", "torch", "numpy"} <= set(meta["versions"])


def test_cli_defaults_from_checkpoint_and_ema_choice(checkpoint: Path, base: SamplingConfig, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"  # a copy: the shared fixture run stays read-only
    shutil.copytree(checkpoint.parent.parent / "checkpoints", run / "checkpoints")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert sample_mod.main(["--checkpoint", str(run), "--device", "cpu", "--no-progress"]) == 0  # all defaults
    path = run / "samples" / "shards" / "shard_2.npz"
    meta = json.loads(path.with_suffix(".json").read_text())
    assert (meta["shard"], meta["num_shards"], meta["start"], meta["stop"]) == (2, 3, 8, 12)
    assert (meta["sampler"], meta["num_steps"], meta["batch_size"], meta["use_ema"]) == ("ddim", 10, 4, True)
    assert meta["checkpoint"] == str((run / "checkpoints" / checkpoint.name).resolve())
    assert "images/s" in capsys.readouterr().out
    with np.load(path) as d:
        ema = d["arr_0"]
    np.testing.assert_array_equal(ema, run_shards(checkpoint, tmp_path / "api", base)[8:])  # same as the API
    raw = run_shards(checkpoint, tmp_path / "raw", dataclasses.replace(base, use_ema=False))[8:]
    assert not np.array_equal(ema, raw)
    assert sample_mod.main(["--checkpoint", str(run), "--device", "cpu", "--no-progress", "--no-ema",
                            "--out", str(tmp_path / "cli_raw")]) == 0
    with np.load(tmp_path / "cli_raw" / "shard_2.npz") as d:
        np.testing.assert_array_equal(d["arr_0"], raw)


def test_complete_shard_is_skipped(checkpoint: Path, base: SamplingConfig, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    s = dataclasses.replace(base, num_shards=3, num_samples=12)
    path = sample_shard(checkpoint, tmp_path, 1, s, device="cpu", progress=False)
    stamps = [p.stat().st_mtime_ns for p in (path, path.with_suffix(".json"))]

    def no_model(*a: Any, **k: Any) -> None:
        raise AssertionError("the model must not be built for a complete shard")

    monkeypatch.setattr(shards, "build_from_checkpoint", no_model)  # where sample_shard builds it
    capsys.readouterr()
    # batch_size does not change the pixels: still the same complete shard
    assert sample_shard(checkpoint, tmp_path, 1, dataclasses.replace(s, batch_size=7), device="cpu",
                        progress=False) == path
    assert "already complete" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in (path, path.with_suffix(".json"))] == stamps
    # Other settings: the old shard is kept under stale/, never overwritten in place.
    monkeypatch.undo()
    sample_shard(checkpoint, tmp_path, 1, dataclasses.replace(s, eta=0.5), device="cpu", progress=False)
    assert "other settings (eta 0.0 vs 0.5)" in capsys.readouterr().out
    assert len(list((tmp_path / "stale").glob("*/shard_1.npz"))) == 1
    assert json.loads(path.with_suffix(".json").read_text())["eta"] == 0.5


def test_resume_after_sigkill(checkpoint: Path, base: SamplingConfig, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    n, out = 12, tmp_path / "killed"
    cmd = [sys.executable, "-m", "ddpm.sample", "--checkpoint", str(checkpoint), "--out", str(out),
           "--num-samples", str(n), "--num-shards", "1", "--shard", "0", "--batch-size", "1", "--sampler", "ddpm",
           "--steps", "50", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = out / "shard_0.partial.npz"
    deadline = time.monotonic() + 60
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial.exists(), proc.stderr.read().decode()[-2000:]
    assert not (out / "shard_0.json").exists()
    with np.load(partial) as d:
        done = len(d["arr_0"])
    assert 1 <= done < n

    capsys.readouterr()
    s = dataclasses.replace(base, num_samples=n, num_shards=1, sampler="ddpm", num_steps=50)
    resumed = run_shards(checkpoint, out, dataclasses.replace(s, batch_size=5))
    assert f"resuming after {done} of {n}" in capsys.readouterr().out
    assert not partial.exists()
    clean = run_shards(checkpoint, tmp_path / "clean", dataclasses.replace(s, batch_size=n))
    np.testing.assert_array_equal(resumed, clean)


def test_partial_with_other_settings_restarts(checkpoint: Path, base: SamplingConfig, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    real, calls = DDPM.sample, []

    def crash_on_second(self: DDPM, *a: Any, **k: Any) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    s = dataclasses.replace(base, num_samples=6, num_shards=1, batch_size=2, num_steps=10)
    monkeypatch.setattr(DDPM, "sample", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_shards(checkpoint, tmp_path, s)
    monkeypatch.undo()
    with np.load(tmp_path / "shard_0.partial.npz") as d:
        assert len(d["arr_0"]) == 2  # the first batch was kept
    capsys.readouterr()
    got = run_shards(checkpoint, tmp_path, dataclasses.replace(s, num_steps=5))
    assert "restarting from scratch" in capsys.readouterr().out
    clean = run_shards(checkpoint, tmp_path / "clean", dataclasses.replace(s, num_steps=5, batch_size=6))
    np.testing.assert_array_equal(got, clean)


def test_bad_input(checkpoint: Path, base: SamplingConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    three = dataclasses.replace(base, num_shards=3)
    with pytest.raises(ShardError, match=r"^shard 3 out of range: sampling.num_shards is 3 \(shards 0..2\)$"):
        sample_shard(checkpoint, tmp_path, 3, three, device="cpu")
    with pytest.raises(ShardError, match="--shard not given and SLURM_ARRAY_TASK_ID is not set"):
        sample_shard(checkpoint, tmp_path, None, three, device="cpu")
    too_many = dataclasses.replace(base, num_steps=51)  # valid alone; the checkpoint's T is 50
    with pytest.raises(ConfigError, match=r"^sampling.num_steps: invalid value 51 \(expected at most the "
                                          r"checkpoint's ddpm.num_timesteps, 50\)$"):
        sample_shard(checkpoint, tmp_path, 0, too_many, device="cpu")
    # a SamplingConfig is valid by construction: bad values fail where it is built, naming the key
    with pytest.raises(ConfigError, match=r"^sampling.num_steps: invalid value 0 \(expected an integer >= 1\)$"):
        dataclasses.replace(base, num_steps=0)
    with pytest.raises(ConfigError, match=r"^sampling.num_shards: invalid value 13 \(expected at most "
                                          r"sampling.num_samples \(12\)\)$"):
        dataclasses.replace(base, num_shards=13)
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("flags,line", [
    (["--steps", "0"], "error: sampling.num_steps: invalid value 0 (expected an integer >= 1) (set by --steps)"),
    (["--eta", "2"], "error: sampling.eta: invalid value 2.0 (expected a float in [0, 1]) (set by --eta)"),
    (["--num-shards", "13"], "error: sampling.num_shards: invalid value 13 (expected at most "
                             "sampling.num_samples (12)) (set by --num-shards)"),
    (["--steps", "51"], "error: sampling.num_steps: invalid value 51 (expected at most the checkpoint's "
                        "ddpm.num_timesteps, 50)"),
    (["--shard", "5", "--num-shards", "3"], "error: shard 5 out of range: sampling.num_shards is 3 (shards 0..2)"),
])
def test_cli_bad_input_is_one_line_exit_2(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          flags: list[str], line: str) -> None:
    args = ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"]
    capsys.readouterr()
    code = sample_mod.main([*args, *(flags if "--shard" in flags else ["--shard", "0", *flags])])
    assert (code, capsys.readouterr().err) == (2, line + "\n")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_cli_missing_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = sample_mod.main(["--checkpoint", str(tmp_path / "nope.pt"), "--shard", "0", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "nope.pt" in err


def test_fid_without_weights_fails_before_sampling(checkpoint: Path, base: SamplingConfig, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_model(*a: Any, **k: Any) -> None:
        raise AssertionError("sampling started before the FID weights were checked")

    monkeypatch.setattr(shards, "build_from_checkpoint", no_model)  # where sample_shard builds it
    with pytest.raises(DDPMError, match="pytorch-fid/releases"):
        sample_shard(checkpoint, tmp_path / "out", 0, dataclasses.replace(base, fid=True), device="cpu")
    capsys.readouterr()
    code = sample_mod.main(["--checkpoint", str(checkpoint), "--shard", "0", "--fid", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "FID Inception weights not found" in err
    assert not (tmp_path / "out").exists()


def test_greyscale_model_end_to_end(make_checkpoint, tmp_path):
    """model.in_channels=1: the trainer feeds the grey mean of the RGB batch, shards hold [N, S, S, 1] images,
    and assembly writes a grey npz and grid (no tint: one channel cannot drift from the others)."""
    from ddpm.assemble import assemble

    ckpt = make_checkpoint("model.in_channels=1")
    sampling = dataclasses.replace(checkpoint_sampling(torch.load(ckpt, weights_only=True)), num_shards=1,
                                   num_samples=4)
    sample_shard(ckpt, tmp_path / "samples" / "shards", 0, sampling, progress=False)
    assemble(tmp_path / "samples", expect_shards=1)
    npz = np.load(next((tmp_path / "samples").glob("samples_*.npz")))["arr_0"]
    assert npz.shape == (4, 8, 8, 1) and npz.dtype == np.uint8 and npz.std() > 0
    grid = np.asarray(Image.open(tmp_path / "samples" / "grid.png").convert("RGB")).astype(int)
    assert (grid[..., 0] == grid[..., 1]).all() and (grid[..., 1] == grid[..., 2]).all()

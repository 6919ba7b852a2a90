"""Sampling shards: invariance to sharding and batch size, skip, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ddpm import sample as sample_mod
from ddpm.checkpoint import FORMAT, save_checkpoint
from ddpm.config import config_from_dict
from ddpm.diffusion import DDPM
from ddpm.errors import DDPMError, ShardError
from ddpm.sample import sample_shard, shard_range
from ddpm.unet import UNet

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "model": {"base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4],
              "num_heads": 2, "dropout": 0.0},
    "ddpm": {"num_timesteps": 20},
    "sampling": {"sampler": "ddim", "num_steps": 10, "num_samples": 12, "num_shards": 3, "batch_size": 4},
    "data": {"source": "folder", "image_size": 8, "center_crop": None},
    "infrastructure": {"num_gpus": 0},
}


def make_checkpoint(run_dir: Path, seed: int = 0, sampling: dict[str, Any] | None = None) -> Path:
    """A run dir with one checkpoint of a tiny 8x8 UNet with perturbed (non-trivial) weights and EMA."""
    raw = {k: dict(v) for k, v in TINY.items()}
    raw["sampling"].update(sampling or {})
    cfg = config_from_dict(raw)
    torch.manual_seed(seed)
    model = UNet.from_config(cfg.model, cfg.data.image_size)
    with torch.no_grad():
        for p in model.parameters():  # the output conv is zero-initialised: perturb everything
            p.add_(0.1 * torch.randn_like(p))
    shadow = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}
    diffusion = DDPM.from_config(cfg.ddpm, model)
    state = {"format": FORMAT, "step": 7, "model": model.state_dict(), "model_config": model.config_dict(),
             "ddpm": diffusion.state_dict(), "ema": {"decay": 0.9, "start_step": 0, "shadow": shadow},
             "optimizer": {}, "scaler": None, "rng": {}, "data": {}, "config": cfg.to_dict(), "counters": {}}
    return save_checkpoint(run_dir, state)


def run_shards(ckpt: Path, out: Path, num_shards: int, **kw: Any) -> np.ndarray:
    """Sample every shard and concatenate them in index order."""
    parts = []
    for k in range(num_shards):
        path = sample_shard(ckpt, out, shard=k, num_shards=num_shards, device="cpu", progress=False, **kw)
        with np.load(path) as data:
            parts.append(data["arr_0"])
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("run"))


def test_shard_range_matches_array_split() -> None:
    for n, k in ((12, 3), (10, 3), (7, 7), (5, 1), (10000, 8)):
        splits = np.array_split(np.arange(n), k)
        assert [shard_range(n, k, i) for i in range(k)] == [(int(s[0]), int(s[-1]) + 1) for s in splits]


@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("ddpm", 20)])
def test_shard_and_batch_invariance(ckpt: Path, tmp_path: Path, sampler: str, steps: int) -> None:
    kw = dict(num_samples=12, sampler=sampler, num_steps=steps, seed_base=100)
    one = run_shards(ckpt, tmp_path / "a", 1, batch_size=12, **kw)
    three = run_shards(ckpt, tmp_path / "b", 3, batch_size=5, **kw)
    batched = run_shards(ckpt, tmp_path / "c", 1, batch_size=5, **kw)
    assert one.shape == (12, 8, 8, 3) and one.dtype == np.uint8
    assert one.std() > 5  # non-trivial images
    np.testing.assert_array_equal(one, three)
    np.testing.assert_array_equal(one, batched)
    meta = json.loads((tmp_path / "b" / "shard_1.json").read_text())
    assert (meta["start"], meta["stop"], meta["complete"], meta["step"]) == (4, 8, True, 7)
    assert meta["seeds"] == {"seed_base": 100, "first": 104, "last": 107}
    assert meta["sampler"] == sampler and meta["use_ema"] is True and meta["num_steps"] == steps
    assert meta["checkpoint_sha256"] == sample_mod.file_sha256(ckpt)
    assert set(meta["versions"]) == {"python", "torch", "numpy"}


def test_defaults_from_checkpoint_and_ema_choice(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    path = sample_shard(ckpt.parent.parent, device="cpu", progress=False)  # run dir; all else from config
    assert path == ckpt.parent.parent / "samples" / "shards" / "shard_2.npz"
    meta = json.loads(path.with_suffix(".json").read_text())
    assert (meta["shard"], meta["num_shards"], meta["start"], meta["stop"]) == (2, 3, 8, 12)
    assert (meta["sampler"], meta["num_steps"], meta["batch_size"]) == ("ddim", 10, 4)
    assert "images/s" in capsys.readouterr().out
    with np.load(path) as d:
        ema = d["arr_0"]
    raw = run_shards(ckpt, tmp_path, 3, use_ema=False)[8:]
    assert not np.array_equal(ema, raw)


def test_complete_shard_is_skipped(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    kw = dict(shard=1, num_shards=3, num_samples=12, device="cpu", progress=False)
    path = sample_shard(ckpt, tmp_path, **kw)
    stamps = [p.stat().st_mtime_ns for p in (path, path.with_suffix(".json"))]

    def no_model(*a: Any, **k: Any) -> None:
        raise AssertionError("the model must not be built for a complete shard")

    monkeypatch.setattr(sample_mod, "build_from_checkpoint", no_model)
    capsys.readouterr()
    assert sample_shard(ckpt, tmp_path, **kw) == path
    assert "already complete" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in (path, path.with_suffix(".json"))] == stamps
    # Other settings: the old shard is kept under stale/, never overwritten in place.
    monkeypatch.undo()
    sample_shard(ckpt, tmp_path, eta=0.5, **kw)
    assert len(list((tmp_path / "stale").glob("*/shard_1.npz"))) == 1
    assert json.loads(path.with_suffix(".json").read_text())["eta"] == 0.5


def test_resume_after_sigkill(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n, out = 12, tmp_path / "killed"
    cmd = [sys.executable, "-m", "ddpm.sample", "--checkpoint", str(ckpt), "--out", str(out), "--num-samples",
           str(n), "--num-shards", "1", "--shard", "0", "--batch-size", "1", "--sampler", "ddpm",
           "--steps", "10", "--device", "cpu", "--no-progress"]
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
    resumed = run_shards(ckpt, out, 1, num_samples=n, sampler="ddpm", num_steps=10, batch_size=5)
    assert f"resuming after {done} of {n}" in capsys.readouterr().out
    assert not partial.exists()
    clean = run_shards(ckpt, tmp_path / "clean", 1, num_samples=n, sampler="ddpm", num_steps=10, batch_size=n)
    np.testing.assert_array_equal(resumed, clean)


def test_partial_with_other_settings_restarts(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    real, calls = DDPM.sample, []

    def crash_on_second(self: DDPM, *a: Any, **k: Any) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(DDPM, "sample", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_shards(ckpt, tmp_path, 1, num_samples=6, batch_size=2, num_steps=10)
    monkeypatch.undo()
    assert (tmp_path / "shard_0.partial.npz").exists()
    capsys.readouterr()
    got = run_shards(ckpt, tmp_path, 1, num_samples=6, batch_size=2, num_steps=5)
    assert "restarting from scratch" in capsys.readouterr().out
    clean = run_shards(ckpt, tmp_path / "clean", 1, num_samples=6, batch_size=6, num_steps=5)
    np.testing.assert_array_equal(got, clean)


def test_bad_input(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    with pytest.raises(ShardError, match="shard 3 out of range"):
        sample_shard(ckpt, tmp_path, shard=3, num_shards=3, device="cpu")
    with pytest.raises(ShardError, match="SLURM_ARRAY_TASK_ID"):
        sample_shard(ckpt, tmp_path, device="cpu")
    with pytest.raises(ShardError, match="--steps"):
        sample_shard(ckpt, tmp_path, shard=0, num_steps=21, device="cpu")
    capsys.readouterr()
    code = sample_mod.main(["--checkpoint", str(tmp_path / "nope.pt"), "--shard", "0", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "nope.pt" in err
    assert sample_mod.main(["--checkpoint", str(ckpt), "--shard", "5", "--num-shards", "3"]) == 2


def test_fid_without_weights_fails_before_sampling(ckpt: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_model(*a: Any, **k: Any) -> None:
        raise AssertionError("sampling started before the FID weights were checked")

    monkeypatch.setattr(sample_mod, "build_from_checkpoint", no_model)
    with pytest.raises(DDPMError, match="pytorch-fid/releases"):
        sample_shard(ckpt, tmp_path / "out", shard=0, fid=True, device="cpu")
    code = sample_mod.main(["--checkpoint", str(ckpt), "--shard", "0", "--fid", "--out", str(tmp_path / "out")])
    assert code == 2 and capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "out").exists()

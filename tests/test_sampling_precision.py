"""Sampling precision and compilation: sampling.precision=bf16 (autocast of the network) and sampling.compile.

CPU stand-ins for the CUDA path: the same torch.autocast and torch.compile calls, on the tiny checkpoints of
tests/conftest.py. The compile test builds with inductor (a C++ compiler is needed; it fails, never skips,
without one); its kernels are cached by torch (/tmp/torchinductor_$USER), so only the first run pays the build.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ddpm import sample as sample_mod
from ddpm.checkpoint import load_checkpoint
from ddpm.diffusion import autocast_call
from ddpm.shards import build_from_checkpoint, checkpoint_sampling, sample_shard

SMALL = ("model.channel_mult=[1]", "model.attention_resolutions=[]")  # fewer kernels for inductor to build


def draw(diffusion: Any, sampler: str, **kw: Any) -> torch.Tensor:
    steps = 50 if sampler == "ddpm" else 10
    return diffusion.sample(4, (3, 8, 8), num_steps=steps, sampler=sampler, seeds=range(4), progress=False, **kw)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m"])
def test_bf16_autocast_is_applied_and_close_to_fp32(checkpoint: Path, sampler: str) -> None:
    model, diffusion = build_from_checkpoint(load_checkpoint(checkpoint))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5])
    with torch.no_grad():
        assert autocast_call(model, torch.bfloat16)(x, t).dtype == torch.bfloat16  # the network runs in bf16
        assert autocast_call(model, None) is model
    fp32 = draw(diffusion, sampler)
    bf16 = draw(diffusion, sampler, autocast_dtype=torch.bfloat16)
    assert bf16.dtype == fp32.dtype == torch.float32  # the sampler's arithmetic stays fp32
    diff = (bf16 - fp32).abs().max().item()
    assert 0 < diff < 0.1, diff  # really autocast (not bitwise fp32), and close to it
    assert not model.training


def test_shard_records_precision_and_redoes_a_shard_of_the_other_precision(
        checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = dataclasses.replace(checkpoint_sampling(load_checkpoint(checkpoint)), num_samples=4, num_shards=1,
                            batch_size=4)
    assert s.precision == "fp32" and s.compile is False  # the defaults
    path = sample_shard(checkpoint, tmp_path, 0, s, device="cpu", progress=False)
    assert json.loads(path.with_suffix(".json").read_text())["precision"] == "fp32"
    with np.load(path) as d:
        fp32 = d["arr_0"]
    capsys.readouterr()
    sample_shard(checkpoint, tmp_path, 0, dataclasses.replace(s, precision="bf16"), device="cpu", progress=False)
    assert "other settings (precision 'fp32' vs 'bf16')" in capsys.readouterr().out  # not reused: redone
    assert len(list((tmp_path / "stale").glob("*/shard_0.npz"))) == 1
    meta = json.loads(path.with_suffix(".json").read_text())
    assert (meta["precision"], meta["complete"]) == ("bf16", True)
    with np.load(path) as d:
        bf16 = d["arr_0"]
    assert np.abs(bf16.astype(int) - fp32).max() <= 13  # 0.1 in [-1, 1] is 12.75 grey levels
    # the CLI flag sets the same key: the bf16 shard is now the one that matches
    args = ["--checkpoint", str(checkpoint), "--out", str(tmp_path), "--shard", "0", "--num-samples", "4",
            "--num-shards", "1", "--batch-size", "4", "--device", "cpu", "--no-progress"]
    assert sample_mod.main([*args, "--precision", "bf16"]) == 0
    assert "already complete" in capsys.readouterr().out


def test_compiled_network_gives_the_eager_images(make_checkpoint: Any, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """One inductor build: ``sample_shard``'s own (sampling.compile) gives the eager shard's images, and its
    compiled network, taken from the ``torch.compile`` call, draws the eager network's images to 1e-5."""
    ckpt = make_checkpoint(*SMALL)
    calls, compiled_nets, real = [], [], torch.compile

    def spy(fn: Any, **kw: Any) -> Any:
        calls.append(kw)
        compiled_nets.append(net := real(fn, **kw))
        return net

    monkeypatch.setattr(torch, "compile", spy)
    s = dataclasses.replace(checkpoint_sampling(load_checkpoint(ckpt)), num_samples=4, num_shards=1, batch_size=4,
                            sampler="ddim", num_steps=10)
    a = sample_shard(ckpt, tmp_path / "eager", 0, s, device="cpu", progress=False)
    assert not calls
    begin = time.perf_counter()
    b = sample_shard(ckpt, tmp_path / "compiled", 0, dataclasses.replace(s, compile=True), device="cpu",
                     progress=False)
    print(f"inductor build and first sampling: {time.perf_counter() - begin:.1f}s")
    assert calls == [{"mode": "default", "dynamic": False}]  # reduce-overhead (CUDA graphs) is for CUDA only
    assert json.loads(b.with_suffix(".json").read_text())["compile"] is True
    with np.load(a) as da, np.load(b) as db:
        assert np.abs(da["arr_0"].astype(int) - db["arr_0"]).max() <= 1  # the same up to a rounding boundary

    (compiled_net,) = compiled_nets  # the shard's network (EMA weights), compiled for [4, 3, 8, 8]
    assert type(compiled_net).__name__ == "OptimizedModule"
    model, diffusion = build_from_checkpoint(load_checkpoint(ckpt))  # the same EMA weights, eager
    with torch.no_grad():  # as sample_shard draws: the same graph, no second build
        eager = draw(diffusion, "ddim")
        diffusion.model = compiled_net
        compiled = draw(diffusion, "ddim")
    assert torch.allclose(compiled, eager, atol=1e-5, rtol=0), (compiled - eager).abs().max().item()
    assert len(calls) == 1

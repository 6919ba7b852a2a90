"""``python -m tools.bench``'s sampling part: a row per sampler x batch size, and its precision choice.

Runs the real command (its ``main(argv)``, in this process) with ``--quick`` on
configs/tiny_cpu.yaml widened to 32 channels (the diffusers twin needs widths divisible by 32): seconds.
"""

from __future__ import annotations

import argparse
import re

import pytest
from helpers import TINY_CONFIG, run_main

from ddpm.config import load_config
from tools.bench_sampling import sampling_precision

WIDE = "model.base_channels=32"


def test_quick_sampling_part_prints_a_row_per_sampler_and_batch(capsys: pytest.CaptureFixture[str]) -> None:
    from tools.bench import main

    proc = run_main(main, ["--quick", "--device", "cpu", "--config", TINY_CONFIG, "--parts", "sample",
                           "--repeats", "1", "--sample-batch-sizes", "2,3", WIDE], capsys)
    assert proc.code == 0, proc.err[-3000:]
    out = proc.out
    assert "2. sampling: DDPM.sample, fp32 (sampling.precision's default), compile=False" in out
    rows = re.findall(r"^   (DDPM-50|DDIM-50|DPMPP_2M-20) +(\d+) +([\d.]+) +[\d.]+-[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+$",
                      out, re.MULTILINE)
    assert sorted((name, int(b)) for name, b, _ in rows) == sorted(
        (name, b) for name in ("DDPM-50", "DDIM-50", "DPMPP_2M-20") for b in (2, 3)), out
    assert all(float(rate) > 0 for *_, rate in rows)
    vs = re.findall(r"^   (DDPM-50|DDIM-50) +[\d.]+ +[\d.]+ +[\d.]+x", out, re.MULTILINE)
    assert vs == ["DDPM-50", "DDIM-50"], out  # the diffusers comparison, as before
    assert "MFU" not in out  # CUDA only


def test_sampling_precision_bf16_on_cuda_unless_the_config_sets_it() -> None:
    def choice(overrides: list[str], cuda: bool) -> str:
        args = argparse.Namespace(config=str(TINY_CONFIG), overrides=overrides)
        return sampling_precision(load_config(TINY_CONFIG, overrides), args, cuda)[0]

    assert (choice([], cuda=False), choice([], cuda=True)) == ("fp32", "bf16")
    assert choice(["sampling.precision=fp32"], cuda=True) == "fp32"
    assert choice(["sampling.precision=bf16"], cuda=False) == "bf16"

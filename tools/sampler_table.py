"""``python -m tools.sampler_table CHECKPOINT``: sample quality per sampler and step count, on the digits.

    python -m tools.sampler_table runs/quickstart_digits/checkpoints/step_00000800.pt [--n 256] [--steps 10,20,50]

For a checkpoint trained on the digits (``make quickstart``), draws ``--n`` images (seeds 0..n-1, the EMA
weights, the checkpoint's clipping) with each sampler of :mod:`ddpm.samplers` (default: every registered one;
DDIM with eta 0) at each step count, and scores them with ``tools.digit_score``: the Frechet distance in the
feature space of a small classifier trained on the real digits (lower is better; only comparable at equal n), its
mean confidence, and how many of the 10 classes appear. Prints a markdown table, with the same score of n real
digits (the floor at this n) and of noise (the ceiling), and the seconds each row took.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm.checkpoint import load_resolved
from ddpm.config import Spacing, choices
from ddpm.cpus import apply_cpu_budget, cpu_budget
from ddpm.data import to_uint8
from ddpm.errors import ConfigError, cli_entry
from ddpm.samplers import SamplerSettings, SamplerSpec, sampler_names
from ddpm.shards import build_from_checkpoint
from tools.digit_score import load_scorer, noise_score, real_digits_score


def sample_images(state: dict[str, Any], spec: SamplerSettings, n: int, batch_size: int = 128) -> np.ndarray:
    """uint8 [n, S, S, C] drawn with the sampler ``spec`` from a loaded checkpoint's EMA weights, seeds 0..n-1."""
    _, diffusion = build_from_checkpoint(state, use_ema=True)
    mc, size = state["model_config"], state["config"]["data"]["image_size"]
    out = []
    for lo in range(0, n, batch_size):
        seeds = list(range(lo, min(lo + batch_size, n)))
        x = diffusion.sample(len(seeds), (mc["in_channels"], size, size), sampler=spec, seeds=seeds,
                             progress=False)  # [B, C, S, S] in [-1, 1]
        out.append(to_uint8(x))
    return np.concatenate(out)


def table(ckpt: str | Path, n: int, steps: list[int], samplers: list[str], spacing: str,
          size: int | None = None) -> str:
    """The markdown table (one row per sampler and step count, then the real-digit and noise anchors), scored
    at ``size`` pixels (default: the checkpoint's image size; samples of another side are resized bicubic)."""
    _, state = load_resolved(ckpt, map_location="cpu")  # read once, outside the timed rows
    size = int(size or state["config"]["data"]["image_size"])
    scorer = load_scorer(size)  # train or load the classifier before timing anything
    rows = ["| sampler | steps | FD (lower is better) | confidence | classes | seconds |",
            "|---|---:|---:|---:|---:|---:|"]
    for sampler in samplers:
        for s in steps:
            begin = time.perf_counter()
            images = sample_images(state, SamplerSpec(sampler, s, timestep_spacing=spacing), n)
            took = time.perf_counter() - begin
            sc = scorer.score(images)
            rows.append(f"| {sampler} | {s} | {sc['fd']:.1f} | {sc['confidence']:.3f} | {sc['classes']}/10 | "
                        f"{took:.0f} |")
            print(rows[-1], file=sys.stderr, flush=True)  # progress; the table goes to stdout at the end
    real, noise = real_digits_score(n, size=size), noise_score(n, size=size)
    rows.append(f"| real digits | - | {real['fd']:.1f} | {real['confidence']:.3f} | {real['classes']}/10 | - |")
    rows.append(f"| uniform noise | - | {noise['fd']:.1f} | {noise['confidence']:.3f} | {noise['classes']}/10 | - |")
    return "\n".join(rows)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.sampler_table", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint (or run directory) trained on the digits")
    p.add_argument("--n", type=int, default=256, help="images per row (default 256)")
    p.add_argument("--steps", default="10,20,50", help="comma list of step counts (default 10,20,50)")
    p.add_argument("--samplers", default=",".join(sampler_names()), help="comma list (default: all)")
    p.add_argument("--spacing", choices=choices(Spacing), default="trailing", help="timestep spacing")
    p.add_argument("--size", type=int, default=None,
                   help="score at this side, e.g. 16 for an 8x8 model (default: the checkpoint's image size)")
    args = p.parse_args(argv)
    try:
        steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        raise ConfigError(f"--steps: {args.steps!r} is not a comma list of integers") from None
    samplers = args.samplers.split(",")
    if bad := [s for s in samplers if s not in sampler_names()]:
        raise ConfigError(f"--samplers: unknown {', '.join(bad)} (expected some of {', '.join(sampler_names())})")
    if args.n < 2 or min(steps) < 1:
        raise ConfigError("--n must be >= 2 and every --steps value >= 1")
    if args.size is not None and args.size < 8:
        raise ConfigError(f"--size: {args.size} is smaller than the digits' 8 pixels")
    print(f"sampler_table: {apply_cpu_budget(cpu_budget('sample'))}; {args.checkpoint}, n={args.n}, "
          f"{args.spacing} spacing", flush=True)
    torch.manual_seed(0)
    print(table(args.checkpoint, args.n, steps, samplers, args.spacing, args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Part 2 of ``python -m tools.bench``: sampling throughput of ``DDPM.sample``, and against diffusers.

Two tables:

- ours, per sampler (DDPM-T, DDIM-50, DPM-Solver++(2M)-20) and per batch size (``--sample-batch-sizes``):
  images/s at the sampling precision (``sampling.precision``; on CUDA bf16 when the config leaves it unset,
  the header says which), turned into an autocast dtype by training's rule (``ddpm.precision.autocast_dtype``:
  bf16 on a card without native bf16, a V100 or T4, stops with its one line and fix), with ``sampling.compile``
  honoured as ``ddpm.sample`` does (one compiled graph per batch size, built in an untimed warmup), FLOPs per
  network call (``FlopCounterMode``) and, on CUDA, the model FLOP utilisation against the measured matmul peak
  in the same dtype;
- ours against a diffusers scheduler loop (``DDPMScheduler`` / ``DDIMScheduler.step``) around the same
  network at the first batch size, both fp32 and eager, for DDPM-T and DDIM-50.

With ``--quick`` a few steps are timed (respaced: the same work per step) and the per-step time is
multiplied by the step count; without it each sampler runs once in full.

It also holds the timing helpers both parts use (``timed``, ``Pressure``, ``matmul_peak``): ``tools.bench``
imports this module and this module imports nothing of ``tools.bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from ddpm.config import Config
from ddpm.configtools import apply_overrides, read_yaml
from ddpm.diffusion import DDPM
from ddpm.precision import autocast_dtype
from ddpm.shards import compiled_for_sampling
from tools.diffusers_twin import diffusers_loop

DIFFUSERS_SAMPLERS = ("ddpm", "ddim")


# ---- timing helpers: tools.bench's training part uses them too (it imports this module, never the reverse)
def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``fn()``, the device synchronized before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    begin = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - begin


class Pressure:
    """Share of wall time some task waited for a CPU (Linux PSI) during a ``with`` block: the noise gauge."""

    def __enter__(self) -> Pressure:
        self.begin, self.stall = time.perf_counter(), self._stall()
        return self

    def __exit__(self, *exc: object) -> None:
        end, self.wall = self._stall(), time.perf_counter() - self.begin
        self.share = None if end is None or self.stall is None else (end - self.stall) / self.wall

    @staticmethod
    def _stall() -> float | None:
        with contextlib.suppress(OSError, IndexError, ValueError), open("/proc/pressure/cpu") as f:
            return float(f.readline().split("total=")[1]) / 1e6
        return None

    def __str__(self) -> str:
        if self.share is None:
            return "CPU pressure unknown"
        return f"CPU pressure {100 * self.share:.0f}%: " + (
            "other work competed for the CPUs, figures are noisy" if self.share > 0.1 else "quiet machine")


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 8192, iters: int = 20) -> float:
    """FLOP/s of a large square matmul (the device's practical peak for ``dtype``)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    return 2 * n**3 * iters / timed(lambda: [a @ b for _ in range(iters)], device)


def sampler_steps(cfg: Config) -> list[tuple[str, int]]:
    return [("ddpm", cfg.ddpm.num_timesteps), ("ddim", min(50, cfg.ddpm.num_timesteps)),
            ("dpmpp_2m", min(20, cfg.ddpm.num_timesteps))]


def sampling_precision(cfg: Config, args: argparse.Namespace, cuda: bool) -> tuple[str, str]:
    """(fp32 or bf16, why): the config's sampling.precision when it sets one, else bf16 on CUDA, fp32 on CPU."""
    raw = apply_overrides(read_yaml(args.config), args.overrides)
    if "precision" in (raw.get("sampling") or {}):
        return cfg.sampling.precision, "sampling.precision"
    if cuda:
        return "bf16", "the bench's default on CUDA: sampling.precision is unset, ddpm.sample would run fp32"
    return "fp32", "sampling.precision's default"


def sampling_autocast(cfg: Config, args: argparse.Namespace,
                      device: torch.device) -> tuple[str, torch.dtype | None, str]:
    """(precision, autocast dtype or None for fp32, why): :func:`sampling_precision`'s choice through training's
    rule (:func:`ddpm.precision.autocast_dtype`), before any work on the device: bf16 on a card without native bf16
    (V100, T4) and fp16 off CUDA raise its :class:`~ddpm.envcheck.SetupError` (one line naming the card and the
    fix), as ``ddpm.sample`` and the trainer do."""
    precision, why = sampling_precision(cfg, args, device.type == "cuda")
    return precision, autocast_dtype(precision, device, "sampling.precision"), why


def flops_per_image(net: nn.Module, cfg: Config, device: torch.device) -> float:
    """FLOPs of one network call on one image (they scale linearly with the batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, torch.zeros(1, dtype=torch.long, device=device))
    return float(counter.get_total_flops())


def bench_ours(net: nn.Module, cfg: Config, batch_sizes: list[int], device: torch.device,
               autocast: torch.dtype | None, compile_net: bool, quick_steps: int | None,
               repeats: int) -> list[tuple[str, int, int, list[float]]]:
    """(sampler, steps, batch, seconds per step of each run) for every sampler x batch size."""
    shape = (cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
    ddpm = DDPM.from_config(cfg.ddpm, compiled_for_sampling(net, device) if compile_net else net)
    rows = []
    for batch in batch_sizes:
        # warmup: compiles this shape (reduce-overhead: records the CUDA graph on the 2nd call)
        ddpm.sample(batch, shape, num_steps=3, sampler="ddim", progress=False, autocast_dtype=autocast)
        for sampler, total in sampler_steps(cfg):
            run = min(quick_steps or total, total)
            spec = dataclasses.replace(cfg.sampling, sampler=sampler, num_steps=run)  # the config's, re-stepped
            per_step = [timed(lambda sp=spec, b=batch: ddpm.sample(
                b, shape, sampler=sp, seeds=range(b), progress=False, autocast_dtype=autocast), device) / run
                for _ in range(repeats)]
            rows.append((sampler, total, batch, per_step))
    return rows


def bench_vs_diffusers(net: nn.Module, cfg: Config, batch_size: int, device: torch.device, quick_steps: int | None,
                       repeats: int) -> list[tuple[str, int, float, float]]:
    """(sampler, steps, ours s/step, diffusers s/step) for DDPM-T and DDIM-50, medians of alternating runs."""
    ddpm = DDPM.from_config(cfg.ddpm, net)
    shape = (batch_size, cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
    ddpm.sample(batch_size, shape[1:], num_steps=1, sampler="ddim", progress=False)  # warmup
    rows = []
    for sampler, total in [st for st in sampler_steps(cfg) if st[0] in DIFFUSERS_SAMPLERS]:
        run = min(quick_steps or total, total)
        ours, theirs = [], []
        for _ in range(repeats):  # ours: a whole sampler call, respaced to `run` steps when quick (same work/step)
            spec = dataclasses.replace(cfg.sampling, sampler=sampler, num_steps=run)
            ours.append(timed(lambda sp=spec: ddpm.sample(
                batch_size, shape[1:], sampler=sp, seeds=range(batch_size), progress=False), device) / run)
            theirs.append(timed(lambda s=sampler, n=total, r=run: diffusers_loop(net, cfg, s, n, r, shape, device),
                                device) / run)
        rows.append((sampler, total, statistics.median(ours), statistics.median(theirs)))
    return rows


def report_sampling(cfg: Config, ours: nn.Module, device: torch.device, args: argparse.Namespace) -> None:
    cuda = device.type == "cuda"
    quick_steps = (10 if cuda else 2) if args.quick else None
    repeats = args.repeats if quick_steps else 1
    batches = args.sample_batch_sizes
    precision, autocast, why = sampling_autocast(cfg, args, device)
    compile_net = cfg.sampling.compile
    how = (f"QUICK: median of {repeats} runs of {quick_steps} steps, per-step time x steps" if quick_steps
           else "one full run each")
    print(f"\n2. sampling: DDPM.sample, {precision} ({why}), compile={compile_net}"
          f"{' (mode reduce-overhead: CUDA graphs)' if compile_net and cuda else ''}, per-image seeds; {how}")
    flops = flops_per_image(ours, cfg, device)
    peak_dtype = autocast or torch.float32  # the matmuls the sampler runs (fp32: TF32 where infrastructure.tf32)
    peak = matmul_peak(device, peak_dtype) if cuda else None
    ours.eval()
    with Pressure() as pressure:
        rows = bench_ours(ours, cfg, batches, device, autocast, compile_net, quick_steps, repeats)
    print(f"   {'sampler':<14} {'batch':>6} {'img/s median':>13} {'range':>17} {'ms/step':>9} "
          f"{'GFLOP/call':>11} {'GFLOP/s':>9}" + ("    MFU" if peak else ""))
    for sampler, total, batch, per_step in rows:
        med = statistics.median(per_step)
        rates = sorted(batch / (s * total) for s in per_step)
        achieved = flops * batch / med
        print(f"   {f'{sampler.upper()}-{total}':<14} {batch:>6} {batch / (med * total):>13.4f} "
              f"{f'{rates[0]:.4f}-{rates[-1]:.4f}':>17} {1e3 * med:>9.2f} {flops * batch / 1e9:>11.2f} "
              f"{achieved / 1e9:>9.1f}" + (f"  {100 * achieved / peak:4.1f}%" if peak else ""))
    if peak:
        print(f"   MFU: achieved FLOP/s over the measured {str(peak_dtype).removeprefix('torch.')} matmul peak, "
              f"{peak / 1e12:.0f} TFLOP/s")
    print(f"   ({pressure})")
    batch = batches[0]
    print(f"   against diffusers: batch {batch}, fp32 eager in both (as ddpm.sample runs by default), our network "
          "in both loops")
    with Pressure() as pressure:
        pairs = bench_vs_diffusers(ours, cfg, batch, device, quick_steps, repeats)
    print(f"   {'sampler':<14} {'ours img/s':>11} {'diffusers img/s':>16} {'ours/diffusers':>15} "
          f"{'ours ms/step':>13} {'diffusers ms/step':>18}")
    for sampler, total, s_ours, s_theirs in pairs:
        print(f"   {f'{sampler.upper()}-{total}':<14} {batch / (s_ours * total):>11.4f} "
              f"{batch / (s_theirs * total):>16.4f} {s_theirs / s_ours:>14.3f}x "
              f"{1e3 * s_ours:>13.1f} {1e3 * s_theirs:>18.1f}")
    print(f"   ({pressure})")
    ours.train()

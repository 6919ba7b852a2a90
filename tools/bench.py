"""``python -m tools.bench``: our U-Net and samplers against diffusers, and the data loader, on one machine.

    python -m tools.bench --quick                                     # CPU: about two minutes
    python -m tools.bench --device cuda --config configs/ddpm_babel.yaml [infrastructure.compile=true]

Prints, in one run, side by side:

1. training throughput (images/s of forward + backward + AdamW, the same loop for both networks) of our
   ``UNet`` for the config's model section and of diffusers' ``UNet2DModel`` built to the same architecture
   (matching parameter count; both hold the same weights and agree to float rounding, which is checked and
   printed), at the same precision (fp32 on CPU, bf16 autocast on CUDA) and memory format; with the
   ratio ours/diffusers, FLOPs per step (``FlopCounterMode``) and, on CUDA, the model FLOP utilisation
   against the bf16 matmul peak measured on the device;
2. sampling throughput of ``DDPM.sample`` per sampler (DDPM-1000, DDIM-50, DPM-Solver++(2M)-20) and batch
   size, at ``sampling.precision`` (bf16 on CUDA when unset) and ``sampling.compile``, with FLOPs per call
   and MFU on CUDA; and DDPM-1000 / DDIM-50 against a diffusers scheduler loop over the same network, fp32
   (``tools/bench_sampling.py``); with ``--quick`` a few steps are timed and multiplied by the step count;
3. the data loader (``ddpm.data.pack.bench``) on the configured source when its data is there, else on
   a synthetic folder of CelebA-sized JPEGs made in a temporary directory (the header says which);
4. on CPU, the CPU budget's figures (``tools.throughput``): parallel-shard efficiency, loader-worker ratio
   and the spread of per-window training img/s.

Timing: warmup steps, then ``--repeats`` runs of ``--steps`` steps each (``time.perf_counter``, CUDA
synchronized), our model and diffusers' alternating so drifting load on a shared machine hits both;
the median run is reported with the range, and the share of time other tasks waited for a CPU (Linux
PSI) says how noisy the machine was. The Trainer's extras (clipping, EMA, one host sync) are left out of
both. ``infrastructure.*`` overrides (channels_last, compile, precision, ...) apply to both
networks. Needs the ``bench`` extra: ``pip install -e '.[bench]'`` (diffusers).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import resource
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddpm.config import Config, DataConfig, load_config
from ddpm.configtools import parse_with_overrides
from ddpm.cpus import apply_cpu_budget, cpu_budget
from ddpm.diffusion import DDPM
from ddpm.errors import ConfigError, DDPMError, cli_entry
from ddpm.optim import build_optimizer
from ddpm.precision import amp_dtype, memory_format, set_fp32_precision
from ddpm.unet import UNet
from tools.bench_sampling import Pressure, matmul_peak, report_sampling, timed
from tools.diffusers_twin import build_pair, sample_of

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "ddpm_babel.yaml"
GLIBC_KEEP = "glibc.malloc.trim_threshold=17179869184:glibc.malloc.mmap_threshold=33554432"


# ---- timing helpers: timed, Pressure, matmul_peak live in tools.bench_sampling (imported one way) ------
def machine(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        what = f"{p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})"
    else:
        model = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
            model = names[0] if names else model
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        what = (f"{model}, {cpus} CPUs, {torch.get_num_threads()} torch threads, "
                f"{torch.backends.cpu.get_cpu_capability()}")
    import diffusers

    return (f"{what}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"python {platform.python_version()}")


# ---- 1. training --------------------------------------------------------------------------------------
class TrainLoop:
    """One network's training step: DDPM forward process (ours, shared), eps-MSE, backward, AdamW."""

    def __init__(self, net: nn.Module, call: Callable, cfg: Config, device: torch.device,
                 amp: torch.dtype | None, memory_format: torch.memory_format):
        self.net, self.call, self.device, self.amp, self.mf = net, call, device, amp, memory_format
        tc = cfg.training
        self.opt = build_optimizer(net.parameters(), tc, cfg.infrastructure)  # the trainer's optimizer
        self.ddpm = DDPM.from_config(cfg.ddpm, net)
        self.shape = (cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)

    def batch(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        x0 = torch.rand((n, *self.shape), generator=g) * 2 - 1
        t = torch.randint(0, self.ddpm.num_timesteps, (n,), generator=g)
        noise = torch.randn((n, *self.shape), generator=g)
        return (x0.to(self.device).contiguous(memory_format=self.mf), t.to(self.device),
                noise.to(self.device).contiguous(memory_format=self.mf))

    def step(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> None:
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            x_t, _ = self.ddpm.forward_process(x0, t, noise)
            loss = F.mse_loss(self.call(x_t, t).float(), noise.float())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def flops(self, batch_size: int) -> float:
        """FLOPs of one training step at ``batch_size`` (counted at batch 1: they scale linearly)."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                x0, t, noise = self.batch(1)
                loss = F.mse_loss(self.call(x0, t).float(), noise.float())
            loss.backward()
        self.opt.zero_grad(set_to_none=True)
        return counter.get_total_flops() * batch_size


def bench_training(loops: dict[str, TrainLoop], batch_size: int, warmup: int, steps: int, repeats: int,
                   ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """(images/s of each run, minor page faults per step) per network; networks alternate run by run."""
    data = next(iter(loops.values())).batch(batch_size, seed=1)
    for loop in loops.values():
        for _ in range(warmup):
            loop.step(*data)
    rates: dict[str, list[float]] = {name: [] for name in loops}
    faults = dict.fromkeys(loops, 0.0)
    for _ in range(repeats):
        for name, loop in loops.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            elapsed = timed(lambda loop=loop: [loop.step(*data) for _ in range(steps)], loop.device)
            faults[name] += (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (steps * repeats)
            rates[name].append(steps * batch_size / elapsed)
    return rates, faults


# ---- 2. sampling: tools/bench_sampling.py -------------------------------------------------------------


# ---- 3. data ------------------------------------------------------------------------------------------
def synthetic_folder(root: Path, n: int) -> None:
    """``n`` random 178x218 JPEGs (the aligned CelebA size)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = (rng.random((218, 178, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i:06d}.jpg", quality=90)


def bench_data(cfg: DataConfig, batch_size: int, device: str, quick: bool) -> tuple[str, dict[str, float], str]:
    """(what was measured, images/s per source, the bench's own lines)."""
    from ddpm.data.pack import bench as data_bench
    from ddpm.data.sources import build_source

    seconds, n = (2.0, 256) if quick else (5.0, 1024)
    out = io.StringIO()
    try:
        build_source(cfg)
        what = f"configured source {cfg.source} at {cfg.path}"
        return what, data_bench(cfg, seconds, batch_size, device, max_images=4 * n, out=out), out.getvalue()
    except (DDPMError, OSError) as err:
        reason = str(err).splitlines()[0]
    with tempfile.TemporaryDirectory(prefix="ddpm-bench-data-") as tmp:
        synthetic_folder(Path(tmp), n)
        synth = DataConfig(**{**vars(cfg), "source": "folder", "path": tmp})
        what = (f"SYNTHETIC folder of {n} random 178x218 JPEGs (the configured {cfg.source} source is not "
                f"here: {reason})")
        return what, data_bench(synth, seconds, batch_size, device, max_images=n, out=out), out.getvalue()


# ---- the report ---------------------------------------------------------------------------------------
def report_training(cfg: Config, ours: UNet, theirs: nn.Module, device: torch.device, args: argparse.Namespace,
                    amp: torch.dtype | None, mf: torch.memory_format, precision: str) -> float:
    """Part 1; returns our median training images/s."""
    cuda = device.type == "cuda"
    batch, steps, warmup, repeats = args.batch_size, args.steps, args.warmup, args.repeats
    nets = {"ours": (ours, ours), "diffusers": (theirs, sample_of(theirs))}
    loops = {name: TrainLoop(net, call, cfg, device, amp, mf) for name, (net, call) in nets.items()}
    flops = {name: loop.flops(batch) for name, loop in loops.items()}
    if cfg.infrastructure.compile:
        for loop in loops.values():
            loop.call = torch.compile(loop.call)
    peak = matmul_peak(device, torch.bfloat16) if cuda else None
    print(f"\n1. training: forward + backward + AdamW, batch {batch}, {precision}; {repeats} runs of {steps} "
          f"step(s) after {warmup} warmup step(s) per network, alternating")
    with Pressure() as pressure:
        rates, faults = bench_training(loops, batch, warmup, steps, repeats)
    print(f"   {'network':<10} {'parameters':>12} {'img/s median':>13} {'range':>12} {'ms/step':>8} "
          f"{'GFLOP/step':>11} {'GFLOP/s':>8} {'faults/step':>12}" + ("    MFU" if peak else ""))
    for name, r in rates.items():
        med = statistics.median(r)
        achieved = flops[name] * med / batch
        print(f"   {name:<10} {sum(p.numel() for p in loops[name].net.parameters()):>12,} {med:>13.2f} "
              f"{f'{min(r):.2f}-{max(r):.2f}':>12} {1e3 * batch / med:>8.0f} {flops[name] / 1e9:>11.1f} "
              f"{achieved / 1e9:>8.1f} {faults[name]:>12,.0f}" + (f"  {100 * achieved / peak:4.1f}%" if peak else ""))
    ratio = statistics.median(rates["ours"]) / statistics.median(rates["diffusers"])
    pairs = ", ".join(f"{a / b:.2f}" for a, b in zip(rates["ours"], rates["diffusers"], strict=True))
    print(f"   ours / diffusers = {ratio:.3f}x (medians; {max(rates['ours']) / max(rates['diffusers']):.3f}x "
          f"best runs; run by run {pairs}); target >= 1.2x: {'met' if ratio >= 1.2 else 'NOT met'}")
    if peak:
        print(f"   MFU: achieved FLOP/s over the measured bf16 matmul peak, {peak / 1e12:.0f} TFLOP/s")
    if not cuda and max(faults.values()) > 100_000:  # glibc hands big tensors back to the OS and re-faults them
        print("   faults/step: the allocator returns big tensors to the OS and the kernel zeroes them again each "
              f"step; to keep them: GLIBC_TUNABLES={GLIBC_KEEP} (or jemalloc / tcmalloc via LD_PRELOAD)")
    print(f"   ({pressure})")
    return statistics.median(rates["ours"])


def report_data(cfg: Config, device: torch.device, args: argparse.Namespace, train_rate: float | None) -> None:
    what, rates, lines = bench_data(cfg.data, args.batch_size, device.type, args.quick)
    print(f"\n3. data loader (ddpm.data.pack.bench, batch {args.batch_size}): {what}")
    for line in lines.rstrip().splitlines():
        print(f"   {line.strip()}")
    if train_rate:
        print("   headroom over our training rate: "
              + ", ".join(f"{source} {rate / train_rate:.0f}x" for source, rate in rates.items()))


def batch_sizes(text: str) -> list[int]:
    """``"64,256"`` -> [64, 256]; anything else is argparse's usage error (ValueError)."""
    sizes = [int(b) for b in text.split(",")]
    if min(sizes) < 1:
        raise ValueError(text)
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (model, ddpm, data sections)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. infrastructure.channels_last=true")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default: 8 CPU, 64 CUDA)")
    p.add_argument("--sample-batch-sizes", type=batch_sizes, default=None,
                   help="comma list of sampling batches (default: 64,256 on CUDA, the training batch on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per run")
    p.add_argument("--warmup", type=int, default=None, help="untimed training steps per network")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per network (the median is reported)")
    p.add_argument("--quick", action="store_true",
                   help="time a few sampling steps and multiply (full DDPM-1000 on CPU takes most of an hour)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the CPU budget)")
    p.add_argument("--parts", default="train,sample,data,cpu",
                   help="which of train,sample,data,cpu to run (cpu: tools.throughput on configs/quickstart_digits)")
    args = parse_with_overrides(p, argv)
    for name in ("batch_size", "steps", "warmup", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < (0 if name == "warmup" else 1):
            raise ConfigError(f"--{name.replace('_', '-')}: invalid value {getattr(args, name)}")
    if args.repeats < 1 or not set(args.parts.split(",")) <= {"train", "sample", "data", "cpu"}:
        raise ConfigError("--repeats must be >= 1 and --parts a comma list of train, sample, data, cpu")
    return args


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise DDPMError("diffusers is not installed: pip install -e '.[bench]'") from None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda, infra, parts = device.type == "cuda", cfg.infrastructure, args.parts.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        print(f"threads: {apply_cpu_budget(cpu_budget('bench'))}")
    args.batch_size = args.batch_size or (64 if cuda else 8)
    args.sample_batch_sizes = args.sample_batch_sizes or ([64, 256] if cuda else [args.batch_size])
    args.steps = args.steps or ((10 if args.quick else 20) if cuda else (1 if args.quick else 2))
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    set_fp32_precision(infra.tf32)  # the trainer's matmul and convolution precision
    amp = amp_dtype(infra, device)  # the trainer's choice
    mf = memory_format(infra, device)  # the trainer's choice (channels_last null: on for CPU, off for CUDA)
    precision = f"{amp} autocast".replace("torch.", "") if amp else "fp32"

    print(f"tools.bench on {device.type}: {machine(device)}")
    print(f"config {args.config}: {cfg.data.image_size}x{cfg.data.image_size}, {precision}, "
          f"{'channels_last' if mf == torch.channels_last else 'contiguous'}, compile={infra.compile}, "
          f"fused_adam={bool(cuda and infra.fused_adam)}, tf32={bool(cuda and infra.tf32)}"
          f"{', quick' if args.quick else ''}")
    ours, theirs, parity = build_pair(cfg, device)
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    blocks = theirs.config
    print(f"diffusers twin: UNet2DModel(block_out_channels={tuple(blocks.block_out_channels)}, layers_per_block="
          f"{blocks.layers_per_block}, {'+'.join(b[:-7] for b in blocks.down_block_types)}, "
          f"{blocks.resnet_time_scale_shift}, attn_norm_num_groups=32) with {cfg.model.num_heads} heads set on "
          "every Attention")
    print(f"parameters: ours {n_ours:,}, diffusers {n_theirs:,} ({100 * (n_theirs / n_ours - 1):+.3f}%); "
          f"the same weights in both give max |ours - diffusers| = {parity:.1e} (eval, batch 2)")
    ours.to(memory_format=mf)
    theirs.to(memory_format=mf)
    train_rate = None
    if "train" in parts:
        train_rate = report_training(cfg, ours, theirs, device, args, amp, mf, precision)
    del theirs
    if "sample" in parts:
        report_sampling(cfg, ours, device, args)
    if "data" in parts:
        report_data(cfg, device, args, train_rate)
    if "cpu" in parts and not cuda:  # the CPU budget's figures (ddpm.cpus), on the quickstart's small model
        from tools.throughput import QUICKSTART, report

        report(load_config(QUICKSTART), args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())

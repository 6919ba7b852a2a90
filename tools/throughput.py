"""``python -m tools.throughput``: does every process use exactly the CPUs it was given? (``ddpm.cpus``)

    python -m tools.throughput [--config configs/quickstart_digits.yaml] [overrides] [--quick]

Prints three figures for the config's model on this machine (``python -m tools.bench`` prints them too):

1. **parallel-shard efficiency**: the seconds one process takes to sample N images, over the seconds K
   processes take to sample N/K images each at the same time (K = this machine's CPUs, each process with
   the CPU budget the local executor gives it: ``DDPM_CPU_SHARE=K``). 1.0 is perfect; the target is >= 0.9.
   The same K processes with torch's default threads (every process one thread per CPU) are shown beside it.
2. **loader-worker ratio**: training images/s with the loader worker the budget gives a decoding source over
   images/s with the data read in the training process (``data.num_workers=0``), on cheap data (the digits,
   packed); target >= 0.95. Beside it, less noisy, the median milliseconds a step waits in ``next_batch``
   for its batch (and noise) with and without the worker: the hand-over cost itself. On the CPU the budget
   gives a packed source (nothing to decode) no worker: there it has nothing to save.
3. **stall**: the largest distance of one window's images/s from the median window, with the worker; the
   target is within 20%. A window is the trainer's log window (``training.log_every`` steps), the img/s a
   user reads in the log; the stall the issue saw was one log window in four.

Runs alternate (without, with, without, with) so drifting load on a shared machine hits both; the
share of time other tasks waited for a CPU (Linux PSI) is printed by ``tools.bench``.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ddpm.config import Config, load_config
from ddpm.configtools import parse_with_overrides
from ddpm.cpus import SHARE_ENV, affinity_cpus, apply_cpu_budget, cpu_budget
from ddpm.errors import cli_entry
from ddpm.rundir import RunDir

QUICKSTART = Path(__file__).resolve().parent.parent / "configs" / "quickstart_digits.yaml"


def _shard_process(cfg: Config, share: int, budget: bool, seeds: list[int], steps: int, barrier: Any,
                   out: Any) -> None:
    """One sampling process: build the network, wait for the others, sample ``seeds``; reports its seconds."""
    from ddpm.diffusion import DDPM
    from ddpm.unet import UNet

    if budget:
        os.environ[SHARE_ENV] = str(share)
        apply_cpu_budget(cpu_budget("sample"))
    else:  # torch's default: one thread per CPU of the machine, whatever else runs
        torch.set_num_threads(affinity_cpus())
    torch.manual_seed(0)
    net = UNet.from_config(cfg.model, cfg.data.image_size)
    with torch.no_grad():
        for p in net.parameters():  # the zero-initialised output layers would make every step trivial
            p.add_(torch.randn_like(p) * 0.05)
    diffusion = DDPM.from_config(cfg.ddpm, net)
    shape = (cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
    diffusion.sample(2, shape, num_steps=2, sampler="ddim", seeds=[0, 1], progress=False)  # warm-up
    barrier.wait()
    begin = time.perf_counter()
    for i in range(0, len(seeds), 64):
        batch = seeds[i:i + 64]
        diffusion.sample(len(batch), shape, num_steps=steps, sampler="ddim", seeds=batch, progress=False)
    out.put(time.perf_counter() - begin)


def run_shards(cfg: Config, processes: int, images: int, steps: int, budget: bool) -> float:
    """Wall seconds for ``processes`` processes sampling ``images`` images in all, started together."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(processes), ctx.Queue()
    per = images // processes
    procs = [ctx.Process(target=_shard_process, args=(cfg, processes, budget, list(range(k * per, (k + 1) * per)),
                                                      steps, barrier, out)) for k in range(processes)]
    for p in procs:
        p.start()
    seconds = [out.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    return max(seconds)


def report_shards(cfg: Config, images: int, steps: int, out: Any = None) -> dict[str, float]:
    """Figure 1: the parallel-shard efficiency with and without the CPU budget."""
    k = affinity_cpus()
    one = run_shards(cfg, 1, images, steps, budget=True)
    budgeted = run_shards(cfg, k, images, steps, budget=True)
    default = run_shards(cfg, k, images, steps, budget=False)
    print(f"sampling {images} images (DDIM-{steps}, {cfg.data.image_size}x{cfg.data.image_size}): one process "
          f"with {k} threads {one:.1f} s; {k} shards at once with the CPU budget {budgeted:.1f} s -> "
          f"parallel-shard efficiency {one / budgeted:.2f} (target >= 0.9); with torch's default threads "
          f"{default:.1f} s -> {one / default:.2f}", file=out, flush=True)
    return {"one_s": one, "parallel_s": budgeted, "efficiency": one / budgeted, "default_efficiency": one / default}


def _window_rates(cfg: Config, run: RunDir, windows: int, steps_per_window: int) -> tuple[list[float], float]:
    """(images/s of each window of ``steps_per_window`` training steps after 3 warm-up steps, median ms the
    training process waited in ``next_batch`` for a step's batch and noise)."""
    from ddpm.dist import DistEnv
    from ddpm.train import Trainer

    trainer = Trainer(cfg, run, DistEnv(device=torch.device("cpu")))
    try:
        for _ in range(3):
            trainer.train_step(*trainer.next_batch())
        rates, waits = [], []
        for _ in range(windows):
            begin = time.perf_counter()
            for _ in range(steps_per_window):
                asked = time.perf_counter()
                batch = trainer.next_batch()
                waits.append(time.perf_counter() - asked)
                trainer.train_step(*batch)
            rates.append(steps_per_window * cfg.training.batch_size / (time.perf_counter() - begin))
        return rates, 1e3 * statistics.median(waits)
    finally:
        trainer.close()


def report_loader(cfg: Config, windows: int, repeats: int, out: Any = None,
                  steps_per_window: int | None = None) -> dict[str, float]:
    """Figures 2 and 3: training with and without the budget's loader worker, on the packed digits, in windows
    of ``steps_per_window`` steps (default ``training.log_every``)."""
    per = steps_per_window or cfg.training.log_every
    from ddpm.data.pack import pack_dataset
    from tools.digits import export_digits

    with tempfile.TemporaryDirectory(prefix="ddpm-throughput-") as tmp:
        export_digits(Path(tmp) / "digits", cfg.data.image_size)
        folder = dataclasses.replace(cfg.data, source="folder", path=f"{tmp}/digits", center_crop=None,
                                     crop_center=None)
        pack_dataset(folder, Path(tmp) / "digits.npy", progress=False)
        workers = cpu_budget("train", "cpu").workers
        rates: dict[int, list[float]] = {0: [], workers: []}
        waits: dict[int, list[float]] = {0: [], workers: []}
        for r in range(repeats):
            for w in (0, workers):
                data = dataclasses.replace(folder, source="packed", path=f"{tmp}/digits.npy", num_workers=w)
                run_cfg = dataclasses.replace(cfg, data=data)
                window_rates, wait_ms = _window_rates(run_cfg, RunDir(Path(tmp) / f"run{r}_{w}"), windows, per)
                rates[w] += window_rates
                waits[w].append(wait_ms)
    median = {w: statistics.median(v) for w, v in rates.items()}
    wait = {w: statistics.median(v) for w, v in waits.items()}
    ratio = median[workers] / median[0]
    stall, stall_0 = (max(abs(v / median[w] - 1) for v in rates[w]) for w in (workers, 0))
    print(f"training on packed digits (batch {cfg.training.batch_size}): {median[0]:.1f} img/s with the data "
          f"read in the training process, {median[workers]:.1f} img/s with {workers} loader worker -> "
          f"loader-worker ratio {ratio:.2f} (target >= 0.95); a step's batch (and noise) takes "
          f"{wait[workers]:.2f} ms from the worker, {wait[0]:.2f} ms read in the process (medians; a step "
          f"{1e3 * cfg.training.batch_size / median[0]:.0f} ms); windows of {per} steps with the worker: "
          f"{min(rates[workers]):.1f}..{max(rates[workers]):.1f} img/s, at most {100 * stall:.0f}% from the median "
          f"(target <= 20%; without it: {min(rates[0]):.1f}..{max(rates[0]):.1f}, {100 * stall_0:.0f}%, the "
          f"machine's own noise); the budget's default for packed data on the CPU: "
          f"{cpu_budget('train', 'cpu', decodes=False).workers} workers (nothing to decode)", file=out, flush=True)
    return {"ratio": ratio, "stall": stall, "stall_0": stall_0, "rate_0": median[0], "rate_workers": median[workers],
            "wait_ms_0": wait[0], "wait_ms_workers": wait[workers]}


def report(cfg: Config, quick: bool, out: Any = None) -> dict[str, float]:
    """All three figures (``--quick``: fewer images and windows)."""
    shards = report_shards(cfg, images=64 if quick else 256, steps=10 if quick else 20, out=out)
    loader = report_loader(cfg, windows=4 if quick else 8, repeats=1 if quick else 2, out=out)
    return {**shards, **loader}


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(QUICKSTART), help="YAML config (its model, ddpm, training sections)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--quick", action="store_true", help="fewer images and windows (about a minute)")
    args = parse_with_overrides(p, argv)
    cfg = load_config(args.config, [*args.overrides, "infrastructure.num_gpus=0"])
    print(f"tools.throughput: {affinity_cpus()} CPUs, config {args.config}", flush=True)
    report(cfg, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())

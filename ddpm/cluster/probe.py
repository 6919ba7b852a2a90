"""The doctor's job on a training node: torch, driver, GPUs, the build's kernels for each card, the precision, an
all-reduce, storage and training speed.

``launch.py doctor`` submits :class:`ProbeTask` with the training job's resources (partition, gres, nodes,
CPUs, memory); it runs torchrun around ``python -m ddpm.cluster.probe`` as the trainer would be run, and rank 0
writes ``probe.json``: the report's lines and the measured figures the run plan is computed from.

The report is kept whatever fails: a check that fails is a FAIL line with its fix, and every other line is still
measured where it can be. No GPU seen or no kernels for the card: the all-reduce and the training speed say they
were skipped and why, while the driver, storage and checkpoint-save lines are measured. A precision the card
cannot run (bf16 on a V100 or T4): the speed is timed in fp16, the fix's first choice, and its line says so.

    python -m ddpm.cluster.probe --config RUN_DIR/config.yaml --run-dir RUN_DIR   # each rank, under torchrun
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddpm.config import Config, load_config
from ddpm.envcheck import (
    TORCH_FLOOR_TEXT,
    SetupError,
    check_torch_floor,
    driver_problem,
    gpu_problem,
    installed_torch,
    kernel_problem,
    nvidia_driver,
    torch_floor_problem,
)
from ddpm.errors import cli_entry
from ddpm.fsio import atomic_write_text
from ddpm.rundir import RunDir

if TYPE_CHECKING:  # not imported here: the doctor on the login node imports this module without torch
    import torch

Line = tuple[str, str, str]  # (ok | note | FAIL, what, detail)


def storage_speed(directory: Path, size_mb: int = 256) -> tuple[float, float]:
    """(write, read) MB/s of a ``size_mb`` file in ``directory``: fsynced write, then a read with the page cache
    dropped for it (``posix_fadvise``), so the read comes from the storage where the file system allows."""
    directory.mkdir(parents=True, exist_ok=True)
    block = os.urandom(2**20)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".doctor-speed-") as f:
        t0 = time.perf_counter()
        for _ in range(size_mb):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        write = size_mb / max(time.perf_counter() - t0, 1e-6)
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        with open(f.name, "rb", buffering=0) as r:
            while r.read(2**22):
                pass
        return write, size_mb / max(time.perf_counter() - t0, 1e-6)


def time_checkpoint(cfg: Config, directory: Path) -> tuple[int, float]:
    """(bytes, seconds) of a real checkpoint of ``cfg.model`` (weights, EMA, AdamW moments) saved the trainer's
    way (temp file, fsync, rename, LATEST) into a temporary run directory under ``directory``, then removed."""
    import torch

    from ddpm.checkpoint import FORMAT, save_checkpoint
    from ddpm.unet import UNet

    model = UNet.from_config(cfg.model, cfg.data.image_size)
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # creates exp_avg and exp_avg_sq
    state = {"format": FORMAT, "step": 1, "model": model.state_dict(), "model_config": model.config_dict(),
             "ddpm": {}, "config": cfg.to_dict(), "optimizer": opt.state_dict(),
             "ema": {"shadow": {k: v.clone() for k, v in model.state_dict().items()}}}
    directory.mkdir(parents=True, exist_ok=True)
    run = RunDir(tempfile.mkdtemp(prefix=".doctor-save-", dir=directory))  # made here, removed below
    try:
        t0 = time.perf_counter()
        path = save_checkpoint(run, state)
        return path.stat().st_size, time.perf_counter() - t0
    finally:
        shutil.rmtree(run.path, ignore_errors=True)


def environment_lines(cfg: Config) -> list[Line]:
    """torch and its CUDA build against the floor, the driver, the GPUs seen against those asked for, the build's
    kernels for each card (:func:`kernel_lines`) and whether they run ``infrastructure.precision``
    (:func:`precision_line`)."""
    import torch

    version, build, driver = installed_torch(), torch.version.cuda, nvidia_driver()
    problem = torch_floor_problem(version)
    lines: list[Line] = [("FAIL" if problem else "ok", "torch", problem or (
        f"torch {version} ({'CUDA ' + build + ' build' if build else 'CPU-only build'}), floor {TORCH_FLOOR_TEXT}"))]
    bad_driver = driver_problem(build, driver)
    lines.append(("FAIL" if bad_driver else "ok", "driver", bad_driver or (
        f"NVIDIA driver {driver}" if driver else "no NVIDIA driver on this node")))
    asked = cfg.infrastructure.num_gpus
    if asked == 0:
        lines.append(("note", "gpus", "the config asks for no GPU (infrastructure.num_gpus=0): no GPU was tested"))
        return [*lines, precision_line(cfg, torch.device("cpu"))]
    if (missing := gpu_problem(asked, "training", "infrastructure.num_gpus")) is not None:
        return [*lines, ("FAIL", "gpus", missing)]
    seen = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    names = ", ".join(f"{p.name} ({p.total_memory / 2**30:.0f} GiB, sm{p.major}{p.minor})" for p in seen)
    lines.append(("ok", "gpus", f"{len(seen)} seen, {asked} asked: {names}"))
    return [*lines, *kernel_lines(), precision_line(cfg, torch.device("cuda", 0))]


def kernel_lines() -> list[Line]:
    """ok or FAIL for every visible card: whether this torch's build has kernels for it (its sm against
    ``torch.cuda.get_arch_list()``, :func:`ddpm.envcheck.kernel_problem`: the FAIL names the card, its sm, the
    build, its archs and the install route that covers the card). Cards of one model and sm share a line."""
    import torch

    cards: dict[tuple[str, tuple[int, int]], list[int]] = {}
    for i in range(torch.cuda.device_count()):
        cards.setdefault((torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i)), []).append(i)
    lines: list[Line] = []
    for (name, (major, minor)), index in cards.items():
        others = f" (the same for GPU {', '.join(map(str, index[1:]))})" if len(index) > 1 else ""
        if (problem := kernel_problem(index[0])) is not None:
            lines.append(("FAIL", "kernels", problem + others))
        else:
            lines.append(("ok", "kernels", f"GPU {', '.join(map(str, index))} ({name}, sm{major}{minor}): this torch "
                          f"{torch.__version__} (CUDA {torch.version.cuda} build) has kernels for it (archs "
                          f"{' '.join(torch.cuda.get_arch_list())})"))
    return lines


def precision_line(cfg: Config, device: torch.device) -> Line:
    """Whether ``device`` runs ``infrastructure.precision`` by training's own rule
    (:func:`ddpm.precision.autocast_dtype`): FAIL with its one line and fix (bf16 on a card without native bf16)."""
    import torch

    from ddpm.precision import autocast_dtype, describe_precision

    asked = cfg.infrastructure.precision
    try:
        amp = autocast_dtype(asked, device, "infrastructure.precision")
    except SetupError as err:
        return "FAIL", "precision", str(err)
    native = device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)
    return "ok", "precision", (f"infrastructure.precision={asked}: {describe_precision(amp, device)}"
                               + ("" if native else "; this card has no native bf16 (sm < 80)"))


def speed_precision(cfg: Config, device: torch.device) -> tuple[str, str | None]:
    """(the precision to time the training step in, why it is not ``infrastructure.precision`` or None): the
    configured one where ``device`` runs it, else fp16 on CUDA (the first fix :func:`precision_line` names)."""
    from ddpm.precision import autocast_dtype

    asked = cfg.infrastructure.precision
    try:
        autocast_dtype(asked, device, "infrastructure.precision")
        return asked, None
    except SetupError:
        fallback = "fp16" if device.type == "cuda" else "fp32"
        return fallback, (f"infrastructure.precision={asked} cannot run on this card, see the precision line; "
                          f"{fallback} is the fix's first choice")


def allreduce_line(env: Any, mb: int = 64) -> Line:
    """Bus bandwidth of an all-reduce of ``mb`` MiB float32 across every rank (NCCL on GPUs, gloo on CPU)."""
    import torch
    import torch.distributed as tdist

    if not env.distributed:
        return "note", "all-reduce", "one rank: no collective to test (infrastructure.num_gpus / nproc_per_node = 1)"
    backend = tdist.get_backend()
    x = torch.ones(mb * 2**18, device=env.device)
    tdist.all_reduce(x)  # warm-up: connections, buffers
    rounds = 5
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(rounds):
        tdist.all_reduce(x)
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / rounds
    n = env.world_size
    busbw = mb / 1024 / seconds * 2 * (n - 1) / n  # GB/s, nccl-tests' bus bandwidth
    ok = x[0].item() == n ** (rounds + 1)
    return ("ok" if ok else "FAIL", "all-reduce", f"{backend}, {n} ranks, {mb} MiB: {seconds * 1e3:.1f} ms, bus "
            f"bandwidth {busbw:.2f} GB/s" + ("" if ok else " (wrong sum)"))


class RandomImages:
    """A loader of one random batch [B, C, S, S] in [-1, 1], forever: the probe times training steps, not data."""

    def __init__(self, batch: int, channels: int, size: int):
        import torch

        self.x0 = torch.rand(batch, channels, size, size) * 2 - 1

    def __iter__(self) -> Any:
        while True:
            yield self.x0

    def close(self) -> None:
        pass


def training_speed(cfg: Config, env: Any, run: RunDir, steps: int = 20,
                   warmup: int = 3) -> tuple[float, float | None]:
    """(img/s of the whole job, peak GiB of GPU memory or None): ``steps`` of the trainer's own training step
    (:meth:`ddpm.train.Trainer.train_step`: the configured model, precision, batch, layout, clip, EMA) after
    ``warmup``, on random images (no data is read, nothing is resumed or saved; ``run`` is the trainer's)."""
    import torch

    from ddpm.train import Trainer

    cuda = env.device.type == "cuda"
    local = cfg.training.batch_size // env.world_size
    trainer = Trainer(cfg, run, env, loader=RandomImages(local, 3, cfg.data.image_size))

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    try:
        for i in range(warmup + steps):
            if i == warmup:
                sync()
                t0 = time.perf_counter()
            trainer.train_step(*trainer.next_batch())
        sync()
    finally:
        trainer.close()
    rate = cfg.training.batch_size * steps / (time.perf_counter() - t0)
    return rate, (torch.cuda.max_memory_allocated(env.device) / 2**30 if cuda else None)


# what the all-reduce and the training speed cannot pass, by the line that failed
_BLOCKS = {"torch": "this torch cannot run the project (the torch line)",
           "gpus": "the GPUs asked for are not seen (the gpus line)",
           "kernels": "this torch has no kernels for the card (the kernels line)"}


def probe(cfg: Config, run: RunDir) -> dict[str, Any]:
    """Every rank: the checks above (the trainer's step in ``run``); rank 0 returns the report (lines, img_per_s,
    save_s, and speed_precision: the precision the speed was timed in, or None when it was skipped). A failed
    check is a FAIL line and the rest is measured where it can be: storage and the checkpoint save need no GPU,
    the all-reduce and the speed need the GPUs and their kernels (skipped with a note saying why otherwise)."""
    from ddpm import dist
    from ddpm.cpus import apply_cpu_budget, cpu_budget

    lines = environment_lines(cfg)
    result: dict[str, Any] = {"lines": lines, "img_per_s": None, "save_s": None, "speed_precision": None}
    blocked = next((_BLOCKS[what] for kind, what, _ in lines if kind == "FAIL" and what in _BLOCKS), None)
    env = None
    if blocked is None:
        try:
            env = dist.init_distributed(cfg.infrastructure.num_gpus > 0, timeout_s=600)
        except SetupError as err:  # this rank's GPUs (envcheck.require_gpus: count, kernels)
            lines.append(("FAIL", "rank setup", str(err)))
            blocked = "this rank could not take its GPU (the rank setup line)"
    lines.append(allreduce_line(env) if env is not None else ("note", "all-reduce", f"skipped: {blocked}"))
    main = env.is_main if env is not None else int(os.environ.get("RANK", "0")) == 0
    if main:
        scratch = Path(os.environ.get("SLURM_TMPDIR") or os.environ.get("TMPDIR") or tempfile.gettempdir())
        for what, where in (("run.root", Path(cfg.run.root)), ("node scratch", scratch)):
            write, read = storage_speed(where)
            lines.append(("ok", what, f"{where}: write {write:.0f} MB/s (fsynced), read {read:.0f} MB/s"))
    if env is None:
        lines.append(("note", "training speed", f"skipped: {blocked}"))
    else:
        budget = apply_cpu_budget(cpu_budget("train", env.device, workers=0))
        precision, instead = speed_precision(cfg, env.device)
        timed = dataclasses.replace(cfg, infrastructure=dataclasses.replace(cfg.infrastructure, precision=precision))
        rate, peak = training_speed(timed, env, run)
        lines.append(("note" if instead else "ok", "training speed", f"{rate:.1f} img/s, global batch "
                      f"{cfg.training.batch_size}, {env.world_size} x {env.device.type}, precision {precision}"
                      + (f" ({instead})" if instead else "")
                      + (f", peak memory {peak:.1f} GiB" if peak is not None else "") + f"; each rank: {budget}"))
        result["img_per_s"], result["speed_precision"] = rate, precision
    if main and not any(kind == "FAIL" and what == "torch" for kind, what, _ in lines):
        size, result["save_s"] = time_checkpoint(cfg, Path(cfg.run.root))
        lines.append(("ok", "checkpoint save", f"{size / 2**20:.1f} MiB written to run.root in "
                      f"{result['save_s']:.1f} s"))
    if env is not None:
        dist.barrier()
        dist.cleanup()
    return result


def run_probe(run: RunDir, cfg: Config) -> str:
    """The job's task on each node: torchrun around this module in ``run``; returns the path of ``probe.json``."""
    from ddpm.cluster.wrapper import torchrun_command

    check_torch_floor()
    report = run.probe
    report.unlink(missing_ok=True)
    cmd = torchrun_command(cfg, run, module="ddpm.cluster.probe")
    print("running:", " ".join(cmd), flush=True)
    code = subprocess.run(cmd).returncode
    if code != 0:
        raise RuntimeError(f"the doctor's probe failed: torchrun exited with {code}; see the log above")
    return str(report)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddpm.cluster.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--run-dir", required=True)
    args = p.parse_args(argv)
    run = RunDir(args.run_dir)  # the edge: --run-dir
    result = probe(load_config(args.config), run)
    if int(os.environ.get("RANK", "0")) == 0:
        atomic_write_text(run.probe, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

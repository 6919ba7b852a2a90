"""The prepared GPU check (issue 33): one command on one GPU node, under 8 minutes on an H100 or H200.

    python -m tools.gpu_check --out gpu_check/          # prints every figure with the card's name; exit 0 when
                                                         # every check behaved as it should

1. the doctor's node probe (``python -m ddpm.cluster.probe``: torch, driver, kernels for the card, GPUs, bf16,
   storage, all-reduce, the trainer's step), its report as the doctor prints it;
2. 200 training steps of the reference config (configs/ddpm_babel.yaml: 77.5M parameters, batch 64, 64x64) in
   bf16 contiguous, bf16 channels_last and fp16: img/s and peak GPU memory of each;
3. the training grid as a run draws it (64 images x 1000 ancestral steps, the run's autocast dtype): its time
   against ``training.watchdog_s`` (the grid beats the heartbeat; this says how long it is);
4. a forced out-of-memory: ``python -m ddpm.train`` at a batch no card holds ends with exit 2, the one line
   (step, card, memory, batch, precision, fix) and ``status.json`` failed.

Nothing here runs without a GPU: it stops at once with one line on a machine without one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from ddpm.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "ddpm_babel.yaml"
VARIANTS = {"bf16": ["infrastructure.precision=bf16", "infrastructure.channels_last=false"],
            "bf16 channels_last": ["infrastructure.precision=bf16", "infrastructure.channels_last=true"],
            "fp16": ["infrastructure.precision=fp16", "infrastructure.channels_last=false"]}
COMMON = ["infrastructure.num_gpus=1", "infrastructure.compile=false"]


def probe(out: Path) -> bool:
    """The doctor's node probe in one process; prints its lines; True when none failed."""
    from ddpm.cluster.doctor import Report
    from ddpm.config import dump_config, load_config

    run = RunDir(out / "probe")  # made here: the probe's run directory
    run.path.mkdir(parents=True, exist_ok=True)
    dump_config(load_config(CONFIG, COMMON), run.config)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ddpm.cluster.probe", "--config", str(run.config),
                           "--run-dir", str(run)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    print(f"[probe] exit {proc.returncode} in {time.perf_counter() - t0:.0f} s", flush=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:] + proc.stderr[-3000:], flush=True)
        return False
    result = json.loads(run.probe.read_text())
    report = Report()
    for kind, what, detail in result["lines"]:
        report(kind, what, detail)
    return not any(kind == "FAIL" for kind, _, _ in result["lines"])


def train_speed(name: str, overrides: list[str], out: Path, steps: int = 200) -> dict[str, float | str]:
    """img/s and peak GiB of ``steps`` trainer steps (after 10 of warm-up) of the reference config."""
    import torch

    from ddpm import dist
    from ddpm.cluster.probe import training_speed
    from ddpm.config import load_config

    cfg = load_config(CONFIG, [*COMMON, *overrides])
    env = dist.init_distributed(True)
    torch.cuda.reset_peak_memory_stats(env.device)
    rate, peak = training_speed(cfg, env, RunDir(out / "speed"), steps=steps, warmup=10)
    row = {"variant": name, "card": torch.cuda.get_device_name(env.device), "img_per_s": round(rate, 1),
           "peak_gib": round(peak or 0.0, 2)}
    print(f"[train] {row['card']}: {name}: {rate:.0f} img/s, peak {peak:.1f} GiB ({steps} steps, batch "
          f"{cfg.training.batch_size})", flush=True)
    return row


def grid_time() -> float:
    """Seconds of the training grid of the reference config (bf16), with the EMA of a fresh model."""
    import torch

    from ddpm.config import load_config
    from ddpm.diffusion import DDPM
    from ddpm.ema import EMA
    from ddpm.grid import draw_grid
    from ddpm.unet import UNet

    cfg = load_config(CONFIG, COMMON)
    model = UNet.from_config(cfg.model, cfg.data.image_size).cuda()
    ema = EMA(model, cfg.training.ema_decay, cfg.training.ema_start)
    state = DDPM.from_config(cfg.ddpm, model).state_dict()
    beats = [0]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    images = draw_grid(cfg, model, ema, state, torch.bfloat16, lambda: beats.__setitem__(0, beats[0] + 1))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    print(f"[grid] {torch.cuda.get_device_name()}: {images.shape[0]} images x {cfg.sampling.num_steps or 1000} "
          f"{cfg.sampling.sampler} steps in bf16: {seconds:.0f} s, {beats[0]} heartbeats offered "
          f"(training.watchdog_s={cfg.training.watchdog_s})", flush=True)
    return seconds


def forced_oom(out: Path) -> bool:
    """``python -m ddpm.train`` at batch 8192: exit 2, the out-of-memory line, status failed."""
    run = RunDir(out / "oom")  # made here: the forced OOM's run directory
    run.path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "ddpm.train", "--config", str(CONFIG), *COMMON,
                           "training.batch_size=8192", "training.num_iterations=2", "data.source=folder",
                           f"data.path={out / 'images'}", "--run-dir", str(run)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    status = json.loads(run.status.read_text()) if run.status.is_file() else {}
    line = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    ok = proc.returncode == 2 and "out of memory at step" in line and status.get("state") == "failed"
    print(f"[oom] {'ok' if ok else 'FAIL'}: exit {proc.returncode}; {line}; status {status.get('state')}", flush=True)
    if not ok:
        print(proc.stdout[-2000:] + proc.stderr[-3000:], flush=True)
    return ok


def write_images(folder: Path, n: int = 8192) -> None:
    """``n`` random 64x64 PNGs: the forced OOM needs a dataset that loads."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check"), help="scratch folder and results.json")
    p.add_argument("--steps", type=int, default=200, help="training steps timed per variant")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("error: tools.gpu_check needs a GPU: torch.cuda.is_available() is False here", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, object] = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                                  "cuda": torch.version.cuda, "archs": torch.cuda.get_arch_list()}
    results["probe_ok"] = probe(args.out)
    results["train"] = [train_speed(name, overrides, args.out, args.steps) for name, overrides in VARIANTS.items()]
    results["grid_s"] = grid_time()
    write_images(args.out / "images")
    results["oom_ok"] = forced_oom(args.out)
    results["seconds"] = round(time.perf_counter() - started, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"gpu check: {results['card']}, {results['seconds']:.0f} s in all -> {args.out / 'results.json'}")
    return 0 if results["probe_ok"] and results["oom_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

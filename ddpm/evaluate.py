"""The eval stage: FID of every milestone checkpoint from a few cheap samples, and the choice of the checkpoint
the final samples come from (``sampling.checkpoint: best``).

    python -m ddpm.evaluate steps  RUN_DIR             # the steps the array evaluates, task k -> line k
    python -m ddpm.evaluate task   RUN_DIR [--index K] # one task of the eval array (default $SLURM_ARRAY_TASK_ID)
    python -m ddpm.evaluate select RUN_DIR             # eval/fid.json, the best checkpoint, TensorBoard eval/fid
    python -m ddpm.evaluate best   RUN_DIR             # the path of the checkpoint eval/fid.json chose

Task k evaluates ``checkpoints/step_<N>.pt`` for N = ``eval_steps(cfg)[k]``: every multiple of
``training.milestone_every`` (milestones are never deleted) and the last step. It draws ``eval.num_seeds`` sets
of ``eval.sampling.num_samples`` images with the eval sampler (``eval.sampling``; set s: seeds ``seed_base + s *
num_samples + i``) as the
shards of :mod:`ddpm.sample` (batch by batch resumable, skipped when complete, Inception statistics stored) and
compares each set with ``sampling.fid_reference`` (Heusel et al. 2017, eq. 6; :mod:`ddpm.fid`). Files::

    eval/step_<N>/shard_<s>.npz, .json   seed set s: images and Inception statistics (ddpm.sample's shard files)
    eval/step_<N>.json                   step, checkpoint sha256, FID per seed, mean, std; written last
    eval/fid.json                        one row per evaluated checkpoint, the best, the steps without a result
    tb/eval/                             eval/fid (mean over seeds) against the step; rewritten by each selection

A task whose result exists with the same settings and checkpoint does nothing; a failed task fails alone (the
selection job, which runs after every task ended, names it) and is re-run alone with ``task --index K``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ddpm.checkpoint import CheckpointRef
from ddpm.config import Config, SamplingConfig, load_config
from ddpm.errors import CheckpointError, DDPMError, cli_entry
from ddpm.fsio import atomic_write_text, file_sha256, file_sha256_once
from ddpm.rundir import RunDir


def eval_steps(cfg: Config) -> list[int]:
    """Training steps the eval array evaluates, one per task: the milestones and the last step."""
    every, last = cfg.training.milestone_every, cfg.training.num_iterations
    steps = list(range(every, last + 1, every)) if every > 0 else []
    return steps if steps and steps[-1] == last else [*steps, last]


def eval_sampling(cfg: Config) -> SamplingConfig:
    """``eval.sampling`` as the stage runs it: its sampler, one shard per seed set, FID with sampling's weights and
    reference."""
    e, s = cfg.eval, cfg.sampling
    own = {f.name: getattr(e.sampling, f.name) for f in dataclasses.fields(e.sampling)}
    return SamplingConfig(**{**own, "num_samples": e.sampling.num_samples * e.num_seeds}, num_shards=e.num_seeds,
                          fid=True, fid_weights=s.fid_weights, fid_reference=s.fid_reference)


def _settings(cfg: Config, sha: str) -> dict[str, Any]:
    reference = cfg.sampling.fid_reference
    return {"checkpoint_sha256": sha, **cfg.to_dict()["eval"], "fid_reference": reference,
            "fid_reference_sha256": file_sha256(reference) if reference and Path(reference).is_file() else None}


def read_result(run: RunDir, step: int) -> dict[str, Any] | None:
    """The complete result of step ``step``, or None."""
    try:
        row = json.loads(run.eval_result(step).read_text())
    except (OSError, ValueError):
        return None
    return row if isinstance(row, dict) and row.get("complete") else None


def evaluate_step(run: RunDir, cfg: Config, step: int, device: str | None = None, progress: bool = True) -> dict:
    """FID of the checkpoint of ``step`` for each seed set; its row (also written to ``eval/step_<N>.json``).

    The checkpoint is read and hashed once, and the FID Inception loaded once, for all the seed sets. A step
    already evaluated with the same settings is skipped before torch's network code is imported."""
    ckpt = run.checkpoint(step)
    if not ckpt.is_file():
        raise CheckpointError(f"{ckpt}: checkpoint of step {step} not found (set training.milestone_every before "
                              "training: other checkpoints are deleted as newer ones are written)")
    sha = file_sha256_once(ckpt)  # the one hash of this task (the seed sets' shards record it too)
    settings = _settings(cfg, sha)
    done = read_result(run, step)
    if done is not None and done.get("settings") == settings:
        print(f"eval: step {step} already evaluated (FID {done['mean']:.3f}); skipping", flush=True)
        return done
    if cfg.sampling.fid_reference is None:
        raise DDPMError("sampling.fid_reference: not set (the eval stage compares with it; make one with "
                        "`python -m ddpm.fid ref`)")
    from ddpm.checkpoint import load_checkpoint
    from ddpm.fid import FIDStats, fid_from_stats
    from ddpm.inception import load_inception
    from ddpm.shards import sample_loaded

    reference = FIDStats.load(cfg.sampling.fid_reference)  # one line when missing or unreadable
    state = load_checkpoint(ckpt)
    sampling, out = eval_sampling(cfg), run.eval_shards(step)
    inception = functools.cache(load_inception)  # loaded by the first seed set, shared by the others
    fids = []
    for seed_set in range(cfg.eval.num_seeds):
        npz = sample_loaded(ckpt, state, out, seed_set, sampling, device, progress,  # TF32 as the run's config
                            choice=f"eval of step {step}, seed set {seed_set}", tf32=cfg.infrastructure.tf32,
                            checkpoint_sha256=sha, inception_loader=inception)
        with np.load(npz, allow_pickle=False) as data:
            stats = FIDStats.from_arrays(data)
        fids.append(fid_from_stats(stats, reference))
    mean = statistics.fmean(fids)
    row = {"step": step, "checkpoint": str(ckpt), "checkpoint_sha256": sha,
           "fid": fids, "mean": mean, "std": statistics.stdev(fids) if len(fids) > 1 else 0.0,
           "num_samples": cfg.eval.sampling.num_samples, "settings": settings, "complete": True}
    atomic_write_text(run.eval_result(step), json.dumps(row, indent=2) + "\n")  # last: marks completion
    print(f"eval: step {step}: FID {mean:.3f} ({', '.join(f'{f:.3f}' for f in fids)}) -> "
          f"{run.eval_result(step)}", flush=True)
    return row


def _write_tensorboard(run: RunDir, rows: list[dict[str, Any]]) -> None:
    """``eval/fid`` and ``eval/fid_std`` at each evaluated step in ``tb/eval`` (rewritten whole: no duplicate
    points when the selection runs again)."""
    from torch.utils.tensorboard import SummaryWriter

    tb = run.tb_eval
    tb.mkdir(parents=True, exist_ok=True)
    for old in tb.glob("events.out.tfevents.*"):
        old.unlink()
    writer = SummaryWriter(str(tb))
    for row in rows:
        writer.add_scalar("eval/fid", row["mean"], row["step"])
        writer.add_scalar("eval/fid_std", row["std"], row["step"])
    writer.close()


def select(run: RunDir, cfg: Config) -> dict[str, Any]:
    """Collect every task's result into ``eval/fid.json`` and pick the lowest mean FID; returns the summary."""
    steps = eval_steps(cfg)
    found = {step: read_result(run, step) for step in steps}
    rows = [{k: r[k] for k in ("step", "checkpoint", "checkpoint_sha256", "fid", "mean", "std")}
            for r in found.values() if r is not None]
    missing = [step for step, r in found.items() if r is None]
    if missing:
        tasks = ", ".join(f"{steps.index(s)} (step {s})" for s in missing)
        print(f"eval: no result for task {tasks}: failed or not run (see its log); re-run one alone with "
              f"`{shlex.join(['python', '-m', 'ddpm.evaluate', 'task', str(run.path)])} --index K`", flush=True)
    if not rows:
        raise DDPMError(f"eval: none of the {len(steps)} checkpoints was evaluated; see the eval tasks' logs in "
                        f"{run.logs}")
    best = min(rows, key=lambda r: (r["mean"], -r["step"]))  # a tie goes to the later checkpoint
    e = cfg.eval.sampling
    summary = {"rows": rows, "best": best, "missing_steps": missing, "num_samples": e.num_samples,
               "num_seeds": cfg.eval.num_seeds, "sampler": e.sampler, "num_steps": e.num_steps,
               "fid_reference": cfg.sampling.fid_reference}
    atomic_write_text(run.fid, json.dumps(summary, indent=2) + "\n")
    _write_tensorboard(run, rows)
    print(f"eval: best checkpoint: step {best['step']} (mean FID {best['mean']:.3f} over {cfg.eval.num_seeds} "
          f"seed set(s) of {e.num_samples}) among {len(rows)} -> {run.fid}", flush=True)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("steps", "task", "select", "best"))
    p.add_argument("run_dir", type=Path, help="the run directory (its config.yaml and checkpoints/)")
    p.add_argument("--index", type=int, help="task: which checkpoint (default $SLURM_ARRAY_TASK_ID)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when the config asks for GPUs)")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = RunDir(args.run_dir)
    if not run.config.is_file():
        raise DDPMError(f"{args.run_dir}: not a run directory (no {run.config.name})")
    cfg = load_config(run.config)
    steps = eval_steps(cfg)
    if args.command == "steps":
        print("\n".join(map(str, steps)))
    elif args.command == "select":
        select(run, cfg)
    elif args.command == "best":
        print(CheckpointRef("best").resolve(run)[0])
    else:
        from ddpm.cpus import apply_cpu_budget, cpu_budget
        from ddpm.envcheck import pick_device

        index = args.index if args.index is not None else int(os.environ.get("SLURM_ARRAY_TASK_ID", "-1"))
        if not 0 <= index < len(steps):
            raise DDPMError(f"--index {index}: the eval array has tasks 0..{len(steps) - 1} (steps {steps})")
        gpus, key = cfg.task_gpus
        device = pick_device(args.device, gpus, f"eval task {index}", key)
        print(f"eval: {apply_cpu_budget(cpu_budget('sample', device))}", flush=True)
        evaluate_step(run, cfg, steps[index], device)
    return 0


if __name__ == "__main__":
    sys.exit(main())

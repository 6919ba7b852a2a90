"""The sample stage: one shard of the final samples, ``python -m ddpm.sample`` (one task of the sampling array).

    python -m ddpm.sample --checkpoint runs/celeba --num-samples 10000 --num-shards 8 --shard 3

Under a SLURM array ``--shard`` defaults to ``$SLURM_ARRAY_TASK_ID``; every other default comes from the
checkpoint's ``sampling`` config section, and the architecture from the checkpoint alone. The shards go to
``--out`` (default ``<run>/samples/shards``); what a shard is and how it is drawn, resumed and reused is
:mod:`ddpm.shards`. On the cluster the sampling task calls :func:`sample_stage`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ddpm.checkpoint import final_reference, load_resolved
from ddpm.config import Config, Precision, Sampler, Spacing, choices
from ddpm.cpus import apply_cpu_budget, cpu_budget
from ddpm.errors import ConfigError, cli_entry
from ddpm.rundir import RunDir
from ddpm.shards import checkpoint_device, checkpoint_sampling, sample_loaded, sample_shard  # the sampling API


def sample_stage(run: RunDir, cfg: Config, shard: int, device: str, progress: bool = False) -> Path:
    """Shard ``shard`` of the final set of ``run``: the checkpoint ``sampling.checkpoint`` names
    (:class:`ddpm.checkpoint.CheckpointRef`), the run's sampling section, ``<run>/samples/shards``."""
    ckpt, why = final_reference(cfg.sampling.checkpoint, cfg.eval.enabled).resolve(run)
    return sample_shard(ckpt, run.samples.shards, shard, cfg.sampling, device=device, progress=progress,
                        choice=why)


# command-line flag -> SamplingConfig field; a flag given replaces the checkpoint's value
FLAGS = {"num_samples": "--num-samples", "num_shards": "--num-shards", "sampler": "--sampler",
         "num_steps": "--steps", "eta": "--eta", "timestep_spacing": "--spacing", "seed_base": "--seed-base",
         "batch_size": "--batch-size", "use_ema": "--no-ema", "fid": "--fid", "fid_weights": "--fid-weights",
         "precision": "--precision", "compile": "--compile"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm.sample", description=__doc__.split("\n")[0],
                                epilog="Each flag replaces one sampling.* value of the checkpoint's config.")
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run directory (newest valid)")
    p.add_argument("--out", default=None, help="shard directory (default <run>/samples/shards)")
    p.add_argument("--shard", type=int, help="default: $SLURM_ARRAY_TASK_ID")
    p.add_argument("--num-samples", type=int, dest="num_samples")
    p.add_argument("--num-shards", type=int, dest="num_shards")
    p.add_argument("--sampler", choices=choices(Sampler))
    p.add_argument("--steps", type=int, dest="num_steps")
    p.add_argument("--eta", type=float)
    p.add_argument("--spacing", choices=choices(Spacing), dest="timestep_spacing")
    p.add_argument("--seed-base", type=int, dest="seed_base")
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--no-ema", action="store_const", const=False, dest="use_ema", help="raw (non-EMA) weights")
    p.add_argument("--precision", choices=choices(Precision), help="bf16: the network under autocast")
    p.add_argument("--compile", action="store_const", const=True, help="torch.compile the network")
    p.add_argument("--fid", action="store_const", const=True, help="store Inception statistics")
    p.add_argument("--fid-weights", dest="fid_weights", help="default: sampling.fid_weights or the torch hub cache")
    p.add_argument("--device", default=None,
                   help="cpu or cuda (default: cuda when the checkpoint's config asks for GPUs)")
    p.add_argument("--no-progress", action="store_false", dest="progress")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    ckpt, state = load_resolved(args["checkpoint"], map_location="cpu")  # read once
    args["device"] = checkpoint_device(state, args["device"])
    print(f"sample: {apply_cpu_budget(cpu_budget('sample', args['device']))}", flush=True)
    given = {k: args[k] for k in FLAGS if args[k] is not None}
    try:  # one validation, in SamplingConfig.__post_init__
        sampling = dataclasses.replace(checkpoint_sampling(state), **given)
    except ConfigError as err:  # name the flag beside the key
        key = str(err).split(":", 1)[0].removeprefix("sampling.")
        raise ConfigError(f"{err} (set by {FLAGS[key]})" if key in given else str(err)) from None
    sample_loaded(ckpt, state, args["out"], args["shard"], sampling, args["device"], args["progress"],
                  choice=f"--checkpoint {args['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

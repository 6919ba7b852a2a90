"""Login-node entry: validate, submit train -> [eval array -> select] -> sampling array -> assembly, print where
to look.

    python launch.py --config configs/ddpm_babel.yaml [section.key=value ...]
                     [--cluster auto|slurm|local] [--stage all|train|eval|select|sample|assemble] [--only]
                     [--dry-run]
    python launch.py sweep --config configs/tiny_cpu.yaml --grid 'training.learning_rate=[1e-3,2e-3]' [--seeds N]
                     [section.key=value ...] [--cluster ...] [--dry-run]
    python launch.py status RUN_DIR | SWEEP_DIR
    python launch.py doctor --config configs/ddpm_babel.yaml [section.key=value ...] [--no-job] [--save-test]

With ``eval.enabled`` an eval array (one task per milestone checkpoint) and a
selection job run between training and sampling (``ddpm.evaluate``). On SLURM
the jobs are chained with ``afterok`` (the selection with ``afterany``: it names
a failed eval task) and launch.py returns at once. Without SLURM (``--cluster
local``, or auto-detected) the same stages run one after another on submitit's
local executor, and launch.py follows the logs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from ddpm.cluster.preflight import detect_cluster, preflight
from ddpm.cluster.submit import ARRAYS, STAGES, plan_stages, submit
from ddpm.config import Config, dump_config, load_config
from ddpm.configtools import parse_with_overrides
from ddpm.envcheck import check_torch_floor
from ddpm.errors import EXIT_OK, EXIT_REQUEUE, DDPMError, cli_entry
from ddpm.evaluate import eval_steps, read_result
from ddpm.fsio import atomic_write_text
from ddpm.plan import disk_plan
from ddpm.rundir import RunDir, SweepDir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python launch.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/ddpm_babel.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, parsed as YAML")
    p.add_argument("--cluster", choices=("auto", "slurm", "local"), default="auto",
                   help="auto: SLURM when sbatch and sinfo work here, else submitit's local executor")
    p.add_argument("--stage", choices=("all", *STAGES), default="all",
                   help="run from this stage on (all: train, eval and select when eval.enabled, sample, assemble)")
    p.add_argument("--only", action="store_true", help="run just the --stage given, not the stages after it")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch scripts; submit nothing")
    return p


def doctor_main(argv: list[str]) -> int:
    """``launch.py doctor``: check what this cluster does on a stop, then take the stop path with a tiny job."""
    from ddpm.cluster.doctor import __doc__ as doc
    from ddpm.cluster.doctor import doctor

    p = argparse.ArgumentParser(prog="python launch.py doctor", description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc.split("\n\n", 1)[1])
    p.add_argument("--config", required=True, help="the config of the run you plan (its slurm section)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, parsed as YAML")
    p.add_argument("--no-job", action="store_true", help="only read the cluster's settings; submit nothing")
    p.add_argument("--save-test", action="store_true",
                   help="write a real checkpoint of the configured model to run.root and time it (else estimated)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for each stage of the job")
    args = parse_with_overrides(p, argv)
    return doctor(load_config(args.config, args.overrides), run_job=not args.no_job, timeout=args.timeout,
                  save_test=args.save_test)


def sweep_main(argv: list[str]) -> int:
    """``launch.py sweep``: every point of the grid preflighted, then one training array and a chain per point."""
    from ddpm.cluster import sweep as sw

    p = argparse.ArgumentParser(prog="python launch.py sweep", description=sw.__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=sw.__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", required=True, help="YAML config of every point, e.g. configs/ddpm_babel.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of every point, parsed as YAML")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=[V1,...]",
                   help="a swept key and its values (YAML list); repeat for more keys: the points are the product")
    p.add_argument("--seeds", type=int, default=1,
                   help="training seeds per point: training.seed, +1, ... (results show the FID's spread over them)")
    p.add_argument("--cluster", choices=("auto", "slurm", "local"), default="auto",
                   help="auto: SLURM when sbatch and sinfo work here, else submitit's local executor")
    p.add_argument("--dry-run", action="store_true", help="check every point, print the jobs; submit nothing")
    args = parse_with_overrides(p, argv)
    check_torch_floor()
    grid = sw.parse_grid(args.grid, args.overrides)
    base = load_config(args.config, args.overrides)  # the sweep's name and root
    cluster = detect_cluster(args.cluster)
    stages = plan_stages(base, "all", only=False)
    sweep_dir = base.run_dir.path.resolve()  # a sweep's directory, not a run's
    points = sw.expand(grid, args.seeds, base.training.seed, sweep_dir)
    cfgs = sw.configs(args.config, args.overrides, points, cluster, stages, args.dry_run)
    grid = sw.typed_grid(grid, points)
    disk = sw.check_sweep_space(sweep_dir, cfgs)
    print(f"preflight ok: {len(points)} points, cluster {cluster}, stages {' -> '.join(stages)}, sweep dir "
          f"{sweep_dir}", flush=True)
    for point in points:
        print(f"  point {point.index}: {point.shown()} -> {point.name}")
    print(disk, flush=True)
    record = {"schema": sw.SWEEP_SCHEMA, "name": base.run.name, "config": str(Path(args.config).resolve()),
              "overrides": args.overrides, "grid": grid, "seeds": args.seeds, "cluster": cluster, "stages": stages}
    if not args.dry_run:
        sweep_dir.mkdir(parents=True, exist_ok=True)
    try:
        sw.submit_sweep(sweep_dir, points, cfgs, cluster, stages, record, args.dry_run)
    finally:  # submitit's local executor leaves its folder pattern behind as an empty directory
        for jobdir in [SweepDir(sweep_dir), *(p.run for p in points)]:
            jobdir.drop_placeholder()
    if args.dry_run:
        return EXIT_OK
    print(f"\nsweep dir:    {sweep_dir}")
    print(f"tensorboard:  {shlex.join(['tensorboard', '--logdir', str(sweep_dir)])}   (HParams: the points compared)")
    print(f"status:       {shlex.join(['python', 'launch.py', 'status', str(sweep_dir)])}")
    print(f"results:      {SweepDir(sweep_dir).results_csv}, {SweepDir(sweep_dir).results_png.name}"
          + (" (when every point has ended)" if cluster == "slurm" else ""))
    return EXIT_OK


def print_summary(cfg: Config, run: RunDir, jobs: dict[str, Any]) -> None:
    """Where ``run``'s jobs, logs, TensorBoard events, status and outputs are."""
    print(f"\nrun dir:      {run}")
    for stage in STAGES:
        if stage in jobs:
            print(f"{stage + ' job:':<13} {jobs[stage]}")
    print(f"logs:         {run.logs}/<job id>/")
    print(f"tensorboard:  {shlex.join(['tensorboard', '--logdir', str(run.tb)])}")
    print(f"status:       {shlex.join(['python', 'launch.py', 'status', str(run)])}")
    n, s, c = cfg.sampling.num_samples, cfg.data.image_size, cfg.model.in_channels
    if "eval" in jobs:
        print(f"eval:         {run.fid} (tensorboard: eval/fid)")
    print(f"outputs:      {run.samples.npz((n, s, s, c))}, {run.samples.grid.name}, {run.samples.metrics.name}")


def resume_command(run: RunDir) -> str:
    """The shell-quoted command that continues ``run`` (its config.yaml names the run; run.root is given as an
    override, as YAML reads it: a root YAML would read as something else goes in double quotes)."""
    root = str(run.resolve().root)
    try:
        as_is = yaml.safe_load(root) == root
    except yaml.YAMLError:
        as_is = False
    value = root if as_is else json.dumps(root)  # a JSON string is a YAML double-quoted scalar
    return shlex.join(["python", "launch.py", "--config", str(run.config), f"run.root={value}"])


def status(run: RunDir) -> int:
    """``launch.py status RUN_DIR``: stage, job states (squeue/scontrol, not sacct), last step and checkpoint,
    shard progress."""
    from ddpm.checkpoint import list_checkpoints
    from ddpm.cluster.squeue import job_state
    from ddpm.status import RunState, read_status, stalled_for

    if not run.config.is_file():
        raise DDPMError(f"{run}: not a run directory (no {run.config.name})")
    cfg = load_config(run.config)
    jobs = json.loads(run.jobs.read_text()) if run.jobs.is_file() else {}
    print(f"run dir: {run}")
    for stage in STAGES:
        if stage in jobs:
            ids = jobs.get(ARRAYS.get(stage, ""), [jobs[stage]])
            states = ", ".join(f"{i}={job_state(i)}" for i in ids) if jobs.get("cluster") == "slurm" else "local"
            print(f"{stage:<9} job {jobs[stage]}: {states}")
    train = read_status(run) or {}
    ckpts = list_checkpoints(run)
    state, bound = train.get("state", "not started"), cfg.training.watchdog_s
    if (age := stalled_for(train, bound)) is not None:
        state = f"stalled (no heartbeat for {age:.0f} s, more than training.watchdog_s={bound})"
    print(f"training: {state} at step {train.get('step', 0)}/"
          f"{cfg.training.num_iterations}; last checkpoint: {ckpts[-1][1] if ckpts else 'none'}")
    if train.get("error"):
        print(f"  error: {train['error']}")
    alive = jobs.get("cluster") == "slurm" and "train" in jobs and job_state(jobs["train"]).alive
    if train and train.get("state") != RunState.DONE and not alive:  # e.g. cancelled on preemption (PreemptMode=CANCEL)
        print(f"  resume: {resume_command(run)}   (continues from the last checkpoint)")
    if cfg.eval.enabled:
        results = [r for r in (read_result(run, step) for step in eval_steps(cfg)) if r is not None]
        best = min(results, key=lambda r: r["mean"], default=None)
        print(f"eval: {len(results)}/{len(eval_steps(cfg))} checkpoints evaluated" +
              (f"; best so far: step {best['step']} (FID {best['mean']:.3f})" if best else ""))
        if run.fid.is_file():
            chosen = json.loads(run.fid.read_text())["best"]
            print(f"selected: step {chosen['step']} ({run.fid})")
    shards = [run.samples.shard(k) for k in range(cfg.sampling.num_shards)]
    done, partial = sum(f.json.is_file() for f in shards), sum(f.partial.is_file() for f in shards)
    print(f"sampling: {done}/{cfg.sampling.num_shards} shards complete, {partial} in progress")
    outputs = run.samples.assembled()
    print(f"assembly: {outputs[0] if outputs else 'not done'}")
    return EXIT_OK


@cli_entry
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["doctor"]:
        return doctor_main(argv[1:])
    if argv[:1] == ["sweep"]:
        return sweep_main(argv[1:])
    if argv[:1] == ["status"]:
        if len(argv) != 2:
            raise DDPMError("usage: python launch.py status RUN_DIR | SWEEP_DIR")
        if SweepDir(Path(argv[1])).sweep.is_file():
            from ddpm.cluster.sweep import sweep_status

            return sweep_status(Path(argv[1]))
        return status(RunDir(argv[1]))  # the edge: the path given
    check_torch_floor()  # before the config: a job would die in torchrun's option parsing
    args = parse_with_overrides(build_parser(), argv)
    cfg = load_config(args.config, args.overrides)
    cluster = detect_cluster(args.cluster)
    stages = plan_stages(cfg, args.stage, args.only)
    run = cfg.run_dir.resolve()
    preflight(cfg, cluster, stages, dry_run=args.dry_run)
    print(f"preflight ok: cluster {cluster}, stages {' -> '.join(stages)}, run dir {run}", flush=True)
    if args.dry_run:
        print(*disk_plan(cfg).lines(), f"(run.root has {shutil.disk_usage(cfg.run.root).free / 2**30:.1f} GiB free)")
    if not args.dry_run:
        run.path.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run.config)
    try:
        jobs = submit(cfg, run, cluster, stages, args.dry_run)
    finally:  # submitit's local executor leaves its folder pattern behind as an empty directory
        run.drop_placeholder()
    if args.dry_run:
        return EXIT_OK
    # a later --stage keeps the ids of the earlier stages
    earlier = json.loads(run.jobs.read_text()) if run.jobs.is_file() else {}
    jobs = {**earlier, **jobs}
    atomic_write_text(run.jobs, json.dumps(jobs, indent=2) + "\n")
    print_summary(cfg, run, jobs)
    if cluster == "local" and not jobs.get("stopped"):
        grid = run.samples.grid
        print(f"done: {grid}" if grid.is_file() else "done")
    return EXIT_REQUEUE if jobs.get("stopped") else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

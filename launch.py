"""Login-node entry: validate, submit train -> sampling array -> assembly, print where to look.

    python launch.py --config configs/ddpm_babel.yaml [section.key=value ...]
                     [--cluster auto|slurm|local] [--stage all|train|sample|assemble] [--only] [--dry-run]
    python launch.py status RUN_DIR
    python launch.py doctor --config configs/ddpm_babel.yaml [section.key=value ...] [--no-job] [--save-test]

On SLURM the three jobs are chained with ``afterok`` and launch.py returns at
once. Without SLURM (``--cluster local``, or auto-detected) the same stages run
one after another on submitit's local executor, and launch.py follows the logs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ddpm.cluster.executors import AssembleTask, SampleTask, TrainTask, make_executor, sbatch_script
from ddpm.cluster.preflight import detect_cluster, preflight
from ddpm.config import Config, dump_config, load_config
from ddpm.configtools import parse_with_overrides
from ddpm.errors import EXIT_OK, EXIT_REQUEUE, DDPMError, cli_entry
from ddpm.fsio import atomic_write_text

STAGES = ("train", "sample", "assemble")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python launch.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/ddpm_babel.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, parsed as YAML")
    p.add_argument("--cluster", choices=("auto", "slurm", "local"), default="auto",
                   help="auto: SLURM when sbatch and sinfo work here, else submitit's local executor")
    p.add_argument("--stage", choices=("all", *STAGES), default="all",
                   help="run from this stage on (all = train, then sample, then assemble)")
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


def _follow(job: Any, label: str) -> Any:
    """Wait for a local job, echoing its log as it grows; return its result (raises on failure)."""
    offset = 0
    while True:
        done = job.done()
        path = Path(job.paths.stdout)
        if path.is_file():
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        if done:
            break
        time.sleep(1.0)
    try:
        return job.result()
    except Exception as err:  # the job's own traceback is in its log; one line here
        last = str(err).strip().splitlines()
        raise DDPMError(f"{label} job {job.job_id} failed: {last[-1] if last else err} (log: {job.paths.stdout})") \
            from None


def submit(cfg: Config, run_dir: Path, cluster: str, stages: list[str], dry_run: bool) -> dict[str, Any]:
    """Submit (or, locally, run) the requested stages; returns the job ids."""
    jobs: dict[str, Any] = {"cluster": cluster, "run_dir": str(run_dir)}
    dependency = None
    k = cfg.sampling.num_shards
    for stage in stages:
        if dry_run:  # the scripts SLURM would get, also when this machine has no SLURM
            ex = make_executor(cfg, run_dir, stage, "slurm", dependency)
            print(f"# ---- {stage} job ----\n{sbatch_script(ex, k if stage == 'sample' else None)}")
            dependency = f"afterok:<{stage} job id>"
            continue
        ex = make_executor(cfg, run_dir, stage, cluster, dependency if cluster == "slurm" else None)
        if stage == "train":
            job = ex.submit(TrainTask(run_dir))
            jobs["train"] = job.job_id
        elif stage == "sample":
            share = k if cluster == "local" else 1  # the local executor starts every task at once
            array = ex.map_array(SampleTask(run_dir, cfg, cpu_share=share), list(range(k)))
            job = array
            jobs["sample"] = array[0].job_id.split("_")[0]
            jobs["sample_tasks"] = [j.job_id for j in array]
        else:
            job = ex.submit(AssembleTask(run_dir, k))
            jobs["assemble"] = job.job_id
        dependency = f"afterok:{jobs[stage]}"
        print(f"{stage}: job {jobs[stage]}", flush=True)
        if cluster == "local":
            for j in job if isinstance(job, list) else [job]:
                result = _follow(j, stage)
                if stage == "train" and result == "stopped":
                    print(f"training stopped early; run the same command to resume from {run_dir}/checkpoints")
                    jobs["stopped"] = True
                    return jobs
    return jobs


def print_summary(cfg: Config, run_dir: Path, jobs: dict[str, Any]) -> None:
    print(f"\nrun dir:      {run_dir}")
    for stage in STAGES:
        if stage in jobs:
            print(f"{stage + ' job:':<13} {jobs[stage]}")
    print(f"logs:         {run_dir}/logs/<job id>/")
    print(f"tensorboard:  tensorboard --logdir {run_dir}/tb")
    print(f"status:       python launch.py status {run_dir}")
    n, s, c = cfg.sampling.num_samples, cfg.data.image_size, cfg.model.in_channels
    print(f"outputs:      {run_dir}/samples/samples_{n}x{s}x{s}x{c}.npz, grid.png, metrics.json")


def status(run_dir: Path) -> int:
    """Stage, job states (squeue/scontrol, not sacct), last step and checkpoint, shard progress."""
    from ddpm.checkpoint import list_checkpoints
    from ddpm.cluster.preflight import job_state
    from ddpm.runlog import read_status, stalled_for
    from ddpm.sample import shard_paths

    if not (run_dir / "config.yaml").is_file():
        raise DDPMError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    jobs_path = run_dir / "jobs.json"
    jobs = json.loads(jobs_path.read_text()) if jobs_path.is_file() else {}
    print(f"run dir: {run_dir}")
    for stage in STAGES:
        if stage in jobs:
            ids = jobs.get("sample_tasks", [jobs[stage]]) if stage == "sample" else [jobs[stage]]
            states = ", ".join(f"{i}={job_state(i)}" for i in ids) if jobs.get("cluster") == "slurm" else "local"
            print(f"{stage:<9} job {jobs[stage]}: {states}")
    train = read_status(run_dir) or {}
    ckpts = list_checkpoints(run_dir)
    state, bound = train.get("state", "not started"), cfg.training.watchdog_s
    if (age := stalled_for(train, bound)) is not None:
        state = f"stalled (no heartbeat for {age:.0f} s, more than training.watchdog_s={bound})"
    print(f"training: {state} at step {train.get('step', 0)}/"
          f"{cfg.training.num_iterations}; last checkpoint: {ckpts[-1][1] if ckpts else 'none'}")
    if train.get("error"):
        print(f"  error: {train['error']}")
    train_job = job_state(jobs["train"]) if jobs.get("cluster") == "slurm" and "train" in jobs else "GONE"
    alive = train_job.split("(")[0] in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED")
    if train and train.get("state") != "done" and not alive:  # e.g. cancelled on preemption (PreemptMode=CANCEL)
        print(f"  resume: python launch.py --config {run_dir}/config.yaml run.root={run_dir.resolve().parent}"
              "   (continues from the last checkpoint)")
    shards = [shard_paths(run_dir / "samples" / "shards", k) for k in range(cfg.sampling.num_shards)]
    done, partial = sum(p["json"].is_file() for p in shards), sum(p["partial"].is_file() for p in shards)
    print(f"sampling: {done}/{cfg.sampling.num_shards} shards complete, {partial} in progress")
    outputs = sorted((run_dir / "samples").glob("samples_*.npz"))
    print(f"assembly: {outputs[0] if outputs else 'not done'}")
    return EXIT_OK


@cli_entry
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["doctor"]:
        return doctor_main(argv[1:])
    if argv[:1] == ["status"]:
        if len(argv) != 2:
            raise DDPMError("usage: python launch.py status RUN_DIR")
        return status(Path(argv[1]))
    args = parse_with_overrides(build_parser(), argv)
    cfg = load_config(args.config, args.overrides)
    cluster = detect_cluster(args.cluster)
    stages = list(STAGES) if args.stage == "all" else list(STAGES[STAGES.index(args.stage):])
    if args.only and args.stage != "all":
        stages = stages[:1]
    run_dir = cfg.run_dir.resolve()
    preflight(cfg, cluster, stages)
    print(f"preflight ok: cluster {cluster}, stages {' -> '.join(stages)}, run dir {run_dir}", flush=True)
    if not args.dry_run:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    jobs = submit(cfg, run_dir, cluster, stages, args.dry_run)
    if args.dry_run:
        return EXIT_OK
    jobs_path = run_dir / "jobs.json"  # a later --stage keeps the ids of the earlier stages
    earlier = json.loads(jobs_path.read_text()) if jobs_path.is_file() else {}
    jobs = {**earlier, **jobs}
    atomic_write_text(jobs_path, json.dumps(jobs, indent=2) + "\n")
    print_summary(cfg, run_dir, jobs)
    if cluster == "local" and not jobs.get("stopped"):
        grid = run_dir / "samples" / "grid.png"
        print(f"done: {grid}" if grid.is_file() else "done")
    return EXIT_REQUEUE if jobs.get("stopped") else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""Login-node entry: validate, submit train -> [eval array -> select] -> sampling array -> assembly, print where
to look.

    python launch.py --config configs/ddpm_babel.yaml [section.key=value ...]
                     [--cluster auto|slurm|local] [--stage all|train|eval|select|sample|assemble] [--only]
                     [--dry-run]
    python launch.py status RUN_DIR
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
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ddpm.cluster.executors import (
    AssembleTask,
    EvalTask,
    SampleTask,
    SelectTask,
    TrainTask,
    local_slots,
    make_executor,
    sbatch_script,
)
from ddpm.cluster.preflight import detect_cluster, preflight
from ddpm.config import Config, dump_config, load_config
from ddpm.configtools import parse_with_overrides
from ddpm.envcheck import check_torch_floor
from ddpm.errors import EXIT_OK, EXIT_REQUEUE, ConfigError, DDPMError, cli_entry
from ddpm.evaluate import eval_steps, read_result
from ddpm.fsio import atomic_write_text
from ddpm.plan import disk_plan
from ddpm.rundir import RunDir

STAGES = ("train", "eval", "select", "sample", "assemble")
ARRAYS = {"eval": "eval_tasks", "sample": "sample_tasks"}  # jobs.json: the task ids of each array stage


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
        raise DDPMError(f"{label} job {job.job_id} failed: {_failure_line(str(err))} (log: {job.paths.stderr})") \
            from None


def _failure_line(text: str) -> str:
    """The exception line of a failed local job: the last line of the traceback submitit quotes between two
    dashed lines (``ddpm.errors.DDPMError: ...``), without the exception's class; else the last line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    rules = [i for i, line in enumerate(lines) if set(line) == {"-"}]
    last = lines[rules[-1] - 1] if len(rules) >= 2 else (lines[-1] if lines else text)
    return re.sub(r"^[\w.]*(Error|Exception|Interrupt)\w*: ", "", last)


def plan_stages(cfg: Config, stage: str, only: bool) -> list[str]:
    """The stages to run: from ``stage`` on (just it with ``only``); eval and select only with eval.enabled."""
    if stage in ("eval", "select") and not cfg.eval.enabled:
        raise ConfigError(f"--stage {stage}: eval.enabled is false (set eval.enabled=true)")
    stages = list(STAGES) if stage == "all" else list(STAGES[STAGES.index(stage):])
    stages = [s for s in stages if cfg.eval.enabled or s not in ("eval", "select")]
    return stages[:1] if only and stage != "all" else stages


def _task(cfg: Config, run_dir: Path, stage: str, cpu_share: int = 1) -> Any:
    """The submitit callable of ``stage`` (an array stage's takes the task index)."""
    if stage in ARRAYS:
        return (SampleTask if stage == "sample" else EvalTask)(run_dir, cfg, cpu_share=cpu_share)
    return {"train": TrainTask(run_dir), "select": SelectTask(run_dir, cfg),
            "assemble": AssembleTask(run_dir, cfg.sampling.num_shards)}[stage]


def _shown(devices: tuple[int, ...]) -> str:
    """The devices of a local job, as its log line shows them (nothing without GPUs)."""
    return f" (CUDA_VISIBLE_DEVICES={','.join(map(str, devices))})" if devices else ""


def run_local(cfg: Config, run_dir: Path, stage: str, size: int, jobs: dict[str, Any]) -> Any:
    """Run ``stage`` on submitit's local executor, echoing its logs; the job ids go into ``jobs``.

    An array runs in waves of one task per set of GPUs (:func:`local_slots`): each task has devices of its
    own, and a wave ends before the next starts; without GPUs every task runs at once. A failed task fails the
    stage when its wave has ended (an eval task fails alone: the selection names it). Returns a single job's
    result.
    """
    if stage not in ARRAYS:
        devices = local_slots(cfg, stage)[0]
        job = make_executor(cfg, run_dir, stage, "local", gpus=devices).submit(_task(cfg, run_dir, stage))
        jobs[stage] = job.job_id
        print(f"{stage}: job {job.job_id}{_shown(devices)}", flush=True)
        return _follow(job, stage)
    slots = local_slots(cfg, stage, size) or [()]
    executors = [make_executor(cfg, run_dir, stage, "local", gpus=devices) for devices in slots]
    task, ids = _task(cfg, run_dir, stage, cpu_share=len(slots)), []
    jobs[ARRAYS[stage]] = ids
    for start in range(0, size, len(slots)):
        wave = []
        for n in range(min(len(slots), size - start)):
            wave.append(job := executors[n].submit(task, start + n))
            ids.append(job.job_id)
            jobs.setdefault(stage, job.job_id)
            print(f"{stage}: task {start + n}: job {job.job_id}{_shown(slots[n])}", flush=True)
        failed = []
        for job in wave:
            try:
                _follow(job, stage)
            except DDPMError as err:
                if stage != "eval":
                    failed.append(err)
                    continue
                print(f"warning: {err}", flush=True)  # fails alone; the selection names it
        if failed:
            raise failed[0]
    return None


def submit(cfg: Config, run_dir: Path, cluster: str, stages: list[str], dry_run: bool) -> dict[str, Any]:
    """Submit (or, locally, run) the requested stages; returns the job ids."""
    jobs: dict[str, Any] = {"cluster": cluster, "run_dir": str(run_dir)}
    dependency = None
    sizes = {"sample": cfg.sampling.num_shards, "eval": len(eval_steps(cfg))}
    for stage in stages:
        after = "afterany" if stage == "eval" else "afterok"  # the selection names a failed eval task
        if dry_run:  # the scripts SLURM would get, also when this machine has no SLURM
            ex = make_executor(cfg, run_dir, stage, "slurm", dependency)
            print(f"# ---- {stage} job ----\n{sbatch_script(ex, sizes.get(stage))}")
            dependency = f"{after}:<{stage} job id>"
            continue
        if cluster == "local":
            if run_local(cfg, run_dir, stage, sizes.get(stage, 1), jobs) == "stopped" and stage == "train":
                print(f"training stopped early; run the same command to resume from {run_dir}/checkpoints")
                jobs["stopped"] = True
                return jobs
            continue
        ex = make_executor(cfg, run_dir, stage, cluster, dependency)
        if stage in ARRAYS:
            job = ex.map_array(_task(cfg, run_dir, stage), list(range(sizes[stage])))
            jobs[stage] = job[0].job_id.split("_")[0]
            jobs[ARRAYS[stage]] = [j.job_id for j in job]
        else:
            jobs[stage] = ex.submit(_task(cfg, run_dir, stage)).job_id
        dependency = f"{after}:{jobs[stage]}"
        print(f"{stage}: job {jobs[stage]}", flush=True)
    return jobs


def print_summary(cfg: Config, run_dir: Path, jobs: dict[str, Any]) -> None:
    print(f"\nrun dir:      {run_dir}")
    for stage in STAGES:
        if stage in jobs:
            print(f"{stage + ' job:':<13} {jobs[stage]}")
    run = RunDir(run_dir)
    print(f"logs:         {run.logs}/<job id>/")
    print(f"tensorboard:  {shlex.join(['tensorboard', '--logdir', str(run.tb)])}")
    print(f"status:       {shlex.join(['python', 'launch.py', 'status', str(run_dir)])}")
    n, s, c = cfg.sampling.num_samples, cfg.data.image_size, cfg.model.in_channels
    if "eval" in jobs:
        print(f"eval:         {run.fid} (tensorboard: eval/fid)")
    print(f"outputs:      {run.samples.npz((n, s, s, c))}, {run.samples.grid.name}, {run.samples.metrics.name}")


def resume_command(run_dir: Path) -> str:
    """The shell-quoted command that continues the run in ``run_dir`` (its config.yaml names the run; run.root is
    given as an override, as YAML reads it: a root YAML would read as something else goes in double quotes)."""
    root = str(run_dir.resolve().parent)
    try:
        as_is = yaml.safe_load(root) == root
    except yaml.YAMLError:
        as_is = False
    value = root if as_is else json.dumps(root)  # a JSON string is a YAML double-quoted scalar
    return shlex.join(["python", "launch.py", "--config", str(RunDir(run_dir).config), f"run.root={value}"])


def status(run_dir: Path) -> int:
    """Stage, job states (squeue/scontrol, not sacct), last step and checkpoint, shard progress."""
    from ddpm.checkpoint import list_checkpoints
    from ddpm.cluster.squeue import job_state
    from ddpm.status import RunState, read_status, stalled_for

    run = RunDir(run_dir)
    if not run.config.is_file():
        raise DDPMError(f"{run_dir}: not a run directory (no {run.config.name})")
    cfg = load_config(run.config)
    jobs = json.loads(run.jobs.read_text()) if run.jobs.is_file() else {}
    print(f"run dir: {run_dir}")
    for stage in STAGES:
        if stage in jobs:
            ids = jobs.get(ARRAYS.get(stage, ""), [jobs[stage]])
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
    alive = jobs.get("cluster") == "slurm" and "train" in jobs and job_state(jobs["train"]).alive
    if train and train.get("state") != RunState.DONE and not alive:  # e.g. cancelled on preemption (PreemptMode=CANCEL)
        print(f"  resume: {resume_command(run_dir)}   (continues from the last checkpoint)")
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
    if argv[:1] == ["status"]:
        if len(argv) != 2:
            raise DDPMError("usage: python launch.py status RUN_DIR")
        return status(Path(argv[1]))
    check_torch_floor()  # before the config: a job would die in torchrun's option parsing
    args = parse_with_overrides(build_parser(), argv)
    cfg = load_config(args.config, args.overrides)
    cluster = detect_cluster(args.cluster)
    stages = plan_stages(cfg, args.stage, args.only)
    run_dir = cfg.run_dir.resolve()
    run = RunDir(run_dir)
    preflight(cfg, cluster, stages, dry_run=args.dry_run)
    print(f"preflight ok: cluster {cluster}, stages {' -> '.join(stages)}, run dir {run_dir}", flush=True)
    if args.dry_run:
        print(*disk_plan(cfg).lines(), f"(run.root has {shutil.disk_usage(cfg.run.root).free / 2**30:.1f} GiB free)")
    if not args.dry_run:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run.config)
    try:
        jobs = submit(cfg, run_dir, cluster, stages, args.dry_run)
    finally:  # submitit's local executor leaves its folder pattern behind as an empty directory
        if (placeholder := run.submitit_folder).is_dir() and not any(placeholder.iterdir()):
            placeholder.rmdir()
    if args.dry_run:
        return EXIT_OK
    # a later --stage keeps the ids of the earlier stages
    earlier = json.loads(run.jobs.read_text()) if run.jobs.is_file() else {}
    jobs = {**earlier, **jobs}
    atomic_write_text(run.jobs, json.dumps(jobs, indent=2) + "\n")
    print_summary(cfg, run_dir, jobs)
    if cluster == "local" and not jobs.get("stopped"):
        grid = run.samples.grid
        print(f"done: {grid}" if grid.is_file() else "done")
    return EXIT_REQUEUE if jobs.get("stopped") else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

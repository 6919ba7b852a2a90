"""Submitting a run's stages: to SLURM as jobs chained with ``afterok`` (arrays for eval and sampling), or on
submitit's local executor one after another, following their logs (login side; used by ``launch.py`` and the
sweep).

    jobs = submit(cfg, run, "slurm", plan_stages(cfg, "all", only=False), dry_run=False)   # run: a RunDir
    jobs = submit(cfg, run, "slurm", ["sample", "assemble"], False, dependency="afterok:123_4")

``jobs`` is what ``jobs.json`` holds: the job id of each stage and the task ids of each array.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

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
from ddpm.config import Config
from ddpm.errors import ConfigError, DDPMError
from ddpm.evaluate import eval_steps
from ddpm.rundir import RunDir

STAGES = ("train", "eval", "select", "sample", "assemble")
ARRAYS = {"eval": "eval_tasks", "sample": "sample_tasks"}  # jobs.json: the task ids of each array stage


def follow(job: Any, label: str) -> Any:
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


def _task(cfg: Config, run: RunDir, stage: str, cpu_share: int = 1) -> Any:
    """The submitit callable of ``stage`` in ``run`` (an array stage's takes the task index)."""
    if stage in ARRAYS:
        return (SampleTask if stage == "sample" else EvalTask)(run, cfg, cpu_share=cpu_share)
    return {"train": TrainTask(run), "select": SelectTask(run, cfg),
            "assemble": AssembleTask(run, cfg.sampling.num_shards)}[stage]


def _shown(devices: tuple[int, ...]) -> str:
    """The devices of a local job, as its log line shows them (nothing without GPUs)."""
    return f" (CUDA_VISIBLE_DEVICES={','.join(map(str, devices))})" if devices else ""


def run_local(cfg: Config, run: RunDir, stage: str, size: int, jobs: dict[str, Any]) -> Any:
    """Run ``stage`` of ``run`` on submitit's local executor, echoing its logs; the job ids go into ``jobs``.

    An array runs in waves of one task per set of GPUs (:func:`local_slots`): each task has devices of its
    own, and a wave ends before the next starts; without GPUs every task runs at once. A failed task fails the
    stage when its wave has ended (an eval task fails alone: the selection names it). Returns a single job's
    result.
    """
    if stage not in ARRAYS:
        devices = local_slots(cfg, stage)[0]
        job = make_executor(cfg, run, stage, "local", gpus=devices).submit(_task(cfg, run, stage))
        jobs[stage] = job.job_id
        print(f"{stage}: job {job.job_id}{_shown(devices)}", flush=True)
        return follow(job, stage)
    slots = local_slots(cfg, stage, size) or [()]
    executors = [make_executor(cfg, run, stage, "local", gpus=devices) for devices in slots]
    task, ids = _task(cfg, run, stage, cpu_share=len(slots)), []
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
                follow(job, stage)
            except DDPMError as err:
                if stage != "eval":
                    failed.append(err)
                    continue
                print(f"warning: {err}", flush=True)  # fails alone; the selection names it
        if failed:
            raise failed[0]
    return None


def submit(cfg: Config, run: RunDir, cluster: str, stages: list[str], dry_run: bool,
           dependency: str | None = None) -> dict[str, Any]:
    """Submit (or, locally, run) the requested stages of ``run``; returns the job ids. ``dependency``: what the
    first stage's SLURM job waits for (a sweep point's chain waits for its task of the training array)."""
    jobs: dict[str, Any] = {"cluster": cluster, "run_dir": str(run)}
    sizes = {"sample": cfg.sampling.num_shards, "eval": len(eval_steps(cfg))}
    for stage in stages:
        after = "afterany" if stage == "eval" else "afterok"  # the selection names a failed eval task
        if dry_run:  # the scripts SLURM would get, also when this machine has no SLURM
            ex = make_executor(cfg, run, stage, "slurm", dependency)
            print(f"# ---- {stage} job ----\n{sbatch_script(ex, sizes.get(stage))}")
            dependency = f"{after}:<{stage} job id>"
            continue
        if cluster == "local":
            if run_local(cfg, run, stage, sizes.get(stage, 1), jobs) == "stopped" and stage == "train":
                print(f"training stopped early; run the same command to resume from {run.checkpoints}")
                jobs["stopped"] = True
                return jobs
            continue
        ex = make_executor(cfg, run, stage, cluster, dependency)
        if stage in ARRAYS:
            job = ex.map_array(_task(cfg, run, stage), list(range(sizes[stage])))
            jobs[stage] = job[0].job_id.split("_")[0]
            jobs[ARRAYS[stage]] = [j.job_id for j in job]
        else:
            jobs[stage] = ex.submit(_task(cfg, run, stage)).job_id
        dependency = f"{after}:{jobs[stage]}"
        print(f"{stage}: job {jobs[stage]}", flush=True)
    return jobs



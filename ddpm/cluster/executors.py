"""The executors that submit the stage tasks (:mod:`ddpm.cluster.tasks`) to SLURM or to this machine.

    run = cfg.run_dir                                            # a RunDir
    ex = make_executor(cfg, run, "train", cluster="slurm")       # or "local": same tasks, no SLURM
    job = ex.submit(TrainTask(run))                              # the torchrun wrapper, one task per node
    ex = make_executor(cfg, run, "sample", "slurm", dependency=f"afterok:{job.job_id}")
    jobs = ex.map_array(SampleTask(run, cfg), range(cfg.sampling.num_shards))

``sbatch_script`` shows the sbatch text a SlurmExecutor would submit (``launch.py --dry-run``). On the local
executor each job gets the GPUs its stage asks for (``local_slots``): the user's ``CUDA_VISIBLE_DEVICES``, else
this machine's GPUs, one disjoint set per task of an array that runs at once.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ddpm.cluster.tasks import AssembleTask, EvalTask, ProbeTask, SampleTask, SelectTask, TrainTask
from ddpm.config import Config
from ddpm.errors import DDPMError
from ddpm.rundir import RunDir, SweepDir

__all__ = ["AssembleTask", "EvalTask", "ProbeTask", "SampleTask", "SelectTask", "TrainTask", "local_gpus",
           "local_slots", "make_executor", "sbatch_script", "stage_resources"]


def stage_resources(cfg: Config, stage: str) -> dict[str, int]:
    """{cpus_per_task, mem_gb, time_min, gpus} of one ``stage``'s SLURM job (one task, for an array).

    Training takes the slurm section as written. Sampling and assembly take their own keys, or (null) a size
    from what they need, never more than training asks: a short, small job starts sooner (backfill). An eval
    task takes a sampling task's, the selection job the assembly job's.
    """
    sc, infra = cfg.slurm, cfg.infrastructure
    if stage == "train":
        return {"cpus_per_task": sc.cpus_per_task, "mem_gb": sc.mem_gb, "time_min": sc.time_min,
                "gpus": infra.num_gpus}
    floor_min = math.ceil((sc.signal_delay_s + 60) / 60) + 1  # the stop signal must not arrive at the start
    if stage in ("sample", "eval"):  # an eval task is a sampling task of a few images
        return {"cpus_per_task": sc.sample_cpus_per_task or min(sc.cpus_per_task, 4),
                "mem_gb": sc.sample_mem_gb or min(sc.mem_gb, 16),
                "time_min": sc.sample_time_min or max(min(sc.time_min, 240), floor_min),
                "gpus": cfg.task_gpus[0]}
    s, channels = cfg.data.image_size, cfg.model.in_channels
    npz_gb = cfg.sampling.num_samples * s * s * channels / 2**30
    return {"cpus_per_task": sc.assemble_cpus_per_task or min(sc.cpus_per_task, 4),
            "mem_gb": sc.assemble_mem_gb or min(sc.mem_gb, 2 + math.ceil(3 * npz_gb)),
            "time_min": sc.assemble_time_min or max(min(sc.time_min, 30), floor_min), "gpus": 0}


def gpus_found() -> int:
    """GPUs on this machine, without importing torch: ``nvidia-smi -L``'s GPU lines, else the entries of
    ``/proc/driver/nvidia/gpus``; 0 when neither shows one."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        if found := sum(line.startswith("GPU ") for line in out.splitlines()):
            return found
    proc = Path("/proc/driver/nvidia/gpus")
    return len(list(proc.iterdir())) if proc.is_dir() else 0


def local_gpus(environ: Mapping[str, str] | None = None) -> tuple[int, ...] | None:
    """The GPU indices local jobs may use: the user's ``CUDA_VISIBLE_DEVICES`` when set (``2,3`` -> (2, 3),
    empty -> none), else 0..n-1 for the n GPUs found here (:func:`gpus_found`); None when none is found."""
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return tuple(range(found)) if (found := gpus_found()) else None
    items = [v.strip() for v in visible.split(",") if v.strip()]
    if not all(re.fullmatch(r"-?\d+", v) for v in items):
        raise DDPMError(f"CUDA_VISIBLE_DEVICES={visible}: --cluster local hands GPUs to its jobs by index; "
                        "list indices (e.g. CUDA_VISIBLE_DEVICES=0,1) or unset it")
    return tuple(int(v) for v in items)


def local_slots(cfg: Config, stage: str, tasks: int = 1) -> list[tuple[int, ...]]:
    """The GPUs of each local job of ``stage`` that may run at once (at most ``tasks`` of them).

    A stage without GPUs gets ``()`` for each of its ``tasks`` (all run at once). Otherwise the devices of
    :func:`local_gpus` (none found: 0..n-1 for the n the config asks for, and the job stops with the GPU line
    of :mod:`ddpm.envcheck`) are cut into disjoint sets of the GPUs one job asks for (training:
    infrastructure.num_gpus, a sampling or eval task: :attr:`Config.task_gpus`), so no two jobs running at once
    share a device. Fewer devices than one job asks for: one set of what there is (the job stops with the line).
    """
    need = stage_resources(cfg, stage)["gpus"]
    if need == 0:
        return [()] * tasks
    pool = local_gpus()
    if pool is None:
        pool = tuple(range(max(need, cfg.infrastructure.num_gpus)))
    if len(pool) < need:
        return [pool]
    return [pool[i:i + need] for i in range(0, len(pool) - need + 1, need)][:max(tasks, 1)]


def make_executor(cfg: Config, where: RunDir | SweepDir, stage: str, cluster: str, dependency: str | None = None,
                  gpus: Sequence[int] | None = None) -> Any:
    """A submitit executor for ``stage`` (train | eval | select | sample | assemble), logging to the logs/ of
    ``where`` (a run's directory, or a sweep's for its training array and results job).

    ``gpus``: the devices of a local job (``CUDA_VISIBLE_DEVICES``); None: the first set of :func:`local_slots`.
    """
    import submitit

    from ddpm.cluster.preflight import gres_kind

    sc, infra = cfg.slurm, cfg.infrastructure
    res = stage_resources(cfg, stage)
    folder = where.submitit_folder
    if cluster == "local":  # submitit sets CUDA_VISIBLE_DEVICES to visible_gpus[:gpus_per_node] ("" for none)
        devices = tuple(local_slots(cfg, stage)[0] if gpus is None else gpus)
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=res["time_min"], signal_delay_s=sc.signal_delay_s,
                             gpus_per_node=len(devices), visible_gpus=devices)
        return ex
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=sc.max_restarts)
    additional: dict[str, Any] = dict(sc.additional)
    if dependency:  # a job whose dependency can never be met (a failed training) is cancelled, not left pending
        additional["dependency"] = dependency
        additional["kill-on-invalid-dep"] = "yes"
    params: dict[str, Any] = dict(
        job_name=f"{cfg.run.name}-{stage}", partition=sc.partition, time=res["time_min"], nodes=1,
        ntasks_per_node=1, cpus_per_task=res["cpus_per_task"], mem=f"{res['mem_gb']}GB",
        signal_delay_s=sc.signal_delay_s, setup=list(sc.setup), array_parallelism=sc.array_parallelism,
        stderr_to_stdout=True,
    )
    if sc.account:
        params["account"] = sc.account
    if sc.qos:
        params["qos"] = sc.qos
    if stage == "train":
        params["nodes"] = infra.num_nodes
    additional.setdefault("signal", f"{cfg.training.stop_signal}@{sc.signal_delay_s}")  # submitit's is USR2
    if stage in ("train", "eval", "sample"):
        additional["requeue"] = True
    if res["gpus"] > 0:  # slurm.gres names the type for training; a sampling task asks its own count of it
        params["gres"] = sc.gres if stage == "train" and sc.gres else f"{gres_kind(sc.gres)}:{res['gpus']}"
    params["additional_parameters"] = additional
    ex.update_parameters(**params)
    return ex


def sbatch_script(executor: Any, array_size: int | None = None) -> str:
    """The sbatch script ``executor.submit(...)`` writes (``array_size``: ``executor.map_array`` over that many
    items), rendered by submitit's own code (for ``launch.py --dry-run``): quoted as the submitted one is.

    submitit (1.5) has no public call that returns it; this takes the steps of its submission without the
    ``sbatch`` call: ``_make_submission_file_text(_submitit_command_str)`` of the executor, for an array that of
    the copy ``SlurmExecutor._internal_process_submissions`` makes with ``map_count`` set (an array of one item
    is submitted as a plain job). tests/test_dry_run_slurm.py compares the text with real submissions."""
    import submitit

    renderer = executor
    if array_size is not None and array_size > 1:
        renderer = submitit.SlurmExecutor(executor.folder, executor.max_num_timeout)
        renderer.update_parameters(**executor.parameters)
        renderer.parameters["map_count"] = array_size
    return renderer._make_submission_file_text(executor._submitit_command_str, "dry-run")

"""The stage tasks that submitit runs, and the executors that submit them (SLURM or this machine).

    ex = make_executor(cfg, run_dir, "train", cluster="slurm")   # or "local": same tasks, no SLURM
    job = ex.submit(TrainTask(run_dir))                          # the torchrun wrapper, one task per node
    ex = make_executor(cfg, run_dir, "sample", "slurm", dependency=f"afterok:{job.job_id}")
    jobs = ex.map_array(SampleTask(run_dir, cfg), range(cfg.sampling.num_shards))

``sbatch_script`` shows the sbatch text a SlurmExecutor would submit (``launch.py --dry-run``). On the local
executor each job gets the GPUs its stage asks for (``local_slots``): the user's ``CUDA_VISIBLE_DEVICES``, else
this machine's GPUs, one disjoint set per task of an array that runs at once.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ddpm.cluster.wrapper import requeue_self, run_training
from ddpm.config import Config, load_config
from ddpm.errors import DDPMError


class TrainTask:
    """submitit callable for the training job (one task per node)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)

    def __call__(self) -> str:
        return run_training(self.run_dir, load_config(self.run_dir / "config.yaml"))


class ProbeTask:
    """submitit callable for the doctor's job on a training node (``ddpm.cluster.probe``)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)

    def __call__(self) -> str:
        from ddpm.cluster.probe import run_probe

        return run_probe(self.run_dir, load_config(self.run_dir / "config.yaml"))


class StopSampling(BaseException):
    """Raised in a sampling task by a stop signal; the partial shard on disk stays (at most one batch is lost)."""


def _stoppable(label: str, max_restarts: int, work: Any) -> str:
    """Run ``work()`` so that a stop signal (a preemption's SIGTERM, the time limit's USR2) ends it at once: the
    partial file on disk holds every finished batch; the task is requeued (or SLURM is already requeuing it)."""
    def stop(signum: int, _frame: Any) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR2):  # SLURM's later SIGTERM must not interrupt the requeue
            signal.signal(sig, signal.SIG_IGN)
        raise StopSampling(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, stop)
    try:
        return str(work())
    except StopSampling as err:
        print(f"{label}: stopped by {err}; the finished batches are in its partial file", flush=True)
        if requeue_self(max_restarts):
            time.sleep(600)  # the requeue ends this task
        return "stopped"


def _budget(stage: str, cpu_share: int) -> str:
    """Apply the CPU budget of a sampling-like task (``cpu_share``: local tasks running at once)."""
    from ddpm.cpus import SHARE_ENV, apply_cpu_budget, cpu_budget

    if cpu_share > 1:
        os.environ[SHARE_ENV] = str(cpu_share)
    return apply_cpu_budget(cpu_budget(stage))


def _device(cfg: Config, what: str) -> str:
    """cuda when the task asks for a GPU (:attr:`Config.task_gpus`), else cpu; one line when none is seen."""
    from ddpm.envcheck import pick_device

    gpus, key = cfg.task_gpus
    return pick_device(None, gpus, what, key)


class SampleTask:
    """submitit callable for one shard of the sampling array, from the checkpoint ``sampling.checkpoint`` names
    (resolved when the task runs: the eval stage picks ``best`` after this task was queued). Stoppable."""

    def __init__(self, run_dir: str | Path, cfg: Config, cpu_share: int = 1):
        self.run_dir, self.cfg, self.max_restarts = Path(run_dir), cfg, cfg.slurm.max_restarts
        self.cpu_share = cpu_share  # tasks the local executor runs at once on this machine (1 on SLURM)

    def __call__(self, shard: int) -> str:
        from ddpm.evaluate import resolve_checkpoint
        from ddpm.sample import sample_shard

        device = _device(self.cfg, f"sampling task {shard}")
        print(f"shard {shard}: {_budget('sample', self.cpu_share)}", flush=True)
        ckpt, why = resolve_checkpoint(self.run_dir, self.cfg)
        print(f"shard {shard}: checkpoint {why}", flush=True)
        return _stoppable(f"shard {shard}", self.max_restarts, lambda: sample_shard(
            ckpt, self.run_dir / "samples" / "shards", shard, self.cfg.sampling, device=device, choice=why))


class EvalTask:
    """submitit callable for one task of the eval array: the FID of one milestone checkpoint. Stoppable."""

    def __init__(self, run_dir: str | Path, cfg: Config, cpu_share: int = 1):
        self.run_dir, self.cfg, self.cpu_share = Path(run_dir), cfg, cpu_share

    def __call__(self, index: int) -> str:
        from ddpm.evaluate import eval_steps, evaluate_step

        step = eval_steps(self.cfg)[index]
        device = _device(self.cfg, f"eval task {index}")
        print(f"eval task {index} (step {step}): {_budget('sample', self.cpu_share)}", flush=True)
        try:
            return _stoppable(f"eval task {index}", self.cfg.slurm.max_restarts, lambda: evaluate_step(
                self.run_dir, self.cfg, step, device=device)["mean"])
        except DDPMError as err:  # one line in the task's log; the selection names the task
            print(f"error: eval task {index} (step {step}): {err}", flush=True)
            raise


class SelectTask:
    """submitit callable for the selection job: eval/fid.json and the best checkpoint."""

    def __init__(self, run_dir: str | Path, cfg: Config):
        self.run_dir, self.cfg = Path(run_dir), cfg

    def __call__(self) -> str:
        from ddpm.evaluate import select

        return str(select(self.run_dir, self.cfg)["best"]["checkpoint"])


class AssembleTask:
    """submitit callable for the assembly job."""

    def __init__(self, run_dir: str | Path, num_shards: int):
        self.run_dir, self.num_shards = Path(run_dir), num_shards

    def __call__(self) -> str:
        from ddpm.assemble import main as assemble_main

        code = assemble_main([str(self.run_dir / "samples"), "--expect-shards", str(self.num_shards)])
        if code:
            raise RuntimeError(f"assembly failed with exit code {code}")
        return str(self.run_dir / "samples")


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


def make_executor(cfg: Config, run_dir: Path, stage: str, cluster: str, dependency: str | None = None,
                  gpus: Sequence[int] | None = None) -> Any:
    """A submitit executor for ``stage`` (train | eval | select | sample | assemble), logging to ``run_dir/logs``.

    ``gpus``: the devices of a local job (``CUDA_VISIBLE_DEVICES``); None: the first set of :func:`local_slots`.
    """
    import submitit

    from ddpm.cluster.preflight import gres_kind

    sc, infra = cfg.slurm, cfg.infrastructure
    res = stage_resources(cfg, stage)
    folder = run_dir / "logs" / "%j"
    if cluster == "local":  # submitit sets CUDA_VISIBLE_DEVICES to visible_gpus[:gpus_per_node] ("" for none)
        devices = tuple(local_slots(cfg, stage)[0] if gpus is None else gpus)
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=res["time_min"], signal_delay_s=sc.signal_delay_s,
                             gpus_per_node=len(devices), visible_gpus=devices)
        return ex
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=sc.max_restarts)
    additional: dict[str, Any] = dict(sc.additional)
    if dependency:
        additional["dependency"] = dependency
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
    if stage in ("train", "eval", "sample"):
        additional["requeue"] = True
    if res["gpus"] > 0:  # slurm.gres names the type for training; a sampling task asks its own count of it
        params["gres"] = sc.gres if stage == "train" and sc.gres else f"{gres_kind(sc.gres)}:{res['gpus']}"
    params["additional_parameters"] = additional
    ex.update_parameters(**params)
    return ex


def sbatch_script(executor: Any, array_size: int | None = None) -> str:
    """The sbatch text submitit writes for a SlurmExecutor (for --dry-run); ``array_size`` for an array.

    submitit (1.5) has no public call that returns this text; ``_make_sbatch_string`` is the function its
    ``SlurmExecutor`` uses, fed with the executor's public ``parameters`` (tests/test_launch_slurm.py checks
    the text against a real submission)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{sys.executable} -u -m submitit.core._submit {executor.folder}"
    return _make_sbatch_string(command=command, folder=executor.folder, map_count=array_size,
                               **executor.parameters)

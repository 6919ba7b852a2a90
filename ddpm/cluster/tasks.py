"""The stage tasks that submitit runs on the cluster's nodes: one callable per job or array task, each calling
its stage's function (training's wrapper, :func:`ddpm.evaluate.evaluate_step` and ``select``,
:func:`ddpm.sample.sample_stage`, :func:`ddpm.assemble.assemble_stage`; a sweep's training array and results,
:func:`ddpm.sweepresults.write_results`).

Job side: nothing here imports the login side (``ddpm.cluster.preflight``, ``ddpm.cluster.executors``,
``launch.py``); tests/test_layout.py checks it. :mod:`ddpm.cluster.executors` submits these. A task holds the
:class:`~ddpm.rundir.RunDir` it was given (pickled with it) and hands it on as it is.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from ddpm.cluster.wrapper import requeue_and_end, run_training
from ddpm.config import Config, load_config
from ddpm.errors import DDPMError
from ddpm.rundir import RunDir


class TrainTask:
    """submitit callable for the training job (one task per node)."""

    def __init__(self, run: RunDir):
        self.run = run

    def __call__(self) -> str:
        return run_training(self.run, load_config(self.run.config))


class SweepTrainTask:
    """submitit callable for a sweep's training array: task k trains point k in its own run directory."""

    def __init__(self, runs: list[RunDir]):
        self.runs = list(runs)

    def __call__(self, index: int) -> str:
        return TrainTask(self.runs[index])()


class SweepResultsTask:
    """submitit callable for a sweep's results job: results.csv, results.png and the HParams view."""

    def __init__(self, sweep_dir: str | Path):
        self.sweep_dir = Path(sweep_dir)

    def __call__(self) -> str:
        from ddpm.sweepresults import write_results

        return str(write_results(self.sweep_dir))


class ProbeTask:
    """submitit callable for the doctor's job on a training node (``ddpm.cluster.probe``)."""

    def __init__(self, run: RunDir):
        self.run = run

    def __call__(self) -> str:
        from ddpm.cluster.probe import run_probe

        return run_probe(self.run, load_config(self.run.config))


class StopSampling(BaseException):
    """Raised in a sampling task by a stop signal; the partial shard on disk stays (at most one batch is lost)."""


def _stoppable(label: str, cfg: Config, work: Any) -> str:
    """Run ``work()`` so that a stop signal (a preemption's SIGTERM, the time limit's ``training.stop_signal``)
    ends it at once: the partial file on disk holds every finished batch; the task is requeued (or SLURM is
    already requeuing it)."""
    stops = (signal.SIGTERM, getattr(signal, f"SIG{cfg.training.stop_signal}"))

    def stop(signum: int, _frame: Any) -> None:
        for sig in stops:  # SLURM's later SIGTERM must not interrupt the requeue
            signal.signal(sig, signal.SIG_IGN)
        raise StopSampling(signal.Signals(signum).name)

    for sig in stops:
        signal.signal(sig, stop)
    try:
        return str(work())
    except StopSampling as err:
        print(f"{label}: stopped by {err}; the finished batches are in its partial file", flush=True)
        requeue_and_end(cfg.slurm.max_restarts)
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

    def __init__(self, run: RunDir, cfg: Config, cpu_share: int = 1):
        self.run, self.cfg = run, cfg
        self.cpu_share = cpu_share  # tasks the local executor runs at once on this machine (1 on SLURM)

    def __call__(self, shard: int) -> str:
        from ddpm.sample import sample_stage

        device = _device(self.cfg, f"sampling task {shard}")
        print(f"shard {shard}: {_budget('sample', self.cpu_share)}", flush=True)
        return _stoppable(f"shard {shard}", self.cfg, lambda: sample_stage(
            self.run, self.cfg, shard, device))


class EvalTask:
    """submitit callable for one task of the eval array: the FID of one milestone checkpoint. Stoppable."""

    def __init__(self, run: RunDir, cfg: Config, cpu_share: int = 1):
        self.run, self.cfg, self.cpu_share = run, cfg, cpu_share

    def __call__(self, index: int) -> str:
        from ddpm.evaluate import eval_steps, evaluate_step

        step = eval_steps(self.cfg)[index]
        device = _device(self.cfg, f"eval task {index}")
        print(f"eval task {index} (step {step}): {_budget('sample', self.cpu_share)}", flush=True)
        try:
            return _stoppable(f"eval task {index}", self.cfg, lambda: evaluate_step(
                self.run, self.cfg, step, device=device)["mean"])
        except DDPMError as err:  # one line in the task's log; the selection names the task
            print(f"error: eval task {index} (step {step}): {err}", flush=True)
            raise


class SelectTask:
    """submitit callable for the selection job: eval/fid.json and the best checkpoint."""

    def __init__(self, run: RunDir, cfg: Config):
        self.run, self.cfg = run, cfg

    def __call__(self) -> str:
        from ddpm.evaluate import select

        return str(select(self.run, self.cfg)["best"]["checkpoint"])


class AssembleTask:
    """submitit callable for the assembly job."""

    def __init__(self, run: RunDir, num_shards: int):
        self.run, self.num_shards = run, num_shards

    def __call__(self) -> str:
        from ddpm.assemble import assemble_stage

        return str(assemble_stage(self.run, self.num_shards))

"""The SLURM tests' training runs: how fast this machine runs them (measured), the bounds of the waits that follow
from it, their progress in the log and their processes.

A SLURM test waits for events: a step in a job's log, a requeue, the end of a job. Each wait has a bound only so
that a hang fails the test instead of stalling the suite; the bound is what this machine was measured to need
for what the wait covers, times ``SLACK``, plus the cluster's own delays, which come from its configuration
(tests/slurm/cluster.sh), not from the CPU:

- ``CLUSTER_S``: scheduler passes (sched_interval 1 s), KillWait (5 s), a requeued job's BeginTime (cred_expire
  10 s + 1 s) and the scontrol calls around them;
- ``GRACE_S``: the GraceTime of a preempted job (DDPM_SLURM_GRACE_TIME, 30 s by default).

The measurement (:func:`measure_pace`) runs one fresh interpreter with the tests' training settings (tiny_cpu.yaml,
one torch thread, one loader worker, one rank): the time to import torch and ddpm, to build the trainer and take
its first steps, and three batches of steps. It runs once per pytest process (5-15 s) and is shared by the
test modules.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from helpers import ROOT, TINY_CONFIG, launch
from slurm_helpers import TERMINAL_STATES, SlurmError, job_state, wait_for_job, wait_for_state

SLACK = 4.0  # the job shares the CPUs with its reference run (nice 10) and whatever else the machine runs
CLUSTER_S = 30.0
GRACE_S = float(os.environ.get("DDPM_SLURM_GRACE_TIME", "30"))
# from a test's read of the step it waited for to its fault reaching the job (an sbatch the scheduler answers at
# once and slurmd's signal, a scancel, an os.kill): 0.4 s measured here for a preemption, times ~SLACK
FAULT_S = 3.0
# what the tests' training jobs run: one thread, one loader worker (the default a user runs with is workers on),
# the whole node's two CPUs
WORKERS = ["data.num_workers=1", "slurm.cpus_per_task=2", "slurm.setup=[export OMP_NUM_THREADS=1]"]
PACE_OVERRIDES = ("data.num_workers=1", "training.log_every=1000")

_MEASURE = """
import json, sys, time
t0 = time.perf_counter()
import torch
from ddpm.config import load_config
from ddpm.dist import DistEnv
from ddpm.rundir import RunDir
from ddpm.train import Trainer
t1 = time.perf_counter()
cfg = load_config(sys.argv[1], sys.argv[3:])
trainer = Trainer(cfg, RunDir(sys.argv[2]), DistEnv(device=torch.device("cpu")))
for _ in range(5):  # the loader worker's start, the first allocations
    trainer.train_step(*trainer.next_batch())
t2 = time.perf_counter()
batches = []
for _ in range(3):
    t = time.perf_counter()
    for _ in range(20):
        trainer.train_step(*trainer.next_batch())
    batches.append((time.perf_counter() - t) / 20)
trainer.close()
print(json.dumps({"import_s": t1 - t0, "setup_s": t2 - t1, "step_s": batches}))
"""


@dataclass(frozen=True)
class Pace:
    """This machine's measured times for one training job of the tests' settings.

    ``startup_s``: from a job's start to its first steps: two interpreters import torch (torchrun's agent, the
    rank) and the trainer is built (its loader worker started, the first steps taken). ``step_s``: the fastest of
    the measured batches (what sizes a run so that a fault lands before its end); ``slow_step_s``: the slowest
    (what bounds a wait).
    """

    startup_s: float
    step_s: float
    slow_step_s: float

    def steps_lasting(self, seconds: float, multiple: int = 100) -> int:
        """Steps that take at least ``seconds`` at the fastest measured rate, rounded up to a multiple of
        ``multiple``."""
        return multiple * -(-(int(seconds / self.step_s) + 1) // multiple)

    def run_length(self, fault_at: int, at_least: int) -> int:
        """``num_iterations`` of a run whose fault is delivered once its log shows step ``fault_at``: at least
        ``at_least``, and long enough that the job cannot end before the fault reaches it, ``FAULT_S`` after the
        test saw the step, on a machine as fast as this one (a multiple of 10: the tests log every 10 steps)."""
        return max(at_least, fault_at + self.steps_lasting(FAULT_S, multiple=10))

    def bound(self, steps: int = 0, starts: int = 1, ranks: int = 1) -> float:
        """Seconds a wait covering ``starts`` job starts and ``steps`` training steps of ``ranks`` ranks on this
        node may take: ``SLACK`` times their measured time, plus ``CLUSTER_S``."""
        cpus = len(os.sched_getaffinity(0))
        step = self.slow_step_s * max(1.0, ranks / cpus)
        return SLACK * (starts * self.startup_s + steps * step) + CLUSTER_S


_measured: dict[Path, Pace] = {}


def measure_pace(images: Path) -> Pace:
    """The :class:`Pace` of tiny_cpu.yaml on ``images`` (the ``images`` fixture), measured once per process."""
    if images not in _measured:
        with tempfile.TemporaryDirectory() as run_dir:
            proc = subprocess.run([sys.executable, "-c", _MEASURE, str(TINY_CONFIG), run_dir, f"data.path={images}",
                                   *PACE_OVERRIDES], capture_output=True, text=True, cwd=ROOT, timeout=600,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            raise RuntimeError(f"measuring the training pace failed:\n{proc.stderr[-3000:]}")
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        _measured[images] = Pace(startup_s=2 * got["import_s"] + got["setup_s"], step_s=min(got["step_s"]),
                                 slow_step_s=max(got["step_s"]))
        print(f"pace: {got}")
    return _measured[images]


def job_pids(job_id: str | int) -> list[int]:
    """Every process of a job on this node: those whose environment has SLURM_JOB_ID=<job_id>."""
    needle = f"SLURM_JOB_ID={job_id}\0".encode()
    pids = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in env.read_bytes():
                pids.append(int(env.parent.name))
        except OSError:
            continue
    return pids


def logged_step(log: Path) -> int:
    """The last ``step N/`` progress line of a training log (0 before the first)."""
    found = re.findall(r"^step (\d+)/", log.read_text() if log.is_file() else "", flags=re.M)
    return int(found[-1]) if found else 0


def wait_for_step(log: Path, step: int, timeout: float = 120, job: str | None = None) -> int:
    """Wait until the training log has reached ``step``; returns the step seen. With ``job``, fails at once when
    that job has ended first (instead of at the timeout)."""
    deadline = time.monotonic() + timeout
    polls = 0
    while (seen := logged_step(log)) < step:
        if job is not None and polls % 5 == 0 and (state := job_state(job)) in TERMINAL_STATES:
            if (seen := logged_step(log)) >= step:  # the step came just before the end
                break
            raise SlurmError(f"job {job} ended {state} at step {seen} of {log}, before step {step}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{log} never reached step {step} in {timeout:.0f} s (last: {seen})")
        polls += 1
        time.sleep(0.2)
    return seen


def proc_bytes(pid: int, name: str) -> bytes:
    """``/proc/<pid>/<name>``, or b"" when the process has exited since it was listed."""
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def parent_pid(pid: int) -> int:
    """The parent of ``pid`` (0 when it has exited since it was listed)."""
    stat = proc_bytes(pid, "stat").decode()
    return int(stat.rsplit(")", 1)[1].split()[1]) if stat else 0


def rank_pids(job_id: str | int) -> dict[int, int]:
    """``{global rank: pid}`` of a job's trainer ranks on this node: children of torchrun's agent with a RANK in
    their environment (a process that exits while it is looked at is left out)."""
    ranks = {}
    for pid in job_pids(job_id):
        env = dict(kv.split(b"=", 1) for kv in proc_bytes(pid, "environ").split(b"\0") if b"=" in kv)
        if b"RANK" in env and b"torch.distributed.run" in proc_bytes(parent_pid(pid), "cmdline"):
            ranks[int(env[b"RANK"])] = pid
    return ranks


def start_training(images: Path, root: Path, pace: Pace, *overrides: str) -> tuple[Path, str, Path]:
    """``launch.py --stage train --only`` of tiny_cpu.yaml on the local SLURM; (run dir, job id, the log of node 0's
    task) once the job runs."""
    proc = launch("--stage", "train", "--only", f"data.path={images}", f"run.root={root}", *overrides)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = root / "tiny"
    job = json.loads((run_dir / "jobs.json").read_text())["train"]
    assert wait_for_state(job, {"RUNNING"}, timeout=pace.bound()) == "RUNNING"
    return run_dir, job, run_dir / "logs" / job / f"{job}_0_log.out"


def finish(job: str, log: Path, timeout: float, clean_from: str = "", release: bool = True) -> str:
    """Wait until the (requeued) job completes; the log text of node 0's task, with no loader-worker error and no
    traceback after the first ``clean_from`` (torchrun prints its ChildFailedError when a rank exits on a lost
    peer). ``release``: start a requeued job at once, before SLURM's BeginTime delay (``release_requeued``)."""
    state = wait_for_job(job, timeout=timeout, release=release)
    text = log.read_text()
    assert state == "COMPLETED", text[-3000:]
    rest = text[text.index(clean_from):]
    assert "DataLoader worker" not in text and "Traceback" not in rest, rest[-3000:]
    return text

"""The training job's wrapper (``python -m ddpm.cluster train``): torchrun for this node, then requeue-after-save.

The training job runs one task per node; each runs :func:`run_training`, which
starts torchrun around ``python -m ddpm.train`` and owns the requeue policy:

* torchrun's agent ignores the stop signals (inherited ``SIG_IGN``; SIGTERM left out of
  ``--signals-to-handle``) and loader workers ignore them too, so a signal sent to every
  process of the step (preemption, time limit) reaches the trainer ranks only; the wrapper
  forwards it to them too (local executor, or a signal to the wrapper alone);
* a watchdog reads the trainer's heartbeat in ``status.json``: none for ``training.watchdog_s``
  (a hung or lost rank) -> the training processes are killed and the job requeued;
* submitit's own USR2 handler (``scontrol requeue`` at once, which kills the step
  before the checkpoint is written) is replaced while training runs;
* when torchrun exits, ``status.json`` says ``done`` (success), ``stopped`` (the
  checkpoint is durable: requeue, up to ``slurm.max_restarts``), ``failed`` with the trainer's one-line
  ``error`` (bad input, no GPU, a full disk: not requeued), or else torchrun exited non-zero while the
  trainer was ``starting`` or ``running`` (or wrote ``lost``): a rank's process or node died, or NCCL's
  watchdog aborted the survivors before Python could write anything. That is ``lost``: requeue from the
  last durable checkpoint (or step 0), unless three attempts in a row lost a rank without a new checkpoint
  (a crash loop: one line, not requeued again). :mod:`ddpm.cluster.attempt` holds that table.

The same wrapper is the sbatch route: ``srun python -m ddpm.cluster train --run-dir D``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import subprocess
import sys
import time
from typing import Any

import psutil

from ddpm.cluster.attempt import Attempt, judge
from ddpm.cluster.rendezvous import first_slurm_host, rendezvous_port
from ddpm.cluster.squeue import GONE, job_state
from ddpm.config import Config, dump_config, load_config
from ddpm.configtools import parse_with_overrides
from ddpm.envcheck import check_torch_floor
from ddpm.errors import EXIT_FAILURE, EXIT_OK, EXIT_REQUEUE, ConfigError, DDPMError, cli_entry
from ddpm.provenance import add_attempt_seconds
from ddpm.rundir import RunDir
from ddpm.status import RunState, read_status, stalled_for, write_status


def torchrun_command(cfg: Config, run: RunDir, environ: dict[str, str] | None = None,
                     module: str = "ddpm.train") -> list[str]:
    """torchrun around the trainer (or the doctor's probe) in ``run``: c10d rendezvous at the first node for
    multi-node jobs.

    The agent does not handle SIGTERM (``--signals-to-handle`` without it; ignored, see
    :func:`_ignore_stop_signals`): on SIGTERM it would kill the ranks after ``--shutdown-timeout``, before
    their checkpoint is durable. The ranks get the signal from SLURM (every process of the step) or the wrapper.
    """
    env = os.environ if environ is None else environ
    infra = cfg.infrastructure
    nproc = infra.num_gpus if infra.num_gpus > 0 else infra.nproc_per_node
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT"]
    nnodes = int(env.get("SLURM_NNODES", "1"))
    if nnodes > 1:
        job_id = env.get("SLURM_JOB_ID")
        host = first_slurm_host(env["SLURM_JOB_NODELIST"])
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={host}:{rendezvous_port(job_id)}",
                f"--rdzv-id={job_id}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", module, "--config", str(run.config), "--run-dir", str(run)]


def _ignore_stop_signals() -> None:  # runs in torchrun's process before exec; inherited by its agent
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (torchrun starts its workers in sessions of their own)."""
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def requeue_and_end(max_restarts: int) -> None:
    """Requeue this job (:func:`requeue_self`), then wait for the requeue's SIGTERM to end this process: a requeued
    job never reports success or failure. Returns at once when it is not requeued (outside SLURM, restarts spent,
    or SLURM ending it); the caller then exits with its own status. Used by training's wrapper and the
    sampling and eval tasks alike."""
    if requeue_self(max_restarts):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the requeue's SIGTERM ends us at once (not KillWait later)
        time.sleep(600)


def requeue_self(max_restarts: int) -> bool:
    """``scontrol requeue`` this job unless it has restarted ``max_restarts`` times already.

    True when the job will run again: requeued now, or already being requeued by SLURM (a preemption
    with PreemptMode=REQUEUE answers "Job is pending execution").
    """
    env = os.environ
    job_id = (f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if "SLURM_ARRAY_JOB_ID" in env
              else env.get("SLURM_JOB_ID"))
    restarts = int(env.get("SLURM_RESTART_COUNT", "0"))
    if job_id is None:
        print("stopped outside SLURM: run the same command again to resume", flush=True)
        return False
    if restarts >= max_restarts:
        print(f"not requeuing job {job_id}: it has restarted {restarts} times (slurm.max_restarts)", flush=True)
        return False
    state = job_state(job_id)  # GONE: squeue and scontrol did not answer; try the requeue
    if state.requeueing:
        print(f"job {job_id} is already being requeued by SLURM (preemption)", flush=True)
        return True
    if state.name not in ("RUNNING", GONE):  # COMPLETING: a plain scancel or the hard limit ends it; never undo that
        print(f"not requeuing job {job_id}: SLURM is ending it (JobState={state.name}: scancel or the time limit); "
              "`python launch.py status RUN_DIR` prints the command that resumes it", flush=True)
        return False
    print(f"requeuing job {job_id} (restart {restarts + 1}/{max_restarts})", flush=True)
    proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        if "pending" in proc.stderr.lower():
            print(f"job {job_id} is already being requeued by SLURM (preemption)", flush=True)
            return True
        print(f"scontrol requeue {job_id} failed: {proc.stderr.strip()}", flush=True)
        return False
    return True


def _seconds_left() -> int | None:
    """Seconds until SLURM ends this job (``squeue %e``; a preemption moves it to now + GraceTime), or None."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%e"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        return int(datetime.datetime.fromisoformat(out).timestamp() - time.time())
    except (OSError, subprocess.SubprocessError, ValueError):  # no SLURM, or no end time (UNLIMITED, NONE)
        return None


def _report_deadline(name: str, run: RunDir) -> None:
    """After a stop signal: how long SLURM gives, against how long ``run``'s last checkpoint took."""
    left, last_save = _seconds_left(), float((read_status(run) or {}).get("last_save_s") or 0.0)
    if left is None:
        return
    print(f"wrapper: {name}: SLURM ends this job in {left} s; the last checkpoint took {last_save:.1f} s",
          flush=True)
    if last_save and 2 * last_save + 5 > left:
        print(f"WARNING: the checkpoint may not be durable before SLURM kills the job ({left} s left, the last "
              f"save took {last_save:.1f} s): the run would resume from the previous checkpoint. Raise "
              "slurm.signal_delay_s (time limit) or ask for a longer GraceTime (preemption)", flush=True)


FAILED_GRACE_S = 10.0  # a failed rank's torchrun exits on its own within this; the others' may never (see below)


def _end_after_failure(proc: subprocess.Popen, error: str) -> int:
    """A rank recorded ``failed``: torchrun's exit code once it ends on its own, else after SIGKILL to its tree.

    The ranks of other nodes (rank 0 in the rendezvous or a collective) would wait for the failed one until the
    process group's timeout; the failed rank's own torchrun ends in seconds, after it printed its line.
    """
    try:
        return proc.wait(timeout=FAILED_GRACE_S)
    except subprocess.TimeoutExpired:
        print(f"wrapper: a rank failed ({error}); ending this node's training processes", flush=True)
        _signal_all([proc.pid, *descendants(proc.pid)], signal.SIGKILL)
        return proc.wait()


def supervise(proc: subprocess.Popen, run: RunDir, watchdog_s: int, signals: list[tuple[str, float]]) -> int | None:
    """Wait for torchrun training in ``run``; its exit code, or None when the watchdog killed it (no heartbeat
    for ``watchdog_s``).

    A stop signal is sent to the ranks again every 5 s until torchrun exits: a rank still starting up
    inherits torchrun's SIG_IGN and would miss the first one.
    """
    reported, resent, started = False, 0.0, time.time()
    while True:
        try:
            return proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        if signals and not reported:
            _report_deadline(signals[0][0], run)
            reported, resent = True, time.monotonic()
        if signals and time.monotonic() - resent >= 5.0:
            _signal_all(descendants(proc.pid), getattr(signal, signals[0][0]))
            resent = time.monotonic()
        status = read_status(run) or {}
        failed = status.get("state") == RunState.FAILED and float(status.get("heartbeat") or 0) > started - 30
        if failed and status.get("error"):  # any rank on any node, in this job (a node without its GPUs): the
            return _end_after_failure(proc, status["error"])  # others may wait for it in a collective
        age = stalled_for(status, watchdog_s)
        if age is not None:
            print(f"watchdog: no heartbeat from the trainer for {age:.0f} s (training.watchdog_s={watchdog_s}): "
                  "a rank is hung or lost; killing the training processes", flush=True)
            _signal_all([proc.pid, *descendants(proc.pid)], signal.SIGKILL)
            proc.wait()
            return None


def run_training(run: RunDir, cfg: Config) -> str:
    """Run torchrun for this node, training in ``run``; return "done", or requeue / raise. Blocks until torchrun exits.

    Requeued (up to ``slurm.max_restarts``) when the trainer stopped on a signal with a durable checkpoint, and
    when the watchdog ended a hung run or a rank was lost (both resume from the last checkpoint).
    """
    check_torch_floor()  # before torchrun: an older torchrun rejects --signals-to-handle with a usage error
    nodes = int(os.environ.get("SLURM_NNODES", cfg.infrastructure.num_nodes))
    if nodes != cfg.infrastructure.num_nodes:  # the sbatch route: --nodes and the config disagree
        raise ConfigError(f"infrastructure.num_nodes: the config says {cfg.infrastructure.num_nodes}, this job has "
                          f"{nodes} nodes (SLURM_NNODES); pass infrastructure.num_nodes={nodes} or sbatch "
                          f"--nodes={cfg.infrastructure.num_nodes}")
    cmd = torchrun_command(cfg, run)
    node = int(os.environ.get("SLURM_NODEID", "0"))
    before = Attempt.read(run)
    if node == 0:  # a crash before the trainer's first write must not read as an earlier attempt's "stopped"
        write_status(run, RunState.STARTING, -1, 0, lost_streak=before.lost_streak)
    print("running:", " ".join(cmd), flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(cmd, preexec_fn=_ignore_stop_signals)
    signals: list[tuple[str, float]] = []

    def forward(signum: int, _frame: Any) -> None:  # to the trainer ranks, not torchrun's agent
        name = signal.Signals(signum).name
        signals.append((name, time.monotonic()))
        print(f"wrapper: got {name}, forwarding to the trainer", flush=True)
        _signal_all(descendants(proc.pid), signum)

    stop_sig = getattr(signal, f"SIG{cfg.training.stop_signal}")
    for sig in (signal.SIGUSR1, signal.SIGUSR2):  # the one that is not the stop signal must not kill the wrapper
        signal.signal(sig, signal.SIG_IGN)
    for sig in {stop_sig, signal.SIGTERM}:
        signal.signal(sig, forward)
    rc = supervise(proc, run, cfg.training.watchdog_s, signals)
    if node == 0:
        add_attempt_seconds(run, time.monotonic() - started)
    status = read_status(run) or {}
    verdict = judge(rc, status, before, Attempt.read(run), cfg.training.watchdog_s, run.logs)
    if verdict.next == "done":
        # nothing is left to save: a stop signal now (the time limit's, just as training ended) must not kill
        # this process as it exits (Python restores default handlers at exit, but keeps SIG_IGN), or the job
        # would end FAILED and its afterok dependents never start
        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        print(verdict.line, flush=True)
        return RunState.DONE
    if verdict.streak and node == 0:  # stalled or lost: the streak survives the requeue in status.json
        write_status(run, verdict.state, int(status.get("step") or 0), int(status.get("skipped_steps") or 0),
                     error=verdict.why, lost_streak=verdict.streak)
    if verdict.next == "fail":  # the trainer's one line: fix and resubmit; never requeued
        raise DDPMError(verdict.line)
    if verdict.next == "error":
        raise RuntimeError(verdict.line)
    took = f" {time.monotonic() - signals[0][1]:.1f} s after {signals[0][0]}" if signals else ""
    print(verdict.line + (took if verdict.state == RunState.STOPPED else ""), flush=True)
    if node == 0:
        requeue_and_end(cfg.slurm.max_restarts)
    return verdict.state


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm.cluster",
                                description="torchrun wrapper for one node of a training job (the sbatch route)")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run torchrun for this node; requeue after the checkpoint on a stop signal")
    t.add_argument("--config", help="YAML config; written to RUN_DIR/config.yaml (default: the run's own)")
    t.add_argument("overrides", nargs="*", help="section.key=value")
    t.add_argument("--run-dir", help="run directory (default: <run.root>/<run.name> of the config)")
    r = sub.add_parser("requeue", help="requeue this job or array task (the sbatch templates' stop-signal trap), "
                       "within the run's slurm.max_restarts; exit 0 when it will run again")
    r.add_argument("--run-dir", required=True, help="the run directory (its config.yaml gives slurm.max_restarts)")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    check_torch_floor()
    parser = build_parser()
    args = parse_with_overrides(parser, argv)
    given = RunDir(args.run_dir) if args.run_dir else None  # the edge: --run-dir becomes a RunDir here, once
    if args.command == "requeue":  # --run-dir is required
        return EXIT_OK if requeue_self(load_config(given.config).slurm.max_restarts) else EXIT_FAILURE
    if args.config is None and given is None:
        parser.error("train needs --config or --run-dir")
    cfg = load_config(args.config if args.config else given.config, args.overrides)
    run = given or cfg.run_dir
    run.path.mkdir(parents=True, exist_ok=True)
    if args.config:  # every node writes the same resolved config (atomically)
        dump_config(cfg, run.config)
    state = run_training(run, cfg)
    return EXIT_OK if state == RunState.DONE else EXIT_REQUEUE if state == RunState.STOPPED else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())

"""The run's job states, stop signal and state machine, each in one place.

- ``ddpm.cluster.squeue.JobState``: squeue's answer as a type; ``.alive``, ``.requeueing`` and ``.ended`` are the
  only readings of SLURM's state names (launch.py status, the doctor and the wrapper ask them);
- ``training.stop_signal`` is the time limit's signal of every job of a run, as
  submitted (``#SBATCH --signal``), and the one a sampling or eval task stops on;
- ``ddpm.cluster.attempt.judge``: how a training attempt ended (torchrun's exit, status.json) -> done, requeue,
  fail with the trainer's line, or the crash-loop line.

The real-SLURM side (a requeued job's state, a stop delivered by the time limit) is in test_faults_slurm.py,
test_faults_storage.py and test_slurm_harness.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, TINY_CONFIG, signal_handlers_restored

from ddpm.cluster.attempt import CRASH_LOOP, Attempt, judge
from ddpm.cluster.squeue import JobState, job_state
from ddpm.config import load_config
from ddpm.rundir import RunDir


@pytest.mark.parametrize("name, alive, requeueing", [
    ("PENDING", True, True), ("REQUEUED", True, True), ("REQUEUE_HOLD", True, True), ("RUNNING", True, False),
    ("CONFIGURING", True, False), ("COMPLETING", True, False), ("SUSPENDED", True, False),
    ("COMPLETED", False, False), ("FAILED", False, False), ("CANCELLED", False, False), ("TIMEOUT", False, False),
    ("NODE_FAIL", False, False), ("OUT_OF_MEMORY", False, False), ("PREEMPTED", False, False), ("GONE", False, False),
])
def test_job_state_readings(name: str, alive: bool, requeueing: bool) -> None:
    state = JobState(name)
    assert (state.alive, state.requeueing, state.ended) == (alive, requeueing, not alive)


def test_job_state_prints_as_squeue_does() -> None:
    assert str(JobState("PENDING", "BeginTime")) == "PENDING(BeginTime)" and str(JobState("RUNNING")) == "RUNNING"


def test_without_squeue_a_job_is_gone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No squeue/scontrol on PATH (a login node without the client, or they did not answer): GONE, not an error."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert job_state("123") == JobState("GONE") and job_state("123").ended


@pytest.mark.parametrize("stop", ["USR1", "USR2"])
def test_every_requeued_job_gets_the_stop_signal(stop: str) -> None:
    from ddpm.cluster.executors import make_executor, sbatch_script

    cfg = load_config(TINY_CONFIG, [f"training.stop_signal={stop}", "slurm.signal_delay_s=75"])
    for stage in ("train", "eval", "select", "sample", "assemble"):
        script = sbatch_script(make_executor(cfg, RunDir("/tmp/r"), stage, "slurm"))
        assert script.count("--signal") == 1 and f"#SBATCH --signal={stop}@75\n" in script, (stage, script)


def test_a_sampling_task_stops_on_the_configured_signal(capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """training.stop_signal=USR1 stops a task (outside SLURM: no requeue, "stopped"); USR2 is then not a stop."""
    from ddpm.cluster.tasks import _stoppable

    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(TINY_CONFIG, ["training.stop_signal=USR1"])
    with signal_handlers_restored():
        assert _stoppable("shard 0", cfg, lambda: os.kill(os.getpid(), signal.SIGUSR1) or "done") == "stopped"
    out = capsys.readouterr().out
    assert "shard 0: stopped by SIGUSR1" in out and "stopped outside SLURM" in out, out
    code = ("import os, signal, sys; sys.path.insert(0, 'tests'); from ddpm.cluster.tasks import _stoppable; "
            "from ddpm.config import load_config; from helpers import TINY_CONFIG; "
            "cfg = load_config(TINY_CONFIG, ['training.stop_signal=USR1']); "
            "_stoppable('shard 0', cfg, lambda: os.kill(os.getpid(), signal.SIGUSR2))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGUSR2, proc  # not taken over: USR2's default action ends the process


# ---- the run's state machine (ddpm/cluster/attempt.py): how an attempt ended -> what the job does next ---------

FRESH, PROGRESS = Attempt(100, 0), Attempt(200, 0)  # an attempt's start; its end when it wrote a new checkpoint


@pytest.mark.parametrize("rc, status, end, want", [
    (0, {"state": "done", "step": 500}, PROGRESS, ("done", "done", "training done at step 500")),
    (3, {"state": "stopped", "step": 150}, PROGRESS, ("stopped", "requeue", "training stopped at step 150; "
                                                      "checkpoint is durable")),
    (1, {"state": "failed", "step": 7, "error": "out of memory at step 7"}, FRESH,
     ("failed", "fail", "training failed: out of memory at step 7")),
    (None, {"state": "running", "step": 40}, FRESH, ("stalled", "requeue", "training stalled after step 40; "
                                                     "resuming from the last checkpoint")),
    (-9, {"state": "running", "step": 40}, FRESH, ("lost", "requeue", "training lost a rank after step 40 "
                                                   "(torchrun exited with -9 while the trainer was running); "
                                                   "resuming from the last checkpoint")),
    (1, {"state": "starting", "step": -1}, FRESH, ("lost", "requeue", "training lost a rank after step -1 "
                                                   "(torchrun exited with 1 while the trainer was starting); "
                                                   "resuming from the last checkpoint")),
    (0, {"state": "running", "step": 3}, FRESH, ("failed", "error", "training failed: torchrun exited with 0, "
                                                 "status 'running'; see L")),
    (1, {"state": "failed", "step": 3}, FRESH, ("failed", "error", "training failed: torchrun exited with 1, "
                                                "status 'failed'; see L")),  # failed without its line: not the user's
])
def test_each_ending_has_one_next_step(rc: int | None, status: dict, end: Attempt, want: tuple[str, str, str]) -> None:
    verdict = judge(rc, status, FRESH, end, 600, "L")
    assert (verdict.state, verdict.next, verdict.line) == want


def test_the_third_stall_or_loss_without_a_checkpoint_is_a_crash_loop() -> None:
    streak, lines = 0, []
    for _ in range(CRASH_LOOP):
        start = Attempt(100, streak)
        verdict = judge(None, {"state": "running", "step": 4}, start, Attempt(100, streak), 10, "L")
        streak, lines = verdict.streak, [*lines, verdict.next]
        assert verdict.why == "no heartbeat for 10 s after step 4 (training.watchdog_s)"
    assert lines == ["requeue", "requeue", "error"] and streak == CRASH_LOOP
    assert verdict.line == ("training failed: a crash loop, not requeued: 3 attempts in a row stalled without a new "
                            "checkpoint (last: no heartbeat for 10 s after step 4 (training.watchdog_s)); see L")
    lost = judge(137, {"state": "lost", "step": 9, "error": "rank 1 died"}, Attempt(100, 2), Attempt(100, 2), 10, "L")
    assert (lost.next, lost.streak) == ("error", 3) and "3 attempts in a row lost a rank" in lost.line
    saved = judge(137, {"state": "lost", "step": 9}, Attempt(100, 2), Attempt(150, 2), 10, "L")  # a new checkpoint
    assert (saved.next, saved.streak) == ("requeue", 1)


def test_the_sbatch_templates_requeue_through_the_tasks_requeue(tmp_path: Path):
    """slurm/*_array.sbatch trap the stop signal with ``python -m ddpm.cluster requeue`` (requeue_self: within
    slurm.max_restarts, never undoing a scancel), not a ``scontrol requeue`` of their own; outside SLURM it says
    so and exits 1; at the run's max_restarts it declines."""
    for name in ("sample_array.sbatch", "eval_array.sbatch"):
        text = (ROOT / "slurm" / name).read_text()
        assert 'python -u -m ddpm.cluster requeue --run-dir "$RUN_DIR"' in text and "scontrol" not in text, name
    from ddpm.config import dump_config

    dump_config(load_config(TINY_CONFIG, ["slurm.max_restarts=2"]), tmp_path / "config.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run([sys.executable, "-m", "ddpm.cluster", "requeue", "--run-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 1 and "stopped outside SLURM" in out.stdout, out.stdout + out.stderr
    out = subprocess.run([sys.executable, "-m", "ddpm.cluster", "requeue", "--run-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**env, "SLURM_JOB_ID": "99999", "SLURM_RESTART_COUNT": "2"})
    assert out.returncode == 1 and "not requeuing job 99999: it has restarted 2 times" in out.stdout, out.stdout

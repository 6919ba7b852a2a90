"""The local SLURM test cluster works for what the project needs: batch jobs, arrays, requeue, signals,
dependencies, and submitit (including its behaviour without accounting, where ``sacct`` fails)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from slurm_helpers import (
    array_states,
    job_state,
    parse_scontrol_line,
    sbatch,
    show_job,
    wait_for_file,
    wait_for_job,
    wait_for_restart,
)

pytestmark = pytest.mark.slurm


def _common(tmp_path: Path) -> list[str]:
    return [f"--chdir={tmp_path}", f"--output={tmp_path}/slurm-%j.out", "--time=2"]


def test_cluster_fixture(slurm_cluster):
    assert slurm_cluster.partition == "debug"
    assert slurm_cluster.cpus >= 1
    sinfo = subprocess.run(
        ["sinfo", "-h", "-p", slurm_cluster.partition, "-o", "%T %N"], capture_output=True, text=True
    )
    assert sinfo.returncode == 0, sinfo.stderr
    state, node = sinfo.stdout.split()
    assert node == slurm_cluster.node
    assert state in {"idle", "mixed", "allocated", "completing"}


def test_wrap_job_completes(slurm_cluster, tmp_path):
    out = tmp_path / "hi.txt"
    job_id = sbatch(*_common(tmp_path), f"--partition={slurm_cluster.partition}", "--wrap", f"echo hi > {out}")
    assert wait_for_job(job_id, timeout=30) == "COMPLETED"
    assert out.read_text() == "hi\n"
    rec = show_job(job_id)
    assert rec["ExitCode"] == "0:0"
    assert rec["NodeList"] == slurm_cluster.node


def test_job_array(slurm_cluster, tmp_path):
    job_id = sbatch(
        *_common(tmp_path),
        "--array=0-2",
        "--wrap",
        'echo "$SLURM_ARRAY_JOB_ID $SLURM_ARRAY_TASK_ID $SLURM_ARRAY_TASK_COUNT" > task_$SLURM_ARRAY_TASK_ID.txt',
    )
    assert wait_for_job(job_id, timeout=30) == "COMPLETED"
    assert array_states(job_id) == {"0": "COMPLETED", "1": "COMPLETED", "2": "COMPLETED"}
    for task in range(3):
        assert (tmp_path / f"task_{task}.txt").read_text().split() == [job_id, str(task), "3"]
    assert job_state(f"{job_id}_1") == "COMPLETED"


def test_requeue_runs_again(slurm_cluster, tmp_path):
    log = tmp_path / "restarts.log"
    script = tmp_path / "requeue.sh"
    # first run: record the restart count and wait to be requeued; second run: record and finish
    script.write_text(
        "#!/bin/bash\n"
        f'echo "${{SLURM_RESTART_COUNT:-0}}" >> {log}\n'
        '[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] && exit 0\n'
        "for i in $(seq 1 300); do sleep 0.1; done\n"
        "exit 1\n"
    )
    job_id = sbatch(*_common(tmp_path), "--requeue", str(script))
    wait_for_file(log, timeout=30)
    assert job_state(job_id) == "RUNNING"

    subprocess.run(["scontrol", "requeue", job_id], check=True)
    # Slurm holds a requeued job ~120 s (11 s here: Reason=BeginTime); release=True starts it 2 s after the requeue
    t0 = time.monotonic()
    assert wait_for_job(job_id, timeout=30, release=True) == "COMPLETED"
    assert time.monotonic() - t0 < 10, "the requeued job was not released: it waited out its BeginTime"
    assert log.read_text().split() == ["0", "1"]
    assert show_job(job_id)["Restarts"] == "1"


# How `scancel --signal=USR2` reaches a batch job (Slurm 22.05, no job steps unless srun is used):
#   --batch : only the batch shell;   --full : the batch shell and its children;
#   no flag : only job steps (srun), NOT the batch script -- that is what `sbatch --signal=USR2@N` does too,
#             while `sbatch --signal=B:USR2@N` signals the batch shell only.
_SIG_SCRIPT = """#!/bin/bash
trap 'echo shell >> {got}' USR2
{launcher} python3 -u -c '
import signal, sys, time
signal.signal(signal.SIGUSR2, lambda s, f: open(sys.argv[1], "a").write("child\\n"))
open(sys.argv[2], "w").write("ready")
for _ in range(200):
    time.sleep(0.1)
' {got} {ready} &
for i in $(seq 1 200); do sleep 0.1; done
"""


@pytest.mark.parametrize(
    "mode, launcher, expected",
    [
        ("--batch", "", {"shell"}),
        ("--full", "", {"shell", "child"}),
        ("", "srun --quiet", {"child"}),
    ],
    ids=["batch-shell", "full-shell-and-children", "step-via-srun"],
)
def test_usr2_reaches_job(slurm_cluster, tmp_path, mode, launcher, expected):
    got, ready = tmp_path / "got.txt", tmp_path / "ready.txt"
    script = tmp_path / "sig.sh"
    script.write_text(_SIG_SCRIPT.format(got=got, ready=ready, launcher=launcher))
    job_id = sbatch(*_common(tmp_path), str(script))
    try:
        wait_for_file(ready, timeout=30)
        time.sleep(0.3)  # let the shell reach its loop (trap is set before the child starts anyway)
        subprocess.run(["scancel", "--signal=USR2", *([mode] if mode else []), job_id], check=True)
        deadline = time.monotonic() + 10
        while set(got.read_text().split() if got.exists() else []) != expected:
            assert time.monotonic() < deadline, f"got {got.read_text() if got.exists() else 'nothing'}"
            time.sleep(0.1)
        time.sleep(0.3)  # nothing else arrives
        assert set(got.read_text().split()) == expected
        assert job_state(job_id) == "RUNNING"  # USR2 is trapped everywhere: the job keeps running
    finally:
        subprocess.run(["scancel", job_id], check=False)


def test_dependency_chain(slurm_cluster, tmp_path):
    log = tmp_path / "order.log"
    a = sbatch(*_common(tmp_path), "--wrap", f"sleep 1; echo a >> {log}")
    b = sbatch(*_common(tmp_path), f"--dependency=afterok:{a}", "--wrap", f"echo b >> {log}")
    c = sbatch(*_common(tmp_path), f"--dependency=afterok:{b}", "--wrap", f"echo c >> {log}")
    assert job_state(c) == "PENDING"  # Reason is Resources at first, Dependency once the scheduler ran
    assert wait_for_job(c, timeout=30) == "COMPLETED"
    assert [job_state(j) for j in (a, b)] == ["COMPLETED", "COMPLETED"]
    assert log.read_text().split() == ["a", "b", "c"]


def test_dependency_never_satisfied(slurm_cluster, tmp_path):
    a = sbatch(*_common(tmp_path), "--wrap", "exit 3")
    b = sbatch(*_common(tmp_path), f"--dependency=afterok:{a}", "--kill-on-invalid-dep=yes", "--wrap", "true")
    assert wait_for_job(a, timeout=30) == "FAILED"
    assert show_job(a)["ExitCode"] == "3:0"
    assert wait_for_job(b, timeout=30) == "CANCELLED"


# ------------------------------------------------------------------------------------------- submitit
def scontrol_watcher(delay_s: int = 2) -> Any:
    """A submitit info watcher that asks ``scontrol show job -o`` instead of ``sacct``.

    Why: submitit's SlurmInfoWatcher polls ``sacct``, which fails without accounting
    ("Slurm accounting storage is disabled"). submitit then logs "Bypassing sacct error" and
    ``job.state`` stays "UNKNOWN", which submitit counts as *not done*. ``job.result()`` still works for
    jobs that wrote their result pickle (success, or a Python exception -> FailedJobError), but a job
    that dies without one (scancel, time limit, os._exit, OOM kill, node failure) makes
    ``job.wait()``/``job.result()`` hang forever.

    Use per job (``job.watcher = scontrol_watcher()``), or for all jobs of the process
    (``submitit.SlurmJob.watcher = scontrol_watcher()``). Jobs that slurmctld no longer knows
    (purged MinJobAge after the end) are reported as state "PURGED", which counts as done.
    """
    from submitit.slurm.slurm import SlurmInfoWatcher

    class ScontrolInfoWatcher(SlurmInfoWatcher):
        def _make_command(self) -> list[str] | None:
            if not self._registered - self._finished:
                return None
            return ["scontrol", "show", "job", "-o"]  # all jobs in one call

        def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
            if not isinstance(string, str):
                string = string.decode()
            info: dict[str, dict[str, str]] = {}
            for line in string.splitlines():
                if not line.startswith("JobId="):
                    continue
                rec = parse_scontrol_line(line)
                stats = {"JobID": rec["JobId"], "State": rec["JobState"], "NodeList": rec.get("NodeList", "")}
                array_id, tasks = rec.get("ArrayJobId"), rec.get("ArrayTaskId")
                if array_id and tasks:
                    for task in _expand_task_ids(tasks):
                        info[f"{array_id}_{task}"] = stats
                else:
                    info[rec["JobId"]] = stats
            for job_id in self._registered - self._finished:
                if job_id not in info:
                    info[job_id] = {"JobID": job_id, "State": "PURGED", "NodeList": ""}
            return info

    return ScontrolInfoWatcher(delay_s=delay_s)


def _expand_task_ids(spec: str) -> list[int]:
    """``0-3,7,9-11%2`` -> [0, 1, 2, 3, 7, 9, 10, 11]."""
    out: list[int] = []
    for part in spec.split("%")[0].split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


@pytest.fixture
def executor(slurm_cluster, tmp_path):
    submitit = pytest.importorskip("submitit")
    ex = submitit.SlurmExecutor(folder=tmp_path / "submitit" / "%j")
    # time >= 10 min: submitit asks for --signal=USR2@90 and Slurm may send it up to 60 s early, so with a
    # 2-minute limit the scheduled USR2 could land seconds after start and race a test's own interrupt.
    ex.update_parameters(time=10, partition=slurm_cluster.partition, cpus_per_task=1)
    return ex


def test_submitit_result_without_accounting(executor):
    """job.result() works without sacct: submitit returns as soon as the result pickle exists."""

    def double(x):
        return 2 * x

    t0 = time.monotonic()
    job = executor.submit(double, 21)
    assert job.result() == 42
    assert time.monotonic() - t0 < 30
    assert job.state == "UNKNOWN"  # sacct fails -> submitit never learns the real state

    def fail():
        raise ValueError("boom")

    job = executor.submit(fail)
    with pytest.raises(Exception, match="boom"):  # submitit.core.utils.FailedJobError
        job.result()


def test_submitit_array_with_scontrol_watcher(executor):
    def square(x):
        return x * x

    jobs = executor.map_array(square, [1, 2, 3])
    watcher = scontrol_watcher()
    for job in jobs:
        job.watcher = watcher
    assert [j.result() for j in jobs] == [1, 4, 9]
    # result() returns once the pickle exists; Slurm may still show the task RUNNING/COMPLETING
    assert wait_for_job(jobs[0].job_id.split("_")[0], timeout=30) == "COMPLETED"
    assert {j.get_info(mode="force")["State"] for j in jobs} == {"COMPLETED"}


def test_submitit_job_without_result_needs_scontrol_watcher(executor):
    """A job that dies without writing its result pickle: submitit's sacct-based watcher never sees it end
    (state stays UNKNOWN, done() stays False -> job.result() would hang forever). The scontrol watcher
    from slurm_helpers reports the real state, so done() is True and result() raises promptly."""
    import submitit

    def die():
        import os

        os._exit(3)

    job = executor.submit(die)
    assert wait_for_job(job.job_id, timeout=30) == "FAILED"
    # submitit's default watcher: sacct fails on every poll
    assert job.state == "UNKNOWN"
    assert not job.done(force_check=True)

    job.watcher = scontrol_watcher()
    assert job.done(force_check=True)
    assert job.state == "FAILED"
    job._results_timeout_s = 1  # how long result() waits for a late pickle (default 15 s)
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="FAILED"):
        job.result()


def test_submitit_preemption_requeue(executor, tmp_path):
    """USR2 to the srun step (what submitit's --signal=USR2@90 and job._interrupt() do) -> submitit
    checkpoints and requeues via `scontrol requeue` -> (released from BeginTime) the job resumes."""
    import submitit

    marker = tmp_path / "ran.log"

    class Resumable(submitit.helpers.Checkpointable):
        def __call__(self, attempt=0):
            import os
            import time as t

            with open(marker, "a") as f:
                f.write(f"{attempt} {os.environ.get('SLURM_RESTART_COUNT', '0')}\n")
            if attempt:
                return attempt
            for _ in range(300):
                t.sleep(0.1)
            return -1

        def checkpoint(self, attempt=0):
            return submitit.helpers.DelayedSubmission(self, attempt + 1)

    job = executor.submit(Resumable())
    job.watcher = scontrol_watcher()
    wait_for_file(marker, timeout=30)
    time.sleep(1.0)  # submitit installs its signal handlers before calling the function; be safe
    job._interrupt()  # scancel --signal USR2 <id>
    wait_for_restart(job.job_id, 1, timeout=20)  # requeued, not ended
    assert wait_for_job(job.job_id, timeout=30, release=True) == "COMPLETED"
    assert job.result() == 1
    assert marker.read_text().split("\n")[:2] == ["0 0", "1 1"]

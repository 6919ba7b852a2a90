"""``launch.py doctor`` on the local SLURM: a partition with preemption (debug: REQUEUE, GraceTime 30 s) and one
without (nopreempt), each ending with the tiny job's stop path taken end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny_cpu.yaml"


@pytest.mark.parametrize("partition, preemption", [
    ("debug", "PreemptMode=REQUEUE on debug: SIGTERM, then GraceTime=30 s"),
    ("nopreempt", "partition nopreempt is not preempted"),
])
def test_doctor(slurm_cluster, tmp_path, partition, preemption):
    proc = subprocess.run([sys.executable, "launch.py", "doctor", "--config", str(TINY), f"slurm.partition={partition}",
                           f"run.root={tmp_path}", "--timeout", "300"], capture_output=True, text=True, cwd=ROOT,
                          timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    checks = ["requeue", "checkpoint", "preemption", "time limit", "max time", "submitted", "stop signal", "resume",
              "exact resume"] + (["grace time"] if partition == "debug" else [])
    for what in checks:
        assert re.search(rf"^ok +{what} ", out, flags=re.M), f"no ok line for {what}:\n{out}"
    assert preemption in out and "FAIL" not in out
    assert "weights bitwise equal to the uninterrupted job" in out and out.rstrip().endswith("all checks passed")


def test_doctor_names_what_to_change(slurm_cluster, tmp_path):
    """A time-limit signal too short for the reference model's checkpoint is a FAIL line naming the key."""
    proc = subprocess.run([sys.executable, "launch.py", "doctor", "--config", str(ROOT / "configs" / "ddpm_babel.yaml"),
                           "slurm.partition=debug", f"run.root={tmp_path}", "slurm.signal_delay_s=30",
                           "slurm.time_min=2", "data.path=null", "--no-job", "slurm.cpus_per_task=2", "slurm.mem_gb=1",
                           "infrastructure.num_gpus=0"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"^ok +checkpoint +1\.16 GiB", proc.stdout, flags=re.M), proc.stdout
    fails = [ln for ln in proc.stdout.splitlines() if ln.startswith("FAIL")]
    assert fails and all("slurm.signal_delay_s" in ln or "GraceTime" in ln for ln in fails), proc.stdout


def test_doctor_unknown_partition_is_one_line(slurm_cluster, tmp_path):
    proc = subprocess.run([sys.executable, "launch.py", "doctor", "--config", str(TINY), "slurm.partition=nosuch",
                           f"run.root={tmp_path}"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: slurm.partition: partition 'nosuch' does not exist (available: cancel, debug, nopreempt, urgent)"]

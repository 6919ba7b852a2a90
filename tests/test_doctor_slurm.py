"""``launch.py doctor`` on the local SLURM: a partition with preemption (debug: REQUEUE, GraceTime 30 s), ending
with the tiny job's stop path taken end to end, and one without (nopreempt)."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version

import pytest
from helpers import ROOT, TINY_CONFIG

pytestmark = pytest.mark.slurm


def test_doctor(slurm_cluster, tmp_path):
    """A preemptive partition (debug): the node job with the training resources (2 CPU ranks: gloo), the run plan,
    and the tiny job's stop path taken end to end."""
    proc = subprocess.run([sys.executable, "launch.py", "doctor", "--config", str(TINY_CONFIG), "slurm.partition=debug",
                           f"run.root={tmp_path}", "--timeout", "300", "infrastructure.nproc_per_node=2",
                           "slurm.cpus_per_task=2", "training.num_iterations=5000"],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    for what in ["requeue", "checkpoint", "preemption", "time limit", "max time", "submitted", "stop signal",
                 "resume", "exact resume", "grace time", "node job", "torch", "driver", "all-reduce", "run.root",
                 "node scratch", "training speed", "checkpoint save", "wall time", "gpu-hours", "requeues", "disk",
                 "save window"]:
        assert re.search(rf"^ok +{what} ", out, flags=re.M), f"no ok line for {what}:\n{out}"
    assert re.search(r"^note +gpus +the config asks for no GPU \(infrastructure.num_gpus=0\): no GPU was tested$",
                     out, flags=re.M), out
    assert re.search(r"^ok +all-reduce +gloo, 2 ranks, 64 MiB: [\d.]+ ms, bus bandwidth [\d.]+ GB/s$", out, re.M), out
    assert re.search(rf"^ok +run.root +{tmp_path}/\.doctor/\S+: write \d+ MB/s \(fsynced\), read \d+ MB/s$", out,
                     flags=re.M), out
    speed = float(re.search(r"^ok +training speed +([\d.]+) img/s, global batch 8, 2 x cpu", out, re.M).group(1))
    assert re.search(rf"^ok +wall time +.* for 5000 steps of 8 at {speed:.1f} img/s$", out, flags=re.M), out
    assert out.index("run plan:") > out.index("training speed") and f"torch {version('torch')} (" in out
    assert "PreemptMode=REQUEUE on debug: SIGTERM, then GraceTime=30 s" in out and "FAIL" not in out
    assert "weights bitwise equal to the uninterrupted job" in out and out.rstrip().endswith("all checks passed")


def test_doctor_partition_without_preemption(slurm_cluster, tmp_path):
    """nopreempt (PreemptMode=OFF): no grace-time check, the rest passes (the stop path is the same job as on
    debug, so ``--no-job`` here)."""
    proc = subprocess.run([sys.executable, "launch.py", "doctor", "--config", str(TINY_CONFIG),
                           "slurm.partition=nopreempt", f"run.root={tmp_path}", "--no-job"], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    for what in ["requeue", "checkpoint", "preemption", "time limit", "max time"]:
        assert re.search(rf"^ok +{what} ", out, flags=re.M), f"no ok line for {what}:\n{out}"
    assert "partition nopreempt is not preempted" in out and "grace time" not in out and "FAIL" not in out
    assert out.rstrip().endswith("all checks passed")


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
    proc = subprocess.run([sys.executable, "launch.py", "doctor", "--config", str(TINY_CONFIG),
                           "slurm.partition=nosuch", f"run.root={tmp_path}"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: slurm.partition: partition 'nosuch' does not exist (available: cancel, debug, nopreempt, urgent)"]

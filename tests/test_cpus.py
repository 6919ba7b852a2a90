"""The CPU budget (ddpm.cpus): what a process may run, from the allocation it really has.

The policy is checked on given allocations; the reading of the allocation in real processes: an affinity
mask set by ``taskset`` (what SLURM's task/affinity does), and the local executor dividing this machine
between the sampling tasks it runs at once (``launch.py --cluster local``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT, TINY_CONFIG, run_main

from ddpm.cpus import SHARE_ENV, allocated_cpus, apply_cpu_budget, cpu_budget, default_workers


def test_allocation_order() -> None:
    assert allocated_cpus({}, affinity=8) == (8, "affinity mask")
    assert allocated_cpus({"SLURM_CPUS_PER_TASK": "2"}, affinity=8) == (2, "SLURM_CPUS_PER_TASK=2")
    assert allocated_cpus({"SLURM_CPUS_PER_TASK": "16"}, affinity=4)[0] == 4  # the mask binds harder
    assert allocated_cpus({"LOCAL_WORLD_SIZE": "2"}, affinity=8)[0] == 4  # torchrun ranks share the node
    cpus, source = allocated_cpus({SHARE_ENV: "3", "SLURM_CPUS_PER_TASK": "8"}, affinity=16)
    assert (cpus, source) == (2, "SLURM_CPUS_PER_TASK=8 / 3 local tasks at once")
    assert allocated_cpus({SHARE_ENV: "5"}, affinity=2)[0] == 1  # never zero
    assert allocated_cpus({"SLURM_CPUS_PER_TASK": "x"}, affinity=3)[0] == 3  # junk is ignored


@pytest.mark.parametrize(("cpus", "device", "workers", "threads"), [
    (1, "cpu", 0, 1), (2, "cpu", 1, 2), (8, "cpu", 1, 8),  # CPU training: the network keeps every CPU
    (2, "cuda", 1, 1), (8, "cuda", 6, 2), (32, "cuda", 8, 24),  # GPU: workers decode, the rest is torch's
])
def test_training_budget(cpus: int, device: str, workers: int, threads: int) -> None:
    budget = cpu_budget("train", device, env={}, affinity=cpus)
    assert (budget.workers, budget.threads, budget.interop_threads) == (workers, threads, 1)
    assert default_workers(cpus, device) == workers
    assert cpu_budget("train", device, workers=3, env={}, affinity=cpus).workers == 3  # data.num_workers wins
    packed = cpu_budget("train", device, env={}, affinity=cpus, decodes=False)  # nothing to decode
    assert packed.workers == (workers if device == "cuda" else 0) and packed.threads == threads


def test_exported_omp_num_threads_caps_and_is_never_raised() -> None:
    """slurm.setup's `export OMP_NUM_THREADS=1` (bitwise-reproducible reductions) keeps one thread."""
    one = cpu_budget("train", "cpu", workers=1, env={"OMP_NUM_THREADS": "1", "SLURM_CPUS_PER_TASK": "2"}, affinity=8)
    assert (one.threads, one.workers, one.cpus) == (1, 1, 2)
    assert str(one) == "cpus 2 (SLURM_CPUS_PER_TASK=2, OMP_NUM_THREADS=1): torch 1 thread, 1 loader worker"
    assert cpu_budget("sample", env={"OMP_NUM_THREADS": "16"}, affinity=4).threads == 4


@pytest.mark.parametrize("stage", ["sample", "assemble", "fid", "bench"])
def test_other_stages_use_every_cpu_and_no_workers(stage: str) -> None:
    budget = cpu_budget(stage, env={"SLURM_CPUS_PER_TASK": "3"}, affinity=8)
    assert (budget.threads, budget.workers, budget.cpus) == (3, 0, 3)
    assert str(budget) == "cpus 3 (SLURM_CPUS_PER_TASK=3): torch 3 threads"
    with pytest.raises(ValueError, match="unknown stage"):
        cpu_budget("eval")


def test_apply_sets_torch_threads() -> None:
    import torch

    before = torch.get_num_threads()
    try:
        apply_cpu_budget(cpu_budget("sample", env={"SLURM_CPUS_PER_TASK": "1"}))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(os.cpu_count() is not None and os.cpu_count() < 2, reason="needs 2 CPUs to narrow the mask")
def test_affinity_mask_of_a_real_process() -> None:
    """A process bound to one CPU (taskset, as SLURM binds a task) gets one torch thread, whatever the machine."""
    code = ("from ddpm.cpus import apply_cpu_budget, cpu_budget; import torch; "
            "b = apply_cpu_budget(cpu_budget('train', 'cpu')); print(b.cpus, b.workers, torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_CPUS_PER_TASK", SHARE_ENV, "LOCAL_WORLD_SIZE")}
    out = subprocess.run([shutil.which("taskset") or "taskset", "-c", "0", sys.executable, "-c", code],
                         capture_output=True, text=True, env=env, cwd=ROOT, check=True).stdout.split()
    assert out == ["1", "0", "1"]


def test_local_executor_divides_the_machine(images, tmp_path, monkeypatch, capsys) -> None:
    """``launch.py --cluster local`` runs the 3 sampling tasks at once: each gets this machine's CPUs / 3.
    launch.py runs in this process; its jobs are submitit's processes, which echo their logs through it."""
    import launch

    cpus = len(os.sched_getaffinity(0))
    for name in ("SLURM_CPUS_PER_TASK", SHARE_ENV, "OMP_NUM_THREADS"):  # what the jobs inherit
        monkeypatch.delenv(name, raising=False)
    proc = run_main(launch.main, ["--config", TINY_CONFIG, "--cluster", "local", f"data.path={images}",
                                  f"run.root={tmp_path}", "run.name=local", "training.num_iterations=2"], capsys)
    assert proc.code == 0, proc.out[-2000:] + proc.err[-2000:]
    shards = re.findall(r"shard (\d): cpus (\d+) \(affinity mask / 3 local tasks at once\): torch (\d+) thread",
                        proc.out)
    assert sorted(s[0] for s in shards) == ["0", "1", "2"], proc.out[-3000:]
    assert all(int(c) == int(t) == max(1, cpus // 3) for _, c, t in shards)
    train = re.search(r"each rank: cpus (\d+) \(affinity mask\): torch (\d+) thread", proc.out)
    assert train and int(train.group(1)) == cpus, proc.out[-3000:]
    assert (tmp_path / "local" / "samples" / "grid.png").is_file()
    assert sorted(p.name for p in (tmp_path / "local" / "logs").iterdir() if not p.name.isdigit()) == []  # no "%j"

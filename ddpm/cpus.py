"""One CPU budget per process: torch threads and loader workers from the CPUs the process really has.

    budget = cpu_budget("train", device)      # reads the affinity mask, SLURM_CPUS_PER_TASK, LOCAL_WORLD_SIZE
    apply_cpu_budget(budget)                  # torch.set_num_threads / set_num_interop_threads
    print(budget)                             # cpus 2 (SLURM_CPUS_PER_TASK=2): torch 2 threads, 1 loader worker

Every stage calls it (train, sample shard, assemble, FID, bench), so a process never runs more busy threads
than it has CPUs. Over-subscription is what made two sampling shards of two threads each run 3-5x slower on
two cores: an OpenMP parallel region waits for its slowest thread, and a thread that lost its core to another
process stalls the whole region.

The allocation is, in order: the affinity mask (what the kernel lets this process run on; SLURM's
task/affinity and cgroup plugins set it), narrowed to ``SLURM_CPUS_PER_TASK`` where the mask is wider (a
cluster without CPU binding), divided between the ranks torchrun starts on the node (``LOCAL_WORLD_SIZE``)
and between the local-executor tasks that run at once (``DDPM_CPU_SHARE``, set by ``launch.py``). An
``OMP_NUM_THREADS`` the user exported (e.g. in ``slurm.setup``) caps the torch threads: it is never raised.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # not imported here: the assembly job computes its budget without loading torch
    import torch

SHARE_ENV = "DDPM_CPU_SHARE"  # local-executor tasks running at once on this machine (launch.py sets it per task)
# the kinds of work a budget is made for (not the pipeline stages of launch.py: eval tasks budget as "sample")
WORKLOADS = ("train", "sample", "assemble", "fid", "bench")


@dataclasses.dataclass(frozen=True)
class CpuBudget:
    """What one process may run: ``threads`` torch intra-op threads and ``workers`` loader processes."""

    cpus: int
    """CPUs allocated to this process."""
    source: str
    """Where ``cpus`` came from, for the log line."""
    threads: int
    """torch intra-op threads of the process (``torch.set_num_threads``)."""
    interop_threads: int
    """torch inter-op threads (``torch.set_num_interop_threads``)."""
    workers: int
    """DataLoader worker processes (training only)."""

    def __str__(self) -> str:
        loader = f", {self.workers} loader worker{'s' if self.workers != 1 else ''}" if self.workers else ""
        return (f"cpus {self.cpus} ({self.source}): torch {self.threads} thread{'s' if self.threads != 1 else ''}"
                f"{loader}")


def _positive_int(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key, "").strip()
    return int(value) if value.isdigit() and int(value) >= 1 else None


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (``os.cpu_count()`` where the platform has no mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def allocated_cpus(env: Mapping[str, str] | None = None, affinity: int | None = None) -> tuple[int, str]:
    """(CPUs this process may use, where that came from): see the module docstring for the order."""
    env = os.environ if env is None else env
    cpus = affinity_cpus() if affinity is None else affinity
    source = "affinity mask"
    slurm = _positive_int(env, "SLURM_CPUS_PER_TASK")
    if slurm is not None and slurm < cpus:
        cpus, source = slurm, f"SLURM_CPUS_PER_TASK={slurm}"
    for key, what in (("LOCAL_WORLD_SIZE", "ranks on this node"), (SHARE_ENV, "local tasks at once")):
        share = _positive_int(env, key)
        if share is not None and share > 1:
            cpus, source = max(1, cpus // share), f"{source} / {share} {what}"
    return cpus, source


def _is_cuda(device: torch.device | str | None) -> bool:
    """``cuda``, ``cuda:1`` or a CUDA torch.device (which has a ``type``)."""
    return device is not None and getattr(device, "type", str(device).split(":")[0]) == "cuda"


def default_workers(cpus: int, device: torch.device | str | None, decodes: bool = True) -> int:
    """Loader workers when ``data.num_workers`` is null.

    On a GPU the network runs elsewhere, so all but two CPUs decode images (at most 8 workers); on the CPU the
    network is the bottleneck and one worker, which decodes while the network computes, is enough. Where
    nothing is decoded (``decodes=False``: a packed array, read at over 10^6 images/s) a worker on the CPU
    only adds its hand-over cost, a few ms a batch (``python -m tools.throughput``), so there is none.
    """
    if cpus < 2:
        return 0
    if _is_cuda(device):
        return min(8, max(1, cpus - 2))
    return 1 if decodes else 0


def cpu_budget(stage: str, device: torch.device | str | None = None, workers: int | None = None,
               env: Mapping[str, str] | None = None, affinity: int | None = None,
               decodes: bool = True) -> CpuBudget:
    """The budget of one process of ``stage`` (train | sample | assemble | fid | bench) on ``device``.

    ``workers`` is ``data.num_workers`` (None = :func:`default_workers`, ``decodes`` = the source decodes
    images, i.e. is not ``packed``; training only). On the CPU the
    network keeps every CPU (the worker runs in the gaps, one thread); on a GPU the main process keeps what the
    workers leave (at least one thread).
    """
    if stage not in WORKLOADS:
        raise ValueError(f"unknown stage {stage!r} (expected one of {', '.join(WORKLOADS)})")
    env = os.environ if env is None else env
    cpus, source = allocated_cpus(env, affinity)
    omp = _positive_int(env, "OMP_NUM_THREADS")  # set by the user (slurm.setup): a cap, never raised
    cap = min(cpus, omp) if omp is not None else cpus
    if cap < cpus:
        source = f"{source}, OMP_NUM_THREADS={omp}"
    if stage != "train":
        return CpuBudget(cpus, source, threads=cap, interop_threads=1, workers=0)
    n_workers = default_workers(cpus, device, decodes) if workers is None else workers
    cuda = _is_cuda(device)
    threads = min(cap, max(1, cpus - n_workers)) if cuda else cap
    return CpuBudget(cpus, source, threads=threads, interop_threads=1, workers=n_workers)


def apply_cpu_budget(budget: CpuBudget) -> CpuBudget:
    """Set this process's torch threads; returns ``budget``. The inter-op pool can be sized only before its
    first use; later calls leave it as it is. OMP_NUM_THREADS is left as the user set it (a child process
    computes its own budget). A process that has not imported torch (the assembly job) has nothing to size."""
    torch = sys.modules.get("torch")
    if torch is None:
        return budget
    torch.set_num_threads(budget.threads)
    try:
        torch.set_num_interop_threads(budget.interop_threads)
    except RuntimeError:  # already started (a second stage in the same process)
        pass
    return budget


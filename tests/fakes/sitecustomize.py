"""Test-only faults and fake devices for processes the tests start (torchrun ranks, SLURM jobs), never imported by
the product: a test puts this folder first on ``PYTHONPATH`` and describes the fake in ``DDPM_FAKE`` (JSON).

Python imports ``sitecustomize`` at start-up; this one installs an import hook that patches a module right after
it loads, so the product runs unchanged against the device's or the run's faked answers:

    {"gpu": {"name": "Tesla V100-SXM2-32GB", "sm": [7, 0], "archs": ["sm_75", ...], "count": 1,
             "memory_gib": 32, "nodes": ["node1"]},   # torch.cuda's answers (only on these nodes, when given)
     "hang_process_group": true,  # init_process_group waits, as NCCL does for a rank that never comes
     "oom_after_steps": 4,        # the training loss of the 5th step of this process raises torch.OutOfMemoryError
     "grid_hang": true,           # the training grid never returns (a hang at the same step every attempt)
     "slow_forward_s": 0.5}       # every UNet forward without grad (sampling) takes that much longer

A fake card cannot run kernels: a test that fakes one stops the process before any (the checks under test), or
hangs it where NCCL would (``hang_process_group``).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import socket
import sys
import time
from types import ModuleType, SimpleNamespace
from typing import Any

FAKE: dict[str, Any] = json.loads(os.environ.get("DDPM_FAKE") or "{}")


def _on_this_node(spec: dict[str, Any]) -> bool:
    nodes = spec.get("nodes")
    return not nodes or os.environ.get("SLURMD_NODENAME", socket.gethostname()) in nodes


def _patch_torch(torch: ModuleType) -> None:
    gpu = FAKE.get("gpu")
    if gpu and _on_this_node(gpu):
        major, minor = gpu["sm"]
        props = SimpleNamespace(name=gpu["name"], major=major, minor=minor,
                                total_memory=int(gpu.get("memory_gib", 16) * 2**30), multi_processor_count=80)
        cuda = torch.cuda
        cuda.is_available = lambda: True
        cuda.device_count = lambda: int(gpu.get("count", 1))
        cuda.get_device_capability = lambda device=None: (major, minor)
        cuda.get_arch_list = lambda: list(gpu["archs"])
        cuda.get_device_name = lambda device=None: gpu["name"]
        cuda.get_device_properties = lambda device=None: props
        cuda.is_bf16_supported = lambda including_emulation=True: major >= 8 or including_emulation
        cuda.set_device = lambda device: None
    if FAKE.get("hang_process_group") and (not gpu or _on_this_node(gpu)):
        def wait_forever(*_args: Any, **_kwargs: Any) -> None:
            print("fake: init_process_group waits for a rank that never comes", flush=True)
            time.sleep(3600)

        torch.distributed.init_process_group = wait_forever


def _patch_diffusion(diffusion: ModuleType) -> None:
    import torch

    if (after := FAKE.get("oom_after_steps")) is not None:  # the training loss of step ``after`` + 1 of this process
        compute_loss, calls = diffusion.DDPM.compute_loss, [0]

        def compute_loss_or_oom(self: Any, *args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] > after:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake, from the test)")
            return compute_loss(self, *args, **kwargs)

        diffusion.DDPM.compute_loss = compute_loss_or_oom


def _patch_grid(grid: ModuleType) -> None:
    if FAKE.get("grid_hang"):
        def hang(*_args: Any, **_kwargs: Any) -> None:
            print("fake: the training grid hangs", flush=True)
            time.sleep(3600)

        grid.draw_grid = hang


def _patch_unet(unet: ModuleType) -> None:
    import torch

    if (delay := FAKE.get("slow_forward_s")) is not None:
        forward = unet.UNet.forward

        def slow_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                time.sleep(float(delay))
            return forward(self, *args, **kwargs)

        unet.UNet.forward = slow_forward


# modules the product imports by name (``python -m ddpm.train`` runs the trainer as __main__: patch what it imports)
PATCHES = {"torch": _patch_torch, "ddpm.diffusion": _patch_diffusion, "ddpm.grid": _patch_grid,
           "ddpm.unet": _patch_unet}


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, patch: Any):
        self.inner, self.patch = inner, patch

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        self.patch(module)

    def __getattr__(self, name: str) -> Any:  # get_code, is_package, ...: the inner loader's
        return getattr(self.inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds a patched module as the other finders do, then patches it once it has run."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, PATCHES[name])
                return spec
        return None


if FAKE:
    sys.meta_path.insert(0, _Finder())

"""The arithmetic a process runs in: autocast dtype, TF32, determinism and memory layout, chosen from the config
and the device, in one place for every entry point that runs a network.

    dtype = amp_dtype(cfg.infrastructure, device)   # infrastructure.precision: bf16, fp16 (+ GradScaler) or None
    dtype = autocast_dtype(s.precision, device, "sampling.precision")  # the same choice for a sampler
    configure_backends(cfg.infrastructure, cfg.training, device)  # TF32, cuDNN benchmark / determinism
    set_fp32_precision(tf32)                        # sampling and eval: TF32 (or full fp32) matmuls and convs
    with full_fp32(): features = inception(x)       # FID: Inception always in full fp32
    fmt = memory_format(cfg.infrastructure, device) # channels_last or contiguous (null: by device)

TF32 uses torch's current API only (``torch.backends.cuda.matmul.fp32_precision``,
``torch.backends.cudnn.conv.fp32_precision``: "tf32" or "ieee"); torch refuses to read flags that were set
through both it and the legacy ``allow_tf32`` flags, so nothing here touches those.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ddpm.config import InfrastructureConfig, Precision, TrainingConfig
from ddpm.envcheck import SetupError

# what GradScaler.state_dict() holds when enabled (a disabled scaler's state is {})
_SCALER_KEYS = frozenset({"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"})


def autocast_dtype(precision: Precision, device: torch.device | str, key: str) -> torch.dtype | None:
    """The autocast dtype of the choice ``precision`` (the config key ``key``) on ``device``: None for fp32,
    bf16 (CUDA and CPU), fp16 (CUDA only). Never a silent fallback: fp16 off CUDA, and bf16 on a card without
    native bf16 (V100, T4: ``is_bf16_supported()``'s default counts emulated bf16, which is slow there), raise
    :class:`SetupError` with one line naming the device, what was asked and the fix."""
    device = torch.device(device)
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise SetupError(f"{key}=fp16: fp16 autocast runs on CUDA only, this process runs on {device.type} "
                             f"(set {key}=bf16 or fp32)")
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        major, minor = torch.cuda.get_device_capability(device)
        raise SetupError(f"{key}=bf16: the {torch.cuda.get_device_name(device)} (sm{major}{minor}) has no native bf16 "
                         f"(emulated, slow); set {key}=fp16 (autocast with a grad scaler) or fp32")
    return torch.bfloat16


def amp_dtype(infra: InfrastructureConfig, device: torch.device) -> torch.dtype | None:
    """Training's autocast dtype, ``infrastructure.precision`` (:func:`autocast_dtype`): torch.bfloat16,
    torch.float16 (the trainer adds a grad scaler) or None (fp32)."""
    return autocast_dtype(infra.precision, device, "infrastructure.precision")


def autocast(amp: torch.dtype | None, device: torch.device) -> torch.autocast:
    """``torch.autocast`` to ``amp`` on ``device``; disabled (fp32) when ``amp`` is None."""
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)


def describe_precision(amp: torch.dtype | None, device: torch.device) -> str:
    """One phrase for the start-up line: ``bf16 autocast (sm90)``, ``fp16 autocast + grad scaler (sm75)`` or
    ``fp32``."""
    if amp is None:
        return "fp32"
    text = "bf16 autocast" if amp == torch.bfloat16 else "fp16 autocast + grad scaler"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        text += f" (sm{major}{minor})"
    return text


def restore_scaler(scaler: torch.amp.GradScaler, saved: dict[str, Any], device_type: str,
                   say: Callable[[str], None]) -> torch.amp.GradScaler:
    """The grad scaler to continue with from a checkpoint's scaler state ``saved``: a run resumes across fp16
    (scaler on) and bf16/fp32 (scaler off, state ``{}``) in either direction, with one line when they differ.

    fp16 from a bf16/fp32 (or otherwise incomplete) state: a fresh scaler; bf16/fp32 from an fp16 state: the
    disabled ``scaler`` (the state is not needed); otherwise ``scaler`` with ``saved`` loaded.
    """
    if scaler.is_enabled() and not _SCALER_KEYS <= saved.keys():
        say("checkpoint has no fp16 grad-scaler state (written under bf16 or fp32): starting a fresh grad scaler")
        return torch.amp.GradScaler(device_type, enabled=True)
    if not scaler.is_enabled() and saved:
        say("checkpoint has fp16 grad-scaler state: not needed, this run uses bf16 or fp32 (no grad scaler)")
        return scaler
    scaler.load_state_dict(saved)
    return scaler


def set_fp32_precision(tf32: bool) -> None:
    """fp32 matmuls (cuBLAS) and convolutions (cuDNN) in TF32 (``tf32``) or full IEEE fp32; needs no GPU."""
    mode = "tf32" if tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """Full IEEE fp32 matmuls and convolutions inside (FID's Inception: the numbers papers cite), then the flags
    as they were."""
    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    set_fp32_precision(False)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


def configure_backends(infra: InfrastructureConfig, training: TrainingConfig, device: torch.device) -> None:
    """Training's process-wide flags: TF32 from ``infrastructure.tf32``; with ``training.deterministic``
    deterministic kernels only (cuDNN deterministic, no benchmark, ``torch.use_deterministic_algorithms``; an op
    without a deterministic kernel raises), else cuDNN benchmark on CUDA (the shapes are fixed)."""
    set_fp32_precision(infra.tf32)
    if training.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS requires
    torch.backends.cudnn.deterministic = training.deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not training.deterministic
    torch.use_deterministic_algorithms(training.deterministic, warn_only=False)


def channels_last(infra: InfrastructureConfig, device: torch.device) -> bool:
    """``infrastructure.channels_last``, or when null: on for CPU (where it was measured), off for CUDA."""
    return infra.channels_last if infra.channels_last is not None else device.type == "cpu"


def memory_format(infra: InfrastructureConfig, device: torch.device) -> torch.memory_format:
    """The activations' layout: ``torch.channels_last`` or ``torch.contiguous_format`` (:func:`channels_last`)."""
    return torch.channels_last if channels_last(infra, device) else torch.contiguous_format

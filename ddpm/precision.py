"""The arithmetic a process runs in: autocast dtype, TF32, determinism and memory layout, chosen from the config
and the device, in one place for every entry point that runs a network.

    dtype = amp_dtype(cfg.infrastructure, device)   # infrastructure.precision: bf16, fp16 (+ GradScaler) or None
    dtype = autocast_dtype(s.precision, device, "sampling.precision")  # the same choice for a sampler
    configure_backends(cfg.infrastructure, cfg.training, device)  # TF32, cuDNN benchmark / determinism
    set_fp32_precision(tf32)                        # sampling and eval: TF32 (or full fp32) matmuls and convs
    with full_fp32(): features = inception(x)       # FID: Inception always in full fp32
    fmt = memory_format(cfg.infrastructure, device) # channels_last or contiguous (null: by device)

TF32 is set through torch's legacy setters (``torch.backends.cuda.matmul.allow_tf32``,
``torch.backends.cudnn.allow_tf32``): they are the ones that write both of torch's views, the legacy flags and
``torch.get_float32_matmul_precision()`` as well as the per-backend ``fp32_precision`` strings, so every reader
agrees and none raises. The per-backend setters write only their own view; a later legacy read (Inductor's on
torch 2.10-2.12, pytorch/pytorch#166387, and its autotune cache's on 2.14) then raises "mix of the legacy and new
APIs" at the first compile. ``torch.set_float32_matmul_precision("high")`` is not used: it also sets oneDNN's CPU
matmuls to TF32, which changes CPU arithmetic where oneDNN has a TF32 path (x86 CPUs with AMX-FP16).
:func:`fp32_views` reads every view (tests, a GPU node's check).
"""

from __future__ import annotations

import contextlib
import os
import warnings
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
    """fp32 matmuls (cuBLAS) and convolutions (cuDNN) in TF32 (``tf32``) or full IEEE fp32; needs no GPU.

    Afterwards both of torch's views agree and can be read without raising: ``torch.backends.cuda.matmul.allow_tf32``,
    ``torch.backends.cudnn.allow_tf32`` and ``torch.get_float32_matmul_precision()`` ("high" or "highest"), and
    ``torch.backends.cuda.matmul.fp32_precision`` / ``torch.backends.cudnn.conv.fp32_precision`` ("tf32", or
    "ieee" / "none": cuDNN's off state inherits the unset defaults, which are not TF32). oneDNN (CPU) is left as
    it is."""
    _set_tf32(tf32, tf32)


def _set_tf32(matmul: bool, conv: bool) -> None:
    """cuBLAS matmuls (``matmul``) and cuDNN convolutions (``conv``) in TF32 or not, through the legacy setters,
    which write the legacy and the per-backend views together (torch 2.9 warns once that they will be
    deprecated; that warning is silenced here: only these setters keep both views true)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Please use the new API settings to control TF32")
        torch.backends.cuda.matmul.allow_tf32 = matmul  # float32 matmul precision high/highest + cuda matmul tf32/ieee
        torch.backends.cudnn.allow_tf32 = conv  # cuDNN conv and rnn: tf32/none + the legacy cuDNN flag


def tf32_in_effect() -> tuple[bool, bool]:
    """Whether fp32 (cuBLAS matmuls, cuDNN convolutions) run in TF32 now, read through the per-backend getters,
    which resolve "none" through their parents and never raise, whichever API set the flags."""
    return (torch.backends.cuda.matmul.fp32_precision == "tf32",
            torch.backends.cudnn.conv.fp32_precision == "tf32")


# every reader of the TF32 state: torch's legacy ones (which Inductor and user code call), then the per-backend ones
_VIEWS: dict[str, Callable[[], object]] = {
    "matmul.allow_tf32": lambda: torch.backends.cuda.matmul.allow_tf32,
    "cudnn.allow_tf32": lambda: torch.backends.cudnn.allow_tf32,
    "get_float32_matmul_precision()": torch.get_float32_matmul_precision,
    "matmul.fp32_precision": lambda: torch.backends.cuda.matmul.fp32_precision,
    "cudnn.conv.fp32_precision": lambda: torch.backends.cudnn.conv.fp32_precision,
}


def fp32_views() -> dict[str, object]:
    """What each of torch's TF32 readers answers now, by name; a reader that raises (a mix of the legacy and the
    per-backend APIs) answers ``"raised: "`` and torch's message. For tests and a GPU node's check."""
    views: dict[str, object] = {}
    for name, read in _VIEWS.items():
        try:
            views[name] = read()
        except RuntimeError as err:
            views[name] = f"raised: {err}"
    return views


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """Full IEEE fp32 matmuls and convolutions inside (FID's Inception: the numbers papers cite), then TF32 as it
    was (:func:`tf32_in_effect`), set back the way :func:`set_fp32_precision` sets it: both views agree after."""
    saved = tf32_in_effect()
    set_fp32_precision(False)
    try:
        yield
    finally:
        _set_tf32(*saved)


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

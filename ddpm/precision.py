"""The arithmetic a process runs in: the autocast dtype of training, chosen from the device.

    dtype = amp_dtype(cfg.infrastructure, device)   # torch.bfloat16, torch.float16 (with a GradScaler) or None
"""

from __future__ import annotations

import torch

from ddpm.config import InfrastructureConfig


def amp_dtype(infra: InfrastructureConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 on CUDA (fp16, with a grad scaler, where bf16 is missing); on CPU bf16 only
    with ``infrastructure.mixed_precision_on_cpu``; None = fp32."""
    if not infra.mixed_precision:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if infra.mixed_precision_on_cpu else None

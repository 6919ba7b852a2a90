"""The optimizer: AdamW as the trainer and the benchmarks build it, and a step skipped on the device.

    opt = build_optimizer(model.parameters(), cfg.training, cfg.infrastructure)
    step_unless(opt, bad)          # bad: 0-dim tensor, 1.0 = gradients not finite (no host sync when fused)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ddpm.config import InfrastructureConfig, TrainingConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], tc: TrainingConfig,
                    infra: InfrastructureConfig) -> torch.optim.AdamW:
    """AdamW of ``training``, fused when ``infrastructure.fused_adam`` (CUDA, CPU); the trainer's and the bench's."""
    return torch.optim.AdamW(params, lr=tc.learning_rate, betas=tuple(tc.betas), weight_decay=tc.weight_decay,
                             fused=infra.fused_adam or None)


def step_unless(optimizer: torch.optim.Optimizer, bad: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``bad`` (0-dim, 1.0 = skip): on the device for a fused optimizer (its
    ``found_inf``, the GradScaler's protocol: parameters, moments and step counts untouched); else on the host."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = bad
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bad.item():
        optimizer.step()

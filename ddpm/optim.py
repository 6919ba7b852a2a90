"""The optimizer: AdamW as the trainer and the benchmarks build it, and a step skipped on the device.

    opt = build_optimizer(model.parameters(), cfg.training, cfg.infrastructure)
    opt.load_state_dict(saved); follow_fused_setting(opt)   # a resume may switch infrastructure.fused_adam
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


def follow_fused_setting(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict``: every param group takes this run's ``fused``/``foreach`` (``optimizer.defaults``),
    not the saved run's, and each ``step`` count moves where that implementation keeps it (fused: a float32 tensor
    on the parameter's device; else the saved tensor on the CPU). torch restores the groups' flags from the
    checkpoint, so a run saved unfused and resumed fused would hand the fused ``found_inf`` to the unfused step
    (an assertion on every step), and the reverse would skip nothing on the device."""
    fused = bool(optimizer.defaults.get("fused"))
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = optimizer.defaults.get("fused"), optimizer.defaults.get("foreach")
        on_device = fused or group.get("capturable", False)
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and torch.is_tensor(state.get("step")):
                device = p.device if on_device else torch.device("cpu")
                state["step"] = state["step"].to(device=device, dtype=torch.float32)


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

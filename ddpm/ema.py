"""Exponential moving average of a model's weights (Ho et al. 2020 Appendix B: decay 0.9999).

    ema = EMA(model, decay=0.9999, start_step=5000)
    ema.update(model, step)          # after every optimizer step
    ema.copy_to(sampling_model)      # evaluate / sample with the averaged weights

The shadow is a float32 copy of every parameter AND floating-point buffer, keyed
like ``unwrap_model(model).state_dict()`` (no ``module.`` / ``_orig_mod.``
prefixes), on the model's device. Non-floating buffers (counters) are copied,
never averaged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

_PREFIXES = ("module.", "_orig_mod.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch._dynamo OptimizedModule
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def strip_prefixes(key: str) -> str:
    """``"module._orig_mod.conv.weight"`` -> ``"conv.weight"`` (keys saved from wrapped modules)."""
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


class EMA:
    """shadow <- decay * shadow + (1 - decay) * weights from ``start_step`` on; a plain copy before it."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, start_step: int = 0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay={decay!r}: expected a float in [0, 1)")
        if start_step < 0:
            raise ValueError(f"start_step={start_step!r}: expected an integer >= 0")
        self.decay = float(decay)
        self.start_step = int(start_step)
        self._cache: tuple[nn.Module, tuple[list[torch.Tensor], list[torch.Tensor], list[str]]] | None = None
        self.shadow: dict[str, torch.Tensor] = {
            name: (t.detach().float() if t.is_floating_point() else t.detach()).clone()
            for name, t in unwrap_model(model).state_dict(keep_vars=True).items()
        }

    def _split(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
        """(float shadows, matching float32 model tensors, names of non-float tensors); cached per model when every
        weight is its parameter itself (float32: the optimizer updates them in place), rebuilt otherwise."""
        if self._cache is not None and self._cache[0] is model:
            return self._cache[1]
        current = unwrap_model(model).state_dict(keep_vars=True)
        if current.keys() != self.shadow.keys():
            missing = sorted(set(self.shadow) ^ set(current))[:5]
            raise ValueError(f"EMA: model keys differ from the shadow's (e.g. {missing})")
        shadows, weights, others, aliased = [], [], [], True
        for name, s in self.shadow.items():
            if s.is_floating_point():
                shadows.append(s)
                weights.append(current[name].detach().to(s.dtype))  # no copy for float32 weights
                aliased &= weights[-1].data_ptr() == current[name].data_ptr()
            else:
                others.append(name)
        self._cache = (model, (shadows, weights, others)) if aliased else None
        return shadows, weights, others

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, apply: torch.Tensor | None = None) -> None:
        """Fold the model's weights after optimizer step ``step`` into the shadow.

        ``apply``: a 0-dim tensor, 1.0 = fold in, 0.0 = leave the shadow as it is (a skipped step), decided on the
        device without a host sync.
        """
        shadows, weights, others = self._split(model)
        if step < self.start_step:  # a skipped step left the weights as they were: copying them changes nothing
            torch._foreach_copy_(shadows, weights)
        elif apply is None:
            # decay * s + (1 - decay) * w == s + (1 - decay) * (w - s): one fused lerp per tensor group.
            torch._foreach_lerp_(shadows, weights, 1.0 - self.decay)
        else:  # the same, with the weight (1 - decay) * apply kept on the device (a tensor Scalar would sync)
            diffs = torch._foreach_sub(weights, shadows)
            torch._foreach_mul_(diffs, apply * (1.0 - self.decay))
            torch._foreach_add_(shadows, diffs)
        if others:
            current = unwrap_model(model).state_dict()
            for name in others:
                self.shadow[name].copy_(current[name])

    def state_dict(self) -> dict[str, Any]:
        """{"decay", "start_step", "shadow": {name: tensor}} (the shadow tensors themselves, not copies)."""
        return {"decay": self.decay, "start_step": self.start_step, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (keys saved with wrapper prefixes are accepted)."""
        shadow = {strip_prefixes(k): v for k, v in state["shadow"].items()}
        if shadow.keys() != self.shadow.keys():
            diff = sorted(set(shadow) ^ set(self.shadow))[:5]
            raise ValueError(f"EMA state does not match the model: differing keys {diff}")
        self.decay = float(state["decay"])
        self.start_step = int(state["start_step"])
        with torch.no_grad():
            for name, s in self.shadow.items():
                s.copy_(shadow[name])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the shadow into ``model`` (wrappers unwrapped, each tensor cast to the model's dtype)."""
        unwrap_model(model).load_state_dict(self.shadow, strict=True)

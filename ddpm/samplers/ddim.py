"""``ddim``: DDIM, Song et al. 2021 eq. 12 with sigma_t(eta) of eq. 16 (0: deterministic; 1: the ancestral variance).

Its last step goes to abar = 1 (the x0 prediction), as diffusers' ``DDIMScheduler(set_alpha_to_one=True)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ddpm.samplers.base import Sampler, register

if TYPE_CHECKING:
    import torch


@register
class DDIM(Sampler):
    """Eq. 12 from abar_{t_i} to abar_{t_{i-1}}; noise at every step but the last when eta > 0."""

    name = "ddim"
    uses_eta = True

    def noise_at(self, i: int) -> bool:
        return self.eta > 0 and i > 0

    def step(self, i: int, x: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        ac_all = self.schedule.alphas_cumprod  # float64 [T], CPU: 0-dim values broadcast on any device
        ac = ac_all[int(self.timesteps[i])]
        ac_prev = ac_all[int(self.timesteps[i - 1])] if i > 0 else ac.new_ones(())
        x0 = ((1.0 / ac).sqrt().to(x.dtype)) * x - ((1.0 / ac - 1.0).sqrt().to(x.dtype)) * eps
        if self.clip_denoised:  # re-derive eps from the clipped x0 (improved-diffusion, diffusers DDIM)
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x - ac.sqrt().to(x.dtype) * x0) / (1.0 - ac).sqrt().to(x.dtype)
        # sigma_t(eta) = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)  (eq. 16)
        sigma = self.eta * ((1.0 - ac_prev) / (1.0 - ac) * (1.0 - ac / ac_prev)).sqrt()
        dir_xt = (1.0 - ac_prev - sigma**2).clamp(min=0.0).sqrt()
        out = ac_prev.sqrt().to(x.dtype) * x0 + dir_xt.to(x.dtype) * eps  # eq. 12 without the noise term
        if noise is not None:
            out = out + sigma.to(x.dtype) * noise
        return out

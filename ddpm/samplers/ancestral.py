"""``ddpm``: ancestral sampling, Ho et al. 2020 Algorithm 2, respaced to S timesteps (Nichol & Dhariwal 2021 Sec. 4).

The same step is ``DDPM.reverse_process`` (one step at per-image timesteps, :func:`posterior_step`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ddpm.samplers.base import Sampler, register

if TYPE_CHECKING:
    import torch

    from ddpm.schedule import Schedule


def posterior_step(s: Schedule, i: torch.Tensor | int, x: torch.Tensor, eps: torch.Tensor,
                   noise: torch.Tensor | None, clip_denoised: bool, variance: str) -> torch.Tensor:
    """x_{t-1} ~ p(x_{t-1} | x_t) at index ``i`` of schedule ``s`` (on x's device): x [B, C, H, W], eps the
    network's at t [B, C, H, W], ``i`` an int (every image) or a LongTensor [B] (per image, ``reverse_process``).

    Variance: ``fixed_small`` = beta~_t (posterior), ``fixed_large`` = beta_t (beta~_1 at t = 0, as in
    improved-diffusion); ``noise`` None gives the posterior mean, and no noise is added where i == 0.
    """
    # Ho eq. 15 solved for x0: x0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps.
    x0 = s.at(s.sqrt_recip_alphas_cumprod, i, x) * x - s.at(s.sqrt_recipm1_alphas_cumprod, i, x) * eps
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
    # Ho eq. 7: posterior mean mu~_t(x_t, x0).
    mean = s.at(s.posterior_mean_coef1, i, x) * x0 + s.at(s.posterior_mean_coef2, i, x) * x
    if noise is None:
        return mean
    log_var = s.posterior_log_variance_clipped if variance == "fixed_small" else s.fixed_large_log_variance
    # Algorithm 2 line 4: x_{t-1} = mu + sigma_t z, with no noise at t = 0.
    std = s.at((0.5 * log_var).exp(), i, x)
    if not isinstance(i, int):  # per-image timesteps: zero the noise of the images at t = 0
        std = std * (i != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return mean + std * noise


@register
class Ancestral(Sampler):
    """Algorithm 2 over the kept timesteps: with S < T the schedule is respaced (beta'_i = 1 - abar_{t_i} /
    abar_{t_{i-1}}) and step i uses its posterior; the network still sees t_i. Noise at every step but the last."""

    name = "ddpm"

    def __init__(self, schedule: Schedule, timesteps: np.ndarray, device: torch.device, eta: float = 0.0,
                 clip_denoised: bool = True, variance: str = "fixed_small") -> None:
        super().__init__(schedule, timesteps, device, eta, clip_denoised, variance)
        full = len(self.timesteps) == len(schedule.betas)
        self.respaced = (schedule if full else schedule.respace(self.timesteps.tolist())).to(device)

    def noise_at(self, i: int) -> bool:
        return i > 0

    def step(self, i: int, x: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        return posterior_step(self.respaced, i, x, eps, noise, self.clip_denoised, self.variance)

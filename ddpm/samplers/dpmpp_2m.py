"""``dpmpp_2m``: DPM-Solver++(2M), Lu et al. 2022 (arXiv:2211.01095) Algorithm 2, deterministic (``eta`` unused).

diffusers' ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
lower_order_final=True, final_sigmas_type="zero")``: its timesteps (leading: S + 1 points spaced T // (S + 1), without
t = 0), and a last step to sigma = 0 (abar = 1) that returns the x0 prediction. A solver that differs only in its
update (a stochastic one) subclasses it and overrides :meth:`DPMSolverPP2M.update`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ddpm.samplers.base import Sampler, register

if TYPE_CHECKING:
    import torch

    from ddpm.schedule import Schedule


@register
class DPMSolverPP2M(Sampler):
    """In the paper's notation, descending t_0 (the noisiest) .. t_{S-1}: alpha_t = sqrt(abar_t), sigma_t =
    sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t) (the half log-SNR), h_k = lambda_{t_{k+1}} - lambda_{t_k} > 0.
    Coefficients in float64 (the schedule), cast to x's dtype. The first step has no history and the last (to sigma
    = 0, h = inf) is first order (diffusers' lower_order_final): it returns x0."""

    name = "dpmpp_2m"

    @classmethod
    def most_steps(cls, num_timesteps: int, spacing: str) -> tuple[int, str | None]:
        if spacing == "leading":  # S + 1 points spaced T // (S + 1): that spacing must be >= 1
            return num_timesteps - 1, "with leading spacing: T // (num_steps + 1) >= 1"
        return num_timesteps, None

    @classmethod
    def leading(cls, num_timesteps: int, num_steps: int) -> np.ndarray:
        """DPMSolverMultistepScheduler's leading: i * (T // (S + 1)), i = 1..S (90, 180, ..., 900 for T=1000, S=10)."""
        return np.arange(1, num_steps + 1, dtype=np.int64) * (num_timesteps // (num_steps + 1))

    def __init__(self, schedule: Schedule, timesteps: np.ndarray, device: torch.device, eta: float = 0.0,
                 clip_denoised: bool = True, variance: str = "fixed_small") -> None:
        super().__init__(schedule, timesteps, device, eta, clip_denoised, variance)
        ac = schedule.alphas_cumprod[self.timesteps[::-1].tolist()]  # descending: k = 0 is the noisiest
        self.alpha, self.sigma = ac.sqrt(), (1.0 - ac).sqrt()
        self.lam = (self.alpha / self.sigma).log()  # lambda_{t_k} [S], float64
        self.x0_prev: torch.Tensor | None = None
        self.h_prev: torch.Tensor | None = None

    def step(self, i: int, x: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        k = len(self.timesteps) - 1 - i  # the paper's index of t_i
        # the data prediction, Ho eq. 15 solved for x0: x0 = (x_t - sigma_t eps) / alpha_t
        x0 = self.clip((x - self.sigma[k].to(x.dtype) * eps) / self.alpha[k].to(x.dtype))
        if i == 0:  # to sigma = 0: sigma_next / sigma_k = 0, e^{-h} = 0, alpha_next = 1
            return x0
        h = self.lam[k + 1] - self.lam[k]
        d = x0  # first order: DPM-Solver++(1), which is DDIM with eta = 0
        if self.x0_prev is not None:  # 2M: D = (1 + 1/(2r)) x0_k - 1/(2r) x0_{k-1}, r = h_{k-1} / h_k
            c = h / (2.0 * self.h_prev)  # 1 / (2r)
            d = (1.0 + c).to(x.dtype) * x0 - c.to(x.dtype) * self.x0_prev
        x_next = self.update(k, x, d, h, noise)
        self.x0_prev, self.h_prev = x0, h
        return x_next

    def update(self, k: int, x: torch.Tensor, d: torch.Tensor, h: torch.Tensor,
               noise: torch.Tensor | None) -> torch.Tensor:
        """x_{t_{k+1}} from x_{t_k} [B, ...] and the data term D [B, ...] over h = h_k (0-dim float64).

        Algorithm 2: x_{t_{k+1}} = (sigma_{t_{k+1}} / sigma_{t_k}) x_{t_k} - alpha_{t_{k+1}} (e^{-h_k} - 1) D."""
        a, s = self.alpha, self.sigma
        return (s[k + 1] / s[k]).to(x.dtype) * x - (a[k + 1] * (-h).expm1()).to(x.dtype) * d

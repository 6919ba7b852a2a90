"""``dpmpp_2m_sde``: DPM-Solver++(2M) SDE, a second-order multistep solver of the reverse diffusion SDE in the data
prediction: the stochastic variant of DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095).

DPM-Solver++ integrates the probability-flow ODE exactly in its linear part, in lambda_t = log(alpha_t / sigma_t),
with the data prediction x0 = (x_t - sigma_t eps) / alpha_t held at D over a step (alpha_t = sqrt(abar_t), sigma_t =
sqrt(1 - abar_t)). Its SDE variant does the same for the reverse SDE (Song et al. 2021 eq. 6), as DPM-Solver's
author wrote it for diffusers (PR #3344, 2023): ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++",
solver_order=2, solver_type="midpoint")``, also k-diffusion's ``sample_dpmpp_2m_sde`` with eta = 1. From s = t_k
to t = t_{k+1}, h = lambda_t - lambda_s > 0, z ~ N(0, I):

    x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) D + sigma_t sqrt(1 - e^{-2h}) z

With D the data itself this maps q(x_s | x0) onto q(x_t | x0) exactly (the mean alpha_t x0, the variance
sigma_t^2), and with D = x0_k (first order) it is DDIM's step with eta = 1 (Song et al. eq. 12 and 16: the same
coefficients of x_s and x0 and the same noise). 2M (midpoint) takes D = (1 + 1/(2r)) x0_k - 1/(2r) x0_{k-1},
r = h_{k-1} / h_k, as dpmpp_2m does.

Everything but that update is :class:`~ddpm.samplers.dpmpp_2m.DPMSolverPP2M`'s: the timesteps and their limit
(leading: S + 1 points spaced T // (S + 1)), the first step without history, the last step to sigma = 0, which
returns x0 (sigma_t = 0 there: no noise). Fresh noise at every step but the last, drawn per image (``seeds``);
``eta`` is unused (the full SDE, diffusers' and k-diffusion's default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ddpm.samplers.base import register
from ddpm.samplers.dpmpp_2m import DPMSolverPP2M

if TYPE_CHECKING:
    import torch


@register
class DPMSolverPP2MSDE(DPMSolverPP2M):
    """DPM-Solver++(2M) with the SDE update; coefficients in float64 (the schedule), cast to x's dtype."""

    name = "dpmpp_2m_sde"

    def noise_at(self, i: int) -> bool:
        return i > 0  # the last step (i = 0) returns x0

    def update(self, k: int, x: torch.Tensor, d: torch.Tensor, h: torch.Tensor,
               noise: torch.Tensor | None) -> torch.Tensor:
        """x_{t_{k+1}} [B, ...] from x_{t_k} [B, ...], the data term D [B, ...] and noise z [B, ...] over h = h_k
        (0-dim float64): the module docstring's step, 1 - e^{-2h} as -expm1(-2h)."""
        if noise is None:
            raise ValueError("dpmpp_2m_sde: a step to sigma > 0 needs its noise")
        a, s = self.alpha, self.sigma
        one_minus = -(-2.0 * h).expm1()  # 1 - e^{-2h}
        return ((s[k + 1] / s[k] * (-h).exp()).to(x.dtype) * x + (a[k + 1] * one_minus).to(x.dtype) * d
                + (s[k + 1] * one_minus.sqrt()).to(x.dtype) * noise.to(x.dtype))

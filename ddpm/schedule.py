"""The noise schedule: every quantity Ho et al. 2020 derive from the betas, in float64, and its respacing.

    s = Schedule.from_betas(torch.from_numpy(np.linspace(1e-4, 0.02, 1000)))   # float64 [T]
    s.respace([0, 20, ..., 980])          # the schedule of 50 kept timesteps (Nichol & Dhariwal 2021 Sec. 4)
    Schedule.at(s.alphas_cumprod, t, x)   # abar_t per image, shaped [B, 1, ..., 1] to broadcast against x

:class:`ddpm.diffusion.DDPM` holds one for training's forward process; the samplers (:mod:`ddpm.samplers`) read it
without importing this module at run time (they stay importable without torch, for the config on a login node).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Every quantity derived from betas [T] (float64, one value per timestep t = 0..T-1)."""

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor  # abar_t = prod_{s<=t} alpha_s
    alphas_cumprod_prev: torch.Tensor  # abar_{t-1}, with abar_{-1} = 1
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor  # beta~_t, Ho eq. 7
    posterior_log_variance_clipped: torch.Tensor  # log beta~_t with beta~_0 replaced by beta~_1
    posterior_mean_coef1: torch.Tensor  # mu~_t coefficient of x0, Ho eq. 7
    posterior_mean_coef2: torch.Tensor  # mu~_t coefficient of x_t, Ho eq. 7
    fixed_large_log_variance: torch.Tensor  # log beta_t with beta_0 replaced by beta~_1 (improved-diffusion)

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> Schedule:
        """The schedule of ``betas`` [T] (any float dtype; computed in float64)."""
        betas = betas.to(torch.float64)
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, dim=0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)  # Ho eq. 7: beta~_t
        post_var_1 = post_var[1:2] if len(betas) > 1 else betas[:1]
        return cls(
            betas=betas, alphas=alphas, alphas_cumprod=ac, alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=ac.sqrt(), sqrt_one_minus_alphas_cumprod=(1.0 - ac).sqrt(),
            sqrt_recip_alphas_cumprod=(1.0 / ac).sqrt(), sqrt_recipm1_alphas_cumprod=(1.0 / ac - 1.0).sqrt(),
            posterior_variance=post_var,
            posterior_log_variance_clipped=torch.cat([post_var_1, post_var[1:]]).log(),
            posterior_mean_coef1=betas * ac_prev.sqrt() / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
            fixed_large_log_variance=torch.cat([post_var_1, betas[1:]]).log(),
        )

    def respace(self, timesteps: Sequence[int]) -> Schedule:
        """Schedule of the kept (ascending) timesteps [S]: beta'_i = 1 - abar_{t_i} / abar_{t_{i-1}}.

        Nichol & Dhariwal 2021 Sec. 4 ("respacing"); the model still sees the original t_i.
        """
        ac = self.alphas_cumprod[torch.as_tensor(np.asarray(timesteps), dtype=torch.long)]
        prev = torch.cat([ac.new_ones(1), ac[:-1]])
        return Schedule.from_betas(1.0 - ac / prev)

    def to(self, device: torch.device) -> Schedule:
        """Every tensor on ``device``: float64, or float32 on MPS (which has no float64)."""
        dtype = torch.float32 if device.type == "mps" else torch.float64
        return Schedule(**{f.name: getattr(self, f.name).to(device, dtype) for f in dataclasses.fields(self)})

    @staticmethod
    def at(arr: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """arr[t] as x's dtype, shaped [B, 1, ..., 1] to broadcast against x [B, ...] (t: LongTensor [B] or [1])."""
        return arr[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))

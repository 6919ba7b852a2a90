"""DDPM math (Ho et al. 2020) and its samplers: ancestral (respaced), DDIM (Song et al. 2021) and
DPM-Solver++(2M) (Lu et al. 2022).

``DDPM`` is not an ``nn.Module``: it takes the network as an argument
(improved-diffusion's ``GaussianDiffusion``), so the schedule is never part of
a state dict that EMA or the optimizer sees. The schedule is computed in
float64 and cast to the data's dtype/device at use.

    diffusion = DDPM.from_config(cfg.ddpm, model)
    loss, metrics = diffusion.compute_loss(x0, t, noise)                 # Algorithm 1
    images = diffusion.sample(16, (3, 64, 64), num_steps=50, sampler="ddim", seeds=range(16))
    DDPM(model, **diffusion.state_dict())                                # rebuilds it
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ddpm.config import DDPMConfig, Sampler, Spacing, Variance, choices

VARIANCES, SAMPLERS, SPACINGS = choices(Variance), choices(Sampler), choices(Spacing)  # declared in ddpm.config


def make_timesteps(num_timesteps: int, num_steps: int, spacing: str = "leading", sampler: str = "ddpm") -> np.ndarray:
    """The ``num_steps`` timesteps ``sampler`` visits, ascending int64 [S], as diffusers' scheduler for that
    sampler picks them (its ``timestep_spacing``, ``steps_offset=0``).

    leading, ddpm / ddim (DDIM paper; DDPMScheduler, DDIMScheduler): t_i = i * (T // S), i = 0..S-1, so 0, 20,
    ..., 980 for T=1000, S=50; leading, dpmpp_2m (DPMSolverMultistepScheduler): S + 1 points i * (T // (S + 1)),
    i = 0..S, without t = 0 (its last step goes to sigma = 0 instead), so 90, 180, ..., 900 for S=10;
    trailing, every sampler: round(arange(T, 0, -T/S)) - 1, which always includes T - 1.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep_spacing {spacing!r} (expected one of {', '.join(SPACINGS)})")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (expected one of {', '.join(SAMPLERS)})")
    solver_leading = spacing == "leading" and sampler == "dpmpp_2m"  # T // (S + 1) >= 1 needs S <= T - 1
    most = num_timesteps - 1 if solver_leading else num_timesteps
    if int(num_steps) != num_steps or not 1 <= num_steps <= most:
        what = "dpmpp_2m with leading spacing: T // (num_steps + 1) >= 1" if solver_leading else "the T"
        raise ValueError(f"num_steps={num_steps!r}: expected an integer in [1, {most}] ({what})")
    if solver_leading:
        ts = np.arange(1, num_steps + 1, dtype=np.int64) * (num_timesteps // (num_steps + 1))
    elif spacing == "leading":
        ts = np.arange(0, num_steps, dtype=np.int64) * (num_timesteps // num_steps)
    else:
        ts = np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps)).astype(np.int64) - 1
    return np.sort(ts)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless model)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def autocast_call(model: nn.Module, dtype: torch.dtype | None) -> Callable[..., torch.Tensor]:
    """``model`` itself, or (``dtype`` set) a callable running it under ``torch.autocast(device, dtype)``."""
    if dtype is None:
        return model
    device_type = model_device(model).type

    def call(*args: Any) -> torch.Tensor:
        with torch.autocast(device_type, dtype=dtype):
            return model(*args)

    return call


def make_generators(seeds: Sequence[int] | None, batch_size: int,
                    device: torch.device) -> list[torch.Generator] | None:
    """One generator per image (EDM's StackedRandomGenerator); None means the global RNG."""
    if seeds is None:
        return None
    seeds = [int(s) for s in seeds]
    if len(seeds) != batch_size:
        raise ValueError(f"got {len(seeds)} seeds for batch_size={batch_size}: expected one seed per image")
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def draw_noise(gens: list[torch.Generator] | None, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """N(0, I) of ``shape`` [B, ...]: row i from gens[i] (batch-independent), or from the global RNG."""
    if gens is None:
        return torch.randn(shape, device=device)
    return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in gens])


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
        """Schedule of the kept (ascending) timesteps: beta'_i = 1 - abar_{t_i} / abar_{t_{i-1}}.

        Nichol & Dhariwal 2021 Sec. 4 ("respacing"); the model still sees the original t_i.
        """
        ac = self.alphas_cumprod[torch.as_tensor(np.asarray(timesteps), dtype=torch.long)]
        prev = torch.cat([ac.new_ones(1), ac[:-1]])
        return Schedule.from_betas(1.0 - ac / prev)

    def to(self, device: torch.device) -> Schedule:
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        return Schedule(**{f.name: getattr(self, f.name).to(device, dtype) for f in dataclasses.fields(self)})


def _at(arr: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """arr[t] as x's dtype, shaped [B, 1, ..., 1] to broadcast against x [B, ...]."""
    return arr[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


class DDPM:
    """Linear-beta DDPM around an eps-prediction ``model(x_t, t) -> eps``.

    Attributes ``betas`` ... ``posterior_mean_coef2`` are float64 CPU tensors of shape [T].
    """

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor

    def __init__(self, model: nn.Module, num_timesteps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02, variance: str = "fixed_small"):
        if int(num_timesteps) != num_timesteps or num_timesteps < 1:
            raise ValueError(f"num_timesteps={num_timesteps!r}: expected an integer >= 1")
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(f"beta_start={beta_start!r}, beta_end={beta_end!r}: expected 0 < start <= end < 1")
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r} (expected one of {', '.join(VARIANCES)})")
        self.model = model
        self.num_timesteps = int(num_timesteps)
        self.beta_start, self.beta_end, self.variance = float(beta_start), float(beta_end), variance
        # Ho et al. Sec. 4: betas increase linearly from beta_1 to beta_T (float64 throughout).
        betas = torch.from_numpy(np.linspace(beta_start, beta_end, self.num_timesteps, dtype=np.float64))
        self.schedule = Schedule.from_betas(betas)
        for f in dataclasses.fields(Schedule):
            if f.name != "fixed_large_log_variance":
                setattr(self, f.name, getattr(self.schedule, f.name))
        self._on_device: dict[tuple[tuple[int, ...] | None, torch.device], Schedule] = {}

    @classmethod
    def from_config(cls, ddpm_cfg: DDPMConfig, model: nn.Module) -> DDPM:
        return cls(model, ddpm_cfg.num_timesteps, ddpm_cfg.beta_start, ddpm_cfg.beta_end, ddpm_cfg.variance)

    def state_dict(self) -> dict[str, Any]:
        """Plain types; ``DDPM(model, **state)`` rebuilds the same diffusion."""
        return {"num_timesteps": self.num_timesteps, "beta_start": self.beta_start,
                "beta_end": self.beta_end, "variance": self.variance}

    def _sched(self, device: torch.device, timesteps: np.ndarray | None = None) -> Schedule:
        """The schedule (respaced to ``timesteps`` when given) on ``device``, cached per (timesteps, device)."""
        key = (None if timesteps is None else tuple(int(t) for t in timesteps), device)
        if key not in self._on_device:
            sched = self.schedule if timesteps is None else self.schedule.respace(timesteps.tolist())
            self._on_device[key] = sched.to(device)
        return self._on_device[key]

    # ---- training -------------------------------------------------------------------------------

    def forward_process(self, x0: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q(x_t | x_0), Ho eq. 4: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

        x0: [B, C, H, W]; t: LongTensor [B] on x0's device -> (x_t [B, C, H, W], noise [B, C, H, W]).
        """
        if noise is None:
            noise = torch.randn_like(x0)
        s = self._sched(x0.device)
        x_t = _at(s.sqrt_alphas_cumprod, t, x0) * x0 + _at(s.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        return x_t, noise

    def compute_loss(self, x0: torch.Tensor, t: torch.Tensor | None = None,
                     noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Algorithm 1 / Ho eq. 14: || eps - eps_theta(x_t, t) ||^2, averaged over pixels and batch.

        x0: [B, C, H, W] in [-1, 1]; t: LongTensor [B] in [0, T) (default: uniform, global CPU RNG);
        noise: [B, C, H, W] (default: ``randn_like(x0)``). Returns the scalar loss (with grad) and
        detached metrics: "loss" (0-dim) and "losses", the per-sample loss [B] (the trainer bins it by
        t on log steps). No host synchronisation.
        """
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), dtype=torch.long)
        t = t.to(x0.device, non_blocking=True)
        x_t, noise = self.forward_process(x0, t, noise)
        eps = self.model(x_t, t)
        losses = (eps.float() - noise.float()).square().mean(dim=tuple(range(1, x0.ndim)))  # [B]
        loss = losses.mean()
        return loss, {"loss": loss.detach(), "losses": losses.detach()}

    # ---- one reverse step -----------------------------------------------------------------------

    def _ddpm_step(self, net: Callable, s: Schedule, x: torch.Tensor, i: torch.Tensor, t_model: torch.Tensor,
                   noise: torch.Tensor | None, clip_denoised: bool) -> torch.Tensor:
        """x_{t-1} ~ p(x_{t-1} | x_t) at schedule index i and model timestep t_model (both [B] or [1])."""
        eps = net(x, t_model).to(x.dtype)
        # Ho eq. 15 solved for x0: x0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps.
        x0 = _at(s.sqrt_recip_alphas_cumprod, i, x) * x - _at(s.sqrt_recipm1_alphas_cumprod, i, x) * eps
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        # Ho eq. 7: posterior mean mu~_t(x_t, x0).
        mean = _at(s.posterior_mean_coef1, i, x) * x0 + _at(s.posterior_mean_coef2, i, x) * x
        if noise is None:
            return mean
        log_var = s.posterior_log_variance_clipped if self.variance == "fixed_small" else s.fixed_large_log_variance
        # Algorithm 2 line 4: x_{t-1} = mu + sigma_t z, with no noise at t = 0.
        std = _at(torch.exp(0.5 * log_var), i, x) * (i != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return mean + std * noise

    def reverse_process(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                        clip_denoised: bool = True) -> torch.Tensor:
        """One ancestral step (Algorithm 2): x_t [B, C, H, W], t LongTensor [B] -> x_{t-1} [B, C, H, W].

        Variance: ``fixed_small`` = beta~_t (posterior), ``fixed_large`` = beta_t (beta~_1 at t = 0, as in
        improved-diffusion). ``noise`` defaults to ``randn_like(x_t)``; it is not added where t == 0.
        Runs with the model as it is (grad mode and train/eval mode are the caller's).
        """
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.long).reshape(-1).expand(x_t.shape[0])
        if noise is None:
            noise = torch.randn_like(x_t)
        return self._ddpm_step(self.model, self._sched(x_t.device), x_t, t, t, noise, clip_denoised)

    def _ddim_step(self, net: Callable, ac: torch.Tensor, ac_prev: torch.Tensor, x: torch.Tensor, t_model: torch.Tensor,
                   eta: float, noise: torch.Tensor | None, clip_denoised: bool) -> torch.Tensor:
        """Song et al. 2021 eq. 12 from abar_t (ac) to abar_prev (ac_prev), both 0-dim float64."""
        eps = net(x, t_model).to(x.dtype)
        x0 = ((1.0 / ac).sqrt().to(x.dtype)) * x - ((1.0 / ac - 1.0).sqrt().to(x.dtype)) * eps
        if clip_denoised:  # re-derive eps from the clipped x0 (improved-diffusion, diffusers DDIM)
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x - ac.sqrt().to(x.dtype) * x0) / (1.0 - ac).sqrt().to(x.dtype)
        # sigma_t(eta) = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)  (eq. 16)
        sigma = eta * ((1.0 - ac_prev) / (1.0 - ac) * (1.0 - ac / ac_prev)).sqrt()
        dir_xt = (1.0 - ac_prev - sigma**2).clamp(min=0.0).sqrt()
        out = ac_prev.sqrt().to(x.dtype) * x0 + dir_xt.to(x.dtype) * eps  # eq. 12 without the noise term
        if noise is not None:
            out = out + sigma.to(x.dtype) * noise
        return out

    # ---- sampling -------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, batch_size: int, image_shape: Sequence[int], num_steps: int | None = None,
               sampler: str = "ddpm", eta: float = 0.0, timestep_spacing: str = "leading",
               seeds: Sequence[int] | None = None, x_T: torch.Tensor | None = None, progress: bool = True,
               clip_denoised: bool = True, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Draw ``batch_size`` images [B, *image_shape] in [-1, 1] (when ``clip_denoised``) from x_T ~ N(0, I).

        sampler "ddpm": ancestral sampling (Algorithm 2), respaced to ``num_steps`` (default T) timesteps;
        "ddim": Song et al. eq. 12 with ``eta`` (0: deterministic; 1: ancestral variance), the last step
        going to abar = 1 (the x0 prediction); "dpmpp_2m": DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2),
        deterministic (``eta`` unused), its last step also to abar = 1 (diffusers' final_sigmas_type="zero").
        ``timestep_spacing`` ("leading" or "trailing") picks the timesteps as diffusers' scheduler for the
        sampler does (``make_timesteps``; leading differs for dpmpp_2m). With ``seeds`` (one int per image)
        image i uses its own ``torch.Generator`` for its initial noise and every step's noise, so it depends on
        seeds[i] only. ``x_T`` [B, *image_shape] replaces the initial noise (the
        generators still draw and drop it). ``clip_denoised`` clamps every x0 prediction to [-1, 1].
        The model runs in eval mode under no_grad, on its parameters' device; its mode is restored. It is
        called as ``model(x [B, ...], t [1])``: one timestep broadcast over the batch, so the time embedding
        is computed once and each image's result does not depend on the batch size. ``autocast_dtype`` (e.g.
        torch.bfloat16) runs each model call under ``torch.autocast``; its output and all else stay x's dtype.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected an integer >= 1")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r} (expected one of {', '.join(SAMPLERS)})")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta={eta!r}: expected a float in [0, 1]")
        steps = self.num_timesteps if num_steps is None else num_steps
        timesteps = make_timesteps(self.num_timesteps, steps, timestep_spacing, sampler)  # ascending [S]
        shape = (batch_size, *[int(d) for d in image_shape])
        if x_T is not None and tuple(x_T.shape) != shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
        device = model_device(self.model)
        gens = make_generators(seeds, batch_size, device)
        x = draw_noise(gens, shape, device)
        if x_T is not None:
            x = x_T.to(device=device, dtype=torch.float32)
        was_training = self.model.training
        self.model.eval()
        net = autocast_call(self.model, autocast_dtype)
        try:
            if sampler == "ddpm":
                x = self._sample_ddpm(net, x, timesteps, gens, clip_denoised, progress)
            elif sampler == "ddim":
                x = self._sample_ddim(net, x, timesteps, eta, gens, clip_denoised, progress)
            else:
                x = self._sample_dpmpp_2m(net, x, timesteps, gens, clip_denoised, progress)
        finally:
            self.model.train(was_training)
        return x

    def _sample_ddpm(self, net: Callable, x: torch.Tensor, timesteps: np.ndarray, gens: list[torch.Generator] | None,
                     clip_denoised: bool, progress: bool) -> torch.Tensor:
        full = len(timesteps) == self.num_timesteps
        s = self._sched(x.device, None if full else timesteps)
        for i in tqdm(range(len(timesteps) - 1, -1, -1), disable=not progress, desc="ddpm", leave=False):
            idx = torch.full((1,), i, device=x.device, dtype=torch.long)
            t_model = torch.full((1,), int(timesteps[i]), device=x.device, dtype=torch.long)
            noise = draw_noise(gens, tuple(x.shape), x.device) if i > 0 else None
            x = self._ddpm_step(net, s, x, idx, t_model, noise, clip_denoised)
        return x

    def _sample_ddim(self, net: Callable, x: torch.Tensor, timesteps: np.ndarray, eta: float,
                     gens: list[torch.Generator] | None, clip_denoised: bool, progress: bool) -> torch.Tensor:
        ac_all = self.alphas_cumprod
        for i in tqdm(range(len(timesteps) - 1, -1, -1), disable=not progress, desc="ddim", leave=False):
            ac = ac_all[int(timesteps[i])]
            ac_prev = ac_all[int(timesteps[i - 1])] if i > 0 else torch.ones((), dtype=torch.float64)
            t_model = torch.full((1,), int(timesteps[i]), device=x.device, dtype=torch.long)
            noise = draw_noise(gens, tuple(x.shape), x.device) if (eta > 0 and i > 0) else None
            x = self._ddim_step(net, ac, ac_prev, x, t_model, eta, noise, clip_denoised)
        return x

    def _sample_dpmpp_2m(self, net: Callable, x: torch.Tensor, timesteps: np.ndarray,
                         gens: list[torch.Generator] | None, clip_denoised: bool, progress: bool) -> torch.Tensor:
        """DPM-Solver++(2M), Lu et al. 2022 Algorithm 2: x_T [B, ...] -> x0 [B, ...]; timesteps ascending [S].

        Deterministic: ``gens`` drew x_T and nothing more. alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t);
        coefficients in float64 (the schedule), cast to x's dtype. The first step has no history and the last
        one (to sigma = 0, abar = 1, h = inf) is first order (diffusers' lower_order_final): it returns x0.
        """
        ts = timesteps[::-1]  # descending: t_0 = the noisiest, as in the paper
        ac = self.alphas_cumprod[torch.as_tensor(ts.copy())]
        alpha, sigma = ac.sqrt(), (1.0 - ac).sqrt()
        lam = torch.log(alpha / sigma)  # lambda_t = log(alpha_t / sigma_t), the half log-SNR
        x0_prev, h_prev = None, None
        for i in tqdm(range(len(ts)), disable=not progress, desc="dpmpp_2m", leave=False):
            t_model = torch.full((1,), int(ts[i]), device=x.device, dtype=torch.long)
            eps = net(x, t_model).to(x.dtype)
            # the data prediction, Ho eq. 15 solved for x0: x0 = (x_t - sigma_t eps) / alpha_t
            x0 = (x - sigma[i].to(x.dtype) * eps) / alpha[i].to(x.dtype)
            if clip_denoised:
                x0 = x0.clamp(-1.0, 1.0)
            if i == len(ts) - 1:  # to sigma = 0: sigma_next / sigma_i = 0, e^{-h} = 0, alpha_next = 1
                return x0
            h = lam[i + 1] - lam[i]  # h_i = lambda_{t_{i+1}} - lambda_{t_i} > 0
            d = x0  # first order: DPM-Solver++(1), which is DDIM with eta = 0
            if x0_prev is not None:  # 2M: D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}, r = h_{i-1} / h_i
                c = h / (2.0 * h_prev)  # 1 / (2r)
                d = (1.0 + c).to(x.dtype) * x0 - c.to(x.dtype) * x0_prev
            # x_{t_{i+1}} = (sigma_{t_{i+1}} / sigma_{t_i}) x_{t_i} - alpha_{t_{i+1}} (e^{-h_i} - 1) D
            x = (sigma[i + 1] / sigma[i]).to(x.dtype) * x - (alpha[i + 1] * torch.expm1(-h)).to(x.dtype) * d
            x0_prev, h_prev = x0, h
        return x

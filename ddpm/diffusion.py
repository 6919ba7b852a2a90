"""DDPM math (Ho et al. 2020) and the sampling loop; the samplers themselves are :mod:`ddpm.samplers` (ancestral,
DDIM, DPM-Solver++(2M), ...), one module each, found by name.

``DDPM`` is not an ``nn.Module``: it takes the network as an argument
(improved-diffusion's ``GaussianDiffusion``), so the schedule (:class:`ddpm.schedule.Schedule`) is never part of
a state dict that EMA or the optimizer sees. The schedule is computed in float64 and cast to the data's
dtype/device at use.

    diffusion = DDPM.from_config(cfg.ddpm, model)
    loss, metrics = diffusion.compute_loss(x0, t, noise)                 # Algorithm 1
    images = diffusion.sample(16, (3, 64, 64), num_steps=50, sampler="ddim", seeds=range(16))
    images = diffusion.sample(16, (3, 64, 64), sampler=cfg.sampling, seeds=range(16))  # settings whole
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

from ddpm.config import DDPMConfig, Variance, choices
from ddpm.samplers import Sampler, SamplerSettings, SamplerSpec, check_settings, get_sampler
from ddpm.samplers.ancestral import posterior_step
from ddpm.schedule import Schedule

VARIANCES = choices(Variance)  # declared in ddpm.config


def make_timesteps(num_timesteps: int, num_steps: int, spacing: str = "leading", sampler: str = "ddpm") -> np.ndarray:
    """The ``num_steps`` timesteps ``sampler`` visits, ascending int64 [S], as diffusers' scheduler for that
    sampler picks them (its ``timestep_spacing``, ``steps_offset=0``): the sampler's own rule
    (:meth:`ddpm.samplers.Sampler.make_timesteps`).

    leading, ddpm / ddim (DDIM paper; DDPMScheduler, DDIMScheduler): t_i = i * (T // S), i = 0..S-1, so 0, 20,
    ..., 980 for T=1000, S=50; leading, dpmpp_2m (DPMSolverMultistepScheduler): S + 1 points i * (T // (S + 1)),
    i = 0..S, without t = 0 (its last step goes to sigma = 0 instead), so 90, 180, ..., 900 for S=10;
    trailing, every sampler: round(arange(T, 0, -T/S)) - 1, which always includes T - 1.
    """
    return get_sampler(sampler).make_timesteps(num_timesteps, num_steps, spacing)


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


def sampler_settings(sampler: str | SamplerSettings, num_steps: int | None = None, eta: float = 0.0,
                     timestep_spacing: str = "leading") -> SamplerSettings:
    """``DDPM.sample``'s sampler argument as one settings object: a name with the three keywords, or a settings
    object given whole (then the keywords must keep their defaults: ValueError naming any that does not)."""
    if isinstance(sampler, str):
        return SamplerSpec(sampler, num_steps, eta, timestep_spacing)
    given = {k: v for k, v, default in (("num_steps", num_steps, None), ("eta", eta, 0.0),
                                        ("timestep_spacing", timestep_spacing, "leading")) if v != default}
    if given:
        raise ValueError(f"{', '.join(f'{k}={v!r}' for k, v in given.items())} given with a sampler settings object "
                         f"({sampler.sampler}, {sampler.num_steps} steps): give each setting once")
    return sampler


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
        self._on_device: dict[torch.device, Schedule] = {}

    @classmethod
    def from_config(cls, ddpm_cfg: DDPMConfig, model: nn.Module) -> DDPM:
        return cls(model, ddpm_cfg.num_timesteps, ddpm_cfg.beta_start, ddpm_cfg.beta_end, ddpm_cfg.variance)

    def state_dict(self) -> dict[str, Any]:
        """Plain types; ``DDPM(model, **state)`` rebuilds the same diffusion."""
        return {"num_timesteps": self.num_timesteps, "beta_start": self.beta_start,
                "beta_end": self.beta_end, "variance": self.variance}

    def _sched(self, device: torch.device) -> Schedule:
        """The schedule on ``device`` (float64; float32 on MPS), cached per device."""
        if device not in self._on_device:
            self._on_device[device] = self.schedule.to(device)
        return self._on_device[device]

    # ---- training -------------------------------------------------------------------------------

    def forward_process(self, x0: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q(x_t | x_0), Ho eq. 4: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

        x0: [B, C, H, W]; t: LongTensor [B] on x0's device -> (x_t [B, C, H, W], noise [B, C, H, W]).
        """
        if noise is None:
            noise = torch.randn_like(x0)
        s = self._sched(x0.device)
        x_t = s.at(s.sqrt_alphas_cumprod, t, x0) * x0 + s.at(s.sqrt_one_minus_alphas_cumprod, t, x0) * noise
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
        eps = self.model(x_t, t).to(x_t.dtype)
        return posterior_step(self._sched(x_t.device), t, x_t, eps, noise, clip_denoised, self.variance)

    # ---- sampling -------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, batch_size: int, image_shape: Sequence[int], num_steps: int | None = None,
               sampler: str | SamplerSettings = "ddpm", eta: float = 0.0, timestep_spacing: str = "leading",
               seeds: Sequence[int] | None = None, x_T: torch.Tensor | None = None, progress: bool = True,
               clip_denoised: bool = True, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Draw ``batch_size`` images [B, *image_shape] in [-1, 1] (when ``clip_denoised``) from x_T ~ N(0, I).

        ``sampler`` is a name with its settings in ``num_steps`` (None: T), ``eta`` and ``timestep_spacing``, or
        the settings whole (:class:`~ddpm.samplers.SamplerSpec`, or the config's sampling section: its sampler,
        num_steps, eta and timestep_spacing), as the stages and tools pass them; the three keywords then keep
        their defaults. "ddpm": ancestral sampling (Algorithm 2), respaced to ``num_steps`` timesteps; "ddim":
        Song et al. eq. 12 with ``eta`` (0: deterministic; 1: ancestral variance), the last step going to abar = 1
        (the x0 prediction); "dpmpp_2m": DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), deterministic (``eta``
        unused), its last step also to abar = 1 (diffusers' final_sigmas_type="zero"); any other name of
        :func:`ddpm.samplers.sampler_names`. ``timestep_spacing`` ("leading" or "trailing") picks the timesteps as
        diffusers' scheduler for the sampler does (``make_timesteps``; leading differs for dpmpp_2m).

        With ``seeds`` (one int per image) image i uses its own ``torch.Generator`` for its initial noise and every
        step's noise, so it depends on seeds[i] only. ``x_T`` [B, *image_shape] replaces the initial noise (the
        generators still draw and drop it). ``clip_denoised`` clamps every x0 prediction to [-1, 1].
        The model runs in eval mode under no_grad, on its parameters' device; its mode is restored. It is
        called as ``model(x [B, ...], t [1])``: one timestep broadcast over the batch, so the time embedding
        is computed once and each image's result does not depend on the batch size. ``autocast_dtype`` (e.g.
        torch.bfloat16) runs each model call under ``torch.autocast``; its output and all else stay float32.
        Bad settings raise ValueError naming the value (the sampler's own limits: :func:`check_settings`).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected an integer >= 1")
        settings = sampler_settings(sampler, num_steps, eta, timestep_spacing)
        cls, timesteps = check_settings(settings, self.num_timesteps)  # ascending [S]
        shape = (batch_size, *[int(d) for d in image_shape])
        if x_T is not None and tuple(x_T.shape) != shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
        device = model_device(self.model)
        gens = make_generators(seeds, batch_size, device)
        x = draw_noise(gens, shape, device)
        if x_T is not None:
            x = x_T.to(device=device, dtype=torch.float32)
        run = cls(self.schedule, timesteps, device, settings.eta, clip_denoised, self.variance)
        was_training = self.model.training
        self.model.eval()
        try:
            return self.denoise(run, x, gens, autocast_call(self.model, autocast_dtype), progress)
        finally:
            self.model.train(was_training)

    def denoise(self, sampler: Sampler, x: torch.Tensor, gens: list[torch.Generator] | None = None,
                net: Callable[..., torch.Tensor] | None = None, progress: bool = False) -> torch.Tensor:
        """Run one sampler run (an instance: its timesteps, constants and history) from x [B, ...] at its noisiest
        timestep to the clean image [B, ...], in x's dtype: for i = S-1 .. 0, fresh noise when the sampler takes
        it (row b from gens[b], or the global RNG), eps = net(x, t_i [1]), x = ``sampler.step``. ``net`` defaults
        to the model as it is (mode and grad are the caller's; :meth:`sample` sets them)."""
        net = self.model if net is None else net
        ts = sampler.timesteps
        for i in tqdm(range(len(ts) - 1, -1, -1), disable=not progress, desc=sampler.name, leave=False):
            t_model = torch.full((1,), int(ts[i]), device=x.device, dtype=torch.long)
            noise = draw_noise(gens, tuple(x.shape), x.device) if sampler.noise_at(i) else None
            eps = net(x, t_model).to(x.dtype)
            x = sampler.step(i, x, eps, noise)
        return x

"""DPM-Solver++(2M) SDE (``DDPM.sample(sampler="dpmpp_2m_sde")``, ddpm/samplers/dpmpp_2m_sde.py).

* parity with diffusers' ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2,
  solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero")``, which picks its own timesteps from
  ``timestep_spacing`` (every spacing we support), given the same noise, on a small random U-Net:
  - float64: the U-Net in float64, the scheduler's sigmas from our float64 ``alphas_cumprod``, our loop's noise
    given to its ``step`` as ``variance_noise``. ``step`` casts the sample and the noise to float32 before its
    update formulas; :class:`Float64Step` hands those formulas the float64 ones it was given and changes nothing
    else. Measured up to 1.6e-15 relative unclipped, 6.6e-15 clipped (stock ``step``, float32 inside: 1.5e-7);
  - float32, as it runs: ``DDPM.sample(seeds=...)`` against diffusers' loop given the same per-image generators
    (``step(generator=[...])`` draws image b's noise from generator b, as ours does; its last step draws one more,
    which sigma = 0 multiplies away). Measured up to 8.0e-7 relative unclipped, 4.7e-6 clipped;
* the first and the last step are first order, which for this SDE is DDIM with eta 1 (the module docstring's
  algebra): 2 steps equal DDIM's 2 steps with the same noise; 3 differ by the 2M correction;
* image i depends on seeds[i] only (its x_T and every step's noise), whatever the batch;
* Gaussian data with its exact eps: the samples have the data's mean, and a std closer to the data's than the
  first-order SDE step's (DDIM with eta 1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from helpers import tiny_unet
from test_diffusers_parity import BETA_END, BETA_START, SCHEDULE, T, assert_close, ddpm_with_toy, max_rel, seeded
from test_dpm_solver import GaussianEps, same_images_from_any_batching
from torch import nn

from ddpm.diffusion import DDPM, draw_noise, make_generators, make_timesteps
from ddpm.samplers import SPACINGS, get_sampler

try:
    from diffusers import DPMSolverMultistepScheduler
except ImportError as err:  # a hard failure, not a skip: diffusers is part of the test extra
    raise ImportError("tests/test_dpm_solver_sde.py needs diffusers, a test extra: pip install -e '.[test]'") from err

CPU = torch.device("cpu")
SEEDS, SHAPE = [3, 14, 15], (3, 8, 8)
FLOAT64_RTOL = 1e-13  # measured up to 6.6e-15
STOCK_RTOL = {False: 3e-6, True: 2e-5}  # by clip_denoised; measured up to 8.0e-7 and 4.7e-6


class Float64Step(DPMSolverMultistepScheduler):
    """diffusers' scheduler whose ``step`` gives its update formulas the sample and noise it was given: the stock
    ``step`` casts both to float32 first (``sample.to(torch.float32)``), which makes a float64 loop float32."""

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, generator: Any = None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True) -> Any:
        self.given = (sample, variance_noise)
        return super().step(model_output, timestep, sample, generator=generator, variance_noise=variance_noise,
                            return_dict=return_dict)

    def dpm_solver_first_order_update(self, model_output: torch.Tensor, *args: Any, sample: Any = None,
                                      noise: Any = None, **kwargs: Any) -> torch.Tensor:
        return super().dpm_solver_first_order_update(model_output, *args, sample=self.given[0], noise=self.given[1],
                                                     **kwargs)

    def multistep_dpm_solver_second_order_update(self, model_output_list: list[torch.Tensor], *args: Any,
                                                 sample: Any = None, noise: Any = None, **kwargs: Any) -> torch.Tensor:
        return super().multistep_dpm_solver_second_order_update(model_output_list, *args, sample=self.given[0],
                                                                noise=self.given[1], **kwargs)


def sde_scheduler(cls: type[DPMSolverMultistepScheduler], spacing: str, steps: int,
                  clip: bool) -> DPMSolverMultistepScheduler:
    """diffusers' SDE-DPM-Solver++(2M) with its own timesteps for ``spacing``; clipping is its thresholding with
    ``sample_max_value=1`` (the threshold clamped to [1, 1]: a clamp to [-1, 1])."""
    sched = cls(num_train_timesteps=T, **SCHEDULE, algorithm_type="sde-dpmsolver++", solver_order=2,
                solver_type="midpoint", lower_order_final=True, euler_at_final=False, final_sigmas_type="zero",
                prediction_type="epsilon", thresholding=clip, sample_max_value=1.0, timestep_spacing=spacing,
                steps_offset=0)
    sched.set_timesteps(steps)
    return sched


def seeds_noise(steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """x_T [3, *SHAPE] and ``steps`` noises drawn from SEEDS as ``DDPM.sample`` draws them (x_T, then one per step;
    the sampler takes none at its last step), in float64."""
    gens = make_generators(SEEDS, len(SEEDS), CPU)
    draws = [draw_noise(gens, (len(SEEDS), *SHAPE), CPU).double() for _ in range(steps + 1)]
    return draws[0], draws[1:]


# ---- parity with diffusers ------------------------------------------------------------------------------

@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [10, 20])
def test_float64_steps_match_diffusers_given_the_same_noise(steps: int, spacing: str, clip: bool) -> None:
    net = tiny_unet().double()
    ddpm = DDPM(net, T, BETA_START, BETA_END)
    ts = make_timesteps(T, steps, spacing, "dpmpp_2m_sde")
    gens = make_generators(SEEDS, len(SEEDS), CPU)
    x_T = draw_noise(gens, (len(SEEDS), *SHAPE), CPU).double()
    run = get_sampler("dpmpp_2m_sde")(ddpm.schedule, ts, CPU, clip_denoised=clip)
    with torch.no_grad():
        ours = ddpm.denoise(run, x_T.clone(), gens)  # its noise from the seeds' generators, per step
    x_T_again, noise = seeds_noise(steps)
    assert torch.equal(x_T_again, x_T) and ours.dtype == torch.float64

    def diffusers_loop(cls: type[DPMSolverMultistepScheduler], noise: list[torch.Tensor]) -> torch.Tensor:
        sched = sde_scheduler(cls, spacing, steps, clip)
        assert sched.timesteps.tolist() == ts[::-1].tolist()  # its own timesteps are ours
        ac = ddpm.alphas_cumprod[sched.timesteps]
        sched.sigmas = torch.cat([((1 - ac) / ac).sqrt(), ac.new_zeros(1)])  # its sigma_t, from our float64 abar
        x = x_T.clone()
        with torch.no_grad():
            for t, z in zip(sched.timesteps, noise, strict=True):
                x = sched.step(net(x, t.reshape(1)), t, x, variance_noise=z).prev_sample
        return x

    what = f"dpmpp_2m_sde {steps} {spacing} clip={clip}"
    assert_close(ours, diffusers_loop(Float64Step, noise), FLOAT64_RTOL, f"{what}, float64")
    assert max_rel(ours, diffusers_loop(DPMSolverMultistepScheduler, noise)) > 10 * FLOAT64_RTOL  # float32 inside
    other = [-z for z in noise[:-1]] + noise[-1:]  # the noise matters at every step but the last
    assert max_rel(ours, diffusers_loop(Float64Step, other)) > 1e-2
    assert_close(ours, diffusers_loop(Float64Step, [*noise[:-1], 100 * noise[-1]]), FLOAT64_RTOL, f"{what}, last")


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_sample_matches_diffusers_loop_with_the_same_generators(spacing: str, clip: bool) -> None:
    ddpm = DDPM(tiny_unet(), T, BETA_START, BETA_END)
    mine = ddpm.sample(len(SEEDS), SHAPE, num_steps=10, sampler="dpmpp_2m_sde", timestep_spacing=spacing,
                       seeds=SEEDS, progress=False, clip_denoised=clip)
    gens, x = seeded(SEEDS, SHAPE)
    sched = sde_scheduler(DPMSolverMultistepScheduler, spacing, 10, clip)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(ddpm.model(x, t.reshape(1)), t, x, generator=gens).prev_sample
    assert_close(mine, x, STOCK_RTOL[clip], f"dpmpp_2m_sde 10 {spacing} clip={clip}, float32")
    assert max_rel(mine, ddpm.sample(len(SEEDS), SHAPE, num_steps=10, sampler="dpmpp_2m", timestep_spacing=spacing,
                                     seeds=SEEDS, progress=False, clip_denoised=clip)) > 1e-2  # not the ODE


# ---- structure: first-order steps are DDIM with eta 1 ------------------------------------------------------

@pytest.mark.parametrize("clip", [False, True])
def test_first_and_last_steps_are_ddim_with_eta_1(clip: bool) -> None:
    """Both steps of 2 are first order: DDIM with eta 1 on the same timesteps with the same noise (both draw it
    before every step but the last). The toy eps; measured 1.3e-6 relative (leading, from t = 666) and up to
    2.4e-5 (trailing, from t = 999: float32 rounding of the two formulas times 1 / alpha_999 ~ 160); at 3 steps
    the 2M correction makes them differ by 0.31 to 1.9."""
    ddpm = ddpm_with_toy()

    def run(name: str, steps: int, eta: float, spacing: str) -> torch.Tensor:  # on dpmpp_2m_sde's timesteps
        ts = make_timesteps(T, steps, spacing, "dpmpp_2m_sde")
        gens = make_generators(SEEDS, len(SEEDS), CPU)
        x_T = draw_noise(gens, (len(SEEDS), *SHAPE), CPU)
        return ddpm.denoise(get_sampler(name)(ddpm.schedule, ts, CPU, eta, clip), x_T, gens)

    for spacing in SPACINGS:
        assert_close(run("dpmpp_2m_sde", 2, 0.0, spacing), run("ddim", 2, 1.0, spacing), 1e-4,
                     f"2 steps {spacing} clip={clip}")
        assert max_rel(run("dpmpp_2m_sde", 3, 0.0, spacing), run("ddim", 3, 1.0, spacing)) > 0.1


# ---- seeds --------------------------------------------------------------------------------------------------

def test_image_depends_on_its_seed_only() -> None:
    """Any batching gives the same images (test_dpm_solver's checks); the seeds pick every step's noise, not only
    x_T: the same x_T with other seeds gives other images."""
    ddpm, four, x_T, kw = same_images_from_any_batching("dpmpp_2m_sde")
    other = ddpm.sample(4, x_T.shape[1:], seeds=[0, 1, 2, 9], x_T=x_T, **kw)
    assert min(max_rel(a, b) for a, b in zip(other, four, strict=True)) > 1e-2


def test_gaussian_data_gets_its_mean_and_nearly_its_std() -> None:
    """The exact eps of N(MU, SD^2) data, 50 trailing steps, 65,536 i.i.d. pixels (standard errors SD / 256 for
    the mean, 0.28% for the std). Measured: the mean 0.05 standard errors off; the std +3.1% (2M SDE; +0.7% at 200
    steps, +0.1% at 500) against -11.1% for the first-order step (DDIM with eta 1, the ancestral law)."""
    ddpm = DDPM(nn.Identity(), T, BETA_START, BETA_END)
    ddpm.model = GaussianEps(ddpm.alphas_cumprod)
    mu, sd = GaussianEps.MU, GaussianEps.SD

    def draw(sampler: str, eta: float) -> torch.Tensor:
        torch.manual_seed(1234)
        return ddpm.sample(64, (1, 32, 32), num_steps=50, sampler=sampler, eta=eta, timestep_spacing="trailing",
                           clip_denoised=False, progress=False).double()

    x, first_order = draw("dpmpp_2m_sde", 0.0), draw("ddim", 1.0)
    n = x.numel()
    assert abs(x.mean().item() - mu) < 5 * sd / np.sqrt(n)
    err, err_first = abs(x.std().item() - sd) / sd, abs(first_order.std().item() - sd) / sd
    assert err < 0.05 and err < err_first / 2, (err, err_first)

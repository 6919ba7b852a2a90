"""DPM-Solver++(2M) (``DDPM.sample(sampler="dpmpp_2m")``, Lu et al. 2022 Algorithm 2).

* parity with diffusers' ``DPMSolverMultistepScheduler`` (dpmsolver++, order 2, midpoint, lower_order_final,
  final_sigmas_type "zero", driven with our timesteps through ``set_timesteps(timesteps=...)``: that they are the
  ones its own ``timestep_spacing`` picks is tests/test_diffusers_parity.py's, with the loop on those; clipping is its
  ``thresholding=True, sample_max_value=1.0``: the threshold s is clamped to [1, 1], i.e. a clamp to [-1, 1]).
  diffusers' ``step`` casts the sample and its sigmas to float32, so the comparison is float32, relative to
  the largest value as in tests/test_diffusers_parity.py; each test states its measured difference;
* the first and the last step are first order, i.e. DDIM with eta 0, so 2 steps equal DDIM's 2 steps;
* image i depends on seeds[i] only (through x_T: the solver draws no noise), whatever the batch;
* convergence to the probability-flow ODE: close to DDIM at 1000 steps at 200 steps, and second order
  against the exact ODE solution for Gaussian data.
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_unet
from test_diffusers_parity import (
    BETA_END,
    BETA_START,
    SCHEDULE,
    T,
    assert_close,
    ddpm_with_toy,
    max_rel,
    seeded,
)
from torch import nn

from ddpm.diffusion import DDPM, make_timesteps
from ddpm.samplers import get_sampler

try:
    from diffusers import DPMSolverMultistepScheduler
except ImportError as err:  # a hard failure, not a skip: diffusers is part of the test extra
    raise ImportError("tests/test_dpm_solver.py needs diffusers, a test extra: pip install -e '.[test]'") from err

SEEDS, SHAPE = [3, 14, 15], (2, 6, 6)
# float32 loops, relative to the largest value of diffusers' result (see test_diffusers_parity's STOCK_RTOL)
# diffusers as it is: measured up to 7.8e-7 (its float32 abar_t near 1 holds sigma_t^2 = 1 - abar_t to ~3e-4
# relative at t = 0, which DDIM's leading spacing visits and DPM-Solver's does not)
STOCK_RTOL = 2e-5
FLOAT64_SCHEDULE_RTOL = 3e-6  # diffusers given our float64 alphas_cumprod (float32 arithmetic): measured 9.5e-7


def diffusers_dpmpp_2m(model: nn.Module, x_T: torch.Tensor, steps: int, spacing: str, clip: bool,
                       alphas_cumprod: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers' DPM-Solver++(2M) loop from ``x_T`` over our timesteps (optionally our float64 schedule)."""
    sched = DPMSolverMultistepScheduler(num_train_timesteps=T, **SCHEDULE, algorithm_type="dpmsolver++",
                                        solver_order=2, solver_type="midpoint", lower_order_final=True,
                                        euler_at_final=False, final_sigmas_type="zero", prediction_type="epsilon",
                                        thresholding=clip, sample_max_value=1.0)
    if alphas_cumprod is not None:
        sched.alphas_cumprod = alphas_cumprod  # set_timesteps derives its sigmas from it
    sched.set_timesteps(timesteps=make_timesteps(T, steps, spacing, "dpmpp_2m")[::-1].tolist())  # descending
    x = x_T
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model(x, t.reshape(1)), t, x).prev_sample
    return x


def ours(ddpm: DDPM, x_T: torch.Tensor, steps: int, spacing: str = "trailing", clip: bool = False,
         sampler: str = "dpmpp_2m") -> torch.Tensor:
    return ddpm.sample(x_T.shape[0], x_T.shape[1:], num_steps=steps, sampler=sampler, timestep_spacing=spacing,
                       x_T=x_T, progress=False, clip_denoised=clip)


# ---- parity with diffusers -------------------------------------------------------------------------------

@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [10, 20])
def test_matches_diffusers_dpm_solver_multistep(steps: int, spacing: str, clip: bool) -> None:
    """The toy eps of tests/test_diffusers_parity.py (its x0 prediction leaves [-1, 1] at large t)."""
    ddpm = ddpm_with_toy()
    _, x_T = seeded(SEEDS, SHAPE)
    mine = ddpm.sample(len(SEEDS), SHAPE, num_steps=steps, sampler="dpmpp_2m", timestep_spacing=spacing,
                       seeds=SEEDS, x_T=x_T, progress=False, clip_denoised=clip)
    what = f"dpmpp_2m {steps} {spacing} clip={clip}"
    assert_close(mine, diffusers_dpmpp_2m(ddpm.model, x_T, steps, spacing, clip), STOCK_RTOL, what)
    theirs64 = diffusers_dpmpp_2m(ddpm.model, x_T, steps, spacing, clip, ddpm.alphas_cumprod)
    assert_close(mine, theirs64, FLOAT64_SCHEDULE_RTOL, f"{what}, our float64 schedule in diffusers")
    # clipping engages here (so the clip=True case compares the clamped branch), and DDIM is another sampler
    assert max_rel(mine, diffusers_dpmpp_2m(ddpm.model, x_T, steps, spacing, not clip)) > 1e-3
    assert max_rel(mine, ours(ddpm, x_T, steps, spacing, clip, sampler="ddim")) > 1e-2


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_with_unet_matches_diffusers(spacing: str) -> None:
    """A random tiny U-Net, 10 steps. Unclipped its x0 predictions (and the output, up to ~500) are huge:
    measured 5.7e-7 relative. Clipped the output is in [-1, 1] but keeps the float32 rounding of x_t
    amplified by 1 / alpha_t (~160 at t = 999) in the early x0 predictions: measured up to 1.4e-5."""
    ddpm = DDPM(tiny_unet(), T, BETA_START, BETA_END)
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    for clip, rtol in ((False, 3e-6), (True, 5e-5)):
        theirs = diffusers_dpmpp_2m(ddpm.model, x_T, 10, spacing, clip)
        assert_close(ours(ddpm, x_T, 10, spacing, clip), theirs, rtol, f"UNet dpmpp_2m {spacing} clip={clip}")


# ---- structure: first-order steps are DDIM -----------------------------------------------------------------

@pytest.mark.parametrize("clip", [False, True])
def test_first_and_last_steps_are_ddim(clip: bool) -> None:
    """With 2 steps both are first order (the first has no history, the last goes to sigma = 0): DDIM with
    eta 0 on the same timesteps (whose clipped step re-derives eps from the clipped x0, the same update):
    ``sampler="ddim"`` for trailing (999, 499), DDIM's loop on DPM-Solver's leading ones (666, 333). With 3
    steps the middle one has the 2M correction. The toy eps. Measured at 2 steps: 2.1e-6 relative (leading,
    from t = 666) and 1.8e-5 (trailing, from t = 999: the two x0 formulas' float32 rounding times
    1 / alpha_999 ~ 160); at 3 steps they differ by 9.0e-2 to 0.83 relative."""
    ddpm = ddpm_with_toy()
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))

    def ddim(steps: int, spacing: str) -> torch.Tensor:  # DDIM eta 0 over dpmpp_2m's timesteps
        ts = make_timesteps(T, steps, spacing, "dpmpp_2m")
        return ddpm.denoise(get_sampler("ddim")(ddpm.schedule, ts, x_T.device, 0.0, clip), x_T.clone())

    assert torch.equal(ddim(2, "trailing"), ours(ddpm, x_T, 2, "trailing", clip, sampler="ddim"))
    for spacing in ("leading", "trailing"):
        assert_close(ours(ddpm, x_T, 2, spacing, clip), ddim(2, spacing), 1e-4, f"2 steps {spacing} clip={clip}")
        assert max_rel(ours(ddpm, x_T, 3, spacing, clip), ddim(3, spacing)) > 1e-2


# ---- seeds --------------------------------------------------------------------------------------------------

def same_images_from_any_batching(sampler: str) -> tuple[DDPM, torch.Tensor, torch.Tensor, dict]:
    """Seeds [a, b, c, d] in one batch == [a] + [b, c, d] (hence any sharding), for ``sampler`` at 8 steps:
    bitwise with an elementwise eps (the toy), and with the U-Net for batches 4 vs 2 + 2; the reversed seeds give
    the images reversed; x_T drawn from the seeds themselves changes nothing. Returns the U-Net's DDPM, its four
    images [4, 3, 8, 8], that x_T and the sampling keywords, for the sampler's own checks.

    On CPU the U-Net itself is not bitwise batch-invariant at batch 1 (measured 1.1e-6 on one eps, 4.4e-6 to
    1.3e-5 after 8 steps depending on the thread count, the same for ddim and ddpm), so 1 + 3 is compared to 5e-5
    there: an image that depended on its batch neighbours would differ by 0.1 or more."""
    seeds, shape = [7, 21, 1000, 3], (3, 8, 8)
    kw = dict(num_steps=8, sampler=sampler, progress=False)
    toy = ddpm_with_toy()
    split = [toy.sample(1, shape, seeds=seeds[:1], **kw), toy.sample(3, shape, seeds=seeds[1:], **kw)]
    assert torch.equal(toy.sample(4, shape, seeds=seeds, **kw), torch.cat(split))
    ddpm = DDPM(tiny_unet(), T, BETA_START, BETA_END)
    four = ddpm.sample(4, shape, seeds=seeds, **kw)
    assert torch.equal(four, torch.cat([ddpm.sample(2, shape, seeds=seeds[:2], **kw),
                                        ddpm.sample(2, shape, seeds=seeds[2:], **kw)]))
    split = [ddpm.sample(1, shape, seeds=seeds[:1], **kw), ddpm.sample(3, shape, seeds=seeds[1:], **kw)]
    torch.testing.assert_close(torch.cat(split), four, rtol=0.0, atol=5e-5)
    assert torch.equal(ddpm.sample(4, shape, seeds=seeds[::-1], **kw), four.flip(0))
    assert len({im.numpy().tobytes() for im in four}) == 4 and four.abs().max() <= 1.0 and four.std() > 0.1
    x_T = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    assert torch.equal(ddpm.sample(4, shape, seeds=seeds, x_T=x_T, **kw), four)
    return ddpm, four, x_T, kw


def test_image_depends_on_its_seed_only() -> None:
    """The seeds only pick x_T (no noise afterwards): x_T drawn from them, given with other seeds, gives the same
    images."""
    ddpm, four, x_T, kw = same_images_from_any_batching("dpmpp_2m")
    assert torch.equal(ddpm.sample(4, x_T.shape[1:], seeds=[0, 1, 2, 9], x_T=x_T, **kw), four)


# ---- convergence to the probability-flow ODE -------------------------------------------------------------

def test_converges_to_ddim_at_1000_steps() -> None:
    """Both approximate the same ODE (unclipped, trailing: both start at t = 999). Relative to DDIM at 1000
    steps (itself first order: DDIM at 200 steps is 3.4e-3 from it), measured: 0.11 at 5 steps, 7.0e-4 at 200."""
    ddpm = DDPM(tiny_unet(), T, BETA_START, BETA_END)
    x_T = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    ref = ours(ddpm, x_T, T, sampler="ddim")
    far, near = max_rel(ours(ddpm, x_T, 5), ref), max_rel(ours(ddpm, x_T, 200), ref)
    assert near < 5e-3 and near < far / 10, (near, far)


class GaussianEps(nn.Module):
    """The exact eps of N(MU, SD^2) data: sigma (x - alpha MU) / (alpha^2 SD^2 + sigma^2), in float64."""

    MU, SD = 0.3, 0.5

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.ac = alphas_cumprod

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.ac[t.cpu()].view(-1, *([1] * (x.ndim - 1)))
        return ((1 - a).sqrt() * (x.double() - a.sqrt() * self.MU) / (a * self.SD**2 + 1 - a)).to(x.dtype)


def test_second_order_against_the_exact_ode_solution() -> None:
    """Gaussian data: the ODE maps x at t to MU + SD (x - alpha_t MU) / sqrt(alpha_t^2 SD^2 + sigma_t^2).
    Doubling the steps (trailing) divides DPM-Solver++(2M)'s error by ~4 or more (measured 0.27 -> 0.062 ->
    0.0025 at 10, 20, 40 steps) and DDIM's by ~2 (0.37 -> 0.19 -> 0.10)."""
    ddpm = DDPM(nn.Identity(), T, BETA_START, BETA_END)
    ddpm.model = GaussianEps(ddpm.alphas_cumprod)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    a = ddpm.alphas_cumprod[T - 1]  # trailing spacing starts at t = T - 1
    exact = GaussianEps.MU + GaussianEps.SD * (x_T.double() - a.sqrt() * GaussianEps.MU) / (
        a * GaussianEps.SD**2 + 1 - a).sqrt()

    def err(steps: int, sampler: str) -> float:
        return float((ours(ddpm, x_T, steps, sampler=sampler).double() - exact).abs().max())

    dpm10, dpm20, ddim20 = err(10, "dpmpp_2m"), err(20, "dpmpp_2m"), err(20, "ddim")
    assert dpm20 < dpm10 / 3 and dpm20 < ddim20 / 2, (dpm10, dpm20, ddim20)
    assert err(10, "ddim") / ddim20 < 3  # DDIM is first order: the same margin would fail for it

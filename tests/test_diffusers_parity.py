"""Parity with diffusers: ``DDPMScheduler`` / ``DDIMScheduler`` / ``DPMSolverMultistepScheduler`` and
``UNet2DModel`` against ``ddpm``.

diffusers is a test extra (``pip install -e '.[test]'``): without it this module fails at collection, it
does not skip. What is compared, and to what tolerance:

* schedule: our float64 betas / alphas / alphas_cumprod against diffusers' float32 ones, to float32
  rounding (betas 2e-7 relative, alphas_cumprod 1e-6 relative; measured 1.1e-7 and 3.6e-7), and the
  timesteps each sampler visits (exactly) for every ``timestep_spacing`` we accept: leading is T // S spaced
  from 0 in DDPM/DDIM, T // (S + 1) spaced from T // (S + 1) in DPM-Solver (its last step goes to sigma 0);
* one ancestral step (``DDPM.reverse_process`` against ``DDPMScheduler.step``, fixed_small and fixed_large,
  with and without x0 clipping, t from 0 to T-1), in float64 with our float64 schedule put into the
  scheduler, so only the step's algebra is compared: 1e-12 relative (measured 1.5e-13);
* whole sampling loops (``DDPM.sample`` against the scheduler loop of diffusers' pipelines, same x_T and
  the same per-image noise through per-image generators, a fixed smooth eps function): DDPM respaced to 10
  and 50 steps (and all 1000), DDIM with eta 0 and 1 at 10 and 50 steps, leading and trailing spacing. They
  run in float32, against diffusers as it is (2e-5 relative to the largest value, 1e-4 at 1000 steps:
  its float32 schedule's rounding accumulates; measured up to 4.8e-6 and 2.1e-5) and against diffusers
  given our float64 schedule (3e-6; measured up to 7.8e-7, float32 arithmetic alone); and DPM-Solver++(2M)
  (``sampler="dpmpp_2m"``) against ``DPMSolverMultistepScheduler`` picking its own timesteps (its
  ``timestep_spacing``), 10 and 20 steps, every spacing, with and without clipping, to the same tolerances
  (measured up to 7.8e-7 and 8.1e-7; tests/test_dpm_solver.py has the rest of its tests);
* the U-Net: ours and the ``UNet2DModel`` twin of ``tools.diffusers_twin`` (base 32, channel_mult [1, 2],
  attention at 8x8 with 2 heads, 16x16 images), holding the same random weights, give the same eps in
  eval mode: float64 1e-12 relative (measured ~3e-15), float32 1e-5 (measured 1.4e-6); equal parameter
  counts; and 10 sampling steps of each in its own loop agree to 1e-4 (measured 1.2e-5).

Two conventions differ from diffusers' defaults, and the tests pin down which one ours is:

* DDIM with clipping re-derives eps from the clipped x0 (improved-diffusion): diffusers'
  ``use_clipped_model_output=True``; its default (False, also in ``DDIMPipeline`` and in
  ``tools.diffusers_twin.diffusers_loop``) is a different sampler once clipping engages.
* The last ancestral step adds no noise (Ho et al. Algorithm 2: z = 0 at the last step). diffusers'
  ``DDPMScheduler.step`` tests ``timestep > 0`` instead, so with trailing spacing (last timestep
  T/S - 1 > 0) it adds noise at the last step too: sqrt(1e-20) z for fixed_small (nothing), but
  sqrt(beta'_0) z = sqrt(1 - abar_{t_0}) z for fixed_large (std 0.32 for T=1000 at 10 steps, 0.076 at 50),
  though the previous abar there is 1 (the posterior is a point mass at x0). The loop tests compare with
  that last-step noise left out and check its size separately.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

try:
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as err:  # a hard failure, not a skip: diffusers is part of the test extra
    raise ImportError("tests/test_diffusers_parity.py needs diffusers, a test extra: pip install -e '.[test]'") \
        from err

from ddpm.config import Config, DataConfig, DDPMConfig, ModelConfig, SamplingConfig, Spacing, choices
from ddpm.diffusion import DDPM, make_timesteps
from ddpm.unet import UNet
from tools.diffusers_twin import build_pair, diffusers_loop, diffusers_to_ours, diffusers_unet, sample_of

T, BETA_START, BETA_END = 1000, 1e-4, 0.02
SCHEDULE = dict(beta_start=BETA_START, beta_end=BETA_END, beta_schedule="linear")
# float32 loops, relative to the largest value of diffusers' result: against diffusers as it is (its float32
# schedule's rounding grows with the number of steps) and against diffusers given our float64 schedule
# (float32 arithmetic alone: a few ulps whatever the number of steps).
STOCK_RTOL = {10: 2e-5, 20: 2e-5, 50: 2e-5, 1000: 1e-4}  # measured up to 2.8e-6 (10), 4.8e-6 (50), 2.1e-5 (1000)
FLOAT64_SCHEDULE_RTOL = 3e-6  # measured up to 7.8e-7
SPACINGS = choices(Spacing)  # every timestep_spacing DDPM.sample accepts
SCHEDULERS = ((DDPMScheduler, "ddpm"), (DDIMScheduler, "ddim"), (DPMSolverMultistepScheduler, "dpmpp_2m"))


def max_rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (what the loop tolerances bound)."""
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp(min=1e-3))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """Equal to ``rtol`` relative to ``expected``'s largest value (also where it is near zero)."""
    scale = max(float(expected.abs().max()), 1e-3)
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=rtol * scale,
                               msg=lambda m: f"{what}: max rel {max_rel(actual, expected):.2e}\n{m}")


class ToyDenoiser(nn.Module):
    """A fixed eps(x_t, t): the exact eps of N(0, SD^2) data plus a bounded wiggle.

    ``sqrt(1 - a) x / (a SD^2 + 1 - a) + 0.1 sin(3 x)`` with a = abar_t (float64, ours), computed in x's
    dtype. The wiggle makes the x0 prediction leave [-1, 1] at large t, so clipping is exercised.
    """

    SD = 0.5

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.ac = alphas_cumprod.to(torch.float64)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.ac[torch.as_tensor(t).reshape(-1).long().cpu()].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return (1 - a).sqrt() * x / (a * self.SD**2 + 1 - a) + 0.1 * torch.sin(3 * x)


def ddpm_with_toy(variance: str = "fixed_small") -> DDPM:
    ddpm = DDPM(nn.Identity(), T, BETA_START, BETA_END, variance=variance)
    ddpm.model = ToyDenoiser(ddpm.alphas_cumprod)
    return ddpm


def float64_scheduler(sched: DDPMScheduler | DDIMScheduler, ddpm: DDPM) -> DDPMScheduler | DDIMScheduler:
    """``sched`` with our float64 schedule in place of its float32 one (the step's algebra alone)."""
    sched.betas, sched.alphas, sched.alphas_cumprod = ddpm.betas, ddpm.alphas, ddpm.alphas_cumprod
    one = torch.tensor(1.0, dtype=torch.float64)
    if isinstance(sched, DDPMScheduler):
        sched.one = one
    else:
        assert sched.config.set_alpha_to_one
        sched.final_alpha_cumprod = one
    return sched


# ---- the schedule ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_timesteps", [1000, 50])
def test_schedule_matches_diffusers(num_timesteps: int) -> None:
    ddpm = DDPM(nn.Identity(), num_timesteps, BETA_START, BETA_END)
    for cls in (DDPMScheduler, DDIMScheduler):
        sched = cls(num_train_timesteps=num_timesteps, **SCHEDULE)
        for name, rtol in (("betas", 2e-7), ("alphas", 2e-7), ("alphas_cumprod", 1e-6)):
            theirs = getattr(sched, name)
            assert theirs.dtype == torch.float32  # diffusers keeps its schedule in float32
            torch.testing.assert_close(getattr(ddpm, name), theirs.double(), rtol=rtol, atol=0.0,
                                       msg=lambda m, n=name, c=cls.__name__: f"{c}.{n}: {m}")


@pytest.mark.parametrize("spacing", SPACINGS)
def test_timesteps_match_diffusers(spacing: str) -> None:
    """Each sampler visits the timesteps diffusers' scheduler for it picks from its ``timestep_spacing``."""
    for steps in (1, 10, 20, 50, T - 1, T):
        for cls, sampler in SCHEDULERS:
            sched = cls(num_train_timesteps=T, timestep_spacing=spacing, **SCHEDULE)
            sched.set_timesteps(steps)
            if (sampler, spacing, steps) == ("dpmpp_2m", "leading", T):  # T // (T + 1) = 0: t = 0, T times
                assert sched.timesteps.tolist() == [0] * T
                with pytest.raises(ValueError, match=f"num_steps={T}: expected an integer in \\[1, {T - 1}\\]"):
                    make_timesteps(T, steps, spacing, sampler)
                continue
            ours = make_timesteps(T, steps, spacing, sampler)[::-1]  # diffusers lists them descending
            assert sched.timesteps.tolist() == ours.tolist(), (cls.__name__, steps)
    if spacing == "leading":  # T // S from 0 (DDIM paper) vs T // (S + 1) without 0 (DPM-Solver)
        assert make_timesteps(T, 10, spacing, "ddim").tolist() == list(range(0, 1000, 100))
        assert make_timesteps(T, 10, spacing, "dpmpp_2m").tolist() == list(range(90, 901, 90))


# ---- one ancestral step, float64 --------------------------------------------------------------------------

@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_reverse_process_matches_ddpm_scheduler_step(variance: str, clip: bool) -> None:
    """x_{t-1} from ``reverse_process`` == ``DDPMScheduler.step`` (same eps, x_t and noise), float64."""
    ddpm = ddpm_with_toy(variance)
    sched = float64_scheduler(DDPMScheduler(num_train_timesteps=T, variance_type=variance, clip_sample=clip,
                                            clip_sample_range=1.0, **SCHEDULE), ddpm)
    shape = (3, 2, 4, 4)
    clipped = 0
    for k, t in enumerate([0, 1, 2, 10, 250, 500, 998, 999]):
        x_t = 1.5 * torch.randn(shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(100 + k), dtype=torch.float64)
        ours = ddpm.reverse_process(x_t, torch.full((shape[0],), t), noise, clip_denoised=clip)
        out = sched.step(ddpm.model(x_t, torch.tensor([t])), t, x_t,
                         generator=torch.Generator().manual_seed(100 + k))  # draws the same noise for t > 0
        assert ours.dtype == torch.float64
        assert_close(ours, out.prev_sample, 1e-12, f"t={t}")
        clipped += int((out.pred_original_sample.abs() == 1.0).sum()) if clip else 0
    assert not clip or clipped > 0  # the clipped branch was taken


# ---- whole sampling loops, float32 -----------------------------------------------------------------------

def diffusers_sample(sched: DDPMScheduler | DDIMScheduler, model: nn.Module, x_T: torch.Tensor,
                     gens: list[torch.Generator], steps: int, eta: float | None = None,
                     use_clipped_model_output: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' pipeline loop (DDPMPipeline / DDIMPipeline) from ``x_T`` with per-image generators.

    Returns (its output, its output without the noise of the last step): at the last step the previous
    abar is 1, so the step's mean is its x0 prediction exactly (coefficients 1 and 0).
    """
    sched.set_timesteps(steps)
    x, out = x_T, None
    for t in sched.timesteps:
        eps = model(x, t.reshape(1))
        if eta is None:
            out = sched.step(eps, t, x, generator=gens)
        else:
            out = sched.step(eps, t, x, eta=eta, generator=gens, use_clipped_model_output=use_clipped_model_output)
        x = out.prev_sample
    return x, out.pred_original_sample


def seeded(seeds: list[int], shape: tuple[int, ...]) -> tuple[list[torch.Generator], torch.Tensor]:
    """Per-image generators and x_T drawn from them (as ``DDPM.sample(seeds=...)`` draws it)."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return gens, randn_tensor((len(seeds), *shape), generator=gens, dtype=torch.float32)


SEEDS, SHAPE = [3, 14, 15], (2, 6, 6)


def loop_pair(sched_cls: type, ddpm: DDPM, steps: int, eta: float | None = None, use_clipped_model_output: bool = True,
              **kw) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """diffusers' loop with its own schedule and with ours (float64), each from x_T and SEEDS; and x_T."""
    runs = []
    for schedule64 in (False, True):
        gens, x_T = seeded(SEEDS, SHAPE)
        sched = sched_cls(num_train_timesteps=T, clip_sample=True, clip_sample_range=1.0, **SCHEDULE, **kw)
        if schedule64:
            sched = float64_scheduler(sched, ddpm)
        runs.append(diffusers_sample(sched, ddpm.model, x_T.clone(), gens, steps, eta, use_clipped_model_output))
    return runs[0], runs[1], x_T


# at S = T both spacings visit every timestep
@pytest.mark.parametrize("steps,spacing", [(10, "leading"), (10, "trailing"), (50, "leading"), (50, "trailing"),
                                           (T, "leading")])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_sampler_matches_ddpm_scheduler_loop(variance: str, steps: int, spacing: str) -> None:
    """``DDPM.sample(sampler="ddpm")`` (respaced for S < T) == the DDPMScheduler loop, without diffusers'
    last-step noise (see the module docstring), whose size is checked on its own."""
    ddpm = ddpm_with_toy(variance)
    (theirs, theirs_mean), (_, theirs64_mean), x_T = loop_pair(DDPMScheduler, ddpm, steps, variance_type=variance,
                                                                  timestep_spacing=spacing)
    ours = ddpm.sample(len(SEEDS), SHAPE, num_steps=steps, sampler="ddpm", timestep_spacing=spacing,
                       seeds=SEEDS, x_T=x_T, progress=False)
    what = f"ddpm {variance} {steps} {spacing}"
    assert_close(ours, theirs_mean, STOCK_RTOL[steps], what)
    assert_close(ours, theirs64_mean, FLOAT64_SCHEDULE_RTOL, f"{what}, our float64 schedule in diffusers")
    # diffusers' last-step noise: it adds noise whenever the last timestep is > 0 (trailing spacing)
    t_last = int(make_timesteps(T, steps, spacing)[0])
    extra = float((theirs - theirs_mean).std())
    if t_last == 0:
        assert extra == 0.0
    elif variance == "fixed_small":
        assert extra < 1e-9  # sqrt(clamp(0, min=1e-20)) z
    else:  # sqrt(beta'_0) z = sqrt(1 - abar_{t_0}) z, which ours (Algorithm 2) does not add; 216 draws: 5% std
        expected = float((1 - ddpm.alphas_cumprod[t_last]).sqrt())
        assert abs(extra / expected - 1) < 0.25, (extra, expected)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_sampler_matches_ddim_scheduler_loop(eta: float, steps: int, spacing: str) -> None:
    """``DDPM.sample(sampler="ddim")`` == the DDIMScheduler loop with ``use_clipped_model_output=True``."""
    ddpm = ddpm_with_toy()
    kw = dict(set_alpha_to_one=True, timestep_spacing=spacing)
    (theirs, _), (theirs64, _), x_T = loop_pair(DDIMScheduler, ddpm, steps, eta, **kw)
    ours = ddpm.sample(len(SEEDS), SHAPE, num_steps=steps, sampler="ddim", eta=eta, timestep_spacing=spacing,
                       seeds=SEEDS, x_T=x_T, progress=False)
    what = f"ddim eta={eta} {steps} {spacing}"
    assert_close(ours, theirs, STOCK_RTOL[steps], what)
    assert_close(ours, theirs64, FLOAT64_SCHEDULE_RTOL, f"{what}, our float64 schedule in diffusers")
    # diffusers' default DDIM (use_clipped_model_output=False) is another sampler once x0 is clipped
    (default, _), _, _ = loop_pair(DDIMScheduler, ddpm, steps, eta, use_clipped_model_output=False, **kw)
    assert max_rel(ours, default) > 1e-3


def dpm_solver_loop(model: nn.Module, x_T: torch.Tensor, steps: int, spacing: str, clip: bool,
                    alphas_cumprod: torch.Tensor | None = None, timesteps: list[int] | None = None) -> torch.Tensor:
    """diffusers' DPM-Solver++(2M) loop from ``x_T`` [B, ...] -> x0 [B, ...]: its timesteps from its own
    ``timestep_spacing`` (or ``timesteps``, descending), optionally our float64 alphas_cumprod [T].

    dpmsolver++, order 2, midpoint, lower_order_final, final_sigmas_type "zero"; clipping is its
    ``thresholding=True, sample_max_value=1.0`` (the threshold s is clamped to [1, 1]: a clamp to [-1, 1]).
    """
    sched = DPMSolverMultistepScheduler(num_train_timesteps=T, **SCHEDULE, algorithm_type="dpmsolver++",
                                        solver_order=2, solver_type="midpoint", lower_order_final=True,
                                        euler_at_final=False, final_sigmas_type="zero", prediction_type="epsilon",
                                        thresholding=clip, sample_max_value=1.0, timestep_spacing=spacing)
    if alphas_cumprod is not None:
        sched.alphas_cumprod = alphas_cumprod  # set_timesteps derives its sigmas from it
    sched.set_timesteps(None if timesteps is not None else steps, timesteps=timesteps)
    x = x_T
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model(x, t.reshape(1)), t, x).prev_sample
    return x


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_2m_sampler_matches_dpm_solver_multistep_loop(steps: int, spacing: str, clip: bool) -> None:
    """``DDPM.sample(sampler="dpmpp_2m")`` == the DPMSolverMultistepScheduler loop, each picking its own
    timesteps from ``timestep_spacing``; the toy eps (its x0 prediction leaves [-1, 1] at large t)."""
    ddpm = ddpm_with_toy()
    _, x_T = seeded(SEEDS, SHAPE)
    ours = ddpm.sample(len(SEEDS), SHAPE, num_steps=steps, sampler="dpmpp_2m", timestep_spacing=spacing,
                       seeds=SEEDS, x_T=x_T, progress=False, clip_denoised=clip)
    what = f"dpmpp_2m {steps} {spacing} clip={clip}"
    assert_close(ours, dpm_solver_loop(ddpm.model, x_T, steps, spacing, clip), STOCK_RTOL[steps], what)
    theirs64 = dpm_solver_loop(ddpm.model, x_T, steps, spacing, clip, ddpm.alphas_cumprod)
    assert_close(ours, theirs64, FLOAT64_SCHEDULE_RTOL, f"{what}, our float64 schedule in diffusers")
    # clipping engages here, so the clip=True case compares the clamped branch
    assert max_rel(ours, dpm_solver_loop(ddpm.model, x_T, steps, spacing, not clip)) > 1e-3


# ---- the U-Net and its diffusers twin --------------------------------------------------------------------

def twin_config(use_scale_shift_norm: bool = True, image_size: int = 16, num_res_blocks: int = 2,
                **ddpm_and_sampling) -> Config:
    """base 32, channel_mult [1, 2], attention at the lower level (image_size / 2), 2 heads, dropout 0.1."""
    model = ModelConfig(in_channels=3, base_channels=32, channel_mult=[1, 2], num_res_blocks=num_res_blocks,
                        attention_resolutions=[image_size // 2], num_heads=2, dropout=0.1,
                        use_scale_shift_norm=use_scale_shift_norm)
    sampling_keys = {f.name for f in dataclasses.fields(SamplingConfig)}
    sampling = {"num_steps": 10, **{k: v for k, v in ddpm_and_sampling.items() if k in sampling_keys}}
    ddpm = {k: v for k, v in ddpm_and_sampling.items() if k not in sampling_keys}
    return Config(model=model, data=DataConfig(image_size=image_size), ddpm=DDPMConfig(**ddpm),
                  sampling=SamplingConfig(**sampling))


def random_twins(cfg: Config, seed: int = 0) -> tuple[UNet, nn.Module]:
    """(ours, diffusers') with the same random weights: every parameter drawn, zero-initialised ones and the
    norms' affine ones too, so no layer is trivial."""
    torch.manual_seed(seed)
    theirs = diffusers_unet(cfg.model, cfg.data.image_size)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            norm_scale = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn_like(p) * (0.1 if p.ndim > 1 else 0.3) + (1.0 if norm_scale else 0.0))
    ours = UNet.from_config(cfg.model, cfg.data.image_size)
    ours.load_state_dict(diffusers_to_ours(theirs.state_dict(), len(cfg.model.channel_mult),
                                           cfg.model.num_res_blocks))  # strict: every parameter has its twin
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize("use_scale_shift_norm", [True, False])
def test_unet_matches_unet2dmodel_float64(use_scale_shift_norm: bool) -> None:
    cfg = twin_config(use_scale_shift_norm)
    ours, theirs = random_twins(cfg)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    ours.double()
    theirs.double()
    # both embed t in float32 (the same ops); ours then needs the embedding cast to its float64 MLP
    ours.time_mlp.register_forward_pre_hook(lambda _m, args: (args[0].double(),))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 7, 500, 999])
    with torch.no_grad():
        eps_ours, eps_theirs = ours(x, t), sample_of(theirs)(x, t)
    assert eps_ours.dtype == eps_theirs.dtype == torch.float64
    assert float(eps_theirs.abs().max()) > 0.1  # a real output
    assert_close(eps_ours, eps_theirs, 1e-12, "float64 eps")
    with torch.no_grad():  # eval mode: dropout (0.1 here) is off in both, so a second call is identical
        assert torch.equal(ours(x, t), eps_ours) and torch.equal(sample_of(theirs)(x, t), eps_theirs)


def test_unet_matches_unet2dmodel_float32_and_build_pair() -> None:
    cfg = twin_config()
    ours, theirs = random_twins(cfg, seed=1)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([3, 100, 640, 999])
    with torch.no_grad():
        assert_close(ours(x, t), sample_of(theirs)(x, t), 1e-5, "float32 eps")
    # the tool's own check (diffusers' initialisation)
    ours, theirs, diff = build_pair(cfg, torch.device("cpu"))
    assert diff < 1e-5
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_sampling_with_unet_matches_diffusers_twin(spacing: str) -> None:
    """Ours (our UNet in ``DDPM.sample``) against the twin in diffusers' loop, 10 steps, one 8x8 image, seed 0.

    DDPM through ``tools.diffusers_twin.diffusers_loop`` itself (it draws x_T and each step's noise from one
    generator seeded 0, as ``seeds=[0]`` does). DDIM (eta 1) through ``diffusers_sample``: the tool's DDIM
    keeps diffusers' default ``use_clipped_model_output=False``, another sampler here (a random U-Net's
    x0 prediction is clipped almost everywhere).
    """
    cfg = twin_config(image_size=8, num_res_blocks=1, num_timesteps=T, beta_start=BETA_START, beta_end=BETA_END,
                      num_steps=10, timestep_spacing=spacing, eta=1.0)
    ours, theirs = random_twins(cfg, seed=2)
    net, diffusion, shape = sample_of(theirs), DDPM.from_config(cfg.ddpm, ours), (1, 3, 8, 8)
    kw = dict(num_steps=10, timestep_spacing=spacing, seeds=[0], progress=False)
    expected = diffusers_loop(net, cfg, "ddpm", 10, 10, shape, torch.device("cpu"))
    assert_close(diffusion.sample(1, shape[1:], sampler="ddpm", **kw), expected, 1e-4, f"UNet ddpm {spacing}")
    gens, x_T = seeded([0], shape[1:])
    sched = DDIMScheduler(num_train_timesteps=T, clip_sample=True, set_alpha_to_one=True, timestep_spacing=spacing,
                          **SCHEDULE)
    with torch.no_grad():
        expected, _ = diffusers_sample(sched, net, x_T, gens, 10, eta=1.0)
    assert_close(diffusion.sample(1, shape[1:], sampler="ddim", eta=1.0, **kw), expected, 1e-4,
                 f"UNet ddim eta=1 {spacing}")


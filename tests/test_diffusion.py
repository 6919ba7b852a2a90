"""DDPM schedule, loss, reverse step and samplers, checked against independent float64 computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_unet
from torch import nn

from ddpm.config import DDPMConfig
from ddpm.diffusion import DDPM, make_timesteps

T = 1000


def numpy_schedule(T: int = T, b0: float = 1e-4, b1: float = 0.02) -> dict[str, np.ndarray]:
    """Ho et al. 2020 quantities written out element by element in float64 (no torch involved)."""
    betas = np.linspace(b0, b1, T, dtype=np.float64)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    return {
        "betas": betas, "alphas": alphas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac), "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.concatenate([[post_var[1]], post_var[1:]])),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }


class Dummy(nn.Module):
    """eps_theta = 0, with one parameter so DDPM can find the device."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))
        self.seen_training: list[bool] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        return x * self.p


def test_schedule_matches_float64_numpy() -> None:
    ddpm = DDPM(Dummy(), T, 1e-4, 0.02)
    for name, ref in numpy_schedule().items():
        got = getattr(ddpm, name)
        assert got.dtype == torch.float64, name
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=0, err_msg=name)


def test_timestep_spacing_matches_diffusers_definitions() -> None:
    leading = make_timesteps(1000, 50, "leading")
    assert leading.tolist() == list(range(0, 1000, 20))
    np.testing.assert_array_equal(leading, np.arange(0, 50) * (1000 // 50))
    trailing = make_timesteps(1000, 50, "trailing")
    np.testing.assert_array_equal(trailing, np.sort(np.round(np.arange(1000, 0, -1000 / 50)).astype(int) - 1))
    assert trailing[-1] == 999 and trailing[0] == 19
    assert make_timesteps(1000, 1000, "leading").tolist() == list(range(1000))
    assert make_timesteps(1000, 1000, "trailing").tolist() == list(range(1000))


def test_forward_process_and_loss_metrics() -> None:
    ddpm = DDPM(Dummy(), T, 1e-4, 0.02)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 1, 4, 4, generator=g), torch.randn(6, 1, 4, 4, generator=g)
    t = torch.tensor([0, 10, 300, 999, 260, 20])
    ref = numpy_schedule()
    x_t, n = ddpm.forward_process(x0, t, noise)
    a = torch.from_numpy(ref["alphas_cumprod"][t.numpy()]).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise)  # Ho eq. 4
    assert n is noise
    loss, metrics = ddpm.compute_loss(x0, t, noise)  # model predicts 0: per-sample loss = mean(noise^2)
    per = noise.square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, per.mean())
    assert set(metrics) == {"loss", "losses"}
    torch.testing.assert_close(metrics["losses"], per)  # per-sample [B]; the trainer bins it by t
    assert not metrics["losses"].requires_grad and metrics["loss"].ndim == 0
    torch.manual_seed(0)
    loss, metrics = ddpm.compute_loss(x0)  # t and noise drawn from the global RNG
    assert loss.ndim == 0 and metrics["loss"] == loss.detach()


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_reverse_process_one_step(variance: str) -> None:
    ddpm = DDPM(Dummy(), T, 1e-4, 0.02, variance=variance)
    ref = numpy_schedule()
    x = torch.rand(3, 1, 2, 2) * 2 - 1
    z = torch.randn(3, 1, 2, 2)
    t = torch.tensor([0, 1, 500])
    out = ddpm.reverse_process(x, t, z, clip_denoised=False)
    tn = t.numpy()
    x0 = ref["sqrt_recip_alphas_cumprod"][tn].reshape(-1, 1, 1, 1) * x.double().numpy()  # eps = 0
    mean = ref["posterior_mean_coef1"][tn].reshape(-1, 1, 1, 1) * x0 + \
        ref["posterior_mean_coef2"][tn].reshape(-1, 1, 1, 1) * x.double().numpy()
    if variance == "fixed_small":
        var = ref["posterior_variance"][np.maximum(tn, 1)]
    else:  # improved-diffusion: beta_t, with beta~_1 at t = 0 (unused there: no noise at t = 0)
        var = np.where(tn == 0, ref["posterior_variance"][1], ref["betas"][tn])
    expect = mean + (tn != 0).reshape(-1, 1, 1, 1) * np.sqrt(var).reshape(-1, 1, 1, 1) * z.double().numpy()
    np.testing.assert_allclose(out.detach().double().numpy(), expect, rtol=1e-5, atol=1e-6)


# ---- oracle: Gaussian data, where the optimal eps-predictor is known in closed form ----------

MU, SD = 0.1, 0.3  # data N(MU, SD^2): |MU| + 3 SD = 1, so clipping is not needed (and is off)


class GaussianOracle(nn.Module):
    """E[eps | x_t] for x0 ~ N(mu, s^2): sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a), a = abar_t."""

    def __init__(self, alphas_cumprod: np.ndarray, mu: float, sd: float):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.ac = torch.from_numpy(alphas_cumprod)
        self.mu, self.sd = mu, sd

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.ac[t].view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * (x.double() - a.sqrt() * self.mu) / (a * self.sd**2 + 1 - a)
        return eps.to(x.dtype)


def sampler_law(sampler: str, steps: int, eta: float, variance: str) -> tuple[float, float]:
    """Exact mean and std of the discrete sampler's output under the oracle (float64 recursion).

    Every step is affine in x plus independent Gaussian noise, so x stays Gaussian:
    m <- A m + B, v <- A^2 v + sigma^2, from x_T ~ N(0, 1). This is the sampler's own law; it
    differs from N(MU, SD^2) by the discretisation bias (a fixed variance cannot carry Var[x0 | x_t],
    Bao et al. 2022), reported by ``test_oracle_sampling``'s bound.
    """
    ts = np.arange(steps) * (T // steps)  # leading spacing
    a = numpy_schedule()["alphas_cumprod"][ts]
    ap = np.concatenate([[1.0], a[:-1]])
    m, v = 0.0, 1.0
    for i in reversed(range(steps)):
        den = a[i] * SD**2 + 1 - a[i]
        r, w = np.sqrt(1 - a[i]) / den, -np.sqrt(1 - a[i]) * np.sqrt(a[i]) * MU / den  # eps = r x + w
        p, q = (1 - np.sqrt(1 - a[i]) * r) / np.sqrt(a[i]), -np.sqrt(1 - a[i]) * w / np.sqrt(a[i])  # x0
        if sampler == "ddpm":
            beta = 1 - a[i] / ap[i]
            c1, c2 = beta * np.sqrt(ap[i]) / (1 - a[i]), np.sqrt(1 - beta) * (1 - ap[i]) / (1 - a[i])
            A, B = c1 * p + c2, c1 * q
            post = beta * (1 - ap[i]) / (1 - a[i])
            var = 0.0 if i == 0 else (post if variance == "fixed_small" else beta)
        else:
            var = eta**2 * (1 - ap[i]) / (1 - a[i]) * (1 - a[i] / ap[i])
            k = np.sqrt(1 - ap[i] - var)
            A, B = np.sqrt(ap[i]) * p + k * r, np.sqrt(ap[i]) * q + k * w
        m, v = A * m + B, A * A * v + var
    return m, float(np.sqrt(v))


@pytest.mark.parametrize(
    "sampler,steps,eta,variance,std_bias_bound",
    [
        ("ddpm", 1000, 0.0, "fixed_small", 0.015),
        ("ddpm", 1000, 0.0, "fixed_large", 0.015),
        ("ddpm", 100, 0.0, "fixed_small", 0.10),
        ("ddim", 50, 0.0, "fixed_small", 0.10),
        ("ddim", 50, 1.0, "fixed_small", 0.17),
    ],
)
def test_oracle_sampling(sampler: str, steps: int, eta: float, variance: str, std_bias_bound: float) -> None:
    """Samples with the exact eps* reproduce N(MU, SD^2) up to sampling noise plus discretisation bias.

    Pixels are i.i.d. (the oracle is elementwise), so with N = 64*32*32 = 65536 draws the standard
    error of the sample mean is sd/sqrt(N) and that of the sample std sd/sqrt(2N) (Gaussian). We allow
    5 standard errors (two-sided p ~ 6e-7) around the sampler's exact law (``sampler_law``), whose
    distance to the data law is the discretisation bias: under 0.1% of SD for the mean, and for the
    std under ``std_bias_bound`` relative (the std shrinks with fewer steps and fixed_small variance).
    """
    ddpm = DDPM(GaussianOracle(numpy_schedule()["alphas_cumprod"], MU, SD), T, 1e-4, 0.02, variance=variance)
    torch.manual_seed(1234)
    x = ddpm.sample(64, (1, 32, 32), num_steps=steps, sampler=sampler, eta=eta, progress=False,
                    clip_denoised=False).double()
    n = x.numel()
    m_law, sd_law = sampler_law(sampler, steps, eta, variance)
    assert abs(x.mean().item() - m_law) < 5 * sd_law / np.sqrt(n)
    assert abs(x.std().item() - sd_law) < 5 * sd_law / np.sqrt(2 * n)
    assert abs(m_law - MU) < 1e-3 * SD  # the mean is unbiased
    assert abs(sd_law - SD) < std_bias_bound * SD  # the std's discretisation bias


# ---- seeds: image i depends on seeds[i] only -----------------------------------------------


@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", 4, 0.0), ("ddim", 4, 1.0)])
def test_seeds_batch_independent_bitwise(sampler: str, steps: int, eta: float) -> None:
    ddpm = DDPM(tiny_unet(16), T, 1e-4, 0.02)
    kw = dict(num_steps=steps, sampler=sampler, eta=eta, progress=False)
    shape = (3, 16, 16)
    seeds = list(range(100, 112))
    one = ddpm.sample(8, shape, seeds=seeds[:8], **kw)
    two = torch.cat([ddpm.sample(4, shape, seeds=seeds[:4], **kw), ddpm.sample(4, shape, seeds=seeds[4:8], **kw)])
    assert torch.equal(one, two)
    # batch sizes 12 vs 5 + 5 + 2, and the seeds in reverse order
    twelve = ddpm.sample(12, shape, seeds=seeds, **kw)
    fives = [ddpm.sample(len(c), shape, seeds=c, **kw) for c in (seeds[:5], seeds[5:10], seeds[10:])]
    assert torch.equal(twelve, torch.cat(fives)) and torch.equal(twelve[:8], one)
    assert torch.equal(ddpm.sample(8, shape, seeds=seeds[:8][::-1], **kw), one.flip(0))
    assert one.abs().max() <= 1.0 and not torch.equal(one[0], one[1])
    # x_T equal to the seeds' own initial noise changes nothing (per-step noise is unaffected).
    x_T = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds[:8]])
    assert torch.equal(ddpm.sample(8, shape, seeds=seeds[:8], x_T=x_T, **kw), one)


def test_sample_eval_mode_and_restore() -> None:
    model = Dummy().train()
    ddpm = DDPM(model, 10, 1e-4, 0.02)
    out = ddpm.sample(2, (1, 2, 2), num_steps=3, sampler="ddim", progress=False)
    assert out.shape == (2, 1, 2, 2) and model.training and model.seen_training == [False] * 3


def test_bad_input_names_the_value() -> None:
    ddpm = DDPM(Dummy(), 100, 1e-4, 0.02)
    with pytest.raises(ValueError, match="num_steps=101"):
        ddpm.sample(1, (1, 2, 2), num_steps=101, progress=False)
    with pytest.raises(ValueError, match="num_steps=0"):
        ddpm.sample(1, (1, 2, 2), num_steps=0, progress=False)
    with pytest.raises(ValueError, match="'dpm'"):
        ddpm.sample(1, (1, 2, 2), sampler="dpm", progress=False)
    with pytest.raises(ValueError, match="'linspace'"):
        ddpm.sample(1, (1, 2, 2), timestep_spacing="linspace", progress=False)
    with pytest.raises(ValueError, match="batch_size=0"):
        ddpm.sample(0, (1, 2, 2), progress=False)
    with pytest.raises(ValueError, match="3 seeds"):
        ddpm.sample(2, (1, 2, 2), seeds=[1, 2, 3], progress=False)
    with pytest.raises(ValueError, match="'learned'"):
        DDPM(Dummy(), 100, 1e-4, 0.02, variance="learned")


def test_from_config_and_state_dict() -> None:
    cfg = DDPMConfig(num_timesteps=50, beta_start=2e-4, beta_end=0.03, variance="fixed_large")
    ddpm = DDPM.from_config(cfg, Dummy())
    state = ddpm.state_dict()
    assert state == {"num_timesteps": 50, "beta_start": 2e-4, "beta_end": 0.03, "variance": "fixed_large"}
    again = DDPM(Dummy(), **state)
    assert torch.equal(again.posterior_variance, ddpm.posterior_variance)

"""The sampler registry (``ddpm.samplers``, issue 34).

* every module of the package registers one sampler, found by name (nothing else lists them), and a name is
  registered once;
* each sampler's limit on ``num_steps`` is written once, in the sampler, and read by the config (``Config``), by
  ``DDPM.sample`` (through its timestep rule) and by the sampling stage (against the checkpoint's T);
* the settings travel whole: ``DDPM.sample(sampler=<the config's sampling section>)`` is ``DDPM.sample`` given its
  keywords, and the training grid and a shard pass the section they hold, not its fields.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import TINY_CONFIG, tiny_unet

import ddpm.samplers
from ddpm import grid, shards
from ddpm.config import Sampler, SamplingConfig, Spacing, choices, load_config
from ddpm.diffusion import DDPM
from ddpm.ema import EMA
from ddpm.errors import ConfigError
from ddpm.outputs import ShardSpec
from ddpm.samplers import REGISTRY, SPACINGS, SamplerSpec, check_settings, get_sampler, register, sampler_names

T = 20  # a short schedule: the limits' edges are cheap to sample


# ---- the registry -------------------------------------------------------------------------------------------

def test_every_module_of_the_package_registers_its_sampler() -> None:
    modules = {p.stem for p in Path(ddpm.samplers.__file__).parent.glob("*.py")} - {"__init__", "base"}
    assert sorted(cls.__module__.removeprefix("ddpm.samplers.") for cls in REGISTRY.values()) == sorted(modules)
    assert sampler_names()[:3] == ("ddpm", "ddim", "dpmpp_2m")  # the package loads ancestral.py first
    assert all(get_sampler(name).name == name for name in sampler_names())
    names = ", ".join(sampler_names())
    with pytest.raises(ValueError, match=rf"^unknown sampler 'euler' \(expected one of {names}\)$"):
        get_sampler("euler")


def test_a_name_is_registered_once() -> None:
    class Again(ddpm.samplers.Sampler):
        name = "ddim"

    class Nameless(ddpm.samplers.Sampler):
        pass

    for cls in (Again, Nameless):
        with pytest.raises(ValueError, match=f"sampler {cls.__name__}: its name"):
            register(cls)
    assert REGISTRY["ddim"].__name__ == "DDIM" and "" not in REGISTRY


def test_the_configs_names_and_spacings_are_the_registrys() -> None:
    assert set(choices(Sampler)) <= set(sampler_names())
    assert choices(Spacing) == SPACINGS


# ---- one limit, three readers -------------------------------------------------------------------------------

def config_with(sampler: str, spacing: str, steps: int) -> Any:
    """The tiny config at T = 20 with this sampling section (eval.sampling kept within T)."""
    return load_config(TINY_CONFIG, [f"ddpm.num_timesteps={T}", f"sampling.sampler={sampler}",
                                     f"sampling.timestep_spacing={spacing}", f"sampling.num_steps={steps}",
                                     "eval.sampling.num_steps=5"])


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", sampler_names())
def test_the_samplers_limit_is_what_sampling_takes(name: str, spacing: str) -> None:
    """At its limit a sampler visits ``most`` distinct timesteps in [0, T) and samples; one more step is refused
    by its timestep rule with the limit and, where it is below T, the sampler's reason."""
    cls = get_sampler(name)
    most, why = cls.most_steps(T, spacing)
    assert most == T - (why is not None)  # today's limits: T, or T - 1 with a reason (dpmpp_2m, leading)
    ts = cls.make_timesteps(T, most, spacing)
    assert len(np.unique(ts)) == most and ts.min() >= 0 and ts.max() <= T - 1 and (np.diff(ts) > 0).all()
    diffusion = DDPM(tiny_unet(), T)
    images = diffusion.sample(2, (3, 8, 8), num_steps=most, sampler=name, timestep_spacing=spacing, seeds=[1, 2],
                              progress=False)
    assert images.shape == (2, 3, 8, 8) and images.isfinite().all() and images.std() > 0.01
    what = "the T" if why is None else f"{name} {why}"
    with pytest.raises(ValueError, match="^" + re.escape(f"num_steps={most + 1}: expected an integer in [1, {most}] "
                                                         f"({what})") + "$"):
        diffusion.sample(1, (3, 8, 8), num_steps=most + 1, sampler=name, timestep_spacing=spacing, progress=False)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", choices(Sampler))  # the names the config takes
def test_the_config_refuses_what_the_sampler_refuses(name: str, spacing: str) -> None:
    most, why = get_sampler(name).most_steps(T, spacing)
    assert config_with(name, spacing, most).sampling.num_steps == most
    with pytest.raises(ConfigError) as info:
        config_with(name, spacing, most + 1)
    limit = f"ddpm.num_timesteps ({T})" if why is None else f"ddpm.num_timesteps - 1 ({T - 1}) for {name} {why}"
    assert str(info.value) == f"sampling.num_steps: invalid value {most + 1} (expected at most {limit})"


def test_the_sampling_stage_refuses_what_the_sampler_refuses(checkpoint: Path, tmp_path: Path) -> None:
    """The checkpoint's T is 50: dpmpp_2m with leading spacing takes at most 49 steps, before anything is drawn."""
    section = SamplingConfig(num_steps=50, sampler="dpmpp_2m", timestep_spacing="leading", num_samples=2,
                             num_shards=1)
    with pytest.raises(ConfigError, match=r"^sampling.num_steps: invalid value 50 \(expected at most the "
                                          r"checkpoint's ddpm.num_timesteps - 1, 49, for dpmpp_2m with leading "):
        shards.sample_shard(checkpoint, tmp_path, 0, section, device="cpu", progress=False)
    assert not list(tmp_path.iterdir())


# ---- the settings travel whole ------------------------------------------------------------------------------

def test_sample_takes_the_config_section_whole_as_its_keywords() -> None:
    diffusion, shape = DDPM(tiny_unet(), T), (3, 8, 8)
    section = SamplingConfig(num_steps=5, sampler="ddim", eta=0.5, timestep_spacing="trailing")
    kw = dict(seeds=[4, 5], progress=False)
    by_section = diffusion.sample(2, shape, sampler=section, **kw)
    assert torch.equal(by_section, diffusion.sample(2, shape, num_steps=5, sampler="ddim", eta=0.5,
                                                    timestep_spacing="trailing", **kw))
    assert torch.equal(by_section, diffusion.sample(2, shape, sampler=SamplerSpec("ddim", 5, 0.5, "trailing"), **kw))
    for other in (dataclasses.replace(section, eta=0.0), dataclasses.replace(section, timestep_spacing="leading"),
                  dataclasses.replace(section, sampler="ddpm"), dataclasses.replace(section, num_steps=4)):
        assert not torch.equal(diffusion.sample(2, shape, sampler=other, **kw), by_section), other
    with pytest.raises(ValueError, match=r"^num_steps=4, eta=0.1 given with a sampler settings object \(ddim, 5 "
                                         r"steps\): give each setting once$"):
        diffusion.sample(2, shape, num_steps=4, sampler=section, eta=0.1, **kw)
    with pytest.raises(ValueError, match=r"^eta=2.0: expected a float in \[0, 1\]$"):
        check_settings(SamplerSpec("ddim", 5, 2.0), T)
    assert check_settings(SamplerSpec("ddpm"), T)[1].tolist() == list(range(T))  # num_steps None: every t


def test_the_grid_and_a_shard_pass_the_section_itself(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[Any] = []

    def sample(self: DDPM, batch_size: int, image_shape: Any, **kw: Any) -> torch.Tensor:
        assert set(kw) <= {"sampler", "seeds", "progress", "autocast_dtype"}, kw  # no setting of its own
        seen.append(kw["sampler"])
        return torch.zeros(batch_size, *image_shape)

    monkeypatch.setattr(DDPM, "sample", sample)
    cfg = load_config(TINY_CONFIG)
    model = tiny_unet()
    grid.draw_grid(cfg, model, EMA(model), dataclasses.asdict(cfg.ddpm), None, lambda: None)
    assert len(seen) == 1 and seen[0] is cfg.sampling
    section = dataclasses.replace(cfg.sampling, batch_size=2)  # shard 0 of 3 holds 4 images: two batches
    spec = ShardSpec.of("0" * 64, (8, 8, 3), section, 0)
    images = shards._generate(DDPM(model, 50), np.zeros((0, 8, 8, 3), np.uint8), spec, section,
                              tmp_path / "partial.npz", autocast=None, progress=False)
    assert images.shape == (4, 8, 8, 3) and len(seen) == 3 and seen[1] is section and seen[2] is section

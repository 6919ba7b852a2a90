"""What a sampler is, and the registry that finds one by name.

A sampler is one class, in one module of :mod:`ddpm.samplers`, registered with :func:`register`. It states:

- its ``name`` (the config's ``sampling.sampler``, ``DDPM.sample(sampler=...)``);
- its timestep rule: :meth:`Sampler.make_timesteps` picks the ``num_steps`` of the T training timesteps it visits
  for a ``timestep_spacing``, and :meth:`Sampler.most_steps` is the limit that rule puts on ``num_steps``, written
  once: the config (``Config``), ``DDPM.sample`` and the sampling stage all ask it;
- what it needs: ``uses_eta`` (it reads ``eta``) and :meth:`Sampler.noise_at` (it takes fresh noise at a step);
- its step: :meth:`Sampler.step` from timestep ``timesteps[i]`` to ``timesteps[i - 1]`` (to the clean image at
  i = 0), given the network's eps there.

One instance per sampling run holds the run's constants and its history (a multistep solver's previous x0);
:meth:`ddpm.diffusion.DDPM.sample` runs the loop (x_T, then for i = S-1 .. 0: noise if ``noise_at(i)``, the
network's eps at ``timesteps[i]``, ``step``). The settings that pick a sampler travel as one object,
:class:`SamplerSettings`: the config's sampling section is one, :class:`SamplerSpec` another.

Modules of :mod:`ddpm.samplers` import no torch at load (tensor methods only; torch for type hints): the config
asks the registry for names and limits on the login node, where a torch import costs seconds.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

    from ddpm.schedule import Schedule

SPACINGS = ("leading", "trailing")  # diffusers' timestep_spacing values we support (config: ``Spacing``)


class SamplerSettings(Protocol):
    """The settings that decide a sampler's pixels: the config's ``sampling`` / ``eval.sampling`` section
    (:class:`ddpm.config.SamplingConfig`) is one, :class:`SamplerSpec` another. Callers pass it whole."""

    @property
    def sampler(self) -> str: ...

    @property
    def num_steps(self) -> int | None: ...

    @property
    def eta(self) -> float: ...

    @property
    def timestep_spacing(self) -> str: ...


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """A :class:`SamplerSettings` of its own (``DDPM.sample``'s keywords, a tool's flags)."""

    sampler: str = "ddpm"
    """A registered name (:func:`sampler_names`)."""
    num_steps: int | None = None
    """Network evaluations; None: T (every training timestep)."""
    eta: float = 0.0
    """DDIM's stochasticity in [0, 1]; read by samplers with ``uses_eta``."""
    timestep_spacing: str = "leading"
    """leading or trailing (:meth:`Sampler.make_timesteps`)."""


class Sampler:
    """One sampler: a subclass per name, an instance per sampling run (see the module docstring).

    ``schedule`` is the diffusion's float64 CPU schedule over all T timesteps, ``timesteps`` the ascending int64
    [S] ones this run visits (:meth:`make_timesteps`), ``device`` where x lives, ``clip_denoised`` clamps every x0
    prediction to [-1, 1], ``variance`` is the DDPM's reverse-process variance (the ancestral sampler's).
    """

    name: ClassVar[str] = ""
    uses_eta: ClassVar[bool] = False

    def __init__(self, schedule: Schedule, timesteps: np.ndarray, device: torch.device, eta: float = 0.0,
                 clip_denoised: bool = True, variance: str = "fixed_small") -> None:
        self.schedule, self.timesteps, self.device = schedule, np.asarray(timesteps, dtype=np.int64), device
        self.eta, self.clip_denoised, self.variance = float(eta), clip_denoised, variance

    # ---- the timestep rule and its limit (class-level: the config asks without a run) -----------------------------

    @classmethod
    def most_steps(cls, num_timesteps: int, spacing: str) -> tuple[int, str | None]:
        """(the largest ``num_steps`` this sampler takes with T = ``num_timesteps``, why it is below T or None)."""
        return num_timesteps, None

    @classmethod
    def leading(cls, num_timesteps: int, num_steps: int) -> np.ndarray:
        """Leading spacing, DDPMScheduler / DDIMScheduler (DDIM paper): t_i = i * (T // S), i = 0..S-1."""
        return np.arange(0, num_steps, dtype=np.int64) * (num_timesteps // num_steps)

    @classmethod
    def make_timesteps(cls, num_timesteps: int, num_steps: int, spacing: str) -> np.ndarray:
        """The ``num_steps`` timesteps this sampler visits, ascending int64 [S], as diffusers' scheduler for it picks
        them (``timestep_spacing``, ``steps_offset=0``): :meth:`leading`, or trailing round(arange(T, 0, -T/S)) - 1
        (every sampler; it always includes T - 1). ValueError naming a bad spacing or step count."""
        if spacing not in SPACINGS:
            raise ValueError(f"unknown timestep_spacing {spacing!r} (expected one of {', '.join(SPACINGS)})")
        most, why = cls.most_steps(num_timesteps, spacing)
        if int(num_steps) != num_steps or not 1 <= num_steps <= most:
            what = "the T" if why is None else f"{cls.name} {why}"
            raise ValueError(f"num_steps={num_steps!r}: expected an integer in [1, {most}] ({what})")
        if spacing == "leading":
            ts = cls.leading(num_timesteps, int(num_steps))
        else:
            ts = np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps)).astype(np.int64) - 1
        return np.sort(ts)

    # ---- one run ------------------------------------------------------------------------------------------------

    def noise_at(self, i: int) -> bool:
        """Whether the step from ``timesteps[i]`` takes fresh N(0, I) noise (drawn per image, before the step)."""
        return False

    def step(self, i: int, x: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """x at ``timesteps[i]`` [B, ...] and the network's eps there [B, ...] (x's dtype) -> x at ``timesteps[i-1]``
        (the x0 estimate at i = 0); ``noise`` [B, ...] when :meth:`noise_at` said so, else None."""
        raise NotImplementedError

    def clip(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 clamped to [-1, 1] when the run clips (``clip_denoised``), else x0 itself."""
        return x0.clamp(-1.0, 1.0) if self.clip_denoised else x0


S = TypeVar("S", bound=type[Sampler])
REGISTRY: dict[str, type[Sampler]] = {}


def register(cls: S) -> S:
    """Class decorator: ``cls`` answers to ``cls.name`` (every module of :mod:`ddpm.samplers` loads with it)."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"sampler {cls.__name__}: its name {cls.name!r} is empty or already registered")
    REGISTRY[cls.name] = cls
    return cls


def sampler_names() -> tuple[str, ...]:
    """Every registered name, in module order (``ancestral`` registers ddpm, then ddim, dpmpp_2m, ...)."""
    return tuple(REGISTRY)


def get_sampler(name: str) -> type[Sampler]:
    """The sampler class registered as ``name``; ValueError naming it and the choices otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown sampler {name!r} (expected one of {', '.join(REGISTRY)})")
    return REGISTRY[name]


def check_settings(settings: SamplerSettings, num_timesteps: int) -> tuple[type[Sampler], np.ndarray]:
    """(the sampler class ``settings`` names, the ascending timesteps [S] it visits) for T = ``num_timesteps``;
    ``num_steps`` None means T. ValueError with one line naming the bad value (sampler, eta, spacing, num_steps)."""
    cls = get_sampler(settings.sampler)
    if not 0.0 <= settings.eta <= 1.0:
        raise ValueError(f"eta={settings.eta!r}: expected a float in [0, 1]")
    steps = num_timesteps if settings.num_steps is None else settings.num_steps
    return cls, cls.make_timesteps(num_timesteps, steps, settings.timestep_spacing)

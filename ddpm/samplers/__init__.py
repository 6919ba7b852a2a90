"""The samplers, one module each, found by name: ``get_sampler("ddim")``; ``sampler_names()`` lists them.

Loading this package loads every module in it (:mod:`pkgutil`, in name order: ``ancestral`` registers ddpm first),
and each registers its class (:func:`~ddpm.samplers.base.register`): a new sampler is a new module here and nothing
else; the config (``sampling.sampler``), ``DDPM.sample`` and the tools find it by name. :mod:`ddpm.samplers.base`
says what a sampler states (name, timestep rule and its limit, what it needs, its step); no module here imports
torch at load.
"""

from __future__ import annotations

import importlib
import pkgutil

from ddpm.samplers.base import (
    REGISTRY,
    SPACINGS,
    Sampler,
    SamplerSettings,
    SamplerSpec,
    check_settings,
    get_sampler,
    register,
    sampler_names,
)

__all__ = ["REGISTRY", "SPACINGS", "Sampler", "SamplerSettings", "SamplerSpec", "check_settings", "get_sampler",
           "register", "sampler_names"]

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

"""Which torch build covers a GPU: the install routes by GPU generation (compute capability), then NVIDIA driver.

    install_route(70, "575.51.03")  # "pip install 'torch>=2.10,<2.15' torchvision --index-url .../cu126, or ..."
    install_route(None, None)       # every route that has a build, each with the card and driver it needs

:data:`ROUTES` is the one source of the table: the README's install table and environment.yml's comments say
the same (tests/test_routes.py parses both and compares), and ``envcheck`` words its fixes with
:func:`install_route`. Where each fact was read (README, "On a cluster (login node)"):

- PyPI's default torch is a CUDA 12.8 build for torch 2.10, 13.0 for 2.11-2.14, 13.2 for 2.15 (each wheel's
  ``torch/version.py``); CUDA 13 builds (PyPI's and conda-forge's) have kernels for sm75 and newer only, no PTX
  for sm70: a V100 (sm70) or P100 (sm60) gets "no kernel image is available";
- the cu128 index has no torch >= 2.12 (pytorch/pytorch#178665): no cu128 route here;
- cu126 (sm50-sm90) is the only pip build for sm < 75, and its removal in 2.15 is proposed (pytorch/pytorch#190385):
  its route caps torch below 2.15; it has no kernels for Blackwell (sm100, sm120), which conda-forge's CUDA 12.9
  build has (``cuda-version=12``);
- conda-forge's CUDA 13 builds need glibc >= 2.28 (older OS images: ``cuda-version=12``);
- CUDA 12 needs driver >= 525.60, CUDA 13 >= 580.65 (CUDA's minor-version compatibility; ``envcheck.DRIVER_FLOOR``);
  Blackwell's first drivers are the R570 branch.

No torch import (the login node's ``launch.py`` and the doctor use it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

TORCH_FLOOR_TEXT = "2.10"
"""The project's torch floor, as ``envcheck.TORCH_FLOOR_TEXT`` (tests/test_routes.py checks they agree)."""
CU126_CAP = "2.15"
"""The first torch the cu126 index is expected not to have (pytorch/pytorch#190385)."""
CU126_INDEX = "https://download.pytorch.org/whl/cu126"
PIP_DEFAULT = f"pip install 'torch>={TORCH_FLOOR_TEXT}' torchvision"
"""PyPI's default wheels: CUDA 12.8 for torch 2.10, 13.0 for 2.11-2.14, 13.2 for 2.15."""
PIP_CU126 = f"pip install 'torch>={TORCH_FLOOR_TEXT},<{CU126_CAP}' torchvision --index-url {CU126_INDEX}"
"""The CUDA 12.6 wheels: sm50-sm90, driver >= 525.60."""

Driver = tuple[int, int]
CUDA12_DRIVER: Driver = (525, 60)
"""The oldest driver a CUDA 12 build runs on (``envcheck.DRIVER_FLOOR[12]``)."""
CUDA13_DRIVER: Driver = (580, 65)
"""The oldest driver a CUDA 13 build runs on (``envcheck.DRIVER_FLOOR[13]``)."""
BLACKWELL_DRIVER: Driver = (570, 0)
"""The first driver branch (R570) that runs Blackwell cards."""
CUDA13_SM = 75
"""The oldest compute capability CUDA 13 builds have kernels for (Turing)."""
BLACKWELL_SM = 100
"""Blackwell's compute capabilities start here (B200: sm100, RTX 50: sm120); cu126 has none of them."""
CU126_SM = 50
"""The oldest compute capability the cu126 build has kernels for (Maxwell)."""


@dataclass(frozen=True)
class Route:
    """One row of the table: the cards ``sm_min <= sm < sm_max`` under drivers ``driver_min <= driver < driver_max``
    (None: no upper bound), and the builds that cover them: a pip command, a conda ``cuda-version`` (None: none)."""

    sm_min: int
    sm_max: int | None
    driver_min: Driver
    driver_max: Driver | None
    pip: str | None
    conda: int | None
    why: str
    """The reason for the row, or for the missing route (words, not a command)."""

    def covers(self, sm: int | None, driver: Driver | None) -> bool:
        """Whether this row holds the card ``sm`` under ``driver`` (None: unknown, so any value matches)."""
        sm_ok = sm is None or (self.sm_min <= sm and (self.sm_max is None or sm < self.sm_max))
        driver_ok = driver is None or (
            self.driver_min <= driver and (self.driver_max is None or driver < self.driver_max))
        return sm_ok and driver_ok

    def action(self) -> str:
        """What to install: the pip command and/or the conda pin, else the reason there is no build."""
        conda = None
        if self.conda is not None:
            conda = f"cuda-version={self.conda} in environment.yml"
            if self.conda == 13:
                conda += " (glibc >= 2.28; an older OS image: cuda-version=12)"
        if self.pip and conda:
            return f"{self.pip}, or conda: {conda}"
        if self.pip:
            return f"{self.pip} ({self.why})"
        if conda:
            return f"conda only: {conda} ({self.why})"
        return f"no torch >= {TORCH_FLOOR_TEXT} build {self.why}"

    def condition(self, sm_known: bool, driver_known: bool) -> str:
        """The card and driver this row needs, in the README's notation, leaving out what the caller knows."""
        parts = []
        if not sm_known and (sm := bounds(self.sm_min, self.sm_max, str)):
            parts.append(f"sm {sm}")
        if not driver_known and (drv := bounds(self.driver_min, self.driver_max, driver_text)):
            parts.append(f"driver {drv}")
        return " with ".join(parts)


def driver_text(driver: Driver) -> str:
    """(525, 60) -> ``525.60``; (570, 0) -> ``570``."""
    return f"{driver[0]}.{driver[1]:02d}" if driver[1] else str(driver[0])


def bounds(low: Any, high: Any | None, text: Callable[[Any], str]) -> str:
    """``>= low, < high`` (each written by ``text``) as the README writes a range; a zero lower bound left out, so
    an unbounded range is empty ("any")."""
    parts = [] if low in (0, (0, 0)) else [f">= {text(low)}"]
    if high is not None:
        parts.append(f"< {text(high)}")
    return ", ".join(parts)


ROUTES: tuple[Route, ...] = (
    Route(CUDA13_SM, None, CUDA13_DRIVER, None, PIP_DEFAULT, 13, "PyPI's default CUDA 13 wheels"),
    Route(CUDA13_SM, BLACKWELL_SM, CUDA12_DRIVER, CUDA13_DRIVER, PIP_CU126, 12, "a driver for CUDA 12 only"),
    Route(BLACKWELL_SM, None, BLACKWELL_DRIVER, CUDA13_DRIVER, None, 12,
          "no pip build: cu126 has no Blackwell kernels; conda-forge's CUDA 12.9 build has"),
    Route(CU126_SM, CUDA13_SM, CUDA12_DRIVER, None, PIP_CU126, 12,
          "CUDA 13 builds have no kernels below sm75: cu126 or conda-forge's CUDA 12.9 build"),
    Route(BLACKWELL_SM, None, CUDA12_DRIVER, BLACKWELL_DRIVER, None, None,
          f"runs Blackwell below driver {driver_text(BLACKWELL_DRIVER)} (its first branch, R570): "
          "ask the admins for a newer driver"),
    Route(0, CU126_SM, CUDA12_DRIVER, None, None, None,
          f"has kernels below sm{CU126_SM} (cu126's oldest): use newer GPUs"),
    Route(0, None, (0, 0), CUDA12_DRIVER, None, None,
          f"runs below driver {driver_text(CUDA12_DRIVER)}: ask the admins for a newer driver"),
)
"""The table, by GPU generation then driver: for a known card and driver exactly one row holds (a partition)."""


def parse_driver(driver: str | None) -> Driver | None:
    """``575.51.03`` -> (575, 51); ``580`` -> (580, 0); None for None or text with no leading number (``N/A``)."""
    match = re.match(r"\s*(\d+)(?:\.(\d+))?", driver or "")
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def routes_for(sm: int | None, driver: str | None) -> list[Route]:
    """The rows of :data:`ROUTES` that may hold the card ``sm`` under ``driver`` (None or unreadable: unknown), in
    table order."""
    return [route for route in ROUTES if route.covers(sm, parse_driver(driver))]


def install_route(sm: int | None, driver: str | None) -> str:
    """One phrase with the exact command(s) that install a torch covering a card of compute capability ``sm``
    (70, 75, 80, 90, 100, 120; None: unknown card) under NVIDIA driver ``driver`` (``575.51.03``; None or text
    that is no version, such as nvidia-smi's ``N/A``: unknown).

    A known card and driver get their row's action; an unknown one gets every row it may fall in, each with the
    card and driver it needs (rows with the same action joined), e.g. ``sm >= 75 with driver >= 580.65: ...``.
    """
    driver_known = parse_driver(driver) is not None
    rows = routes_for(sm, driver) or list(ROUTES)  # none: a compute capability below zero; say the whole table
    if len(rows) == 1:
        return rows[0].action()
    tail = ""
    if sm is None and not driver_known:  # the routes that exist; the rows without a build in one clause
        rows = [route for route in rows if route.pip or route.conda is not None]
        tail = f"; any other card or driver: no torch >= {TORCH_FLOOR_TEXT} build (README, install table)"
    by_action: dict[str, list[Route]] = {}
    for route in rows:
        group = by_action.setdefault(route.action(), [])
        last = group[-1] if group else None
        if driver_known and last is not None and route.sm_max == last.sm_min:  # adjacent cards, one action
            group[-1] = replace(last, sm_min=route.sm_min)
        elif driver_known and last is not None and last.sm_max == route.sm_min:
            group[-1] = replace(last, sm_max=route.sm_max)
        else:
            group.append(route)
    clauses = "; ".join(f"{' or '.join(r.condition(sm is not None, driver_known) for r in group)}: {action}"
                        for action, group in by_action.items())
    check = "check the card and driver (nvidia-smi --query-gpu=compute_cap,driver_version --format=csv on a GPU node)"
    return f"{check}: {clauses}{tail}"

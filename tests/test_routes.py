"""The install routes by GPU generation, then driver: ddpm/routes.py, the README's route table, environment.yml's
comments and envcheck's fixes say the same, and the routes are the ones the torch builds allow.

The README table and environment.yml's comments are parsed (not copied here) and compared with
``ddpm.routes.ROUTES``; ``install_route`` and ``envcheck.driver_problem`` are then asked about points inside each
parsed row. The grid test states the issue's rules on its own (``expected``), independently of ``ddpm.routes``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import ROOT

from ddpm import envcheck, routes
from ddpm.envcheck import DRIVER_FLOOR, TORCH_FLOOR_TEXT, driver_problem, torch_floor_problem
from ddpm.routes import install_route

Driver = tuple[int, int]
Row = tuple[int, int | None, Driver, Driver | None, int | None, str | None]  # sm range, driver range, conda, pip

_BOUND = re.compile(r"(>=|<)\s*(\d+(?:\.\d+)?)")
# the commands (issue 33): PyPI's default wheels, and cu126 capped below 2.15 (its proposed removal)
DEFAULT_PIP = f"pip install 'torch>={TORCH_FLOOR_TEXT}' torchvision"
CU126_PIP = f"pip install 'torch>={TORCH_FLOOR_TEXT},<2.15' torchvision --index-url https://download.pytorch.org/whl/cu126"


def as_driver(text: str) -> Driver:
    """``525.60`` -> (525, 60); ``570`` -> (570, 0); ``575.51.03`` -> (575, 51)."""
    major, _, rest = text.partition(".")
    return int(major), int(rest.split(".")[0] or 0)


def parse_range(text: str, number: Callable[[str], Any], zero: Any) -> tuple[Any, Any]:
    """``>= 75, < 100`` -> (75, 100); ``< 525.60`` -> (zero, (525, 60)); ``any`` -> (zero, None)."""
    low, high = zero, None
    found = _BOUND.findall(text)
    assert found or text.strip() == "any", f"no range in {text!r}"
    for op, value in found:
        if op == ">=":
            low = number(value)
        else:
            high = number(value)
    return low, high


def readme_rows() -> list[Row]:
    """The README's route table (section "On a cluster (login node)"), one tuple a row."""
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## On a cluster (login node)\n")
    section = text[start:text.index("\n## ", start + 1)]
    lines = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert lines and lines[0].startswith("| GPU"), lines[:1]
    rows = []
    for line in lines[1:]:
        gpu, driver, conda, pip = (cell.strip() for cell in line.strip().strip("|").split("|"))
        sm_text = re.match(r"`([^`]*)`", gpu)
        drv_text = re.fullmatch(r"`([^`]*)`", driver)
        assert (sm_text or gpu == "any") and drv_text, line
        conda_pin = re.match(r"`cuda-version=(\d+)`", conda)
        pip_cmd = re.match(r"`(pip install [^`]*)`", pip)
        assert conda_pin or conda.startswith("none"), conda
        assert pip_cmd or pip.startswith("none"), pip
        rows.append((*parse_range(sm_text[1] if sm_text else gpu, int, 0),
                     *parse_range(drv_text[1], as_driver, (0, 0)),
                     int(conda_pin[1]) if conda_pin else None, pip_cmd[1] if pip_cmd else None))
    return rows


def environment_rows() -> list[tuple[int, int | None, Driver, Driver | None, int | None]]:
    """environment.yml's comment table: ``#   sm >= 75   driver >= 580.65   -> cuda-version=13 (...)``."""
    rows = []
    for line in (ROOT / "environment.yml").read_text().splitlines():
        match = re.match(r"#\s+(sm\s[^d]*?|any)\s+driver\s+(.+?)\s*->\s*(?:cuda-version=(\d+)|none)", line)
        if match:
            rows.append((*parse_range(match[1], int, 0), *parse_range(match[2], as_driver, (0, 0)),
                         int(match[3]) if match[3] else None))
    return rows


def routes_rows() -> list[Row]:
    """ddpm.routes.ROUTES in the README's terms."""
    return [(r.sm_min, r.sm_max, r.driver_min, r.driver_max, r.conda, r.pip) for r in routes.ROUTES]


def driver_str(driver: Driver) -> str:
    """(580, 64) -> ``580.64.03``, as nvidia-smi writes a driver."""
    return f"{driver[0]}.{driver[1]:02d}.03"


def points(row: Row) -> list[tuple[int, str]]:
    """Cards and drivers inside a row: each range's two ends (an open end: a value past the low one)."""
    sm_lo, sm_hi, drv_lo, drv_hi = row[:4]
    below = (drv_hi[0], drv_hi[1] - 1) if drv_hi and drv_hi[1] else (drv_hi[0] - 1, 99) if drv_hi else None
    drivers = [drv_lo if drv_lo != (0, 0) else (drv_hi[0] - 60, 0), below or (drv_lo[0] + 30, 0)]
    cards = [sm_lo, sm_hi - 1 if sm_hi is not None else sm_lo + 20]
    return [(sm, driver_str(drv)) for sm in cards for drv in drivers]


def assert_says(text: str, conda: int | None, pip: str | None) -> None:
    """``text`` gives exactly this route: the pip command and conda pin when there are, else no command at all."""
    if pip:
        assert pip in text, text
    else:
        assert "pip install" not in text, text
    pins = {int(pin) for pin in re.findall(r"cuda-version=(\d+)", text)}
    assert f"cuda-version={conda}" in text if conda is not None else not pins, text
    assert pins <= {conda, 12} if conda == 13 else pins <= {conda}, text  # 13 names 12 for an old glibc only
    if pip is None and conda is None:
        assert re.search(r"\bno torch >= \S+ build\b", text), text


def test_readme_environment_and_routes_are_one_table():
    readme = readme_rows()
    assert len(readme) >= 5, readme
    assert readme == routes_rows(), "README's route table and ddpm/routes.py differ"
    assert environment_rows() == [row[:5] for row in readme], "environment.yml's comments and the README differ"


def test_install_route_and_driver_problem_follow_the_readme_table():
    for row in readme_rows():
        conda, pip = row[4], row[5]
        for sm, driver in points(row):
            assert_says(install_route(sm, driver), conda, pip)
            for build in ("12.6", "13.0"):
                need = DRIVER_FLOOR[int(build.split(".")[0])]
                problem = driver_problem(build, driver, sm=sm)
                assert (problem is not None) == (as_driver(driver) < need), (build, driver, problem)
                if problem is not None:
                    assert f"sm{sm}" in problem and driver in problem, problem
                    assert_says(problem.split("; the route for ", 1)[1], conda, pip)
    # an unknown card or driver: every row that may hold it, so each of their commands
    for row in readme_rows():
        sm, driver = points(row)[0]
        for text in (install_route(None, driver), install_route(sm, None), install_route(None, None)):
            if row[5]:
                assert row[5] in text, text
            if row[4] is not None:
                assert f"cuda-version={row[4]}" in text, text


def test_the_table_is_a_partition():
    """A known card under a known driver falls in exactly one row (so install_route gives one route)."""
    for sm in range(0, 130, 5):
        for major in range(400, 700, 5):
            for minor in (0, 60, 64, 65, 99):
                held = [r for r in routes.ROUTES if r.covers(sm, (major, minor))]
                assert len(held) == 1, (sm, major, minor, held)


def test_an_unreadable_driver_is_an_unknown_one():
    """nvidia-smi prints ``N/A`` on some nodes: the route is then every driver's, not an error inside an error."""
    for sm in (70, 120, None):
        assert install_route(sm, "N/A") == install_route(sm, None) != install_route(sm, "590.44.01")
    assert driver_problem("13.0", "N/A", sm=70) is None and driver_problem("13.0", "550.54.15", sm=70) is not None


def test_the_floors_are_envchecks():
    assert routes.TORCH_FLOOR_TEXT == envcheck.TORCH_FLOOR_TEXT
    assert (routes.CUDA12_DRIVER, routes.CUDA13_DRIVER) == (DRIVER_FLOOR[12], DRIVER_FLOOR[13])


def expected(sm: int, driver: Driver) -> tuple[int | None, str | None]:
    """The issue's table, on its own: (conda cuda-version, pip command) for a card under a driver."""
    if driver < (525, 60):
        return None, None  # no torch >= 2.10 build: ask the admins
    if sm < 75:
        return 12, CU126_PIP  # V100, P100: no CUDA 13 kernels, whatever the driver
    if driver >= (580, 65):
        return 13, DEFAULT_PIP
    if sm >= 100:
        return (12, None) if driver >= (570, 0) else (None, None)  # Blackwell: conda only; before R570 nothing
    return 12, CU126_PIP


GRID_DRIVERS = ["535.104.05", "575.51.03", "590.44.01", None]


@pytest.mark.parametrize("driver", GRID_DRIVERS, ids=lambda d: d or "unknown")
@pytest.mark.parametrize("sm", [60, 70, 75, 80, 90, 100, 120])
def test_install_route_by_card_and_driver(sm: int, driver: str | None):
    text = install_route(sm, driver)
    if driver is not None:
        assert_says(text, *expected(sm, as_driver(driver)))
        return
    # unknown driver: the routes of every driver the card may have, and none that no driver gives it
    options = {expected(sm, as_driver(d)) for d in ["470.82.01", *GRID_DRIVERS[:-1], "560.35.03"]}
    for conda, pip in options:
        if pip:
            assert pip in text, text
        if conda is not None:
            assert f"cuda-version={conda}" in text, text
    for pip in {DEFAULT_PIP, CU126_PIP} - {pip for _, pip in options}:
        assert pip not in text, text
    if all(conda != 13 for conda, _ in options):
        assert "cuda-version=13" not in text, text  # a V100 under driver >= 580 still needs cuda-version=12


def test_torch_floor_fix_never_recommends_a_wrong_route():
    for sm, driver in [(None, None), (70, "590.44.01"), (80, "575.51.03"), (120, "575.51.03"), (None, "550.54.15")]:
        line = torch_floor_problem("2.9.0", sm=sm, driver=driver)
        assert "torch 2.9.0 is installed" in line and f"torch >= {TORCH_FLOOR_TEXT}" in line
        commands = re.findall(r"pip install '[^']*' torchvision(?: --index-url \S+)?", line)
        assert len(commands) == line.count("pip install"), line
        for command in commands:
            assert command.rstrip(",;") in (DEFAULT_PIP, CU126_PIP), command  # cu126 only with its <2.15 cap
        if sm is not None:
            assert_says(line, *expected(sm, as_driver(driver)))
    assert CU126_PIP in torch_floor_problem(None) and DEFAULT_PIP in torch_floor_problem(None)


def install_files() -> list[Path]:
    """Every file that states an install route."""
    return [ROOT / "README.md", ROOT / "Makefile", ROOT / "environment.yml", *sorted((ROOT / "ddpm").rglob("*.py"))]


def test_no_cu128_index_anywhere():
    """The cu128 index has no torch >= 2.12: no route may point at it (prose may say so)."""
    indexes = {}
    for path in install_files():
        for index in re.findall(r"download\.pytorch\.org/whl/(\w+)", path.read_text()):
            indexes.setdefault(index, []).append(str(path.relative_to(ROOT)))
    assert "cu126" in indexes, "the scan found no index at all: is it reading the right files?"
    assert set(indexes) == {"cu126"}, indexes
    for path in install_files():
        assert not re.search(r"--index-url\s+\S*cu128|TORCH_INDEX=\S*cu128", path.read_text()), path


def test_environment_takes_submitit_and_datasets_from_conda_forge():
    deps = yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
    conda = {re.split(r"[<>=]", dep)[0] for dep in deps if isinstance(dep, str)}
    pip = [spec for dep in deps if isinstance(dep, dict) for spec in dep["pip"]]
    assert {"submitit", "datasets"} <= conda, conda
    assert not [spec for spec in pip if re.split(r"[<>=]", spec)[0] in {"submitit", "datasets"}], pip

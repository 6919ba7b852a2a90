"""The install routes (environment.yml, pyproject, the Makefile, the README) agree with the torch floor.

Fast and offline: the files are parsed, and the Makefile's ``venv`` recipe runs against a fake python that
records its arguments (nothing is downloaded). The floor is ``ddpm.envcheck.TORCH_FLOOR_TEXT``: the lowest
torch whose torchrun has ``--signals-to-handle``.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

from ddpm.envcheck import TORCH_FLOOR, TORCH_FLOOR_TEXT

tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")

CU126_INDEX = "https://download.pytorch.org/whl/cu126"
TORCH_NAMES = {"torch", "pytorch", "pytorch-gpu"}  # pip's name, conda-forge's package and its CUDA metapackage
# one requirement: a name, then comma-separated constraints (conda's `=12` included); nothing else
_NAME = re.compile(r"\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(.*?)\s*")
_CONSTRAINT = re.compile(r"(==|>=|<=|!=|~=|>|<|=)\s*([0-9][0-9A-Za-z.*+]*)")


def normalise(name: str) -> str:
    """A package name for comparison: lowercase, runs of ``-``, ``_`` and ``.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_spec(spec: str) -> tuple[str, list[tuple[str, str]]]:
    """``pytorch-gpu>=2.10`` -> ("pytorch-gpu", [(">=", "2.10")]); ValueError for anything else."""
    match = _NAME.fullmatch(spec)
    if not match:
        raise ValueError(f"not a requirement: {spec!r}")
    name, rest = match.groups()
    constraints = []
    for part in rest.split(",") if rest else []:
        constraint = _CONSTRAINT.fullmatch(part.strip())
        if not constraint:
            raise ValueError(f"unparsable constraint {part!r} in {spec!r}")
        constraints.append((constraint[1], constraint[2]))
    return name, constraints


def spec_floor(spec: str) -> str:
    """The version after the one ``>=`` of a requirement, as written: ``pytorch>=2.3`` -> "2.3"."""
    floors = [version for op, version in parse_spec(spec)[1] if op == ">="]
    if len(floors) != 1 or not re.fullmatch(r"\d+(\.\d+)*", floors[0]):
        raise ValueError(f"{spec!r} has no single numeric >= floor")
    return floors[0]


def environment() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def conda_specs(env: dict) -> list[str]:
    return [dep for dep in env["dependencies"] if isinstance(dep, str)]


def pip_specs(env: dict) -> list[str]:
    pips = [dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict)]
    assert len(pips) == 1 and all(isinstance(spec, str) for spec in pips[0]), env["dependencies"]
    return pips[0]


def pyproject_dependencies() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def test_spec_parsing_is_strict():
    assert spec_floor("pytorch>=2.3") == "2.3"
    assert spec_floor("pytorch-gpu>=2.10") == "2.10"
    assert spec_floor("torch >= 2.10, <3") == "2.10"
    assert parse_spec("cuda-version=12") == ("cuda-version", [("=", "12")])
    assert parse_spec("pip") == ("pip", [])
    for bad in ("pytorch", "pytorch<3", "pytorch>=2.3,>=2.4", "pytorch>=latest", "cuda-version 12.*", "-e ."):
        with pytest.raises(ValueError):
            spec_floor(bad)
    assert normalise("PyTorch_FID") == normalise("pytorch-fid") == "pytorch-fid"


def test_environment_uses_only_live_channels():
    env = environment()
    channels = env["channels"]
    assert "nodefaults" in channels, channels
    assert set(channels) == {"conda-forge", "nodefaults"}, f"only conda-forge publishes torch >= 2.10: {channels}"
    names = {normalise(parse_spec(spec)[0]) for spec in conda_specs(env)}
    assert "pytorch-cuda" not in names, "pytorch-cuda is the dead pytorch/nvidia channels' metapackage"
    assert not [spec for spec in conda_specs(env) if "::" in spec], "a channel-qualified package bypasses the channels"


def test_environment_torch_floor_is_the_projects():
    specs = {normalise(parse_spec(spec)[0]): spec for spec in conda_specs(environment())}
    torch = [specs[name] for name in ("pytorch-gpu", "pytorch") if name in specs]
    assert torch, f"no pytorch-gpu/pytorch in environment.yml: {sorted(specs)}"
    assert spec_floor(torch[0]) == TORCH_FLOOR_TEXT, torch[0]
    assert "cuda-version" in specs, "the CUDA build is chosen by a cuda-version pin (12 or 13, from the driver)"
    assert parse_spec(specs["cuda-version"])[1] in ([("=", "12")], [("=", "13")]), specs["cuda-version"]


def test_environment_lists_every_runtime_dependency():
    env = environment()
    pips = pip_specs(env)
    assert "-e ." in pips, "the package itself (editable) belongs in the environment"
    listed = {normalise(parse_spec(spec)[0]) for spec in conda_specs(env) + [p for p in pips if p != "-e ."]}
    listed |= TORCH_NAMES if listed & {"pytorch", "pytorch-gpu"} else set()
    missing = [dep for dep in pyproject_dependencies() if normalise(parse_spec(dep)[0]) not in listed]
    assert not missing, f"environment.yml lacks {missing}"


def test_pyproject_torch_floors():
    floors = {normalise(parse_spec(dep)[0]): spec_floor(dep) for dep in pyproject_dependencies()
              if normalise(parse_spec(dep)[0]) in {"torch", "torchvision"}}
    assert floors["torch"] == TORCH_FLOOR_TEXT
    major, minor = TORCH_FLOOR
    assert major == 2 and floors["torchvision"] == f"0.{minor + 15}", floors  # torch 2.N ships torchvision 0.(N+15)


def test_readme_states_the_floor_and_the_install_table():
    section = readme_section("On a cluster (login node)")
    assert f"torch >= {TORCH_FLOOR_TEXT}" in section
    assert "--signals-to-handle" in section
    for needed in ("conda env create -f environment.yml", "CONDA_OVERRIDE_CUDA", "cuda-version", CU126_INDEX,
                   "nvidia-smi"):
        assert needed in section, needed


def test_makefile_has_torch_index():
    text = (ROOT / "Makefile").read_text()
    assert re.search(r"^TORCH_INDEX \?=", text, re.M)
    assert re.search(r"^TORCH_SPEC \?= torch==\S+ torchvision==\S+$", text, re.M)


def requires_python() -> str:
    """pyproject's ``requires-python = ">=X.Y"``: the X.Y."""
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    match = re.fullmatch(r">=\s*(\d+\.\d+)", spec)
    assert match, spec
    return match[1]


# A python that records each call (its name, then every argument in brackets) and does only what the recipe
# needs: `-c CODE` prints $FAKE_VERSION (the version check), `-m venv DIR` makes DIR/bin/python (and, with FAKE_UV,
# `-m pip install -q uv` makes bin/uv); FAKE_UV_FAIL makes every uv call fail, FAKE_PIP_FAIL every other pip install.
FAKE_PYTHON = """#!/bin/sh
{ printf '%s' "$(basename "$0")"; printf ' [%s]' "$@"; echo; } >> "$FAKE_LOG"
if [ "$1" = -c ]; then echo "$FAKE_VERSION"; exit 0; fi
if [ "$(basename "$0")" = uv ] && [ -n "$FAKE_UV_FAIL" ]; then exit 1; fi
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi
if [ "$*" = "-m pip install -q uv" ]; then
  if [ -n "$FAKE_UV" ]; then cp "$0" "$(dirname "$0")/uv"; fi; exit 0
fi
if [ "$1 $2 $3" = "-m pip install" ] && [ -n "$FAKE_PIP_FAIL" ]; then exit 1; fi
if [ "$1" = tools/pip_index_args.py ]; then echo "--find-links /opt/wheels"; fi
exit 0
"""


def make_venv(tmp_path: Path, index: str = "", version: str | None = None,
              **fake: str) -> tuple[subprocess.CompletedProcess, list[str], Path]:
    """``make -s venv`` against the fake python (copies of the Makefile and pyproject in ``tmp_path``): the run,
    the fake's log lines and the fake's path. ``fake``: FAKE_UV, FAKE_UV_FAIL, FAKE_PIP_FAIL."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    python = tmp_path / "fakepython"
    python.write_text(FAKE_PYTHON)
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "log"
    # a user's shell, even when the suite itself runs under `make test` (a nested make prints "make[1]: ***")
    outer = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    env = {**outer, "FAKE_LOG": str(log), "FAKE_VERSION": version or requires_python(), **fake}
    proc = subprocess.run(["make", "-s", "venv", f"PYTHON={python}", f"VENV={tmp_path / 'venv'}",
                           f"TORCH_INDEX={index}", "TORCH_SPEC=torch>=2.10 torchvision"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    return proc, log.read_text().splitlines() if log.exists() else [], python


def installs(log: list[str]) -> list[str]:
    """The fake's install calls, the one that installs uv left out."""
    return [line for line in log if "[install]" in line and "[uv]" not in line]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
@pytest.mark.parametrize("uv", [True, False], ids=["uv", "pip"])
@pytest.mark.parametrize("index", ["", CU126_INDEX], ids=["default-index", "cu126"])
def test_make_venv_installs_torch_from_torch_index(tmp_path: Path, uv: bool, index: str):
    proc, log, _ = make_venv(tmp_path, index, FAKE_UV="1" if uv else "")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(installs(log)) == 2, log
    torch_line, project_line = installs(log)
    assert torch_line.startswith("uv [pip]" if uv else "python [-m] [pip]"), torch_line
    assert torch_line.endswith(" [torch>=2.10] [torchvision]"), torch_line  # quoted: no `>` redirection
    assert project_line.endswith(" [-e] [.[test]]"), project_line
    if index:
        assert torch_line.count("[--index-url]") == 1 and f"[--index-url] [{index}]" in torch_line, torch_line
        assert "/opt/wheels" not in torch_line, "TORCH_INDEX replaces pip's index configuration for torch"
    else:
        assert "[--index-url]" not in torch_line, torch_line
    assert ("[--find-links] [/opt/wheels]" in project_line) == uv, project_line  # uv gets pip's configuration
    assert "uv failed" not in proc.stdout + proc.stderr
    assert (tmp_path / "venv" / ".installed").exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_venv_refuses_a_python_below_requires_python(tmp_path: Path):
    """One line naming the python, its version, the floor and a command with a newer one; nothing created."""
    need = requires_python()
    major, minor = map(int, need.split("."))
    for have in (f"{major}.{minor - 1}", "2.7"):
        (work := tmp_path / have).mkdir()
        proc, log, python = make_venv(work, version=have)
        lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("make: ***")]  # make's own
        assert proc.returncode != 0 and len(lines) == 1 and not proc.stdout, proc.stdout + proc.stderr
        match = re.fullmatch(rf"make venv: (\S+) is Python {re.escape(have)}; this project needs >= {re.escape(need)}: "
                             r"make venv PYTHON=python(\d+)\.(\d+)", lines[0])
        assert match and match[1] == str(python), lines[0]
        assert (int(match[2]), int(match[3])) >= (major, minor), lines[0]  # the suggestion meets the floor
        assert [line.split()[:2] for line in log] == [["fakepython", "[-c]"]], log  # no venv, no install
        assert not (work / "venv").exists()
    (work := tmp_path / "newer").mkdir()
    proc, log, _ = make_venv(work, version=f"{major}.{minor + 3}")  # a newer python passes
    assert proc.returncode == 0 and len(installs(log)) == 2, proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_venv_falls_back_to_pip_when_uv_fails(tmp_path: Path):
    """uv fails (a proxy or CA that pip is configured for): pip installs the same, after one line saying so."""
    proc, log, _ = make_venv(tmp_path, CU126_INDEX, FAKE_UV="1", FAKE_UV_FAIL="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "uv" in line]
    assert len(said) == 1 and said[0].startswith("make venv: uv failed") and "installing with pip" in said[0], said
    tried = installs(log)
    assert tried[0].startswith("uv [pip] [install]"), tried
    pip = [line for line in tried if line.startswith("python [-m] [pip]")]
    assert len(pip) == 2 and f"[--index-url] [{CU126_INDEX}]" in pip[0] and pip[1].endswith(" [-e] [.[test]]"), tried
    assert (tmp_path / "venv" / ".installed").exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_venv_fails_when_pip_fails_too(tmp_path: Path):
    proc, log, _ = make_venv(tmp_path, FAKE_UV="1", FAKE_UV_FAIL="1", FAKE_PIP_FAIL="1")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "installing with pip" in proc.stdout and not (tmp_path / "venv" / ".installed").exists()

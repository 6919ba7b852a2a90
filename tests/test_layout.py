"""The package's shape (docs/design.md): no import cycle (ddpm/ and tools/), model/math/data code free of process
and cluster code, a straight stage flow (no stage imports a later one; the job side imports nothing of the login
side), files of at most 400 lines (a warning; 600 fails), a docstring under every config key."""

from __future__ import annotations

import ast
import dataclasses
import graphlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from helpers import ROOT

from ddpm import config
from ddpm.configtools import field_docs

PKG = ROOT / "ddpm"
PURE = ("ddpm.unet", "ddpm.diffusion", "ddpm.ema", "ddpm.data")  # model, math, data
FORBIDDEN = ("torch.distributed", "submitit", "ddpm.cluster", "ddpm.dist")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for top in (PKG, ROOT / "tools") for p in top.rglob("*.py")}  # ddpm.* and tools.*


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports anywhere (function bodies too); ``from a import b`` counts as ``a.b``
    when that is one of our modules."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(MODULES)
            found.update(subs or {node.module})
    return found


GRAPH = {name: {m for m in imports_of(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def test_no_import_cycle():
    try:
        list(graphlib.TopologicalSorter(GRAPH).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")


def test_the_graph_sees_imports_inside_functions():
    # the check must not miss a lazy import: ddpm.cluster.doctor imports the executors in a function body
    assert "ddpm.cluster.executors" in GRAPH["ddpm.cluster.doctor"]
    assert "ddpm.data.hf" in GRAPH["ddpm.data.sources"]
    # and tools/ is in the graph: the bench imports its sampling part (which must not import it back)
    assert "tools.bench_sampling" in GRAPH["tools.bench"]
    assert "tools.bench" not in GRAPH["tools.bench_sampling"]


def reachable(start: str) -> set[str]:
    seen, todo = set(), [m for m in MODULES if m == start or m.startswith(start + ".")]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(GRAPH[m])
    return seen


@pytest.mark.parametrize("pure", PURE)
def test_model_math_and_data_never_import_process_or_cluster_code(pure):
    for mod in reachable(pure):
        bad = {i for i in imports_of(MODULES[mod]) if i.startswith(FORBIDDEN)}
        assert not bad, f"{pure} reaches {mod}, which imports {sorted(bad)}"


# train -> eval -> sample -> assemble (-> a sweep's results): each stage a function its task calls (ddpm.cluster.tasks)
STAGES = ("ddpm.train", "ddpm.evaluate", "ddpm.sample", "ddpm.assemble", "ddpm.sweepresults")
# what runs on the cluster's nodes, and what runs on the login node (launch.py is not a module of ddpm/)
JOB_SIDE = (*STAGES, "ddpm.shards", "ddpm.cluster.tasks", "ddpm.cluster.wrapper", "ddpm.cluster.probe")
LOGIN_SIDE = ("ddpm.cluster.preflight", "ddpm.cluster.executors", "ddpm.cluster.submit", "ddpm.cluster.sweep",
              "ddpm.cluster.doctor")


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_imports_a_later_one(stage):
    later = set(STAGES[STAGES.index(stage) + 1:])
    assert not reachable(stage) & later, f"{stage} reaches {sorted(reachable(stage) & later)}"


@pytest.mark.parametrize("job", JOB_SIDE)
def test_the_job_side_imports_nothing_of_the_login_side(job):
    assert not reachable(job) & set(LOGIN_SIDE), f"{job} reaches {sorted(reachable(job) & set(LOGIN_SIDE))}"


def test_the_stage_rules_would_see_a_violation():
    # the tasks call every stage (training through torchrun's `-m ddpm.train`), and the login side submits them
    assert set(STAGES[1:]) <= reachable("ddpm.cluster.tasks")
    assert "ddpm.cluster.tasks" in reachable("ddpm.cluster.executors")
    assert "ddpm.shards" in GRAPH["ddpm.evaluate"] and "ddpm.shards" in GRAPH["ddpm.sample"]


def test_importing_the_model_and_data_loads_no_cluster_code():
    code = ("import sys, ddpm.unet, ddpm.diffusion, ddpm.ema, ddpm.data; "
            "print(sorted(m for m in sys.modules if m == 'submitit' or m.startswith(('ddpm.cluster', 'ddpm.dist'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_the_login_node_and_job_wrapper_paths_load_no_torch():
    """launch.py (preflight, status), the job wrapper of every train job and the assembly job do not import torch
    (about 10 s of start-up on a slow node, before any work): only the processes that compute load it."""
    code = ("import sys; import launch, ddpm.cluster.executors, ddpm.cluster.tasks, ddpm.cluster.squeue, "
            "ddpm.cluster.wrapper, ddpm.cluster.preflight, ddpm.checkpoint, ddpm.runlog, ddpm.status, ddpm.provenance, "
            "ddpm.assemble, ddpm.rundir, ddpm.cluster.submit, ddpm.cluster.sweep, ddpm.sweepresults, "
            "tools.digits; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'sklearn')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_file_length():
    """Over 400 lines is a warning (a file doing two jobs? split it by job, not in two halves); over 600 fails."""
    files = [*PKG.rglob("*.py"), *(ROOT / "tools").rglob("*.py"), ROOT / "launch.py"]
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in files}
    if long := {f: n for f, n in lengths.items() if n > 400}:
        warnings.warn(f"files over 400 lines: {long}", stacklevel=1)
    assert not {f: n for f, n in lengths.items() if n > 600}


def test_every_config_key_has_a_docstring():
    for section in dataclasses.fields(config.Config):
        cls = section.default_factory
        missing = {f.name for f in dataclasses.fields(cls)} - set(field_docs(cls))
        assert not missing, f"{section.name}: no docstring under {sorted(missing)}"

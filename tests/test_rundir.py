"""The run directory's contract (docs/design.md, "The run directory"): :class:`ddpm.rundir.RunDir` declares every
file a run directory may hold, every path it hands out is declared, and no other module of ddpm/ or launch.py
spells a run-directory name. The pipeline tests (tests/test_eval.py, tests/test_launch_slurm.py) check that the
run directories they produce hold nothing undeclared."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import ROOT

from ddpm.rundir import RunDir, SampleSet, shard_files, shard_index, stale_dir

# The names of the run directory; outside ddpm/rundir.py none may be joined onto a path.
NAMES = {"config.yaml", "jobs.json", "status.json", "provenance.json", "probe.json", "checkpoints", "LATEST",
         "grids", "tb", "logs", "eval", "fid.json", "samples", "shards", "stale", "previous", "grid.png",
         "metrics.json", "%j"}
PREFIXES = ("step_", "shard_", "samples_")  # f-string file names of steps, shards and assembled sets


def every_path(run: RunDir) -> list[Path]:
    """Every file path RunDir hands out, for a few steps and shards."""
    paths = [run.config, run.jobs, run.status, run.provenance, run.probe, run.latest, run.fid,
             run.samples.grid, run.samples.metrics, run.samples.npz((12, 8, 8, 3)), run.job_log("42"),
             run.job_log("42", 1, "err")]
    for step in (0, 7, 100000):
        paths += [run.checkpoint(step), run.grid(step), run.eval_result(step)]
        paths += [f for k in (0, 3) for f in vars(shard_files(run.eval_shards(step), k)).values()]
    paths += [f for k in (0, 11) for f in vars(run.samples.shard(k)).values()]
    paths += [stale_dir(run.samples.shards) / "20261206-120000" / "shard_0.npz", run.samples.previous / "t" / "x.npz",
              run.tb / "events.out.tfevents.1.host", run.tb_eval / "events.out.tfevents.2.host"]
    return paths


def test_every_path_rundir_hands_out_is_declared(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    for p in every_path(run):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    assert run.undeclared() == []


def test_an_undeclared_file_is_listed_and_transient_files_are_not(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    stray = [tmp_path / "notes.txt", tmp_path / "checkpoints" / "step_5.pth", tmp_path / "samples" / "x.npz"]
    for p in stray:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    (tmp_path / "checkpoints" / ".step_00000005.pt.tmp123").write_text("x")  # an atomic write under way
    assert run.undeclared() == sorted(stray)


def test_names_parse_back() -> None:
    run = RunDir(Path("/r"))
    assert RunDir.checkpoint_step(run.checkpoint(1234)) == 1234 and RunDir.checkpoint_step(Path("LATEST")) is None
    assert [shard_index(f.name) for f in vars(run.samples.shard(7)).values()] == [7, 7, 7]
    assert shard_index("shard_x.npz") is None


@pytest.mark.parametrize("given", ["run", "run/samples", "run/samples/shards"])
def test_a_sample_set_is_found_from_the_run_its_directory_or_its_shards(tmp_path: Path, given: str) -> None:
    run = RunDir(tmp_path / "run")
    run.samples.shards.mkdir(parents=True)
    assert SampleSet.locate(tmp_path / given) == (run.samples.shards, run.samples)


def spelled_names(path: Path) -> list[str]:
    """Run-directory names ``path`` joins onto a path (``x / "status.json"``, ``x / f"step_{n}.pt"``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            for side in (node.left, node.right):
                if isinstance(side, ast.Constant) and side.value in NAMES:
                    found.append(f"{path.name}:{node.lineno}: {side.value!r}")
                elif isinstance(side, ast.JoinedStr) and isinstance(side.values[0], ast.Constant) \
                        and str(side.values[0].value).startswith(PREFIXES):
                    found.append(f"{path.name}:{node.lineno}: f{side.values[0].value!r}...")
    return found


def test_no_run_directory_name_is_spelled_outside_rundir() -> None:
    files = [p for p in (ROOT / "ddpm").rglob("*.py") if p.name != "rundir.py"] + [ROOT / "launch.py"]
    spelled = [hit for p in files for hit in spelled_names(p)]
    assert spelled == []


def test_the_check_sees_a_spelled_name(tmp_path: Path) -> None:
    probe = tmp_path / "m.py"
    probe.write_text('p = run_dir / "status.json"\nq = d / f"step_{n:08d}.pt"\nr = d / "unrelated"\n')
    assert spelled_names(probe) == ["m.py:1: 'status.json'", "m.py:2: f'step_'..."]

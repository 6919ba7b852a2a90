"""The eval stage (ddpm/evaluate.py): FID of every milestone checkpoint, the selection, sampling from the best.

- on the real local SLURM: train -> eval array of 3 milestones + the newest -> selection -> sampling from the
  chosen checkpoint -> assembly; one fid.json row per checkpoint, the lowest mean FID chosen, metrics.json
  names it and why, ``eval/fid`` in TensorBoard; re-running ``--stage eval`` does no work;
- on the local executor: an unreadable milestone checkpoint fails its task alone, the selection names it,
  nothing else is redone;
- bad input is one line before anything runs (no reference statistics, no Inception weights, eval off).

The Inception weights are test-written (the session fixture ``fid_weights``: random init, the right keys and
shapes), and the reference statistics are computed from the tiny training images with them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, TINY_CONFIG, launch
from slurm_helpers import wait_for_job

from ddpm.rundir import RunDir

STEPS = [10, 20, 30, 35]  # milestone_every 10, num_iterations 35: three milestones and the newest
EVAL = ["eval.enabled=true", "training.num_iterations=35", "training.milestone_every=10", "training.save_every=10",
        "training.log_every=5", "eval.sampling.num_samples=6", "eval.sampling.num_steps=4",
        "eval.sampling.batch_size=6",
        "slurm.sample_cpus_per_task=1", "slurm.setup=[export OMP_NUM_THREADS=1]"]


def launch_eval(cluster: str, *args: str) -> subprocess.CompletedProcess[str]:
    """launch.py on ``cluster`` (tiny config), one torch thread per process, 10 minutes at most."""
    return launch(*args, cluster=cluster, timeout=600, env={"OMP_NUM_THREADS": "1"})


def tb_points(run_dir: Path) -> list[tuple[int, float]]:
    """(step, value) of every ``eval/fid`` point in the run's tb/eval event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = []
    for f in sorted((run_dir / "tb" / "eval").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f))
        acc.Reload()
        points += [(e.step, e.value) for e in acc.Scalars("eval/fid")]
    return points


def eval_files(run_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in (run_dir / "eval").rglob("*")
            if p.is_file() and p.name != "fid.json"}


@pytest.mark.slurm
def test_eval_stage_on_slurm_picks_the_lowest_fid(slurm_cluster, images, fid_inputs, tmp_path):
    proc = launch_eval("slurm", f"data.path={images}", f"run.root={tmp_path}", *EVAL, *fid_inputs)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "tiny"
    jobs = json.loads((run_dir / "jobs.json").read_text())
    assert len(jobs["eval_tasks"]) == len(STEPS) and all(k in jobs for k in ("train", "select", "sample"))
    state = wait_for_job(jobs["assemble"], timeout=600)
    logs = "".join(p.read_text() for p in (run_dir / "logs").rglob("*.out"))
    assert state == "COMPLETED", logs[-4000:]

    fid = json.loads((run_dir / "eval" / "fid.json").read_text())
    assert [r["step"] for r in fid["rows"]] == STEPS and fid["missing_steps"] == []
    assert all(len(r["fid"]) == 1 and r["mean"] == r["fid"][0] for r in fid["rows"])
    best = min(fid["rows"], key=lambda r: r["mean"])
    assert fid["best"]["step"] == best["step"]
    metrics = json.loads((run_dir / "samples" / "metrics.json").read_text())
    assert metrics["step"] == best["step"] and metrics["checkpoint_sha256"] == best["checkpoint_sha256"]
    assert metrics["checkpoint_choice"].startswith(f"best: lowest mean FID of the eval stage ({best['mean']:.3f} "
                                                   f"at step {best['step']}")
    assert tb_points(run_dir) == [(r["step"], pytest.approx(r["mean"])) for r in fid["rows"]]
    assert RunDir(run_dir).undeclared() == []  # every file of the finished pipeline is one ddpm/rundir.py declares
    shown = subprocess.run([sys.executable, "launch.py", "status", str(run_dir)], capture_output=True, text=True,
                           cwd=ROOT, timeout=60).stdout
    assert f"eval: 4/4 checkpoints evaluated; best so far: step {best['step']}" in shown, shown
    assert f"selected: step {best['step']}" in shown, shown

    before, fid_text = eval_files(run_dir), (run_dir / "eval" / "fid.json").read_text()
    again = launch_eval("slurm", "--stage", "eval", "--only", f"data.path={images}", f"run.root={tmp_path}", *EVAL,
                   *fid_inputs)
    assert again.returncode == 0, again.stdout + again.stderr
    tasks = json.loads((run_dir / "jobs.json").read_text())["eval_tasks"]
    for task in tasks:
        assert wait_for_job(task, timeout=300) == "COMPLETED"
    rerun = "".join((run_dir / "logs" / t / f"{t}_0_log.out").read_text() for t in tasks)
    assert rerun.count("already evaluated") == len(STEPS) and "images/s" not in rerun, rerun[-3000:]
    assert eval_files(run_dir) == before and (run_dir / "eval" / "fid.json").read_text() == fid_text


def test_unreadable_milestone_fails_alone_and_is_named(images, fid_inputs, tmp_path):
    """Locally, two seed sets per checkpoint: every step is evaluated; then the step-20 checkpoint is truncated
    and its result removed: its task fails alone with one line, the selection names it and picks among the
    other three, nothing else is redone, and TensorBoard holds one point per evaluated step (no duplicates from
    the second selection)."""
    base = [f"data.path={images}", f"run.root={tmp_path}", *EVAL, *fid_inputs, "eval.num_seeds=2"]
    run_dir = tmp_path / "tiny"
    proc = launch_eval("local", *base)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((run_dir / "eval" / "fid.json").read_text())["rows"]
    assert [r["step"] for r in rows] == STEPS and len(tb_points(run_dir)) == len(STEPS)
    assert all(len(r["fid"]) == 2 and r["mean"] == pytest.approx(sum(r["fid"]) / 2) for r in rows)

    ckpt = run_dir / "checkpoints" / "step_00000020.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    (run_dir / "eval" / "step_00000020.json").unlink()
    before = {k: v for k, v in eval_files(run_dir).items() if "step_00000020" not in k}
    proc = launch_eval("local", *base, "--stage", "eval")  # not --only: eval, select, sample, assemble
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"error: eval task 1 (step 20): {ckpt}: corrupt or truncated checkpoint" in out, out
    assert out.count("already evaluated") == 3, out
    assert "eval: no result for task 1 (step 20): failed or not run" in out, out
    fid = json.loads((run_dir / "eval" / "fid.json").read_text())
    assert [r["step"] for r in fid["rows"]] == [10, 30, 35] and fid["missing_steps"] == [20]
    assert fid["best"]["step"] == min(fid["rows"], key=lambda r: r["mean"])["step"]
    assert {k: v for k, v in eval_files(run_dir).items() if k in before} == before
    assert [s for s, _ in tb_points(run_dir)] == [10, 30, 35]
    metrics = json.loads((run_dir / "samples" / "metrics.json").read_text())
    assert metrics["step"] == fid["best"]["step"]


@pytest.mark.parametrize("override, message", [
    ("sampling.fid_reference=null", "error: sampling.fid_reference: not set (the eval stage compares each "
     "checkpoint with it; make one with `python -m ddpm.fid ref`)"),
    ("sampling.fid_weights=/nonexistent/pt_inception.pth", "error: FID Inception weights not found: "
     "/nonexistent/pt_inception.pth"),
    ("sampling.fid_reference=/nonexistent/ref.npz", "error: /nonexistent/ref.npz: FID statistics file not found"),
])
def test_preflight_names_missing_eval_inputs(images, fid_inputs, tmp_path, override, message):
    proc = launch_eval("local", f"data.path={images}", f"run.root={tmp_path}", *EVAL, *fid_inputs, override)
    assert proc.returncode == 2 and proc.stderr.startswith(message), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "tiny").exists()


def test_stage_eval_needs_eval_enabled_and_best_needs_an_eval(images, tmp_path):
    proc = launch_eval("local", f"data.path={images}", f"run.root={tmp_path}", "--stage", "eval")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: --stage eval: eval.enabled is false (set eval.enabled=true)"), proc.stderr
    proc = launch_eval("local", f"data.path={images}", f"run.root={tmp_path}", "sampling.checkpoint=best")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: sampling.checkpoint: best needs the eval stage (set eval.enabled=true)"), proc.stderr


def test_eval_steps_are_the_milestones_and_the_last_step():
    from ddpm.config import load_config
    from ddpm.evaluate import eval_steps

    assert eval_steps(load_config(TINY_CONFIG, ["training.num_iterations=35", "training.milestone_every=10"])) == STEPS
    assert eval_steps(load_config(TINY_CONFIG, ["training.num_iterations=30", "training.milestone_every=10"])) == [
        10, 20, 30]
    assert eval_steps(load_config(TINY_CONFIG, ["training.num_iterations=30"])) == [30]


def test_dry_run_prints_the_eval_array_and_the_selection(images, fid_inputs, tmp_path):
    """The reference config with eval on: an array of 4 (milestones 25k, 50k, 75k, 100k) after training, sized
    like sampling tasks; the selection after all of them (afterany), sized like assembly; sampling after it."""
    import re

    proc = subprocess.run([sys.executable, "launch.py", "--config", str(ROOT / "configs" / "ddpm_babel.yaml"),
                           "--dry-run", "--cluster", "local", "data.source=folder", f"data.path={images}",
                           "data.center_crop=null", f"run.root={tmp_path}", "eval.enabled=true",
                           "training.milestone_every=25000", *fid_inputs],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    jobs = dict(re.findall(r"# ---- (\w+) job ----\n(.*?)(?=# ---- |\Z)", proc.stdout, re.S))
    assert list(jobs) == ["train", "eval", "select", "sample", "assemble"]
    def dependency(stage: str) -> str:
        return re.search(r"#SBATCH --dependency='?([^'\n]+)", jobs[stage]).group(1)

    assert "#SBATCH --array=0-3%4" in jobs["eval"] and dependency("eval") == "afterok:<train job id>"
    assert dependency("select") == "afterany:<eval job id>" and dependency("sample") == "afterok:<select job id>"
    assert "#SBATCH --time=240" in jobs["eval"] and "#SBATCH --time=30" in jobs["select"]


def test_the_eval_preflight_leaves_the_network_unimported(images, fid_inputs, tmp_path):
    """Checking the eval stage's inputs reads files only: pytorch-fid and torchvision (seconds to import: a
    refused command took 9 s) are imported by the eval tasks, not by launch.py's preflight."""
    code = ("import sys, launch\n"
            "try:\n    launch.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('imported:', sorted(m for m in ('torchvision', 'pytorch_fid') if m in sys.modules))")
    args = ["--config", str(TINY_CONFIG), "--cluster", "local", "--dry-run", f"data.path={images}",
            f"run.root={tmp_path}", *EVAL, *fid_inputs]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "# ---- eval job ----" in proc.stdout and "imported: []" in proc.stdout, proc.stdout + proc.stderr

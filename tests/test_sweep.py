"""``launch.py sweep`` on the login node: the grid and every point checked before anything is written or queued (one
line naming the point and the key), the dry run, and the comparison written from the points' run directories
(results.csv, results.png, TensorBoard's HParams view, ``launch.py status SWEEP_DIR``).

The sweep on the real local SLURM (a training array, a preempted task, a point failing at run time):
tests/test_sweep_slurm.py.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from helpers import TINY_CONFIG, run_main
from PIL import Image

import launch
from ddpm.cluster.sweep import expand, parse_grid
from ddpm.imagegrid import write_png
from ddpm.rundir import RunDir, SweepDir
from ddpm.sweepresults import METRIC, plot, read_sweep, write_results

LR = "training.learning_rate=[1e-3,2e-3]"


def sweep(capsys: pytest.CaptureFixture[str], *args: str):
    return run_main(launch.main, ["sweep", "--config", TINY_CONFIG, "--cluster", "local", *args], capsys)


@pytest.mark.parametrize("args, message", [
    ([], "error: launch.py sweep: no --grid given"),
    (["--grid", "training.learning_rate=1e-3"], "error: --grid training.learning_rate: '1e-3' is not a non-empty "
     "YAML list"),
    (["--grid", LR, "--grid", "training.learning_rate=[1]"], "error: --grid training.learning_rate: given twice"),
    (["--grid", LR, "training.learning_rate=1e-3"], "error: --grid training.learning_rate: also set as an override"),
    (["--grid", "run.name=[a,b]"], "error: --grid run.name: the sweep names each point's run directory"),
    (["--grid", "training.seed=[1,2]", "--seeds", "2"], "error: --grid training.seed and --seeds both set"),
    (["--grid", "training.learning_rat=[1,2]"], "error: sweep point 0 (training.learning_rat=1): "
     "training.learning_rat: unknown key (did you mean training.learning_rate?)"),
    (["--grid", "training.batch_size=[8,-1]"], "error: sweep point 1 (training.batch_size=-1): training.batch_size: "),
    (["--grid", "slurm.cpus_per_task=[1,2]", "--dry-run"], "error: sweep point 1 (slurm.cpus_per_task=2): train job "
     "cpus_per_task differs from point 0's; the training array asks SLURM for one shape of job"),
])
def test_a_bad_grid_or_point_is_one_line_and_nothing_is_written(images, tmp_path, capsys, args, message):
    out = sweep(capsys, f"data.path={images}", f"run.root={tmp_path}", *args)
    assert out.code == 2 and out.err.startswith(message), out.err
    assert len(out.err.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_a_point_whose_data_is_missing_is_refused_before_anything(images, tmp_path, capsys):
    out = sweep(capsys, f"run.root={tmp_path}", "--grid", f"data.path=[{images},{tmp_path / 'gone'}]")
    assert out.code == 2 and out.err.startswith(f'error: sweep point 1 (data.path="{tmp_path / "gone"}"): '), out.err
    assert str(tmp_path / "gone") in out.err and list(tmp_path.iterdir()) == []


def test_points_are_the_product_with_seeds_and_their_names_are_run_names(tmp_path):
    grid = parse_grid([LR, "model.channel_mult=[[1,2],[1,1]]"], [])
    points = expand(grid, seeds=2, base_seed=5, sweep_dir=tmp_path)
    assert len(points) == 8 and [p.seed for p in points[:4]] == [5, 6, 5, 6]
    assert points[1].name == "p1_learning_rate-0.001_channel_mult-1_2_seed-6"
    assert points[3].overrides() == ['training.learning_rate="1e-3"', "model.channel_mult=[1, 1]", "training.seed=6"]
    assert len({p.name for p in points}) == 8 and all(p.run_dir == str(tmp_path / p.name) for p in points)


def test_the_dry_run_prints_the_points_the_disk_and_the_jobs_and_writes_nothing(images, tmp_path, capsys):
    out = sweep(capsys, f"data.path={images}", f"run.root={tmp_path}", "--grid", LR, "--grid",
                "training.ema_decay=[0.9,0.99]", "slurm.array_parallelism=2", "--dry-run")
    assert out.code == 0, out.err
    assert "preflight ok: 4 points" in out.out and "disk: " in out.out and "for 4 points" in out.out
    assert "point 3: training.learning_rate=0.002 training.ema_decay=0.99 -> p3_learning_rate-0.002_ema_decay-0.99" \
        in out.out
    assert "#SBATCH --array=0-3%2" in out.out and "#SBATCH --job-name=tiny-train" in out.out
    assert out.out.count("after task") == 4 and "#SBATCH --job-name=tiny-results" in out.out
    assert list(tmp_path.iterdir()) == []


def _finished_point(entry: dict, fid: float | None, error: str | None = None) -> None:
    """A point's run directory as its stages leave it (config, status, provenance, grid, metrics)."""
    run = RunDir(entry["run_dir"])
    run.path.mkdir(parents=True)
    run.config.write_text("training: {num_iterations: 30}\ninfrastructure: {num_gpus: 2, num_nodes: 1}\n")
    state = {"state": "failed", "step": 10, "error": error} if error else {"state": "done", "step": 30}
    run.status.write_text(json.dumps({"schema": 1, **state}))
    run.provenance.write_text(json.dumps({"starts": [{"train_s": 1800.0}, {"train_s": 900.0}]}))
    if error is None:
        run.samples.path.mkdir()
        write_png(np.full((8, 8, 1), 40 * entry["index"], np.uint8), run.samples.grid)
        run.samples.metrics.write_text(json.dumps({"fid": fid}))


def test_results_status_and_hparams_of_a_finished_sweep(tmp_path, capsys):
    """Two values x two seeds; one point failed: three scored rows and the failed one marked, the spread over
    seeds, wall time and GPU-hours, a PNG with one panel per key, an HParams session per point, the status."""
    grid = {"training.learning_rate": [0.001, 0.002]}
    points = expand(grid, seeds=2, base_seed=0, sweep_dir=tmp_path)
    record = {"schema": 1, "name": "sw", "grid": grid, "seeds": 2, "cluster": "local",
              "points": [{**p.__dict__, "jobs": {"train": f"j{p.index}"}} for p in points]}
    SweepDir(tmp_path).sweep.write_text(json.dumps(record))
    for entry, fid in zip(record["points"], [10.0, 14.0, 7.0, None], strict=True):
        _finished_point(entry, fid, error="out of memory at step 10" if fid is None else None)

    write_results(tmp_path)
    rows = list(csv.DictReader(SweepDir(tmp_path).results_csv.open()))
    assert [(r["state"], r["fid"], r["seed"]) for r in rows] == [
        ("done", "10.0000", "0"), ("done", "14.0000", "1"), ("done", "7.0000", "0"), ("failed", "", "1")]
    assert rows[0]["fid_spread"] == rows[1]["fid_spread"] == "2.0000" and rows[2]["fid_spread"] == ""
    assert rows[3]["error"] == "out of memory at step 10" and rows[0]["training.learning_rate"] == "0.001"
    assert rows[0]["wall_s"] == "2700.0" and rows[0]["gpu_hours"] == "1.500"
    with Image.open(SweepDir(tmp_path).results_png) as png:
        assert png.format == "PNG" and png.width > 300
    assert plot(read_sweep(tmp_path), rows, tmp_path / "again.png") == ["training.learning_rate"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata as hp_metadata

    experiment = EventAccumulator(str(SweepDir(tmp_path).tb))
    experiment.Reload()
    assert list(experiment.PluginTagToContent("hparams")) == [hp_metadata.EXPERIMENT_TAG]
    session = EventAccumulator(str(RunDir(points[2].run_dir).tb_hparams))
    session.Reload()
    assert [(e.step, e.value) for e in session.Scalars(METRIC)] == [(30, 7.0)]
    assert list(session.PluginTagToContent("hparams")) == [hp_metadata.SESSION_START_INFO_TAG]

    out = run_main(launch.main, ["status", str(tmp_path)], capsys)
    assert out.code == 0, out.err
    assert "point 3: failed: out of memory at step 10; step 10/30; FID -; train job j3" in out.out, out.out
    assert "point 2: done; step 30/30; FID 7.000" in out.out and "best so far: point 2" in out.out
    assert f"results: {SweepDir(tmp_path).results_csv}" in out.out

"""A sweep's comparison, from its points' run directories: ``results.csv``, ``results.png`` and TensorBoard's
HParams view (no torch: the results job and ``launch.py status`` run it).

    python -m ddpm.sweepresults SWEEP_DIR      # what the sweep's results job runs

- ``results.csv``: one row per point (and training seed): the swept values, the state (``done`` or ``failed``
  with its one line), the steps trained, the FID (the eval stage's best mean when ``eval.enabled``, else the
  final samples' FID from ``samples/metrics.json``), ``fid_spread`` (the standard deviation over the point's
  training seeds with ``--seeds`` > 1, else over the eval stage's seed sets), the training wall time (the sum of
  every attempt's, from provenance.json) and GPU-hours (wall time x GPUs of the run).
- ``results.png``: one panel per swept key, FID against its values (a line per setting of the other keys, the
  mean over seeds, error bars one standard deviation), and below it each point's final sample grid.
- TensorBoard: ``SWEEP_DIR/tb`` holds the experiment (the swept keys and ``sweep/fid``), each point's
  ``tb/hparams`` its values and FID, so ``tensorboard --logdir SWEEP_DIR`` compares the points (HParams tab).
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ddpm.errors import DDPMError, cli_entry
from ddpm.rundir import RunDir, SweepDir

METRIC = "sweep/fid"
SWEEP_SCHEMA = 1  # the layout of sweep.json


def read_sweep(sweep_dir: Path) -> dict[str, Any]:
    """``sweep.json``; one line when it is missing, unreadable or of a newer schema."""
    path = SweepDir(sweep_dir).sweep
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DDPMError(f"{path}: not a readable sweep record ({type(err).__name__})") from None
    if record.get("schema", 0) > SWEEP_SCHEMA:
        raise DDPMError(f"{path}: sweep schema {record['schema']}, this version reads {SWEEP_SCHEMA}")
    return record


def point_run(point: dict[str, Any]) -> RunDir:
    """The run directory of a point of sweep.json."""
    return RunDir(point["run_dir"])


def point_fid(run: RunDir) -> tuple[float | None, list[float], str]:
    """(FID, the eval seed sets' FIDs, where it comes from) of a run: the eval selection's best mean, else the
    final samples' FID; (None, [], "") when neither was written."""
    if run.fid.is_file():
        best = json.loads(run.fid.read_text())["best"]
        return float(best["mean"]), [float(f) for f in best.get("fid", [])], f"eval (step {best['step']})"
    if run.samples.metrics.is_file() and (fid := json.loads(run.samples.metrics.read_text()).get("fid")) is not None:
        return float(fid), [], "final samples"
    return None, [], ""


def wall_seconds(run: RunDir) -> float:
    """Training wall time: the sum of every attempt's seconds (the wrapper adds ``train_s`` to its start)."""
    if not run.provenance.is_file():
        return 0.0
    return sum(float(s.get("train_s", 0.0)) for s in json.loads(run.provenance.read_text())["starts"])


def point_row(point: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """One results.csv row of a sweep point (its entry in sweep.json)."""
    run = point_run(point)
    status = json.loads(run.status.read_text()) if run.status.is_file() else {}
    cfg = yaml.safe_load(run.config.read_text()) if run.config.is_file() else {}
    fid, sets, source = point_fid(run)
    done = run.samples.metrics.is_file()
    error = "" if done else (point.get("failed") or status.get("error") or
                             f"no samples (training {status.get('state', 'not started')}; see its logs)")
    wall = wall_seconds(run)
    infra = cfg.get("infrastructure", {})
    gpus = int(infra.get("num_gpus", 0)) * int(infra.get("num_nodes", 1))
    return {"point": point["index"], "name": point["name"], **{k: json.dumps(point["values"][k]) for k in keys},
            "seed": "" if point.get("seed") is None else point["seed"], "state": "done" if done else "failed",
            "step": max(int(status.get("step", 0)), 0), "fid": "" if fid is None else f"{fid:.4f}",
            "fid_source": source,
            "fid_spread": f"{statistics.pstdev(sets):.4f}" if len(sets) > 1 else "", "wall_s": f"{wall:.1f}",
            "gpu_hours": f"{wall / 3600 * gpus:.3f}", "error": error}


def _seed_spread(rows: list[dict[str, Any]], keys: list[str]) -> None:
    """With several training seeds, ``fid_spread`` is the spread of the point's FID over them."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    for group in groups.values():
        fids = [float(r["fid"]) for r in group if r["fid"] != ""]
        if len(group) > 1:
            for r in group:
                r["fid_spread"] = f"{statistics.pstdev(fids):.4f}" if len(fids) > 1 else ""


def collect(sweep_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(sweep.json, one row per point)."""
    record = read_sweep(sweep_dir)
    keys = list(record["grid"])
    rows = [point_row(p, keys) for p in record.get("points", [])]
    if not rows:
        raise DDPMError(f"{SweepDir(sweep_dir).sweep}: no points were submitted")
    _seed_spread(rows, keys)
    return record, rows


def plot(record: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> list[str]:
    """results.png (see the module's docstring); returns the titles of its FID panels, one per swept key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(record["grid"])
    fig = plt.figure(figsize=(max(4.0 * len(keys), 2.2 * len(rows)), 7.5), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[3, 2])
    titles = []
    for ax, key in zip(top.subplots(1, len(keys), squeeze=False)[0], keys, strict=True):
        values = [json.dumps(v) for v in record["grid"][key]]
        others = [k for k in keys if k != key]
        lines: dict[tuple[str, ...], dict[str, list[float]]] = {}
        for r in rows:
            if r["fid"] != "":
                lines.setdefault(tuple(r[k] for k in others), {}).setdefault(r[key], []).append(float(r["fid"]))
        for setting, by_value in sorted(lines.items()):
            xs = [i for i, v in enumerate(values) if v in by_value]
            ys = [statistics.fmean(by_value[values[i]]) for i in xs]
            err = [statistics.pstdev(by_value[values[i]]) for i in xs]
            label = ", ".join(f"{k.rsplit('.', 1)[1]}={v}" for k, v in zip(others, setting, strict=True)) or "FID"
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label=label)
        failed = sum(r["state"] != "done" for r in rows)
        ax.set_xticks(range(len(values)), values)
        ax.set_xlabel(key)
        ax.set_ylabel("FID (lower is better)")
        ax.set_title(f"FID vs {key}" + (f" ({failed} failed point(s) not shown)" if failed else ""), fontsize=9)
        if lines:
            ax.legend(fontsize=7)
        titles.append(key)
    for ax, r in zip(bottom.subplots(1, len(rows), squeeze=False)[0], rows, strict=True):
        grid = point_run(record["points"][int(r["point"])]).samples.grid
        if grid.is_file():
            ax.imshow(plt.imread(grid), cmap="gray")
        else:
            ax.text(0.5, 0.5, "failed", ha="center", va="center", color="red")
        ax.set_title(f"p{r['point']}: FID {r['fid'] or '-'}", fontsize=8)
        ax.axis("off")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return titles


def _hparam_value(value: Any) -> bool | int | float | str:
    return value if isinstance(value, bool | int | float | str) else json.dumps(value)


def write_hparams(record: dict[str, Any], rows: list[dict[str, Any]], sweep_dir: Path) -> None:
    """TensorBoard's HParams view: the experiment in SWEEP_DIR/tb, each point's session in its tb/hparams."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import summary_v2 as hp
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    def write(logdir: Path, *summaries: tuple[Summary, int]) -> None:
        for old in logdir.glob("events.out.tfevents.*") if logdir.is_dir() else []:
            old.unlink()  # written again, not added to: one session per point
        writer = EventFileWriter(str(logdir))
        for summary, step in summaries:
            writer.add_event(Event(wall_time=time.time(), step=step, summary=summary))
        writer.close()

    keys = list(record["grid"])
    domains = {k: [_hparam_value(v) for v in record["grid"][k]] for k in keys}
    hparams = [hp.HParam(k, hp.Discrete(d) if len({type(v) for v in d}) == 1 else None) for k, d in domains.items()]
    if any(r["seed"] != "" for r in rows):
        hparams.append(hp.HParam("training.seed"))
    write(SweepDir(sweep_dir).tb, (hp.hparams_config_pb(hparams, [hp.Metric(METRIC, display_name="FID")]), 0))
    for r, point in zip(rows, record["points"], strict=True):
        values = {k: _hparam_value(point["values"][k]) for k in keys}
        if r["seed"] != "":
            values["training.seed"] = int(r["seed"])
        out = [(hp.hparams_pb(values, trial_id=point["name"]), 0)]
        if r["fid"] != "":
            out.append((Summary(value=[Summary.Value(tag=METRIC, simple_value=float(r["fid"]))]), int(r["step"])))
        write(point_run(point).tb_hparams, *out)


def write_results(sweep_dir: Path) -> Path:
    """results.csv, results.png and the HParams view of the sweep in ``sweep_dir``; prints the best point."""
    sweep = SweepDir(sweep_dir)
    record, rows = collect(sweep_dir)
    fields = list(rows[0])
    tmp = sweep.results_csv.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(sweep.results_csv)
    plot(record, rows, sweep.results_png)
    write_hparams(record, rows, sweep_dir)
    scored = [r for r in rows if r["fid"] != ""]
    best = min(scored, key=lambda r: float(r["fid"]), default=None)
    print(f"sweep: {len(scored)}/{len(rows)} points scored, {sum(r['state'] != 'done' for r in rows)} failed; "
          + (f"best: point {best['point']} ({best['name']}, FID {best['fid']})" if best else "none scored")
          + f" -> {sweep.results_csv}, {sweep.results_png.name}", flush=True)
    return sweep.results_csv


@cli_entry
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise DDPMError("usage: python -m ddpm.sweepresults SWEEP_DIR")
    write_results(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

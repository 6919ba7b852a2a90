"""A sweep: the cartesian product of ``--grid`` values (times ``--seeds`` training seeds), each point a run of
its own, submitted as one SLURM training array plus a chain of the later stages per point (login side).

    python launch.py sweep --config configs/tiny_cpu.yaml --grid 'training.learning_rate=[1e-3,2e-3]' \\
        --grid 'training.ema_decay=[0.99,0.999]' [--seeds 2] [section.key=value ...] [--cluster ...] [--dry-run]
    python launch.py status SWEEP_DIR

The sweep directory is ``<run.root>/<run.name>`` of the config and overrides; point k runs in
``SWEEP_DIR/p<k>-<key>-<value>...`` (the last part of each swept key, the value in run-name characters).
``sweep.json`` holds the grid, the points, their run directories and their job ids; each point's
``jobs.json`` makes ``launch.py status POINT_DIR`` work as for a single run.

On SLURM the training of every point is one array (``slurm.array_parallelism`` at once); point k's eval,
sampling and assembly wait ``afterok`` on task k only, so one point's failure stops its own chain (SLURM
cancels it: ``--kill-on-invalid-dep``) and nothing else. A results job waits ``afterany`` on everything and
writes ``results.csv``, ``results.png`` and the HParams view (:mod:`ddpm.sweepresults`). Preemption, requeue,
time limits and the crash-loop stop are the training wrapper's, per array task as per job. Locally the points
run one after another (with GPUs: a wave of points at once, one set of GPUs each).
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from ddpm.cluster.executors import local_slots, make_executor, sbatch_script, stage_resources
from ddpm.cluster.preflight import preflight
from ddpm.cluster.submit import STAGES, follow, submit
from ddpm.cluster.tasks import SweepResultsTask, SweepTrainTask
from ddpm.config import Config, dump_config, load_config
from ddpm.errors import ConfigError, DDPMError
from ddpm.fsio import atomic_write_text
from ddpm.plan import disk_plan, human_size
from ddpm.rundir import RunDir, SweepDir
from ddpm.sweepresults import SWEEP_SCHEMA, point_run, read_sweep  # noqa: F401 (SWEEP_SCHEMA: this module's API too)

NAMED_BY_THE_SWEEP = ("run.name", "run.root")  # the sweep names each point's run directory
# what a training array task's sbatch request is made of: every point must ask the same
ARRAY_SHAPE = ("slurm.partition", "slurm.account", "slurm.qos", "slurm.gres", "slurm.setup", "slurm.additional",
               "slurm.signal_delay_s", "slurm.max_restarts", "infrastructure.num_nodes", "training.stop_signal")


@dataclass(frozen=True)
class Point:
    """One run of the sweep: its swept values (``seed``: the training seed when ``--seeds`` > 1)."""

    index: int
    name: str
    values: dict[str, Any]
    seed: int | None
    run_dir: str

    @property
    def run(self) -> RunDir:
        """The point's run directory (``run_dir``: the path sweep.json records)."""
        return RunDir(self.run_dir)

    def overrides(self) -> list[str]:
        """The ``key=value`` overrides that make this point (the values as YAML flow text)."""
        out = [f"{k}={json.dumps(v)}" for k, v in self.values.items()]
        return out + ([f"training.seed={self.seed}"] if self.seed is not None else [])

    def shown(self) -> str:
        return " ".join(self.overrides())


def parse_grid(specs: list[str], overrides: list[str]) -> dict[str, list[Any]]:
    """``['training.learning_rate=[1e-4,2e-4]', ...]`` -> ``{key: [values]}``; one ConfigError line per bad spec."""
    grid: dict[str, list[Any]] = {}
    fixed = {o.partition("=")[0] for o in overrides}
    for spec in specs:
        key, sep, text = spec.partition("=")
        if not sep or not re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", key):
            raise ConfigError(f"--grid {spec!r}: expected section.key=[v1,v2,...]")
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError:
            values = None
        if not isinstance(values, list) or not values:
            raise ConfigError(f"--grid {key}: {text!r} is not a non-empty YAML list (e.g. {key}=[1e-4,2e-4])")
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice; list every value in one --grid")
        if key in fixed:
            raise ConfigError(f"--grid {key}: also set as an override; sweep it or fix it, not both")
        if key in NAMED_BY_THE_SWEEP:
            raise ConfigError(f"--grid {key}: the sweep names each point's run directory; sweep another key")
        if len({json.dumps(v) for v in values}) != len(values):
            raise ConfigError(f"--grid {key}: a value is listed twice in {text}")
        grid[key] = values
    if not grid:
        raise ConfigError("launch.py sweep: no --grid given (e.g. --grid 'training.learning_rate=[1e-4,2e-4]')")
    return grid


def _name_part(value: Any) -> str:
    """A swept value in run-name characters: ``1e-4`` (a string to PyYAML) -> ``0.0001``, ``[1, 2]`` -> ``1_2``."""
    try:
        value = float(value) if isinstance(value, str) else value
    except ValueError:
        pass
    text = value if isinstance(value, str) else json.dumps(value)
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.-]", "_", text)).strip("_") or "x"


def expand(grid: dict[str, list[Any]], seeds: int, base_seed: int, sweep_dir: Path) -> list[Point]:
    """Every point of the grid (the first key varies slowest), each of ``seeds`` training seeds."""
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: expected an integer >= 1")
    if seeds > 1 and "training.seed" in grid:
        raise ConfigError("--grid training.seed and --seeds both set the training seed; use one")
    points = []
    for combo in itertools.product(*grid.values()):
        for s in range(seeds):
            k = len(points)
            values = dict(zip(grid, combo, strict=True))
            parts = [f"{key.rsplit('.', 1)[1]}-{_name_part(v)}" for key, v in values.items()]
            seed = base_seed + s if seeds > 1 else None
            name = "_".join([f"p{k}", *parts, *([f"seed-{seed}"] if seed is not None else [])])[:120]
            points.append(Point(k, name, values, seed, str(sweep_dir / name)))
    return points


def _array_shape(cfg: Config) -> dict[str, Any]:
    flat = cfg.to_dict()
    shape = {key: flat[key.split(".")[0]][key.split(".")[1]] for key in ARRAY_SHAPE}
    return {**shape, **{f"train job {k}": v for k, v in stage_resources(cfg, "train").items()}}


def configs(config: str | None, overrides: list[str], points: list[Point], cluster: str, stages: list[str],
            dry_run: bool) -> list[Config]:
    """Every point's config, preflighted before anything is written or queued; one line naming the point. The
    preflight's write test makes the sweep directory (the points' run.root): it is removed again on a refusal
    and after a dry run."""
    sweep_dir = points[0].run.root
    made = not sweep_dir.exists()
    try:
        return _checked_configs(config, overrides, points, cluster, stages, dry_run)
    finally:
        if made and (dry_run or sys.exc_info()[0] is not None) and sweep_dir.is_dir() and \
                not any(sweep_dir.iterdir()):
            sweep_dir.rmdir()


def _checked_configs(config: str | None, overrides: list[str], points: list[Point], cluster: str,
                     stages: list[str], dry_run: bool) -> list[Config]:
    cfgs = []
    for p in points:
        try:
            cfg = load_config(config, [*overrides, *p.overrides(), f"run.root={p.run.root}",
                                       f"run.name={p.name}"])
            preflight(cfg, cluster, stages, dry_run=dry_run)
        except DDPMError as err:
            raise type(err)(f"sweep point {p.index} ({p.shown()}): {err}") from None
        cfgs.append(cfg)
        flat = cfg.to_dict()  # the values as the config holds them (PyYAML reads 1e-4 as a string)
        p.values.update({k: functools.reduce(lambda d, part: d[part], k.split("."), flat) for k in p.values})
    first = _array_shape(cfgs[0])
    for p, cfg in zip(points, cfgs, strict=True) if cluster == "slurm" or dry_run else ():
        if (diff := next((k for k, v in _array_shape(cfg).items() if first[k] != v), None)) is not None:
            raise ConfigError(f"sweep point {p.index} ({p.shown()}): {diff} differs from point 0's; the training "
                              "array asks SLURM for one shape of job: sweep it in separate sweeps")
    return cfgs


def typed_grid(grid: dict[str, list[Any]], points: list[Point]) -> dict[str, list[Any]]:
    """The grid with each value as the configs hold it (after :func:`configs`), in the order given."""
    return {k: list({json.dumps(p.values[k]): p.values[k] for p in points}.values()) for k in grid}


def check_sweep_space(sweep_dir: Path, cfgs: list[Config]) -> str:
    """The disk plan of the whole sweep; one line when run.root has less free space than it needs."""
    need = sum(disk_plan(cfg).total for cfg in cfgs)
    free = shutil.disk_usage(sweep_dir if sweep_dir.is_dir() else sweep_dir.parent).free
    line = f"disk: {human_size(need)} for {len(cfgs)} points (run.root has {human_size(free)} free)"
    if free < need:
        raise DDPMError(f"run.root: {sweep_dir.parent} has {human_size(free)} free, the sweep "
                        f"needs about {human_size(need)} ({len(cfgs)} points): free space, move run.root, or sweep "
                        "fewer points")
    return line


def _write(sweep: SweepDir, record: dict[str, Any]) -> None:
    atomic_write_text(sweep.sweep, json.dumps(record, indent=2) + "\n")


def _chain(stages: list[str]) -> list[str]:
    return [s for s in stages if s != "train"]


def _sweep_executor(cfg: Config, sweep: SweepDir, name: str, job: str, cluster: str,
                    dependency: str | None = None) -> Any:
    """The executor of the sweep ``name``'s own jobs (``job``: train, the array; results, after every job, sized as
    an assembly job), logging to the sweep's logs/ and named ``<name>-<job>``."""
    ex = make_executor(cfg, sweep, "train" if job == "train" else "assemble", cluster, dependency)
    ex.update_parameters(job_name=f"{name}-{job}")
    return ex


def submit_sweep(sweep_dir: Path, points: list[Point], cfgs: list[Config], cluster: str, stages: list[str],
                 record: dict[str, Any], dry_run: bool) -> dict[str, Any]:
    """Submit (locally: run) every point; returns ``sweep.json``'s record with the job ids."""
    sweep, cfg0 = SweepDir(sweep_dir), cfgs[0]
    if dry_run:
        ex = _sweep_executor(cfg0, sweep, record["name"], "train", "slurm")
        print(f"# ---- training array: {len(points)} tasks ----\n{sbatch_script(ex, len(points))}")
        for p in points:
            print(f"# point {p.index}: {' -> '.join(_chain(stages))} after task {p.index} (afterok); "
                  f"run dir {p.run_dir}")
        ex = _sweep_executor(cfg0, sweep, record["name"], "results", "slurm", "afterany:<every job above>")
        print(f"# ---- results job ----\n{sbatch_script(ex)}")
        return record
    for p, cfg in zip(points, cfgs, strict=True):
        p.run.path.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, p.run.config)
    record["points"] = [{**asdict(p), "jobs": {}} for p in points]
    _write(sweep, record)
    if cluster == "local":
        _run_local(sweep, points, cfgs, stages, record)
        return record
    ex = _sweep_executor(cfg0, sweep, record["name"], "train", cluster)
    tasks = ex.map_array(SweepTrainTask([p.run for p in points]), list(range(len(points))))
    record["train_array"] = tasks[0].job_id.split("_")[0]
    print(f"training array: job {record['train_array']} ({len(points)} tasks, "
          f"{cfg0.slurm.array_parallelism} at once)", flush=True)
    ends = [record["train_array"]]
    for p, cfg, task, entry in zip(points, cfgs, tasks, record["points"], strict=True):
        jobs = {"train": task.job_id}
        print(f"point {p.index} ({p.shown()}): train task {task.job_id}", flush=True)
        jobs.update(submit(cfg, p.run, cluster, _chain(stages), False, dependency=f"afterok:{task.job_id}"))
        jobs["cluster"] = cluster
        entry["jobs"] = jobs
        atomic_write_text(p.run.jobs, json.dumps(jobs, indent=2) + "\n")
        ends += [jobs[s] for s in _chain(stages)]
    ex = _sweep_executor(cfg0, sweep, record["name"], "results", cluster, "afterany:" + ":".join(ends))
    record["results_job"] = ex.submit(SweepResultsTask(sweep_dir)).job_id
    print(f"results: job {record['results_job']} (after every job above)", flush=True)
    _write(sweep, record)
    return record


def _run_local(sweep: SweepDir, points: list[Point], cfgs: list[Config], stages: list[str],
               record: dict[str, Any]) -> None:
    """Each point's stages on this machine: training in waves (one set of GPUs per point; without GPUs one point
    at a time), then its later stages; a point that fails is recorded and the others go on."""
    slots = local_slots(cfgs[0], "train", len(points)) if cfgs[0].infrastructure.num_gpus else [()]
    for start in range(0, len(points), len(slots)):
        wave = list(zip(points, cfgs, record["points"], strict=True))[start:start + len(slots)]
        running = []
        for (p, cfg, entry), devices in zip(wave, slots, strict=False):
            ex = make_executor(cfg, p.run, "train", "local", gpus=devices)
            job = ex.submit(SweepTrainTask([p.run]), 0)
            entry["jobs"] = {"cluster": "local", "run_dir": p.run_dir, "train": job.job_id}
            print(f"point {p.index} ({p.shown()}): train job {job.job_id}", flush=True)
            running.append((p, cfg, entry, job))
        for p, cfg, entry, job in running:
            try:
                if follow(job, f"point {p.index} train") == "stopped":
                    entry["stopped"] = True  # the same command resumes it
                    print(f"sweep: point {p.index} stopped early; its later stages are not run", flush=True)
                else:
                    entry["jobs"].update(submit(cfg, p.run, "local", _chain(stages), False))
            except DDPMError as err:
                print(f"sweep: point {p.index} failed: {err}", flush=True)
                entry["failed"] = str(err)
            atomic_write_text(p.run.jobs, json.dumps(entry["jobs"], indent=2) + "\n")
            _write(sweep, record)
    SweepResultsTask(sweep.path)()


def _point_state(point: dict[str, Any], status: dict[str, Any], slurm: bool) -> tuple[str, bool]:
    """(what a point is doing, whether it has ended): done, failed (with the one line), or its training's
    state (``status``: its status.json) / the job it waits in."""
    from ddpm.cluster.squeue import job_state

    run, jobs = point_run(point), point.get("jobs", {})
    if run.samples.metrics.is_file():
        return "done", True
    if point.get("failed") or status.get("state") == "failed":
        return f"failed: {point.get('failed') or status.get('error')}", True
    ids = [jobs[s] for s in STAGES if s in jobs]
    if slurm:
        alive = [(i, st) for i in ids if (st := job_state(i)).alive]
        if alive:
            i, st = alive[0]
            return f"{status.get('state', 'queued')} (job {i} {st})", False
        return "failed: its jobs ended without samples (see its logs)", True
    return ("stopped (run the sweep again to resume)" if point.get("stopped") else
            "failed: no samples (see its logs)"), True


def sweep_status(sweep_dir: Path) -> int:
    """``launch.py status SWEEP_DIR``: a line per point (state, step, FID, its training job), the best point;
    once every point has ended, results.csv and results.png (written now if the results job has not)."""
    from ddpm.status import read_status
    from ddpm.sweepresults import point_fid, write_results

    sweep = SweepDir(sweep_dir)
    record = read_sweep(sweep_dir)
    points, slurm = record.get("points", []), record.get("cluster") == "slurm"
    print(f"sweep: {sweep_dir} ({len(points)} points of {', '.join(record['grid'])}; cluster {record['cluster']})")
    ended, best = 0, None
    for p in points:
        run = point_run(p)
        status = read_status(run) or {}
        state, over = _point_state(p, status, slurm)
        ended += over
        step = int(status.get("step") or 0)
        total = yaml.safe_load(run.config.read_text())["training"]["num_iterations"]
        fid = point_fid(run)[0]
        if fid is not None and (best is None or fid < best[1]):
            best = (p, fid)
        print(f"  point {p['index']}: {state}; step {max(step, 0)}/{total}; "
              f"FID {'-' if fid is None else f'{fid:.3f}'}; train job {p.get('jobs', {}).get('train', '-')}; "
              f"{p['name']}")
    if best:
        print(f"best so far: point {best[0]['index']} ({best[0]['name']}), FID {best[1]:.3f}")
    if points and ended == len(points):
        if not sweep.results_csv.is_file():
            write_results(sweep_dir)
        print(f"results: {sweep.results_csv}, {sweep.results_png}")
    else:
        print(f"{ended}/{len(points)} points ended; results.csv when all have")
    return 0

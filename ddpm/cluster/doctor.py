"""``python launch.py doctor --config X``: what this cluster does when it stops a job, checked before a long run.

1. The cluster's stop settings (``scontrol show config`` / ``show partition``): JobRequeue, PreemptType and the
   partition's PreemptMode, GraceTime, KillWait, MaxTime against ``slurm.time_min``; the time a checkpoint of
   the configured model needs on ``run.root`` against the time SLURM gives after a stop signal.
2. One short job with the training resources (partition, gres, nodes, CPUs, memory; ``ddpm.cluster.probe``):
   torch and its CUDA build against the floor, the driver, the GPUs seen against those asked for, the build's
   kernels for each card, whether the card runs ``infrastructure.precision`` (a FAIL costs no other line), an
   all-reduce across the job's ranks (NCCL on GPUs, gloo on CPU) with its bandwidth, write and read speed of
   ``run.root`` and node-local scratch, the configured model's training img/s; then the run plan: wall time
   for ``training.num_iterations``, GPU-hours, requeues, disk, and the checkpoint save against the signal window.
3. One tiny CPU job on the configured partition that takes the stop path end to end: the stop signal
   (``scancel --signal=<training.stop_signal>``, what the time limit sends), a checkpoint, a requeue and a
   resume, compared bitwise with an uninterrupted job of the same tiny config on the same partition.

Every line is ``ok``, ``note`` (behaviour to know about) or ``FAIL`` (with the config key or sbatch option
to change). The exit code is 1 when anything failed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from ddpm.architecture import checkpoint_bytes
from ddpm.cluster.probe import storage_speed, time_checkpoint
from ddpm.config import Config, dump_config, load_config
from ddpm.envcheck import check_torch_floor
from ddpm.errors import DDPMError
from ddpm.plan import run_plan
from ddpm.rundir import RunDir

TINY = ["model.base_channels=16", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
        "model.attention_resolutions=[4]", "model.num_heads=2", "model.dropout=0.0", "training.batch_size=8",
        "training.num_iterations=200", "training.save_every=100", "training.log_every=10",
        "training.sample_every=100000", "training.ema_start=2", "ddpm.num_timesteps=50", "sampling.num_steps=10",
        "data.source=folder", "data.image_size=8", "data.center_crop=null", "data.num_workers=1",
        "infrastructure.num_gpus=0", "infrastructure.nproc_per_node=1", "infrastructure.precision=fp32",
        "slurm.cpus_per_task=1", "slurm.mem_gb=2", "slurm.time_min=10", "slurm.signal_delay_s=120",
        "slurm.max_restarts=2", "slurm.gres=null", "slurm.setup=[export OMP_NUM_THREADS=1]"]


class Report:
    """Prints each check as it is made; remembers whether any failed."""

    def __init__(self) -> None:
        self.failed = False

    def __call__(self, kind: str, what: str, detail: str) -> None:
        self.failed |= kind == "FAIL"
        print(f"{kind:<5} {what:<18} {detail}", flush=True)


def scontrol_fields(*args: str) -> dict[str, str]:
    """``scontrol show config`` (``Key = Value`` lines) or ``show partition -o`` (``Key=Value`` tokens)."""
    out = subprocess.run(["scontrol", "show", *args], capture_output=True, text=True, timeout=60, check=True).stdout
    fields: dict[str, str] = {}
    for line in out.splitlines():
        if " = " in line:
            key, _, value = line.partition(" = ")
            fields[key.strip()] = value.strip()
        else:
            for token in line.split():
                key, sep, value = token.partition("=")
                if sep:
                    fields[key] = value
    return fields


def check_cluster(cfg: Config, report: Report, save_test: bool = False) -> None:
    """Step 1: the stop settings of the cluster and the partition, and whether a checkpoint fits in them."""
    from ddpm.cluster.preflight import default_partition

    sc = cfg.slurm
    conf = scontrol_fields("config")
    part_name = sc.partition or default_partition() or ""
    part = scontrol_fields("partition", "-o", part_name)
    requeue = conf.get("JobRequeue", "1")
    report("ok", "requeue", f"JobRequeue={requeue}; jobs are submitted with --requeue, so SLURM may requeue them")
    kill_wait = int(conf.get("KillWait", "30 sec").split()[0])
    mode = part.get("PreemptMode", conf.get("PreemptMode", "OFF")).upper()
    grace = int(part.get("GraceTime", "0"))
    preempt_type = conf.get("PreemptType", "preempt/none")
    if save_test:
        size, need = time_checkpoint(cfg, Path(cfg.run.root))
        report("ok", "checkpoint", f"{size / 2**30:.2f} GiB written to run.root in {need:.1f} s (measured)")
    else:
        size = checkpoint_bytes(cfg.model, cfg.data.image_size)
        speed = storage_speed(Path(cfg.run.root), size_mb=64)[0]
        need = 2 * size / 2**20 / speed  # torch.save + fsync took 1.6-1.8x the raw write of the same bytes here
        report("ok", "checkpoint", f"{size / 2**30:.2f} GiB at {speed:.0f} MB/s on run.root: about {need:.1f} s "
               "(--save-test measures a real one)")
    if preempt_type.endswith("none") or mode.startswith("OFF"):
        report("ok", "preemption", f"partition {part_name} is not preempted (PreemptType={preempt_type}, "
               f"PreemptMode={mode}): only the time limit, scancel or a node failure stop a job")
    else:
        budget = grace + kill_wait
        what = {"REQUEUE": "requeued by SLURM", "CANCEL": "cancelled by SLURM unless the wrapper requeues "
                "first (after its checkpoint); otherwise `launch.py status` prints the resume command"}
        report("ok" if mode.split(",")[0] in what else "note", "preemption",
               f"PreemptType={preempt_type}, PreemptMode={mode} on {part_name}: SIGTERM, then GraceTime={grace} s "
               f"(+KillWait={kill_wait} s); jobs are {what.get(mode.split(',')[0], 'suspended, not stopped')}")
        if budget < need + 5:
            report("FAIL", "grace time", f"{budget} s after SIGTERM is less than the ~{need:.0f} s a checkpoint "
                   "needs: a preemption loses up to training.save_every steps; lower training.save_every or ask "
                   "for a partition with a longer GraceTime")
        else:
            report("ok", "grace time", f"{budget} s after SIGTERM covers the ~{need:.1f} s checkpoint")
    if sc.signal_delay_s < need + 30:
        report("FAIL", "time limit", f"slurm.signal_delay_s={sc.signal_delay_s} s leaves too little for a ~{need:.0f} "
               "s checkpoint and the step in flight: raise slurm.signal_delay_s")
    else:
        report("ok", "time limit", f"USR2 {sc.signal_delay_s} s before the limit (up to 60 s earlier) covers the "
               f"~{need:.1f} s checkpoint")
    # preflight's check_slurm (run first) already stops a time_min above the partition's limit with one line
    report("ok", "max time", f"slurm.time_min={sc.time_min} within partition {part_name} "
           f"MaxTime={part.get('MaxTime', 'UNLIMITED')}")


def _tiny_run(cfg: Config, root: Path, name: str) -> tuple[Config, RunDir]:
    """The tiny CPU config with the user's slurm section (partition, account, qos, setup, additional)."""
    sc = cfg.slurm
    keep = [f"slurm.partition={sc.partition}" if sc.partition else "slurm.partition=null",
            f"slurm.account={sc.account}" if sc.account else "slurm.account=null",
            f"slurm.qos={sc.qos}" if sc.qos else "slurm.qos=null",
            f"slurm.additional={json.dumps(sc.additional)}",
            f"slurm.setup={json.dumps([*sc.setup, 'export OMP_NUM_THREADS=1'])}",
            f"training.stop_signal={cfg.training.stop_signal}"]
    tiny = load_config(None, [*TINY, *keep, f"data.path={root / 'data'}", f"run.root={root}", f"run.name={name}"])
    run = tiny.run_dir.resolve()
    run.path.mkdir(parents=True, exist_ok=True)
    dump_config(tiny, run.config)
    return tiny, run


def _write_images(directory: Path, count: int = 24) -> None:
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray((rng.random((8, 8, 3)) * 255).astype("uint8")).save(directory / f"{i:03d}.png")


def _wait(ok: Callable[[], bool], timeout: float) -> bool:
    """Poll ``ok`` every second for up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            return False
        time.sleep(1.0)
    return True


def _restarts(job: str) -> int:
    try:
        return int(scontrol_fields("job", "-o", job).get("Restarts", "0"))
    except (subprocess.SubprocessError, OSError, ValueError):
        return 0


def check_stop_path(cfg: Config, report: Report, timeout: float, root: Path) -> None:
    """Step 3: a tiny job stopped by the stop signal must checkpoint, be requeued, resume and match."""
    from ddpm.cluster.executors import TrainTask, make_executor
    from ddpm.cluster.squeue import job_state

    _write_images(root / "data")
    jobs: dict[str, tuple[str, RunDir]] = {}
    try:
        for name in ("stopped", "reference"):
            tiny, run = _tiny_run(cfg, root, name)
            try:
                jobs[name] = (make_executor(tiny, run, "train", "slurm").submit(TrainTask(run)).job_id, run)
            except Exception as err:  # sbatch refused it (e.g. the partition requires a GPU request)
                last = (str(err).strip().splitlines() or [type(err).__name__])[-1]
                return report("FAIL", "submitted", f"sbatch refused the tiny CPU job: {last}; see slurm.additional")
        _follow_stop_path(cfg, report, timeout, jobs, root)
    finally:  # nothing of the doctor's is left queued
        alive = [j for j, _ in jobs.values() if job_state(j).alive]
        if alive:
            subprocess.run(["scancel", *alive], capture_output=True, timeout=60)
            print(f"note  cleanup            cancelled the doctor's unfinished jobs {' '.join(alive)}", flush=True)


def _follow_stop_path(cfg: Config, report: Report, timeout: float, jobs: dict[str, tuple[str, RunDir]],
                      root: Path) -> None:
    """Signal the stop-path job, then follow it: checkpoint, requeue, resume, bitwise match with the reference."""
    import torch

    from ddpm.checkpoint import load_latest
    from ddpm.cluster.squeue import job_state
    from ddpm.status import RunState, read_status

    job, run = jobs["stopped"]
    report("ok", "submitted", f"job {job} (stop path) and {jobs['reference'][0]} (reference) to "
           f"{cfg.slurm.partition or 'the default partition'}; files in {root}")
    log = run.job_log(job)
    if not _wait(lambda: (read_status(run) or {}).get("step", -1) >= 20, timeout):
        return report("FAIL", "running", f"job {job} did not reach step 20 in {timeout:.0f} s "
                      f"({job_state(job)}); see {log}")
    scancel = ["scancel", f"--signal={cfg.training.stop_signal}", job]
    subprocess.run(scancel, check=True, timeout=60)
    report("ok", "stop signal", f"{shlex.join(scancel)} (what the time limit sends)")
    if not _wait(lambda: "stop: checkpoint durable" in (log.read_text() if log.is_file() else ""), 120):
        return report("FAIL", "checkpoint", f"no checkpoint after the stop signal; see {log}")
    report("ok", "checkpoint", f"written at step {load_latest(run)[1]['step']}")
    if not _wait(lambda: _restarts(job) >= 1, 120):
        return report("FAIL", "requeue", f"job {job} was not requeued ({job_state(job)}): check that users may "
                      f"`scontrol requeue` their jobs and slurm.additional; see {log}")
    report("ok", "requeue", f"job {job} requeued; SLURM holds a requeued job a while (BeginTime) before it runs")
    def done(name: str) -> bool:
        return job_state(jobs[name][0]).ended

    if not _wait(lambda: done("stopped") and done("reference"), timeout):
        return report("FAIL", "resume", f"job {job} did not finish in {timeout:.0f} s ({job_state(job)}); see {log}")
    if "resumed from" not in log.read_text() or (read_status(run) or {}).get("state") != RunState.DONE:
        return report("FAIL", "resume", f"job {job} did not resume and finish; see {log}")
    report("ok", "resume", f"job {job} resumed from its checkpoint and finished")
    a, b = load_latest(run)[1], load_latest(jobs["reference"][1])[1]
    same = all(torch.equal(v, b["model"][k]) for k, v in a["model"].items()) and a["step"] == b["step"]
    report("ok" if same else "FAIL", "exact resume", "weights bitwise equal to the uninterrupted job" if same else
           "weights differ from the uninterrupted job (different CPU types in the partition?)")


def check_node(cfg: Config, report: Report, timeout: float, root: Path) -> None:
    """Step 2: one short job with the training resources runs the probe; its lines, then the run plan."""
    from ddpm.cluster.executors import ProbeTask, make_executor
    from ddpm.cluster.squeue import job_state

    sc = cfg.slurm
    probe_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, root=str(root), name="node"),
                                    slurm=dataclasses.replace(sc, time_min=min(sc.time_min, max(
                                        30, math.ceil((sc.signal_delay_s + 60) / 60) + 1))))  # short, yet valid
    run = probe_cfg.run_dir
    run.path.mkdir(parents=True, exist_ok=True)
    dump_config(probe_cfg, run.config)
    try:
        job = make_executor(probe_cfg, run, "train", "slurm").submit(ProbeTask(run)).job_id
    except Exception as err:  # sbatch refused the training resources
        last = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        return report("FAIL", "node job", f"sbatch refused a job with the training resources: {last}")
    report("ok", "node job", f"job {job} with the training resources (partition "
           f"{sc.partition or 'default'}, {cfg.infrastructure.num_nodes} node(s), gres {sc.gres or 'none'}, "
           f"{sc.cpus_per_task} CPUs, {sc.mem_gb} GB)")
    log = run.job_log(job)
    if not _wait(lambda: job_state(job).ended, timeout):
        subprocess.run(["scancel", job], capture_output=True, timeout=60)
        return report("FAIL", "node job", f"job {job} did not finish in {timeout:.0f} s ({job_state(job)}); see {log}")
    probe_file = run.probe
    if not probe_file.is_file():
        return report("FAIL", "node job", f"job {job} ended {job_state(job)} without a report; see {log}")
    result = json.loads(probe_file.read_text())
    for kind, what, detail in result["lines"]:
        report(kind, what, detail)
    if result["img_per_s"] and result["save_s"] is not None:
        print("run plan:", flush=True)
        for kind, what, detail in run_plan(cfg, result["img_per_s"], result["save_s"]):
            report(kind, what, detail)


def doctor(cfg: Config, run_job: bool = True, timeout: float = 1800, save_test: bool = False) -> int:
    """Run every step; 0 when nothing failed."""
    from ddpm.cluster.preflight import check_slurm, slurm_available

    check_torch_floor()
    if not slurm_available():
        raise DDPMError("doctor: no SLURM here (sinfo/sbatch not found or not answering); run it on the login node")
    check_slurm(cfg, ["train"])  # the partition exists and fits the request: one line otherwise
    report = Report()
    check_cluster(cfg, report, save_test)
    if run_job:
        root = Path(cfg.run.root).resolve() / ".doctor" / time.strftime("%Y%m%d-%H%M%S")
        check_node(cfg, report, timeout, root)
        check_stop_path(cfg, report, timeout, root)
    print("doctor: " + ("FAILED: fix the lines marked FAIL" if report.failed else "all checks passed"), flush=True)
    return 1 if report.failed else 0

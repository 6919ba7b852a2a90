"""Multi-node training on a real two-node SLURM cluster (tests/slurm/multinode.sh): two slurmd, each in a
network namespace of its own on a bridge, one slurmctld; the single-node cluster of the other SLURM tests is
restored afterwards.

- a 2-node job step reaches both namespaces, and the nodes reach each other by name over the bridge;
- two 2-node training jobs at once on the same two nodes, one from ``launch.py`` (train -> sampling array ->
  assembly, the shards on both nodes) and one from ``slurm/train.sbatch --nodes=2``: no rendezvous collision,
  ``provenance.json`` names both hosts, and each ends bitwise equal to one node with two processes;
- a preemption of a 2-node job: every rank on both nodes stops at the same step, one checkpoint, one requeue,
  an exact resume;
- a node lost mid-run (its slurmd and every process there SIGKILLed): the rank on the other node exits within
  the bound, the job is requeued once and resumes from the last durable checkpoint when the node is back.

Every training run has loader workers on (``data.num_workers=1``) and one torch thread per rank. A 2-node run
and its one-node reference run the same world (2 ranks, gloo, the same global ranks and data shards), so they
are compared bitwise; each faulted run is compared with the same reference, so it also equals the
uninterrupted 2-node runs of the first test. Waits are for events and bounded by this machine's measured pace
(tests/slurm_runs.py); the run is long enough that the job cannot end before a fault reaches it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT, TINY_CONFIG, launch
from slurm_helpers import (
    CLUSTER_SH,
    TERMINAL_STATES,
    assert_same_training_state,
    job_state,
    preempt,
    restarts,
    sbatch,
    template_without_gres,
    wait_for_job,
    wait_for_restart,
    wait_for_state,
)
from slurm_runs import GRACE_S, Pace, finish, start_training, wait_for_step

from ddpm.checkpoint import load_latest
from ddpm.cluster.rendezvous import rendezvous_port
from ddpm.rundir import RunDir

MULTINODE_SH = ROOT / "tests" / "slurm" / "multinode.sh"
pytestmark = pytest.mark.slurm
COMMON = ["data.num_workers=1", "training.log_every=10", "training.save_every=100"]
TWO_NODES = [*COMMON, "infrastructure.num_nodes=2", "slurm.cpus_per_task=1", "slurm.setup=[export OMP_NUM_THREADS=1]"]
ONE_NODE = [*COMMON, "infrastructure.nproc_per_node=2"]  # the reference: torchrun --nproc-per-node 2, no SLURM


def _run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_nodes(slurm_cluster) -> Iterator[list[str]]:
    """``cluster.sh start --nodes 2`` for this module; the single-node cluster again at the end."""
    if os.geteuid() != 0:
        pytest.fail("the multi-node cluster needs root (network namespaces)", pytrace=False)
    up = _run(str(CLUSTER_SH), "start", "--nodes", "2")
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        yield ["node1", "node2"]
    finally:
        down = _run(str(CLUSTER_SH), "start")  # tears the namespaces and the bridge down, single node again
        assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
        assert subprocess.run(["ip", "link", "show", "ddpmbr0"], capture_output=True).returncode != 0


@pytest.fixture(scope="module")
def n(pace: Pace) -> int:
    """Steps of each run (200); the faults land after step 110 (step_100 durable)."""
    return pace.run_length(110, at_least=200)


def hosts(run_dir: Path) -> list[list[str]]:
    return [s["hosts"] for s in json.loads((run_dir / "provenance.json").read_text())["starts"]]


def test_two_node_step_reaches_both_namespaces(two_nodes, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    script = tmp_path / "job.sh"
    # each node prints its hostname and address; then node1 listens and node2 connects to it by name
    script.write_text(f"""#!/bin/bash
srun --ntasks=2 --ntasks-per-node=1 bash -c 'echo "$(hostname) $(ip -4 -o addr show eth0 | awk "{{print \\$4}}")"'
srun --nodes=1 --ntasks=1 -w node1 {sys.executable} -c '
import socket; s = socket.create_server(("node1", 29555)); s.settimeout(60); c, a = s.accept()
print("node1 got", c.recv(16).decode(), "from", a[0])' &
sleep 2
srun --nodes=1 --ntasks=1 -w node2 {sys.executable} -c '
import socket, time; c = socket.create_connection(("node1", 29555), timeout=30); c.sendall(b"hello")'
wait
""")
    job = sbatch("--nodes=2", "--ntasks-per-node=1", "--partition=debug", "--mem=100M", f"--output={out}",
                 str(script), cwd=tmp_path)
    assert wait_for_job(job, timeout=120) == "COMPLETED", out.read_text() if out.exists() else "no output"
    lines = out.read_text().splitlines()
    assert sorted(line for line in lines if line.startswith("node") and "/" in line) == [
        "node1 10.231.0.11/24", "node2 10.231.0.12/24"], lines
    assert "node1 got hello from 10.231.0.12" in lines, lines


def test_status_kill_and_revive_node(two_nodes) -> None:
    status = _run(str(CLUSTER_SH), "status")
    assert status.returncode == 0 and "node2: slurmd running in ddpm-node2" in status.stdout, status.stdout
    assert _run(str(MULTINODE_SH), "kill-node", "node2").returncode == 0
    status = _run(str(CLUSTER_SH), "status")
    assert status.returncode != 0 and "node2: slurmd NOT running" in status.stdout, status.stdout
    assert _run(str(MULTINODE_SH), "revive", "node2").returncode == 0
    status = _run(str(CLUSTER_SH), "status")
    assert status.returncode == 0 and "node2: slurmd running in ddpm-node2" in status.stdout, status.stdout


def test_two_jobs_at_once_launch_and_sbatch(two_nodes, images, tmp_path, reference, pace, n):
    """Job A (launch.py: train -> 2 sampling tasks of 2 CPUs, one per node -> assembly) and job B
    (slurm/train.sbatch --nodes=2) train at once on the same nodes, each with its own rendezvous port."""
    ref = reference(*ONE_NODE, f"training.num_iterations={n}")
    proc = launch(f"data.path={images}", f"run.root={tmp_path / 'a'}", *TWO_NODES, f"training.num_iterations={n}",
                  "sampling.num_shards=2", "slurm.sample_cpus_per_task=2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_a = tmp_path / "a" / "tiny"
    jobs = json.loads((run_a / "jobs.json").read_text())
    job_a, run_b = jobs["train"], tmp_path / "b" / "tiny"
    job_b = sbatch("--nodes=2", "--cpus-per-task=1", "--mem=1G", "--partition=debug",
                   f"--output={tmp_path}/b-%j.out",
                   f"--export=ALL,OMP_NUM_THREADS=1,PATH={Path(sys.executable).parent}:{os.environ['PATH']}",
                   str(template_without_gres(tmp_path, "train.sbatch")), str(TINY_CONFIG), f"data.path={images}",
                   f"run.root={tmp_path / 'b'}", *TWO_NODES, f"training.num_iterations={n}", cwd=ROOT)
    deadline = time.monotonic() + pace.bound()
    while (states := (job_state(job_a), job_state(job_b))) != ("RUNNING", "RUNNING"):
        assert time.monotonic() < deadline and not TERMINAL_STATES & set(states), states
        time.sleep(0.2)

    assert wait_for_job(job_b, timeout=pace.bound(steps=n, ranks=4)) == "COMPLETED", \
        (tmp_path / f"b-{job_b}.out").read_text()[-3000:]
    assert wait_for_job(jobs["assemble"], timeout=pace.bound(steps=n, starts=3, ranks=4)) == "COMPLETED"
    logs = {job_a: (run_a / "logs" / job_a / f"{job_a}_0_log.out").read_text(),
            job_b: (run_b / "logs" / f"train-{job_b}-0.out").read_text()}
    for job, text in logs.items():
        assert f"--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=node1:{rendezvous_port(job)}" in text, text[-3000:]
        assert f"training done at step {n}" in text and "Traceback" not in text, text[-3000:]
    assert rendezvous_port(job_a) != rendezvous_port(job_b)
    assert hosts(run_a) == [["node1", "node2"]] and hosts(run_b) == [["node1", "node2"]]
    shard_hosts = {line.split("hostname=")[1].split(",")[0] for p in (run_a / "logs").glob("*_*/*_log.out")
                   for line in p.read_text().splitlines() if "Starting with JobEnvironment" in line}
    assert shard_hosts == {"node1", "node2"}  # the two sampling tasks ran on different nodes
    shown = subprocess.run([sys.executable, "launch.py", "status", str(run_a)], capture_output=True, text=True,
                           cwd=ROOT, timeout=60).stdout
    assert f"training: done at step {n}/{n}" in shown and "sampling: 2/2 shards complete" in shown, shown
    assert "assembly: " in shown and "samples_12x8x8x3.npz" in shown, shown
    expected = ref.state()
    assert_same_training_state(expected, load_latest(RunDir(run_a))[1])
    assert_same_training_state(expected, load_latest(RunDir(run_b))[1])


def test_preemption_of_a_two_node_job(two_nodes, images, tmp_path, reference, pace, n):
    """A higher-priority job takes a whole node: SIGTERM to every process of the job on both nodes; every rank
    stops at the same step, rank 0 writes one checkpoint, the job is requeued once and resumes exactly."""
    ref = reference(*ONE_NODE, f"training.num_iterations={n}")
    run_dir, job, log = start_training(images, tmp_path, pace, *TWO_NODES, f"training.num_iterations={n}")
    wait_for_step(log, 110, timeout=pace.bound(steps=110, ranks=2), job=job)
    preempt(cpus=2)  # all of one node's CPUs: SLURM must preempt the 2-node job (1 CPU on each node)
    wait_for_restart(job, 1, timeout=GRACE_S + pace.bound(steps=10, starts=0, ranks=2))
    stopped = load_latest(RunDir(run_dir))[1]["step"]
    assert 110 <= stopped < n
    text = finish(job, log, timeout=pace.bound(steps=n, ranks=2))
    node2 = (log.parent / f"{job}_1_log.out").read_text()  # node 1's task: rank 1
    assert "[rank 0] received SIGTERM" in text and "[rank 1] received SIGTERM" in node2, node2[-3000:]
    assert f"[rank 0] stopped at step {stopped} " in text and f"[rank 1] stopped at step {stopped} " in node2
    assert text.count(f"step_{stopped:08d}.pt in") == 1 and "stop: checkpoint durable" in text
    assert f"resumed from {run_dir}/checkpoints/step_{stopped:08d}.pt" in text
    assert restarts(job) == 1
    assert hosts(run_dir) == [["node1", "node2"], ["node1", "node2"]]
    assert_same_training_state(ref.state(), load_latest(RunDir(run_dir))[1])


def test_node_lost_mid_run(two_nodes, images, tmp_path, reference, pace, n):
    """node2 dies (slurmd, slurmstepd, torchrun, the rank and its loader worker: SIGKILL). Rank 0 on node1 sees
    its connections reset and exits at once: the job is requeued within the bound, waits for two nodes, and
    resumes from the last durable checkpoint when node2 is back."""
    bound = 30  # training.watchdog_s: the bound when a node vanishes without resetting its connections
    ref = reference(*ONE_NODE, f"training.num_iterations={n}")
    run_dir, job, log = start_training(images, tmp_path, pace, *TWO_NODES, f"training.num_iterations={n}",
                                       f"training.watchdog_s={bound}")
    wait_for_step(log, 110, timeout=pace.bound(steps=110, ranks=2), job=job)
    t0 = time.monotonic()
    assert _run(str(MULTINODE_SH), "kill-node", "node2").returncode == 0
    durable = load_latest(RunDir(run_dir))[1]["step"]
    try:
        wait_for_restart(job, 1, timeout=bound + 30)
        requeued_after = time.monotonic() - t0
    finally:
        assert _run(str(MULTINODE_SH), "revive", "node2").returncode == 0
    print(f"node lost: job requeued {requeued_after:.1f} s after node2 was killed (bound {bound} s)")
    assert requeued_after < bound
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] in ("lost", "running"), status  # "running" again once the requeued job has started
    # no early release: SLURM's BeginTime delay (cred_expire + 1 s: 11 s here) lets the old attempt's srun, stuck
    # on the dead node's step, die first; started 2 s after the requeue, the new attempt's step (the same id, 0)
    # was cancelled by it
    text = finish(job, log, timeout=pace.bound(steps=n, ranks=2), clean_from="resumed from", release=False)
    # rank 0's collective failed on the dead peer: gloo says "Connection reset by peer" or "Connection closed by
    # peer" or "Broken pipe", depending on where the reset finds it (ddpm.dist.peer_lost)
    assert "[rank 0] lost a peer after step" in text and "training lost a rank after step" in text
    assert f"requeuing job {job} (restart 1/3)" in text
    assert f"resumed from {run_dir}/checkpoints/step_{durable:08d}.pt" in text
    assert restarts(job) == 1
    assert_same_training_state(ref.state(), load_latest(RunDir(run_dir))[1])


def test_a_node_without_its_gpus_fails_the_job(two_nodes, images, tmp_path, pace):
    """A 2-node GPU job whose second node sees no GPU (a mis-set gres, a drained card): node2's rank records
    the one line (naming node2) and every node's wrapper ends its torchrun, so the job ends FAILED in seconds,
    not after the process group's timeout. node1 gets a fake H100 (tests/fakes/sitecustomize.py) whose
    ``init_process_group`` waits, as NCCL's does for a rank that never comes. The srun runs without
    ``--kill-on-bad-exit`` (as submitit's does): node1's wrapper must end on its own."""
    from test_gpu_generations import CUDA13, fake_env

    h100 = {"name": "NVIDIA H100 80GB HBM3", "sm": [9, 0], "archs": CUDA13, "memory_gib": 80, "nodes": ["node1"]}
    env = fake_env(gpu=h100, hang_process_group=True)
    template = template_without_gres(tmp_path, "train.sbatch")
    template.write_text(template.read_text().replace("srun --kill-on-bad-exit=1 ", "srun "))
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "DDPM_FAKE")}
    os.environ.update({k: env[k] for k in saved})  # --export=ALL carries them into the job
    try:
        job = sbatch("--nodes=2", "--cpus-per-task=1", "--mem=1G", "--partition=debug",
                     f"--output={tmp_path}/job-%j.out",
                     f"--export=ALL,OMP_NUM_THREADS=1,PATH={Path(sys.executable).parent}:{os.environ['PATH']}",
                     str(template), str(TINY_CONFIG), f"data.path={images}", f"run.root={tmp_path}", *TWO_NODES,
                     "infrastructure.num_gpus=1", "training.num_iterations=20", cwd=ROOT)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert wait_for_state(job, {"RUNNING"}, timeout=pace.bound()) == "RUNNING"
    started = time.monotonic()
    state = wait_for_job(job, timeout=120)
    took = time.monotonic() - started
    run_dir = tmp_path / "tiny"
    logs = {i: (run_dir / "logs" / f"train-{job}-{i}.out").read_text() for i in (0, 1)}
    assert state == "FAILED" and took < 60, f"{state} after {took:.0f} s: {logs}"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "this process sees 0" in status["error"], status
    assert "node node2" in status["error"] and "node node1" not in status["error"], status["error"]
    assert f"error: training failed: {status['error']}" in logs[1], logs[1][-3000:]  # node2's wrapper
    assert "wrapper: a rank failed" in logs[0] and "error: training failed:" in logs[0], logs[0][-3000:]
    assert restarts(job) == 0 and "requeuing" not in logs[0] + logs[1]
    print(f"a node without its GPUs: the 2-node job ended FAILED {took:.1f} s after it started")

"""A real two-node SLURM cluster (tests/slurm/multinode.sh): two slurmd, each in a network namespace of its
own on a bridge, one slurmctld; the single-node cluster of the other SLURM tests is restored afterwards.

What runs here: a 2-node job step reaches both nodes, each at its own address, and the nodes reach each
other by name over the bridge (the path torchrun's c10d rendezvous takes).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT
from slurm_helpers import CLUSTER_SH, sbatch, wait_for_job

MULTINODE_SH = ROOT / "tests" / "slurm" / "multinode.sh"
pytestmark = pytest.mark.slurm


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


def test_status_and_kill_node(two_nodes) -> None:
    status = _run(str(CLUSTER_SH), "status")
    assert status.returncode == 0 and "node2: slurmd running in ddpm-node2" in status.stdout, status.stdout
    assert _run(str(MULTINODE_SH), "kill-node", "node2").returncode == 0
    status = _run(str(CLUSTER_SH), "status")
    assert status.returncode != 0 and "node2: slurmd NOT running" in status.stdout, status.stdout
    assert _run(str(CLUSTER_SH), "start", "--nodes", "2").returncode == 0  # back to two healthy nodes

"""Shared pytest setup: the real local SLURM cluster (tests/slurm/cluster.sh) as the ``slurm_cluster`` fixture.

Only the SLURM fixture and generic plumbing belong here; job helpers are in tests/slurm_helpers.py.

The fixture starts the cluster (installing the Debian packages first when slurmctld is missing), and
yields a :class:`slurm_helpers.SlurmCluster`. When the cluster cannot be started it skips the test, or
fails it when ``DDPM_REQUIRE_SLURM=1`` or ``CI=true`` (CI must not silently skip the SLURM tests).
The daemons keep running after the session (cheap to reuse); jobs submitted during the session and still
unfinished are cancelled at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from slurm_helpers import (
    CLUSTER_SH,
    PARTITION,
    SlurmCluster,
    SlurmError,
    cancel_jobs_since,
    next_job_id,
    parse_scontrol_line,
)

_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def pytest_configure(config: pytest.Config) -> None:
    # also declared in pyproject.toml; registering here keeps `--strict-markers` happy from any rootdir
    config.addinivalue_line("markers", "slurm: runs jobs on a real local SLURM cluster (tests/slurm/cluster.sh)")


def _slurm_required() -> bool:
    return os.environ.get("DDPM_REQUIRE_SLURM") == "1" or os.environ.get("CI", "").lower() == "true"


def _cluster_sh(cmd: str, timeout: float) -> subprocess.CompletedProcess[str]:
    # The script detaches the daemons (setsid, stdio to log files), so capturing its output cannot hang.
    return subprocess.run(
        ["bash", str(CLUSTER_SH), cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _start_cluster() -> str | None:
    """Install (if needed) and start the cluster; None on success, else the reason it is unavailable."""
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (tests/slurm/cluster.sh start)"
    steps = ["start"]
    if shutil.which("slurmctld", path=_SBIN_PATH) is None:
        if shutil.which("apt-get") is None:
            return "slurmctld is not installed and apt-get is not available"
        steps.insert(0, "install")
    for step in steps:
        try:
            proc = _cluster_sh(step, timeout=900 if step == "install" else 240)
        except subprocess.TimeoutExpired as e:
            return f"`cluster.sh {step}` timed out after {e.timeout}s"
        if proc.returncode != 0:
            out = (proc.stdout + proc.stderr).strip()
            return f"`cluster.sh {step}` failed (rc={proc.returncode}):\n{out[-4000:]}"
    return None


def _cluster_info() -> SlurmCluster:
    part = subprocess.run(
        ["scontrol", "show", "partition", "-o", PARTITION], capture_output=True, text=True, check=True
    )
    node_name = parse_scontrol_line(part.stdout)["Nodes"]
    node = subprocess.run(["scontrol", "show", "node", "-o", node_name], capture_output=True, text=True, check=True)
    rec = parse_scontrol_line(node.stdout)
    return SlurmCluster(
        partition=PARTITION,
        node=rec["NodeName"],
        cpus=int(rec["CPUTot"]),
        real_memory_mb=int(rec["RealMemory"]),
    )


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node SLURM cluster on localhost (partition ``debug``); see tests/slurm/cluster.sh."""
    reason = _start_cluster()
    if reason is not None:
        msg = f"local SLURM cluster unavailable: {reason}"
        if _slurm_required():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    try:
        info = _cluster_info()
        first_id = next_job_id()
    except (subprocess.CalledProcessError, SlurmError, KeyError, ValueError) as e:
        msg = f"local SLURM cluster started but cannot be queried: {e}"
        if _slurm_required():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    yield info
    # leave the daemons up for the next session; cancel whatever this session left behind
    try:
        cancel_jobs_since(first_id)
    except Exception as e:  # teardown must not mask the test results
        print(f"warning: could not cancel leftover SLURM jobs: {e}")


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory):
    """40 random 10x10 RGB PNGs: the tiny training set of configs/tiny_cpu.yaml (resized to 8x8)."""
    import numpy as np
    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray((rng.random((10, 10, 3)) * 255).astype("uint8")).save(d / f"{i:03d}.png")
    return d

"""Shared pytest setup: the tiny training data, trainers and checkpoints, and the real local SLURM cluster.

Fixtures (use these instead of building your own):

- ``images`` (session): 40 random 10x10 RGB PNGs from a fixed seed, the training set of
  configs/tiny_cpu.yaml (resized to 8x8); what ``data.path`` points at in every trainer and CLI run.
- ``make_trainer`` (per test): ``make_trainer(run_dir, *overrides, overfit=False) -> Trainer``, a real
  ``ddpm.train.Trainer`` on tiny_cpu.yaml (CPU, world size 1) with ``section.key=value`` overrides.
  Trainers are closed and the process's signal handlers restored when the test ends.
- ``make_checkpoint`` (session): ``make_checkpoint(*overrides, steps=CHECKPOINT_STEPS) -> Path``, a
  checkpoint written by ``Trainer.save()`` after real training steps (at ``CHECKPOINT_LR``, so the weights
  are non-trivial); one per distinct call, shared by the whole session: treat its run directory as read-only.
- ``checkpoint`` (session): ``make_checkpoint()``.
- ``fid_weights`` (session): a FID Inception weights file written offline (random weights, BatchNorm statistics of
  one random batch: features that depend on the image); no download. Read-only.
- ``digit_classifier`` (session): tools.digit_score's 16-px classifier weights, trained once, at
  ``<XDG_CACHE_HOME>/ddpm/digit_classifier_16.pt`` of a temporary cache directory (``.parents[1]`` is that
  directory, for a command that finds the classifier through ``XDG_CACHE_HOME``). Read-only.
- ``reference`` (module): ``reference(*overrides) -> Reference``, an uninterrupted ``python -m ddpm.cluster
  train`` of tiny_cpu.yaml on ``images``, started in the background once per distinct overrides; ``.state()``
  waits for it and returns its last checkpoint (tests/slurm_helpers.py).
- ``pace`` (session): how fast this machine runs the SLURM tests' training (tests/slurm_runs.py), measured once;
  the bounds of their waits and the length of their runs follow from it.
- ``slurm_cluster`` (session): the cluster of tests/slurm/cluster.sh (SLURM job helpers: tests/slurm_helpers.py).

The SLURM fixture starts the cluster (installing the Debian packages first when slurmctld is missing), and
yields a :class:`slurm_helpers.SlurmCluster`. When the cluster cannot be started it skips the test, or
fails it when ``DDPM_REQUIRE_SLURM=1`` or ``CI=true`` (CI must not silently skip the SLURM tests).
The daemons keep running after the session (cheap to reuse); jobs submitted during the session and still
unfinished are cancelled at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from helpers import CHECKPOINT_LR, CHECKPOINT_STEPS, ROOT, TINY_CONFIG, signal_handlers_restored
from slurm_helpers import (
    CLUSTER_SH,
    PARTITION,
    Reference,
    SlurmCluster,
    SlurmError,
    cancel_jobs_since,
    next_job_id,
    parse_scontrol_line,
)
from slurm_runs import Pace, measure_pace

if TYPE_CHECKING:
    from ddpm.train import Trainer

if str(ROOT) not in sys.path:  # launch.py, for the tests that call launch.main(argv) in process (python -m pytest
    sys.path.append(str(ROOT))  # has it already, as the working directory)

_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def pytest_configure(config: pytest.Config) -> None:
    # One torch thread for this process and every process the tests start (the product's CPU budget takes
    # OMP_NUM_THREADS as a cap; tests of the budget itself set or clear it). The tiny models gain nothing from a
    # second thread, and a 2-thread region waits for both cores: with the other core busy (a neighbour's job, the
    # loaded runs of benchmarks/README.md) one 3.7 s test took 329 s. Set OMP_NUM_THREADS yourself to test more.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    # also declared in pyproject.toml; registering here keeps `--strict-markers` happy from any rootdir
    config.addinivalue_line("markers", "slurm: runs jobs on a real local SLURM cluster (tests/slurm/cluster.sh)")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: `make test` runs `-m "not slurm"`, then `-m slurm`
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses the cluster is a SLURM test, marked or not."""
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slurm)


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
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 random 10x10 RGB PNGs (seed 0): the tiny training set of configs/tiny_cpu.yaml (resized to 8x8)."""
    import numpy as np
    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray((rng.random((10, 10, 3)) * 255).astype("uint8")).save(d / f"{i:03d}.png")
    return d


def _new_trainer(images: Path, run_dir: Path, *overrides: str, overfit: bool = False,
                 device: str = "cpu") -> Trainer:
    import torch

    from ddpm.config import load_config
    from ddpm.dist import DistEnv
    from ddpm.rundir import RunDir
    from ddpm.train import Trainer

    cfg = load_config(TINY_CONFIG, [f"data.path={images}", *overrides])
    trainer = Trainer(cfg, RunDir(run_dir), DistEnv(device=torch.device(device)), overfit_single_batch=overfit)
    trainer.install_stop_handlers()  # the entry point's steps (ddpm.train.main), as a job takes them
    trainer.resume()
    return trainer


@pytest.fixture
def make_trainer(images: Path) -> Iterator[Callable[..., Trainer]]:
    """``make_trainer(run_dir, *overrides, overfit=False, device="cpu")``: a real Trainer on tiny_cpu.yaml (1 rank)."""
    trainers = []

    def make(run_dir: Path, *overrides: str, overfit: bool = False, device: str = "cpu") -> Trainer:
        trainer = _new_trainer(images, run_dir, *overrides, overfit=overfit, device=device)
        trainers.append(trainer)
        return trainer

    with signal_handlers_restored():
        yield make
        for trainer in trainers:
            trainer.close()


@pytest.fixture(scope="session")
def make_checkpoint(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make_checkpoint(*overrides, steps=CHECKPOINT_STEPS) -> Path``: ``Trainer.save()``'s file after
    ``steps`` real training steps on tiny_cpu.yaml at CHECKPOINT_LR (overrides may change it, e.g.
    ``training.seed=1`` for a second, different checkpoint). The same call returns the same file."""
    import torch

    made: dict[tuple[tuple[str, ...], int], Path] = {}

    def make(*overrides: str, steps: int = CHECKPOINT_STEPS) -> Path:
        key = (overrides, steps)
        if key not in made:
            run_dir = tmp_path_factory.mktemp("trained_run")
            with signal_handlers_restored(), torch.random.fork_rng(devices=[]):
                trainer = _new_trainer(images, run_dir, f"training.learning_rate={CHECKPOINT_LR}", *overrides)
                try:
                    for _ in range(steps):
                        trainer.train_step(*trainer.next_batch())
                    path = trainer.save()
                finally:
                    trainer.close()
            assert path is not None and path.is_file()
            made[key] = path
        return made[key]

    return make


@pytest.fixture(scope="session")
def checkpoint(make_checkpoint: Callable[..., Path]) -> Path:
    """The default trained checkpoint (``<run>/checkpoints/step_<CHECKPOINT_STEPS>.pt``); read-only."""
    return make_checkpoint()


@pytest.fixture(scope="session")
def pace(images: Path) -> Pace:
    """How fast this machine runs the SLURM tests' training (tests/slurm_runs.py): the bounds of their waits."""
    return measure_pace(images)


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory):
    """Uninterrupted references keyed by their overrides, each started once and shared by the tests."""
    started: dict[tuple[str, ...], Reference] = {}

    def get(*overrides: str) -> Reference:
        key = tuple(overrides)
        if key not in started:
            started[key] = Reference(tmp_path_factory.mktemp("ref"), [f"data.path={images}", *overrides])
        return started[key]

    yield get
    for ref in started.values():
        ref.kill()


@pytest.fixture(scope="session")
def fid_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FID Inception weights whose features depend on the image (tools/fid_test_weights.py): the right keys and
    shapes for ``ddpm.inception.load_inception``."""
    from ddpm import inception
    from tools.fid_test_weights import write_test_weights

    return write_test_weights(tmp_path_factory.mktemp("fid_weights") / inception.WEIGHTS_NAME)


@pytest.fixture(scope="session")
def digit_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tools.digit_score's classifier for 16-px digits, trained once (never in ~/.cache)."""
    from tools import digit_score

    path = tmp_path_factory.mktemp("xdg_cache") / "ddpm" / "digit_classifier_16.pt"
    path.parent.mkdir()
    digit_score.load_scorer(16, path)
    assert path.is_file(), f"the classifier was not cached at {path}"
    return path


@pytest.fixture(scope="session")
def fid_inputs(images: Path, fid_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Overrides naming the session's test-written Inception weights and the reference statistics of the tiny
    images (what ``python -m ddpm.fid ref`` computes, here in this process: no second torch start-up)."""
    from ddpm.config import load_config
    from ddpm.fid import reference_stats
    from ddpm.inception import load_inception

    ref = tmp_path_factory.mktemp("fid") / "ref.npz"
    reference_stats(load_config(TINY_CONFIG, [f"data.path={images}"]).data, load_inception(fid_weights, "cpu"),
                    progress=False).save(ref)
    return [f"sampling.fid_weights={fid_weights}", f"sampling.fid_reference={ref}"]

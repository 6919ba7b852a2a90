"""Every path of a run directory, in one place (docs/design.md, "The run directory").

    <run.root>/<run.name>/
        config.yaml                    the resolved config (launch.py, the wrapper, the trainer: same text)
        jobs.json                      the SLURM job ids of each stage (launch.py; read by launch.py status)
        status.json                    run state, step, heartbeat, error line (ddpm.status)
        provenance.json                git, versions, hosts, job ids per start (ddpm.provenance)
        probe.json                     the doctor's node report (ddpm.cluster.probe)
        checkpoints/step_<N>.pt        checkpoints (ddpm.checkpoint); LATEST names the newest durable one
        grids/step_<N>.png             the periodic sample grids of training
        tb/, tb/eval/                  TensorBoard events of training and of the eval selection
        logs/<job>/                    submitit's stdout/stderr and pickles of each job (``%j``: its id)
        eval/step_<N>/shard_<s>.*      the seed sets of one eval task (shards, as in samples/shards/)
        eval/step_<N>.json             one eval task's result; eval/fid.json the selection
        samples/                       the final set (a :class:`SampleSet`)

Only :mod:`ddpm.rundir` spells these names; every other module asks a :class:`RunDir` (or a
:class:`SampleSet`) for a path. :meth:`RunDir.undeclared` lists the files of a run directory that no
pattern here declares (a test runs the pipeline and expects none). No torch: launch.py and the job
wrapper use it.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path

_STEP = "step_{:08d}"  # checkpoints, grids and eval results of training step N
_STEP_PT = re.compile(r"^step_(\d+)\.pt$")
# Files a writer leaves while it works (fsio's atomic writes, a sampling task's partial shard).
_TRANSIENT = ("*.tmp*", ".*.tmp*")


@dataclass(frozen=True)
class ShardFiles:
    """The three files of shard k: the complete npz, its json (written last), the partial npz."""

    npz: Path
    json: Path
    partial: Path


def shard_files(shards: str | Path, k: int) -> ShardFiles:
    """Shard ``k``'s files in the shards directory ``shards``."""
    d = Path(shards)
    return ShardFiles(d / f"shard_{k}.npz", d / f"shard_{k}.json", d / f"shard_{k}.partial.npz")


def stale_dir(shards: str | Path) -> Path:
    """Where superseded shards of the shards directory ``shards`` are kept (``stale/<time>/``)."""
    return Path(shards) / "stale"


def shard_index(name: str) -> int | None:
    """k of a shard file name (``shard_<k>.json``, ``.npz`` or ``.partial.npz``), else None."""
    m = re.match(r"^shard_(\d+)\.(json|npz|partial\.npz)$", name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class SampleSet:
    """A directory of shards and what assembly makes of them::

        <dir>/shards/shard_<k>.npz, .json, .partial.npz   what the sampling tasks write (ddpm.shards)
        <dir>/shards/stale/<time>/                        shards made with other settings, kept
        <dir>/samples_<N>x<H>x<W>x<C>.npz                 the assembled set (ddpm.assemble)
        <dir>/grid.png, <dir>/metrics.json                its grid and metrics
        <dir>/previous/<time>/                            the outputs of an earlier, different assembly
    """

    path: Path

    @property
    def shards(self) -> Path:
        return self.path / "shards"

    def shard(self, k: int) -> ShardFiles:
        return shard_files(self.shards, k)

    @property
    def grid(self) -> Path:
        return self.path / "grid.png"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.json"

    def npz(self, shape: tuple[int, int, int, int]) -> Path:
        """The assembled set of ``shape`` (N, H, W, C)."""
        return self.path / "samples_{}x{}x{}x{}.npz".format(*shape)

    def assembled(self) -> list[Path]:
        """Assembled sets present, by name."""
        return sorted(self.path.glob("samples_*.npz"))

    @property
    def previous(self) -> Path:
        return self.path / "previous"

    @staticmethod
    def locate(path: str | Path) -> tuple[Path, SampleSet]:
        """(shards directory, its sample set) for a run directory, a sample set or a shards directory."""
        p = Path(path)
        if RunDir(p).samples.shards.is_dir():
            return RunDir(p).samples.shards, RunDir(p).samples
        if SampleSet(p).shards.is_dir():
            return SampleSet(p).shards, SampleSet(p)
        return p, SampleSet(p.parent if p.name == "shards" else p)


@dataclass(frozen=True)
class _JobDir:
    """A directory that submitit's jobs log into (``logs/<job id>/``): a run's or a sweep's. ``str()`` is its path."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def __str__(self) -> str:
        return str(self.path)

    logs = property(lambda self: self.path / "logs", doc="submitit's folder, one per job")

    @property
    def submitit_folder(self) -> Path:
        """submitit's folder pattern: ``%j`` becomes the job id."""
        return self.logs / "%j"

    def drop_placeholder(self) -> None:
        """Remove ``logs/%j`` when it is an empty directory: submitit's local executor makes the pattern itself."""
        if (folder := self.submitit_folder).is_dir() and not any(folder.iterdir()):
            folder.rmdir()


@dataclass(frozen=True)
class RunDir(_JobDir):
    """The run directory ``<run.root>/<run.name>`` (``Config.run_dir``) and every path in it.

    Made once where a path comes in (a command line, a submitit task's arguments, a config): the stages, the
    checkpoints, the status, the provenance and the run log take it as it is."""

    @property
    def root(self) -> Path:
        """``run.root``: the directory that holds this run directory."""
        return self.path.parent

    def resolve(self) -> RunDir:
        """The same run directory by its absolute path (symlinks resolved)."""
        return RunDir(self.path.resolve())

    @staticmethod
    def of_checkpoint(checkpoint: Path) -> RunDir | None:
        """The run directory that holds ``checkpoint`` (``<run>/checkpoints/step_N.pt``), or None when the file is
        not inside a run's checkpoints/ directory."""
        run = RunDir(Path(checkpoint).parent.parent)
        return run if Path(checkpoint).parent == run.checkpoints else None

    config = property(lambda self: self.path / "config.yaml", doc="the resolved config")
    jobs = property(lambda self: self.path / "jobs.json", doc="job ids of each stage (launch.py)")
    status = property(lambda self: self.path / "status.json", doc="the run's state (ddpm.status)")
    provenance = property(lambda self: self.path / "provenance.json", doc="git, versions, hosts per start")
    probe = property(lambda self: self.path / "probe.json", doc="the doctor's node report")
    checkpoints = property(lambda self: self.path / "checkpoints", doc="step_<N>.pt and LATEST")
    latest = property(lambda self: self.checkpoints / "LATEST", doc="the name of the newest durable checkpoint")
    grids = property(lambda self: self.path / "grids", doc="training's periodic sample grids")
    tb = property(lambda self: self.path / "tb", doc="TensorBoard events of training")
    tb_eval = property(lambda self: self.tb / "eval", doc="TensorBoard events of the eval selection")
    tb_hparams = property(lambda self: self.tb / "hparams", doc="a sweep point's hparams and score (TensorBoard)")
    eval = property(lambda self: self.path / "eval", doc="the eval stage's results")
    fid = property(lambda self: self.eval / "fid.json", doc="the eval selection (every row, the best)")
    samples = property(lambda self: SampleSet(self.path / "samples"), doc="the final sample set")

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"{_STEP.format(step)}.pt"

    @staticmethod
    def checkpoint_step(path: Path) -> int | None:
        """N of a ``step_<N>.pt`` file name, else None."""
        m = _STEP_PT.match(Path(path).name)
        return int(m.group(1)) if m else None

    def grid(self, step: int) -> Path:
        return self.grids / f"{_STEP.format(step)}.png"

    def eval_result(self, step: int) -> Path:
        return self.eval / f"{_STEP.format(step)}.json"

    def eval_shards(self, step: int) -> Path:
        """The shards directory of step N's eval task: shard s of ``eval/step_<N>/`` is seed set s."""
        return self.eval / _STEP.format(step)

    def job_log(self, job: str, task: int = 0, stream: str = "out") -> Path:
        """Task ``task``'s stdout (``out``) or stderr (``err``) of job ``job``."""
        return self.logs / job / f"{job}_{task}_log.{stream}"

    # Every file a run directory may hold, relative to it (fnmatch patterns; ``*`` crosses ``/``).
    DECLARED = (
        "config.yaml", "jobs.json", "status.json", "provenance.json", "probe.json",
        "checkpoints/step_*.pt", "checkpoints/LATEST", "grids/step_*.png", "tb/events.out.tfevents.*",
        "tb/eval/events.out.tfevents.*", "tb/hparams/events.out.tfevents.*", "logs/*",
        "eval/fid.json", "eval/step_*.json", "eval/step_*/shard_*", "eval/step_*/stale/*",
        "samples/shards/shard_*", "samples/shards/stale/*", "samples/samples_*.npz", "samples/grid.png",
        "samples/metrics.json", "samples/previous/*",
    )

    def undeclared(self) -> list[Path]:
        """Files under the run directory that :attr:`DECLARED` does not name (transient files excluded)."""
        out = []
        for p in sorted(self.path.rglob("*")):
            rel = p.relative_to(self.path).as_posix()
            if p.is_file() and not any(fnmatch.fnmatch(rel, pat) for pat in self.DECLARED) \
                    and not any(fnmatch.fnmatch(p.name, t) for t in _TRANSIENT):
                out.append(p)
        return out


@dataclass(frozen=True)
class SweepDir(_JobDir):
    """A sweep's directory ``<run.root>/<run.name>`` (``launch.py sweep``): one run directory per point in it."""

    sweep = property(lambda self: self.path / "sweep.json", doc="the grid, the points, their run dirs and jobs")
    results_csv = property(lambda self: self.path / "results.csv", doc="one row per point: values, FID, time")
    results_png = property(lambda self: self.path / "results.png", doc="FID per swept value; each point's grid")
    tb = property(lambda self: self.path / "tb", doc="the HParams experiment (points' sessions: <point>/tb/hparams)")
    logs = property(lambda self: self.path / "logs", doc="submitit's folder of the training array and results job")

    def point(self, name: str) -> RunDir:
        return RunDir(self.path / name)

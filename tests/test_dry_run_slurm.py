"""``launch.py --dry-run`` prints the scripts submitit submits, as submitit renders them (quoted), on a real SLURM.

The same config is dry-run, then launched for real on the local cluster (tests/slurm/cluster.sh) with a
``run.root`` a shell would split and run if it were printed bare (spaces, double quotes, ``$(...)``, ``;``).
Each stage's printed script must equal the ``*_submission.sh`` submitit wrote for that stage's job, but for
the dependency's job id (the dry run cannot know it: ``<train job id>``). The jobs are held (``--begin`` an hour
away) and cancelled: nothing runs.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import submitit
from helpers import TINY_CONFIG, run_main

import launch
from ddpm.rundir import RunDir

pytestmark = pytest.mark.slurm
HEADER = re.compile(r"^# ---- (\w+) job ----\n", re.M)


def printed_scripts(out: str) -> dict[str, str]:
    """{stage: script} of a dry run's output (each script as printed, less the newline ``print`` adds)."""
    parts = HEADER.split(out)[1:]
    return {stage: text.removesuffix("\n") for stage, text in zip(parts[::2], parts[1::2], strict=True)}


def with_placeholders(script: str, jobs: dict[str, str]) -> str:
    """``script`` with the job ids of ``--dependency`` (``afterok:57``) as the dry run writes them
    (``afterok:<train job id>``), quoted as submitit quotes a value: the one thing a dry run cannot know."""
    names = {job_id: stage for stage, job_id in jobs.items()}

    def placeholder(match: re.Match[str]) -> str:
        kind, _, job_id = shlex.split(match.group(1))[0].partition(":")
        return f"#SBATCH --dependency={shlex.quote(f'{kind}:<{names[job_id]} job id>')}"

    return re.sub(r"^#SBATCH --dependency=(.*)$", placeholder, script, flags=re.M)


@pytest.mark.parametrize("shards", [3, 1])  # submitit submits an array of one item as a plain job
def test_dry_run_prints_the_scripts_submitit_submits(slurm_cluster, images: Path, tmp_path: Path, shards: int,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / 'my root "q" $(touch pwned) ;echo hi'
    root.mkdir()
    argv = ["--config", TINY_CONFIG, "--cluster", "slurm", f"data.path={images}", f"run.root={json.dumps(str(root))}",
            f"sampling.num_shards={shards}", "slurm.additional={begin: now+1hour}"]  # held: the jobs never run
    dry = run_main(launch.main, [*argv, "--dry-run"], capsys)
    assert dry.code == 0, dry.out + dry.err
    printed = printed_scripts(dry.out)
    assert list(printed) == ["train", "sample", "assemble"], dry.out
    assert ("#SBATCH --array=0-2%3\n" in printed["sample"]) == (shards == 3), printed["sample"]
    assert list(root.iterdir()) == []  # a dry run writes nothing

    run_dir = root / "tiny"
    folder = RunDir(run_dir).submitit_folder
    srun = next(line for line in printed["train"].splitlines() if line.startswith("srun "))
    assert shlex.split(srun)[-1] == str(folder)  # the folder is one word to a shell: nothing in it runs

    real = run_main(launch.main, argv, capsys)
    jobs = json.loads(RunDir(run_dir).jobs.read_text()) if RunDir(run_dir).jobs.is_file() else {}
    ids = {stage: jobs[stage] for stage in printed if stage in jobs}
    try:
        assert real.code == 0, real.out + real.err
        assert list(ids) == list(printed), jobs
        for stage, job_id in ids.items():
            submitted = submitit.SlurmJob(folder=folder, job_id=job_id).paths.submission_file.read_text()
            assert printed[stage] == with_placeholders(submitted, ids), stage
        hints = dict(line.split(":", 1) for line in real.out.splitlines() if line.startswith(("tensorboard", "status")))
        assert shlex.split(hints["tensorboard"]) == ["tensorboard", "--logdir", str(RunDir(run_dir).tb)]
        assert shlex.split(hints["status"]) == ["python", "launch.py", "status", str(run_dir)]
    finally:
        if ids:
            subprocess.run(["scancel", *ids.values()], check=False, timeout=60)

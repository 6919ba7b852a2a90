"""Login-node checks before anything is queued, and job states without ``sacct``.

Each failed check raises a :class:`DDPMError` whose one line names the problem:
the data source, the run root, the partition, or a request that does not fit it.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ddpm.config import Config
from ddpm.envcheck import check_torch_floor
from ddpm.errors import ConfigError, DataError, DDPMError
from ddpm.plan import check_free_space


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout


def slurm_available() -> bool:
    if not (shutil.which("sbatch") and shutil.which("sinfo")):
        return False
    try:
        _run(["sinfo", "-h", "-o", "%P"])
    except (subprocess.SubprocessError, OSError):
        return False
    return True


def detect_cluster(choice: str) -> str:
    """``auto`` -> ``slurm`` when sbatch/sinfo work on this machine, else ``local``."""
    if choice == "slurm" and not slurm_available():
        raise DDPMError("--cluster slurm: sbatch/sinfo not found or not answering on this machine")
    if choice == "auto":
        return "slurm" if slurm_available() else "local"
    return choice


@dataclass
class Partition:
    name: str
    nodes: int
    cpus: int  # per node
    mem_mb: int  # per node
    time_limit_min: float  # inf when unlimited
    gpus: int  # per node, from gres


def parse_time_limit(text: str) -> float:
    """SLURM time limits (``infinite``, ``1-00:00:00``, ``2:00:00``, ``30:00``, ``30``) in minutes."""
    text = text.strip()
    if text in ("infinite", "UNLIMITED", "n/a"):
        return float("inf")
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 1:
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, s = 0, parts[0], parts[1]
    else:
        h, m, s = parts[-3:]
    return (int(days) if days else 0) * 1440 + h * 60 + m + s / 60


def _gpu_items(gres: str | None) -> list[tuple[str, int]]:
    """(type, count) of each gpu item of a gres, as sbatch's ``--gres`` or sinfo's ``%G`` writes it:
    ``gpu:a100:4(S:0-1),shard:2`` -> [("gpu:a100", 4)]; a gpu item without a count counts 1 (SLURM's default)."""
    items = []
    for item in (gres or "").split(","):
        fields = item.strip().split("(")[0].removeprefix("gres/").split(":")
        if fields[0] == "gpu":
            counted = len(fields) > 1 and fields[-1].isdigit()
            items.append((":".join(fields[:-1] if counted else fields), int(fields[-1]) if counted else 1))
    return items


def _gpus_from_gres(gres: str) -> int:
    """GPUs of a partition's largest node from sinfo's ``%G`` (one item per GPU type): the largest count."""
    return max((count for _, count in _gpu_items(gres)), default=0)


def gres_gpus(gres: str | None) -> int:
    """GPUs per node an sbatch ``--gres`` asks for: ``gpu:a100:4`` -> 4, ``gpu:2`` -> 2, ``gpu`` or ``gpu:a100``
    -> 1 (SLURM's default count); 0 for None or a gres without a gpu item; several gpu items add up."""
    return sum(count for _, count in _gpu_items(gres))


def gres_kind(gres: str | None) -> str:
    """The GPU type of a gres without its count (``gpu:a100:4`` -> ``gpu:a100``, ``gpu:2`` -> ``gpu``)."""
    return next((kind for kind, _ in _gpu_items(gres)), "gpu")


def partitions() -> dict[str, Partition]:
    """Partitions as sinfo reports them (largest node per partition)."""
    out: dict[str, Partition] = {}
    for line in _run(["sinfo", "-h", "-o", "%P|%D|%c|%m|%l|%G"]).splitlines():
        name, nodes, cpus, mem, limit, gres = line.split("|")
        name = name.rstrip("*")
        part = Partition(name, int(nodes), int(cpus.rstrip("+")), int(mem.rstrip("+")), parse_time_limit(limit),
                         _gpus_from_gres(gres))
        if name in out:  # several node groups: keep the most capable
            old = out[name]
            part = Partition(name, old.nodes + part.nodes, max(old.cpus, part.cpus), max(old.mem_mb, part.mem_mb),
                             max(old.time_limit_min, part.time_limit_min), max(old.gpus, part.gpus))
        out[name] = part
    return out


def default_partition() -> str | None:
    for line in _run(["sinfo", "-h", "-o", "%P"]).splitlines():
        if line.endswith("*"):
            return line.rstrip("*")
    return None


def check_data(cfg: Config) -> None:
    d = cfg.data
    if d.source == "hf" and d.path is None:
        return  # a hub name: checked when the job runs (compute nodes may differ)
    if d.path is None:
        raise ConfigError(f"data.path: not set (required for data.source {d.source})")
    if not Path(d.path).exists():
        raise DataError(f"data.path: {d.path} does not exist (data.source {d.source})")


def check_init_from(cfg: Config) -> None:
    """``training.init_from`` names a diffusers model folder (its own config.json, or a pipeline's unet/)."""
    src = cfg.training.init_from
    if src and not ((Path(src) / "config.json").is_file() or (Path(src) / "unet" / "config.json").is_file()):
        raise DataError(f"training.init_from: {src} is not a diffusers model folder (no config.json or "
                        "unet/config.json; python -m ddpm.export writes one)")


def check_run_root(cfg: Config) -> None:
    root = Path(cfg.run.root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as err:
        raise DDPMError(f"run.root: {root} is not writable ({err.strerror})") from None


def check_slurm(cfg: Config, stages: list[str]) -> None:
    sc, infra = cfg.slurm, cfg.infrastructure
    parts = partitions()
    name = sc.partition or default_partition()
    if name not in parts:
        raise ConfigError(f"slurm.partition: partition {name!r} does not exist "
                          f"(available: {', '.join(sorted(parts))})")
    p = parts[name]
    nodes = infra.num_nodes if "train" in stages else 1
    if nodes > p.nodes:
        raise ConfigError(f"infrastructure.num_nodes: {nodes} nodes requested, partition {name} has {p.nodes}")
    if sc.cpus_per_task > p.cpus:
        raise ConfigError(f"slurm.cpus_per_task: {sc.cpus_per_task} CPUs requested, nodes of partition {name} "
                          f"have {p.cpus}")
    if sc.mem_gb * 1024 > p.mem_mb:
        raise ConfigError(f"slurm.mem_gb: {sc.mem_gb} GB requested, nodes of partition {name} have "
                          f"{p.mem_mb / 1024:.1f} GB")
    if sc.time_min > p.time_limit_min:
        raise ConfigError(f"slurm.time_min: {sc.time_min} min requested, partition {name} allows "
                          f"{p.time_limit_min:.0f} min")
    if infra.num_gpus > p.gpus:
        raise ConfigError(f"infrastructure.num_gpus: {infra.num_gpus} GPUs per node requested, nodes of partition "
                          f"{name} have {p.gpus}")


def check_gres(cfg: Config, stages: list[str]) -> None:
    """The GPUs the training job asks SLURM for (``slurm.gres``) are the ranks torchrun starts per node
    (``infrastructure.num_gpus``, one GPU each): a mismatch idles GPUs or stops the job with the GPU line."""
    sc, infra = cfg.slurm, cfg.infrastructure
    if "train" not in stages or sc.gres is None:
        return  # null: the job asks for gpu:<infrastructure.num_gpus>
    asked = gres_gpus(sc.gres)
    if infra.num_gpus == 0 and asked > 0:
        raise ConfigError(f"slurm.gres: {sc.gres} asks for {asked} GPU(s) per node, but infrastructure.num_gpus "
                          "is 0 (a CPU run: the GPUs would sit idle); fix: set slurm.gres=null for a CPU run, or "
                          f"infrastructure.num_gpus={asked}")
    if infra.num_gpus > 0 and asked != infra.num_gpus:
        fix = f"slurm.gres={gres_kind(sc.gres)}:{infra.num_gpus}" + (f" or infrastructure.num_gpus={asked}" if asked
                                                                     else "")
        raise ConfigError(f"slurm.gres: {sc.gres} asks for {asked} GPU(s) per node, infrastructure.num_gpus is "
                          f"{infra.num_gpus} (the ranks torchrun starts per node, one GPU each); fix: set {fix}")


def check_resume_inputs(cfg: Config, stages: list[str]) -> None:
    """Starting at eval/select/sample/assemble needs what the earlier stage left in the run directory."""
    from ddpm.checkpoint import list_checkpoints

    run = cfg.run_dir
    if stages[0] in ("eval", "sample") and not list_checkpoints(run):
        raise DDPMError(f"--stage {stages[0]}: no checkpoint in {run.checkpoints} (train first)")
    if stages[0] == "assemble" and not run.samples.shards.is_dir():
        raise DDPMError(f"--stage assemble: no shards in {run.samples.shards} (sample first)")


def check_eval(cfg: Config, stages: list[str]) -> None:
    """The eval stage's inputs (reference statistics, Inception weights, the checkpoints when training is done)
    and, without an eval stage ahead, the checkpoint ``sampling.checkpoint`` names."""
    from ddpm.checkpoint import final_reference
    from ddpm.evaluate import eval_steps

    run = cfg.run_dir

    if "eval" in stages:
        from ddpm.fid import FIDStats
        from ddpm.fidweights import resolve_weights

        if cfg.sampling.fid_reference is None:
            raise ConfigError("sampling.fid_reference: not set (the eval stage compares each checkpoint with it; "
                              "make one with `python -m ddpm.fid ref`)")
        FIDStats.load(cfg.sampling.fid_reference)
        resolve_weights(cfg.sampling.fid_weights)
        missing = [s for s in eval_steps(cfg) if not run.checkpoint(s).is_file()]
        if stages[0] == "eval" and missing:
            raise DDPMError(f"--stage eval: no checkpoint of step(s) {', '.join(map(str, missing))} in "
                            f"{run.checkpoints} (training.milestone_every={cfg.training.milestone_every})")
    if "sample" in stages and "select" not in stages:  # no selection ahead: the choice can be made now
        if "train" not in stages:
            final_reference(cfg.sampling.checkpoint, cfg.eval.enabled).resolve(run)
        elif cfg.sampling.checkpoint == "best":
            raise ConfigError("sampling.checkpoint: best needs the eval stage (set eval.enabled=true)")


def preflight(cfg: Config, cluster: str, stages: list[str], dry_run: bool = False) -> None:
    """Every check that can be made on the login node; raises one DDPMError line. A dry run prints SLURM's
    scripts on any machine: their GPU request is checked too."""
    check_torch_floor()
    if "train" in stages:
        check_data(cfg)
        check_init_from(cfg)
    check_run_root(cfg)
    check_free_space(cfg)
    check_resume_inputs(cfg, stages)
    check_eval(cfg, stages)
    if cluster == "slurm" or dry_run:
        check_gres(cfg, stages)
    if cluster == "slurm":
        check_slurm(cfg, stages)

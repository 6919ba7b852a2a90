"""What a machine must have before any work: the torch floor, and the GPUs a config asks for.

    check_torch_floor()                          # one line and exit 2 below TORCH_FLOOR (no torch import)
    device = pick_device(None, gpus_asked=1, what="sampling task")   # "cuda", or one line and exit 2

Never a silent fallback: a process that was asked for GPUs and sees fewer stops before any work with one
line naming what was asked, what is seen, ``CUDA_VISIBLE_DEVICES``, the job's gres, torch and its CUDA build,
the NVIDIA driver, and the fix. A CPU run is one explicit setting (``infrastructure.num_gpus: 0``, or
``--device cpu``). The torch-floor check reads the installed version from package metadata, so the login
node's ``launch.py`` and the job wrapper stay free of ``import torch``.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

from ddpm.errors import DDPMError

TORCH_FLOOR = (2, 10)
"""The lowest torch whose torchrun has every option the wrapper passes (``--signals-to-handle``: torch 2.10)."""
TORCH_FLOOR_TEXT = ".".join(map(str, TORCH_FLOOR))
PIP_INDEX = "https://download.pytorch.org/whl/{}"
# the oldest NVIDIA driver each CUDA major release runs on (minor-version compatibility; CUDA's release notes)
DRIVER_FLOOR = {11: (450, 80), 12: (525, 60), 13: (580, 65)}


class SetupError(DDPMError):
    """The machine lacks what the run needs (a torch too old, GPUs asked for but not seen): never requeued."""


def _version_tuple(text: str) -> tuple[int, ...]:
    """``2.9.0+cu126`` -> (2, 9, 0); the leading numeric fields only."""
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0])[:3])


def installed_torch() -> str | None:
    """The installed torch's version from its package metadata (no import), or None when torch is missing."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_floor_problem(version: str | None, *, sm: int | None = None, driver: str | None = None) -> str | None:
    """The one-line reason ``version`` cannot run this project, or None when it is at or above the floor.

    The fix is the install route (:func:`ddpm.routes.install_route`) for the card ``sm`` (compute capability,
    e.g. 70) under NVIDIA driver ``driver`` when the caller knows them, else every route with what it needs.
    """
    from ddpm.routes import install_route

    fix = f"install torch >= {TORCH_FLOOR_TEXT}: {install_route(sm, driver)}"
    if version is None:
        return f"torch is not installed; this project needs torch >= {TORCH_FLOOR_TEXT}: {fix}"
    if _version_tuple(version)[:2] >= TORCH_FLOOR:
        return None
    return (f"torch {version} is installed; this project needs torch >= {TORCH_FLOOR_TEXT} (torchrun's "
            f"--signals-to-handle, which the training wrapper passes, first shipped in {TORCH_FLOOR_TEXT}): {fix}")


def check_torch_floor() -> None:
    """Raise :class:`SetupError` (one line, exit 2) when the installed torch is below :data:`TORCH_FLOOR`."""
    if (problem := torch_floor_problem(installed_torch())) is not None:
        raise SetupError(problem)


def nvidia_driver() -> str | None:
    """The node's NVIDIA driver version (``/proc/driver/nvidia/version``, else ``nvidia-smi``), or None."""
    proc = Path("/proc/driver/nvidia/version")
    if proc.is_file():
        match = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+\.\d+(?:\.\d+)?)", proc.read_text())
        if match:
            return match.group(1)
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.split()
            return out[0] if out else None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def job_gres(environ: dict[str, str] | None = None) -> str:
    """The GPUs SLURM gave this job, as its environment says (``not a SLURM job`` outside one)."""
    env = os.environ if environ is None else environ
    if "SLURM_JOB_ID" not in env:
        return "not a SLURM job"
    for key in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE"):
        if env.get(key):
            return f"{key}={env[key]}"
    return "none (the job asked for no --gres)"


def driver_problem(cuda_build: str | None, driver: str | None, *, sm: int | None = None) -> str | None:
    """Why ``driver`` cannot run a torch built for CUDA ``cuda_build``, with the fix; None when it can.

    The fix is the install route (:func:`ddpm.routes.install_route`) for this driver and the card ``sm``
    (compute capability, e.g. 70; None: unknown, so the line gives each card's route under this driver).
    """
    from ddpm.routes import install_route

    if cuda_build is None or driver is None:
        return None
    major, have = _version_tuple(cuda_build)[0], _version_tuple(driver)
    need = DRIVER_FLOOR.get(major)
    if need is None or not have or have[:2] >= need:  # not have: a driver that reads as no version (N/A)
        return None
    card = f"an sm{sm} card under driver {driver}" if sm is not None else f"driver {driver}"
    return (f"the driver {driver} is older than this torch's CUDA {cuda_build} build needs "
            f"(>= {'.'.join(map(str, need))}); the route for {card}: {install_route(sm, driver)}")


def gpu_problem(asked: int, what: str, key: str) -> str | None:
    """One line when this process sees fewer than ``asked`` GPUs, else None (imports torch).

    ``what`` names the work (``training (2 local ranks)``), ``key`` the setting that asked for the GPUs.
    """
    import torch

    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if seen >= asked:
        return None
    build, driver = torch.version.cuda, nvidia_driver()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    facts = (f"CUDA_VISIBLE_DEVICES={visible if visible is not None else 'unset'!s}"
             if visible != "" else "CUDA_VISIBLE_DEVICES is empty (every GPU hidden)")
    facts += (f", job gres: {job_gres()}, torch {torch.__version__} ("
              f"{'CUDA ' + build + ' build' if build else 'a CPU-only build'}), "
              f"NVIDIA driver: {driver or 'none on this node'}, node {socket.gethostname()}")
    if build is None:
        fix = "install a CUDA build of torch (README, 'Install')"
    elif (problem := driver_problem(build, driver)) is not None:
        fix = problem
    elif driver is None:
        fix = "run on a GPU node: ask for GPUs (slurm.gres, or sbatch --gres=gpu:N)"
    elif visible == "":
        fix = "the job's GPUs are hidden: ask for them with --gres=gpu:N (slurm.gres) and leave CUDA_VISIBLE_DEVICES"
    else:
        fix = "ask for as many GPUs as ranks (slurm.gres) or lower the count"
    return (f"{key}: {what} asks for {asked} GPU(s), this process sees {seen}: {facts}; fix: {fix}; "
            "or set infrastructure.num_gpus=0 for a CPU run")


def arch_covers(sm: tuple[int, int], archs: list[str]) -> bool:
    """Whether a build compiled for ``archs`` (``torch.cuda.get_arch_list()``: ``sm_75``, ``sm_90a``,
    ``compute_120``) runs on a card of compute capability ``sm`` (major, minor).

    A cubin ``sm_XY`` runs on the cards of its major X with minor >= Y (CUDA's binary compatibility; an
    ``a``/``f``-suffixed cubin only on its own sm); PTX ``compute_XY`` is compiled by the driver for any sm >= XY.
    """
    card = sm[0] * 10 + sm[1]
    for arch in archs:
        match = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", arch)
        if match is None:
            continue
        kind, major, minor, suffix = match.group(1), int(match.group(2)), int(match.group(3)), match.group(4)
        if kind == "compute" and major * 10 + minor <= card:
            return True
        if kind == "sm" and major == sm[0] and (minor == sm[1] if suffix else minor <= sm[1]):
            return True
    return False


def kernel_problem(device: int = 0) -> str | None:
    """One line when torch's build has no kernels for GPU ``device`` (a V100, sm70, under a CUDA 13 build compiled
    for sm75 and newer: the first kernel would raise "no kernel image is available"), else None (imports torch).

    The line names the card, its sm, the build (torch version and CUDA), the archs it has and the route that
    covers the card (:func:`ddpm.routes.install_route`).
    """
    import torch

    from ddpm.routes import install_route

    archs = torch.cuda.get_arch_list()
    sm = torch.cuda.get_device_capability(device)
    if not archs or arch_covers(sm, archs):  # an empty list: a build that does not say (nothing to compare)
        return None
    driver = nvidia_driver()
    return (f"the {torch.cuda.get_device_name(device)} (GPU {device}, sm{sm[0]}{sm[1]}) on {socket.gethostname()} "
            f"has no kernels in this torch {torch.__version__} (CUDA {torch.version.cuda} build, archs "
            f"{' '.join(archs)}): the first kernel would fail with 'no kernel image is available'; fix: "
            f"{install_route(sm[0] * 10 + sm[1], driver)}")


def require_gpus(asked: int, what: str, key: str = "infrastructure.num_gpus") -> None:
    """Raise :class:`SetupError` when fewer than ``asked`` GPUs are visible (:func:`gpu_problem`) or the build has
    no kernels for one of the first ``asked`` (:func:`kernel_problem`): before any work, on every GPU path."""
    if asked <= 0:
        return
    if (problem := gpu_problem(asked, what, key)) is not None:
        raise SetupError(problem)
    for device in range(asked):
        if (problem := kernel_problem(device)) is not None:
            raise SetupError(f"{what}: {problem}")


def pick_device(requested: str | None, gpus_asked: int, what: str, key: str = "infrastructure.num_gpus") -> str:
    """``cpu`` or ``cuda`` for a sampling, eval or FID process: ``--device`` when given, else the config's choice.

    ``--device cuda`` or a config that asks for GPUs (``gpus_asked`` > 0) needs a GPU (:func:`require_gpus`);
    ``--device cpu`` or ``gpus_asked == 0`` is the CPU. Never cuda-when-available.
    """
    if requested is not None and not requested.startswith(("cpu", "cuda")):
        raise SetupError(f"--device {requested}: expected cpu or cuda")
    if requested is not None and requested.startswith("cpu"):
        return requested
    if requested is None and gpus_asked <= 0:
        return "cpu"
    if requested is not None:
        key = f"--device {requested}"
    require_gpus(max(gpus_asked, 1), what, key)
    return requested or "cuda"

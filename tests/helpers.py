"""Plain constants and helpers shared by the test modules (the fixtures themselves are in tests/conftest.py).

- ``ROOT``, ``TINY_CONFIG``, ``BABEL_CONFIG``: the repository and its two configs the tests use;
- ``CHECKPOINT_STEPS``, ``CHECKPOINT_LR``: what the ``make_checkpoint`` fixture trains;
- ``run_main(main, argv, capsys)``: a command line run in this process, as ``python -m`` would run it (exit code,
  stdout, stderr); a subprocess only where a real process is the point (signals, torchrun, import-time checks);
- ``launch(*args)``: ``python launch.py`` in a real process (the SLURM and local-executor runs);
- ``randomize(model)``, ``signal_handlers_restored()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny_cpu.yaml"  # 8x8 images, T=50, sampling: ddim 10 steps, 12 samples, 3 shards
BABEL_CONFIG = ROOT / "configs" / "ddpm_babel.yaml"  # the reference run: 64x64 CelebA, 4 GPUs

# The ``make_checkpoint`` fixture trains this many real steps at this learning rate before saving: enough for
# eps_theta to be far from the zero-initialised output (test_sample checks it) and for the EMA (tiny_cpu:
# ema_start 2, decay 0.9) to differ from the raw weights.
CHECKPOINT_STEPS = 6
CHECKPOINT_LR = 1e-2

# every signal a Trainer or the torchrun wrapper may take over (training.stop_signal and SIGTERM)
_STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


def randomize(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every weight in place (the U-Net's zero-initialised output layers would make every output 0)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def tiny_unet(image_size: int = 8) -> torch.nn.Module:
    """A seeded, randomized 16-channel U-Net (attention at ``image_size // 2``; eval mode): eps not identically 0."""
    from ddpm.unet import UNet

    torch.manual_seed(0)
    return randomize(UNet(3, 16, [1, 2], 1, [image_size // 2], 2, 0.0, True, image_size=image_size)).eval()


@contextlib.contextmanager
def signal_handlers_restored() -> Iterator[None]:
    """A Trainer installs stop handlers and ``close()`` ignores those signals: give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in _STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


@dataclasses.dataclass(frozen=True)
class CliRun:
    """What one command line gave: its exit code and everything it printed."""

    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        """stderr's lines, without the blank ends (an error is exactly one of them)."""
        return self.err.strip().splitlines()


def run_main(main: Callable[[list[str]], int | None], argv: Sequence[str | Path],
             capsys: pytest.CaptureFixture[str]) -> CliRun:
    """``main(argv)`` in this process, as ``sys.exit(main())`` under ``python -m`` would end: the exit code (an
    argparse ``SystemExit`` too) and stdout/stderr read through ``capsys`` (what was printed before is dropped).

    What a command may change in its process is put back: torch's thread count (``ddpm.cpus``), the global RNGs
    (``torch.manual_seed``) and the stop-signal handlers (the trainer, the torchrun wrapper).
    """
    capsys.readouterr()
    threads = torch.get_num_threads()
    exit_text = ""
    with signal_handlers_restored(), torch.random.fork_rng(devices=[]):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as end:  # argparse's usage errors (2), --help (0)
            code, exit_text = (end.code, "") if end.code is None or isinstance(end.code, int) else (1, f"{end.code}\n")
        finally:
            torch.set_num_threads(threads)
    captured = capsys.readouterr()
    return CliRun(0 if code is None else int(code), captured.out, captured.err + exit_text)


def launch(*args: str, cluster: str = "slurm", config: Path = TINY_CONFIG, timeout: float = 120,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python launch.py --config CONFIG --cluster CLUSTER ARGS...`` from the repository root, output captured.

    ``env``: variables added to this process's environment (e.g. ``{"OMP_NUM_THREADS": "1"}``).
    """
    return subprocess.run([sys.executable, "launch.py", "--config", str(config), "--cluster", cluster, *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, **(env or {})})

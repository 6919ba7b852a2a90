"""Plain constants and helpers shared by the test modules (the fixtures themselves are in tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny_cpu.yaml"  # 8x8 images, T=50, sampling: ddim 10 steps, 12 samples, 3 shards

# The ``make_checkpoint`` fixture trains this many real steps at this learning rate before saving: enough for
# eps_theta to be far from the zero-initialised output (test_sample checks it) and for the EMA (tiny_cpu:
# ema_start 2, decay 0.9) to differ from the raw weights.
CHECKPOINT_STEPS = 6
CHECKPOINT_LR = 1e-2


def randomize(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every weight in place (the U-Net's zero-initialised output layers would make every output 0)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def launch(*args: str, cluster: str = "slurm", config: Path = TINY_CONFIG, timeout: float = 120,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python launch.py --config CONFIG --cluster CLUSTER ARGS...`` from the repository root, output captured.

    ``env``: variables added to this process's environment (e.g. ``{"OMP_NUM_THREADS": "1"}``).
    """
    return subprocess.run([sys.executable, "launch.py", "--config", str(config), "--cluster", cluster, *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, **(env or {})})

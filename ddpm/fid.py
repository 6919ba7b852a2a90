"""Frechet Inception Distance (Heusel et al. 2017) as mergeable sufficient statistics.

FID compares two Gaussians fitted to Inception-v3 pool features (2048-d)::

    FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})          (Heusel et al., eq. 6)

A Gaussian needs only (n, sum f, sum f f^T), so every sampling shard stores
those in float64 and the assembler merges them: no images move. The network is pytorch-fid's own
(its port of the TensorFlow FID Inception graph, built from ``pytorch_fid.inception``)
with its weights file ``pt_inception-2015-12-05-6726825d.pth`` read from a local path,
never downloaded; other weights are never substituted.

    python -m ddpm.fid ref --config configs/ddpm_babel.yaml --out runs/celeba_ref.npz

The network half (pytorch-fid, torchvision: seconds to import) is in :mod:`ddpm.inception`, imported only by
what runs Inception, so merging and comparing statistics (assembly) stays light.
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import linalg

from ddpm.config import DataConfig
from ddpm.configtools import parse_with_overrides
from ddpm.errors import FIDError, cli_entry
from ddpm.fsio import atomic_write_bytes

if TYPE_CHECKING:  # torch is not imported here: the assembly job merges statistics without loading it
    import torch

    from ddpm.inception import FIDFeatures

FEATURE_DIM = 2048  # the pool3 width of ddpm.inception (not imported here: torchvision takes seconds)
INCEPTION_PRECISION = "fp32"  # ddpm.inception runs Inception in full IEEE fp32 (never TF32 or autocast)
# Identifies the feature pipeline (network + input transform + arithmetic); stats from another never compare.
PIPELINE = f"pt_inception-2015-12-05/pool3/uint8-bilinear299-[-1,1]/{INCEPTION_PRECISION}"


# ----------------------------------------------------------------------------- statistics


@dataclass
class FIDStats:
    """Sufficient statistics of a feature set: n, sum f [D], sum f f^T [D, D] (float64).

    ``signature`` names how the images were prepared (data preprocessing + Inception
    pipeline and its precision); two stats compare or merge only when their signatures are equal.
    ``device`` records where Inception ran (cpu, cuda; "cpu+cuda" after a merge), for the record only:
    fp32 features of the two agree to float rounding, so a CPU reference compares with GPU samples.
    """

    n: int = 0
    sum: np.ndarray = field(default_factory=lambda: np.zeros(FEATURE_DIM))
    sum_outer: np.ndarray = field(default_factory=lambda: np.zeros((FEATURE_DIM, FEATURE_DIM)))
    signature: str = ""
    device: str = ""

    def update(self, features: np.ndarray | torch.Tensor) -> FIDStats:
        """Add features [N, D] (any float dtype; accumulated in float64). Returns self."""
        f = features.detach().cpu().double().numpy() if hasattr(features, "detach") else features  # a tensor
        f = np.asarray(f, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.sum.shape[0]:
            raise ValueError(f"features must be [N, {self.sum.shape[0]}], got {list(f.shape)}")
        self.n += f.shape[0]
        self.sum += f.sum(axis=0)
        self.sum_outer += f.T @ f
        return self

    def merge(self, other: FIDStats) -> FIDStats:
        """Statistics of the union of both feature sets (a new object)."""
        if other.signature != self.signature:
            raise FIDError(f"cannot merge FID statistics with different preprocessing "
                           f"({self.signature!r} vs {other.signature!r})")
        devices = "+".join(sorted({d for s in (self, other) for d in s.device.split("+") if d}))
        return FIDStats(self.n + other.n, self.sum + other.sum, self.sum_outer + other.sum_outer,
                        self.signature, devices)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """mu [D] and the unbiased covariance [D, D] (as ``np.cov(features, rowvar=False)``).

        S = (sum f f^T - n mu mu^T) / (n - 1).
        """
        if self.n < 2:
            raise FIDError(f"FID statistics need at least 2 images, got {self.n}")
        mu = self.sum / self.n
        cov = (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, cov

    def to_arrays(self, prefix: str = "fid_") -> dict[str, np.ndarray]:
        """Plain arrays for ``np.savez`` (also embedded in sample shards)."""
        return {f"{prefix}n": np.array(self.n, dtype=np.int64), f"{prefix}sum": self.sum,
                f"{prefix}sum_outer": self.sum_outer, f"{prefix}signature": np.array(self.signature),
                f"{prefix}device": np.array(self.device)}

    @classmethod
    def from_arrays(cls, arrays: Any, prefix: str = "fid_") -> FIDStats | None:
        """Inverse of :meth:`to_arrays`; None when ``arrays`` holds no statistics."""
        if f"{prefix}n" not in arrays:
            return None
        device = str(arrays[f"{prefix}device"]) if f"{prefix}device" in arrays else ""  # absent in older files
        return cls(int(arrays[f"{prefix}n"]), np.asarray(arrays[f"{prefix}sum"], dtype=np.float64),
                   np.asarray(arrays[f"{prefix}sum_outer"], dtype=np.float64),
                   str(arrays[f"{prefix}signature"]), device)

    def save(self, path: str | Path) -> None:
        """Atomically write an npz with keys fid_n, fid_sum, fid_sum_outer, fid_signature, fid_device."""
        buf = io.BytesIO()
        np.savez(buf, **self.to_arrays())
        atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))

    @classmethod
    def load(cls, path: str | Path) -> FIDStats:
        path = Path(path)
        if not path.is_file():
            raise FIDError(f"{path}: FID statistics file not found")
        try:
            with np.load(path, allow_pickle=False) as data:
                stats = cls.from_arrays(data)
        except (OSError, ValueError, KeyError) as err:
            raise FIDError(f"{path}: unreadable FID statistics ({err})") from None
        if stats is None:
            raise FIDError(f"{path}: not an FID statistics file (no fid_n; make one with `python -m ddpm.fid ref`)")
        return stats


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2), means [D], covariances [D, D] (symmetric PSD).

    d^2 = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})   (Heusel et al. 2017, eq. 6).
    S1 S2 has the eigenvalues of the symmetric PSD matrix S1^{1/2} S2 S1^{1/2}, so the trace of its square
    root is the sum of their square roots: two symmetric eigendecompositions instead of pytorch-fid's
    ``scipy.linalg.sqrtm`` (a Schur decomposition: 4x slower at D=2048, and inexact on the singular covariances
    of a few hundred samples, where it needs an eps offset). Rounding's tiny negative eigenvalues count as 0.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    if not (np.isfinite(sigma1).all() and np.isfinite(sigma2).all()):
        raise FIDError("FID statistics hold non-finite values (NaN or inf features)")
    diff = mu1 - mu2
    w, v = linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # S1^{1/2}
    inner = root1 @ sigma2 @ root1
    trace_covmean = np.sqrt(np.clip(linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean)


def fid_from_stats(a: FIDStats, b: FIDStats) -> float:
    """FID between two statistics; refuses (one line) when their preprocessing differs."""
    if a.signature != b.signature:
        raise FIDError(f"refusing to compare FID statistics computed with different preprocessing: "
                       f"{a.signature!r} vs {b.signature!r}")
    return frechet_distance(*a.mean_cov(), *b.mean_cov())


# ----------------------------------------------------------------------------- reference statistics


def stats_signature(data_cfg: DataConfig | dict[str, Any]) -> str:
    """Feature pipeline (with the Inception precision, ``fp32``) + the data preprocessing
    (``preprocess_signature``) the images went through; not the device (see :class:`FIDStats`)."""
    from ddpm.data import preprocess_signature

    cfg = data_cfg if isinstance(data_cfg, DataConfig) else DataConfig(**data_cfg)
    return f"{PIPELINE}|{preprocess_signature(cfg)}"


def reference_stats(data_cfg: DataConfig, model: FIDFeatures, max_images: int | None = None,
                    batch_size: int = 100, progress: bool = True) -> FIDStats:
    """Stream the training images once (no flips) through ``preprocess`` and Inception; return their stats."""
    from tqdm import tqdm

    from ddpm.data import build_source
    from ddpm.inception import inception_features

    source = build_source(data_cfg)
    n = len(source) if max_images is None else min(max_images, len(source))
    stats = FIDStats(signature=stats_signature(data_cfg), device=next(model.parameters()).device.type)
    for i in tqdm(range(0, n, batch_size), desc="fid ref", unit="batch", disable=not progress):
        images = source.get_batch(list(range(i, min(i + batch_size, n))))  # uint8 [B, S, S, 3]
        stats.update(inception_features(model, images, batch_size))
    return stats


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddpm.fid", description="FID reference statistics")
    sub = p.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("ref", help="Inception statistics of the training data (run once, reuse)")
    ref.add_argument("--config", required=True, help="YAML config; its data section names the images")
    ref.add_argument("overrides", nargs="*", help="section.key=value, parsed as YAML")
    ref.add_argument("--out", required=True, help="npz to write")
    ref.add_argument("--max-images", type=int, default=None, help="default: the whole split")
    ref.add_argument("--weights", default=None, help="default: sampling.fid_weights or the torch hub cache")
    ref.add_argument("--batch-size", type=int, default=100)
    ref.add_argument("--device", default=None, help="cpu or cuda (default: cuda when the config asks for GPUs)")
    args = parse_with_overrides(p, argv)

    from ddpm.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.max_images is not None and args.max_images < 2:
        raise FIDError(f"--max-images must be >= 2, got {args.max_images}")
    from ddpm.envcheck import pick_device

    device = pick_device(args.device, int(cfg.infrastructure.num_gpus > 0), "FID reference statistics",
                         "infrastructure.num_gpus (--device cpu for the CPU)")
    from ddpm.cpus import apply_cpu_budget, cpu_budget
    from ddpm.inception import load_inception

    print(f"fid: {apply_cpu_budget(cpu_budget('fid', device))}", flush=True)
    model = load_inception(args.weights or cfg.sampling.fid_weights, device)
    stats = reference_stats(cfg.data, model, args.max_images, max(args.batch_size, 1))
    if stats.n < 2:
        raise FIDError(f"data: only {stats.n} image(s); FID statistics need at least 2")
    stats.save(args.out)
    print(f"{args.out}: FID statistics of {stats.n} images ({stats.signature}; Inception on {stats.device})",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Frechet Inception Distance (Heusel et al. 2017) as mergeable sufficient statistics.

FID compares two Gaussians fitted to Inception-v3 pool features (2048-d)::

    FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})          (Heusel et al., eq. 6)

A Gaussian needs only (n, sum f, sum f f^T), so every sampling shard stores
those in float64 and the assembler merges them: no images move. The network is pytorch-fid's own
(its port of the TensorFlow FID Inception graph, built from ``pytorch_fid.inception``)
with its weights file ``pt_inception-2015-12-05-6726825d.pth`` read from a local path,
never downloaded; other weights are never substituted.

    python -m ddpm.fid ref --config configs/ddpm_babel.yaml --out runs/celeba_ref.npz
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_fid import inception as pfi
from scipy import linalg
from torch import nn
from torchvision.models import Inception3

from ddpm.config import DataConfig
from ddpm.configtools import parse_with_overrides
from ddpm.errors import DDPMError, cli_entry
from ddpm.fsio import atomic_write_bytes

WEIGHTS_URL = pfi.FID_WEIGHTS_URL  # pytorch-fid's own file: the numbers papers cite
WEIGHTS_NAME = WEIGHTS_URL.rsplit("/", 1)[-1]  # pt_inception-2015-12-05-6726825d.pth
FEATURE_DIM = 2048
# Identifies the feature pipeline (network + input transform); stats from another pipeline never compare.
PIPELINE = "pt_inception-2015-12-05/pool3/uint8-bilinear299-[-1,1]"


class FIDError(DDPMError):
    """Missing or mismatched Inception weights, or statistics that cannot be compared."""


# ----------------------------------------------------------------------------- statistics


@dataclass
class FIDStats:
    """Sufficient statistics of a feature set: n, sum f [D], sum f f^T [D, D] (float64).

    ``signature`` names how the images were prepared (data preprocessing + Inception
    pipeline); two stats compare or merge only when their signatures are equal.
    """

    n: int = 0
    sum: np.ndarray = field(default_factory=lambda: np.zeros(FEATURE_DIM))
    sum_outer: np.ndarray = field(default_factory=lambda: np.zeros((FEATURE_DIM, FEATURE_DIM)))
    signature: str = ""

    def update(self, features: np.ndarray | torch.Tensor) -> FIDStats:
        """Add features [N, D] (any float dtype; accumulated in float64). Returns self."""
        f = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else features
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
        return FIDStats(self.n + other.n, self.sum + other.sum, self.sum_outer + other.sum_outer,
                        self.signature)

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
                f"{prefix}sum_outer": self.sum_outer, f"{prefix}signature": np.array(self.signature)}

    @classmethod
    def from_arrays(cls, arrays: Any, prefix: str = "fid_") -> FIDStats | None:
        """Inverse of :meth:`to_arrays`; None when ``arrays`` holds no statistics."""
        if f"{prefix}n" not in arrays:
            return None
        return cls(int(arrays[f"{prefix}n"]), np.asarray(arrays[f"{prefix}sum"], dtype=np.float64),
                   np.asarray(arrays[f"{prefix}sum_outer"], dtype=np.float64),
                   str(arrays[f"{prefix}signature"]))

    def save(self, path: str | Path) -> None:
        """Atomically write an npz with keys fid_n, fid_sum, fid_sum_outer, fid_signature."""
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


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2), means [D], covariances [D, D].

    d^2 = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})   (Heusel et al. 2017, eq. 6).
    A singular product gets the usual eps * I offset on both covariances; the tiny
    imaginary part sqrtm can return is dropped only if its diagonal is within 1e-3 of 0.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        worst = np.max(np.abs(np.diagonal(covmean).imag))
        if worst > 1e-3:
            raise FIDError(f"matrix square root has an imaginary component {worst:.3g} (degenerate covariances?)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_stats(a: FIDStats, b: FIDStats) -> float:
    """FID between two statistics; refuses (one line) when their preprocessing differs."""
    if a.signature != b.signature:
        raise FIDError(f"refusing to compare FID statistics computed with different preprocessing: "
                       f"{a.signature!r} vs {b.signature!r}")
    return frechet_distance(*a.mean_cov(), *b.mean_cov())


# ----------------------------------------------------------------------------- network


def FIDInceptionV3() -> Inception3:
    """pytorch-fid's ``fid_inception_v3()`` network, randomly initialised instead of downloaded.

    Built as pytorch-fid builds it: torchvision's Inception3 (1008-way ``fc``, no auxiliary head)
    with pytorch-fid's TF-graph blocks in Mixed_5b-5d, 6b-6e, 7b, 7c. Its state dict has the keys
    and shapes of ``pt_inception-2015-12-05-6726825d.pth``; the ``fc`` logits are unused for FID.
    """
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return net


class FIDFeatures(pfi.InceptionV3):
    """pytorch-fid's ``InceptionV3([3], resize_input=True, normalize_input=True)`` around local weights.

    ``InceptionV3.__init__`` fetches the weights from their URL, so this sets up the same
    attributes and the same four blocks from ``net`` (a :func:`FIDInceptionV3` holding the weights).
    ``forward`` is pytorch-fid's own: x [N, 3, H, W] float in [0, 1] -> bilinear resize to 299x299
    (align_corners=False) -> 2x - 1 -> blocks -> ``[pool3 [N, 2048, 1, 1]]``.
    """

    def __init__(self, net: Inception3) -> None:
        nn.Module.__init__(self)  # not InceptionV3.__init__: it would download
        self.resize_input, self.normalize_input = True, True
        self.output_blocks = [pfi.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]]
        self.last_needed_block = self.output_blocks[0]
        self.blocks = nn.ModuleList([
            nn.Sequential(net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3,
                          nn.MaxPool2d(kernel_size=3, stride=2)),
            nn.Sequential(net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, nn.MaxPool2d(kernel_size=3, stride=2)),
            nn.Sequential(net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b,
                          net.Mixed_6c, net.Mixed_6d, net.Mixed_6e),
            nn.Sequential(net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, nn.AdaptiveAvgPool2d(output_size=(1, 1))),
        ])
        self.requires_grad_(False)


def resolve_weights(path: str | Path | None = None) -> Path:
    """The weights file: ``path`` if given, else the torch hub cache; one-line error when absent."""
    if path is not None:
        p = Path(os.path.expanduser(str(path)))
        if not p.is_file():
            raise FIDError(f"FID Inception weights not found: {p} (download: curl -L -o {p} {WEIGHTS_URL})")
        return p
    p = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME
    if not p.is_file():
        raise FIDError(f"FID Inception weights not found at {p}; download them once on the login node: "
                       f"mkdir -p {p.parent} && curl -L -o {p} {WEIGHTS_URL} "
                       f"(or set sampling.fid_weights / --weights to a copy)")
    return p


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> FIDFeatures:
    """pytorch-fid's FID Inception with the weights of :func:`resolve_weights` (eval mode, no grad)."""
    p = resolve_weights(path)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        raise FIDError(f"{p}: unreadable Inception weights ({type(err).__name__})") from None
    net = FIDInceptionV3()
    expected = {k: v.shape for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    if not isinstance(state, dict):
        raise FIDError(f"{p}: not a state dict of the FID Inception ({WEIGHTS_NAME})")
    got = {k: getattr(v, "shape", None) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    bad = sorted(set(expected) ^ set(got)) + sorted(k for k in expected if k in got and got[k] != expected[k])
    if bad:
        raise FIDError(f"{p}: weights do not match the FID Inception ({len(bad)} keys differ, e.g. "
                       f"{', '.join(bad[:3])}); expected {WEIGHTS_NAME}")
    net.load_state_dict(state, strict=False)  # only num_batches_tracked may be absent (unused in eval)
    return FIDFeatures(net).to(device).eval()


@torch.no_grad()
def inception_features(model: FIDFeatures, images: np.ndarray, batch_size: int = 50) -> np.ndarray:
    """uint8 images [N, H, W, 3] -> pool3 features [N, 2048] float64 (computed in float32).

    pytorch-fid's path (``fid_score.get_activations``): ToTensor's x / 255 as float32 [B, 3, H, W],
    then the model's own bilinear resize to 299x299 (align_corners=False) and 2x - 1.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).to(device).permute(0, 3, 1, 2).contiguous().float().div(255)
        out.append(model(x)[0].flatten(1).double().cpu().numpy())  # [B, 2048, 1, 1] -> [B, 2048]
    return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))


# ----------------------------------------------------------------------------- reference statistics


def stats_signature(data_cfg: DataConfig | dict[str, Any]) -> str:
    """Feature pipeline + the data preprocessing (``preprocess_signature``) the images went through."""
    from ddpm.data import preprocess_signature

    cfg = data_cfg if isinstance(data_cfg, DataConfig) else DataConfig(**data_cfg)
    return f"{PIPELINE}|{preprocess_signature(cfg)}"


def reference_stats(data_cfg: DataConfig, model: FIDFeatures, max_images: int | None = None,
                    batch_size: int = 100, progress: bool = True) -> FIDStats:
    """Stream the training images once (no flips) through ``preprocess`` and Inception; return their stats."""
    from tqdm import tqdm

    from ddpm.data import build_source

    source = build_source(data_cfg)
    n = len(source) if max_images is None else min(max_images, len(source))
    stats = FIDStats(signature=stats_signature(data_cfg))
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
    ref.add_argument("--device", default=None, help="default: cuda when available")
    args = parse_with_overrides(p, argv)

    from ddpm.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.max_images is not None and args.max_images < 2:
        raise FIDError(f"--max-images must be >= 2, got {args.max_images}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from ddpm.cpus import apply_cpu_budget, cpu_budget

    print(f"fid: {apply_cpu_budget(cpu_budget('fid', device))}", flush=True)
    model = load_inception(args.weights or cfg.sampling.fid_weights, device)
    stats = reference_stats(cfg.data, model, args.max_images, max(args.batch_size, 1))
    if stats.n < 2:
        raise FIDError(f"data: only {stats.n} image(s); FID statistics need at least 2")
    stats.save(args.out)
    print(f"{args.out}: FID statistics of {stats.n} images ({stats.signature})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

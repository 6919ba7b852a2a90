"""``python -m tools.digit_score SAMPLES.npz [--size 16]``: an offline quality score for sampled digits.

Inception FID cannot run offline, so a tiny CNN trained here on the real digits (:func:`tools.digits.digit_images`;
fixed seed, ~10 s on one CPU thread, held-out accuracy ~0.99; cached in ``~/.cache/ddpm/``) scores samples:

- ``fd``: Frechet distance (:func:`ddpm.fid.frechet_distance`) between its 64-d penultimate features of the
  samples and of all 1797 real digits. FD is biased upward at small N: compare scores only at equal N;
  :func:`real_digits_score` gives the best achievable at that N, :func:`noise_score` the worst.
- ``confidence``: mean max softmax probability; ``class_entropy``: entropy (nats, at most ln 10) of the
  predicted-class histogram; ``classes`` / ``coverage``: how many / which fraction of the 10 classes occur.
- Samples: ``arr_0`` of the npz (``ddpm.assemble``'s uint8 [N, H, W, C]), C = 1 or 3 (RGB turned grey by
  the channel mean), resized with PIL BICUBIC to ``--size`` when their side differs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import os
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from ddpm.errors import DataError, cli_entry
from ddpm.fid import frechet_distance
from ddpm.fsio import atomic_write_bytes
from tools.digits import digit_images

VERSION = 1  # bump when the network or its training changes: older caches are retrained
FEATURE_DIM = 64


class DigitNet(nn.Module):
    """x [N, 1, S, S] float in [0, 1] (S >= 8) -> (features [N, 64] (pre-activation), logits [N, 10])."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(64 * 16, FEATURE_DIM), nn.Linear(FEATURE_DIM, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        features = self.fc1(F.adaptive_avg_pool2d(F.relu(self.conv2(h)), 4).flatten(1))  # [N, 64, 4, 4] -> [N, 64]
        return features, self.fc2(F.relu(features))


def default_cache(size: int) -> Path:
    """``$XDG_CACHE_HOME/ddpm/digit_classifier_<size>.pt`` (``~/.cache`` when unset)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm" / f"digit_classifier_{size}.pt"


def split(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): 80% / 20% of a fixed-seed permutation of range(n), the classifier's."""
    perm, cut = np.random.default_rng(seed).permutation(n), int(round(n * 0.8))
    return np.sort(perm[:cut]), np.sort(perm[cut:])


@functools.lru_cache(maxsize=4)
def real_digits(size: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`tools.digits.digit_images` (uint8 [1797, size, size], labels [1797]), computed once, read-only."""
    images, labels = digit_images(size)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def _shift(x: torch.Tensor, g: torch.Generator, m: int) -> torch.Tensor:
    """x [N, 1, S, S], each image translated by a random whole (dx, dy) in [-m, m]^2 pixels, zero-filled."""
    theta = torch.eye(2, 3).repeat(len(x), 1, 1)
    theta[:, :, 2] = torch.randint(-m, m + 1, (len(x), 2), generator=g) * (2.0 / x.shape[-1])
    return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)


def train_classifier(size: int = 16, seed: int = 0, epochs: int = 15) -> tuple[DigitNet, float]:
    """Train :class:`DigitNet` on the training :func:`split`; returns (net in eval mode, held-out accuracy).

    Adam, one-cycle schedule, batches of 64, images shifted by up to size/16 pixels (robust features for novel
    digits), on one thread: deterministic for one torch build; the caller's RNG state and threads are left alone.
    """
    images, labels = real_digits(size)
    train, test = split(len(images), seed)
    x, y = _prepare(images[train], size), torch.from_numpy(labels[train])
    with torch.random.fork_rng(devices=[]), contextlib.ExitStack() as stack:
        stack.callback(torch.set_num_threads, torch.get_num_threads())
        torch.set_num_threads(1)  # the same weights whatever the caller's thread count (and faster for this net)
        torch.manual_seed(seed)
        net, g = DigitNet(), torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * math.ceil(len(x) / 64))
        for _ in range(epochs):
            for batch in torch.randperm(len(x), generator=g).split(64):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(_shift(x[batch], g, max(1, size // 16)))[1], y[batch]).backward()
                opt.step()
                sched.step()
    pred = net.eval()(_prepare(images[test], size))[1].argmax(1).detach().numpy()
    return net, float((pred == labels[test]).mean())


def _prepare(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [N, H, W] or [N, H, W, C] (C = 1 or 3), N >= 1 -> float32 grey [N, 1, size, size] in [0, 1]."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise DataError(f"images must be uint8 [N, H, W(, C)] with C 1 or 3, got {images.dtype} {list(images.shape)}")
    grey = images.astype(np.float32) if images.ndim == 3 else images.astype(np.float32).mean(axis=-1)
    if grey.shape[1:] != (size, size):
        grey = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in grey])
    return torch.from_numpy(grey / np.float32(255)).unsqueeze(1)


@dataclass
class DigitScorer:
    """A trained :class:`DigitNet` and the feature statistics (mu [64], sigma [64, 64]) of all real digits."""

    net: DigitNet
    size: int
    accuracy: float  # held-out accuracy
    ref_mu: np.ndarray = field(init=False)
    ref_sigma: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        feats, _ = self.outputs(real_digits(self.size)[0])
        self.ref_mu, self.ref_sigma = feats.mean(0), np.cov(feats, rowvar=False)

    @torch.no_grad()
    def outputs(self, images: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (see :func:`_prepare`) -> (features [N, 64] float64, softmax probabilities [N, 10])."""
        out = [self.net(chunk) for chunk in _prepare(images, self.size).split(batch_size)]
        feats, logits = torch.cat([f for f, _ in out]).double(), torch.cat([lg for _, lg in out]).double()
        return feats.numpy(), torch.softmax(logits, 1).numpy()

    def score(self, images: np.ndarray) -> dict[str, Any]:
        """Scores of uint8 images [N, H, W] or [N, H, W, C], N >= 2 (keys: see the module docstring)."""
        if len(images) < 2:
            raise DataError(f"digit score needs at least 2 images, got {len(images)}")
        feats, probs = self.outputs(images)
        fd = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), self.ref_mu, self.ref_sigma)
        hist = np.bincount(probs.argmax(1), minlength=10) / len(probs)
        entropy = float(0.0 - (hist * np.log(np.where(hist > 0, hist, 1.0))).sum())  # 0.0 - : never -0.0
        return {"fd": fd, "confidence": float(probs.max(1).mean()), "class_entropy": entropy,
                "classes": int((hist > 0).sum()), "coverage": float((hist > 0).mean()), "n": len(feats)}


@functools.lru_cache(maxsize=8)
def _scorer(size: int, path: Path, seed: int) -> DigitScorer:
    net = None
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if (blob["version"], blob["size"], blob["seed"]) != (VERSION, size, seed):
                raise ValueError(f"made for version/size/seed {blob['version']}/{blob['size']}/{blob['seed']}")
            net, accuracy = DigitNet(), float(blob["accuracy"])
            net.load_state_dict(blob["state_dict"])
        except Exception as err:  # corrupt, truncated or foreign file: retrain rather than fail
            warnings.warn(f"digit score: unusable classifier cache {path} ({err!r}); retraining", stacklevel=3)
            net = None
    if net is None:
        (net, accuracy), buf = train_classifier(size, seed), io.BytesIO()
        torch.save({"version": VERSION, "size": size, "seed": seed, "accuracy": accuracy,
                    "state_dict": net.state_dict()}, buf)
        try:
            atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))
        except OSError as err:  # e.g. a read-only home on a compute node: score anyway, uncached
            warnings.warn(f"digit score: cannot cache the classifier at {path} ({err}); see --cache", stacklevel=3)
    return DigitScorer(net.eval(), size, accuracy)


def load_scorer(size: int = 16, cache: str | Path | None = None, seed: int = 0) -> DigitScorer:
    """The scorer for ``size``, its weights read from ``cache`` (default :func:`default_cache`) or trained and
    written there atomically (also when the file is corrupt: a warning, not an error); memoised per process."""
    if size < 8:
        raise DataError(f"--size: {size} is smaller than the digits' 8 pixels")
    return _scorer(size, Path(os.path.expanduser(str(cache))) if cache is not None else default_cache(size), seed)


def score(images: np.ndarray, size: int = 16, cache: str | Path | None = None) -> dict[str, Any]:
    """{"fd", "confidence", "class_entropy", "classes", "coverage", "n"} of uint8 images [N, H, W(, C)], N >= 2."""
    return load_scorer(size, cache).score(images)


def real_digits_score(n: int, seed: int = 0, size: int = 16, cache: str | Path | None = None) -> dict[str, Any]:
    """Score of ``n`` real digits drawn without replacement (2 <= n <= 1797): the best achievable at that N,
    optimistic as n nears 1797 since the draw overlaps the reference (all 1797) and the training split."""
    images = real_digits(size)[0]
    if not 2 <= n <= len(images):
        raise DataError(f"real digits: n must be in [2, {len(images)}], got {n}")
    return score(images[np.random.default_rng(seed).choice(len(images), n, replace=False)], size, cache)


def noise_score(n: int, seed: int = 0, size: int = 16, cache: str | Path | None = None) -> dict[str, Any]:
    """Score of ``n`` images of uniform uint8 noise [n, size, size]: a worst-case anchor."""
    return score(np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8), size, cache)


def load_samples(path: str | Path) -> np.ndarray:
    """``arr_0`` (or ``images``) of an npz: uint8 [N, H, W] or [N, H, W, C]; a DataError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: samples file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            key = next((k for k in ("arr_0", "images") if k in data.files), None)
            images, files = (None if key is None else data[key]), data.files
    except (OSError, ValueError, EOFError, TypeError, zipfile.BadZipFile) as err:  # TypeError: an .npy is no `with`
        why = "an .npy array, not an npz archive" if isinstance(err, TypeError) else f"{type(err).__name__}: {err}"
        raise DataError(f"{path}: not a readable npz ({why})") from None
    if images is None or images.dtype != np.uint8 or images.ndim not in (3, 4):
        got = f"keys {files}" if images is None else f"{key} is {images.dtype} {list(images.shape)}"
        raise DataError(f"{path}: no uint8 images [N, H, W(, C)] under arr_0 or images ({got})")
    return images


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.digit_score", description=(
        "Score sampled digits with a small offline classifier (FD of its features, confidence, class coverage). "
        "FD depends on N: compare only at equal N, or against --anchors."))
    parser.add_argument("samples", help="npz whose arr_0 is uint8 [N, H, W, C] (ddpm.assemble's output)")
    parser.add_argument("--size", type=int, default=16, help="classifier image side (default 16)")
    parser.add_argument("--cache", default=None, help="classifier weights file (default ~/.cache/ddpm/...)")
    parser.add_argument("--anchors", action="store_true", help="also score N real digits and N noise images")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    images = load_samples(args.samples)
    result, anchors = score(images, args.size, args.cache), {}
    if args.anchors:
        n = min(len(images), len(real_digits(args.size)[0]))
        anchors = {"real_digits": real_digits_score(n, 0, args.size, args.cache),
                   "noise": noise_score(n, 0, args.size, args.cache)}
    if args.json:
        print(json.dumps({**result, **({"anchors": anchors} if anchors else {})}))
    for name, s in ({} if args.json else {"digit score": result, **anchors}).items():
        print(f"{name.replace('_', ' ')}: fd {s['fd']:.2f}  confidence {s['confidence']:.3f}  classes "
              f"{s['classes']}/10  entropy {s['class_entropy']:.2f}/{math.log(10):.2f}  (n={s['n']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

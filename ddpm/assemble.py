"""Shards -> one sample set: ``python -m ddpm.assemble DIR`` (the job after the sampling array).

DIR may be the run directory, its ``samples/`` directory or ``samples/shards/`` itself;
shards are read from ``.../samples/shards`` and the outputs go to its parent::

    samples/samples_<N>x<H>x<W>x<C>.npz   arr_0: uint8 [N, H, W, C] (guided-diffusion evaluator layout)
    samples/grid.png                      the first --grid-size images
    samples/metrics.json                  checkpoint, sampler, per-channel mean/std, FID when available

The shards must cover [0, N) exactly, once, with one checkpoint (sha256) and one set of
sampler settings; anything else is an error naming the shard (exit 2). FID is computed
by merging the shards' Inception statistics (no images move) against ``--fid-reference``
or the ``sampling.fid_reference`` the shards were sampled with. Outputs are written
atomically; outputs of a different earlier assembly are moved to ``previous/``, never lost.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ddpm.cpus import apply_cpu_budget, cpu_budget
from ddpm.errors import ShardError, cli_entry
from ddpm.fsio import atomic_write_bytes, atomic_write_text, new_dir
from ddpm.imagegrid import enlarge, tile, write_png
from ddpm.outputs import SHARED_KEYS, ShardSpec, first_difference
from ddpm.provenance import package_versions
from ddpm.rundir import RunDir, SampleSet, shard_files, shard_index


def locate(path: str | Path) -> tuple[Path, Path]:
    """(shards directory, the directory of the sample set the outputs go to) for a run dir, a samples dir or a
    shards dir."""
    p = Path(path)
    if not p.is_dir():
        raise ShardError(f"{p}: no such directory (expected a run, samples or shards directory)")
    shards, out = SampleSet.locate(p)
    return shards, out.path


def load_shard_metas(shards_dir: Path, expect_shards: int | None = None) -> list[dict[str, Any]]:
    """The json of every shard 0..K-1, checked for presence, consistency and exact coverage of [0, N)."""
    found = sorted({k for p in shards_dir.iterdir() if (k := shard_index(p.name)) is not None})
    metas: dict[int, dict[str, Any]] = {}
    for k in found:
        jp = shard_files(shards_dir, k).json
        try:
            metas[k] = json.loads(jp.read_text()) if jp.is_file() else {}
        except (OSError, ValueError):
            raise ShardError(f"shard {k}: unreadable {jp}") from None
        if not isinstance(metas[k], dict):
            raise ShardError(f"shard {k}: {jp} is not a shard description")
    declared = {m["num_shards"] for m in metas.values() if "num_shards" in m}
    if expect_shards is None:
        if not declared:
            raise ShardError(f"{shards_dir}: no complete shard (shard_<k>.json) found")
        if len(declared) > 1:
            raise ShardError(f"{shards_dir}: shards disagree on num_shards ({sorted(declared)})")
        expect_shards = declared.pop()
    extra = [k for k in found if k >= expect_shards]
    if extra:
        raise ShardError(f"shard {extra[0]} found but only {expect_shards} expected: "
                         f"{shard_files(shards_dir, extra[0]).json}")
    for k in range(expect_shards):
        files = shard_files(shards_dir, k)
        if not metas.get(k, {}).get("complete") or not files.npz.is_file():
            how = " (only a partial shard)" if files.partial.is_file() else ""
            raise ShardError(f"shard {k} of {expect_shards} missing{how}: {files.npz}")
    out: list[dict[str, Any]] = []
    for k in range(expect_shards):
        jp, meta = shard_files(shards_dir, k).json, metas[k]
        spec = ShardSpec.from_dict(meta, f"shard {k}: {jp}")  # one line naming what the json lacks
        if "count" not in meta:
            raise ShardError(f"shard {k}: {jp} lacks count")
        if spec.shard != k or spec.get("num_shards") != expect_shards:
            raise ShardError(f"shard {k}: {jp} says shard {spec.shard} of {spec.get('num_shards')}")
        differs = first_difference(meta, out[0], SHARED_KEYS) if out else None  # the staleness rule of ddpm.shards
        if differs:
            raise ShardError(f"shard {k} inconsistent with shard 0: {differs} ({jp})")
        out.append(meta)
    _check_coverage(out)
    return out


def _check_coverage(metas: list[dict[str, Any]]) -> None:
    """Ranges [start, stop) sorted by start must tile [0, num_samples) with no gap and no overlap."""
    n, nxt, prev = metas[0]["num_samples"], 0, None
    for m in sorted(metas, key=lambda m: (m["start"], m["shard"])):
        if m["start"] < nxt:
            raise ShardError(f"shard {m['shard']} overlaps shard {prev['shard']}: indices [{m['start']}, "
                             f"{m['stop']}) vs [{prev['start']}, {prev['stop']})")
        if m["start"] > nxt or m["stop"] <= m["start"]:
            raise ShardError(f"shard {m['shard']}: indices [{nxt}, {max(m['start'], nxt + 1)}) are in no shard "
                             f"(it covers [{m['start']}, {m['stop']}))")
        nxt, prev = m["stop"], m
    if nxt != n:
        raise ShardError(f"shard {prev['shard']}: shards end at index {nxt}, expected num_samples {n}")


def _load_arrays(shards_dir: Path, meta: dict[str, Any]) -> tuple[np.ndarray, Any]:
    """(uint8 images [stop-start, H, W, C], FIDStats or None) of one shard, checked."""
    from ddpm.fid import FIDStats

    k, p = meta["shard"], shard_files(shards_dir, meta["shard"]).npz
    try:
        payload = p.read_bytes()  # read once: hashed, then parsed
    except OSError as err:
        raise ShardError(f"shard {k}: unreadable {p} ({type(err).__name__})") from None
    if meta.get("npz_sha256") and hashlib.sha256(payload).hexdigest() != meta["npz_sha256"]:
        raise ShardError(f"shard {k}: {p} does not match the sha256 in its json (modified or truncated)")
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as data:
            images, stats = data["arr_0"], FIDStats.from_arrays(data)
    except (OSError, ValueError, KeyError, EOFError) as err:
        raise ShardError(f"shard {k}: unreadable {p} ({type(err).__name__})") from None
    want = (meta["stop"] - meta["start"], *meta["image_shape"])
    if images.dtype != np.uint8 or images.shape != want:
        raise ShardError(f"shard {k}: {p} holds {images.dtype} {list(images.shape)}, expected uint8 {list(want)}")
    return images, stats


def channel_stats(images: np.ndarray, chunk: int = 1024) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (population) of uint8 images [N, H, W, C], in pixel units [0, 255]."""
    c = images.shape[-1]
    s, s2, count = np.zeros(c), np.zeros(c), 0
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].reshape(-1, c).astype(np.float64)
        s, s2, count = s + x.sum(0), s2 + (x * x).sum(0), count + len(x)
    mean = s / count
    return mean.tolist(), np.sqrt(np.maximum(s2 / count - mean * mean, 0.0)).tolist()


def _reference(metas: list[dict[str, Any]], fid_reference: str | None) -> tuple[Any, str | None]:
    """(reference FIDStats or None, its path), validated before anything is written."""
    from ddpm.fid import FIDStats

    have = [m.get("fid", False) for m in metas]
    path = fid_reference or metas[0].get("fid_reference")
    if path is None:
        return None, None
    if not all(have):
        k = have.index(False)
        if fid_reference is None:  # configured, not asked for: only skip
            print(f"no FID: shard {k} carries no Inception statistics (sample with --fid)", flush=True)
            return None, None
        raise ShardError(f"--fid-reference given but shard {k} carries no Inception statistics "
                         f"(sample with --fid)")
    sigs = [m.get("fid_signature") for m in metas]
    if len(set(sigs)) > 1:
        k = next(i for i, s in enumerate(sigs) if s != sigs[0])
        raise ShardError(f"shard {k}: FID statistics computed with different preprocessing than shard 0 "
                         f"({sigs[k]!r} vs {sigs[0]!r})")
    ref = FIDStats.load(path)
    if ref.signature != metas[0].get("fid_signature"):
        raise ShardError(f"refusing to compare FID statistics computed with different preprocessing: "
                         f"{path} has {ref.signature!r}, shards have {metas[0].get('fid_signature')!r}")
    return ref, str(path)


def _keep_previous(out: SampleSet, digest: str) -> None:
    """Move outputs of a different earlier assembly to ``previous/<time>/`` so nothing is lost."""
    try:
        old = json.loads(out.metrics.read_text()) if out.metrics.is_file() else None
    except (OSError, ValueError):
        old = {}
    if old is None or old.get("shards_sha256") == digest:
        return
    dest = new_dir(out.previous)
    for path in (out.metrics, out.grid, out.path / str(old.get("samples", ""))):
        if path != out.path and path.is_file():
            os.replace(path, dest / path.name)
    print(f"{out.path}: outputs of an earlier, different assembly moved to {dest}", flush=True)


def assemble(path: str | Path, expect_shards: int | None = None, fid_reference: str | None = None,
             grid_size: int = 64) -> Path:
    """Validate the shards under ``path``, write samples npz, grid.png and metrics.json; returns the npz path."""
    from ddpm.fid import fid_from_stats

    shards_dir, out_dir = locate(path)
    out = SampleSet(out_dir)
    metas = load_shard_metas(shards_dir, expect_shards)
    ref, ref_path = _reference(metas, fid_reference)  # before writing anything
    parts = [_load_arrays(shards_dir, m) for m in sorted(metas, key=lambda m: m["start"])]
    images = np.concatenate([imgs for imgs, _ in parts])
    n, h, w, c = images.shape
    digest = hashlib.sha256("".join(m.get("npz_sha256") or "" for m in metas).encode()).hexdigest()
    _keep_previous(out, digest)

    npz_path = out.npz((n, h, w, c))
    atomic_write_bytes(npz_path, lambda f: np.savez(f, arr_0=images))
    write_png(tile(enlarge(images[:grid_size])), out.grid)  # atomic; small images x k
    m0 = metas[0]
    mean, std = channel_stats(images)
    metrics: dict[str, Any] = {
        "num_samples": n, "image_shape": [h, w, c], "samples": npz_path.name, "grid": out.grid.name,
        "checkpoint": m0.get("checkpoint"), "checkpoint_sha256": m0["checkpoint_sha256"], "step": m0.get("step"),
        "checkpoint_choice": m0.get("checkpoint_choice"),
        "sampler": {k: m0[k] for k in ("sampler", "num_steps", "eta", "timestep_spacing")},
        "use_ema": m0["use_ema"], "seed_base": m0["seed_base"], "num_shards": len(metas),
        "channel_mean": mean, "channel_std": std, "pixel_range": [0, 255], "fid": None,
    }
    if ref is not None:
        stats = parts[0][1]
        for _, s in parts[1:]:
            stats = stats.merge(s)  # sufficient statistics add up: FID over all shards, no images moved
        metrics.update(fid=fid_from_stats(stats, ref), fid_reference=ref_path, fid_num_samples=stats.n,
                       fid_reference_num_images=ref.n)
    metrics.update(shards_sha256=digest, versions=package_versions())
    atomic_write_text(out.metrics, json.dumps(metrics, indent=2) + "\n")
    fid_text = f", FID {metrics['fid']:.3f}" if metrics["fid"] is not None else ""
    print(f"assembled {n} samples from {len(metas)} shards -> {npz_path}{fid_text}", flush=True)
    return npz_path


def assemble_stage(run: RunDir, num_shards: int) -> Path:
    """The assembly job of ``run``: its ``num_shards`` shards -> ``samples/``; returns the npz path."""
    apply_cpu_budget(cpu_budget("assemble"))
    return assemble(run.samples.path, num_shards)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm.assemble", description=__doc__.split("\n")[0])
    p.add_argument("dir", help="run directory, its samples/ directory, or samples/shards/")
    p.add_argument("--expect-shards", type=int, default=None, help="default: num_shards recorded in the shards")
    p.add_argument("--fid-reference", default=None, help="npz from `python -m ddpm.fid ref` "
                   "(default: sampling.fid_reference of the checkpoint config)")
    p.add_argument("--grid-size", type=int, default=64)
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.expect_shards is not None and args.expect_shards < 1:
        raise ShardError(f"--expect-shards must be >= 1, got {args.expect_shards}")
    apply_cpu_budget(cpu_budget("assemble"))
    assemble(args.dir, args.expect_shards, args.fid_reference, max(args.grid_size, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

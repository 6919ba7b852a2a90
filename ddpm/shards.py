"""Drawing one shard of a sample set: the work of a sampling task (:mod:`ddpm.sample`) and of an eval task's
seed sets (:mod:`ddpm.evaluate`); not a stage itself, so the two stages share it without importing each other.

Shard k of K covers the global indices ``[start, stop)`` of :func:`ddpm.outputs.shard_range` and image i is
drawn with seed ``seed_base + i``, so the images do not depend on K or on the batch size (docs/design.md).
A shard's files (:func:`ddpm.rundir.shard_files`)::

    shard_<k>.npz           arr_0: uint8 [stop-start, H, W, C]; fid_* statistics with sampling.fid
    shard_<k>.json          its ShardSpec, seeds, checkpoint, versions; written last, complete: true
    shard_<k>.partial.npz   images done so far + the ShardSpec (while running; resumed after a kill)

A complete shard of the same :class:`~ddpm.outputs.ShardSpec` is skipped; one made with another is moved to
``stale/`` (never deleted) and the shard is sampled again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm import tqdm

from ddpm.checkpoint import load_resolved
from ddpm.config import SamplingConfig, task_gpus
from ddpm.data import to_uint8
from ddpm.diffusion import DDPM
from ddpm.envcheck import pick_device
from ddpm.errors import CheckpointError, ConfigError, ShardError
from ddpm.fsio import atomic_write_bytes, atomic_write_text, file_sha256, file_sha256_once, new_dir
from ddpm.outputs import ShardSpec
from ddpm.precision import autocast_dtype, set_fp32_precision
from ddpm.provenance import package_versions
from ddpm.rundir import RunDir, ShardFiles, shard_files, stale_dir
from ddpm.samplers import get_sampler
from ddpm.unet import UNet

if TYPE_CHECKING:
    from ddpm.inception import FIDFeatures


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _load_images(path: Path, count: int | None, image_shape: tuple[int, ...]) -> np.ndarray | None:
    """arr_0 of an npz if it is uint8 [count, H, W, C] (any count when None), else None."""
    try:
        with np.load(path, allow_pickle=False) as data:
            images = data["arr_0"]
    except (OSError, ValueError, KeyError, EOFError):
        return None
    ok = images.dtype == np.uint8 and tuple(images.shape[1:]) == tuple(image_shape)
    return images if ok and (count is None or len(images) == count) else None


def _move_stale(paths: list[Path], reason: str) -> None:
    """Keep a superseded shard under ``stale/<time>/`` instead of overwriting it."""
    dest = new_dir(stale_dir(paths[0].parent))
    for p in paths:
        if p.exists():
            os.replace(p, dest / p.name)
    print(f"{paths[0].parent / paths[0].stem}: {reason}; previous files moved to {dest}", flush=True)


def _existing_complete(files: ShardFiles, spec: ShardSpec,
                       fid: bool) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    """(meta, images) of a complete shard of ``spec``; stale or broken ones are moved aside."""
    if not files.json.is_file():
        return None, None
    try:
        meta = json.loads(files.json.read_text())
    except (OSError, ValueError):
        meta = {}
    if not isinstance(meta, dict) or not meta.get("complete"):
        _move_stale([files.json, files.npz], "incomplete shard json")
        return None, None
    stale = spec.stale_reason(meta)
    if stale:
        _move_stale([files.json, files.npz], f"existing shard made with other settings ({stale})")
        return None, None
    images = _load_images(files.npz, spec.count, spec.image_shape)
    if images is None or (meta.get("npz_sha256") and file_sha256(files.npz) != meta["npz_sha256"]):
        _move_stale([files.json, files.npz], "shard npz missing, unreadable or of the wrong shape")
        return None, None
    if fid and not meta.get("fid"):
        print(f"{files.npz}: complete but without FID statistics; computing them", flush=True)
    return meta, images


def _resume_partial(files: ShardFiles, spec: ShardSpec) -> np.ndarray | None:
    """Images of a partial shard of ``spec``, or None (with a message)."""
    p = files.partial
    if not p.is_file():
        return None
    try:
        with np.load(p, allow_pickle=False) as data:
            saved = json.loads(str(data["settings_json"]))
    except (OSError, ValueError, KeyError, EOFError):
        saved = None
    images = _load_images(p, None, spec.image_shape) if saved is not None else None
    why = spec.stale_reason(saved) if saved is not None else "unreadable file"
    if images is None or why or len(images) > spec.count:
        print(f"{p}: partial shard does not match ({why or 'bad shape'}); restarting from scratch", flush=True)
        return None
    print(f"{p}: resuming after {len(images)} of {spec.count} images", flush=True)
    return images


def _generate(diffusion: Any, images: np.ndarray, spec: ShardSpec, s: SamplingConfig, partial: Path,
              autocast: torch.dtype | None, progress: bool) -> np.ndarray:
    """Sample the images still missing, batch by batch, saving partial progress after each batch.

    ``images`` holds the first n images of the shard (uint8 [n, H, W, C]); returns all of them. ``autocast``:
    the network's autocast dtype (:func:`ddpm.precision.autocast_dtype`; None: fp32).
    """
    start, stop = spec.start, spec.stop
    h, w, c = spec.image_shape
    done = [images]
    n = len(images)
    settings_json = np.array(json.dumps(spec.to_dict(), sort_keys=True))
    batches = range(start + n, stop, s.batch_size)
    for b0 in tqdm(batches, desc=f"shard {spec.shard}", unit="batch", disable=not progress):
        b1 = min(b0 + s.batch_size, stop)
        seeds = [s.seed_base + i for i in range(b0, b1)]  # image i <- seed_base + i
        x = diffusion.sample(b1 - b0, (c, h, w), sampler=s, seeds=seeds, progress=False, autocast_dtype=autocast)
        done.append(to_uint8(x))
        payload = _npz_bytes(arr_0=np.concatenate(done), settings_json=settings_json)
        atomic_write_bytes(partial, lambda f, data=payload: f.write(data))
    return np.concatenate(done)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ShardError(message)


def default_out_dir(checkpoint: Path) -> Path:
    """``<run>/samples/shards`` for ``<run>/checkpoints/step_N.pt``."""
    run = RunDir.of_checkpoint(checkpoint)
    if run is None:
        raise ShardError(f"--out is required: {checkpoint} is not inside a run's checkpoints/ directory")
    return run.samples.shards


def build_from_checkpoint(state: dict[str, Any], use_ema: bool = True,
                          device: str | torch.device = "cpu") -> tuple[torch.nn.Module, DDPM]:
    """Rebuild (UNet, DDPM) from a checkpoint alone; EMA weights unless ``use_ema`` is False."""
    model = UNet(**state["model_config"])
    weights = state["ema"]["shadow"] if use_ema and state.get("ema") else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint weights do not match its model_config ({err})") from None
    model.to(device).eval()
    return model, DDPM(model, **state["ddpm"])


def compiled_for_sampling(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """``torch.compile`` for one fixed shape; on CUDA mode reduce-overhead: CUDA graphs replayed step after step."""
    mode = "reduce-overhead" if torch.device(device).type == "cuda" else "default"
    return torch.compile(model, mode=mode, dynamic=False)


def checkpoint_sampling(state: dict[str, Any]) -> SamplingConfig:
    """The ``sampling`` section the checkpoint was trained with (keys added since then take defaults)."""
    known = {f.name for f in dataclasses.fields(SamplingConfig)}
    return SamplingConfig(**{k: v for k, v in state["config"]["sampling"].items() if k in known})


def sample_shard(checkpoint: str | Path | RunDir, out_dir: str | Path | None, shard: int | None,
                 sampling: SamplingConfig, device: str | None = None, progress: bool = True,
                 choice: str | None = None) -> Path:
    """Generate (or finish, or skip) shard ``shard`` of ``sampling.num_shards``; returns ``shard_<k>.npz``.

    ``checkpoint`` is a file or a run directory (its newest valid checkpoint; a :class:`RunDir` or its path);
    ``out_dir`` None is ``<run>/samples/shards``; ``shard`` None is ``$SLURM_ARRAY_TASK_ID`` (or 0 when there is
    one shard). ``sampling`` is valid by construction; what depends on the checkpoint (its T) is checked here. Bad
    input raises ShardError, ConfigError, CheckpointError or FIDError before any sampling. ``choice`` says why this
    checkpoint (``sampling.checkpoint``'s reading, for metrics.json).
    """
    ckpt, state = load_resolved(checkpoint, map_location="cpu")
    return sample_loaded(ckpt, state, out_dir, shard, sampling, device, progress, choice)


def sample_loaded(ckpt: Path, state: dict[str, Any], out_dir: str | Path | None, shard: int | None,
                  s: SamplingConfig, device: str | None, progress: bool = True, choice: str | None = None,
                  tf32: bool | None = None, checkpoint_sha256: str | None = None,
                  inception_loader: Callable[[str | None, str], FIDFeatures] | None = None) -> Path:
    """:func:`sample_shard` for a checkpoint already loaded (``state`` read from ``ckpt``); TF32 matmuls and
    convolutions when ``tf32`` (None: the checkpoint's ``infrastructure.tf32``, true when it has none).

    A caller that draws several shards from one checkpoint (the eval stage's seed sets) shares the work that is
    the same for all of them: ``checkpoint_sha256`` is the sha256 of ``ckpt`` (None: hashed here, once per
    process and file, :func:`~ddpm.fsio.file_sha256_once`); with ``s.fid``, ``inception_loader(s.fid_weights,
    device)`` gives the FID Inception (None: :func:`ddpm.inception.load_inception`; a memoised one loads it
    once for all the shards, still here: before any sampling, and never when FID is off).
    """
    shard = _shard_index(shard, s)
    _check_steps(state, s)
    if s.use_ema and not state.get("ema"):
        print(f"{ckpt}: no EMA weights in the checkpoint; using the raw model weights", flush=True)
        s = dataclasses.replace(s, use_ema=False)
    device = checkpoint_device(state, device)
    autocast = autocast_dtype(s.precision, device, "sampling.precision")  # fp16 off CUDA, bf16 without it: one line
    set_fp32_precision(state["config"].get("infrastructure", {}).get("tf32", True) if tf32 is None else tf32)
    out = Path(out_dir) if out_dir is not None else default_out_dir(ckpt)
    mc = state["model_config"]
    size = mc.get("image_size", state["config"]["data"]["image_size"])
    sha = checkpoint_sha256 if checkpoint_sha256 is not None else file_sha256_once(ckpt)
    spec = ShardSpec.of(sha, (size, size, mc["in_channels"]), s, shard)
    inception = None
    if s.fid:  # fail on missing/mismatched Inception weights before any sampling
        from ddpm.inception import load_inception

        inception = (inception_loader or load_inception)(s.fid_weights, device)

    files = shard_files(out, shard)
    meta, images = _existing_complete(files, spec, s.fid)
    if meta is not None and (not s.fid or meta.get("fid")):
        print(f"shard {shard} of {s.num_shards} already complete: {files.npz} (skipping)", flush=True)
        return files.npz
    if images is None:
        images = _resume_partial(files, spec)
    if images is None:
        images = np.zeros((0, size, size, mc["in_channels"]), dtype=np.uint8)
    n_before, t0 = len(images), time.perf_counter()
    if n_before < spec.stop - spec.start:
        model, diffusion = build_from_checkpoint(state, use_ema=s.use_ema, device=device)
        if s.compile:  # one graph for [batch_size, C, H, W]; a smaller last batch of the shard compiles another
            diffusion.model = compiled_for_sampling(model, device)
        with torch.no_grad():
            images = _generate(diffusion, images, spec, s, files.partial, autocast, progress)
        del model, diffusion
    elapsed = time.perf_counter() - t0
    rate = (len(images) - n_before) / max(elapsed, 1e-9) if len(images) > n_before else None
    _write_shard(files, images, spec, s, inception, state, {
        "checkpoint_choice": choice or "the checkpoint given", "checkpoint": str(ckpt.resolve()),
        "step": int(state["step"]), "device": str(device), "images_per_second": rate})
    if rate is not None:
        print(f"shard {shard}: {len(images) - n_before} images in {elapsed:.1f}s ({rate:.2f} images/s) "
              f"-> {files.npz}", flush=True)
    return files.npz


def _shard_index(shard: int | None, s: SamplingConfig) -> int:
    """The shard to draw: ``shard``, else the SLURM array task's index, else 0 when there is one shard."""
    if shard is None and os.environ.get("SLURM_ARRAY_TASK_ID", "").isdigit():
        shard = int(os.environ["SLURM_ARRAY_TASK_ID"])
    if shard is None:
        _check(s.num_shards == 1, "--shard not given and SLURM_ARRAY_TASK_ID is not set")
        shard = 0
    _check(0 <= shard < s.num_shards,
           f"shard {shard} out of range: sampling.num_shards is {s.num_shards} (shards 0..{s.num_shards - 1})")
    return shard


def _check_steps(state: dict[str, Any], s: SamplingConfig) -> None:
    """``s.num_steps`` within the sampler's own limit for the checkpoint's ``ddpm.num_timesteps``; one line."""
    T = state["ddpm"]["num_timesteps"]
    most, why = get_sampler(s.sampler).most_steps(T, s.timestep_spacing)
    if s.num_steps > most:
        limit = f", {T}" if why is None else f" - {T - most}, {most}, for {s.sampler} {why}"
        raise ConfigError(f"sampling.num_steps: invalid value {s.num_steps} (expected at most the checkpoint's "
                          f"ddpm.num_timesteps{limit})")


def _write_shard(files: ShardFiles, images: np.ndarray, spec: ShardSpec, s: SamplingConfig,
                 inception: FIDFeatures | None, state: dict[str, Any], extra: dict[str, Any]) -> None:
    """The shard's npz (uint8 [N, H, W, C] and, with ``inception``, its Inception statistics), then its json,
    which marks it complete; the partial file goes."""
    arrays: dict[str, np.ndarray] = {"arr_0": images}
    fid_signature = None
    if inception is not None:
        from ddpm import fid as fidlib
        from ddpm.inception import inception_features

        fid_signature = fidlib.stats_signature(state["config"]["data"])
        stats = fidlib.FIDStats(signature=fid_signature, device=torch.device(extra["device"]).type)
        stats.update(inception_features(inception, images))
        arrays.update(stats.to_arrays())
    payload = _npz_bytes(**arrays)
    atomic_write_bytes(files.npz, lambda f: f.write(payload))
    meta = {**dataclasses.asdict(s), **spec.to_dict(), "complete": True, "count": spec.count, **extra,
            "seeds": {"seed_base": s.seed_base, "first": s.seed_base + spec.start, "last": s.seed_base + spec.stop - 1},
            "fid_signature": fid_signature, "npz_sha256": hashlib.sha256(payload).hexdigest(),
            "versions": package_versions()}
    atomic_write_text(files.json, json.dumps(meta, indent=2) + "\n")  # the json marks completion: last
    files.partial.unlink(missing_ok=True)


def checkpoint_device(state: dict[str, Any], device: str | None) -> str:
    """``device`` (cpu or cuda), or the device the checkpoint's config asks for (:attr:`Config.task_gpus`);
    one line when it asks for a GPU this process does not see. Never cuda-when-available."""
    cfg = state["config"]
    gpus, key = task_gpus(cfg.get("slurm", {}).get("sample_gpus"), cfg.get("infrastructure", {}).get("num_gpus", 0))
    return pick_device(device, gpus, "sampling", f"{key} (the checkpoint's config; --device cpu to sample on the CPU)")



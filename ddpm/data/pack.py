"""``python -m ddpm.data``: pack a source into one memory-mapped file, and benchmark the sources.

    python -m ddpm.data pack --config configs/ddpm_babel.yaml --out /data/celeba64_train.npy
    python -m ddpm.data bench --config configs/ddpm_babel.yaml [data.num_workers=7] [--seconds 10]

``pack`` decodes, crops and resizes every image of the configured source once (on every allocated CPU, ddpm.cpus)
into a ``.npy`` np.uint8 [N, S, S, 3] file plus its ``<file>.json`` sidecar; training then only flips
and normalizes (``data.source=packed data.path=<file>``). Both files are written to temporary names and
renamed, and an existing ``--out`` is never replaced without ``--force``. ``bench`` prints the
images/second the loader delivers from the configured source and from a packed copy of (at most
``--max-images`` of) it made in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ddpm.config import DataConfig, load_config
from ddpm.configtools import parse_with_overrides
from ddpm.cpus import allocated_cpus
from ddpm.data.base import ImageSource
from ddpm.data.sources import PACKED_FORMAT, build_source, preprocess_signature, sidecar_path
from ddpm.errors import DataError, cli_entry
from ddpm.fsio import atomic_write_text

_CHUNK = 64
_WORKER_SOURCE: ImageSource | None = None


def _init_worker(source: ImageSource) -> None:
    global _WORKER_SOURCE
    _WORKER_SOURCE = source


def _decode_chunk(start: int, stop: int, source: ImageSource | None = None) -> tuple[int, np.ndarray, list[str]]:
    """Images [start, stop) as np.uint8 [k, S, S, 3]; unreadable ones stay zero and are reported."""
    source = source or _WORKER_SOURCE
    assert source is not None
    out = np.zeros((stop - start, source.image_size, source.image_size, 3), dtype=np.uint8)
    bad = []
    for i in range(start, stop):
        try:
            out[i - start] = source.decode(i)
        except DataError as err:
            if not source.skip_bad_images:
                raise
            bad.append(f"{i}\t{err}")
    return start, out, bad


def _decoded_chunks(source: ImageSource, n: int, processes: int) -> Iterator[tuple[int, np.ndarray, list[str]]]:
    chunk = max(1, min(_CHUNK, -(-n // (4 * max(processes, 1)))))  # small data: still every process
    spans = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    if processes <= 1 or len(spans) == 1:
        for start, stop in spans:
            yield _decode_chunk(start, stop, source)
        return
    # ProcessPoolExecutor, not multiprocessing.Pool: a worker that dies (a signal, the OOM killer) breaks the
    # pool with an error instead of leaving the parent waiting for its chunk forever
    with ProcessPoolExecutor(min(processes, len(spans)), mp_context=get_context("fork"),
                             initializer=_init_worker, initargs=(source,)) as pool:
        try:
            yield from (f.result() for f in as_completed([pool.submit(_decode_chunk, *s) for s in spans]))
        except BrokenProcessPool:
            raise DataError("pack: a worker process died (killed by a signal or out of memory); nothing was "
                            "written: run the command again") from None


def _atomic_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")


def pack_dataset(cfg: DataConfig, out: str | Path, processes: int | None = None, force: bool = False,
                 limit: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Write the preprocessed images of ``cfg`` to ``out`` (.npy uint8 [N, S, S, 3]) + sidecar; its meta."""
    out = Path(out)
    if cfg.source == "packed":
        raise DataError("data.source: already packed (pack reads a folder, celeba or hf source)")
    if out.exists() and not force:
        raise DataError(f"--out: {out} exists (pass --force to replace it)")
    source = build_source(cfg)
    n = len(source) if limit is None else min(limit, len(source))
    size = source.image_size
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    good = np.ones(n, dtype=bool)
    bad_lines: list[str] = []
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        bar = tqdm(total=n, desc=f"pack {cfg.source}", unit="img", disable=not progress, mininterval=2.0)
        for start, pixels, bad in _decoded_chunks(source, n, processes or allocated_cpus()[0]):
            array[start:start + len(pixels)] = pixels
            for line in bad:
                good[int(line.split("\t", 1)[0])] = False
            bad_lines += bad
            bar.update(len(pixels))
        bar.close()
        array.flush()
        if bad_lines:  # rare: compact the readable images into a second file
            warnings.warn(f"data: skipped {len(bad_lines)} unreadable image(s) of {n} "
                          f"(first: {bad_lines[0].split(chr(9), 1)[1]})", stacklevel=2)
            if not good.any():
                raise DataError(f"data.path: no readable images in {source.where}")
            kept = np.lib.format.open_memmap(f"{tmp}.kept", mode="w+", dtype=np.uint8,
                                             shape=(int(good.sum()), size, size, 3))
            kept_rows = np.flatnonzero(good)
            for s in range(0, len(kept_rows), 4096):  # chunked: the array may not fit in memory
                kept[s:s + 4096] = array[kept_rows[s:s + 4096]]
            kept.flush()
            del kept
            os.replace(f"{tmp}.kept", tmp)
        del array
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        meta = {"format": PACKED_FORMAT, "image_size": size, "center_crop": cfg.center_crop,
                "crop_center": cfg.crop_center, "source": cfg.source, "split": cfg.split, "origin": source.where,
                "count": int(good.sum()), "skipped": len(bad_lines), "preprocess": preprocess_signature(cfg)}
        _atomic_json(sidecar_path(out), meta)
        os.replace(tmp, out)
    finally:
        for leftover in (tmp, Path(f"{tmp}.kept")):
            leftover.unlink(missing_ok=True)
    return meta


def measure(cfg: DataConfig, seconds: float, batch_size: int, device: str) -> tuple[float, int, float]:
    """Images/second the loader of ``cfg`` delivers to ``device``: (rate, batches, elapsed seconds)."""
    import torch

    from ddpm.data.loader import create_dataloader_from_config

    dev = torch.device(device)
    loader = create_dataloader_from_config(cfg, batch_size, device=dev)
    next(loader).to(dev)  # start-up (workers, first decode) is not throughput
    batches, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < seconds:
        x = next(loader).to(dev, non_blocking=True)
        batches += 1
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elapsed = time.perf_counter() - begin
    loader.close()
    del x
    return batches * batch_size / elapsed, batches, elapsed


def bench(cfg: DataConfig, seconds: float = 5.0, batch_size: int = 64, device: str = "cpu",
          max_images: int = 20000, out: Any = None) -> dict[str, float]:
    """Print and return images/second per source: the configured one and a packed copy of it."""
    from ddpm.data.loader import default_num_workers

    workers = default_num_workers(cfg.num_workers, source=cfg.source)
    print(f"bench: data.source={cfg.source} data.path={cfg.path} image_size={cfg.image_size} "
          f"batch={batch_size} workers={workers} device={device} ({allocated_cpus()[0]} CPUs)", file=out)
    rates = {}
    rate, batches, elapsed = measure(cfg, seconds, batch_size, device)
    rates[cfg.source] = rate
    print(f"  {cfg.source:<8} {rate:10.1f} images/s  ({batches} batches in {elapsed:.1f} s)", file=out)
    if cfg.source != "packed":
        with tempfile.TemporaryDirectory(prefix="ddpm-bench-") as tmp:
            path = Path(tmp) / "packed.npy"
            begin = time.perf_counter()
            meta = pack_dataset(cfg, path, limit=max_images, progress=False)
            took = time.perf_counter() - begin
            packed = DataConfig(**{**vars(cfg), "source": "packed", "path": str(path)})
            rate, batches, elapsed = measure(packed, seconds, batch_size, device)
            rates["packed"] = rate
            print(f"  {'packed':<8} {rate:10.1f} images/s  ({batches} batches in {elapsed:.1f} s; "
                  f"copy of {meta['count']} images packed in {took:.1f} s)", file=out)
    return rates


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ddpm.data",
        description="Pack a data source into one memory-mapped uint8 file, or benchmark the sources.")
    sub = parser.add_subparsers(dest="command", required=True)
    pack = sub.add_parser("pack", help="decode, crop and resize once into a memory-mapped uint8 file")
    bench_p = sub.add_parser("bench", help="images/second per source on this machine")
    for p in (pack, bench_p):
        p.add_argument("--config", required=True, help="YAML config whose data section names the images")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.path=/x")
    pack.add_argument("--out", required=True, help="output .npy file (a <file>.json sidecar goes beside it)")
    pack.add_argument("--force", action="store_true", help="replace an existing --out")
    pack.add_argument("--processes", type=int, default=None, help="decoding processes (default: all CPUs)")
    bench_p.add_argument("--seconds", type=float, default=5.0, help="measuring time per source")
    bench_p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    bench_p.add_argument("--max-images", type=int, default=20000, help="images in the packed copy")
    bench_p.add_argument("--device", default=None, help="where batches are delivered (default: cuda if any)")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_with_overrides(_parser(), argv)
    cfg = load_config(args.config, args.overrides).data
    if args.command == "pack":
        meta = pack_dataset(cfg, args.out, processes=args.processes, force=args.force)
        print(f"packed {meta['count']} images ({meta['image_size']}x{meta['image_size']}, "
              f"{meta['preprocess']}) -> {args.out}")
        return 0
    if args.batch_size < 1 or args.seconds <= 0:
        raise DataError("--batch-size and --seconds must be positive")
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    bench(cfg, args.seconds, args.batch_size, device, args.max_images)
    return 0


if __name__ == "__main__":
    sys.exit(main())

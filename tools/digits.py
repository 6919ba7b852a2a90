"""``python -m tools.digits --out DIR [--size 32]``: the quickstart's real images, offline.

Exports scikit-learn's bundled handwritten digits (1797 images of 8x8 pixels, 17 grey levels, no
download) as PNG files ``DIR/<label>/<index>.png``: white digits on black, upscaled to ``--size`` pixels
with PIL BICUBIC (smooth strokes rather than 8x8 blocks). A ``DIR/.complete`` marker records the export;
running again with the same size does nothing, and an interrupted export is simply redone. Read them
with ``data.source=folder data.path=DIR data.center_crop=null``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ddpm.errors import DataError, cli_entry

MARKER = ".complete"


def _digits_csv() -> Path:
    """scikit-learn's copy of the UCI digits (``sklearn/datasets/data/digits.csv.gz``, what ``load_digits``
    reads), found without importing scikit-learn (its import takes seconds)."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.is_file():
        raise DataError("scikit-learn's digits (sklearn/datasets/data/digits.csv.gz) not found: pip install "
                        "scikit-learn (it is in this project's dependencies)")
    return path


def digit_images(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(images np.uint8 [1797, size, size], white on black; labels np.int64 [1797])."""
    table = np.loadtxt(_digits_csv(), delimiter=",", dtype=np.float64)  # [1797, 65]: 8x8 pixels, then the label
    raw = table[:, :64].reshape(-1, 8, 8)  # in 0..16, 16 = ink
    small = np.round(raw * (255.0 / 16.0)).astype(np.uint8)
    out = np.empty((len(small), size, size), dtype=np.uint8)
    for i, im in enumerate(small):
        out[i] = np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC))
    return out, table[:, 64].astype(np.int64)


def _is_complete(out: Path, size: int, count: int) -> bool:
    marker = out / MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    if meta.get("size") != size or meta.get("count") != count:
        return False
    return sum(1 for _ in out.glob("*/*.png")) >= count


def export_digits(out: str | Path, size: int = 32) -> tuple[int, bool]:
    """Write the digits under ``out``; returns (image count, whether anything was written)."""
    out = Path(out)
    if size < 8:
        raise DataError(f"--size: {size} is smaller than the digits' 8 pixels")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out: {out} exists and is not a folder")
    images, labels = digit_images(size)
    if _is_complete(out, size, len(images)):
        return len(images), False
    (out / MARKER).unlink(missing_ok=True)
    for label in range(10):
        (out / str(label)).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = out / str(label) / f"{i:04d}.png"
        tmp = path.with_name(f".{path.name}.tmp")
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, path)
    (out / MARKER).write_text(json.dumps({"count": len(images), "size": size}) + "\n")
    return len(images), True


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.digits",
        description="Export scikit-learn's 1797 handwritten digits as PNG files (the quickstart data).")
    parser.add_argument("--out", required=True, help="folder to write <label>/<index>.png into")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    args = parser.parse_args(argv)
    count, wrote = export_digits(args.out, args.size)
    state = "wrote" if wrote else "already complete:"
    print(f"digits: {state} {count} images of {args.size}x{args.size} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

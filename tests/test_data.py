"""Data: every source on small fixtures, preprocessing, image helpers, bad input, and the CLI.

The loader's order, sharding and resume contract is tested in tests/test_data_loader.py.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, run_main
from PIL import Image

from ddpm.config import DataConfig
from ddpm.data import (
    create_dataloader_from_config,
    default_num_workers,
    make_grid,
    normalize,
    save_image,
    to_uint8,
    unnormalize,
)
from ddpm.data import pack as pack_mod
from ddpm.data.base import preprocess
from ddpm.data.pack import pack_dataset
from ddpm.data.sources import build_source, preprocess_signature, sidecar_path
from ddpm.errors import DataError
from ddpm.imagegrid import enlarge_factor
from tools.digits import digit_images, export_digits
from tools.digits import main as digits_main

SIZES = [(20, 30), (40, 24), (33, 33), (17, 50), (64, 48), (25, 25), (30, 20), (48, 64), (21, 37)]


def _image(i: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """9 images: PNG and JPEG, mixed sizes and modes, one subfolder; plus files to be ignored."""
    root = tmp_path_factory.mktemp("folder")
    (root / "sub").mkdir()
    (root / ".hidden").mkdir()
    for i, size in enumerate(SIZES):
        im = _image(i, size)
        if i == 3:
            im = im.convert("L")
        if i == 4:
            im = im.convert("RGBA")
        if i == 6:
            im = im.convert("P")
        name = f"sub/img{i}.jpeg" if i == 7 else f"img{i}.{'jpg' if i % 2 else 'png'}"
        im.save(root / name)
    (root / "notes.txt").write_text("not an image")
    _image(99, (8, 8)).save(root / ".hidden" / "x.png")
    return root


def _cfg(**kw: object) -> DataConfig:
    base = {"source": "folder", "image_size": 16, "center_crop": None, "num_workers": 0}
    return DataConfig(**{**base, **kw})  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- preprocessing + helpers


def test_preprocess_centre_crop_then_resize() -> None:
    ramp = np.tile(np.arange(178, dtype=np.uint8), (218, 1))  # pixel value = x
    im = Image.fromarray(np.stack([ramp] * 3, axis=-1))
    crop = preprocess(im, 140, 140)  # aligned CelebA: the 140 box at (19, 39)
    assert crop.shape == (140, 140, 3) and crop.dtype == np.uint8
    assert crop[0, 0, 0] == 19 and crop[0, -1, 0] == 19 + 139
    small = preprocess(im, 16, 140)
    assert small.shape == (16, 16, 3) and 19 <= small[5, 0, 0] < small[5, -1, 0] <= 159
    assert preprocess(im.convert("L"), 8, None).shape == (8, 8, 3)
    assert preprocess(im, 8, 1000).shape == (8, 8, 3)  # crop clamped to the shorter side
    sigs = {preprocess_signature(DataConfig(image_size=s, center_crop=c)) for s in (32, 64) for c in (None, 140)}
    assert len(sigs) == 4 and all("bicubic" in s for s in sigs)


def test_crop_box_centred_at_a_point(tmp_path: Path) -> None:
    """The DDIM/StyleGAN protocol: the 128 box centred at (89, 121) of aligned CelebA = (25, 57, 153, 185)."""
    xs, ys = np.meshgrid(np.arange(178), np.arange(218))
    coords = np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8)  # R = x, G = y
    box = preprocess(Image.fromarray(coords), 128, 128, [89, 121])
    assert box[0, 0, :2].tolist() == [25, 57] and box[-1, -1, :2].tolist() == [152, 184]
    edge = preprocess(Image.fromarray(coords), 128, 128, [170, 5])  # would cross the top-right corner
    assert edge[0, 0, :2].tolist() == [50, 0] and edge[-1, -1, :2].tolist() == [177, 127]
    (tmp_path / "img").mkdir()
    Image.fromarray(coords).save(tmp_path / "img" / "a.png")
    cfg = DataConfig(source="folder", path=str(tmp_path / "img"), image_size=128, center_crop=128,
                     crop_center=[89, 121])
    assert np.array_equal(build_source(cfg)[0], box)
    centre = DataConfig(source="folder", path=str(tmp_path / "img"), image_size=128, center_crop=128)
    assert build_source(centre)[0][0, 0, :2].tolist() == [25, 45]  # round((178-128)/2), round((218-128)/2)
    assert preprocess_signature(cfg) != preprocess_signature(centre)
    assert "crop=box128@89,121" in preprocess_signature(cfg)


def test_normalize_to_uint8_grid_and_save(tmp_path: Path) -> None:
    x = torch.rand(5, 3, 8, 8)
    assert torch.allclose(unnormalize(normalize(x)), x, atol=1e-6)
    assert unnormalize(torch.tensor([-3.0, 3.0])).tolist() == [0.0, 1.0]
    pixels = torch.arange(256, dtype=torch.float32).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert (to_uint8(pixels / 127.5 - 1.0)[0, ..., 0] == np.arange(256).reshape(16, 16)).all()
    assert to_uint8(torch.full((1, 3, 1, 1), 127.6 / 127.5 - 1.0))[0, 0, 0, 0] == 128  # rounds
    assert to_uint8(torch.zeros(3, 4, 5)).shape == (4, 5, 3)
    grid = make_grid(normalize(x))
    assert grid.shape == (3, 2 * 10 + 2, 3 * 10 + 2)  # ceil(sqrt(5)) = 3 a row, 2 rows, padding 2
    assert torch.equal(grid[:, 2:10, 12:20], normalize(x)[1])
    assert make_grid(normalize(x), nrow=5).shape == (3, 12, 52)
    half = make_grid(normalize(x).bfloat16())  # bf16 samples (autocast) keep their dtype, as torch tensors do
    assert half.dtype == torch.bfloat16 and torch.equal(half.float(), make_grid(normalize(x).bfloat16().float()))
    path = save_image(normalize(x), tmp_path / "g" / "grid.png")
    assert Image.open(path).size == (3 * 34 + 2, 2 * 34 + 2)  # 8 px enlarged x4 (whole pixels) to 32, padding 2
    cell = np.asarray(Image.open(path))[2:34, 36:68]  # image 1, each pixel a 4x4 block
    assert np.array_equal(cell, to_uint8(normalize(x))[1].repeat(4, axis=0).repeat(4, axis=1))
    assert [enlarge_factor(s) for s in (8, 10, 16, 32, 64)] == [4, 4, 2, 1, 1]  # 64x64 CelebA grids unchanged
    save_image(normalize(x[0]), tmp_path / "one.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one.png")), to_uint8(normalize(x[0])))


def test_default_num_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """null = the CPU budget's workers (tests/test_cpus.py covers the policy); a configured count is kept."""
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")  # one CPU: nothing to spare for a worker
    assert default_num_workers(None) == 0 and default_num_workers(3) == 3 and default_num_workers(0) == 0
    assert default_num_workers(None, "cuda") == 0
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    assert default_num_workers(None) == 1 and default_num_workers(None, source="packed") == 0  # CPU: decode only
    assert default_num_workers(1, source="packed") == 1


# ---------------------------------------------------------------------------- sources


def test_folder_source(folder: Path) -> None:
    source = build_source(_cfg(path=str(folder)))
    assert len(source) == len(SIZES)
    assert source.keys == sorted(source.keys) and source.keys[-1].endswith("sub/img7.jpeg")
    for i in range(len(source)):
        assert source[i].shape == (16, 16, 3) and source[i].dtype == np.uint8
    with Image.open(folder / "img1.jpg") as im:
        assert np.array_equal(source[1], preprocess(im, 16, None))
    loader = create_dataloader_from_config(_cfg(path=str(folder)), batch_size=4)
    x = next(loader)
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    assert -1.0 <= x.min() < 0 < x.max() <= 1.0
    assert len(loader.dataset) == len(SIZES) and loader.batches_per_epoch == 2


def _celeba(root: Path) -> Path:
    """A fake torchvision CelebA layout under root/celeba: 10 images, partitions 6 / 2 / 2."""
    base = root / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    lines = []
    for i in range(10):
        name = f"{i + 1:06d}.jpg"
        _image(i, (178, 218)).save(base / "img_align_celeba" / name)
        lines.append(f"{name} {0 if i < 6 else 1 if i < 8 else 2}")
    (base / "list_eval_partition.txt").write_text("\n".join(reversed(lines)) + "\n")
    return base


def test_celeba_source_splits(tmp_path: Path) -> None:
    base = _celeba(tmp_path)
    counts = {s: len(build_source(_cfg(source="celeba", path=str(base), split=s)))
              for s in ("train", "valid", "test", "all")}
    assert counts == {"train": 6, "valid": 2, "test": 2, "all": 10}
    test = build_source(_cfg(source="celeba", path=str(tmp_path), split="test", center_crop=140))
    assert [Path(k).name for k in test.keys] == ["000009.jpg", "000010.jpg"]  # torchvision root works
    with Image.open(base / "img_align_celeba" / "000009.jpg") as im:
        assert np.array_equal(test[0], preprocess(im, 16, 140))
    with pytest.raises(DataError, match=r"data.split: unknown split 'dev'.*train, valid, test, all"):
        build_source(_cfg(source="celeba", path=str(base), split="dev"))
    with pytest.raises(DataError, match="img_align_celeba"):
        build_source(_cfg(source="celeba", path=str(base / "img_align_celeba")))
    (base / "list_eval_partition.txt").unlink()
    with pytest.raises(DataError, match="list_eval_partition.txt: not found"):
        build_source(_cfg(source="celeba", path=str(base)))
    assert len(build_source(_cfg(source="celeba", path=str(base), split="all"))) == 10


@pytest.fixture(scope="module")
def hf_copies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small dataset (train 6, test 3) as save_to_disk Dataset / DatasetDict, parquet and arrow."""
    import datasets

    root = tmp_path_factory.mktemp("hf")
    datasets.config.HF_DATASETS_CACHE = root / "cache"  # parquet is converted into the cache
    datasets.disable_progress_bars()

    def make(idx: range) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"img": [_image(i, SIZES[i]) for i in idx], "label": list(idx)})

    train, test = make(range(6)), make(range(6, 9))
    train.save_to_disk(str(root / "disk_ds"))
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(root / "disk_dict"))
    (root / "pq" / "data").mkdir(parents=True)
    train.to_parquet(str(root / "pq" / "data" / "train-00000-of-00001.parquet"))
    test.to_parquet(str(root / "pq" / "data" / "test-00000-of-00001.parquet"))
    (root / "arrow").mkdir()
    shutil.copy(next((root / "disk_dict" / "test").glob("*.arrow")), root / "arrow" / "test-0.arrow")
    return {"ds": root / "disk_ds", "dict": root / "disk_dict", "pq": root / "pq", "arrow": root / "arrow",
            "pqfile": root / "pq" / "data" / "test-00000-of-00001.parquet"}


@pytest.mark.parametrize(("kind", "split", "count"), [
    ("ds", "train", 6), ("dict", "train", 6), ("dict", "test", 3), ("dict", "all", 9),
    ("pq", "train", 6), ("pq", "test", 3), ("pqfile", "test", 3), ("arrow", "test", 3)])
def test_hf_local_copies(hf_copies: dict[str, Path], kind: str, split: str, count: int) -> None:
    source = build_source(_cfg(source="hf", path=str(hf_copies[kind]), split=split, image_column="img"))
    assert len(source) == count
    first = 6 if split == "test" else 0
    assert np.array_equal(source[0], preprocess(_image(first, SIZES[first]), 16, None))
    assert source.get_batch([count - 1, 0]).shape == (2, 16, 16, 3)


def test_hf_errors(hf_copies: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match=r"column 'image' not found.*\(available: img, label\)"):
        build_source(_cfg(source="hf", path=str(hf_copies["dict"])))
    with pytest.raises(DataError, match=r"unknown split 'valid'.*\(valid: train, test, all\)"):
        build_source(_cfg(source="hf", path=str(hf_copies["pq"]), split="valid", image_column="img"))
    import datasets

    def fake_hub(name: str) -> datasets.DatasetDict:  # the hub route, offline
        assert name == "someone/faces"
        return datasets.load_from_disk(str(hf_copies["dict"]))

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    hub = build_source(_cfg(source="hf", hf_name="someone/faces", split="test", image_column="img"))
    assert len(hub) == 3 and "hub dataset someone/faces" in hub.where
    with pytest.raises(DataError, match=r"data.path: not set \(source hf"):
        build_source(_cfg(source="hf"))
    with pytest.raises(DataError, match="no save_to_disk dataset, .parquet or .arrow"):
        build_source(_cfg(source="hf", path=str(tmp_path)))


def test_pack_matches_source_and_validates(folder: Path, tmp_path: Path) -> None:
    cfg = _cfg(path=str(folder))
    out = tmp_path / "p.npy"
    meta = pack_dataset(cfg, out, processes=2, progress=False)
    assert meta["count"] == len(SIZES) and meta["preprocess"] == preprocess_signature(cfg)
    assert json.loads(sidecar_path(out).read_text())["image_size"] == 16
    packed_cfg = _cfg(source="packed", path=str(out))
    packed, source = build_source(packed_cfg), build_source(cfg)
    assert len(packed) == len(source)
    assert np.array_equal(packed.get_batch([4, 0, 8]), source.get_batch([4, 0, 8]))
    assert preprocess_signature(packed_cfg) == preprocess_signature(cfg)
    a = create_dataloader_from_config(cfg, 4, seed=3)
    b = create_dataloader_from_config(packed_cfg, 4, seed=3)
    for _ in range(3):
        assert torch.equal(next(a), next(b))  # same images, order and flips as the source itself
    with pytest.raises(DataError, match="exists"):
        pack_dataset(cfg, out, progress=False)
    with pytest.raises(DataError, match=r"data.image_size: 32 but .*16x16"):
        build_source(_cfg(source="packed", path=str(out), image_size=32))
    sidecar_path(out).unlink()
    with pytest.raises(DataError, match="sidecar not found"):
        build_source(packed_cfg)


# ---------------------------------------------------------------------------- bad input


def test_missing_and_empty_paths(tmp_path: Path) -> None:
    for source in ("folder", "celeba", "hf", "packed"):
        with pytest.raises(DataError, match=f"data.path: {tmp_path / 'nope'} does not exist"):
            build_source(_cfg(source=source, path=str(tmp_path / "nope")))
    for source in ("folder", "celeba", "packed"):
        with pytest.raises(DataError, match="data.path: not set"):
            build_source(_cfg(source=source))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images \(.jpg, .jpeg, .png, .webp\) under"):
        build_source(_cfg(path=str(tmp_path / "empty")))


def test_unreadable_image_named_or_skipped(folder: Path, tmp_path: Path) -> None:
    root = tmp_path / "bad"
    shutil.copytree(folder, root)
    (root / "img2.png").write_bytes(b"\x89PNG not really")
    cfg = _cfg(path=str(root))
    source = build_source(cfg)
    with pytest.raises(DataError, match=r"unreadable image .*img2.png .*skip_bad_images"):
        source[2]
    loader = create_dataloader_from_config(cfg, len(SIZES), seed=0)
    with pytest.raises(DataError, match="unreadable image .*img2.png"):
        next(loader)
    with pytest.raises(DataError, match="unreadable image .*img2.png"):
        next(create_dataloader_from_config(_cfg(path=str(root), num_workers=1), 9))  # from a worker
    with pytest.raises(DataError, match="unreadable image .*img2.png"):
        pack_dataset(cfg, tmp_path / "bad.npy", processes=2, progress=False)
    assert not list(tmp_path.glob("*bad.npy*"))  # no partial file left
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\) of 9 .*img2.png"):
        skipping = build_source(_cfg(path=str(root), skip_bad_images=True))
    assert len(skipping) == len(SIZES) - 1 and not any(k.endswith("img2.png") for k in skipping.keys)
    with pytest.warns(UserWarning, match="skipped 1"):
        meta = pack_dataset(_cfg(path=str(root), skip_bad_images=True), tmp_path / "s.npy", progress=False)
    assert meta["count"] == len(SIZES) - 1


def test_too_few_images_for_a_global_batch(folder: Path) -> None:
    with pytest.raises(DataError, match=r"holds 9 images, fewer than one global batch \(2 rank\(s\) x 5"):
        create_dataloader_from_config(_cfg(path=str(folder)), 5, rank=1, world_size=2)


# ---------------------------------------------------------------------------- command lines


def _write_config(path: Path, data: dict[str, object]) -> Path:
    path.write_text("data:\n" + "".join(f"  {k}: {'null' if v is None else v}\n" for k, v in data.items()))
    return path


def test_cli_pack_bench_and_error(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    config = _write_config(tmp_path / "c.yaml", {"source": "folder", "path": folder, "image_size": 16,
                                                 "center_crop": None, "num_workers": 0})
    out = tmp_path / "packed.npy"
    done = run_main(pack_mod.main, ["pack", "--config", config, "--out", out, "data.image_size=8",
                                "model.attention_resolutions=[4]"], capsys)
    assert done.code == 0 and done.out.splitlines()[-1].startswith(f"packed {len(SIZES)} images (8x8, "), done.err
    assert np.load(out, mmap_mode="r").shape == (len(SIZES), 8, 8, 3)
    bench = run_main(pack_mod.main, ["bench", "--config", config, "--seconds", "0.2", "--batch-size", "4",
                                 "--device", "cpu"], capsys)
    assert bench.code == 0, bench.err
    rates = [line for line in bench.out.splitlines() if "images/s" in line]
    assert len(rates) == 2 and rates[0].split()[0] == "folder" and rates[1].split()[0] == "packed"
    bad = run_main(pack_mod.main, ["pack", "--config", config, "--out", tmp_path / "x.npy",
                               f"data.path={tmp_path / 'missing'}"], capsys)
    assert bad.code == 2 and bad.err_lines == [f"error: data.path: {tmp_path / 'missing'} does not exist"]
    assert not (tmp_path / "x.npy").exists()


def test_digits_export(tmp_path: Path) -> None:
    count, wrote = export_digits(tmp_path / "digits", size=16)
    assert (count, wrote) == (1797, True)
    assert sorted(p.name for p in (tmp_path / "digits").iterdir() if p.is_dir()) == [str(i) for i in range(10)]
    assert digits_main(["--out", str(tmp_path / "digits"), "--size", "16"]) == 0  # idempotent: skipped
    assert export_digits(tmp_path / "digits", size=16) == (1797, False)
    source = build_source(_cfg(path=str(tmp_path / "digits")))
    assert len(source) == 1797
    zero = np.asarray(Image.open(tmp_path / "digits" / "0" / "0000.png"))
    assert zero.shape == (16, 16) and zero.max() > 200 and zero[8, 8] < 60  # a white ring around black


def test_digit_images_are_sklearns_load_digits() -> None:
    """tools.digits reads scikit-learn's CSV without importing scikit-learn: same pixels, same labels."""
    from sklearn.datasets import load_digits

    images, labels = digit_images(8)
    reference = load_digits()
    np.testing.assert_array_equal(labels, reference.target)
    np.testing.assert_array_equal(images, np.round(reference.images * (255.0 / 16.0)).astype(np.uint8))


def test_pack_worker_killed_is_one_line_not_a_hang(tmp_path: Path) -> None:
    """SLURM signals every process of a step; a pack worker that dies must end the command, not hang it."""
    import psutil

    (folder := tmp_path / "many").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6000):  # seconds of decoding: the kill lands while chunks are pending (not after the last one)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    config = _write_config(tmp_path / "c.yaml", {"source": "folder", "path": folder, "image_size": 8,
                                                 "center_crop": None})
    out = tmp_path / "packed.npy"
    proc = subprocess.Popen([sys.executable, "-m", "ddpm.data", "pack", "--config", str(config), "--out", str(out),
                             "--processes", "2", "model.attention_resolutions=[4]"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    parent = psutil.Process(proc.pid)
    killed, deadline = None, time.monotonic() + 60
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        for child in parent.children():  # a forked pool worker has the parent's command line
            try:
                if child.cmdline() == parent.cmdline():
                    child.send_signal(signal.SIGKILL)
                    killed = child.pid
                    break
            except psutil.NoSuchProcess:  # a short-lived helper process, or a worker already gone
                continue
    assert killed is not None, "pack finished or failed before it started a worker"
    _, err = proc.communicate(timeout=60)  # before the fix: blocked forever on the dead worker's chunk
    assert proc.returncode == 2, err
    assert err.count("error: pack: a worker process died (killed by a signal or out of memory); nothing was "
                     "written: run the command again") == 1 and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".packed.npy.tmp*"))

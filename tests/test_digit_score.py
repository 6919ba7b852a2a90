"""tools.digit_score: the offline digit classifier, its Frechet distance and confidence, the cache, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from tools import digit_score as ds


@pytest.fixture(scope="module")
def cache(digit_classifier: Path) -> Path:
    """The classifier weights file, trained once for the session (tests/conftest.py; never ~/.cache)."""
    return digit_classifier


@pytest.fixture(scope="module")
def scorer(cache: Path) -> ds.DigitScorer:
    return ds.load_scorer(16, cache)


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    """The 300 first held-out real digits, uint8 [300, 16, 16] (never seen in training)."""
    images, _ = ds.real_digits(16)
    return np.array(images[ds.split(len(images))[1][:300]])


def _blur(images: np.ndarray, radius: float) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(radius))) for im in images])


def test_classifier_accuracy_and_cache(scorer: ds.DigitScorer, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert scorer.accuracy > 0.95
    assert cache.is_file() and ds.load_scorer(16, cache) is scorer  # memoised
    ds._scorer.cache_clear()

    def no_training(*args: object) -> None:
        raise AssertionError("retrained although the cache is valid")

    monkeypatch.setattr(ds, "train_classifier", no_training)
    again = ds.load_scorer(16, cache)  # read back from the file
    assert again.accuracy == scorer.accuracy
    for a, b in zip(again.net.state_dict().values(), scorer.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    np.testing.assert_allclose(again.ref_mu, scorer.ref_mu)


def test_corrupt_cache_is_retrained_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a torch file")
    monkeypatch.setattr(ds, "train_classifier", lambda size, seed: (ds.DigitNet(), 0.5))  # fast stand-in
    with pytest.warns(UserWarning, match="unusable classifier cache"):
        fresh = ds.load_scorer(16, path)
    assert fresh.accuracy == 0.5
    blob = torch.load(path, weights_only=True)  # rewritten, atomically, as a valid cache
    assert (blob["version"], blob["size"], blob["accuracy"]) == (ds.VERSION, 16, 0.5)
    (tmp_path / "file").write_text("")
    with pytest.warns(UserWarning, match="cannot cache"):  # an unwritable cache: scored anyway
        assert ds.load_scorer(16, tmp_path / "file" / "weights.pt").accuracy == 0.5


def test_fd_orders_real_blurred_shifted_noise(scorer: ds.DigitScorer, cache: Path, held_out: np.ndarray) -> None:
    n = len(held_out)
    real = scorer.score(held_out)
    blurred = scorer.score(_blur(held_out, 1.0))
    shifted = scorer.score(np.roll(held_out, (2, 2), axis=(1, 2)))
    noise = scorer.score(np.random.default_rng(0).integers(0, 256, held_out.shape, dtype=np.uint8))
    assert real["n"] == blurred["n"] == shifted["n"] == noise["n"] == n
    assert 4 * real["fd"] < blurred["fd"] and 10 * real["fd"] < shifted["fd"] and 20 * real["fd"] < noise["fd"]
    assert real["confidence"] > 0.9 and real["confidence"] > noise["confidence"] + 0.1
    assert real["classes"] == 10 and real["coverage"] == 1.0 and real["class_entropy"] > 0.95 * np.log(10)
    assert noise["class_entropy"] < real["class_entropy"]
    anchor = ds.real_digits_score(n, 0, 16, cache)  # n digits drawn from all 1797: close to the held-out ones
    assert anchor["n"] == n and anchor["fd"] < 3 * real["fd"] and anchor["confidence"] > 0.9
    assert ds.noise_score(n, 0, 16, cache)["fd"] > 20 * anchor["fd"]


def test_grey_rgb_and_resized_inputs(scorer: ds.DigitScorer, held_out: np.ndarray) -> None:
    grey = scorer.score(held_out[:128])
    assert grey == scorer.score(np.repeat(held_out[:128, :, :, None], 3, axis=-1))  # [N, H, W, 3]
    assert grey == scorer.score(held_out[:128, :, :, None])  # [N, H, W, 1]
    big = ds.real_digits(32)[0][ds.split(1797)[1][:128]]  # the same digits exported at 32 px, resized back
    assert scorer.score(big)["fd"] < 3 * grey["fd"]
    with pytest.raises(ds.DataError, match="uint8"):
        scorer.score(held_out.astype(np.float32))
    with pytest.raises(ds.DataError, match="at least 2"):
        scorer.score(held_out[:1])


def test_cli_line_json_and_errors(cache: Path, held_out: np.ndarray, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    samples = tmp_path / "samples_128x16x16x3.npz"
    np.savez(samples, arr_0=np.repeat(held_out[:128, :, :, None], 3, axis=-1))  # ddpm.assemble's layout
    assert ds.main([str(samples), "--cache", str(cache)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("digit score: fd ") and "classes 10/10" in out[0]
    assert out[0].endswith("(n=128)")
    assert ds.main([str(samples), "--cache", str(cache), "--json", "--anchors"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 128 and result["anchors"]["noise"]["fd"] > result["fd"]
    assert set(result) >= {"fd", "confidence", "class_entropy", "classes", "coverage", "anchors"}

    empty = tmp_path / "empty.npz"
    np.savez(empty, labels=np.arange(3))
    text, cut = tmp_path / "text.npz", tmp_path / "cut.npz"
    text.write_text("not an npz")
    cut.write_bytes(samples.read_bytes()[:3000])  # an interrupted copy
    bad = {tmp_path / "missing.npz": "not found", empty: "no uint8 images", text: "not a readable npz",
           cut: "not a readable npz"}
    for path, message in bad.items():
        assert ds.main([str(path), "--cache", str(cache)]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.splitlines()) == 1 and message in captured.err

"""FID: sufficient statistics, the Frechet distance against closed forms, the Inception pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import fid, inception
from ddpm.fid import FIDError, FIDStats, frechet_distance


def _features(n: int, seed: int) -> np.ndarray:
    """Non-negative, correlated, non-centred features [n, 2048] (like pool3 activations)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 64)) @ rng.standard_normal((64, fid.FEATURE_DIM)) * 0.1
    return np.maximum(z + 0.5, 0.0)


def test_merge_equals_single_pass() -> None:
    f = _features(300, 0)
    single = FIDStats().update(f)
    parts = [FIDStats().update(f[a:b]) for a, b in ((0, 7), (7, 150), (150, 300))]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.n == 300
    mu, cov = merged.mean_cov()
    mu1, cov1 = single.mean_cov()
    ref_mu, ref_cov = f.mean(0), np.cov(f, rowvar=False)  # pytorch-fid's definition
    for got, want in ((mu, ref_mu), (mu1, ref_mu), (cov, ref_cov), (cov1, ref_cov)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_stats_save_load_roundtrip_and_torch_input(tmp_path: Path) -> None:
    f = _features(5, 1)
    stats = FIDStats(signature="sig").update(torch.from_numpy(f).float())
    stats.save(tmp_path / "s.npz")
    back = FIDStats.load(tmp_path / "s.npz")
    assert back.n == 5 and back.signature == "sig"
    np.testing.assert_array_equal(back.sum_outer, stats.sum_outer)
    with pytest.raises(ValueError):
        FIDStats().update(np.zeros((2, 10)))
    with pytest.raises(FIDError, match="not found"):
        FIDStats.load(tmp_path / "missing.npz")


def test_frechet_distance_closed_form_diagonal() -> None:
    rng = np.random.default_rng(0)
    d = 16
    a, b = rng.uniform(0.1, 2.0, d), rng.uniform(0.1, 2.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    # Diagonal covariances: Tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt a - sqrt b)^2.
    want = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(want, rel=1e-9)
    # The same in a rotated basis (commuting, non-diagonal covariances): FID is rotation-invariant.
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    got_rot = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert got_rot == pytest.approx(want, rel=1e-7)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_singular_covariances() -> None:
    a = np.array([1.0, 0.0, 4.0, 0.0])
    b = np.array([0.0, 0.0, 1.0, 9.0])
    want = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(np.zeros(4), np.diag(a), np.zeros(4), np.diag(b))
    assert np.isfinite(got) and got == pytest.approx(want, rel=1e-9)


def test_frechet_distance_equals_pytorch_fid_sqrtm() -> None:
    """The eigenvalue form equals pytorch-fid's ``calculate_frechet_distance`` (scipy sqrtm) on full-rank,
    non-commuting covariances."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(1)
    f1, f2 = rng.standard_normal((300, 64)), rng.standard_normal((200, 64)) @ rng.standard_normal((64, 64)) * 0.3
    args = (f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0) + 0.1, np.cov(f2, rowvar=False))
    assert frechet_distance(*args) == pytest.approx(calculate_frechet_distance(*args), rel=1e-9)


def _small(signature: str, f: np.ndarray) -> FIDStats:
    d = f.shape[1]  # low-dimensional stats: sqrtm of a 2048^2 matrix takes ~20 s on 2 cores
    return FIDStats(sum=np.zeros(d), sum_outer=np.zeros((d, d)), signature=signature).update(f)


def test_refuses_stats_with_different_preprocessing() -> None:
    f = _features(40, 2)[:, :8]
    a, b = _small("crop=center140", f), _small("crop=none", f)
    with pytest.raises(FIDError, match="different preprocessing"):
        fid.fid_from_stats(a, b)
    with pytest.raises(FIDError, match="different preprocessing"):
        a.merge(b)
    assert fid.fid_from_stats(a, _small("crop=center140", f)) == pytest.approx(0.0, abs=1e-6)
    shifted = _small("crop=center140", f + 1.0)  # same covariance, mean + 1 in each of 8 dims
    assert fid.fid_from_stats(a, shifted) == pytest.approx(8.0, rel=1e-6)


# ----------------------------------------------------------------------------- Inception


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The network's own state dict with random (well-scaled) values, saved like the real file."""
    torch.manual_seed(0)
    state = inception.FIDInceptionV3().state_dict()
    for key, t in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("running_var"):
            t.uniform_(0.5, 1.5)
        elif t.ndim == 4:  # conv: He scaling keeps the activations O(1) through the 94 layers
            t.normal_(0.0, (2.0 / t[0].numel()) ** 0.5)
        else:
            t.normal_(1.0 if key.endswith("bn.weight") else 0.0, 0.1)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # as the 2015 file
    path = tmp_path_factory.mktemp("weights") / inception.WEIGHTS_NAME
    torch.save(state, path)
    return path


def _no_download(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"tried to download {args}")


def test_inception_features_from_weights_file(weights_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytorch_fid import inception as pfi

    monkeypatch.setattr(pfi, "load_state_dict_from_url", _no_download)  # the local file only
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    model = inception.load_inception(weights_file)
    assert isinstance(model, pfi.InceptionV3) and not model.training
    assert not any(t.requires_grad for t in model.parameters())
    ref = torch.load(weights_file, weights_only=True)
    mixed_7c = model.blocks[3][2]
    assert isinstance(mixed_7c, pfi.FIDInceptionE_2)
    assert torch.equal(mixed_7c.branch_pool.conv.weight, ref["Mixed_7c.branch_pool.conv.weight"])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    feats = inception.inception_features(model, images, batch_size=2)
    assert feats.shape == (3, 2048) and feats.dtype == np.float64
    assert np.isfinite(feats).all() and feats.std() > 0
    assert not np.allclose(feats[0], feats[1])
    # Batch composition does not matter (up to float rounding).
    np.testing.assert_allclose(inception.inception_features(model, images[2:], batch_size=1)[0], feats[2],
                               rtol=1e-4, atol=1e-5)


def test_features_equal_pytorch_fid(weights_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our pool3 features of uint8 images are pytorch-fid's ``get_activations`` of the same images as PNGs.

    pytorch-fid's own ``InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)``
    gets the test-written state dict where it would download the real one (strict load). Both run in
    float32 on CPU with the same batches, so they agree bit for bit (max difference 0.0 when written);
    the tolerance, 1e-6 absolute + 1e-6 relative on features up to ~14, allows only float32 rounding.
    """
    from pytorch_fid import fid_score
    from pytorch_fid import inception as pfi

    state = torch.load(weights_file, weights_only=True)

    def local_weights(url: str, **kwargs: object) -> dict[str, torch.Tensor]:
        assert url == inception.WEIGHTS_URL == pfi.FID_WEIGHTS_URL
        assert fid.FEATURE_DIM == inception.FEATURE_DIM == 2048  # fid.py keeps its own copy (stays light)
        return state

    monkeypatch.setattr(pfi, "load_state_dict_from_url", local_weights)
    theirs = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                             normalize_input=True, use_fid_inception=True)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(3, 29, 37, 3), dtype=np.uint8)  # non-square: resize in both axes
    files = []
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    want = fid_score.get_activations(files, theirs, batch_size=2, dims=2048, device="cpu", num_workers=0)
    got = inception.inception_features(inception.load_inception(weights_file), images, batch_size=2)
    assert got.shape == want.shape == (3, 2048) and want.std() > 0.1
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), rtol=1e-6, atol=1e-6)


def test_weights_errors(tmp_path: Path, weights_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FIDError) as err:
        inception.resolve_weights(None)
    msg = str(err.value)
    assert inception.WEIGHTS_URL in msg and "curl" in msg and "\n" not in msg
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / inception.WEIGHTS_NAME) in msg
    with pytest.raises(FIDError, match="not found"):
        inception.load_inception(tmp_path / "nope.pth")
    state = torch.load(weights_file, weights_only=True)
    state["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's ImageNet head, not the FID graph
    torch.save(state, tmp_path / "wrong.pth")
    with pytest.raises(FIDError, match="do not match the FID Inception"):
        inception.load_inception(tmp_path / "wrong.pth")
    # Found in the hub cache when no path is given.
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / inception.WEIGHTS_NAME).symlink_to(weights_file)
    assert inception.resolve_weights(None) == hub / inception.WEIGHTS_NAME


def test_reference_cli(tmp_path: Path, weights_file: Path) -> None:
    data = tmp_path / "imgs"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(data / f"{i}.png")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data: {{source: folder, path: {data}, image_size: 16, center_crop: null}}\n")
    out = tmp_path / "ref.npz"
    code = fid.main(["ref", "--config", str(cfg), "--out", str(out), "--weights", str(weights_file),
                     "--device", "cpu", "--batch-size", "2"])
    assert code == 0
    stats = FIDStats.load(out)
    assert stats.n == 3 and "crop=none" in stats.signature and fid.PIPELINE in stats.signature
    cropped = fid.stats_signature({"source": "folder", "path": str(data), "image_size": 16, "center_crop": 14})
    assert cropped != stats.signature
    assert fid.main(["ref", "--config", str(cfg), "--out", str(out), "--weights", str(tmp_path / "x")]) == 2


def test_parameter_names_match_torchvision_inception3_layout() -> None:
    """The weights file is a state dict of torchvision's Inception3 (1008 classes, no aux head)."""
    from torchvision.models.inception import Inception3

    ours = {k: v.shape for k, v in inception.FIDInceptionV3().state_dict().items()}
    tv = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    assert ours == {k: v.shape for k, v in tv.state_dict().items()}

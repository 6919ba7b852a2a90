"""ddpm.architecture's torch-free size of the U-Net: ``num_parameters`` equals the real module's count for
the shipped configs and variations of every knob, and ``checkpoint_bytes`` matches a real checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import BABEL_CONFIG as BABEL
from helpers import ROOT
from helpers import TINY_CONFIG as TINY

from ddpm.architecture import checkpoint_bytes, num_parameters
from ddpm.config import ModelConfig, load_config
from ddpm.unet import UNet

DIGITS = ROOT / "configs" / "quickstart_digits.yaml"

CASES: list[tuple[Path, tuple[str, ...]]] = [
    (BABEL, ()),
    (TINY, ()),
    (DIGITS, ()),
    (BABEL, ("model.use_scale_shift_norm=false",)),
    (BABEL, ("model.in_channels=1",)),
    (BABEL, ("model.num_res_blocks=1",)),
    (BABEL, ("model.num_res_blocks=3",)),
    (BABEL, ("model.channel_mult=[1,2,3,4]",)),
    (BABEL, ("model.attention_resolutions=[]",)),
    (BABEL, ("model.attention_resolutions=[64,32,16,8]",)),
    (BABEL, ("model.attention_resolutions=[32]", "model.channel_mult=[1,1,2,2,4]")),
    (BABEL, ("model.base_channels=24", "model.num_heads=3", "model.attention_resolutions=[32,8]")),
    (BABEL, ("data.image_size=32", "model.channel_mult=[2,2,2]", "model.attention_resolutions=[16]")),
    (BABEL, ("data.image_size=48", "model.base_channels=40", "model.num_heads=5", "model.num_res_blocks=1",
             "model.attention_resolutions=[12]",
             "model.use_scale_shift_norm=false")),
    (TINY, ("model.channel_mult=[1]", "model.attention_resolutions=[8]", "model.num_res_blocks=2")),
    (TINY, ("model.base_channels=8", "model.channel_mult=[3,1,2]", "model.attention_resolutions=[2]",
            "data.image_size=8")),
    (DIGITS, ("model.in_channels=3", "model.num_res_blocks=4", "model.attention_resolutions=[8,4]")),
]


def torch_count(model: ModelConfig, image_size: int) -> int:
    """The real U-Net's parameter count, built on the meta device (shapes only, no memory, fast)."""
    with torch.device("meta"):
        unet = UNet.from_config(model, image_size)
    assert not list(unet.buffers())  # checkpoint_bytes relies on it: the EMA shadow is parameters only
    return sum(p.numel() for p in unet.parameters())


@pytest.mark.parametrize("path,overrides", CASES, ids=[f"{p.stem}:{','.join(o) or 'as-is'}" for p, o in CASES])
def test_num_parameters_equals_the_torch_count(path: Path, overrides: tuple[str, ...]) -> None:
    cfg = load_config(path, overrides)
    expected = torch_count(cfg.model, cfg.data.image_size)
    assert num_parameters(cfg.model, cfg.data.image_size) == expected
    assert checkpoint_bytes(cfg.model, cfg.data.image_size) == 16 * expected


def test_the_reference_model_count() -> None:
    cfg = load_config(BABEL)
    assert cfg.data.image_size == 64
    assert num_parameters(cfg.model, 64) == 77_531_523
    assert checkpoint_bytes(cfg.model, 64) == 16 * 77_531_523  # about 1.24 GB


def test_an_unbuildable_shape_raises_like_the_unet() -> None:
    model = ModelConfig(attention_resolutions=[12])
    with pytest.raises(ValueError, match="attention_resolutions"):
        num_parameters(model, 64)
    with pytest.raises(ValueError, match="attention_resolutions"):
        UNet.from_config(model, 64)
    with pytest.raises(ValueError, match="image_size"):
        num_parameters(ModelConfig(), 36)


def test_checkpoint_bytes_match_a_real_checkpoint(checkpoint: Path) -> None:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = load_config(TINY)

    def nbytes(tensors: object) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)  # type: ignore[attr-defined]

    adam = state["optimizer"]["state"].values()
    counted = (nbytes(state["model"].values()) + nbytes(state["ema"]["shadow"].values())
               + nbytes(s["exp_avg"] for s in adam) + nbytes(s["exp_avg_sq"] for s in adam))
    assert counted == checkpoint_bytes(cfg.model, cfg.data.image_size)
    assert checkpoint.stat().st_size >= counted


def test_the_module_imports_no_torch() -> None:
    code = "import sys, ddpm.architecture; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)

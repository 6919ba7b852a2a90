"""U-Net: shapes, the reference parameter count, rebuild from config, memory formats, compile, overfitting."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize

from ddpm.config import ModelConfig
from ddpm.diffusion import DDPM
from ddpm.unet import UNet, num_groups


def tiny(image_size: int = 32, **overrides: object) -> UNet:
    kw: dict[str, object] = dict(in_channels=3, base_channels=16, channel_mult=[1, 2, 2], num_res_blocks=1,
                                 attention_resolutions=[8], num_heads=2, dropout=0.0, use_scale_shift_norm=True)
    kw.update(overrides)
    return UNet(image_size=image_size, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("image_size,mult,attn,scale_shift",
                         [(32, [1, 2, 2], [8], True), (64, [1, 2, 2, 2], [16, 8], False)])
def test_output_shape_equals_input(image_size: int, mult: list[int], attn: list[int], scale_shift: bool) -> None:
    torch.manual_seed(0)
    model = tiny(image_size, channel_mult=mult, attention_resolutions=attn, use_scale_shift_norm=scale_shift)
    model = randomize(model).eval()
    x = torch.randn(2, 3, image_size, image_size)
    out = model(x, torch.tensor([3, 999]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert model(x, torch.tensor(7)).shape == x.shape  # a scalar t is broadcast over the batch


def test_zero_initialised_output() -> None:
    out = tiny()(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    assert torch.count_nonzero(out) == 0


def test_reference_parameter_count() -> None:
    """improved-diffusion UNetModel / diffusers UNet2DModel (128, 256, 256, 512) at 64x64: 77.5M."""
    with torch.device("meta"):
        model = UNet.from_config(ModelConfig(), image_size=64)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 77.5e6) / 77.5e6 < 0.02, n


def test_config_roundtrip_rebuilds_same_architecture() -> None:
    cfg = ModelConfig(base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[16],
                      num_heads=2, dropout=0.1, use_scale_shift_norm=False)
    model = UNet.from_config(cfg, image_size=32)
    conf = model.config_dict()
    assert conf == dict(in_channels=3, base_channels=16, channel_mult=[1, 2], num_res_blocks=1,
                        attention_resolutions=[16], num_heads=2, dropout=0.1, use_scale_shift_norm=False,
                        image_size=32)
    again = UNet(**conf)
    again.load_state_dict(model.state_dict(), strict=True)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in again.state_dict().items()}


def test_group_norm_groups_for_small_widths() -> None:
    assert [num_groups(c) for c in (128, 512, 16, 48, 24, 3, 96)] == [32, 32, 16, 24, 24, 3, 32]


def test_channels_last_and_compile_match_eager() -> None:
    torch.manual_seed(0)
    model = randomize(tiny(16, channel_mult=[1, 2], attention_resolutions=[16, 8])).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 500])
    with torch.no_grad():
        ref = model(x, t)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t)
        assert cl.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)
        # fullgraph=True fails on any graph break, e.g. data-dependent Python control flow in forward.
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x, t), ref, rtol=1e-4, atol=1e-5)


def test_overfits_one_batch() -> None:
    """Fixed (x0, t, noise): the eps-MSE must drop 10x within a few hundred CPU steps."""
    torch.manual_seed(0)
    model = tiny(16, channel_mult=[1, 2], attention_resolutions=[8])
    ddpm = DDPM(model, 1000, 1e-4, 0.02)
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    t = torch.tensor([10, 250, 500, 900])
    noise = torch.randn_like(x0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    first, loss = None, None
    for _ in range(300):
        loss, _ = ddpm.compute_loss(x0, t, noise)
        first = loss.item() if first is None else first
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if loss.item() < first / 10:
            break
    assert loss is not None and first is not None and loss.item() < first / 10, (first, loss.item())


def test_bad_architecture_names_the_value() -> None:
    with pytest.raises(ValueError, match="image_size=36"):
        tiny(36, channel_mult=[1, 2, 2, 2])
    with pytest.raises(ValueError, match=r"attention_resolutions=\[12\]"):
        tiny(32, attention_resolutions=[12])
    with pytest.raises(ValueError, match="num_heads=3"):
        tiny(32, num_heads=3)

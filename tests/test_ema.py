"""EMA: copy before start, closed-form average after it, state_dict round trip, wrapper unwrapping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ddpm.ema import EMA, strip_prefixes, unwrap_model


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)  # float buffers (running stats) and an int64 counter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.lin(x))


def set_weights(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
        model.bn.running_mean.fill_(value)


def test_keys_dtypes_and_copy_before_start() -> None:
    model = Net()
    ema = EMA(model, decay=0.9, start_step=3)
    assert list(ema.shadow) == list(model.state_dict())
    assert ema.shadow["lin.weight"].dtype == torch.float32
    assert ema.shadow["bn.num_batches_tracked"].dtype == torch.int64
    set_weights(model, 2.0)
    model.bn.num_batches_tracked.fill_(7)
    ema.update(model, step=2)  # before start_step: a plain copy
    assert torch.equal(ema.shadow["lin.weight"], torch.full((2, 3), 2.0))
    assert torch.equal(ema.shadow["bn.running_mean"], torch.full((2,), 2.0))
    assert ema.shadow["bn.num_batches_tracked"].item() == 7
    assert ema.shadow["lin.weight"].data_ptr() != model.lin.weight.data_ptr()


def test_average_after_start_closed_form() -> None:
    model = Net()
    set_weights(model, 1.0)
    ema = EMA(model, decay=0.9, start_step=1)
    ema.update(model, step=0)  # copy: shadow = 1
    expected = 1.0
    for step, w in [(1, 3.0), (2, -2.0), (3, 5.0)]:
        set_weights(model, w)
        model.bn.num_batches_tracked.fill_(step)
        ema.update(model, step)
        expected = 0.9 * expected + 0.1 * w
        for name in ("lin.weight", "lin.bias", "bn.weight", "bn.running_mean"):
            torch.testing.assert_close(ema.shadow[name], torch.full_like(ema.shadow[name], expected))
        assert ema.shadow["bn.num_batches_tracked"].item() == step  # counters are copied, not averaged
    # 0.9 * (0.9 * (0.9 * 1 + 0.3) - 0.2) + 0.5
    assert expected == pytest.approx(1.2920000000000003)


def test_state_dict_roundtrip_and_copy_to() -> None:
    model = Net()
    ema = EMA(model, decay=0.99, start_step=0)
    set_weights(model, 4.0)
    ema.update(model, step=5)
    state = ema.state_dict()
    assert set(state) == {"decay", "start_step", "shadow"} and state["decay"] == 0.99
    assert set(state["shadow"]) == set(model.state_dict())
    other = EMA(Net(), decay=0.5, start_step=9)
    # keys as a compiled DDP model would have saved them are accepted too
    other.load_state_dict({**state, "shadow": {f"module._orig_mod.{k}": v for k, v in state["shadow"].items()}})
    assert other.decay == 0.99 and other.start_step == 0
    for k, v in state["shadow"].items():
        assert torch.equal(other.shadow[k], v)
    target = Net().to(torch.float64)
    other.copy_to(target)
    assert target.lin.weight.dtype == torch.float64
    torch.testing.assert_close(target.lin.weight.float(), other.shadow["lin.weight"])
    with pytest.raises(ValueError, match="differing keys"):
        other.load_state_dict({**state, "shadow": {"nope": torch.zeros(1)}})


def test_unwrap_data_parallel_and_compiled_prefixes() -> None:
    net = Net()
    wrapped = torch.compile(nn.DataParallel(net), backend="eager")  # keys "_orig_mod.module.lin.weight"
    assert any(k.startswith("_orig_mod.module.") for k in wrapped.state_dict())
    assert unwrap_model(wrapped) is net
    assert unwrap_model(nn.DataParallel(torch.compile(net, backend="eager"))) is net
    ema = EMA(wrapped, decay=0.9, start_step=0)
    assert list(ema.shadow) == list(net.state_dict())
    w0 = net.lin.weight.detach().clone()
    set_weights(net, 3.0)
    ema.update(wrapped, step=0)
    torch.testing.assert_close(ema.shadow["lin.weight"], 0.9 * w0 + 0.1 * 3.0)
    assert strip_prefixes("module._orig_mod.lin.weight") == "lin.weight"
    assert strip_prefixes("modules.x") == "modules.x"


def test_unwrap_distributed_data_parallel(tmp_path: Path) -> None:
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        net = Net()
        ddp = nn.parallel.DistributedDataParallel(net)
        assert all(k.startswith("module.") for k in ddp.state_dict())
        assert unwrap_model(ddp) is net
        assert list(EMA(ddp, 0.9).shadow) == list(net.state_dict())
    finally:
        dist.destroy_process_group()

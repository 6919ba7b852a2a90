"""Each fast path of ``infrastructure`` gives the plain path's results, to a stated tolerance.

Through the real ``ddpm.train.Trainer`` (configs/tiny_cpu.yaml, random images): channels_last
(forward and gradients, and 4 training steps, 1e-5 relative), torch.compile (4 training steps, 1e-5
relative; checkpoints without wrapper prefixes), bf16 autocast on CPU (``ddpm.train.amp_dtype`` gives bf16
and the forward runs in it; the losses differ from fp32's at every step but stay within 1e-3 relative),
fused AdamW (on the CPU; on CUDA too when a GPU is there).

"Training gives the same results" is checked on the losses of every step and on the trained network's
output for a fixed probe batch, not weight by weight: AdamW divides by sqrt(v) + 1e-8, so a parameter the
loss does not depend on (in the tiny model, a bias feeding a GroupNorm of one channel per group) gets a
gradient of pure float rounding and an update of about +-lr either way, which changes nothing downstream.

torch.compile runs with ``backend="aot_eager"`` here (dynamo capture + AOTAutograd's joint graph, the
parts that decide the wrapper and the autograd semantics): inductor's C++ code generation adds ~35 s on
a 2-core CPU. ``DDPM_TEST_COMPILE_BACKEND=inductor`` runs the same test with the real backend (it passes
with the same tolerances).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np
import pytest
import torch
from helpers import TINY_CONFIG as TINY

from ddpm.checkpoint import load_checkpoint
from ddpm.config import load_config
from ddpm.precision import amp_dtype
from ddpm.train import Trainer
from ddpm.unet import UNet

STEPS = 4
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def train(trainer: Trainer, steps: int = STEPS) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Per-step losses and the final weights (on the CPU) after ``steps`` real training steps."""
    losses = [float(trainer.train_step(*trainer.next_batch())["loss"]) for _ in range(steps)]
    weights = {k: v.detach().float().cpu().clone() for k, v in trainer.model.state_dict().items()}
    trainer.close()
    return losses, weights


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    """Equal to ``rtol`` relative to ``expected``'s largest value (so also where it is near zero)."""
    scale = max(float(expected.abs().max()), 1e-3)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


def probe(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tiny U-Net with ``weights`` (fp32, contiguous, CPU, eval) on a fixed batch: eps [8, 3, 8, 8]."""
    model = UNet.from_config(load_config(TINY).model, image_size=8)
    model.load_state_dict(weights)
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model.eval()(x, torch.arange(8) * 6)


def assert_same_training(a: tuple[list[float], dict], b: tuple[list[float], dict], rtol: float) -> None:
    np.testing.assert_allclose(b[0], a[0], rtol=rtol)
    assert_close(probe(b[1]), probe(a[1]), rtol, "trained network on the probe batch")


def random_tiny_unet(seed: int = 0) -> UNet:
    """The tiny U-Net with every parameter random (its zero-initialised convs would make eps == 0)."""
    torch.manual_seed(seed)
    model = UNet.from_config(load_config(TINY).model, image_size=8)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2 if p.ndim > 1 else 0.05)
    return model


def test_channels_last_forward_and_gradients_match_contiguous():
    model = random_tiny_unet()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 13, 27, 49])
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        model.to(memory_format=fmt)
        model.zero_grad(set_to_none=True)
        eps = model(x.contiguous(memory_format=fmt), t)
        eps.square().mean().backward()
        results.append((eps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (eps_a, grads_a), (eps_b, grads_b) = results
    assert eps_b.is_contiguous(memory_format=torch.channels_last)  # the layout survives attention and up/down
    assert float(eps_a.abs().max()) > 0.1  # a real output, not the zero of a fresh model
    torch.testing.assert_close(eps_b, eps_a, rtol=1e-5, atol=1e-5 * float(eps_a.abs().max()))
    for name, grad in grads_a.items():
        assert_close(grads_b[name], grad, 1e-5, f"grad of {name}")


def test_channels_last_training_matches_contiguous(make_trainer, tmp_path):
    plain = make_trainer(tmp_path / "plain")
    fast = make_trainer(tmp_path / "fast", "infrastructure.channels_last=true")
    assert fast.model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_training(train(plain), train(fast), rtol=1e-5)


def test_compile_matches_eager_and_checkpoints_have_plain_keys(make_trainer, tmp_path, monkeypatch):
    backend = os.environ.get("DDPM_TEST_COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    torch._dynamo.reset()
    try:
        eager = make_trainer(tmp_path / "eager")
        reference = train(eager)
        compiled = make_trainer(tmp_path / "compiled", "infrastructure.compile=true")
        assert isinstance(compiled.ddpm.model, torch._dynamo.eval_frame.OptimizedModule)  # the path is taken
        losses, weights = train(compiled)
        assert_same_training(reference, (losses, weights), rtol=1e-5)

        state = load_checkpoint(compiled.save())
        plain_keys = set(UNet(**state["model_config"]).state_dict())
        for name, keys in (("model", state["model"]), ("ema", state["ema"]["shadow"])):
            assert not [k for k in keys if k.startswith(WRAPPER_PREFIXES)], name
            assert set(keys) == plain_keys, name
        for k, v in state["model"].items():
            assert torch.equal(v.float(), weights[k]), k  # the trained weights, saved as they are
    finally:
        torch._dynamo.reset()


def record_forward_precision(trainer: Trainer) -> list[tuple[bool, torch.dtype, torch.dtype]]:
    """(autocast on for the CPU, its dtype, conv_in's output dtype) of every forward of ``trainer``'s network."""
    seen: list[tuple[bool, torch.dtype, torch.dtype]] = []

    def hook(_module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> None:
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), output.dtype))

    trainer.model.conv_in.register_forward_hook(hook)
    return seen


def test_bf16_autocast_on_cpu_differs_from_fp32_but_stays_close(make_trainer, tmp_path):
    """infrastructure.precision=bf16 on the CPU: the training forward really runs in bf16 autocast, so from the
    same (random) weights and batches the losses are not fp32's (each step differs by more than 1e-6 relative, ~10 fp32
    ulps; measured 1e-5 to 8e-5) but stay within 1e-3 relative (measured <= 8e-5); the trained networks differ
    on the probe batch by more than 1e-4 and less than 2e-2 of its largest value (measured 2.3e-3)."""
    cpu, infra = torch.device("cpu"), load_config(TINY).infrastructure
    assert amp_dtype(infra, cpu) is None  # tiny_cpu says fp32
    assert amp_dtype(dataclasses.replace(infra, precision="bf16"), cpu) == torch.bfloat16

    fp32 = make_trainer(tmp_path / "fp32")
    bf16 = make_trainer(tmp_path / "bf16", "infrastructure.precision=bf16")
    weights = random_tiny_unet().state_dict()  # a fresh network's eps is exactly 0 in any precision
    for trainer in (fp32, bf16):
        trainer.model.load_state_dict(weights)  # in place: the optimizer's and the EMA's parameters
    seen_fp32, seen_bf16 = record_forward_precision(fp32), record_forward_precision(bf16)
    losses_a, weights_a = train(fp32, steps=6)
    losses_b, weights_b = train(bf16, steps=6)
    assert [(on, out) for on, _, out in seen_fp32] == [(False, torch.float32)] * 6  # no autocast: fp32
    assert seen_bf16 == [(True, torch.bfloat16, torch.bfloat16)] * 6  # bf16 autocast: bf16 activations
    a, b = np.asarray(losses_a), np.asarray(losses_b)
    rel = np.abs(b - a) / np.abs(a)
    assert rel.min() > 1e-6, rel  # bf16 rounding shows in every step's loss
    np.testing.assert_allclose(b, a, rtol=1e-3)
    pa, pb = probe(weights_a), probe(weights_b)
    assert float((pb - pa).abs().max() / pa.abs().max()) > 1e-4  # the bf16 gradients trained other weights
    assert_close(pb, pa, 2e-2, "bf16-trained network on the probe batch")

    model = random_tiny_unet()  # a trained-looking network: bf16 rounding shows in every layer
    x, t = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([1, 10, 20, 40])
    with torch.no_grad():
        ref = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t)
    assert low.dtype == torch.bfloat16
    err = float((low.float() - ref).norm() / ref.norm())
    assert 1e-4 < err < 5e-2, err


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fused_adamw_matches_unfused(make_trainer, tmp_path, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: the CUDA variant runs on a GPU machine (the CPU variant ran)")
    common = (f"infrastructure.num_gpus={int(device == 'cuda')}", "infrastructure.precision=fp32",
              "infrastructure.tf32=false")
    plain = make_trainer(tmp_path / "plain", *common, "infrastructure.fused_adam=false", device=device)
    fused = make_trainer(tmp_path / "fused", *common, "infrastructure.fused_adam=true", device=device)
    assert fused.optimizer.defaults["fused"] and not plain.optimizer.defaults["fused"]
    assert_same_training(train(plain), train(fused), rtol=1e-5)

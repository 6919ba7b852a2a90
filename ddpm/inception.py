"""The FID Inception network: pytorch-fid's port of the TensorFlow graph, with local weights, never downloaded.

    model = load_inception("~/.cache/torch/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth", "cuda")
    feats = inception_features(model, images)        # uint8 [N, H, W, 3] -> float64 [N, 2048]

Statistics, the Frechet distance and the reference CLI are in :mod:`ddpm.fid`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pytorch_fid import inception as pfi
from torch import nn
from torchvision.models import Inception3

from ddpm.errors import FIDError
from ddpm.fidweights import WEIGHTS_NAME, WEIGHTS_URL, resolve_weights  # noqa: F401 (this module's API too)
from ddpm.precision import full_fp32

FEATURE_DIM = 2048  # pool3


def FIDInceptionV3() -> Inception3:
    """pytorch-fid's ``fid_inception_v3()`` network, randomly initialised instead of downloaded.

    Built as pytorch-fid builds it: torchvision's Inception3 (1008-way ``fc``, no auxiliary head)
    with pytorch-fid's TF-graph blocks in Mixed_5b-5d, 6b-6e, 7b, 7c. Its state dict has the keys
    and shapes of ``pt_inception-2015-12-05-6726825d.pth``; the ``fc`` logits are unused for FID.
    """
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return net


class FIDFeatures(pfi.InceptionV3):
    """pytorch-fid's ``InceptionV3([3], resize_input=True, normalize_input=True)`` around local weights.

    ``InceptionV3.__init__`` fetches the weights from their URL, so this sets up the same
    attributes and the same four blocks from ``net`` (a :func:`FIDInceptionV3` holding the weights).
    ``forward`` is pytorch-fid's own: x [N, 3, H, W] float in [0, 1] -> bilinear resize to 299x299
    (align_corners=False) -> 2x - 1 -> blocks -> ``[pool3 [N, 2048, 1, 1]]``.
    """

    def __init__(self, net: Inception3) -> None:
        nn.Module.__init__(self)  # not InceptionV3.__init__: it would download
        self.resize_input, self.normalize_input = True, True
        self.output_blocks = [pfi.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]]
        self.last_needed_block = self.output_blocks[0]
        self.blocks = nn.ModuleList([
            nn.Sequential(net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3,
                          nn.MaxPool2d(kernel_size=3, stride=2)),
            nn.Sequential(net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, nn.MaxPool2d(kernel_size=3, stride=2)),
            nn.Sequential(net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b,
                          net.Mixed_6c, net.Mixed_6d, net.Mixed_6e),
            nn.Sequential(net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, nn.AdaptiveAvgPool2d(output_size=(1, 1))),
        ])
        self.requires_grad_(False)


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> FIDFeatures:
    """pytorch-fid's FID Inception with the weights of :func:`resolve_weights` (eval mode, no grad)."""
    p = resolve_weights(path)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        raise FIDError(f"{p}: unreadable Inception weights ({type(err).__name__})") from None
    net = FIDInceptionV3()
    expected = {k: v.shape for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    if not isinstance(state, dict):
        raise FIDError(f"{p}: not a state dict of the FID Inception ({WEIGHTS_NAME})")
    got = {k: getattr(v, "shape", None) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    bad = sorted(set(expected) ^ set(got)) + sorted(k for k in expected if k in got and got[k] != expected[k])
    if bad:
        raise FIDError(f"{p}: weights do not match the FID Inception ({len(bad)} keys differ, e.g. "
                       f"{', '.join(bad[:3])}); expected {WEIGHTS_NAME}")
    net.load_state_dict(state, strict=False)  # only num_batches_tracked may be absent (unused in eval)
    return FIDFeatures(net).to(device).eval()


@torch.no_grad()
def inception_features(model: FIDFeatures, images: np.ndarray, batch_size: int = 50) -> np.ndarray:
    """uint8 images [N, H, W, 3] (or grey, [N, H, W, 1]) -> pool3 features [N, 2048] float64 (computed in full
    IEEE float32, ``ddpm.fid.INCEPTION_PRECISION``: no TF32 or autocast, whatever the sampler ran in).

    pytorch-fid's path (``fid_score.get_activations``): ToTensor's x / 255 as float32 [B, 3, H, W],
    then the model's own bilinear resize to 299x299 (align_corners=False) and 2x - 1.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 [N, H, W, 3] (or [N, H, W, 1]), got {images.dtype} {list(images.shape)}")
    if images.shape[-1] == 1:  # a greyscale model (model.in_channels 1): grey as RGB, like the loader reads it
        images = np.repeat(images, 3, axis=-1)
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).to(device).permute(0, 3, 1, 2).contiguous().float().div(255)
        with full_fp32(), torch.autocast(device.type, enabled=False):
            out.append(model(x)[0].flatten(1).double().cpu().numpy())  # [B, 2048, 1, 1] -> [B, 2048]
    return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))

"""Our U-Net as a diffusers model: the custom component of an export whose shape ``UNet2DModel`` cannot hold.

``python -m ddpm.export`` copies this file into the export as ``unet/ddpm_unet.py``, beside ``unet/unet.py`` and
``unet/architecture.py`` (``ddpm/unet.py`` and ``ddpm/architecture.py`` verbatim), and names it in
``model_index.json`` as ``["ddpm_unet", "DDPMUNet"]``, so that

    DDPMPipeline.from_pretrained(DIR, trust_remote_code=True)

builds the network with our own code and no other: this file imports torch, diffusers and its two siblings
(relatively) only. The weights keep our state-dict names; ``config.json`` holds our ``model`` section plus
``sample_size`` (the image side, which ``DDPMPipeline`` reads). Not imported by the rest of ``ddpm`` except
``ddpm.export``, inside its functions (the core package does not need diffusers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

# diffusers copies the files this one imports relatively, not theirs: name unet.py's own sibling here too
from .architecture import num_groups  # noqa: F401
from .unet import UNet


@dataclass
class DDPMUNetOutput(BaseOutput):
    """What ``UNet2DModel`` returns: ``sample``, eps [B, C, H, W]."""

    sample: torch.Tensor


class DDPMUNet(UNet, ModelMixin, ConfigMixin):
    """``ddpm.unet.UNet`` with diffusers' model interface: ``from_pretrained``, ``save_pretrained``, ``.config``.

    ``forward(sample [B, C, H, W], timestep (int, 0-dim or [B])) -> DDPMUNetOutput(sample=eps [B, C, H, W])``,
    the output ``DDPMPipeline`` reads; the numbers are ``UNet.forward``'s.
    """

    config_name = "config.json"
    from_config = vars(ConfigMixin)["from_config"]  # diffusers' (a config dict), not UNet's (a ModelConfig section)

    @register_to_config
    def __init__(self, sample_size: int = 64, in_channels: int = 3, base_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 2, 4), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (16, 8), num_heads: int = 4,
                 num_head_channels: int | None = None, dropout: float = 0.1, use_scale_shift_norm: bool = True):
        UNet.__init__(self, in_channels=in_channels, base_channels=base_channels, channel_mult=channel_mult,
                      num_res_blocks=num_res_blocks, attention_resolutions=attention_resolutions, num_heads=num_heads,
                      dropout=dropout, use_scale_shift_norm=use_scale_shift_norm, image_size=sample_size,
                      num_head_channels=num_head_channels)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int,
                return_dict: bool = True) -> DDPMUNetOutput | tuple[torch.Tensor]:
        """sample: x_t [B, C, H, W]; timestep: one t for the batch or [B] -> eps [B, C, H, W] (in ``.sample``)."""
        eps = UNet.forward(self, sample, torch.as_tensor(timestep, device=sample.device).reshape(-1))
        return DDPMUNetOutput(sample=eps) if return_dict else (eps,)

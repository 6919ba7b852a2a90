"""A new run from a diffusers model (``training.init_from``): a ``UNet2DModel`` folder, an export of ours
(``DDPMUNet``) or a pipeline folder with ``unet/``; the weights are checked against this run's model section first.

    training.init_from: DIR     # python -m ddpm.train: the run starts from DIR's weights (model and EMA)
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddpm.architecture import unet2d_config
from ddpm.config import Config, ModelConfig
from ddpm.diffusers_keys import CONFIG_KEYS, WEIGHTS, diffusers_to_ours
from ddpm.errors import CheckpointError, ConfigError, DDPMError
from ddpm.fsio import file_sha256

if TYPE_CHECKING:
    from ddpm.ema import EMA
    from ddpm.rundir import RunDir
    from ddpm.unet import UNet


def _first_difference(theirs: dict[str, Any], mc: ModelConfig, image_size: int) -> str | None:
    """The first field of a diffusers model config (``UNet2DModel`` or our ``DDPMUNet``) that is not this run's
    network, as "field=value, but ... gives value"; None when the weights fit. Dropout is the run's own choice."""
    cls = theirs.get("_class_name")
    if cls == "DDPMUNet":
        ours = {"sample_size": image_size, **{f.name: list(v) if isinstance(v := getattr(mc, f.name), tuple) else v
                                              for f in dataclasses.fields(mc)}}  # the json's lists
        keys = {k: "data.image_size" if k == "sample_size" else f"model.{k}" for k in ours}
        if mc.num_head_channels:  # the head count follows from the head size
            keys.pop("num_heads")
        full = {"num_head_channels": None, **theirs}  # exports from before the option have none
    elif cls == "UNet2DModel":
        from diffusers import UNet2DModel

        mine, why = unet2d_config(mc, image_size)
        if mine is None:
            return f"a UNet2DModel, which this run's model section cannot be: {why}"
        sig = inspect.signature(UNet2DModel.__init__).parameters
        defaults = {k: list(p.default) if isinstance(p.default, tuple) else p.default for k, p in sig.items()}
        ours = {**mine, **{k: v for k, v in defaults.items() if k not in mine}}  # in mine's order
        full = {**defaults, **{k: list(v) if isinstance(v, tuple) else v for k, v in theirs.items()}}
        chans = full.get("block_out_channels") or [0]
        full["time_embedding_dim"] = full.get("time_embedding_dim") or 4 * chans[0]
        if full.get("attn_norm_num_groups") is None and full.get("resnet_time_scale_shift") == "default":
            full["attn_norm_num_groups"] = full.get("norm_num_groups")  # the middle attention's norm
        widths = {c for c, b in zip(chans, full.get("down_block_types") or [], strict=False) if "Attn" in b}
        if full.get("attention_head_dim") is None and widths | {chans[-1]} == {mine["attention_head_dim"]}:
            full["attention_head_dim"] = mine["attention_head_dim"]  # None: one head as wide as its block
        keys = {k: CONFIG_KEYS.get(k, "") for k in [*ours, *full] if k != "self"}
    else:
        return f"_class_name={cls!r}: expected UNet2DModel (or DDPMUNet, an export of ours)"
    for key, ours_key in keys.items():
        if key != "dropout" and not key.startswith("_") and full.get(key) != ours.get(key):
            given = f"this run's {ours_key} gives" if ours_key else "our U-Net has"
            return f"{key}={full.get(key)!r}, but {given} {ours.get(key)!r}"
    return None


def start_from(model: UNet, ema: EMA, cfg: Config, run: RunDir | None) -> str:
    """Load ``training.init_from`` (a diffusers model folder, or a pipeline folder with ``unet/``) into ``model``
    and the EMA shadow: a new run's starting weights, bitwise those of the file. ``run`` (the main rank's;
    None elsewhere) gets the source in provenance.json. Returns the line to print; a mismatch is one ConfigError
    naming the first differing field, a missing or unreadable file one CheckpointError."""
    from ddpm.provenance import add_to_provenance

    src = Path(str(cfg.training.init_from))
    folder = src / "unet" if (src / "unet" / "config.json").is_file() else src
    try:
        theirs = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"training.init_from: {folder / 'config.json'}: not a readable diffusers model "
                              f"config ({type(err).__name__})") from None
    problem = _first_difference(theirs, cfg.model, cfg.data.image_size)
    if problem is not None:
        raise ConfigError(f"training.init_from: {folder}: {problem}")
    file = folder / WEIGHTS
    try:
        from safetensors.torch import load_file

        weights = load_file(str(file))
        if theirs["_class_name"] == "UNet2DModel":
            weights = diffusers_to_ours(weights, len(cfg.model.channel_mult), cfg.model.num_res_blocks)
        model.load_state_dict(weights)
    except ImportError:
        raise DDPMError("training.init_from needs safetensors and diffusers: pip install -e '.[export]'") from None
    except (OSError, RuntimeError, KeyError, ValueError) as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"training.init_from: {file}: {reason}") from None
    for name, value in model.state_dict().items():
        ema.shadow[name].copy_(value)
    if run is not None:
        add_to_provenance(run, init_from={"path": str(folder.resolve()), "class": theirs["_class_name"],
                                              "weights_sha256": file_sha256(file)})
    return f"started from {folder} ({theirs['_class_name']}, {file.name})"

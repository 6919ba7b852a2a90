"""Share a model the way the field does: a run as a diffusers pipeline folder, and new runs from one.

    python -m ddpm.export RUN_DIR --out DIR [--checkpoint best|latest|step_N|PATH] [--no-ema] [--overwrite]

The way back, a new run from such a folder (``training.init_from``), is :mod:`ddpm.init_from`; the weight names
of both ways are :mod:`ddpm.diffusers_keys`.

DIR holds ``model_index.json`` (a ``DDPMPipeline``), ``scheduler/scheduler_config.json`` (a ``DDPMScheduler``
with our schedule, variance, x0 clipping and timestep spacing), ``unet/config.json`` and
``unet/diffusion_pytorch_model.safetensors``, ``README.md`` (a model card the Hub reads) and ``samples.png``
(the run's ``samples/grid.png``, when there is one). Exact or nothing, two routes:

* a ``UNet2DModel`` (``diffusers.DDPMPipeline.from_pretrained(DIR)``) when ``ddpm.architecture.unet2d_config``
  says it computes what ours does: one GroupNorm group count and one attention head size for the whole network
  (widths divisible by 32, and ``model.num_head_channels`` set or attention at one width only);
* otherwise our U-Net as a custom component (``ddpm.diffusers_unet.DDPMUNet`` with ``ddpm/unet.py`` and
  ``ddpm/architecture.py``, in ``unet/``), loaded with ``trust_remote_code=True``. The reference config (4 heads at
  widths 256 and 512) takes this route.

The exported network's eps is checked against ours before anything is written. The folder is built under a
temporary name beside ``--out`` and renamed at the end; nothing of the run directory changes. diffusers and
safetensors are the ``export`` extra; they are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from ddpm.architecture import unet2d_config
from ddpm.checkpoint import CheckpointRef, load_checkpoint, load_resolved
from ddpm.config import Config, ModelConfig, config_from_dict
from ddpm.diffusers_keys import ours_to_diffusers
from ddpm.errors import CheckpointError, DDPMError, cli_entry
from ddpm.rundir import RunDir
from ddpm.unet import UNet

if TYPE_CHECKING:
    from torch import nn


CUSTOM_FILES = {"ddpm_unet.py": "diffusers_unet.py", "unet.py": "unet.py", "architecture.py": "architecture.py"}
def scheduler_config(cfg: Config) -> dict[str, Any]:
    """``DDPMScheduler`` settings of our ancestral sampler: linear betas, eps prediction, ``ddpm.variance``
    (fixed_small = beta~_t, fixed_large = beta_t), x0 clipped to [-1, 1] (``DDPM.sample``'s ``clip_denoised``),
    and ``sampling.timestep_spacing`` for fewer steps than T."""
    d = cfg.ddpm
    return dict(num_train_timesteps=d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end,
                beta_schedule="linear", trained_betas=None, variance_type=d.variance, clip_sample=True,
                clip_sample_range=1.0, prediction_type="epsilon", thresholding=False,
                timestep_spacing=cfg.sampling.timestep_spacing, steps_offset=0, rescale_betas_zero_snr=False)


def diffusers_model(model_config: dict[str, Any], weights: dict[str, torch.Tensor]) -> tuple[nn.Module, bool]:
    """(the diffusers model holding ``weights``, whether it is a plain ``UNet2DModel``) for a checkpoint's
    ``model_config``: a ``UNet2DModel`` when one computes what ours does, else ``DDPMUNet`` (our code)."""
    from diffusers import UNet2DModel

    from ddpm.diffusers_unet import DDPMUNet

    conf = dict(model_config)
    size = conf.pop("image_size")
    mc = ModelConfig(**conf)
    ucfg, _ = unet2d_config(mc, size)
    if ucfg is not None:
        net = UNet2DModel(**ucfg)
        net.load_state_dict(ours_to_diffusers(weights, len(mc.channel_mult), mc.num_res_blocks))
    else:
        net = DDPMUNet(sample_size=size, **conf)
        net.load_state_dict(weights)
    return net.eval(), ucfg is not None


@torch.no_grad()
def check_same_eps(ours: UNet, theirs: nn.Module, num_timesteps: int) -> float:
    """max |eps_ours - eps_theirs| on random x_t at t = 0, T/2, T-1 (float32); ValueError when it exceeds
    1e-4 x the output's scale (a different network, never written)."""
    c, s = ours.config_dict()["in_channels"], ours.config_dict()["image_size"]
    x = torch.randn(3, c, s, s, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, num_timesteps // 2, num_timesteps - 1])
    a, b = ours.eval()(x, t), theirs(x, t, return_dict=False)[0]
    diff = float((a - b).abs().max())
    if not diff <= 1e-4 * max(float(a.abs().max()), 1.0):
        raise ValueError(f"the diffusers model's eps differs from ours by {diff:.3g}")
    return diff


# ---- export --------------------------------------------------------------------------------------------
def resolve(run: RunDir, choice: str | None) -> tuple[Path, dict[str, Any]]:
    """(path, state) of ``--checkpoint``: best (eval/fid.json), latest, step_<N> or a file; default best when
    the eval stage ran, else latest. One CheckpointError line when missing or unreadable."""
    choice = choice or ("best" if run.fid.is_file() else "latest")
    try:
        found, _ = CheckpointRef.parse(choice).resolve(run)
    except ValueError:  # any other file name
        return Path(choice), load_checkpoint(choice)
    return load_resolved(found)


def export(run: RunDir, out: Path, checkpoint: str | None = None, use_ema: bool = True, overwrite: bool = False,
           license_id: str = "other") -> Path:
    """Write the pipeline folder of one checkpoint of ``run`` at ``out`` (see the module docstring)."""
    out = Path(out)
    if not run.path.is_dir():
        raise DDPMError(f"{run}: no such run directory")
    if out.resolve().is_relative_to(run.path.resolve()):
        raise DDPMError(f"--out {out}: inside the run directory {run}, which export never changes")
    if out.exists() and not overwrite:
        raise DDPMError(f"--out {out}: exists (pass --overwrite to replace it)")
    path, state = resolve(run, checkpoint)
    if use_ema and "shadow" not in (state.get("ema") or {}):
        raise CheckpointError(f"{path}: has no EMA weights (export the raw weights with --no-ema)")
    weights = state["ema"]["shadow"] if use_ema else state["model"]
    cfg = config_from_dict(state["config"])
    try:
        import diffusers
        from diffusers import DDPMScheduler
    except ImportError:
        raise DDPMError("export needs diffusers and safetensors: pip install -e '.[export]'") from None
    ours = UNet(**state["model_config"])
    ours.load_state_dict(weights)
    net, plain = diffusers_model(state["model_config"], weights)
    try:
        check_same_eps(ours, net, cfg.ddpm.num_timesteps)
    except ValueError as err:
        raise DDPMError(f"{path}: not exported: {err}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        net.save_pretrained(tmp / "unet", safe_serialization=True)
        if not plain:
            for name, source in CUSTOM_FILES.items():
                shutil.copyfile(Path(__file__).with_name(source), tmp / "unet" / name)
        DDPMScheduler(**scheduler_config(cfg)).save_pretrained(tmp / "scheduler")
        unet_entry = ["diffusers", "UNet2DModel"] if plain else ["ddpm_unet", "DDPMUNet"]
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", "DDPMScheduler"], "unet": unet_entry}, indent=2) + "\n")
        grid = run.samples.grid
        if grid.is_file():
            shutil.copyfile(grid, tmp / "samples.png")
        (tmp / "README.md").write_text(model_card(run, cfg, path, state, use_ema, plain, license_id))
        if out.exists():  # --overwrite: the old folder goes only once the new one is complete
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _shared_config(cfg: Config) -> dict[str, Any]:
    """The sections that made the weights, without local paths (data.path and the like: nobody else's)."""
    out = {}
    for name in ("model", "training", "ddpm", "data", "sampling"):
        sec = getattr(cfg, name)
        out[name] = {f.name: getattr(sec, f.name) for f in dataclasses.fields(sec) if not f.metadata.get("path")}
    return out


def _fid_lines(run: RunDir, step: int) -> list[str]:
    """The model card's FID paragraph from eval/fid.json, when the eval stage ran."""
    try:
        fid = json.loads(run.fid.read_text())
        best, rows = fid["best"], {int(r["step"]): r for r in fid["rows"]}
    except (OSError, ValueError, KeyError, TypeError):
        return []
    how = (f"{fid.get('num_seeds')} set(s) of {fid.get('num_samples')} samples, {fid.get('sampler')} sampler with "
           f"{fid.get('num_steps')} steps, reference statistics `{Path(str(fid.get('fid_reference'))).name}`")
    row = rows.get(step)
    this = (f"FID of this checkpoint: **{row['mean']:.2f}** (std {row['std']:.2f})" if row is not None
            else "This checkpoint was not evaluated")
    return ["## Evaluation", "", f"{this}; the run's best: {best['mean']:.2f} at step {best['step']}. "
            f"Each FID is the mean over {how} (`python -m ddpm.evaluate`, Inception pt_inception-2015-12-05).", ""]


def model_card(run: RunDir, cfg: Config, path: Path, state: dict[str, Any], use_ema: bool, plain: bool,
               license_id: str) -> str:
    """README.md of the export: the Hub's YAML header, what was trained how, FID, samples, how to load."""
    step, d, s = int(state["step"]), cfg.ddpm, cfg.data.image_size
    tags = ["pytorch", "diffusers", "unconditional-image-generation", "ddpm", "ddpm-slurm", cfg.data.source]
    header = yaml.safe_dump({"library_name": "diffusers", "pipeline_tag": "unconditional-image-generation",
                             "license": license_id, "tags": tags}, sort_keys=False)
    trust = "" if plain else ", trust_remote_code=True"
    route = ("a diffusers `UNet2DModel` (checked to give our network's eps)" if plain else
             "our U-Net as a custom diffusers component (`unet/ddpm_unet.py` with `unet.py` and `architecture.py`, "
             "the code it was trained with): `UNet2DModel` has one attention head size and one GroupNorm group count "
             "for the whole network, this one does not, so loading needs `trust_remote_code=True`")
    grid = []
    if run.samples.grid.is_file():
        try:
            m = json.loads(run.samples.metrics.read_text())
            what = f" (step {m.get('step')}, {m['sampler']['sampler']} sampler, {m['sampler']['num_steps']} steps)"
        except (OSError, ValueError, KeyError, TypeError):
            what = ""
        grid = ["## Samples", "", "![samples](samples.png)", "", f"The run's final sample grid{what}.", ""]
    load = [
        "```python", "import torch", "from diffusers import DDPMPipeline", "",
        f'pipe = DDPMPipeline.from_pretrained("THIS_FOLDER_OR_REPO"{trust})',
        f"images = pipe(batch_size=16, num_inference_steps={d.num_timesteps}, "
        "generator=torch.Generator().manual_seed(0)).images  # PIL images", "```", "",
        "Fewer steps respace the schedule (`num_inference_steps=100`). Upload this folder with",
        "`huggingface-cli upload USER/REPO THIS_FOLDER .`; fine-tune from it with `training.init_from: THIS_FOLDER` "
        "in a ddpm-slurm config whose `model` section matches `unet/config.json`.", ""]
    body = [
        f"# DDPM {s}x{s}: {cfg.run.name}", "",
        f"An unconditional DDPM (Ho et al. 2020) trained with ddpm-slurm on `{cfg.data.source}` images at {s}x{s}: "
        f"the {'EMA' if use_ema else 'raw (not EMA)'} weights of step {step} ({step * cfg.training.batch_size:,} "
        f"images seen, batch {cfg.training.batch_size}), checkpoint `{path.name}`. The network is {route}.", "",
        f"Schedule: T = {d.num_timesteps}, linear betas {d.beta_start} to {d.beta_end}, eps prediction, variance "
        f"{d.variance}, x0 clipped to [-1, 1], timestep spacing {cfg.sampling.timestep_spacing}: the `DDPMScheduler` "
        "in `scheduler/` takes the ancestral step our sampler takes. (diffusers adds noise at a last step t > 0, "
        "which trailing spacing has; Ho et al.'s Algorithm 2 does not.)", "",
        *_fid_lines(run, step), *grid, "## Use", "", *load,
        "## Training config", "", "```yaml", yaml.safe_dump(_shared_config(cfg), sort_keys=False).rstrip(), "```", ""]
    return f"---\n{header}---\n\n" + "\n".join(body)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm.export", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="the run directory")
    p.add_argument("--out", type=Path, required=True, help="the folder to write (refused if it exists)")
    p.add_argument("--checkpoint", help="best, latest, step_<N> or a checkpoint file (default: best when "
                   "eval/fid.json exists, else latest)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (once the new one is ready)")
    p.add_argument("--license", default="other", help="the model card's license field (default: other)")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = export(RunDir(args.run_dir), args.out, args.checkpoint, not args.no_ema, args.overwrite, args.license)
    print(f"exported {args.run_dir} -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

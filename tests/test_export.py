"""ddpm.export: a run as a diffusers pipeline folder, and ``training.init_from`` back (README, Share a model).

Four exports: a tiny trained run (tiny_cpu.yaml, widths 16 and 32: GroupNorms of 16, 24 and 32 groups, so the
custom-component route) and the same with a diffusers-exact shape (base 32, ``num_head_channels`` 16: a plain
``UNet2DModel``); the reference model (configs/ddpm_babel.yaml at 64x64, random weights) as configured (4 heads at
widths 256 and 512: custom) and with ``num_head_channels=64`` (``UNet2DModel``). Checked:

* each exported network, loaded by diffusers from the folder, gives our eps on random x_t, t: float32 <= 1e-5,
  float64 <= 1e-10 (measured: the custom route bitwise, being our code; UNet2DModel up to 2.2e-6 and 9.0e-15);
* the exported scheduler's ``step`` is our ancestral step given the same eps and noise: float64 with our schedule
  1e-12; as loaded, float32, 3e-4 relative (its float32 schedule's rounding near t = 0, measured up to 1.3e-4);
* ``DDPMPipeline`` makes 5-step images of the right shape and range, equal to ``DDPM.sample``'s with the same
  seeds (1e-4; measured 1.2e-6), and the custom route loads in a process that cannot import ``ddpm``;
* ``training.init_from`` of an export gives bitwise the exported weights; a mismatch names the first field;
* bad input is one line, exit 2, nothing written, the run directory untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from helpers import BABEL_CONFIG as BABEL
from helpers import ROOT, TINY_CONFIG, randomize, run_main
from torch import nn

try:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
except ImportError as err:  # a hard failure, not a skip: diffusers is part of the test extra
    raise ImportError("tests/test_export.py needs diffusers, a test extra: pip install -e '.[test]'") from err

from ddpm.architecture import unet2d_config
from ddpm.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from ddpm.config import ModelConfig, load_config
from ddpm.diffusers_keys import diffusers_to_ours, ours_to_diffusers
from ddpm.diffusion import DDPM
from ddpm.errors import ConfigError, DDPMError
from ddpm.export import export, main
from ddpm.rundir import RunDir
from ddpm.unet import UNet

EXACT_TINY = ("model.base_channels=32", "model.num_head_channels=16")
ROUTES = {"tiny": False, "tiny_exact": True, "reference": False, "reference_exact": True}  # plain UNet2DModel?


@pytest.fixture(scope="module")
def runs(make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run directories: the two tiny trained runs and two reference-model runs with one random checkpoint."""
    out = {"tiny": make_checkpoint().parents[1], "tiny_exact": make_checkpoint(*EXACT_TINY).parents[1]}
    for name, extra in (("reference", []), ("reference_exact", ["model.num_head_channels=64"])):
        cfg = load_config(BABEL, ["data.image_size=64", "ddpm.num_timesteps=1000", *extra])
        torch.manual_seed(0)
        model = randomize(UNet.from_config(cfg.model, 64), 0.02)  # the zero-initialised layers too
        sd = model.state_dict()
        run = tmp_path_factory.mktemp(name)
        save_checkpoint(RunDir(run), {"format": FORMAT, "step": 0, "model": sd, "model_config": model.config_dict(),
                              "ddpm": DDPM.from_config(cfg.ddpm, model).state_dict(), "config": cfg.to_dict(),
                              "ema": {"decay": 0.9999, "start_step": 0, "shadow": sd}})
        out[name] = run
    return out


@pytest.fixture(scope="module")
def exports(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {name: export(RunDir(run), root / name) for name, run in runs.items()}


def ours_of(run: Path, ema: bool = True) -> tuple[UNet, dict]:
    state = load_checkpoint(sorted((run / "checkpoints").glob("step_*.pt"))[-1])
    model = UNet(**state["model_config"])
    model.load_state_dict(state["ema"]["shadow"] if ema else state["model"])
    return model.eval(), state


def load_pipeline(folder: Path) -> DDPMPipeline:
    plain = json.loads((folder / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DModel"]
    return DDPMPipeline.from_pretrained(str(folder), **({} if plain else {"trust_remote_code": True}))


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ---- routes and the weight mapping ------------------------------------------------------------------------
def test_which_configs_take_which_route() -> None:
    tiny = load_config(TINY_CONFIG)
    assert "groups" in unet2d_config(tiny.model, 8)[1]
    assert unet2d_config(load_config(TINY_CONFIG, EXACT_TINY).model, 8)[0] is not None
    reference = load_config(BABEL).model
    cfg, why = unet2d_config(reference, 64)
    assert cfg is None and "sizes [64, 128]" in why and "num_head_channels" in why
    cfg, _ = unet2d_config(ModelConfig(num_head_channels=64), 64)
    assert cfg is not None and cfg["attention_head_dim"] == 64 and cfg["norm_num_groups"] == 32


def test_the_core_package_does_not_import_diffusers() -> None:
    code = ("import sys, ddpm.train, ddpm.export, ddpm.sample, ddpm.evaluate, ddpm.data; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'safetensors')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_weight_mapping_round_trips_and_rejects_strangers() -> None:
    mc = ModelConfig(base_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[8],
                     num_head_channels=16)
    sd = randomize(UNet.from_config(mc, 16)).state_dict()
    theirs = ours_to_diffusers(sd, 2, 1)
    net = UNet2DModel(**unet2d_config(mc, 16)[0])
    net.load_state_dict(theirs)  # strict: every parameter of UNet2DModel is named
    back = diffusers_to_ours(theirs, 2, 1)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(KeyError, match="class_embedding.weight"):
        diffusers_to_ours({**theirs, "class_embedding.weight": torch.zeros(1)}, 2, 1)


# ---- the exported network and scheduler --------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ROUTES))
def test_exported_unet_gives_our_eps(name: str, runs: dict[str, Path], exports: dict[str, Path]) -> None:
    folder = exports[name]
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "unet" / "ddpm_unet.py").is_file() != ROUTES[name]
    ours, state = ours_of(runs[name])
    theirs = load_pipeline(folder).unet.eval()
    assert isinstance(theirs, UNet2DModel) == ROUTES[name]
    size, c = state["model_config"]["image_size"], state["model_config"]["in_channels"]
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, c, size, size, generator=g), torch.randint(0, 1000, (2,), generator=g)
    with torch.no_grad():
        eps = ours(x, t)
        assert float(eps.abs().max()) > 0.1  # a real output
        assert max_abs(theirs(x, t).sample, eps) <= 1e-5
        assert ROUTES[name] or torch.equal(theirs(x, t).sample, eps)  # the custom route runs our own code
        assert max_abs(theirs.double()(x.double(), t).sample, ours.double()(x.double(), t)) <= 1e-10


@pytest.mark.parametrize("name", ["tiny", "reference_exact"])
def test_exported_scheduler_takes_our_ancestral_step(name: str, runs: dict[str, Path],
                                                     exports: dict[str, Path]) -> None:
    _, state = ours_of(runs[name])
    sched = DDPMScheduler.from_pretrained(str(exports[name] / "scheduler"))
    assert (sched.config.prediction_type, sched.config.clip_sample, sched.config.clip_sample_range,
            sched.config.variance_type) == ("epsilon", True, 1.0, state["ddpm"]["variance"])
    ddpm = DDPM(nn.Identity(), **state["ddpm"])
    T = ddpm.num_timesteps
    # float32 as loaded: diffusers' float32 1 - abar_t near t = 0 (measured up to 1.3e-4 at t = 2, 2.5e-7 at T/2)
    for dtype, rtol in ((torch.float32, 3e-4), (torch.float64, 1e-12)):
        if dtype == torch.float64:  # the step's algebra alone: our float64 schedule in the scheduler
            sched.betas, sched.alphas, sched.alphas_cumprod = ddpm.betas, ddpm.alphas, ddpm.alphas_cumprod
            sched.one = torch.tensor(1.0, dtype=torch.float64)
        for k, t in enumerate([0, 1, 2, T // 2, T - 2, T - 1]):
            g = torch.Generator().manual_seed(k)
            x_t, eps = 1.5 * torch.randn(2, 3, 4, 4, generator=g, dtype=dtype), torch.randn(2, 3, 4, 4, generator=g,
                                                                                          dtype=dtype)
            ddpm.model = lambda x, _t, e=eps: e  # noqa: E731
            noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(100 + k), dtype=dtype)
            ours = ddpm.reverse_process(x_t, torch.full((2,), t), noise)
            theirs = sched.step(eps, t, x_t, generator=torch.Generator().manual_seed(100 + k)).prev_sample
            assert max_abs(ours, theirs) <= rtol * float(theirs.abs().max()), (dtype, t)


@pytest.mark.parametrize("name", ["tiny", "tiny_exact"])
def test_pipeline_samples_like_ours(name: str, runs: dict[str, Path], exports: dict[str, Path]) -> None:
    ours, state = ours_of(runs[name])
    pipe = load_pipeline(exports[name])
    seeds = [3, 14]
    images = pipe(batch_size=2, num_inference_steps=5, output_type="pt",
                  generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    size, c = state["model_config"]["image_size"], state["model_config"]["in_channels"]
    assert images.shape == (2, c, size, size) and images.min() >= 0 and images.max() <= 1
    cfg = state["config"]
    expected = DDPM(ours, **state["ddpm"]).sample(2, (c, size, size), num_steps=5, sampler="ddpm", seeds=seeds,
                                                  timestep_spacing=cfg["sampling"]["timestep_spacing"],
                                                  progress=False)
    assert max_abs(images, (expected / 2 + 0.5).clamp(0, 1)) <= 1e-4


def test_custom_route_loads_without_our_code(exports: dict[str, Path], tmp_path: Path) -> None:
    code = ("import sys; sys.modules['ddpm'] = None\n"  # `import ddpm` fails: only the folder's code is there
            "from diffusers import DDPMPipeline\n"
            f"pipe = DDPMPipeline.from_pretrained({str(exports['tiny'])!r}, trust_remote_code=True)\n"
            "img = pipe(batch_size=2, num_inference_steps=5, output_type='np').images\n"
            "print(type(pipe.unet).__name__, img.shape, float(img.min()) >= 0, float(img.max()) <= 1)")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["DDPMUNet", "(2,", "8,", "8,", "3)", "True", "True"]


def test_model_card_and_folder(runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["tiny"], run)
    _, state = ours_of(run)
    step = state["step"]
    (run / "samples").mkdir()
    (run / "samples" / "grid.png").write_bytes(b"\x89PNG fake")
    (run / "eval").mkdir()
    (run / "eval" / "fid.json").write_text(json.dumps({
        "rows": [{"step": step, "mean": 12.5, "std": 0.25}], "best": {"step": step, "mean": 12.5},
        "num_samples": 100, "num_seeds": 2, "sampler": "ddim", "num_steps": 50, "fid_reference": "/x/celeba.npz"}))
    out = export(RunDir(run), tmp_path / "out", checkpoint=f"step_{step}")
    text = (out / "README.md").read_text()
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["library_name"] == "diffusers" and header["pipeline_tag"] == "unconditional-image-generation"
    assert "license" in header and "ddpm" in header["tags"]
    batch = state["config"]["training"]["batch_size"]
    assert f"step {step} ({step * batch:,} images seen" in text and "trust_remote_code=True" in text
    assert "**12.50**" in text and "2 set(s) of 100 samples, ddim sampler with 50 steps" in text
    assert (out / "samples.png").read_bytes() == b"\x89PNG fake" and "![samples](samples.png)" in text
    assert "data/tiny" not in text and str(run) not in text  # no local paths
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["unet"] == ["ddpm_unet", "DDPMUNet"]


# ---- training.init_from -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,overrides", [("tiny", ()), ("tiny_exact", EXACT_TINY)])
def test_init_from_an_export_gives_the_exported_weights(name: str, overrides: tuple[str, ...], make_trainer,
                                                        runs: dict[str, Path], exports: dict[str, Path],
                                                        tmp_path: Path) -> None:
    _, state = ours_of(runs[name])
    trainer = make_trainer(tmp_path / "new", *overrides, f"training.init_from={exports[name]}")
    assert trainer.step == 0
    for k, v in state["ema"]["shadow"].items():
        assert torch.equal(trainer.model.state_dict()[k], v) and torch.equal(trainer.ema.shadow[k], v), k
    record = json.loads((tmp_path / "new" / "provenance.json").read_text())["starts"][-1]["init_from"]
    assert record["path"] == str((exports[name] / "unet").resolve()) and len(record["weights_sha256"]) == 64
    resumed = tmp_path / "resumed"  # a run with a checkpoint of its own resumes from it
    shutil.copytree(runs[name], resumed)
    trainer = make_trainer(resumed, *overrides, f"training.init_from={exports[name]}")
    assert trainer.step == state["step"]
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in state["model"].items())


@pytest.mark.parametrize("name,overrides,message", [
    ("tiny_exact", ("model.base_channels=64", "model.num_head_channels=16"),
     "block_out_channels=[32, 64], but this run's model.base_channels and channel_mult gives [64, 128]"),
    ("tiny_exact", ("model.base_channels=32",),  # 2 heads: at width 64 only, so a UNet2DModel, of head size 32
     "attention_head_dim=16, but this run's model.num_heads or num_head_channels gives 32"),
    ("tiny_exact", (), "a UNet2DModel, which this run's model section cannot be: its GroupNorms have [16, 24, 32]"),
    ("tiny", ("model.num_res_blocks=2",), "num_res_blocks=1, but this run's model.num_res_blocks gives 2"),
    ("tiny", ("data.image_size=16", "model.attention_resolutions=[8]"),
     "sample_size=8, but this run's data.image_size gives 16"),
])
def test_init_from_mismatch_is_one_line(name: str, overrides: tuple[str, ...], message: str, make_trainer,
                                        exports: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        make_trainer(tmp_path / "new", *overrides, f"training.init_from={exports[name]}")
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "new" / "checkpoints").exists()


def test_init_from_a_published_config_names_the_first_difference(exports: dict[str, Path], make_trainer,
                                                                  tmp_path: Path) -> None:
    folder = tmp_path / "published"
    shutil.copytree(exports["tiny_exact"] / "unet", folder)
    conf = json.loads((folder / "config.json").read_text())
    for key in ("time_embedding_dim", "norm_eps", "act_fn"):
        conf.pop(key)  # diffusers' defaults stand in for them: the same network
    (folder / "config.json").write_text(json.dumps(conf))
    make_trainer(tmp_path / "ok", *EXACT_TINY, f"training.init_from={folder}")
    # not this one: with scale_shift, diffusers' default (None) leaves the middle attention without its GroupNorm
    (folder / "config.json").write_text(json.dumps({**conf, "attn_norm_num_groups": None}))
    with pytest.raises(ConfigError, match=r"attn_norm_num_groups=None, but our U-Net has 32$"):
        make_trainer(tmp_path / "no_norm", *EXACT_TINY, f"training.init_from={folder}")
    (folder / "config.json").write_text(json.dumps({**conf, "flip_sin_to_cos": False, "freq_shift": 1}))
    with pytest.raises(ConfigError, match=r"freq_shift=1, but our U-Net has 0$"):  # the first of the two
        make_trainer(tmp_path / "bad", *EXACT_TINY, f"training.init_from={folder}")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "config.json").write_text(json.dumps(conf))
    with pytest.raises(DDPMError, match="diffusion_pytorch_model.safetensors"):
        make_trainer(tmp_path / "gone", *EXACT_TINY, f"training.init_from={folder}")


# ---- the command line ---------------------------------------------------------------------------------------
def test_cli_exports_and_refuses_bad_input(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    run = runs["tiny"]
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    out = tmp_path / "out"
    proc = run_main(main, [run, "--out", out, "--no-ema"], capsys)
    assert proc.code == 0 and out.is_dir(), proc.err
    raw, _ = ours_of(run, ema=False)
    unet = load_pipeline(out).unet
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in raw.state_dict().items())  # --no-ema
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    cases = [([str(run), "--out", str(out)], "exists (pass --overwrite"),
             ([str(run), "--out", str(tmp_path / "a"), "--checkpoint", "step_999"], "step_999"),
             ([str(run), "--out", str(tmp_path / "b"), "--checkpoint", str(corrupt)], "corrupt or truncated"),
             ([str(run), "--out", str(tmp_path / "c"), "--checkpoint", "best"], "eval/fid.json"),
             ([str(tmp_path / "nope"), "--out", str(tmp_path / "d")], "no such run directory"),
             ([str(run), "--out", str(run / "export")], "inside the run directory")]
    capsys.readouterr()
    for args, message in cases:
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.pt", "out"]  # nothing else written
    stamp = (out / "model_index.json").stat().st_mtime_ns
    assert main([str(run), "--out", str(out), "--overwrite"]) == 0
    assert (out / "model_index.json").stat().st_mtime_ns != stamp and not list(tmp_path.glob(".out*"))
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # the run directory is untouched


def test_launch_refuses_an_init_from_that_is_no_model_folder(images, tmp_path, capsys):
    """The login node names a wrong ``training.init_from`` in one line before anything is queued."""
    import launch

    proc = run_main(launch.main, ["--config", TINY_CONFIG, f"data.path={images}", f"run.root={tmp_path}",
                                  f"training.init_from={tmp_path}", "--cluster", "local"], capsys)
    assert proc.code == 2 and proc.err_lines == [
        f"error: training.init_from: {tmp_path} is not a diffusers model folder (no config.json or unet/config.json; "
        "python -m ddpm.export writes one)"], proc.err
    assert not (tmp_path / "tiny").exists()

"""Config tree: reference values, overrides, every validation path, the CLI's one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import re
import subprocess
import sys

import pytest
import yaml
from helpers import ROOT, TINY_CONFIG

from ddpm.config import (
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    SamplingConfig,
    TrainingConfig,
    config_from_dict,
    dump_config,
    load_config,
)
from ddpm.configtools import parse_with_overrides
from ddpm.errors import ConfigError, DDPMError
from ddpm.evaluate import eval_sampling
from ddpm.rundir import RunDir
from ddpm.samplers import sampler_names

BABEL = ROOT / "configs" / "ddpm_babel.yaml"
SAMPLERS = ", ".join(sampler_names())  # the registry's (ddpm/samplers/): a new sampler module adds its name
TINY = TINY_CONFIG
MODAL = ROOT / "configs" / "ddpm_modal.yaml"


def test_reference_values():
    cfg = load_config(BABEL)
    assert cfg.training.learning_rate == 0.0002 and isinstance(cfg.training.learning_rate, float)
    assert cfg.model.channel_mult == (1, 2, 2, 4)
    assert (cfg.model.base_channels, cfg.model.num_res_blocks, cfg.model.num_heads) == (128, 2, 4)
    assert cfg.model.attention_resolutions == (16, 8) and cfg.model.dropout == 0.1
    assert cfg.model.use_scale_shift_norm is True
    t = cfg.training
    assert (t.batch_size, t.weight_decay, t.betas, t.ema_decay, t.ema_start) == (64, 0.0, (0.9, 0.999),
                                                                              0.9999, 5000)
    assert (t.gradient_clip_norm, t.num_iterations, t.log_every, t.sample_every, t.save_every,
            t.num_samples) == (1.0, 100000, 100, 5000, 10000, 64)
    assert (cfg.ddpm.num_timesteps, cfg.ddpm.beta_start, cfg.ddpm.beta_end) == (1000, 0.0001, 0.02)
    assert cfg.sampling.num_steps == 1000
    assert (cfg.infrastructure.num_gpus, cfg.infrastructure.precision) == (1, "bf16")
    assert (cfg.data.source, cfg.data.image_size) == ("celeba", 64)
    assert cfg.slurm.signal_delay_s >= 120 and cfg.slurm.partition


def test_babel_and_modal_share_hyperparameters():
    babel, modal = load_config(BABEL).to_dict(), load_config(MODAL).to_dict()
    for section in ("model", "training", "ddpm", "sampling", "infrastructure"):
        assert babel[section] == modal[section], section
    for key in ("source", "image_size", "center_crop", "random_flip", "split"):
        assert babel["data"][key] == modal["data"][key]


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


def test_overrides_are_yaml():
    cfg = load_config(BABEL, ["training.batch_size=8", "model.channel_mult=[1,2]", "model.attention_resolutions=[32]",
                              "data.center_crop=null",
                              "training.learning_rate=2e-4", "slurm.additional={constraint: A6000}"])
    assert cfg.training.batch_size == 8 and cfg.model.channel_mult == (1, 2)
    assert cfg.data.center_crop is None and cfg.training.learning_rate == 2e-4
    assert cfg.slurm.additional == {"constraint": "A6000"}


def test_scientific_notation_string_is_float(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("training:\n  learning_rate: 1e-4\n  weight_decay: 0\n")
    cfg = load_config(p)
    assert cfg.training.learning_rate == 1e-4 and isinstance(cfg.training.weight_decay, float)


def test_env_vars_in_paths_expand(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_TEST_ROOT", str(tmp_path))
    cfg = load_config(None, ["run.root=${DDPM_TEST_ROOT}/runs"])
    assert cfg.run.root == f"{tmp_path}/runs" and cfg.run_dir.path == tmp_path / "runs" / "ddpm"


def test_learning_rate_warm_up_and_cool_down() -> None:
    tc = load_config(None, ["training.num_iterations=10", "training.learning_rate=1.0", "training.warmup_steps=2",
                            "training.cooldown_steps=4"]).training
    assert [tc.lr_at(s) for s in range(10)] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert load_config(None).training.lr_at(123) == 2e-4  # the reference: constant (Ho et al.)


# (overrides, the one-line error's start): the YAML fuzz; Python-built sections must raise the same lines (below)
VALIDATION = [
    (["training.lerning_rate=1"],
     "training.lerning_rate: unknown key (did you mean training.learning_rate?)"),
    (["trainng.batch_size=1"], "trainng: unknown section (did you mean training?)"),
    (["training.batch_size=abc"], "training.batch_size: invalid value 'abc' (expected int)"),
    (["training.batch_size=1.5"], "training.batch_size: invalid value 1.5 (expected int)"),
    (["training.batch_size=true"], "training.batch_size: invalid value True (expected int)"),
    (["training.batch_size=0"], "training.batch_size: invalid value 0 (expected an integer >= 1)"),
    (["training.learning_rate=-1"], "training.learning_rate: invalid value -1.0 (expected a float > 0)"),
    (["training.num_iterations=100", "training.warmup_steps=50", "training.cooldown_steps=60"],
     "training.cooldown_steps: invalid value 60 (expected an integer <= num_iterations - warmup_steps (100 - 50))"),
    (["model.channel_mult=4"], "model.channel_mult: invalid value 4 (expected a list of int)"),
    (["model.channel_mult=[1,x]"], "model.channel_mult[1]: invalid value 'x' (expected int)"),
    (["model.dropout=1.0"], "model.dropout: invalid value 1.0 (expected a float in [0, 1))"),
    (["model.use_scale_shift_norm=maybe"], "model.use_scale_shift_norm: invalid value 'maybe' (expected bool)"),
    (["sampling.sampler=euler"], f"sampling.sampler: invalid value 'euler' (expected one of {SAMPLERS})"),
    (["sampling.timestep_spacing=linspace"], "sampling.timestep_spacing: invalid value 'linspace'"),
    (["data.source=s3"], "data.source: invalid value 's3'"),
    (["data.crop_center=[89]"], "data.crop_center: invalid value [89] (expected null or [x, y]"),
    (["data.center_crop=null", "data.crop_center=[89,121]"],
     "data.crop_center: invalid value [89, 121] (expected null when"),
    (["data.image_size=60"], "data.image_size: invalid value 60 (expected divisible by"),
    (["slurm.signal_delay_s=20"], "slurm.signal_delay_s: invalid value 20"),
    (["slurm.time_min=4"], "slurm.time_min: invalid value 4 (expected more than 4 minutes"),
    (["ddpm.beta_end=0.00001"], "ddpm.beta_end: invalid value 1e-05"),
    (["training.keep_last=1"], "training.keep_last: invalid value 1 (expected an integer >= 2)"),
    (["run.name=a/b"], "run.name: invalid value 'a/b'"),
    (["batch_size=8"], "override 'batch_size=8': expected section.key=value"),
    (["training.batch_size"], "override 'training.batch_size': expected section.key=value"),
    (["sampling.sampler=foo"], f"sampling.sampler: invalid value 'foo' (expected one of {SAMPLERS})"),
    (["sampling.precision=fp8"], "sampling.precision: invalid value 'fp8' (expected one of fp32, bf16, fp16)"),
    (["infrastructure.precision=true"], "infrastructure.precision: invalid value True (expected one of fp32, bf16"),
    (["infrastructure.num_gpus=false"], "infrastructure.num_gpus: invalid value False (expected int)"),
    (["infrastructure.channels_last=1"], "infrastructure.channels_last: invalid value 1 (expected bool or null)"),
    (["training.deterministic=0"], "training.deterministic: invalid value 0 (expected bool)"),
    (["training.betas=[0.9]"], "training.betas: invalid value [0.9] (expected two floats in [0, 1))"),
    (["training.betas=[0.9, high]"], "training.betas[1]: invalid value 'high' (expected float)"),
    (["model.num_head_channels=wide"], "model.num_head_channels: invalid value 'wide' (expected int or null)"),
    (["model.channel_mult=[]"], "model.channel_mult: invalid value [] (expected a non-empty list of integers >= 1)"),
    (["model.attention_resolutions=[16, true]"], "model.attention_resolutions[1]: invalid value True (expected int)"),
    (["data.crop_center=[1, x]"], "data.crop_center[1]: invalid value 'x' (expected int)"),
    (["run.root=null"], "run.root: invalid value None (expected str)"),
    (["slurm.setup=module load x"], "slurm.setup: invalid value 'module load x' (expected a list of str)"),
    (["slurm.additional=[a]"], "slurm.additional: invalid value ['a'] (expected a mapping)"),
    (["slurm.additional={constraint: [a, b]}"], "slurm.additional.constraint: invalid value ['a', 'b'] (expected str)"),
    (["eval.num_seeds=0"], "eval.num_seeds: invalid value 0 (expected an integer >= 1)"),
    (["eval.sampling.num_steps=0"], "eval.sampling.num_steps: invalid value 0 (expected an integer >= 1)"),
    (["eval.sampling.num_samples=1"], "eval.sampling.num_samples: invalid value 1 (expected an integer >= 2"),
    # the keys of a sampling section the eval stage decides itself are not keys of eval.sampling
    (["eval.sampling.num_shards=2"], "eval.sampling.num_shards: not a key of eval.sampling: the eval stage draws one "
     "shard per seed set (eval.num_seeds)"),
    (["eval.sampling.fid=false"], "eval.sampling.fid: not a key of eval.sampling: the eval stage always scores FID"),
    (["eval.sampling.fid_reference=r.npz"], "eval.sampling.fid_reference: not a key of eval.sampling: the eval stage "
     "uses sampling.fid_reference"),
    (["eval.sampling.checkpoint=latest"], "eval.sampling.checkpoint: not a key of eval.sampling: the eval stage "
     "scores every milestone checkpoint"),
    (["eval.sampling=5"], "eval.sampling: expected a mapping of keys, got 5"),
    (["eval.sampling.num_step=5"], "eval.sampling.num_step: unknown key (did you mean eval.sampling.num_steps?)"),
    (["eval.sampling.num_steps.x=5"], "override 'eval.sampling.num_steps.x=5': expected section.key=value"),
]


@pytest.mark.parametrize("overrides, message", VALIDATION)
def test_validation_messages(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(BABEL, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_names_path(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path}/nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("training:\n  batch_size: 8\n  lr: [1, 2\nmodel: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert str(info.value).startswith(f"{p}:") and "malformed YAML" in str(info.value)
    line = int(str(info.value).split(":")[1])
    assert 3 <= line <= 5


def test_section_must_be_mapping(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("training: 5\n")
    with pytest.raises(ConfigError, match="training: expected a mapping"):
        load_config(p)


def test_dump_load_roundtrip(tmp_path):
    cfg = load_config(BABEL, ["data.center_crop=null", "slurm.additional={exclude: n1}"])
    dump_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg
    plain = cfg.to_dict()
    assert config_from_dict(plain) == cfg
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain  # plain types only


def test_defaults_are_valid_and_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.training.batch_size = 8  # a section changes only through dataclasses.replace, which validates


def test_a_section_built_anywhere_is_validated():
    with pytest.raises(ConfigError, match=r"^data.image_size: invalid value 0 \(expected an integer >= 1\)$"):
        DataConfig(image_size=0)
    with pytest.raises(ConfigError, match="sampling.eta: invalid value 2.0"):
        dataclasses.replace(SamplingConfig(), eta=2.0)


CROSS_SECTION = [
    (["model.num_heads=3"], "model.num_heads: invalid value 3 (expected a divisor of the 256 channels of the "
                            "attention at resolution 16)"),
    (["model.attention_resolutions=[3]"], "model.attention_resolutions: invalid value [3] (expected resolutions "
                                          "the U-Net has for data.image_size=64: a subset of [64, 32, 16, 8])"),
    (["sampling.num_steps=5000"], "sampling.num_steps: invalid value 5000 (expected at most ddpm.num_timesteps "
                                  "(1000))"),
    (["eval.sampling.sampler=dpmpp_2m", "eval.sampling.timestep_spacing=leading", "eval.sampling.num_steps=1000"],
     "eval.sampling.num_steps: invalid value 1000 (expected at most ddpm.num_timesteps - 1 (999) for dpmpp_2m with "
     "leading"),
    (["infrastructure.num_gpus=0", "infrastructure.nproc_per_node=3"],
     "training.batch_size: invalid value 64 (expected divisible by the 3 training ranks"),
    (["eval.sampling.num_steps=1001"], "eval.sampling.num_steps: invalid value 1001 (expected at most ddpm.num_time"),
    (["infrastructure.num_gpus=0", "infrastructure.precision=fp16"],
     "infrastructure.precision: invalid value 'fp16' (expected fp32 or bf16 when infrastructure.num_gpus is 0: fp16"),
    (["infrastructure.num_gpus=0", "sampling.precision=fp16"],
     "sampling.precision: invalid value 'fp16' (expected fp32 or bf16 for a CPU task (infrastructure.num_gpus gives"),
    (["slurm.sample_gpus=0", "eval.sampling.precision=fp16"],
     "eval.sampling.precision: invalid value 'fp16' (expected fp32 or bf16 for a CPU task (slurm.sample_gpus"),
]


@pytest.mark.parametrize("overrides, message", CROSS_SECTION)
def test_cross_section_checks(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(BABEL, overrides)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("entry", [["-m", "ddpm.train"], ["launch.py", "--dry-run"]])
@pytest.mark.parametrize("bad", ["model.num_heads=3", "model.attention_resolutions=[3]", "sampling.num_steps=5000"])
def test_bad_architecture_and_steps_are_one_line_exit_2(entry, bad, tmp_path):
    key = bad.split("=")[0]
    args = [sys.executable, *entry, "--config", str(BABEL), "training.batch_size=8"]
    if entry[-1] == "ddpm.train":  # overrides on both sides of --run-dir
        args += ["--run-dir", str(tmp_path / "run"), bad]
    else:
        args += [bad, "--cluster", "local"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and key in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("module", ["ddpm.train", "ddpm.sample", "ddpm.data"])
def test_cli_prints_one_line_and_exits_nonzero(module):
    args = {"ddpm.train": ["--config", str(BABEL), "training.lerning_rate=1"],
            "ddpm.sample": ["--checkpoint", "/nonexistent/ckpt.pt", "--out", "/tmp/x"],
            "ddpm.data": ["bench", "--config", str(BABEL), "training.lerning_rate=1"]}[module]
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    if module != "ddpm.sample":
        assert "training.lerning_rate: unknown key (did you mean training.learning_rate?)" in lines[0]
    else:
        assert "/nonexistent/ckpt.pt" in lines[0]


def test_overrides_anywhere_among_options_and_subcommands():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)  # parse_intermixed_args cannot do subcommands
    t = sub.add_parser("train")
    t.add_argument("--config")
    t.add_argument("overrides", nargs="*")
    t.add_argument("--run-dir")
    args = parse_with_overrides(p, ["train", "--config", "c.yaml", "a.b=1", "--run-dir", "D", "c.d=2", "e.f=[1, 2]"])
    assert (args.config, args.run_dir, args.overrides) == ("c.yaml", "D", ["a.b=1", "c.d=2", "e.f=[1, 2]"])
    with pytest.raises(SystemExit):
        parse_with_overrides(p, ["train", "--config", "c.yaml", "--bogus", "x"])
    stray = parse_with_overrides(p, ["train", "--run-dir", "D", "a.b=1", "oops"]).overrides
    with pytest.raises(ConfigError, match="override 'oops': expected section.key=value"):
        load_config(None, stray)


def test_python_m_ddpm_config_prints_a_documented_default_config():
    out = subprocess.run([sys.executable, "-m", "ddpm.config"], capture_output=True, text=True, check=True,
                         cwd=ROOT, timeout=60).stdout
    assert config_from_dict(yaml.safe_load(out)) == Config()  # the listing is itself a valid config
    assert "  num_heads: 4  # int. Attention heads; must divide the channels at every attention." in out
    assert f"  sampler: ddpm  # one of {SAMPLERS}." in out


def test_dry_run_sizes_each_stage(images, slurm_cluster):
    """The reference config's dry run: training as configured; sampling tasks and assembly sized to their need.
    (submitit's SLURM executor needs ``srun`` on the PATH, as on a login node: a SLURM test.)"""
    proc = subprocess.run([sys.executable, "launch.py", "--config", str(BABEL), "--dry-run", "--cluster", "local",
                           "data.source=folder", f"data.path={images}", "data.center_crop=null"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    jobs = dict(re.findall(r"# ---- (\w+) job ----\n(.*?)(?=# ---- |\Z)", proc.stdout, re.S))
    assert set(jobs) == {"train", "sample", "assemble"}

    def sbatch(stage: str, option: str) -> str:
        return re.search(rf"#SBATCH --{option}=(\S+)", jobs[stage]).group(1)

    assert [sbatch("train", o) for o in ("time", "mem", "cpus-per-task", "gres")] == ["1440", "64GB", "8", "gpu:1"]
    assert [sbatch("sample", o) for o in ("time", "mem", "cpus-per-task", "gres")] == ["240", "16GB", "4", "gpu:1"]
    assert [sbatch("assemble", o) for o in ("time", "mem", "cpus-per-task")] == ["30", "3GB", "4"]
    assert "--gres" not in jobs["assemble"] and "#SBATCH --array=0-7%4" in jobs["sample"]


def test_stage_resources_keys_and_caps():
    from ddpm.cluster.executors import stage_resources

    small = load_config(TINY, ["slurm.mem_gb=1", "slurm.cpus_per_task=1"])  # never more than training asks
    assert stage_resources(small, "sample") == {"cpus_per_task": 1, "mem_gb": 1, "time_min": 30, "gpus": 0}
    assert stage_resources(small, "assemble")["mem_gb"] == 1
    mine = load_config(BABEL, ["slurm.sample_mem_gb=24", "slurm.sample_gpus=2", "slurm.assemble_time_min=90",
                               "slurm.gres=gpu:a100:4", "sampling.num_samples=50000"])
    assert stage_resources(mine, "sample")["mem_gb"] == 24 and stage_resources(mine, "assemble")["time_min"] == 90
    assert stage_resources(mine, "assemble")["mem_gb"] == 2 + 2  # 50k x 64 x 64 x 3 bytes = 0.57 GiB, x3
    from ddpm.cluster.executors import make_executor

    ex = make_executor(mine, RunDir("/tmp/r"), "sample", "slurm")
    assert ex.parameters["gres"] == "gpu:a100:2" and ex.parameters["mem"] == "24GB"
    with pytest.raises(ConfigError, match="slurm.sample_gpus: invalid value -1"):
        load_config(BABEL, ["slurm.sample_gpus=-1"])


def built_in_python(base: Config, overrides: list[str]) -> Config:
    """``base`` with ``overrides`` made by dataclasses.replace (eval.sampling: a mapping), not the YAML loader."""
    changes: dict[str, dict] = {}
    for text in overrides:
        path, _, value = text.partition("=")
        section, key = path.split(".", 1)
        sub, _, leaf = key.rpartition(".")
        target = changes.setdefault(section, {})
        (target.setdefault(sub, {}) if sub else target)[leaf] = yaml.safe_load(value)
    return dataclasses.replace(base, **{s: dataclasses.replace(getattr(base, s), **kw) for s, kw in changes.items()})


@pytest.mark.parametrize("overrides, message", [c for c in VALIDATION + CROSS_SECTION
                                                if "unknown" not in c[1] and "override" not in c[1]])
def test_python_built_config_rejects_what_yaml_rejects(overrides, message):
    with pytest.raises(ConfigError) as from_yaml:
        load_config(BABEL, overrides)
    with pytest.raises(ConfigError) as from_python:
        built_in_python(load_config(BABEL), overrides)
    assert str(from_python.value) == str(from_yaml.value) and str(from_yaml.value).startswith(message)


def test_python_built_sections_check_types_and_choices():
    with pytest.raises(ConfigError, match=r"^sampling.sampler: invalid value 'foo' \(expected one of ddpm, ddim, "):
        SamplingConfig(sampler="foo")
    with pytest.raises(ConfigError, match=r"^model.num_heads: invalid value 3 \(expected a divisor of the 256 "):
        Config(model=ModelConfig(num_heads=3))
    with pytest.raises(ConfigError, match=r"^model.num_heads: invalid value True \(expected int\)$"):
        ModelConfig(num_heads=True)  # bool is no int
    with pytest.raises(ConfigError, match=r"^training.learning_rate: invalid value '2e-4' \(expected float\)$"):
        TrainingConfig(learning_rate="2e-4")  # only the YAML loader reads the string PyYAML makes of 2e-4
    with pytest.raises(ConfigError, match=r"^eval.sampling.num_steps: invalid value 0 \(expected an integer >= 1\)$"):
        EvalConfig(sampling={"num_steps": 0})
    assert TrainingConfig(learning_rate=1).learning_rate == 1.0 and Config(model={"num_heads": 2}).model.num_heads == 2


def test_sections_hold_tuples_and_dump_plain_lists():
    cfg = load_config(BABEL, ["data.center_crop=128", "data.crop_center=[89, 121]", "slurm.additional={a: b}"])
    assert all(isinstance(v, tuple) for v in (cfg.model.channel_mult, cfg.model.attention_resolutions, cfg.slurm.setup,
                                              cfg.training.betas, cfg.data.crop_center))
    assert ModelConfig(channel_mult=[1, 2]).channel_mult == (1, 2)  # a list given in Python is held as a tuple too
    with pytest.raises(TypeError, match="read-only"):
        cfg.slurm.additional["a"] = "c"  # type: ignore[index]
    plain = cfg.to_dict()
    assert plain["model"]["channel_mult"] == [1, 2, 2, 4] and type(plain["slurm"]["additional"]) is dict
    assert yaml.safe_load(dump_config(cfg)) == plain and pickle.loads(pickle.dumps(cfg)) == cfg  # submitit pickles


@pytest.mark.parametrize("old, new", [
    ("infrastructure.mixed_precision=true", "infrastructure.precision (fp32, bf16 or fp16)"),
    ("infrastructure.mixed_precision_on_cpu=true", "infrastructure.precision"),
    *[(f"eval.{k}=1", f"eval.sampling.{k}") for k in EvalConfig.MOVED]])
def test_a_moved_key_is_one_line_naming_its_new_home(old, new, tmp_path):
    key, _, value = old.partition("=")
    (tmp_path / "c.yaml").write_text(f"{key.split('.')[0]}:\n  {key.split('.')[1]}: {value}\n")
    for make in (lambda: load_config(None, [old]), lambda: load_config(tmp_path / "c.yaml")):
        with pytest.raises(ConfigError) as info:
            make()
        assert str(info.value).startswith(f"{key} moved: use {new}") and "\n" not in str(info.value)


def test_eval_has_a_sampling_section_of_its_own():
    cfg = load_config(TINY, ["eval.sampling.num_steps=20", "eval.num_seeds=3", "sampling.fid_reference=r.npz"])
    s, run = cfg.eval.sampling, eval_sampling(cfg)  # run: as the stage runs it, a shard per seed set
    assert (s.num_steps, s.sampler, s.timestep_spacing, s.num_samples, s.batch_size, s.seed_base) == \
        (20, "ddim", "trailing", 1000, 250, 1_000_000)
    assert (run.num_samples, run.num_shards, run.num_steps, run.fid_reference, run.fid) == (3000, 3, 20, "r.npz", True)
    fixed = {"num_shards", "fid", "fid_weights", "fid_reference", "checkpoint"}
    assert not fixed & set(cfg.to_dict()["eval"]["sampling"])


@pytest.mark.parametrize(("text", "kind", "step", "path"), [
    ("latest", "latest", None, None), ("best", "best", None, None), ("step_1500", "step", 1500, None),
    ("runs/a/checkpoints/step_00000010.pt", "path", None, "runs/a/checkpoints/step_00000010.pt")])
def test_sampling_checkpoint_is_a_typed_reference(text, kind, step, path, tmp_path):
    from ddpm.checkpoint import CheckpointRef

    assert load_config(TINY, [f"sampling.checkpoint={text}"]).sampling.checkpoint == text
    ref = CheckpointRef.parse(text)
    assert (ref.kind, ref.step, ref.path) == (kind, step, path)
    if kind in ("step", "path"):  # resolved in checkpoint.py: a missing file is one line naming it
        with pytest.raises(DDPMError, match=r"sampling.checkpoint=.*does not exist"):
            ref.resolve(RunDir(tmp_path))


@pytest.mark.parametrize("text", ["lastest", "step_x", "step_", ""])
def test_a_checkpoint_reference_typo_is_one_line(text):
    with pytest.raises(ConfigError, match=r"^sampling.checkpoint: invalid value .*step_<N> or a path"):
        SamplingConfig(checkpoint=text)

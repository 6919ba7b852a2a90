"""Run names cannot reach a shell, and every command printed for a person to copy is shell-quoted.

- ``run.name`` takes letters, digits, ``.``, ``_`` and ``-``: anything else (a space, ``$(x)``, ``;``, a ``/``
  of ``../x``) and the names ``.`` and ``..`` are one line naming the character, exit 2, nothing written;
- ``run.root`` may still hold spaces, quotes and ``$(...)``: the hints launch.py prints at the end
  (``tensorboard --logdir ...``, ``python launch.py status ...``) and the resume command of ``launch.py status``
  are quoted, so a shell splits them back into the same words and the resume command names the same run.

The dry run's scripts (quoted by submitit) are compared with real submissions in tests/test_dry_run_slurm.py.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from helpers import TINY_CONFIG, run_main

import launch
from ddpm.config import RunConfig, dump_config, load_config
from ddpm.configtools import parse_override
from ddpm.errors import ConfigError
from ddpm.rundir import RunDir
from ddpm.status import RunState, write_status

# roots a shell would split, expand or run if they were printed bare
ODD_ROOTS = ["runs with spaces", "it's \"q\" $(touch pwned) ;echo hi", "a: b #c", "[x]"]


@pytest.mark.parametrize("name, char", [("a b", "' '"), ("$(x)", "'$'"), ("a;b", "';'"), ("../x", "'/'"),
                                        ("a\nb", "'\\n'"), ("é", "'é'")])
def test_a_name_a_shell_would_read_is_one_line_and_nothing_is_written(
        name: str, char: str, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    proc = run_main(launch.main, ["--config", TINY_CONFIG, "--cluster", "local", f"data.path={images}",
                                  f"run.root={root}", f"run.name={json.dumps(name)}"], capsys)
    assert proc.code == 2, proc.out + proc.err
    assert len(proc.err_lines) == 1 and proc.err_lines[0].startswith("error: run.name: invalid value"), proc.err
    assert f"not {char}" in proc.err_lines[0], proc.err
    assert list(root.iterdir()) == [] and proc.out == ""  # refused before anything was written or queued


@pytest.mark.parametrize("name", [".", ".."])
def test_dot_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=r"run\.name: invalid value '\.{1,2}' \(expected a directory of its own"):
        load_config(TINY_CONFIG, [f"run.name='{name}'"])


def test_names_of_the_allowed_characters_pass_and_python_checks_the_same() -> None:
    assert load_config(TINY_CONFIG, ["run.name=celeba64_v2.1-lr3e-4"]).run.name == "celeba64_v2.1-lr3e-4"
    assert RunConfig(name="...x").name == "...x"  # dots inside a name are a plain directory name
    with pytest.raises(ConfigError, match=r"run\.name: invalid value 'a b' \(expected letters, digits, '\.', '_' "
                                          r"and '-' only, not ' '"):
        RunConfig(name="a b")  # a section built in Python fails with the config file's line
    with pytest.raises(ConfigError, match=r"run\.name: invalid value '' \(expected a non-empty name"):
        RunConfig(name="")


@pytest.mark.parametrize("odd", ODD_ROOTS)
def test_the_end_hints_are_quoted(odd: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / odd / "tiny"
    cfg = load_config(TINY_CONFIG, [f"run.root={json.dumps(str(run_dir.parent))}"])
    launch.print_summary(cfg, RunDir(run_dir), {"cluster": "slurm", "train": "7"})
    hints = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines() if ":" in line)
    assert shlex.split(hints["tensorboard"]) == ["tensorboard", "--logdir", str(RunDir(run_dir).tb)]
    assert shlex.split(hints["status"]) == ["python", "launch.py", "status", str(run_dir)]


@pytest.mark.parametrize("odd", ODD_ROOTS)
def test_the_resume_command_of_status_is_quoted_and_names_the_same_run(
        odd: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / odd / "tiny"
    run_dir.mkdir(parents=True)
    cfg = load_config(TINY_CONFIG, [f"run.root={json.dumps(str(run_dir.parent))}"])
    dump_config(cfg, RunDir(run_dir).config)
    write_status(RunDir(run_dir), RunState.STOPPED, 5, 0)  # stopped, no job alive: status prints the resume command
    proc = run_main(launch.main, ["status", run_dir], capsys)
    assert proc.code == 0, proc.err
    line = next(line for line in proc.out.splitlines() if line.startswith("  resume: "))
    words = shlex.split(line.removeprefix("  resume: ").partition("   (")[0])
    assert words[:4] == ["python", "launch.py", "--config", str(RunDir(run_dir).config)], words
    assert parse_override(words[4]) == (["run", "root"], str(run_dir.parent))  # YAML reads the same root back
    assert load_config(words[3], words[4:]).run_dir.path == run_dir

"""The training step never reads a value back from the device: the skip is decided on the device and the stop
flag one step late (a read per step would keep a GPU's queue empty; nanoGPT and torchtitan read on log steps)."""

from __future__ import annotations

import sys

import torch
from helpers import TINY_CONFIG, run_main

from ddpm import dist
from ddpm.rundir import RunDir


def test_a_training_step_reads_nothing_back(make_trainer, tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, "training.log_every=1000")
    trainer.train_step(*trainer.next_batch())  # warm-up: first-call paths
    reads: list[str] = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            reads.append(f"{_name} in {sys._getframe(1).f_code.co_qualname}")
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    batches = [trainer.next_batch() for _ in range(3)]
    reads.clear()  # the loader's own conversions are not the step's
    for batch in batches:
        trainer.train_step(*batch)
    monkeypatch.undo()
    assert reads == ["item in LaggedMax.push"] * 3, reads  # only the previous step's stop flag, already done
    trainer.close()


def test_the_stop_flag_is_read_one_step_late(make_trainer, tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train_step(*trainer.next_batch())
    trainer.stop_requested = True  # what the signal handler sets
    trainer.train_step(*trainer.next_batch())
    assert not trainer.stop_now  # queued with step 2, read after step 3 was queued
    trainer.train_step(*trainer.next_batch())
    assert trainer.stop_now and trainer.step == 3
    trainer.close()


def test_lagged_max_returns_the_previous_steps_value():
    flag = dist.LaggedMax(torch.device("cpu"))
    assert [flag.push(v) for v in (True, False, False, True, True)] == [False, True, False, False, True]


def test_a_stop_at_a_grid_step_resumes_bitwise(make_trainer, tmp_path):
    """Dropout 0.1 on the CPU: a stop that lands on a grid step skips that grid; resumed, the run ends with the same
    weights, EMA and optimizer state as one that drew the grid (the grid never touches the training RNG)."""
    from slurm_helpers import assert_same_training_state

    from ddpm.checkpoint import load_latest

    common = ["model.dropout=0.1", "training.num_iterations=8", "training.sample_every=4", "training.save_every=100",
              "training.num_samples=2"]
    ref = make_trainer(tmp_path / "ref", *common)
    assert ref.fit() == "done" and (tmp_path / "ref" / "grids" / "step_00000004.png").is_file()
    first = make_trainer(tmp_path / "run", *common)
    beat = first.heartbeat

    def stop_at_the_grid(force: bool = False) -> None:  # what a stop signal at step 4 sets, just before the grid
        if first.step == 4:
            first.stop_requested = True
        beat(force)

    first.heartbeat = stop_at_the_grid
    assert first.fit() == "stopped" and first.step == 6  # queued with step 5, read after step 6
    assert not (tmp_path / "run" / "grids" / "step_00000004.png").exists()  # the stop skipped the grid
    first.close()
    second = make_trainer(tmp_path / "run", *common)
    assert second.step == 6 and second.fit() == "done"
    assert_same_training_state(load_latest(RunDir(tmp_path / "ref"))[1], load_latest(RunDir(tmp_path / "run"))[1])


def test_status_json_is_typed_and_refuses_what_it_does_not_know(tmp_path, capsys):
    """``status.json`` carries a schema; an unknown state or a newer schema is one line in ``launch.py status``."""
    import json

    import launch
    from ddpm.config import dump_config, load_config
    from ddpm.status import STATUS_SCHEMA, RunState, read_status, write_status

    write_status(RunDir(tmp_path), RunState.STOPPED, 7, 0, error=None)
    status = read_status(RunDir(tmp_path))
    assert status["state"] is RunState.STOPPED and status["schema"] == STATUS_SCHEMA
    assert f"{status['state']}" == "stopped" == status["state"]
    dump_config(load_config(TINY_CONFIG), tmp_path / "config.yaml")
    for bad in ({"state": "paused", "step": 1}, {"schema": STATUS_SCHEMA + 1, "state": "done", "step": 1}):
        (tmp_path / "status.json").write_text(json.dumps(bad))
        proc = run_main(launch.main, ["status", tmp_path], capsys)
        assert proc.code == 2 and len(proc.err_lines) == 1, proc.out + proc.err
        assert proc.err_lines[0].startswith(f"error: {tmp_path}/status.json: unknown run state {bad['state']!r}")

"""The training step never reads a value back from the device: the skip is decided on the device and the stop
flag one step late (a read per step would keep a GPU's queue empty; nanoGPT and torchtitan read on log steps)."""

from __future__ import annotations

import sys

import torch

from ddpm import dist


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

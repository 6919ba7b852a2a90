"""The first progress line tells the truth: its rate and ETA count from the step the run started or resumed at and
the time training began (``RunLogger.mark_start``, called as the trainer's loop begins), as every later line
counts from the line before it. Once the first line read ``0.0 img/s eta 15111111111:06:40`` (the logger opened
at the first log, so its clock and step started there).

- ``RunLogger`` alone: the rate of the first log from a start mark; no step since the mark is ``- img/s eta -``;
- a tiny training in this process, fresh and resumed at a step that is not a log step: the first line's img/s
  is within 2x of the second line's and its ETA is the one its rate gives (seconds, not centuries).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_CONFIG, run_main

from ddpm.config import load_config
from ddpm.dist import DistEnv
from ddpm.rundir import RunDir
from ddpm.runlog import RunLogger
from ddpm.train import main as train_main

LINE = re.compile(r"^step (\d+)/(\d+) \([\d.]+%\) .* ([\d.]+) img/s eta (\d+):(\d\d):(\d\d)$", re.M)
BATCH = 8  # configs/tiny_cpu.yaml's training.batch_size


def progress(out: str) -> list[tuple[int, int, float, int]]:
    """(step, total, img/s, eta in seconds) of each progress line; a line without a rate does not match."""
    return [(int(s), int(n), float(r), int(h) * 3600 + int(m) * 60 + int(sec))
            for s, n, r, h, m, sec in LINE.findall(out)]


def test_the_first_log_counts_from_the_start_mark(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tc = load_config(TINY_CONFIG, ["training.num_iterations=1000"]).training
    logger = RunLogger(RunDir(tmp_path), tc, DistEnv(device=torch.device("cpu")), start_step=40)
    try:
        logger.mark_start(40, started=time.perf_counter() - 2.0)  # began 2 s ago at step 40 (a resumed run)
        logger.log(50, {"loss": 0.5})
        logger.log(50, {"loss": 0.5})  # no step since the last log: no rate to give
    finally:
        logger.close()
    out = capsys.readouterr().out
    [(step, total, rate, eta)] = progress(out)
    assert (step, total) == (50, 1000) and 10 * BATCH / 2.5 < rate <= 10 * BATCH / 2.0  # 10 steps in 2 s (+ now)
    assert abs(eta - (1000 - 50) * BATCH / rate) <= 1
    assert out.splitlines()[1] == "step 50/1000 (5.0%) loss 0.5 - img/s eta -"


def test_first_line_of_a_fresh_and_of_a_resumed_run(images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Windows of 30 to 50 steps (about 1 s each); one torch thread, so that the other processes of a shared
    2-core machine slow every window alike instead of stalling a parallel region now and then."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    common = ["--config", TINY_CONFIG, f"data.path={images}", f"run.root={tmp_path}", "training.log_every=50",
              "training.save_every=1000"]
    fresh = run_main(train_main, [*common, "training.num_iterations=120"], capsys)  # logs 50, 100; saved at 120
    assert fresh.code == 0, fresh.out + fresh.err
    resumed = run_main(train_main, [*common, "training.num_iterations=240"], capsys)  # from 120: 150, 200
    assert resumed.code == 0, resumed.out + resumed.err
    assert "checkpoints/step_00000120.pt at step 120" in resumed.out

    for run, steps in ((fresh, [50, 100]), (resumed, [150, 200])):
        lines = progress(run.out)
        assert [line[0] for line in lines] == steps, run.out
        (step, total, first, eta), (_, _, second, _) = lines[:2]
        assert second / 2 <= first <= 2 * second, run.out  # counted from 0 or 120, not from the first log
        assert eta <= 60 and abs(eta - (total - step) * BATCH / first) <= 1, run.out  # seconds, whole

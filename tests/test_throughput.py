"""The benchmark tools run end to end on the tiny config and print their figures (no timing is asserted:
figures are for the README, a noisy 2-core machine must not fail the suite)."""

from __future__ import annotations

import io
import re

import pytest
from helpers import TINY_CONFIG, run_main

from ddpm.config import load_config
from ddpm.samplers import sampler_names


def test_parallel_shards_and_loader_figures():
    from tools.throughput import report_loader, report_shards

    cfg = load_config(TINY_CONFIG, ["training.batch_size=16"])
    out = io.StringIO()
    shards = report_shards(cfg, images=8, steps=2, out=out)
    # the figures are what the times say, whatever this machine's load made the times (no speed bound here)
    assert shards["one_s"] > 0 and shards["parallel_s"] > 0 and shards["efficiency"] == shards["one_s"] / \
        shards["parallel_s"] and shards["default_efficiency"] > 0
    loader = report_loader(cfg, windows=2, repeats=1, out=out, steps_per_window=5)
    assert loader["rate_0"] > 0 and loader["rate_workers"] > 0 and loader["stall"] >= 0 and loader["stall_0"] >= 0
    assert loader["wait_ms_0"] > 0 and loader["wait_ms_workers"] > 0
    text = out.getvalue()
    assert re.search(r"parallel-shard efficiency \d+\.\d\d \(target >= 0\.9\)", text), text
    assert re.search(r"loader-worker ratio \d+\.\d\d \(target >= 0\.95\)", text), text
    assert re.search(r"takes \d+\.\d\d ms from the worker, \d+\.\d\d ms read in the process", text), text


def test_sampler_table_scores_each_row(checkpoint, digit_classifier, monkeypatch, capsys):
    """Every sampler at every step count gets a row with a finite FD, plus the real-digit and noise anchors.
    Scored at 16 px (``--size``), by the session's classifier, found where the command looks: XDG_CACHE_HOME."""
    import tools.sampler_table
    from tools.sampler_table import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(digit_classifier.parents[1]))
    stamp = digit_classifier.stat().st_mtime_ns
    proc = run_main(main, [checkpoint, "--n", "16", "--steps", "2,3", "--size", "16"], capsys)
    assert proc.code == 0, proc.err[-2000:]
    rows = re.findall(r"^\| (ddpm|ddim|dpmpp_2m) \| (\d+) \| (\d+\.\d) \| (0\.\d+|1\.000) \| (\d+)/10 \|", proc.out,
                      re.M)
    assert [(r[0], r[1]) for r in rows] == [(s, n) for s in ("ddpm", "ddim", "dpmpp_2m") for n in ("2", "3")]
    real = re.search(r"^\| real digits \| - \| (\d+\.\d)", proc.out, re.M)
    noise = re.search(r"^\| uniform noise \| - \| (\d+\.\d)", proc.out, re.M)
    assert real and noise and float(real.group(1)) < float(noise.group(1)), proc.out
    assert digit_classifier.stat().st_mtime_ns == stamp and len(list(digit_classifier.parent.iterdir())) == 1
    bad = run_main(main, [checkpoint, "--samplers", "euler"], capsys)
    assert bad.code == 2 and bad.err.strip() == (
        f"error: --samplers: unknown euler (expected some of {', '.join(sampler_names())})")

    class Asked(Exception):
        pass

    def load_scorer(size: int) -> None:
        raise Asked(size)

    monkeypatch.setattr(tools.sampler_table, "load_scorer", load_scorer)
    with pytest.raises(Asked) as asked:  # without --size: the checkpoint's side, asked for before any sampling
        tools.sampler_table.table(checkpoint, 16, [2], ["ddim"], "trailing")
    assert asked.value.args == (8,)

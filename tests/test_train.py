"""Trainer: exact resume after a real signal (1 process and torchrun x2), DDP equivalence,
kill -9 during a checkpoint write, non-finite steps skipped, overfit-single-batch, per-quarter losses.

In-process trainers come from the ``make_trainer`` fixture (tests/conftest.py); the command-line runs use
configs/tiny_cpu.yaml on the shared ``images`` fixture."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, CliRun, run_main
from helpers import TINY_CONFIG as TINY

from ddpm.checkpoint import list_checkpoints, load_checkpoint, load_latest
from ddpm.cluster.wrapper import main as wrapper_main
from ddpm.config import load_config
from ddpm.errors import EXIT_REQUEUE
from ddpm.rundir import RunDir
from ddpm.train import main as train_main
from ddpm.train import quartile_losses


def overrides(images: Path, run_root: Path, *extra: str) -> list[str]:
    return [f"data.path={images}", f"run.root={run_root}", *extra]


def train_cmd(args: list[str], torchrun: int = 0) -> list[str]:
    if torchrun:  # the production wrapper: torchrun's agent ignores the stop signal, workers get it
        return [sys.executable, "-m", "ddpm.cluster", "train", "--config", str(TINY), *args]
    return [sys.executable, "-m", "ddpm.train", "--config", str(TINY), *args]


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """``cmd`` in a real process (torchrun, or a run to signal or kill): the other runs call :func:`train`."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def train(args: list[str], capsys: pytest.CaptureFixture[str]) -> CliRun:
    """``python -m ddpm.train --config tiny_cpu.yaml ARGS`` in this process (one rank, no process group)."""
    return run_main(train_main, ["--config", TINY, *args], capsys)


def run_and_signal(cmd: list[str], at_step: int, timeout: float = 240) -> tuple[int, str]:
    """Start ``cmd`` in its own session; when it prints step ``at_step``, send SIGUSR2 to the whole group
    (as SLURM signals every process of a step); return (exit code, output)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            start_new_session=True)
    out, sent, deadline = [], False, time.time() + timeout
    for line in proc.stdout:
        out.append(line)
        if not sent and line.startswith(f"step {at_step}/"):
            os.killpg(proc.pid, signal.SIGUSR2)
            os.killpg(proc.pid, signal.SIGUSR2)  # twice: the handler is idempotent
            sent = True
        assert time.time() < deadline, "".join(out)
    return proc.wait(timeout=60), "".join(out)


def final_state(run_dir: Path) -> dict:
    assert (found := load_latest(RunDir(run_dir))) is not None
    return found[1]


def assert_tensors_equal(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_tensors_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_tensors_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def tb_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every TensorBoard scalar of a run: tag -> {step: value} (a step written twice would show as a repeat)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        out[tag] = {e.step: e.value for e in events}
        assert len(out[tag]) == len(events), f"{tag}: a step logged twice"
    return out


@pytest.mark.parametrize("nproc", [1, 2])
def test_exact_resume_after_signal(images, tmp_path, nproc, capsys):
    """The signalled run is a real process (one rank: ddpm.train; two: the wrapper's torchrun); with one rank the
    uninterrupted reference and the resumed half run in this process."""
    n = 20  # the signal is sent at a random step in [2, 10]: ten steps of margin to arrive
    extra = [f"infrastructure.nproc_per_node={nproc}", f"training.num_iterations={n}", "model.dropout=0.1"]

    def run_to_the_end(root: Path) -> tuple[int, str]:
        if nproc > 1:
            proc = run(train_cmd(overrides(images, root, *extra), torchrun=True))
            return proc.returncode, proc.stdout + proc.stderr
        # TensorBoard reads event files in name order (events.out.tfevents.<second>.<host>.<pid>): a resumed writer
        # opened in the stopped one's second may sort first and read as a restart (purged): wait for the next second
        while int(time.time()) <= max((int(f.name.split(".")[3]) for f in root.glob("tiny/tb/events.*")), default=0):
            time.sleep(0.05)
        done = train(overrides(images, root, *extra), capsys)
        return done.code, done.out + done.err

    code, out = run_to_the_end(tmp_path / "a")
    assert code == 0, out

    stop_at = random.Random(os.getpid()).randint(2, n // 2)
    cmd = train_cmd(overrides(images, tmp_path / "b", *extra), torchrun=nproc > 1)
    code, out = run_and_signal(cmd, stop_at)
    assert code == EXIT_REQUEUE, out
    run_b = tmp_path / "b" / "tiny"
    stopped = final_state(run_b)["step"]
    assert stop_at <= stopped < n, out
    assert '"stopped"' in (run_b / "status.json").read_text()
    code, out = run_to_the_end(tmp_path / "b")
    assert code == 0, out
    assert f"resumed from {run_b}/checkpoints/step_{stopped:08d}.pt" in out

    sa, sb = final_state(tmp_path / "a" / "tiny"), final_state(run_b)
    assert sa["step"] == sb["step"] == n
    for key in ("model", "ema", "optimizer", "data"):
        assert_tensors_equal(sa[key], sb[key], key)
    scalars = tb_scalars(run_b)
    assert sorted(scalars["loss/loss"]) == list(range(1, n + 1))  # one point per step, none duplicated
    quarters = [scalars.get(f"loss/loss_q{q}", {}) for q in range(4)]
    assert sorted({s for points in quarters for s in points}) == list(range(1, n + 1))  # reduced over the ranks


def test_ddp_matches_single_process(images, tmp_path, capsys):
    """2 ranks x batch 4 == 1 rank x batch 8 (same data, same noise) after k steps."""
    extra = ["training.batch_size=8", "training.num_iterations=4", "training.ema_start=0"]
    one = train(overrides(images, tmp_path / "one", *extra), capsys)
    assert one.code == 0, one.err
    two = run(train_cmd(overrides(images, tmp_path / "two", *extra, "infrastructure.nproc_per_node=2"),
                        torchrun=2))
    assert two.returncode == 0, two.stdout + two.stderr
    s1, s2 = final_state(tmp_path / "one" / "tiny"), final_state(tmp_path / "two" / "tiny")
    # Gradients (Adam's first moment, linear in them) agree to float tolerance everywhere.
    m1, m2 = s1["optimizer"]["state"], s2["optimizer"]["state"]
    scale = max(float(st["exp_avg"].abs().max()) for st in m1.values())
    for i in m1:
        torch.testing.assert_close(m1[i]["exp_avg"], m2[i]["exp_avg"], rtol=1e-3, atol=1e-5 * scale)
    # Weights agree too, except where Adam divides float noise by ~0 (|grad| ~ 1e-10 << eps = 1e-8,
    # e.g. biases that cancel in GroupNorm): there m/sqrt(v) amplifies rounding to O(lr).
    assert len(m1) == len(s1["model"])  # parameters only, in state_dict order
    checked = 0
    for i, (name, w) in enumerate(s1["model"].items()):
        if float(m1[i]["exp_avg_sq"].sqrt().max()) > 1e-8:
            torch.testing.assert_close(w, s2["model"][name], rtol=1e-4, atol=2e-5, msg=name)
            checked += 1
    assert checked >= 0.8 * len(m1)
    assert s1["step"] == s2["step"] == 4


def test_kill9_during_checkpoint_write(images, tmp_path, capsys):
    """SIGKILL while a checkpoint is being written: the previous one stays loadable and the run resumes."""
    extra = ["model.base_channels=64", "training.save_every=1", "training.num_iterations=40"]
    cmd = train_cmd(overrides(images, tmp_path, *extra))
    ckpt_dir = tmp_path / "tiny" / "checkpoints"
    for _attempt in range(5):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        caught = False
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            tmps = list(ckpt_dir.glob(".step_*.tmp")) if ckpt_dir.is_dir() else []
            if tmps and list_checkpoints(RunDir(tmp_path / "tiny")):
                proc.kill()
                caught = True
                break
            time.sleep(0.0005)
        proc.wait()
        if caught:
            break
    assert caught, "never caught a checkpoint mid-write"
    found = load_latest(RunDir(tmp_path / "tiny"))
    assert found is not None
    resumed_from = found[1]["step"]
    done = train(overrides(images, tmp_path, *extra), capsys)  # the same command, in this process
    assert done.code == 0, done.out + done.err
    assert f"resumed from {found[0]}" in done.out
    assert final_state(tmp_path / "tiny")["step"] == 40 > resumed_from


def test_corrupt_newest_checkpoint_is_skipped(images, tmp_path, capsys):
    first = train(overrides(images, tmp_path, "training.num_iterations=10"), capsys)
    assert first.code == 0, first.err
    newest = list_checkpoints(RunDir(tmp_path / "tiny"))[-1][1]
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    with pytest.raises(Exception, match="corrupt or truncated"):
        load_checkpoint(newest)
    again = train(overrides(images, tmp_path, "training.num_iterations=12"), capsys)
    assert again.code == 0, again.err
    assert f"skipping {newest}: corrupt or truncated checkpoint" in again.out
    assert "resumed from" in again.out and "step_00000005.pt" in again.out


def test_nan_loss_is_skipped_and_counted(make_trainer, tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train_step(*trainer.next_batch())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    ema_before = {k: v.clone() for k, v in trainer.ema.state_dict()["shadow"].items()}
    real = trainer.ddpm.compute_loss

    def nan_loss(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss * float("nan"), metrics

    trainer.ddpm.compute_loss = nan_loss
    metrics = trainer.train_step(*trainer.next_batch())
    assert trainer.skipped_steps == 1 and float(metrics["skipped_steps"]) == 1.0
    assert trainer.step == 2
    assert_tensors_equal(before, trainer.model.state_dict())
    assert_tensors_equal(ema_before, trainer.ema.state_dict()["shadow"])
    assert all(torch.isfinite(s["exp_avg"]).all() for s in trainer.optimizer.state.values())
    trainer.ddpm.compute_loss = real
    trainer.train_step(*trainer.next_batch())
    assert trainer.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    trainer.close()


def test_overfit_single_batch_loss_goes_to_zero(make_trainer, tmp_path):
    trainer = make_trainer(tmp_path, "training.learning_rate=3e-3", "training.gradient_clip_norm=0", overfit=True)
    losses = [float(trainer.train_step(*trainer.next_batch())["loss"]) for _ in range(150)]
    assert losses[-1] < 0.05 * losses[0] and losses[-1] < 0.05, losses[::10]


def test_quartile_losses_known_values():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    t = torch.tensor([0, 10, 300, 999, 260, 20])  # T = 1000: q0 = samples 0, 1, 5; q1 = 2, 4; q2 none; q3 = 3
    got = quartile_losses(losses, t, 1000)
    assert got.shape == (2, 4) and got.dtype == torch.float32
    assert got.tolist() == [[1 + 2 + 6, 3 + 5, 0, 4], [3, 2, 0, 1]]  # row 0: sums, row 1: counts
    # quarter q is [q T / 4, (q + 1) T / 4): the edges, and a T that 4 does not divide (tiny_cpu's 50)
    edges = torch.tensor([249, 250, 499, 500, 749, 750])
    assert quartile_losses(torch.ones(6), edges, 1000)[1].tolist() == [1, 2, 2, 1]
    assert quartile_losses(torch.ones(4), torch.tensor([12, 13, 37, 38]), 50)[1].tolist() == [1, 1, 1, 1]


def test_quarter_losses_in_tensorboard_on_log_steps_only(make_trainer, tmp_path):
    """A real run (7 steps, log every 3): loss/loss_q<q> at steps 3 and 6 only, each the mean per-sample
    loss of that step's samples whose t is in quarter q, and absent for a quarter without samples."""
    trainer = make_trainer(tmp_path, "training.num_iterations=7", "training.log_every=3")
    steps, real_step = {}, trainer.train_step

    def recording_step(x0, t, noise):
        metrics = real_step(x0, t, noise)
        steps[trainer.step] = (metrics["losses"].clone(), t.clone())
        return metrics

    trainer.train_step = recording_step
    assert trainer.fit() == "done"
    trainer.close()  # flushes TensorBoard
    assert sorted(steps) == list(range(1, 8))
    scalars = tb_scalars(tmp_path)
    assert sorted(scalars["loss/loss"]) == [3, 6]
    quarter_tags = sorted(tag for tag in scalars if tag.startswith("loss/loss_q"))
    assert quarter_tags and set(quarter_tags) <= {f"loss/loss_q{q}" for q in range(4)}
    for step in (3, 6):
        losses, t = steps[step]
        assert scalars["loss/loss"][step] == pytest.approx(float(losses.mean()), rel=1e-5)
        quarter = t * 4 // trainer.ddpm.num_timesteps
        for q in range(4):
            logged = scalars.get(f"loss/loss_q{q}", {})
            if (quarter == q).any():
                assert logged[step] == pytest.approx(float(losses[quarter == q].mean()), rel=1e-5), (step, q)
            else:
                assert step not in logged, (step, q)
    assert {s for tag in quarter_tags for s in scalars[tag]} == {3, 6}  # nothing on the other steps


def test_provenance_and_config_written(images, tmp_path, capsys):
    assert train(overrides(images, tmp_path, "training.num_iterations=2"), capsys).code == 0
    prov = json.loads((tmp_path / "tiny" / "provenance.json").read_text())
    start = prov["starts"][-1]
    assert start["packages"]["torch"] == torch.__version__.split("+")[0]
    assert "commit" in start["git"] and "dirty" in start["git"] and start["hosts"]
    assert load_config(tmp_path / "tiny" / "config.yaml").training.num_iterations == 2


def test_resume_with_a_different_model_is_one_clear_line(images, tmp_path, capsys):
    assert train(overrides(images, tmp_path, "training.num_iterations=2"), capsys).code == 0
    other = train(overrides(images, tmp_path, "training.num_iterations=4", "model.base_channels=32"), capsys)
    assert other.code == 2
    lines = other.err_lines
    assert len(lines) == 1 and "step_00000002.pt: does not fit this config" in lines[0], other.err
    assert '"failed"' in (tmp_path / "tiny" / "status.json").read_text()  # what the wrapper and `status` read
    assert load_latest(RunDir(tmp_path / "tiny"))[1]["step"] == 2  # nothing written was lost


def test_wrapper_does_not_take_an_earlier_stop_for_this_attempt(images, tmp_path):
    """A crash before the trainer's first write must read as a failure, not as the last attempt's "stopped"."""
    run_dir = tmp_path / "tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "status.json").write_text('{"state": "stopped", "step": 3}\n')
    proc = run(train_cmd([f"data.path={tmp_path}/missing", f"run.root={tmp_path}"], torchrun=1))
    assert proc.returncode == 2, proc.stdout + proc.stderr  # bad input: the trainer's one line, not a lost rank
    assert f"training failed: data.path: {tmp_path}/missing" in proc.stderr and "training stopped" not in proc.stdout
    assert "lost a rank" not in proc.stdout


def test_wrapper_refuses_a_node_count_the_config_does_not_say(images, tmp_path, monkeypatch, capsys):
    """``sbatch --nodes=2 slurm/train.sbatch CONFIG`` without ``infrastructure.num_nodes=2``: one line, exit 2."""
    monkeypatch.setenv("SLURM_NNODES", "2")
    proc = run_main(wrapper_main, ["train", "--config", TINY, *overrides(images, tmp_path)], capsys)
    assert proc.code == 2 and proc.err_lines == [
        "error: infrastructure.num_nodes: the config says 1, this job has 2 nodes (SLURM_NNODES); pass "
        "infrastructure.num_nodes=2 or sbatch --nodes=1"], proc.out + proc.err
    assert not (tmp_path / "tiny" / "checkpoints").exists() and "running:" not in proc.out  # torchrun never started


def test_close_stops_loader_workers_that_an_exception_still_holds(make_trainer, tmp_path):
    """After an exception its traceback keeps the loader iterator alive; at exit multiprocessing would SIGTERM
    the workers (they ignore it: the stop belongs to the trainer) and wait for them forever. ``close`` (the
    trainer's ``finally``) stops them itself."""
    import psutil

    trainer = make_trainer(tmp_path, "data.num_workers=1")
    trainer.train_step(*trainer.next_batch())
    held = trainer.loader._iterator  # what a traceback's frames would hold
    assert held is not None and len(held._workers) == 1
    workers = [psutil.Process(w.pid) for w in held._workers]  # not children(): other tests may leave helpers
    assert all(w.is_running() for w in workers)
    trainer.close()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"loader worker {alive} still running after Trainer.close()"


@pytest.mark.parametrize("err, lost", [
    (RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error [10.231.0.12]:58576: Connection reset by peer."), True),
    (RuntimeError("[gloo/transport/tcp/pair.cc:598] Connection closed by peer [10.0.0.2]:4321"), True),
    (torch.distributed.DistNetworkError("failed to recv, got 0 bytes"), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x4)"), False),
])
def test_peer_lost_tells_a_dead_rank_from_a_bug(err, lost):
    """Only a collective whose peer went away makes the trainer write ``lost`` (the wrapper requeues that)."""
    from ddpm.dist import peer_lost

    assert peer_lost(err) is lost


def test_sample_grid_leaves_the_global_rng_alone(make_trainer, tmp_path):
    """A grid builds a U-Net (whose initialisation draws from the global RNG): it must not move dropout's RNG,
    or a run stopped on a grid step (the grid is skipped after a stop) would resume differently."""
    trainer = make_trainer(tmp_path / "run", "model.dropout=0.1")
    trainer.train_step(*trainer.next_batch())
    before = torch.get_rng_state()
    trainer.sample_grid()
    assert (tmp_path / "run" / "grids" / "step_00000001.png").is_file()
    assert torch.equal(torch.get_rng_state(), before)


def test_grids_do_not_change_training_with_dropout(make_trainer, tmp_path):
    """Train 6 steps with a grid every 2 steps == 6 steps with no grid, bitwise (dropout 0.1 draws every step)."""
    common = ("model.dropout=0.1", "training.num_iterations=6", "training.save_every=1000", "sampling.num_steps=2")
    with_grids = make_trainer(tmp_path / "grids", *common, "training.sample_every=2")
    assert with_grids.fit() == "done"
    assert len(list((tmp_path / "grids" / "grids").glob("step_*.png"))) == 3
    without = make_trainer(tmp_path / "plain", *common, "training.sample_every=1000")
    assert without.fit() == "done"
    assert_tensors_equal(with_grids.model.state_dict(), without.model.state_dict())
    assert_tensors_equal(with_grids.ema.state_dict(), without.ema.state_dict())


def test_a_crash_loop_is_counted_across_attempts(tmp_path):
    """Attempts that lose a rank without adding a checkpoint count up (the wrapper stops requeuing at CRASH_LOOP);
    a new checkpoint starts the count again; any other state starts from zero."""
    from ddpm.cluster.attempt import CRASH_LOOP, Attempt, lost_streak
    from ddpm.status import write_status

    ckpts, run = tmp_path / "checkpoints", RunDir(tmp_path)
    ckpts.mkdir()
    assert Attempt.read(run) == Attempt(-1, 0)
    streak = 0
    for _ in range(CRASH_LOOP):  # start-up crashes, no checkpoint ever written
        write_status(run, "starting", -1, 0, lost_streak=streak)
        before = Attempt.read(run)
        streak = lost_streak(before, Attempt.read(run))
        write_status(run, "lost", -1, 0, lost_streak=streak)
    assert streak == CRASH_LOOP == 3
    before = Attempt.read(run)
    (ckpts / "step_00000100.pt").write_bytes(b"")  # this attempt made progress
    assert before == Attempt(-1, 3) and lost_streak(before, Attempt.read(run)) == 1
    write_status(run, "stopped", 100, 0, lost_streak=2)
    assert Attempt.read(run) == Attempt(100, 0)

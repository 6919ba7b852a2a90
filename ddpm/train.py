"""The training loop: ``python -m ddpm.train --config X [overrides] [--run-dir D] [--overfit-single-batch]``.

One process (CPU or one GPU) or torchrun (DDP: NCCL on GPU, gloo on CPU). Read ``main`` top to bottom: build
(model, EMA, optimizer, data; the constructor reads no run state and installs nothing) -> stop-signal handlers
-> resume from the newest checkpoint that loads -> loop (step, log, sample, save) -> stop at the end or on a
signal. Resume is exact: the noise and timesteps of step s are a pure
function of (seed, s) drawn for the global batch, the data position is saved, and every rank's RNG state
is restored, so a stopped-and-resumed run ends with the same weights as one never stopped.

Outcome: ``status.json`` in the run directory says ``done``, ``stopped`` (a stop signal arrived; the
checkpoint is durable; requeue me) or ``lost`` (another rank died mid-collective; requeue me). A single process
exits 0 when done and 3 (``EXIT_REQUEUE``) when stopped; under torchrun, which reports any non-zero worker exit
as a failure, workers exit 0 and the launcher reads ``status.json``.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from ddpm import dist
from ddpm.checkpoint import FORMAT, load_latest, save_checkpoint
from ddpm.config import Config, dump_config, load_config
from ddpm.configtools import parse_with_overrides
from ddpm.cpus import apply_cpu_budget, cpu_budget
from ddpm.data import create_dataloader_from_config, default_num_workers, save_image
from ddpm.diffusion import DDPM
from ddpm.ema import EMA
from ddpm.envcheck import SetupError, check_torch_floor
from ddpm.errors import EXIT_FAILURE, EXIT_OK, EXIT_REQUEUE, CheckpointError, ConfigError, DDPMError, cli_entry
from ddpm.grid import draw_grid
from ddpm.optim import build_optimizer, follow_fused_setting, step_unless
from ddpm.precision import amp_dtype, autocast, configure_backends, describe_precision, memory_format, restore_scaler
from ddpm.provenance import write_provenance
from ddpm.rundir import RunDir
from ddpm.runlog import RunLogger
from ddpm.status import RunState, as_failure, record_failure, write_status
from ddpm.unet import UNet


def quartile_losses(losses: torch.Tensor, t: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """[sum_q, count_q] of the per-sample losses [B] whose t [B] lies in quarter q of [0, T): [2, 4]."""
    quarter = (t.to(losses.device) * 4 // num_timesteps).long()  # [B] in 0..3
    sums = losses.new_zeros(4, dtype=torch.float32).index_add_(0, quarter, losses.float())
    return torch.stack([sums, torch.bincount(quarter, minlength=4).to(sums)])


class Trainer:
    """Owns model, EMA, optimizer, scaler and data; ``train_step``, ``state_dict``, ``close``. A run resumed at the
    same world size ends bitwise equal to one never stopped: on CPU always, on GPUs with training.deterministic."""

    def __init__(self, cfg: Config, run: RunDir, env: dist.DistEnv, overfit_single_batch: bool = False,
                 loader: Any = None):
        """``run``: the run directory (checkpoints, status, logs, grids); ``loader`` (an iterable of [B, C, S, S]
        batches in [-1, 1] with ``close()``): None = ``cfg.data``'s."""
        self.cfg, self.run, self.env = cfg, run, env
        tc, infra = cfg.training, cfg.infrastructure
        if tc.batch_size % env.world_size:
            raise ConfigError(f"training.batch_size: {tc.batch_size} is not divisible by world size {env.world_size}")
        self.local_batch = tc.batch_size // env.world_size
        self.device, cuda = env.device, env.device.type == "cuda"
        self.amp_dtype = amp_dtype(infra, self.device)  # before any work: bf16 on a card without it is one line
        workers = default_num_workers(cfg.data.num_workers, self.device, cfg.data.source)  # the loader's count
        self.budget = apply_cpu_budget(cpu_budget("train", self.device, workers))  # per rank
        torch.manual_seed(tc.seed + env.rank)  # dropout; overwritten by the checkpoint on resume
        configure_backends(infra, tc, self.device)  # TF32, cuDNN benchmark or deterministic kernels

        self.model = UNet.from_config(cfg.model, cfg.data.image_size).to(self.device)
        self.memory_format = memory_format(infra, self.device)  # channels_last null: on for CPU, off for CUDA
        self.model.to(memory_format=self.memory_format)
        self.ema = EMA(self.model, tc.ema_decay, tc.ema_start)
        net: torch.nn.Module = self.model
        if env.distributed:
            net = DistributedDataParallel(self.model, device_ids=[self.device] if cuda else None,
                                          gradient_as_bucket_view=True)  # no gradient copy
        if infra.compile:
            net = torch.compile(net)
        self.ddpm = DDPM.from_config(cfg.ddpm, net)
        self.optimizer = build_optimizer(self.model.parameters(), tc, infra)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        self.loader = loader or create_dataloader_from_config(cfg.data, self.local_batch, env.rank,
                                                              env.world_size, seed=tc.seed, device=self.device)
        self.overfit = overfit_single_batch
        self.step, self._skipped = 0, torch.zeros((), device=self.device)  # non-finite steps, counted on the device
        self._stop_flag = dist.LaggedMax(self.device)
        self.stop_requested = False  # set by a signal on this rank
        self.stop_now = False  # the flag reduced over ranks: every rank agrees on it
        self._stop_at: tuple[str, float] | None = None  # (signal name, monotonic time) of the first stop signal
        self._last_beat, self._last_save_s, self._handlers = 0.0, 0.0, False
        self._logger: RunLogger | None = None  # opened as the loop starts: TensorBoard continues at the resumed step
        self._iter: Any = None  # the loader's workers start with the first batch
        self._fixed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # ---- the entry point's explicit steps ------------------------------------------------------------
    def install_stop_handlers(self) -> None:
        """training.stop_signal and SIGTERM (a preemption) set a flag; the loop saves and stops at the next step."""
        def request_stop(signum: int, _frame: Any) -> None:  # only sets a flag; idempotent
            if not self.stop_requested:
                self._stop_at = (signal.Signals(signum).name, time.monotonic())
                print(f"[rank {self.env.rank}] received {signal.Signals(signum).name}: stopping at the "
                      "next step boundary", flush=True)
            self.stop_requested = True

        for name in {self.cfg.training.stop_signal, "TERM"}:
            signal.signal(getattr(signal, f"SIG{name}"), request_stop)
        self._handlers = True

    def resume(self) -> None:
        """Load the newest checkpoint that loads (rank 0 chooses, every rank reads it; if none of them loads, rank 0's
        one-line error stops every rank). A run without one starts from training.init_from when set."""
        found, error = None, None
        if self.env.is_main:
            try:
                found = load_latest(self.run, warn=self._print)
            except CheckpointError as err:
                error = str(err)
        path, error = dist.broadcast_object((str(found[0]) if found else None, error))
        if error is not None:
            raise CheckpointError(error)
        if path is None:
            if self.cfg.training.init_from:  # a new run from a diffusers model folder (ddpm.export)
                from ddpm.init_from import start_from
                self._print(start_from(self.model, self.ema, self.cfg, self.run if self.env.is_main else None))
            return
        state = found[1] if found else torch.load(path, map_location="cpu", weights_only=True)
        try:
            self.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as err:  # e.g. model.* changed since it was written
            reason = str(err).strip().splitlines()[0][:200]
            raise CheckpointError(f"{path}: does not fit this config ({reason}); use a new run.name or "
                                  "the config the run was started with") from None
        self._print(f"resumed from {path} at step {self.step}")

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (a read of the device counter: on log, save and status only)."""
        return int(self._skipped.item())

    # ---- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (collective: every rank must call it)."""
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": FORMAT, "step": self.step,
            "model": self.model.state_dict(),
            "model_config": self.model.config_dict(),
            "ddpm": self.ddpm.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {"world_size": self.env.world_size, "ranks": dist.gather_objects(rng)},
            "data": self.loader.state_dict(),
            "config": self.cfg.to_dict(),
            "counters": {"skipped_steps": self.skipped_steps},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        follow_fused_setting(self.optimizer)  # the groups keep the saved "fused": this run's setting wins
        self.scaler = restore_scaler(self.scaler, state["scaler"], self.device.type, self._print)  # fp16 <-> bf16
        self.loader.load_state_dict(state["data"])
        self.step = int(state["step"])
        self._skipped.fill_(int(state["counters"]["skipped_steps"]))
        rng = state["rng"]
        if rng["world_size"] == self.env.world_size:
            mine = rng["ranks"][self.env.rank]
            torch.set_rng_state(mine["cpu"])
            if "cuda" in mine and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"], self.device)
        else:
            self._print(f"warning: checkpoint was written by {rng['world_size']} ranks, this run has "
                        f"{self.env.world_size}: dropout RNG reseeded (data order and noise stay exact)")

    # ---- one step ----------------------------------------------------------------------------------
    def _noise_for_step(self, step: int, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] and eps [B,C,H,W] for this rank's slice of the global batch of ``step``: drawn for the whole
        global batch from a generator seeded by (seed, step), so they do not depend on the world size
        (Algorithm 1: t ~ U{1..T}, eps ~ N(0, I))."""
        g = torch.Generator(device=self.device).manual_seed(self.cfg.training.seed * 1_000_003 + step)
        n, lo = self.cfg.training.batch_size, self.env.rank * self.local_batch
        t = torch.randint(0, self.ddpm.num_timesteps, (n,), generator=g, device=self.device)
        noise = torch.randn((n, *x0.shape[1:]), generator=g, device=self.device)
        return t[lo:lo + self.local_batch], noise[lo:lo + self.local_batch]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0, t, noise) for the next step; one fixed triple in --overfit-single-batch mode."""
        if self.overfit and self._fixed is not None:
            return self._fixed
        with torch.random.fork_rng(devices=[]):  # a new loader iterator draws a worker seed from the CPU RNG:
            self._iter = self._iter or iter(self.loader)
            x0 = next(self._iter)  # keep it from shifting dropout's RNG, so resume stays exact
        x0 = x0.mean(dim=1, keepdim=True) if self.cfg.model.in_channels == 1 else x0  # greyscale [B, 1, S, S]
        x0 = x0.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        t, noise = self._noise_for_step(0 if self.overfit else self.step, x0)
        if self.overfit:
            self._fixed = (x0, t, noise.contiguous(memory_format=self.memory_format))
            return self._fixed
        return x0, t, noise.contiguous(memory_format=self.memory_format)

    def train_step(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward, backward, clip, AdamW, EMA; skips (and counts) a step whose gradients are not finite.

        The host never waits for the device here (nanoGPT, torchtitan): the skip is decided on the device (the
        optimizer's ``found_inf``, as torch's GradScaler passes it; the EMA folds in nothing), and the stop flag,
        reduced over ranks so every rank stops at the same step, is read one step late.
        """
        tc = self.cfg.training
        lr = tc.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with autocast(self.amp_dtype, self.device):
            loss, metrics = self.ddpm.compute_loss(x0, t, noise)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        max_norm = tc.gradient_clip_norm if tc.gradient_clip_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        bad = (~torch.isfinite(grad_norm)).float()  # 0-dim, on the device; equal on every rank (DDP's gradients)
        self._skipped += bad
        if self.scaler.is_enabled():  # fp16: unscale_ found the same non-finite gradients
            self.scaler.step(self.optimizer)
        else:
            step_unless(self.optimizer, bad)
        self.scaler.update()  # fp16: lowers the scale after a skipped step; bf16/fp32: no-op
        self.ema.update(self.model, self.step + 1, apply=1.0 - bad)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.stop_now = self._stop_flag.push(self.stop_requested)
        return {**metrics, "grad_norm": grad_norm.detach(), "lr": torch.tensor(lr),
                "skipped_steps": self._skipped.clone()}

    # ---- the loop ----------------------------------------------------------------------------------
    def fit(self) -> str:
        """Train to ``num_iterations`` or until a stop signal; returns "done" or "stopped"."""
        tc = self.cfg.training
        if self.env.is_main:
            dump_config(self.cfg, self.run.config)
            write_status(self.run, RunState.RUNNING, self.step, self.skipped_steps)  # a crash leaves this
        self._print(f"training {sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters on "
                    f"{self.env.world_size} x {self.device.type}, global batch {tc.batch_size}, "
                    f"{describe_precision(self.amp_dtype, self.device)}, step {self.step}/{tc.num_iterations}, "
                    f"run dir {self.run}; each rank: {self.budget}")
        self.logger.mark_start(self.step)  # the first log's rate and ETA count from here (set-up and resume done)
        while self.step < tc.num_iterations and not self.stop_now:
            x0, t, noise = self.next_batch()
            metrics = self.train_step(x0, t, noise)
            if self.step % tc.log_every == 0:
                self.log(metrics, t)
            self.heartbeat()
            # a grid can take minutes: not after a stop signal (it uses no global RNG, so resume stays exact)
            if grid := self.step % tc.sample_every == 0 and not (self.stop_now or self.stop_requested):
                self.heartbeat(force=True)  # the step a grid that never ends is named by
                self.sample_grid()
            if save := self.stop_now or self.step % tc.save_every == 0 or self.step == tc.num_iterations:
                self.save()
            self.heartbeat(force=grid or save)
        state = RunState.DONE if self.step >= tc.num_iterations else RunState.STOPPED
        if self.env.is_main:
            write_status(self.run, state, self.step, self.skipped_steps, last_save_s=self._last_save_s)
        print(f"[rank {self.env.rank}] {state} at step {self.step} ({self.skipped_steps} non-finite steps skipped)",
              flush=True)  # every rank: they agree on the step
        dist.barrier()
        return state

    def log(self, metrics: dict[str, torch.Tensor], t: torch.Tensor) -> None:
        """On a log step (collective): loss, grad norm and the mean loss per quarter of [0, T) over every
        rank's samples (a quarter without samples is left out), learning rate, skipped steps."""
        quarters = quartile_losses(metrics["losses"], t, self.ddpm.num_timesteps)  # [2, 4]
        head = torch.stack([metrics["loss"].float(), metrics["grad_norm"].float()]).to(quarters)
        total = dist.sum_across_ranks(torch.cat([head, quarters.flatten()])).tolist()
        n = self.env.world_size
        scalars = {"loss": total[0] / n, "grad_norm": total[1] / n, "lr": float(metrics["lr"]),
                   "skipped_steps": float(self.skipped_steps)}
        sums, counts = total[2:6], total[6:10]
        scalars.update({f"loss_q{q}": s / c for q, (s, c) in enumerate(zip(sums, counts, strict=True)) if c})
        self.logger.log(self.step, scalars)

    @property
    def logger(self) -> RunLogger:
        self._logger = self._logger or RunLogger(self.run, self.cfg.training, self.env, start_step=self.step)
        return self._logger

    def heartbeat(self, force: bool = False) -> None:
        """Rank 0 refreshes ``status.json`` (running, step, time) at most every 5 s, for the wrapper's watchdog
        (``training.watchdog_s``): a hung rank blocks every rank at the next collective, so the beat stops."""
        now = time.monotonic()
        if not self.env.is_main or (not force and now - self._last_beat < 5.0):
            return
        self._last_beat = now
        write_status(self.run, RunState.RUNNING, self.step, self.skipped_steps, last_save_s=self._last_save_s)

    def save(self) -> Path | None:
        """Checkpoint (collective). A failed write (a full disk) stops every rank with rank 0's one line."""
        t0 = time.monotonic()
        state = self.state_dict()  # collective (RNG states of every rank)
        path, error = None, None
        if self.env.is_main:
            try:
                path = save_checkpoint(self.run, state, self.cfg.training.keep_last,
                                       self.cfg.training.milestone_every)
            except CheckpointError as err:
                error = str(err)
        error = dist.broadcast_object(error)  # no rank goes on before the checkpoint is durable
        if error is not None:
            raise CheckpointError(error)
        self._last_save_s = time.monotonic() - t0
        self._print(f"saved {path} in {self._last_save_s:.1f} s")
        if self.stop_now and self._stop_at is not None:
            name, at = self._stop_at
            self._print(f"stop: checkpoint durable {time.monotonic() - at:.1f} s after {name}")
        return path

    def sample_grid(self) -> None:
        """EMA samples from fixed seeds -> grids/step_<N>.png and TensorBoard (rank 0), beating the heartbeat."""
        if not self.env.is_main:
            return
        images = draw_grid(self.cfg, self.model, self.ema, self.ddpm.state_dict(), self.amp_dtype, self.heartbeat)
        path = self.run.grid(self.step)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(images, path)
        self.logger.image(self.step, images)

    def _print(self, msg: str) -> None:
        if self.env.is_main:
            print(msg, flush=True)

    def close(self) -> None:
        """Flush the logs; ignore later stop signals (nothing is left to save; frees the handlers' self)."""
        for name in {self.cfg.training.stop_signal, "TERM"} if self._handlers else ():
            signal.signal(getattr(signal, f"SIG{name}"), signal.SIG_IGN)
        self.loader.close()
        if self._logger is not None:
            self._logger.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value, parsed as YAML")
    p.add_argument("--run-dir", help="run directory (default: <run.root>/<run.name>)")
    p.add_argument("--overfit-single-batch", action="store_true",
                   help="debug: train on one fixed batch (and fixed t, noise); the loss should go to ~0")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    check_torch_floor()
    args = parse_with_overrides(build_parser(), argv)
    cfg = load_config(args.config, args.overrides)  # exits with one line on a config error
    run = RunDir(args.run_dir) if args.run_dir else cfg.run_dir  # the one RunDir of this process
    try:  # collectives time out at twice the watchdog bound: the wrapper's watchdog acts first, this is the backstop
        env = dist.init_distributed(cfg.infrastructure.num_gpus > 0, 2 * cfg.training.watchdog_s or 1800)
    except SetupError as err:  # GPUs asked for, not seen: the wrapper and `launch.py status` show the line
        record_failure(run, dist.DistEnv(rank=int(os.environ.get("RANK", "0"))), -1, err)
        raise
    write_provenance(run, cfg, env)  # collective: gathers every rank's host
    try:
        trainer = Trainer(cfg, run, env, overfit_single_batch=args.overfit_single_batch)
        trainer.install_stop_handlers()  # before the resume: a stop during a long read is kept
        trainer.resume()
    except (DDPMError, torch.OutOfMemoryError) as err:  # every checkpoint unreadable, a missing dataset, a model
        failure = as_failure(err, cfg, env, 0)  # that does not fit: not a lost rank (see the wrapper)
        record_failure(run, env, -1, failure)
        dist.cleanup()
        raise failure from None
    try:
        state = trainer.fit()
    except (DDPMError, torch.OutOfMemoryError) as err:  # a full disk, an unreadable image, out of memory (a
        failure = as_failure(err, cfg, env, trainer.step)  # RuntimeError, but no lost peer): not requeued
        record_failure(run, env, trainer.step, failure)
        raise failure from None
    except RuntimeError as err:  # another rank died mid-collective (its node or process): the wrapper requeues
        if not dist.peer_lost(err):
            raise
        record_failure(run, env, trainer.step, err, state=RunState.LOST)
        return EXIT_FAILURE
    finally:
        trainer.close()
        del trainer  # free the DDP wrapper before the process group goes (see dist.cleanup)
        dist.cleanup()
    return EXIT_REQUEUE if state == RunState.STOPPED and "TORCHELASTIC_RUN_ID" not in os.environ else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""What a training run logs as it goes: TensorBoard events (rank 0) and the console's progress line.

    <run>/tb/                   TensorBoard events (purge_step on resume: no duplicate points)

The run's state is :mod:`ddpm.status` (status.json), where it came from :mod:`ddpm.provenance`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ddpm.config import TrainingConfig
from ddpm.rundir import RunDir

if TYPE_CHECKING:
    import torch

    from ddpm import dist

CONSOLE = ("loss", "grad_norm", "lr")  # the scalars of the console line


class RunLogger:
    """Scalars -> TensorBoard and a console line; rank 0 writes, every rank may call.

    It logs whatever it is given (the trainer reduces over ranks and decides what to log and when) and adds
    ``train/images_per_s`` (and ``train/gpu_mem_gb`` on CUDA) from the steps and the time since the previous
    log. The first log counts from the step the run started or resumed at and the time training began: the
    trainer calls :meth:`mark_start` as its loop begins (after data, model and resume set-up). A log with no
    step behind it prints ``- img/s eta -``, never a rate of 0 and an ETA of centuries.
    """

    def __init__(self, run: RunDir, tc: TrainingConfig, env: dist.DistEnv, start_step: int = 0):
        """Events go to ``run``'s tb/; ``start_step``: the step the run starts or resumes at (TensorBoard drops
        points after it)."""
        self.env, self.total, self.global_batch = env, tc.num_iterations, tc.batch_size
        self.writer = None
        if env.is_main:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events at steps > start_step (written after that checkpoint) are dropped.
            self.writer = SummaryWriter(str(run.tb), purge_step=start_step + 1 if start_step else None)
        self._last_time, self._last_step = time.perf_counter(), start_step

    def mark_start(self, step: int, started: float | None = None) -> None:
        """Training begins (or resumes) at ``step`` now (``started``: a ``time.perf_counter()`` reading): the next
        log's rate and ETA count from here."""
        self._last_time, self._last_step = time.perf_counter() if started is None else started, step

    def _rate(self, step: int, now: float) -> float | None:
        """Images per second from the last mark (or log) to ``step`` at ``now``; None with no step in between."""
        steps, seconds = step - self._last_step, now - self._last_time
        return steps * self.global_batch / seconds if steps > 0 and seconds > 0 else None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Write ``scalars`` at ``step`` (names starting with "loss" under loss/, the rest under train/)."""
        now = time.perf_counter()
        images_per_s = self._rate(step, now)
        self._last_time, self._last_step = now, step
        if self.writer is None:
            return
        scalars = dict(scalars) if images_per_s is None else {**scalars, "images_per_s": images_per_s}
        if self.env.device.type == "cuda":
            import torch

            scalars["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
        for name, value in scalars.items():
            self.writer.add_scalar(f"{'loss' if name.startswith('loss') else 'train'}/{name}", value, step)
        print(progress_line(step, self.total, self.global_batch, scalars, images_per_s), flush=True)

    def image(self, step: int, images: torch.Tensor) -> None:
        """A grid of [N,C,H,W] images in [-1,1] into TensorBoard, images under 32 pixels enlarged by whole pixels."""
        if self.writer is None:
            return
        from ddpm.data import make_grid
        from ddpm.imagegrid import enlarge_factor

        k = enlarge_factor(max(images.shape[-2:]))
        images = images.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1) if k > 1 else images
        self.writer.add_image("samples/ema", (make_grid(images) + 1) / 2, step)

    def close(self) -> None:
        """Flush and close the TensorBoard writer (rank 0)."""
        if self.writer is not None:
            self.writer.close()


def progress_line(step: int, total: int, global_batch: int, scalars: dict[str, float],
                  images_per_s: float | None) -> str:
    """``step N/TOTAL (P%) loss L grad_norm G lr LR R img/s eta H:MM:SS`` (the scalars of CONSOLE it is given);
    without a rate (no step since the last mark or log) ``- img/s eta -``."""
    shown = " ".join(f"{k} {scalars[k]:.4g}" for k in CONSOLE if k in scalars)
    speed = "- img/s eta -"
    if images_per_s is not None:
        speed = f"{images_per_s:.1f} img/s eta {_hms((total - step) * global_batch / images_per_s)}"
    return f"step {step}/{total} ({100 * step / total:.1f}%) {shown} {speed}"


def _hms(seconds: float) -> str:
    """``h:mm:ss`` of a non-negative duration (negative: 0:00:00)."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"



"""The metrics of optimizer steps and the preemption flag, summed over the ranks.

Between two syncs each rank sums (loss x n, correct, n) of its micro-batches (:class:`StepMeter`).
A sync starts one asynchronous all-reduce of those sums together with the rank's preemption flag
(:class:`StepReducer`) and collects the previous one, so its latency hides behind compute. Every
rank gets the same :class:`StepStats` in the same order, hence takes the same decisions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class StepStats:
    """The optimizer steps since the previous sync, summed over all ranks."""

    step: int
    epoch: int
    lr: float
    step_time_s: float
    loss_sum: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    stop: bool = False

    def row(self, batch_size: int) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "loss": self.loss_sum / self.seen,
            "acc": self.correct / self.seen,
            "lr": self.lr,
            "samples_per_s": batch_size / self.step_time_s,
            "step_time_s": self.step_time_s,
        }


class StepReducer:
    """One all-reduce per sync for the metrics and every rank's preemption flag, started
    asynchronously and completed at the next sync (or by :meth:`drain`), so its latency hides
    behind compute instead of adding to it. Results arrive in order and are identical on every
    rank, hence so are the decisions taken from them."""

    def __init__(self) -> None:
        self.pending: tuple[StepStats, torch.Tensor, Any] | None = None

    def push(
        self, step: int, epoch: int, sums: torch.Tensor, stop: bool, lr: float, step_time_s: float
    ) -> list[StepStats]:
        """Start reducing ``sums`` (and the flag); returns what finished meanwhile."""
        done = self.drain()
        data = torch.cat([sums, sums.new_tensor([float(stop)])])
        work = dist.all_reduce(data, async_op=True)
        self.pending = (StepStats(step, epoch, lr, step_time_s), data, work)
        return done

    def drain(self) -> list[StepStats]:
        """Wait for the reduction in flight, if any."""
        if self.pending is None:
            return []
        stats, data, work = self.pending
        self.pending = None
        work.wait()
        stats.loss_sum, stats.correct, stats.seen, stop = data.tolist()
        stats.stop = stop > 0
        return [stats]


class StepMeter:
    """This rank's (loss x n, correct, n) since the last sync, the training clock, and the
    :class:`StepReducer` that sums each interval over the ranks, one sync behind."""

    def __init__(self, device: Any, step: int, timing: dict[str, float] | None = None):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)
        self.reducer = StepReducer()
        self.synced = self.first_step = step  # the last sync; where this process started
        self.train_time = 0.0
        # The training time and steps of the processes before this one (from the checkpoint).
        self.prior_time = float((timing or {}).get("train_time_s", 0.0))
        self.prior_steps = int((timing or {}).get("steps", 0))
        self.tick = time.perf_counter()

    def add(self, loss: torch.Tensor, correct: torch.Tensor, n: int) -> None:
        self.sums += torch.stack(
            [loss.detach().double() * n, correct.double(), self.sums.new_tensor(n)]
        )

    def sync(self, step: int, epoch: int, stop: bool, lr: float) -> list[StepStats]:
        """Push the interval ending at ``step``; returns the intervals reduced meanwhile."""
        elapsed, self.tick = time.perf_counter() - self.tick, time.perf_counter()
        self.train_time += elapsed
        steps, self.synced = step - self.synced, step
        done = self.reducer.push(step, epoch, self.sums, stop, lr, elapsed / steps)
        self.sums.zero_()
        return done

    def drain(self) -> list[StepStats]:
        return self.reducer.drain()

    def restart_clock(self) -> None:
        self.tick = time.perf_counter()

    def timing(self, step: int) -> dict[str, float]:
        """The training time and timed steps of the whole run up to ``step`` (the last sync),
        across requeues: stored in checkpoints, so a resumed process carries them on."""
        steps = self.prior_steps + step - self.first_step
        return {"train_time_s": self.prior_time + self.train_time, "steps": steps}

    def mean_step_time(self, step: int) -> float:
        timing = self.timing(step)
        return timing["train_time_s"] / max(timing["steps"], 1)


def agreed_stop_signal(received: int | None, device: Any) -> int | None:
    """The signal that stopped the run, the same on every rank (call it on all of them, after a
    reduced :class:`StepStats` said stop). The flag crosses ranks in the step's all-reduce but
    the signal did not: a rank stopped by another's (rank 1's node got Slurm's SIGTERM first)
    had none of its own and took the time-limit signal for it, so rank 0 logged a preemption as
    a time limit and requeued the job itself, which Slurm was about to do. The highest signal
    number any rank received wins (SIGTERM, 15, over the time-limit USR1/USR2, 10/12);
    ``None`` when no rank received one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return received
    number = torch.tensor([received or 0], dtype=torch.int64, device=device)
    dist.all_reduce(number, op=dist.ReduceOp.MAX)
    return int(number.item()) or None

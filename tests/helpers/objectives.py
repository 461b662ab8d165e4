"""Cheap objectives for testing the sweep machinery with real Optuna and real jobs.

Each implements :class:`hpcdl.hpo.protocol.Objective` (check, run, final); ``plain`` is a bare
function, the form users may still give (wrapped by hpcdl, no final).
"""

from __future__ import annotations

import atexit
import os
import time
from pathlib import Path

from hpcdl.hpo.protocol import BaseObjective


def plain(params: dict, ctx) -> float:
    """A learning curve peaking at x=0.3; reports every epoch (so pruners have something)."""
    x = params["x"]
    value = 0.0
    for epoch in range(1, int(params.get("epochs", 4)) + 1):
        value = (1 - (x - 0.3) ** 2) * (1 - 0.5**epoch)
        with (ctx.trial_dir / "epochs.txt").open("a") as f:
            f.write(f"{epoch} {value}\n")
        ctx.report(epoch, value)
        time.sleep(float(os.environ.get("HPCDL_TEST_EPOCH_S", "0")))
    return value


class Curve(BaseObjective):
    """``plain`` with a final score: test_acc = 1 - (x - 0.3)^2.

    ``HPCDL_TEST_LINGER_SLOT=i``: the process that ran slot i stays alive for
    ``HPCDL_TEST_LINGER_S`` seconds after the trial is recorded (its array task keeps running,
    so a test can cancel a task whose trial is already finished)."""

    def run(self, params: dict, ctx) -> float:
        if os.environ.get("HPCDL_TEST_LINGER_SLOT") == str(ctx.slot.slot):
            atexit.register(time.sleep, float(os.environ.get("HPCDL_TEST_LINGER_S", "60")))
        return plain(params, ctx)

    def final(self, params: dict, spec, out_dir: Path) -> dict:
        return {"test_acc": 1 - (params["x"] - 0.3) ** 2}


class Flaky(Curve):
    """Fails on its first attempt, then behaves like ``curve``."""

    def run(self, params: dict, ctx) -> float:
        if ctx.slot.attempts == 1:
            raise RuntimeError("first attempt fails on purpose")
        return super().run(params, ctx)


class BaseLearningRate(Curve):
    """Reads the sweep's base training config the way hpcdl's trainer does (after a pause, so a
    test can edit the original meanwhile) and returns its ``optimizer.lr``."""

    def run(self, params: dict, ctx) -> float:
        from hpcdl.hpo.objective import trial_config

        time.sleep(float(os.environ.get("HPCDL_TEST_EPOCH_S", "0")))
        cfg = trial_config(ctx.spec, params, ctx.trial_dir)
        (ctx.trial_dir / "data.txt").write_text(f"{cfg.data.train}\n{cfg.data.val}\n")
        return cfg.optimizer.lr


class RankOneFails(Curve):
    """A multi-rank trial: on slot 0's first attempt rank 1 raises in set-up while rank 0 waits
    in a collective it will never complete; on slot 1's first attempt rank 1 hangs; otherwise every rank joins an all-reduce, then runs
    ``curve``. Each rank writes ``rank<r>-attempt<a>.pid`` into the trial folder."""

    def run(self, params: dict, ctx) -> float:
        import torch
        import torch.distributed as dist

        rank = dist.get_rank()
        (ctx.trial_dir / f"rank{rank}-attempt{ctx.slot.attempts}.pid").write_text(str(os.getpid()))
        first = ctx.slot.attempts == 1 and rank == 1
        if first and ctx.slot.slot == 0:
            raise RuntimeError("rank 1 breaks in set-up on purpose")
        if first and ctx.slot.slot == 1:
            time.sleep(3600)  # hangs: rank 0's all-reduce times out
        total = torch.ones(1)
        dist.all_reduce(total)
        assert int(total.item()) == dist.get_world_size() == 2
        return super().run(params, ctx)


curve = Curve()
rank_one_fails = RankOneFails()
base_lr = BaseLearningRate()
flaky = Flaky()

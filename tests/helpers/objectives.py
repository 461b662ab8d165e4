"""Cheap objectives for testing the sweep machinery with real Optuna and real jobs.

Each implements :class:`hpcdl.hpo.protocol.Objective` (check, run, final); ``plain`` is a bare
function, the form users may still give (wrapped by hpcdl, no final).
"""

from __future__ import annotations

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
    """``plain`` with a final score: test_acc = 1 - (x - 0.3)^2."""

    def run(self, params: dict, ctx) -> float:
        return plain(params, ctx)

    def final(self, params: dict, spec, out_dir: Path) -> dict:
        return {"test_acc": 1 - (params["x"] - 0.3) ** 2}


class Flaky(Curve):
    """Fails on its first attempt, then behaves like ``curve``."""

    def run(self, params: dict, ctx) -> float:
        if ctx.slot.attempts == 1:
            raise RuntimeError("first attempt fails on purpose")
        return super().run(params, ctx)


curve = Curve()
flaky = Flaky()

"""Cheap objectives for testing the sweep machinery with real Optuna and real jobs."""

from __future__ import annotations

import os
import time
from pathlib import Path


def curve(params: dict, ctx) -> float:
    """A learning curve peaking at x=0.3; reports every epoch (so pruners have something)."""
    x = params["x"]
    value = 0.0
    for epoch in range(1, int(params.get("epochs", 4)) + 1):
        value = (1 - (x - 0.3) ** 2) * (1 - 0.5**epoch)
        (ctx.trial_dir / "epochs.txt").open("a").write(f"{epoch} {value}\n")
        ctx.report(epoch, value)
        time.sleep(float(os.environ.get("HPCDL_TEST_EPOCH_S", "0")))
    return value


def _final(params: dict, spec, out: Path) -> dict:
    return {"test_acc": 1 - (params["x"] - 0.3) ** 2}


curve.final = _final


def flaky(params: dict, ctx) -> float:
    """Fails on its first attempt, then behaves like ``curve``."""
    if ctx.slot.attempts == 1:
        raise RuntimeError("first attempt fails on purpose")
    return curve(params, ctx)


flaky.final = _final

"""An objective that writes an offline W&B run folder the way a trial's tracker does: created
at the trial's start and grown every epoch (for ``hpcdl sync --follow``; no W&B involved)."""

from __future__ import annotations

import os
import time


def growing(params: dict, ctx) -> float:
    run = ctx.trial_dir / f"wandb/offline-run-20261207_000000-{ctx.slot.run_id}"
    run.mkdir(parents=True, exist_ok=True)
    for epoch in range(1, 5):
        with (run / f"run-{ctx.slot.run_id}.wandb").open("a") as f:
            f.write(f"epoch {epoch} x={params['x']}\n")
        ctx.report(epoch, params["x"] * epoch)
        time.sleep(float(os.environ.get("HPCDL_TEST_EPOCH_S", "0.5")))
    return params["x"]

"""Cheap objectives for issue 24's search features (several objectives, constraints,
conditional parameters), run by real sweeps on the local profile and the dev cluster."""

from __future__ import annotations

from pathlib import Path

from hpcdl.hpo.protocol import BaseObjective


class TwoGoals(BaseObjective):
    """``acc`` (peaks at x=0.3) against ``latency`` (x itself), and ``mem`` = x - 0.8, a
    constraint (<= 0) that x > 0.8 breaks: the feasible front is x in [0, 0.3]."""

    def run(self, params: dict, ctx) -> dict:
        x = float(params["x"])
        ctx.report(1, x)  # no pruning of a multi-objective study: only the epoch is kept
        return {"acc": 1 - (x - 0.3) ** 2, "latency": x, "mem": x - 0.8}


class Conditional(BaseObjective):
    """Fails the trial if a conditional parameter came when its condition did not hold (or
    not when it did): the sweep's draw is what is tested. ``mem`` = x - 0.5 is a constraint."""

    def run(self, params: dict, ctx) -> dict:
        if ("momentum" in params) != (params["opt"] == "sgd"):
            raise AssertionError(f"momentum drawn against its condition: {params}")
        x = float(params["x"])
        return {"val_acc": 1 - (x - 0.3) ** 2 + params.get("momentum", 0.0) / 10, "mem": x - 0.5}

    def final(self, params: dict, spec, out_dir: Path) -> dict:
        return {"test_acc": 1 - (params["x"] - 0.3) ** 2}

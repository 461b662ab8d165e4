"""Objectives for the warm-worker tests (multi-rank trials that behave)."""

from __future__ import annotations

import os

from tests.helpers.objectives import Curve


class TwoRanks(Curve):
    """Every rank writes ``rank<r>-pid`` into the trial folder and joins an all-reduce that checks
    the world size, then runs ``curve``."""

    def run(self, params: dict, ctx) -> float:
        import torch
        import torch.distributed as dist

        rank = dist.get_rank()
        (ctx.trial_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
        total = torch.ones(1)
        dist.all_reduce(total)
        assert int(total.item()) == dist.get_world_size() == 2
        return super().run(params, ctx)


two_ranks = TwoRanks()

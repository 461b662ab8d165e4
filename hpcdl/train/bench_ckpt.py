"""``hpcdl bench ckpt``: the training time checkpoints cost, synchronous against asynchronous
(``checkpoint.async_save``), against the same run without periodic checkpoints, in one
allocation (every rank runs :func:`bench_ckpt`; rank 0 writes ``OUT/bench_ckpt.json``).

Each round trains the same config three times on fresh run folders, ``steps`` optimizer steps
each: without periodic checkpoints, with a synchronous one every ``every`` steps, with an
asynchronous one; the order rotates from round to round, so drift falls on all three. A run's
training time is from its ``start`` event (set-up done) to its last step row (logged before the
save of that step): it holds the periodic saves (``steps`` is a multiple of ``every``, so
``steps / every - 1`` of them) and nothing of the set-up, the validation or the final save.
**Lost** = (time with checkpoints - time without) / time without, per round: everything the
saves cost, including a writer thread's competition for the cores, and the noise of a shared
machine. **Held** = the time the saves held training (``blocked_s`` of each periodic
``checkpoint`` event) / the run's training time: the stall itself, measured in the loop. The
medians over rounds are the figures.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from hpcdl.errors import HpcdlError
from hpcdl.train.config import TrainConfig
from hpcdl.train.run import Run, ranks
from hpcdl.util import atomic_write_json, read_jsonl

MODES = ("none", "sync", "async")
OnProgress = Callable[[int, int], None]


def training_s(run_dir: Path) -> float:
    """Its ``start`` event -> its last step row (wall clock, from metrics.jsonl)."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    start = next(r["time"] for r in rows if r.get("kind") == "event" and r["event"] == "start")
    last = max(r["time"] for r in rows if r.get("kind") == "step")
    return float(last - start)


def blocked_s(run_dir: Path, steps: int) -> float:
    """The training time the periodic saves held (their ``checkpoint`` events' ``blocked_s``:
    the whole save when synchronous; staging, and any wait for the save before, when not)."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    return float(sum(r.get("blocked_s", 0.0) for r in rows if r.get("kind") == "event"
                     and r["event"] == "checkpoint" and r["step"] < steps))  # fmt: skip


def _run(cfg: TrainConfig, mode: str, steps: int, every: int, run_dir: Path) -> None:
    ckpt = cfg.checkpoint.model_copy(
        update={"every_steps": 0 if mode == "none" else every, "async_save": mode == "async"}
    )
    log = cfg.log.model_copy(update={"every_steps": every, "wandb": False})
    changes = {"run_dir": str(run_dir), "max_steps": steps, "epochs": 10**6, "checkpoint": ckpt,
               "log": log}  # fmt: skip
    Run(cfg.model_copy(update=changes), where="bench ckpt").execute(finish=False)


def bench_ckpt(
    cfg_data: dict[str, Any],
    steps: int,
    every: int,
    rounds: int,
    out: str,
    on_progress: OnProgress | None = None,
) -> dict[str, Any]:
    """The rounds (see the module's docstring); returns the figures (on every rank)."""
    import os

    cfg = TrainConfig.model_validate(cfg_data)
    folders = {(r, m): Path(out) / f"run-{r}-{m}" for r in range(rounds) for m in MODES}
    os.environ.pop("HPCDL_ASYNC_CHECKPOINTS", None)  # each run says which saves it makes
    with ranks():
        if taken := [str(p) for p in folders.values() if p.exists()]:
            raise HpcdlError(f"{', '.join(taken)} exist already: choose another --out")
        seconds: dict[str, list[float]] = {m: [] for m in MODES}
        held: dict[str, list[float]] = {m: [] for m in MODES}
        done = 0
        for r in range(rounds):
            for mode in MODES[r % 3 :] + MODES[: r % 3]:
                _run(cfg, mode, steps, every, folders[r, mode])
                seconds[mode].append(training_s(folders[r, mode]))
                held[mode].append(blocked_s(folders[r, mode], steps))
                done += 1
                if on_progress is not None:
                    on_progress(done, 3 * rounds)
        lost = {m: [(t - base) / base for t, base in zip(seconds[m], seconds["none"], strict=True)]
                for m in ("sync", "async")}  # fmt: skip
        result = {
            "world_size": dist.get_world_size(),
            "zero_stage": cfg.zero_stage,
            "model": cfg.model.name,
            "model_options": cfg.model.options,
            "steps": steps,
            "every": every,
            "saves_per_run": steps // every - 1,
            "rounds": rounds,
            "training_s": seconds,
            "lost": lost,
            "lost_median": {m: statistics.median(v) for m, v in lost.items()},
            "blocked_s": held,
            # the share of the run's training time the saves held it
            "blocked_median": {m: _median_share(held[m], seconds[m]) for m in ("sync", "async")},
            "checkpoint_mb": _checkpoint_mb(folders[0, "sync"]),
        }
        if dist.get_rank() == 0:
            Path(out).mkdir(parents=True, exist_ok=True)
            atomic_write_json(Path(out) / "bench_ckpt.json", result)
    return result


def _median_share(parts: list[float], wholes: list[float]) -> float:
    return statistics.median(p / w for p, w in zip(parts, wholes, strict=True))


def _checkpoint_mb(run_dir: Path) -> float:
    """The size of one checkpoint of the run (its newest), in MB."""
    tags = sorted((run_dir / "checkpoints").glob("step*"))
    if not tags:
        return 0.0
    return sum(p.stat().st_size for p in tags[-1].rglob("*") if p.is_file()) / 1e6


def render(r: dict[str, Any]) -> list[str]:
    lines = [f"bench ckpt: {r['model']} {r['model_options']}, ZeRO-{r['zero_stage']}, "
             f"{r['world_size']} ranks, {r['steps']} steps, a checkpoint every {r['every']} "
             f"({r['saves_per_run']} in the timed part, {r['checkpoint_mb']:.1f} MB each)",
             f"{'mode':<6} {'training s, per round':<30} {'lost (median)':>13} "
             f"{'held by saves (median)':>22}"]  # fmt: skip
    for mode in MODES:
        times = ", ".join(f"{t:.2f}" for t in r["training_s"][mode])
        lost = "-" if mode == "none" else f"{100 * r['lost_median'][mode]:.1f} %"
        held = "-" if mode == "none" else f"{100 * r['blocked_median'][mode]:.2f} %"
        lines.append(f"{mode:<6} {times:<30} {lost:>13} {held:>22}")
    lines.append(
        "lost: training time against the run without periodic saves; held: the time "
        "the saves stopped training (blocked_s of their checkpoint events) / training time"
    )
    return lines

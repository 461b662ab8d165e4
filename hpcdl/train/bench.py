"""Benchmarks run on every rank of an allocation: the trainer against a hand-written DeepSpeed
loop (``hpcdl bench train``) and all-reduce bus bandwidth by message size (``hpcdl bench comm``).
Rank 0 writes the figures to ``OUT/bench_{train,comm}.json``; the CLI prints them."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hpcdl.errors import HpcdlError
from hpcdl.train.config import TrainConfig
from hpcdl.train.run import Run, ranks
from hpcdl.util import atomic_write_json, get_logger

log = get_logger(__name__)
OnProgress = Callable[[int, int], None]


def _write(out: Path, name: str, data: dict[str, Any]) -> None:
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / name, data)


# -- hpcdl bench train ---------------------------------------------------------------------------
def plain_loop(cfg: TrainConfig, steps: int) -> float:
    """A minimal hand-written DeepSpeed loop on the same model, data and engine config; returns
    its mean optimizer-step time (data loading included, as in the trainer)."""
    import deepspeed
    from torch.utils.data import DataLoader

    from hpcdl.data.reader import ShardedDataset
    from hpcdl.train.engine import DTYPES, build_optimizer, deepspeed_config, seed_everything
    from hpcdl.train.models import build_model
    from hpcdl.train.preflight import inspect_data

    rank, world = dist.get_rank(), dist.get_world_size()
    spec = inspect_data(cfg, "bench")
    seed_everything(cfg.seed)
    model = build_model(cfg.model.name, spec.input_shape, spec.num_classes, cfg.model.options)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=build_optimizer(cfg, model), config=deepspeed_config(cfg, world)
    )
    dataset = ShardedDataset(
        cfg.data.train, cfg.batch.micro, rank=rank, world_size=world, seed=cfg.seed,
        block_units=cfg.data.block_units, fields=[cfg.data.input, cfg.data.target],
    )  # fmt: skip
    loader = DataLoader(dataset, batch_size=None)
    dtype = DTYPES[cfg.precision]
    done, epoch = 0, 0
    start = time.perf_counter()
    while done < steps:
        dataset.set_epoch(epoch)
        for batch in loader:
            x, y = batch[cfg.data.input].to(engine.device, dtype), batch[cfg.data.target].long()
            loss = torch.nn.functional.cross_entropy(engine(x).float(), y.to(engine.device))
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            if boundary:
                done += 1
                if rank == 0 and done % cfg.log.every_steps == 0:
                    log.info("step %d loss %.4f", done, loss.item())
                if done == steps:
                    break
        epoch += 1
    elapsed = time.perf_counter() - start
    engine.destroy()
    return elapsed / steps


def hpcdl_loop(cfg: TrainConfig, steps: int, run_dir: Path) -> float:
    """hpcdl's trainer (a :class:`Run`) on a fresh run folder, ``steps`` optimizer steps, no
    periodic checkpoints; returns its mean step time (evaluation and the final checkpoint
    excluded)."""
    changes = {
        "run_dir": str(run_dir),
        "max_steps": steps,
        "epochs": 10**6,
        "checkpoint": cfg.checkpoint.model_copy(update={"every_steps": 0}),
    }
    run = Run(cfg.model_copy(update=changes), where="bench train")
    return run.execute(finish=False)["step_time_mean_s"]  # the rounds share one process group


def bench_train(
    cfg_data: dict[str, Any],
    steps: int,
    rounds: int,
    out: str,
    on_progress: OnProgress | None = None,
) -> dict[str, Any]:
    """Alternate the two loops ``rounds`` times in this one allocation (so drift hits both).
    ``on_progress(done, total)`` counts the finished loops (two per round)."""
    cfg = TrainConfig.model_validate(cfg_data)
    runs = [Path(out) / f"run-{r}" for r in range(rounds)]
    with ranks():
        # Before the first collective, so no rank can have made a folder yet: a benchmark
        # must not resume an earlier one's checkpoints.
        if taken := [str(p) for p in runs if p.exists()]:
            raise HpcdlError(f"{', '.join(taken)} exist already: choose another --out")
        from hpcdl.train.engine import import_deepspeed

        import_deepspeed()
        plain, ours = [], []
        for r, run_dir in enumerate(runs):
            plain.append(plain_loop(cfg, steps))
            if on_progress is not None:
                on_progress(2 * r + 1, 2 * rounds)
            ours.append(hpcdl_loop(cfg, steps, run_dir))
            if on_progress is not None:
                on_progress(2 * r + 2, 2 * rounds)
        result = {
            "world_size": dist.get_world_size(),
            "zero_stage": cfg.zero_stage,
            "precision": cfg.precision,
            "model": cfg.model.name,
            "batch": cfg.batch.size,
            "steps": steps,
            "rounds": rounds,
            "plain_step_s": plain,
            "hpcdl_step_s": ours,
            "ratio": statistics.median(plain) / statistics.median(ours),
        }
        _write(Path(out), "bench_train.json", result)
    return result


# -- hpcdl bench comm ----------------------------------------------------------------------------
def _max_over_ranks(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _time_allreduces(
    paths: dict[str, Any], tensor: torch.Tensor, budget_s: float, rounds: int = 5
) -> dict[str, float]:
    """Seconds per all-reduce for each path: the paths alternate over ``rounds`` rounds (so
    drift and noisy neighbours hit both alike), each round timing a block of repeats on the
    slowest rank; the median round counts. Every rank runs the same number of repeats."""
    for fn in paths.values():
        for _ in range(2):  # warm-up: connections, buffers
            fn(tensor)
    dist.barrier()
    start = time.perf_counter()
    next(iter(paths.values()))(tensor)
    one = _max_over_ranks(time.perf_counter() - start)
    reps = int(max(1, min(100, budget_s / rounds / max(one, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            dist.barrier()
            start = time.perf_counter()
            for _ in range(reps):
                fn(tensor)
            times[name].append(_max_over_ranks((time.perf_counter() - start) / reps))
    return {name: statistics.median(t) for name, t in times.items()}


def bench_comm(
    sizes: list[int], budget_s: float, out: str, on_progress: OnProgress | None = None
) -> dict[str, Any]:
    """All-reduce of float32 messages of each size: DeepSpeed's comm layer (what training uses,
    over hpcdl's rendezvous) vs. raw ``torch.distributed``. Bus bandwidth as nccl-tests
    defines it: bytes / time x 2 (n - 1) / n. ``on_progress(done, total)`` counts sizes."""
    from hpcdl.train.engine import import_deepspeed

    with ranks() as (_, info):
        deepspeed = import_deepspeed()
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else None
        n = info.world_size
        rows = []
        for size in sizes:
            tensor = torch.ones(size // 4, dtype=torch.float32, device=device)
            row: dict[str, Any] = {"bytes": size}
            paths = {"hpcdl": deepspeed.comm.all_reduce, "torch": dist.all_reduce}
            for name, seconds in _time_allreduces(paths, tensor, budget_s).items():
                row[f"{name}_us"] = seconds * 1e6
                row[f"{name}_busbw_gbs"] = size / seconds * 2 * (n - 1) / max(n, 1) / 1e9
            rows.append(row)
            del tensor
            if on_progress is not None:
                on_progress(len(rows), len(sizes))
        result = {
            "world_size": n,
            "backend": dist.get_backend(),
            "nodes": n // info.local_world_size,
            "rows": rows,
        }
        _write(Path(out), "bench_comm.json", result)
    return result

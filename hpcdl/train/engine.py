"""The DeepSpeed side of training: our config turned into DeepSpeed's, the optimizer, the
learning-rate schedule, the engine, and the few torch helpers every rank needs around it.

Pure functions (:func:`deepspeed_config`, :func:`lr_factor`) are tested directly; the rest needs
an initialised process group (world size 1 with gloo is enough).
"""

from __future__ import annotations

import copy
import functools
import importlib
import logging
import math
import random
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hpcdl.train.config import TrainConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def import_deepspeed() -> Any:
    """Import DeepSpeed without its shared-memory CPU all-reduce op: that op only serves
    inference all-reduces, yet it is compiled (~60 s) on the first start of every fresh
    environment. Training uses the process group's all-reduce either way."""
    from hpcdl.train.lazy_dynamo import defer_dynamo

    defer_dynamo()  # before DeepSpeed decorates its functions: eager training never needs dynamo
    import deepspeed

    comm_torch = importlib.import_module("deepspeed.comm.torch")
    comm_torch.build_shm_op = lambda: None  # type: ignore[attr-defined]
    _unpin_world_group(comm_torch.TorchBackend)
    _import_muon_lazily()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend=dist.get_backend())
    return deepspeed


def _import_muon_lazily() -> None:
    """Import DeepSpeed's Muon optimizer module with its ``@compiler.compile()`` kernels
    compiled at their first call instead of at import. ZeRO imports that module on every
    engine build and gradient reduction (``isinstance(optimizer, MuonWithAuxAdam)``), and its
    three ``torch.compile`` decorations import ``torch._dynamo`` and ``torch._inductor`` (2-3 s)
    in a run that never uses Muon (hpcdl builds SGD, Adam or AdamW). A Muon run compiles the
    same functions with the same options, on their first call."""
    names = (
        "deepspeed.runtime.zero.muon.original_muon",
        "deepspeed.runtime.zero.muon.muon_optimizer",
    )
    if any(name in sys.modules for name in names):
        return
    compiler = importlib.import_module("deepspeed.runtime.compiler")
    eager = compiler.compile
    compiler.compile = lambda: _compile_on_first_call  # type: ignore[attr-defined]
    try:
        for name in names:
            importlib.import_module(name)
    except ImportError:  # as DeepSpeed itself: no Muon, nothing to defer
        pass
    finally:
        compiler.compile = eager  # type: ignore[attr-defined]


def _compile_on_first_call(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
    """``torch.compile(fn, **options)``, made when ``fn`` is first called."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        compiled: list[Callable[..., Any]] = []

        @functools.wraps(f)
        def call(*args: Any, **kwargs: Any) -> Any:
            if not compiled:
                compiled.append(torch.compile(f, **options))
            return compiled[0](*args, **kwargs)

        return call

    return decorate(fn) if fn is not None else decorate


def _unpin_world_group(backend: type) -> None:
    """DeepSpeed's ``TorchBackend.barrier`` and ``monitored_barrier`` default to
    ``group=GroupMember.WORLD``, a default Python evaluates once, at import: imported after
    ``init_process_group`` (as here) it is the live world group, held for good. Then
    ``destroy_process_group`` cannot free that group, its gloo threads outlive it, and a thread
    that drops its last finished work while the interpreter shuts down takes the GIL, is ended
    by Python, and aborts the process ("terminate called without an active exception"; see the
    development notes, "Flakes"). Both methods treat ``None`` as the world group."""
    from torch.distributed import ProcessGroup

    for member in vars(backend).values():
        defaults = getattr(member, "__defaults__", None)
        if defaults and any(isinstance(d, ProcessGroup) for d in defaults):
            member.__defaults__ = tuple(
                None if isinstance(d, ProcessGroup) else d for d in defaults
            )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def deepspeed_config(cfg: TrainConfig, world: int, universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config generated from ours, with ``cfg.deepspeed`` merged over it;
    ``universal``: the engine loads a universal checkpoint (a resume on another world size)."""
    ds: dict[str, Any] = {
        "train_batch_size": cfg.batch.size,
        "train_micro_batch_size_per_gpu": cfg.batch.micro,
        "gradient_accumulation_steps": cfg.grad_accumulation(world),
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }
    if cfg.grad_clip:
        ds["gradient_clipping"] = cfg.grad_clip
    if universal:
        ds["checkpoint"] = {"load_universal": True}
    return _merge(ds, cfg.deepspeed)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``: nested dicts merge key by key, anything else replaces. Values
    from ``extra`` are copied: DeepSpeed may modify its config, never the run's."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def lr_factor(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Step → learning-rate multiplier: linear warmup, then constant, cosine or linear decay."""
    s = cfg.schedule

    def factor(step: int) -> float:
        if step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        if s.name == "constant":
            return 1.0
        progress = min(1.0, (step - s.warmup_steps) / max(1, total_steps - s.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if s.name == "cosine" else 1 - progress
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * shape

    return factor


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    from hpcdl.train.lazy_dynamo import defer_dynamo

    defer_dynamo()  # before the first optimizer: eager training never imports torch._dynamo
    o = cfg.optimizer
    params = model.parameters()
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)


def build_engine(
    deepspeed: Any,
    cfg: TrainConfig,
    model: torch.nn.Module,
    world: int,
    total_steps: int,
    universal: bool = False,
) -> Any:
    """The DeepSpeed engine: our optimizer, our schedule (a LambdaLR), the generated config."""
    factor = lr_factor(cfg, total_steps)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=build_optimizer(cfg, model),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
        config=deepspeed_config(cfg, world, universal),
    )
    return engine


def needs_universal(cfg: TrainConfig) -> bool:
    """Whether a checkpoint of this config holds optimizer state partitioned per rank (ZeRO
    1-3; bf16 also partitions its fp32 master weights): then it loads on another world size
    only through DeepSpeed's universal checkpoint. Otherwise every rank's state is whole."""
    return cfg.zero_stage > 0 or cfg.precision == "bf16"


def to_device(
    batch: dict[str, torch.Tensor], cfg: TrainConfig, device: Any, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs in the compute dtype (uint8 images scaled to [0, 1]), labels as int64."""
    x = batch[cfg.data.input].to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    return x.to(dtype), batch[cfg.data.target].to(device, non_blocking=True).long()


@torch.no_grad()
def score(
    model: Any, batches: Any, cfg: TrainConfig, compute_loss: Any, device: Any, dtype: torch.dtype
) -> torch.Tensor:
    """(loss x n, correct, n) of ``model`` summed over ``batches``, in float64 on ``device``."""
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for batch in batches:
        x, y = to_device(batch, cfg, device, dtype)
        logits = model(x)
        n = len(y)
        sums += torch.stack(
            [
                compute_loss(logits, y).double() * n,
                (logits.argmax(-1) == y).sum().double(),
                sums.new_tensor(n),
            ]
        )
    return sums


def validate(
    engine: Any, loader: Any, cfg: TrainConfig, compute_loss: Any, dtype: torch.dtype
) -> tuple[float, float, int]:
    """(loss, accuracy, samples) on the validation set, summed over all ranks (a collective)."""
    engine.eval()
    loader.set_epoch(0)
    sums = score(engine, loader, cfg, compute_loss, engine.device, dtype)
    dist.all_reduce(sums)
    engine.train()
    loss_sum, correct, seen = sums.tolist()
    return loss_sum / seen, correct / seen, int(seen)


def consolidated_state_dict(engine: Any, zero_stage: int) -> dict[str, torch.Tensor]:
    """The full model weights (gathered from all ranks under ZeRO-3); a collective."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}


def retune(engine: Any, cfg: TrainConfig) -> dict[str, float] | None:
    """After a checkpoint load, the config's learning rate and weight decay where they differ
    from the loaded ones (population-based training resumes a copied checkpoint with perturbed
    parameters); returns what changed, None for a plain resume, which it leaves bit-identical.

    DeepSpeed restores the optimizer's groups and the LambdaLR's ``base_lrs`` from the
    checkpoint, so without this a new ``optimizer.lr`` in the config would be silently ignored.
    The group's current rate is the schedule's factor at its current step times the new base,
    as LambdaLR computes it."""
    sched, opt, o = engine.lr_scheduler, engine.optimizer, cfg.optimizer
    changed: dict[str, float] = {}
    for i, group in enumerate(opt.param_groups):
        if sched is not None and sched.base_lrs[i] != o.lr:
            sched.base_lrs[i] = group["initial_lr"] = o.lr
            group["lr"] = o.lr * sched.lr_lambdas[i](sched.last_epoch)
            changed["lr"] = o.lr
        if group.get("weight_decay", o.weight_decay) != o.weight_decay:
            group["weight_decay"] = changed["weight_decay"] = o.weight_decay
    return changed or None

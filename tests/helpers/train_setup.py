"""Shared setup of the training tests: digits shards, configs, and reading a run's history."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
HELPERS = Path(__file__).resolve().parent
BASE_CONFIG = REPO / "configs/train_digits.yaml"


def write_digits(out: Path) -> Path:
    """sklearn's digits as hpcdl shards (small chunks, so shuffling has units to permute)."""
    from hpcdl.data.sources import load_source
    from hpcdl.data.writer import write_shards

    write_shards(load_source("digits"), out, val=0.1, test=0.1, chunk_size="4KiB")
    return out


def write_config(path: Path, digits: Path, output: Path, **changes: Any) -> Path:
    """configs/train_digits.yaml pointed at ``digits`` and ``output``, with dotted-key changes."""
    data = yaml.safe_load(BASE_CONFIG.read_text())
    data["data"].update(train=str(digits / "train"), val=str(digits / "val"))
    data["output"] = str(output)
    data["log"]["wandb_mode"] = "offline"
    for key, value in changes.items():
        node = data
        *parents, last = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path.write_text(yaml.safe_dump(data))
    return path


def env_with_helpers() -> dict[str, str]:
    """The environment for CLI processes and jobs: tests/helpers importable, one thread."""
    path = os.pathsep.join(p for p in (str(HELPERS), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def rows(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def history(run_dir: Path) -> dict[str, Any]:
    """What must be identical between an interrupted and an uninterrupted run: every step's
    loss, accuracy and learning rate, every epoch's metrics (timings excluded)."""
    timing = {"time", "samples_per_s", "step_time_s"}
    return {
        kind: [{k: v for k, v in r.items() if k not in timing} for r in rows(run_dir, kind)]
        for kind in ("step", "epoch")
    }


def last_step(run_dir: Path) -> int:
    """The newest step logged so far (0 before the first)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("kind") == "step":
            steps.append(row["step"])
    return max(steps)


def same_weights(a: Path, b: Path) -> bool:
    import torch

    wa, wb = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# -- a run folder trained in this process (the Trainer alone, no job) -----------------------------
class Flag:
    """A preemption flag raised (as if this rank were signalled) once ``trainer`` is at ``at``."""

    def __init__(self, at: int | None = None):
        self.at, self.trainer = at, None

    @property
    def requested(self) -> bool:
        return (
            self.at is not None and self.trainer is not None and self.trainer.state.step >= self.at
        )

    @property
    def received(self) -> signal.Signals | None:
        """The signal it stands for once raised: the time-limit one (USR2 on the dev cluster)."""
        return signal.SIGUSR2 if self.requested else None


def make_run(tmp: Path, synth: Path, name: str, **changes: Any) -> Path:
    """A run folder as ``hpcdl train`` leaves it for its ranks: the resolved config inside."""
    base = dict(epochs=2, batch__size=32, log__every_steps=4, log__wandb=False,
                checkpoint__every_steps=10)  # fmt: skip
    from hpcdl.train.config import dump_config, load_train_config, with_absolute_data

    config = write_config(tmp / f"{name}.yaml", synth, tmp / "runs", **{**base, **changes})
    run_dir = tmp / "runs" / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(with_absolute_data(load_train_config(config))))
    return run_dir


def train_run(run_dir: Path, flag: Flag | None = None, on_epoch: Any = None) -> dict[str, Any]:
    from hpcdl.train.trainer import Trainer

    flag = flag or Flag()
    trainer = Trainer(run_dir, flag, on_epoch)
    flag.trainer = trainer
    return trainer.run()

"""``hpcdl reproduce RUN``: train a completed run (a final model, a sweep trial that ran to its
end) again from what its folder recorded, and compare the two, metric by metric and weight by
weight. On the CPU a run of hpcdl is deterministic (seeded model, data order and dropout;
exact resumes), so a re-run on the same world size with the same code, data and libraries is
bit-identical, and any difference means one of those changed.

Before anything runs, the folder is checked (:func:`check`): the files a re-run needs, the
data (each manifest's checksum now against the recorded one), the code (commit and diff of
the repository it is started from, :mod:`hpcdl.train.provenance`) and the world sizes it
trained on; each problem is one ConfigError naming the file or field."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from hpcdl.errors import ConfigError, HpcdlError
from hpcdl.train import provenance
from hpcdl.train.config import TrainConfig, read_run_config
from hpcdl.train.run import CONFIG_FILE, Run
from hpcdl.util import get_logger, read_jsonl

log = get_logger(__name__)

METRICS, WEIGHTS = "metrics.jsonl", "model.pt"
NEEDED = {
    CONFIG_FILE: "the run's resolved config (model, data, seeds, batch, job) is what a re-run "
    "starts from",
    WEIGHTS: "the final weights a re-run is compared with",
    METRICS: "the metrics a re-run is compared with, step by step",
    provenance.PROVENANCE: "the record of the run's code, data and libraries (written when a "
    "run folder is made; folders made before hpcdl recorded it lack it)",
}
TIMING = {"time", "samples_per_s", "step_time_s"}  # the only values a re-run may change


@dataclass
class Plan:
    """A run folder checked for a re-run."""

    run_dir: Path
    config: TrainConfig
    result: dict[str, Any]
    world: int
    notes: list[str] = field(default_factory=list)  # library versions that differ


def _rows(run_dir: Path, kinds: tuple[str, ...]) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(run_dir / METRICS) if r.get("kind") in kinds]


def completed(run_dir: Path) -> dict[str, Any] | None:
    """The training's result, from its 'completed' event: ``result.json`` holds the same unless
    something replaced it (a sweep's final folder holds the sweep's final result there)."""
    rows = [r for r in _rows(run_dir, ("event",)) if r.get("event") == "completed"]
    return {k: v for k, v in rows[-1].items() if k not in ("kind", "event")} if rows else None


def _at(code: dict[str, Any]) -> str:
    commit = code.get("commit")
    at = f"commit {commit[:12]}" if commit else "no git commit"
    return at + (" with uncommitted changes" if code.get("diff_sha256") else "")


def check(run_dir: Path, any_code: bool = False, workdir: Path | None = None) -> Plan:
    """Everything a re-run needs, or one ConfigError naming what is missing or changed."""
    where = str(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(where, "RUN", "not a run folder (no such directory)")
    for name, what in NEEDED.items():
        if not (run_dir / name).is_file():
            raise ConfigError(where, name, f"missing: {what}")
    cfg = read_run_config(run_dir)
    result = completed(run_dir)
    if result is None:
        raise ConfigError(where, METRICS, "no 'completed' event: the run did not complete (or "
                          "was pruned), so there is no final result to compare a re-run with")  # fmt: skip
    recorded = provenance.read(run_dir)
    for key in ("versions", "code", "data"):
        part = recorded.get(key)
        if not isinstance(part, dict):
            raise ConfigError(where, f"{provenance.PROVENANCE}: {key}", "missing")
        if "error" in part:
            raise ConfigError(where, f"{provenance.PROVENANCE}: {key}",
                              f"not recorded when the run was made: {part['error']}")  # fmt: skip
    _check_data(recorded["data"], where)
    code = recorded["code"]
    now = provenance.code_state(workdir or Path.cwd(), live=True)
    if not any_code and (now["commit"], now["diff_sha256"]) != (
        code.get("commit"), code.get("diff_sha256")):  # fmt: skip
        fix = f"check out {code['commit'][:12]}" if code.get("commit") else "restore that code"
        diff = f" and apply {run_dir / provenance.CODE_DIFF}" if code.get("diff_sha256") else ""
        raise ConfigError(
            where, "code", f"the run was made at {_at(code)} of {code.get('root')}; here "
            f"{now['root']} is at {_at(now)}: {fix}{diff}, or pass --any-code",
        )  # fmt: skip
    starts = [r for r in _rows(run_dir, ("event",)) if r.get("event") in ("start", "resume")]
    worlds = sorted({int(r["world_size"]) for r in starts})
    if len(worlds) > 1:
        raise ConfigError(
            where, "world_size", f"the run trained on {' and '.join(map(str, worlds))} ranks "
            "(resized or started elastic): a re-run on one world size cannot match it bit for bit",
        )  # fmt: skip
    here = provenance.versions()
    notes = [f"{name} {was} recorded, {here.get(name)} here: the re-run may differ"
             for name, was in recorded["versions"].items() if here.get(name) != was]  # fmt: skip
    world = int(result.get("world_size") or (worlds[0] if worlds else 1))
    if recorded.get("image") and world == 1:  # a job of several ranks gets the config's image
        notes.append(f"the run used the image {recorded['image']}: a one-rank re-run runs here, "
                     "outside it")  # fmt: skip
    return Plan(run_dir, cfg, result, world, notes)


def _check_data(data: dict[str, Any], where: str) -> None:
    for split in ("train", "val"):
        rec = data.get(split)
        if not isinstance(rec, dict):
            raise ConfigError(where, f"{provenance.PROVENANCE}: data.{split}", "missing")
        try:
            now = provenance.data_state(rec["path"])
        except HpcdlError as exc:
            raise ConfigError(where, f"data.{split}", str(exc)) from None
        if now["manifest_sha256"] != rec["manifest_sha256"]:
            raise ConfigError(
                where, f"data.{split}", f"{rec['path']} changed since the run (manifest sha256 "
                f"{rec['manifest_sha256'][:12]} recorded, {now['manifest_sha256'][:12]} now)",
            )  # fmt: skip


def default_out(run_dir: Path) -> Path:
    return run_dir / "reproduced" / datetime.now().strftime("%Y%m%d-%H%M%S")


def rerun(plan: Plan, out: Path, site: str | None = None, timeout: float = 86400) -> Path:
    """Train the run again into ``out`` on the recorded world size: in a new process here for
    one rank, else as a job on ``site`` (default: the recorded one) with that many ranks. No W&B
    run: the re-run is a check, not an experiment."""
    if out.exists():
        raise ConfigError(str(out), "--out", "exists already: a re-run writes a new folder")
    job = plan.config.job
    changes = [f"run_dir={out}", "log.wandb=false"]
    if plan.world > 1:  # the recorded shape, fixed (an elastic range would let Slurm pick)
        per_node = job.ntasks_per_node
        if plan.world % per_node:
            raise ConfigError(str(plan.run_dir), "job.tasks_per_node",
                              f"{plan.world} ranks do not fill nodes of {per_node} tasks")  # fmt: skip
        changes += [f"job.nodes={plan.world // per_node}"]
    run = Run(plan.config, changes, site=site, where=str(plan.run_dir / CONFIG_FILE))
    if plan.world == 1:
        # In a fresh interpreter, as the recorded run had: a process that trained before holds
        # state (DeepSpeed's groups, seeded generators) a second run in it would inherit.
        run.prepare()
        code = f"from hpcdl.train.run import run_job; run_job({str(out)!r})"
        proc = subprocess.run([sys.executable, "-c", code], env=_alone(), timeout=timeout,
                              check=False)  # fmt: skip
        if proc.returncode != 0:
            raise HpcdlError(f"the re-run failed (exit status {proc.returncode}; folder {out})")
    else:
        run.submit()
        state = run.wait(timeout=timeout)
        if state != "COMPLETED":
            raise HpcdlError(f"the re-run's job ended {state} (run folder {out})")
    return out


# What would make the re-run's process join someone else's ranks: a launcher's variables, and
# those init_distributed exported in this process if it trained before (its port still held).
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK",
                  "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK",
                  "MPI_LOCALRANKID")  # fmt: skip


def _alone() -> dict[str, str]:
    """This environment for a process that is one rank on its own."""
    return {k: v for k, v in os.environ.items()
            if k not in _LAUNCHER_VARS and not k.startswith(("SLURM_", "SUBMITIT_"))}  # fmt: skip


def history(run_dir: Path) -> list[dict[str, Any]]:
    """Every step's and epoch's metrics, timings left out."""
    rows = _rows(run_dir, ("step", "epoch"))
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def compare(recorded: Path, again: Path) -> tuple[list[str], dict[str, int]]:
    """The differences between two runs' metrics, results and final weights (none: the re-run
    is bit-identical), and what was compared."""
    import torch

    diffs: list[str] = []
    a, b = history(recorded), history(again)
    if len(a) != len(b):
        diffs.append(f"metrics: {len(a)} step/epoch rows recorded, {len(b)} in the re-run")
    for old, new in zip(a, b, strict=False):
        if old != new:
            keys = [k for k in old.keys() | new.keys() if old.get(k) != new.get(k)]
            shown = ", ".join(f"{k} {old.get(k)!r} recorded, {new.get(k)!r} re-run" for k in keys)
            diffs.append(f"{old.get('kind')} row of step {old.get('step')}: {shown}")
            break  # the first difference: every later row follows from it
    ra, rb = completed(recorded) or {}, completed(again) or {}
    for key in ("step", "epochs", "val_loss", "val_acc", "world_size"):
        if ra.get(key) != rb.get(key):
            diffs.append(f"result {key}: {ra.get(key)!r} recorded, {rb.get(key)!r} re-run")
    wa = torch.load(recorded / WEIGHTS, map_location="cpu", weights_only=True)
    wb = torch.load(again / WEIGHTS, map_location="cpu", weights_only=True)
    if wa.keys() != wb.keys():
        diffs.append(f"weights: tensors {sorted(wa.keys() ^ wb.keys())} in only one of the two")
    for name in sorted(wa.keys() & wb.keys()):
        ta, tb = wa[name], wb[name]
        if ta.shape != tb.shape or ta.dtype != tb.dtype or not torch.equal(ta, tb):
            most = (
                (ta.double() - tb.double()).abs().max().item() if ta.shape == tb.shape else math.nan
            )
            diffs.append(f"weights {name!r}: differ (largest difference {most:.3g})")
    return diffs, {"rows": len(a), "tensors": len(wa)}

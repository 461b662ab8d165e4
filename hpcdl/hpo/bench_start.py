"""``hpcdl bench start``: how long a sweep worker takes from its process start to its first
trial's first training step, against ``import torch`` in a fresh process, in one run.

Each round, on the same site and one after the other:

- **import torch**: a one-task command job, ``python -c 'import torch'``, that prints how old
  its process is once torch is imported (``/proc/self/stat``: the kernel's start time of the
  process, to 10 ms);
- **worker**: a one-trial sweep of SPEC (no final job, no pruner, ``max_steps`` 2, a step row
  for every step) run by a warm worker; the worker's journal records its process start (the
  same clock) and the trial's first step row its time (rows are reduced one sync behind, so
  it is logged at step 2's sync: within one step of the step itself).

The ratio is worker / import torch of the same round; the figure is the median over rounds.
Both are processes Slurm (or the local profile) started the same way, on the same nodes: the
scheduler's own delay before a process exists is in neither.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from hpcdl.hpo.spec import SweepSpec, load_spec
from hpcdl.hpo.sweep import Sweep
from hpcdl.hpo.worker import read_journals
from hpcdl.util import read_jsonl

# Prints the process's age (seconds since the kernel started it) once torch is imported.
# (hpcdl.util.process_age written out: importing hpcdl would add to the reference's time)
IMPORT_TORCH = """
import os
import torch
with open("/proc/self/stat") as f:
    ticks = int(f.read().rsplit(")", 1)[1].split()[19])
with open("/proc/uptime") as f:
    uptime = float(f.read().split()[0])
print("import-torch-age", uptime - ticks / os.sysconf("SC_CLK_TCK"))
print("import-torch-cpu", sum(os.times()[:2]))
"""

#: What the benchmark's sweep changes in SPEC's training: the fewest steps that still train,
#: a step row for each (the first is the measurement), no periodic checkpoint.
TRAIN_OVERRIDES = {"max_steps": 2, "epochs": 1, "log.every_steps": 1, "checkpoint.every_steps": 0}


def import_torch_s(site: str, timeout: float, stamp: str, i: int) -> tuple[float, float | None]:
    """The age and the CPU time of a fresh ``python -c 'import torch'`` process when its import
    returns."""
    from hpcdl.job import Job

    job = Job(name=f"bench-start-torch-{stamp}-{i}", command=[sys.executable, "-c", IMPORT_TORCH],
              site=site, time="00:05:00", nodes=1, tasks_per_node=1)  # fmt: skip
    handle = job.submit()
    state = handle.wait(timeout=timeout)
    out, err = handle.log_paths()
    text = out.read_text() if out.is_file() else ""
    found = dict(line.split(None, 1) for line in text.splitlines() if line.startswith("import-"))
    if "import-torch-age" in found:
        cpu = found.get("import-torch-cpu")
        return float(found["import-torch-age"]), float(cpu) if cpu else None
    log = err.read_text()[-2000:] if err.is_file() else "(no log)"
    raise RuntimeError(f"import torch job {handle.job_id} ended {state} without its age:\n{log}")


def worker_start_s(
    base: SweepSpec, site: str, timeout: float, stamp: str, i: int
) -> dict[str, Any]:
    """Run a one-trial sweep of ``base``; the worker's process start -> its first step."""
    data = base.model_dump()
    data.update(
        name=f"bench-start-{stamp}-{i}", trials=1, parallelism=1, trials_per_task=None,
        final=False, pruner={"name": "none"}, overrides={**base.overrides, **TRAIN_OVERRIDES},
        resources={**base.resources.model_dump(), "site": site},
    )  # fmt: skip
    sweep = Sweep(SweepSpec.model_validate(data))
    sweep.run()
    try:
        sweep.wait(timeout=timeout)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}\nworker log:\n{_worker_log(sweep)}") from None
    return measure(sweep)


def _worker_log(sweep: Sweep) -> str:
    try:
        handle = sweep.lifecycle.jobs(("array", "workers"))[0].handle
        _, err = handle.log_paths(array_task=0)
        return err.read_text()[-3000:]
    except Exception as exc:  # the timeout is the error: the log is a help
        return f"(no log: {exc})"


def measure(sweep: Sweep) -> dict[str, Any]:
    """``{"start_s", "claim_s", "setup_s", "trial"}`` of a finished one-trial sweep: its
    worker's process start -> the trial's first step row, -> the trial's claim, and -> the
    trainer's start event (set up, about to train)."""
    lines = [ln for journal in read_journals(sweep.paths).values() for ln in journal]
    start = next(ln for ln in lines if ln["event"] == "start" and "process_started" in ln)
    trial = next(ln for ln in lines if ln["event"] == "trial")
    slot = sweep.paths.read_slot(trial["slot"])
    if slot is None:
        raise RuntimeError(f"sweep {sweep.spec.name}: slot {trial['slot']} has no record")
    rows = read_jsonl(sweep.paths.trial_dir(slot) / "metrics.jsonl")
    first = next((r for r in rows if r.get("kind") == "step"), None)
    if first is None:
        raise RuntimeError(f"sweep {sweep.spec.name}: trial {trial['trial']} logged no step")
    # the trainer's start event: set up (torch, DeepSpeed, data, engine), about to train
    ready = next((r for r in rows if r.get("event") == "start"), None)
    return {
        "start_s": first["time"] - start["process_started"],
        "claim_s": trial["claimed"] - start["process_started"],
        "setup_s": ready["time"] - start["process_started"] if ready else None,
        "setup_cpu_s": ready.get("cpu_s") if ready else None,
        "trial": trial["trial"],
    }


def run_start_bench(
    spec_path: Path, site: str, rounds: int, stamp: str, timeout: float = 600
) -> dict[str, Any]:
    """``rounds`` rounds of (import torch, worker), side by side; medians and ratios."""
    base = load_spec(spec_path)
    per_round = []
    for i in range(rounds):
        torch_s, torch_cpu_s = import_torch_s(site, timeout, stamp, i)
        worker = worker_start_s(base, site, timeout, stamp, i)
        per_round.append({"import_torch_s": torch_s, "import_torch_cpu_s": torch_cpu_s, **worker,
                          "ratio": worker["start_s"] / torch_s})  # fmt: skip
    return {
        "site": site,
        "rounds": per_round,
        "import_torch_s": statistics.median(r["import_torch_s"] for r in per_round),
        "start_s": statistics.median(r["start_s"] for r in per_round),
        "claim_s": statistics.median(r["claim_s"] for r in per_round),
        "setup_s": _median(r.get("setup_s") for r in per_round),
        "ratio": statistics.median(r["ratio"] for r in per_round),
        "ratio_range": [min(r["ratio"] for r in per_round), max(r["ratio"] for r in per_round)],
        "import_torch_cpu_s": _median(r.get("import_torch_cpu_s") for r in per_round),
        "setup_cpu_s": _median(r.get("setup_cpu_s") for r in per_round),
        "uncompiled": list(uncompiled()),  # from the submitting side: the same checkout
        "when": time.time(),
    }


def uncompiled(root: Path | None = None) -> tuple[int, int]:
    """``(modules without current bytecode, modules)`` of the package at ``root`` (hpcdl's):
    what a worker compiles from source at every start, since it cannot write ``__pycache__``
    (a checkout the job's user cannot write, or PYTHONDONTWRITEBYTECODE, as in an editable
    install by uv). A wheel's install compiles them; a checkout needs ``python -m compileall``.
    Current: the ``.pyc`` beside the source has this interpreter's magic number and the
    source's mtime and size in its header (what the import system checks)."""
    import importlib.util

    root = root or Path(__file__).resolve().parents[1]
    sources = sorted(root.rglob("*.py"))
    stale = 0
    for src in sources:
        try:
            header = Path(importlib.util.cache_from_source(str(src))).read_bytes()[:16]
        except OSError:
            stale += 1
            continue
        st = src.stat()
        stamp = (int(st.st_mtime) & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF)
        stamped = (int.from_bytes(header[8:12], "little"), int.from_bytes(header[12:16], "little"))
        hashed = header[4:8] != bytes(4)  # a hash-based .pyc: checked by its source's hash
        if header[:4] != importlib.util.MAGIC_NUMBER or not (hashed or stamped == stamp):
            stale += 1
    return stale, len(sources)


def _median(values: Any) -> float | None:
    found = [v for v in values if v is not None]
    return statistics.median(found) if found else None


def _s(value: float | None, width: int) -> str:
    return f"{value:>{width}.2f} s" if value is not None else f"{'-':>{width}}  "


def render(result: dict[str, Any]) -> list[str]:
    """The rounds and the medians as text lines."""
    lines = [f"worker start on {result['site']}: process start -> first training step of a "
             "one-trial sweep, against a fresh 'import torch' (same site, side by side)",
             f"{'round':>6} {'import torch':>12} {'claim':>7} {'set up':>8} {'first step':>10} "
             f"{'ratio':>6}"]  # fmt: skip
    for i, r in enumerate(result["rounds"]):
        lines.append(f"{i:>6} {_s(r['import_torch_s'], 10)} {_s(r['claim_s'], 5)} "
                     f"{_s(r.get('setup_s'), 6)} {_s(r['start_s'], 8)} {r['ratio']:>6.2f}")  # fmt: skip
    low, high = result.get("ratio_range") or (result["ratio"], result["ratio"])
    lines.append(f"{'median':>6} {_s(result['import_torch_s'], 10)} {_s(result['claim_s'], 5)} "
                 f"{_s(result.get('setup_s'), 6)} {_s(result['start_s'], 8)} "
                 f"{result['ratio']:>6.2f}  (range {low:.2f}-{high:.2f}; goal <= 1.5)")  # fmt: skip
    torch_cpu, setup_cpu = result.get("import_torch_cpu_s"), result.get("setup_cpu_s")
    if torch_cpu and setup_cpu:  # CPU time: what a loaded machine's scheduling does not move
        lines.append(f"CPU time (medians): import torch {torch_cpu:.2f} s, the worker until set "
                     f"up {setup_cpu:.2f} s ({setup_cpu / torch_cpu:.2f}x)")  # fmt: skip
    stale, total = result.get("uncompiled") or (0, 0)
    if stale:  # ~0.1 s of each start here for hpcdl's 83 modules a worker imports
        lines.append(f"note: {stale} of hpcdl's {total} modules have no current bytecode: every "
                     "worker compiled them at its start (python -m compileall on the checkout; "
                     "a wheel's install compiles them)")  # fmt: skip
    return lines


def dump(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))

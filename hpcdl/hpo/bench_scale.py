"""A large sweep of a cheap objective on a Slurm site, measured (issue 21): ``hpcdl bench hpo
--storage journal|postgres --workers 64,256`` and ``tests/cluster/test_scale64.py``.

One run: a sweep of ``trials`` trials of :func:`cheap` (a few ms of arithmetic, no torch) with
``workers`` warm workers (one Slurm array of ``workers`` tasks, whatever the number of
trials), the study on the journal file or PostgreSQL. Measured:

- submission (``Sweep.run()``) and the sweep's wall time to its last trial; trials per second;
- every storage write of every trial as the worker saw it (:mod:`hpcdl.hpo.store_timing`:
  journal, the file lock + append + catching up with the others' appends; PostgreSQL, one
  transaction to its commit): p50/p99 per write and per trial (a trial's writes together);
- the claim (sweep lock's wait, slot reads, the study's ask): p50/p99;
- ``hpcdl sweep status`` and ``sweep best`` as new processes on the finished sweep;
- the workers' peak RSS and whether any imported torch (each trial writes it down);
- the invariants: every slot complete once, one study trial per slot, none left running.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcdl.hpo import store_timing

#: Modules a cheap objective's worker must not carry (hundreds of MB each, seconds to import).
HEAVY = ("torch", "deepspeed", "wandb", "lightning", "h5py")


def cheap(params: dict[str, Any], ctx: Any) -> float:
    """The objective: a few milliseconds of arithmetic on ``x``; writes what its process
    holds (peak RSS, heavy modules imported) into the trial's folder."""
    x = float(params["x"])
    acc = 0.0
    for i in range(20_000):
        acc += ((x * i) % 1.0) * 1e-6
    info = {
        "pid": os.getpid(),
        "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "heavy": [m for m in HEAVY if m in sys.modules],
    }
    (Path(ctx.trial_dir) / "process.json").write_text(json.dumps(info))
    return 1.0 - (x - 0.3) ** 2 + acc * 0.0


def scale_spec(
    name: str,
    site: str,
    trials: int,
    workers: int,
    storage: Any = None,
    time_limit: str = "01:00:00",
) -> Any:
    """The sweep: random sampler (TPE would read every trial at each ask: a cost of the
    sampler, not of the storage or of hpcdl), no pruner, no final job, one CPU per worker."""
    from hpcdl.hpo.spec import SweepSpec

    return SweepSpec.model_validate(
        {
            "name": name,
            "objective": "hpcdl.hpo.bench_scale:cheap",
            "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
            "sampler": {"name": "random", "seed": 0},
            "trials": trials,
            "parallelism": workers,
            "final": False,
            "max_retries": 0,
            "storage": storage,
            "resources": {"site": site, "time": time_limit, "cpus_per_task": 1},
        }
    )


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``; NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def timings(journals: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """From the workers' journals (``workers/TASK.jsonl``): trials per second between the first
    claim and the last end, and p50/p99 of each storage write, of each trial's writes
    together and of each claim (milliseconds)."""
    lines = [x for lines in journals.values() for x in lines if x.get("event") == "trial"]
    writes = [w for x in lines for w in x.get("storage_s", [])]
    per_trial = [sum(x["storage_s"]) for x in lines if x.get("storage_s")]
    claims = [x["claim_s"] for x in lines if "claim_s" in x]
    out: dict[str, Any] = {"trial_lines": len(lines), "writes": len(writes),
                           "journals": len(journals)}  # fmt: skip
    if lines:
        span = max(x["ended"] for x in lines) - min(x["claimed"] for x in lines)
        out["trials_per_s"] = len(lines) / span if span > 0 else float("nan")
    for key, values in (("write", writes), ("trial_writes", per_trial), ("claim", claims)):
        out[f"{key}_p50_ms"] = pct(values, 0.5) * 1e3
        out[f"{key}_p99_ms"] = pct(values, 0.99) * 1e3
    return out


def invariants(sweep: Any) -> list[str]:
    """What is wrong with a finished sweep (empty: nothing): every slot complete exactly once
    under its own trial number, the study holding exactly one complete trial per slot."""
    import optuna

    spec, problems = sweep.spec, []
    slots = sweep.paths.all_slots()
    if len(slots) != spec.trials:
        problems.append(f"{len(slots)} slot files for {spec.trials} trials")
    states: dict[str, int] = {}
    for s in slots:
        states[s.state] = states.get(s.state, 0) + 1
    if states.get("complete", 0) != spec.trials:
        problems.append(f"slot states {states}, expected {spec.trials} complete")
    numbers = [s.trial for s in slots]
    if len(set(numbers)) != len(numbers):
        problems.append(f"{len(numbers) - len(set(numbers))} trial numbers used by two slots")
    trials = sweep.study().get_trials(deepcopy=False)
    by_state: dict[str, int] = {}
    for t in trials:
        by_state[t.state.name] = by_state.get(t.state.name, 0) + 1
    if len(trials) != spec.trials or by_state.get("COMPLETE", 0) != spec.trials:
        problems.append(
            f"study holds {len(trials)} trials {by_state}, expected {spec.trials} COMPLETE"
        )
    done = {t.number for t in trials if t.state == optuna.trial.TrialState.COMPLETE}
    if set(numbers) != done:
        problems.append(f"{len(set(numbers) ^ done)} trial numbers differ between slots and study")
    return problems


def worker_memory(sweep: Any) -> dict[str, Any]:
    """Peak RSS (MB) of the workers, from each trial's ``process.json``, and the heavy modules
    any worker imported."""
    peak: dict[int, int] = {}
    heavy: set[str] = set()
    for path in sweep.paths.trials.glob("trial-*/process.json"):
        info = json.loads(path.read_text())
        peak[info["pid"]] = max(peak.get(info["pid"], 0), info["maxrss_kb"])
        heavy.update(info["heavy"])
    rss = sorted(peak.values())
    return {"processes": len(rss), "rss_p50_mb": pct([r / 1024 for r in rss], 0.5),
            "rss_max_mb": rss[-1] / 1024 if rss else float("nan"), "heavy": sorted(heavy)}  # fmt: skip


def cli_time(*args: str, timeout: float = 120) -> tuple[float, float]:
    """(wall s, CPU s) of ``hpcdl ARGS`` as a new process, as a user runs it (``os.wait4``:
    that child's CPU time alone); raises with its error output when it fails."""
    from hpcdl.util import run_measured

    wall, cpu, proc = run_measured([sys.executable, "-m", "hpcdl", *args], timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"hpcdl {' '.join(args)} failed: {proc.stderr.strip()}")
    return wall, cpu


def job_memory(job_ids: set[str]) -> tuple[int, float]:
    """(processes, their total PSS in MB) of the jobs ``job_ids`` on this machine (the dev
    cluster's nodes are all here): every process of this user whose environment names one of
    the jobs (the batch script, srun, the worker; Slurm's own slurmstepd runs as root and is
    not counted). PSS shares a library's pages among the processes that map it."""
    count, pss_kb = 0, 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            env = Path(entry.path, "environ").read_bytes().split(b"\0")
            job = next((e[13:].decode() for e in env if e.startswith(b"SLURM_JOB_ID=")), None)
            job = next((e[19:].decode() for e in env if e.startswith(b"SLURM_ARRAY_JOB_ID=")), job)
            if job not in job_ids:
                continue
            for line in Path(entry.path, "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss_kb += int(line.split()[1])
                    count += 1
                    break
        except (OSError, ValueError):  # gone meanwhile, or not ours
            continue
    return count, pss_kb / 1024


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_one(
    spec: Any, timeout: float, on_progress: Callable[[int, int], None] | None = None
) -> dict[str, Any]:
    """Run ``spec``'s sweep to its end (every job of it cancelled whatever happens) and measure
    it; the ``problems`` key lists broken invariants (empty: none)."""
    from hpcdl.hpo.sweep import Sweep

    os.environ[store_timing.ENV] = "1"  # the workers inherit it (sbatch exports the environment)
    sweep = Sweep(spec)
    t0 = time.monotonic()
    handles = sweep.run()
    submit_s = time.monotonic() - t0
    jobs = {h.job_id for h in handles}
    peak = {"procs": 0, "pss_mb": 0.0, "mem_available_min_mb": mem_available_mb()}
    try:
        deadline = t0 + timeout
        while not sweep.finished():
            procs, pss = job_memory(jobs)
            if pss > peak["pss_mb"]:
                peak.update(procs=procs, pss_mb=pss)
            peak["mem_available_min_mb"] = min(peak["mem_available_min_mb"], mem_available_mb())
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"sweep {spec.name}: {sweep.paths.finished_count()}/{spec.trials} trials "
                    f"after {timeout:.0f}s; stuck: {sweep.diagnose()}"
                )
            if on_progress is not None:
                on_progress(sweep.paths.finished_count(), spec.trials)
            time.sleep(5.0)
        wall_s = time.monotonic() - t0
    finally:
        sweep.cancel()  # the follow-up job (and anything left) never outlives the run
    from hpcdl.hpo.worker import read_journals

    out: dict[str, Any] = {
        "name": spec.name, "storage": "journal" if _journal(spec) else "postgresql",
        "trials": spec.trials, "workers": spec.parallelism, "array_tasks": _array_tasks(sweep),
        "submit_s": submit_s, "wall_s": wall_s, "jobs": [h.job_id for h in handles],
        **timings(read_journals(sweep.paths)), **worker_memory(sweep),
        "jobs_pss_peak_mb": peak["pss_mb"], "jobs_procs_at_peak": peak["procs"],
        "mem_available_min_mb": peak["mem_available_min_mb"],
    }  # fmt: skip
    out["silent_tasks"] = silent_tasks(sweep, handles[0], set(read_journals(sweep.paths)))
    out["failed_tasks"] = failed_tasks(handles[0])
    out["problems"] = invariants(sweep)
    for cmd in ("status", "best"):
        out[f"{cmd}_s"], out[f"{cmd}_cpu_s"] = cli_time("sweep", cmd, spec.name)
    return out


def silent_tasks(sweep: Any, array: Any, journals: set[str], show: int = 3) -> dict[str, Any]:
    """The worker array's tasks that never wrote their journal's start line (seen once: 64 of
    256 tasks whose srun step started last never got there in 8 minutes): how many, and the
    end of the first ones' logs, for whoever reads the failure."""
    ids = [f"{array.job_id}_{i}" for i in range(array.array or 0)]
    silent = [t for t in ids if t not in journals]
    tails = {}
    for task in silent[:show]:
        logs = sorted(Path(array.folder).glob(f"{task}_*_log.*"))
        tails[task] = {p.name: p.read_text(errors="replace")[-600:] for p in logs}
    return {"count": len(silent), "first": silent[:20], "logs": tails}


def failed_tasks(array: Any, show: int = 3) -> dict[str, Any]:
    """The worker array's tasks whose worker died with a traceback (seen: 77 of 256 PostgreSQL
    workers timed out connecting, and the sweep went on with 179 without a word): how many,
    and the last line of the first ones' errors."""
    dead: dict[str, str] = {}
    for log in sorted(Path(array.folder).glob(f"{array.job_id}_*_log.err")):
        text = log.read_text(errors="replace")
        if "Traceback (most recent call last)" in text:
            tail = text.rsplit("Traceback (most recent call last)", 1)[1].splitlines()[1:]
            noise = ("srun:", "slurmstepd", "submitit", "hpcdl:")
            raised = [ln for ln in tail if ln and not ln[0].isspace() and not ln.startswith(noise)]
            dead[log.name.split("_log")[0]] = raised[-1][:300] if raised else text[-300:]
    first = sorted(dead)[:show]
    return {"count": len(dead), "first": first, "errors": {t: dead[t] for t in first}}


def _journal(spec: Any) -> bool:
    return spec.storage is None or spec.storage.journal


def _array_tasks(sweep: Any) -> int:
    """Tasks of the sweep's worker array as submitted (``parallelism``, not ``trials``)."""
    subs = [s for s in sweep.lifecycle.submissions() if s["kind"] in ("workers", "array")]
    return sum(int(s.get("array") or 0) for s in subs)


def render(rows: list[dict[str, Any]]) -> list[str]:
    """The table (80 columns): one row per storage and worker count."""
    out = ["storage     workers  trials  trials/s  write p50/p99 ms  trial p50/p99 ms  claim p99",
           "----------  -------  ------  --------  ----------------  ----------------  ---------"]  # fmt: skip
    for r in rows:
        out.append(
            f"{r['storage']:<10}  {r['workers']:>7}  {r['trials']:>6}  {r['trials_per_s']:>8.1f}  "
            f"{r['write_p50_ms']:>7.1f}/{r['write_p99_ms']:<8.1f}  "
            f"{r['trial_writes_p50_ms']:>7.1f}/{r['trial_writes_p99_ms']:<8.1f}  "
            f"{r['claim_p99_ms']:>7.0f}ms"
        )
    for r in rows:  # a figure "at 256 workers" is not one if a third of them died
        dead = r.get("failed_tasks", {}).get("count", 0)
        if dead:
            out.append(f"{r['storage']} at {r['workers']} workers: {dead} worker(s) died, "
                       f"e.g. {next(iter(r['failed_tasks']['errors'].values()))[:120]}")  # fmt: skip
    return out

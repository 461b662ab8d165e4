"""Chaos runs on the dev cluster: a seeded schedule of faults applied to a live sweep, then the
invariants every sweep must keep whatever happens to its jobs.

Faults (``KINDS``), each aimed at a job of the given sweep only (its ``submissions.jsonl``):

- ``scancel``: ``scancel`` of a running array task (or worker task);
- ``requeue``: ``scontrol requeue`` of a running task;
- ``sigkill``: SIGKILL of one process of a running trial (found in the process table: every
  slurmd of the dev cluster runs on this machine);
- ``node_down``: a node running one of the sweep's tasks, and no job of anyone else, set DOWN
  (its jobs end NODE_FAIL), then DRAIN (``ReturnToService=2`` would put it back at once), held
  ``hold_s`` seconds, then RESUMEd, in a ``finally``;
- ``cancel_follow``: ``scancel`` of the sweep's queued follow-up job.

Every fault applied (or skipped, with why) is logged with its time, kind and target to a JSON
file (the fault times count from the first trial's claim). After the faults the run waits
for the sweep; if it stops with work left it must say what
is stuck (``Sweep.diagnose``), and one ``Sweep.resume()`` (what a user would do: ``hpcdl sweep
resume``) must bring it to the end. Then :func:`check` asserts the invariants.

    export HPCDL_SITE_PATH=$PWD/hpcdl/sites                     # the repo's site profiles
    python slurm/devcluster/chaos.py --seed 7                  # toy sweep, 8 trials, 3 faults
    python slurm/devcluster/chaos.py --seed 8 --nodes 2        # trials spanning 2 nodes
    python slurm/devcluster/chaos.py --seed 4 --trials-per-task 1
    for s in $(seq 100 120); do python slurm/devcluster/chaos.py --seed $s || break; done

Exit status 0 when every invariant holds; 1 with the broken ones (and the fault log's path).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from chaos_invariants import check  # beside this file (its folder is on sys.path)

REPO = Path(__file__).resolve().parents[2]
KINDS = ("scancel", "requeue", "sigkill", "node_down", "cancel_follow")
RUNNERS = ("array", "workers")
FINISHED_JOB = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY",
                          "NODE_FAIL"})  # fmt: skip


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the sweep's first trial was claimed
    kind: str


def plan(seed: int, faults: int = 3, window: tuple[float, float] = (0.5, 10.0),
         kinds: tuple[str, ...] = KINDS) -> list[Fault]:  # fmt: skip
    """The seed's schedule: ``faults`` faults at random times in ``window``, kinds drawn from
    ``kinds`` (the same seed always gives the same schedule)."""
    rng = random.Random(seed)
    times = sorted(rng.uniform(*window) for _ in range(faults))
    return [Fault(round(t, 2), rng.choice(kinds)) for t in times]


# A node's state is the Slurm administrator's: a user (the tests may run as hpcdl-alice) changes
# it through sudo as the operator hpcdl-op, the one rule devcluster.sh gives the test users.
NODE_ADMIN: tuple[str, ...] = () if os.geteuid() == 0 else ("sudo", "-n", "-u", "hpcdl-op")


def _slurm(*argv: str, check: bool = True) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc.stdout


def _hostnames(hostlist: str) -> list[str]:
    return _slurm("scontrol", "show", "hostnames", hostlist).split() if hostlist else []


def trial_pids(task: str) -> list[int]:
    """Python processes of a running task's job steps (array task ``A_i`` or job ``J``), from
    their environment (the batch script and ``srun`` are left alone: they are not the trial)."""
    array, _, index = task.partition("_")
    want = ({"SLURM_ARRAY_JOB_ID": array, "SLURM_ARRAY_TASK_ID": index} if index
            else {"SLURM_JOB_ID": array})  # fmt: skip
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            env = dict(
                item.split("=", 1)
                for item in (proc / "environ").read_bytes().decode(errors="replace").split("\0")
                if "=" in item
            )
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if not Path(argv[0].decode(errors="replace")).name.startswith("python"):
            continue
        if all(env.get(k) == v for k, v in want.items()) and "SLURM_STEP_ID" in env:
            pids.append(int(proc.name))
    return sorted(pids)


class Driver:
    """Applies a schedule of faults to one sweep (an ``hpcdl.hpo.Sweep``) and logs them."""

    def __init__(self, sweep: Any, log_path: Path, seed: int, hold_s: float = 4.0,
                 release: bool = True):  # fmt: skip
        self.sweep, self.log_path, self.hold_s = sweep, Path(log_path), hold_s
        self.release = release
        self.released: dict[str, float] = {}  # task -> when its requeue hold was cut short
        self.rng = random.Random(seed + 1)  # targets: a stream of its own, apart from the plan
        self.seed = seed
        self.log: list[dict[str, Any]] = []
        self.downed: list[str] = []
        self.t0 = time.monotonic()

    # -- targets: only the sweep's own jobs ----------------------------------------------------------
    def _jobs(self) -> list[Any]:
        return self.sweep.jobs()

    def running_tasks(self) -> list[str]:
        return sorted(t for j in self._jobs() if j.kind in RUNNERS
                      for t, s in j.tasks.items() if s.state == "RUNNING")  # fmt: skip

    def _own_ids(self) -> set[str]:
        ids = set()
        for j in self._jobs():
            ids.add(j.handle.job_id)
            ids.update(j.tasks)
        return ids

    def _safe_node(self, task: str) -> str | None:
        """A node of the task on which every job is one of the sweep's (DOWN ends them all)."""
        nodes = _hostnames(_slurm("squeue", "-h", "-j", task, "-o", "%N").strip())
        own = self._own_ids()
        for node in self.rng.sample(nodes, len(nodes)):
            lines = _slurm("squeue", "-h", "-w", node, "-o", "%i %A").split()
            if all(x in own or x.split("_")[0] in own for x in lines[::2]):
                return node
        return None

    # -- faults ----------------------------------------------------------------------------------------
    def apply(self, fault: Fault) -> dict[str, Any]:
        entry: dict[str, Any] = {"at": fault.at, "kind": fault.kind, "time": time.time(),
                                 "t": round(time.monotonic() - self.t0, 2)}  # fmt: skip
        try:
            entry.update(getattr(self, f"_{fault.kind}")())
        except RuntimeError as exc:  # e.g. the task ended between choosing and acting
            entry["skipped"] = str(exc)
        self.log.append(entry)
        self.write_log()
        return entry

    def _task(self) -> str:
        tasks = self.running_tasks()
        if not tasks:
            raise RuntimeError("no running task of the sweep")
        return self.rng.choice(tasks)

    def _scancel(self) -> dict[str, Any]:
        task = self._task()
        _slurm("scancel", task)
        return {"target": task}

    def _requeue(self) -> dict[str, Any]:
        task = self._task()
        _slurm("scontrol", "requeue", task)
        return {"target": task}

    def _sigkill(self) -> dict[str, Any]:
        task = self._task()
        pids = trial_pids(task)
        if not pids:
            raise RuntimeError(f"no trial process of {task} found")
        pid = self.rng.choice(pids)
        os.kill(pid, signal.SIGKILL)
        return {"target": task, "pid": pid}

    def _node_down(self) -> dict[str, Any]:
        task = self._task()
        node = self._safe_node(task)
        if node is None:
            raise RuntimeError(f"every node of {task} also runs jobs of others")
        update = (*NODE_ADMIN, "scontrol", "update", f"NodeName={node}")
        self.downed.append(node)
        try:
            _slurm(*update, "State=DOWN", "Reason=chaos")
            _slurm(*update, "State=DRAIN", "Reason=chaos")  # ReturnToService=2 would undo DOWN
            time.sleep(self.hold_s)
        finally:
            self.resume_nodes()
        return {"target": node, "task": task, "held_s": self.hold_s}

    def _cancel_follow(self) -> dict[str, Any]:
        live = [j.handle.job_id for j in self._jobs()
                if j.kind == "follow" and j.state not in FINISHED_JOB]  # fmt: skip
        if not live:
            raise RuntimeError("no queued follow-up job")
        _slurm("scancel", live[-1])
        return {"target": live[-1]}

    def resume_nodes(self, timeout: float = 60) -> None:
        """RESUME each downed node until sinfo shows it back (asked again every second): a
        RESUME while the killed job still completes there can be refused, and one refused
        RESUME left node5 drained (run 13): the sweep never finished, and tests after it that
        expect every node idle failed."""
        while self.downed:
            node = self.downed.pop()
            deadline = time.monotonic() + timeout
            while True:
                _slurm(*NODE_ADMIN, "scontrol", "update", f"NodeName={node}", "State=RESUME",
                       check=False)  # fmt: skip
                state = _slurm("sinfo", "-a", "-h", "-n", node, "-o", "%T", check=False).strip()
                if not any(w in state for w in ("drain", "down", "fail")):
                    break
                if time.monotonic() > deadline:
                    self.log.append({"kind": "resume-failed", "target": node, "state": state})
                    break
                time.sleep(1.0)

    def release_requeued(self) -> None:
        """Start the sweep's requeued tasks now: Slurm holds a requeued job ~2 minutes
        (``BeginTime``), which would only make a chaos run slow (tests/cluster/test_train_slurm.py's
        fleet does the same). Logged as ``release``; not a fault."""
        if not self.release:
            return
        for j in self._jobs():
            for task, status in j.tasks.items():
                if j.kind in RUNNERS and status.state == "PENDING" and status.reason == "BeginTime":
                    # in 3 s, not now: a start in the second of the requeue gets a credential
                    # slurmd counts as revoked, and the task fails. Once per requeue: moving the
                    # start on every poll would push it back forever.
                    if time.monotonic() - self.released.get(task, -1e9) < 15:
                        continue
                    self.released[task] = time.monotonic()
                    _slurm("scontrol", "update", f"JobId={task}", "StartTime=now+3", check=False)
                    self.log.append({"kind": "release", "target": task, "time": time.time(),
                                     "t": round(time.monotonic() - self.t0, 2)})  # fmt: skip

    def pause(self, until: float) -> None:
        """Sleep until ``until`` (monotonic), releasing requeued tasks meanwhile."""
        while (left := until - time.monotonic()) > 0:
            self.release_requeued()
            time.sleep(min(2.0, max(left, 0.0)))

    def write_log(self) -> None:
        data = {"seed": self.seed, "sweep": self.sweep.spec.name, "faults": self.log}
        self.log_path.write_text(json.dumps(data, indent=1))

    def run(self, schedule: list[Fault], target_wait_s: float = 6.0) -> list[dict[str, Any]]:
        """Apply the schedule, its times counted from the first trial's claim (start-up on a
        busy machine varies; a fault with no target yet waits up to ``target_wait_s``); stops
        early when the sweep has finished. Nodes are RESUMEd whatever happens."""
        start = time.monotonic() + 180
        while not any(self.sweep.paths.slots.glob("*.json")) and time.monotonic() < start:
            self.pause(time.monotonic() + 1)
        self.t0 = time.monotonic()
        try:
            for fault in schedule:
                self.pause(self.t0 + fault.at)
                if finished(self.sweep):
                    break
                deadline = time.monotonic() + target_wait_s
                while (fault.kind != "cancel_follow" and not self.running_tasks()
                       and time.monotonic() < deadline):  # fmt: skip
                    time.sleep(0.5)
                self.apply(fault)
        finally:
            self.resume_nodes()
            self.write_log()
        return self.log


# -- after the faults ---------------------------------------------------------------------------------
def finished(sweep: Any) -> bool:
    return bool(sweep.finished())  # the sweep's own answer (hpcdl.hpo.folder decides)


def stopped(sweep: Any) -> bool:
    """Work left and no job of the sweep that will run (seen twice, 3 s apart: a follow-up job
    ending records the round it submitted just before)."""
    for i in range(2):
        if i:
            time.sleep(3)
        if finished(sweep) or any(j.live for j in sweep.jobs()):
            return False
    return True


def settle(driver: Driver, timeout: float) -> dict[str, Any]:
    """Wait until the sweep finished or stopped; a stop must be diagnosed, then one
    ``resume()``. Returns what happened (``resumed``, ``diagnosis``, ``stuck``)."""
    sweep = driver.sweep
    out: dict[str, Any] = {"resumed": False, "diagnosis": [], "stuck": None}
    deadline = time.monotonic() + timeout
    while not finished(sweep):
        if stopped(sweep):
            if out["resumed"]:
                out["stuck"] = f"stopped again after one resume: {sweep.diagnose()}"
                return out
            out["diagnosis"] = sweep.diagnose()
            if not out["diagnosis"]:
                out["stuck"] = "stopped with work left and diagnose() says nothing"
                return out
            sweep.resume()
            out["resumed"] = True
        if time.monotonic() > deadline:
            out["stuck"] = (f"not finished after {timeout:.0f}s; diagnose: {sweep.diagnose()}; "
                            f"events: {sweep.lifecycle.events(8)}")  # fmt: skip
            return out
        driver.pause(time.monotonic() + 1)
    end = time.monotonic() + 90  # the final and follow-up jobs end just after the result
    while (queued := [f"{j.kind} {j.handle.job_id} {j.state}" for j in sweep.jobs()
                      if j.state not in FINISHED_JOB]) and time.monotonic() < end:  # fmt: skip
        driver.pause(time.monotonic() + 1)
    if queued:
        out["stuck"] = f"finished, but jobs of the sweep still queued: {queued}"
    return out


# -- command line -------------------------------------------------------------------------------------
def toy_spec(name: str, seed: int, trials: int = 8, parallelism: int = 3, nodes: int = 1,
             pruner: str = "none", trials_per_task: int | None = None,
             storage: Any = None, site: str = "devcluster",
             partition: str | None = None) -> Any:  # fmt: skip
    """A sweep of the toy objective (tests/helpers/chaos_objective.py) on the dev cluster;
    ``trials_per_task`` as the spec has it (default: the spec's, warm workers); ``storage`` as
    a spec's (None: the site's choice, the journal on the dev cluster); ``site`` and
    ``partition`` where its tasks run (None: the site's default partition)."""
    from hpcdl.hpo import SweepSpec

    extra: dict[str, Any] = {} if trials_per_task is None else {"trials_per_task": trials_per_task}
    if storage is not None:
        extra["storage"] = storage
    return SweepSpec.model_validate({**extra,
        "name": name, "objective": "tests.helpers.chaos_objective:toy",
        "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
        "sampler": {"name": "random", "seed": seed}, "trials": trials,
        "parallelism": parallelism, "max_retries": 6, "collective_timeout_s": 20,
        "pruner": {"name": pruner, "min_resource": 1, "reduction_factor": 2},
        "resources": {"site": site, "time": "5m", "nodes": nodes, "tasks_per_node": 1,
                      **({"partition": partition} if partition else {})},
    })  # fmt: skip


def storage_setting(value: str | None) -> Any:
    """``--storage``: None, ``journal`` or a URL as given; a file's mapping (url, password_file)."""
    if value is None or value == "journal" or "://" in value:
        return value
    import yaml

    return yaml.safe_load(Path(value).expanduser().read_text())


def chaos_run(sweep: Any, seed: int, log_path: Path, faults: int = 3,
              kinds: tuple[str, ...] = KINDS, timeout: float = 240) -> dict[str, Any]:  # fmt: skip
    """Submit the sweep, apply the seed's faults, settle, check. ``problems`` empty: passed."""
    schedule = plan(seed, faults, kinds=kinds)
    driver = Driver(sweep, log_path, seed)
    sweep.run()
    applied = driver.run(schedule)
    outcome = settle(driver, timeout)
    problems = [outcome["stuck"]] if outcome["stuck"] else check(sweep)
    report = {"seed": seed, "schedule": [asdict(f) for f in schedule], "applied": applied,
              **outcome, "problems": problems}  # fmt: skip
    log_path.write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--faults", type=int, default=3)
    p.add_argument(
        "--kinds", default=",".join(KINDS), help="comma-separated subset of " + ",".join(KINDS)
    )
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--parallelism", type=int, default=3)
    p.add_argument("--nodes", type=int, default=1, help="nodes per trial")
    p.add_argument("--trials-per-task", type=int, help="1: one trial per array task")
    p.add_argument("--pruner", default="none", choices=["none", "asha", "hyperband", "median"])
    p.add_argument(
        "--log", type=Path, help="fault log (default: chaos-<seed>.json in the sweep folder)"
    )
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--storage", help="the study's storage: journal, a postgresql:// URL, or a "
                   "YAML file with url and password_file (devcluster.sh postgres writes "
                   "~hpcdl-alice/.hpcdl/study-database.yaml)")  # fmt: skip
    args = p.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    bad = sorted(set(kinds) - set(KINDS))
    if bad or not kinds:
        p.error(f"unknown fault kinds {bad}; choose from {', '.join(KINDS)}")
    sys.path.insert(0, str(REPO))  # tests.helpers (the toy objective), here and in the jobs
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
    )
    from hpcdl.hpo import Sweep

    name = f"chaos-{args.seed}-{int(time.time())}"
    spec = toy_spec(name, args.seed, args.trials, args.parallelism, args.nodes, args.pruner,
                    args.trials_per_task, storage_setting(args.storage))  # fmt: skip
    sweep = Sweep(spec)
    log = args.log or sweep.paths.root.parent / f"{name}.json"
    report = chaos_run(sweep, args.seed, log, args.faults, kinds, args.timeout)
    for entry in report["applied"]:
        print(f"t={entry['t']:6.1f}s {entry['kind']:<13} {entry.get('target', '-')}"
              f"{'  skipped: ' + entry['skipped'] if 'skipped' in entry else ''}")  # fmt: skip
    if report["resumed"]:
        print(f"stopped; diagnose said: {report['diagnosis']}; resumed once")
    for problem in report["problems"]:
        print(f"BROKEN: {problem}")
    print(f"{'FAIL' if report['problems'] else 'ok'}: sweep {name}, log {log}")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())

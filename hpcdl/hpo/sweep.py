"""``hpcdl.Sweep``: a sweep is one ``sbatch --array`` (each task a trial), plus a small follow-up
job that resubmits killed trials and a final job that retrains the best parameters."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import optuna

from hpcdl.errors import ConfigError, HpcdlError
from hpcdl.hpo.spec import SweepSpec, load_spec
from hpcdl.hpo.study import open_study
from hpcdl.hpo.trial import FINISHED_SLOT, Slot, SweepPaths, TrialRequeued
from hpcdl.job import Job
from hpcdl.scheduler import JobHandle, get_scheduler
from hpcdl.site import load_site
from hpcdl.util import atomic_write_json, atomic_write_text


class Sweep:
    """Create, submit and inspect a sweep from the login node (or a notebook).

    >>> sweep = Sweep("configs/sweep_digits.yaml")
    >>> sweep.run()            # returns at once
    >>> sweep.status(), sweep.best()
    """

    def __init__(self, spec: SweepSpec | str | Path, overrides: list[str] | None = None):
        if not isinstance(spec, SweepSpec):
            spec = load_spec(Path(spec), overrides)
        self.spec = spec
        self.site = load_site(spec.resources.site)
        self.paths = SweepPaths(self.site.job_root_path / "sweeps" / spec.name)

    @classmethod
    def load(cls, name: str) -> Sweep:
        """An existing sweep by name (searched under every site's job root)."""
        from hpcdl.scheduler import registry_roots

        for root in registry_roots():
            spec_file = root / "sweeps" / name / "spec.json"
            if spec_file.is_file():
                return cls(SweepSpec.model_validate_json(spec_file.read_text()))
        raise HpcdlError(f"no sweep named {name!r} (see 'hpcdl sweep list')")

    # -- submission -----------------------------------------------------------------------------
    def run(self) -> list[JobHandle]:
        """Validate, create the study, submit; returns the submitted handles at once."""
        if self.paths.spec.exists():
            raise ConfigError(
                "", "name", f"sweep {self.spec.name!r} exists already at {self.paths.root} "
                f"(use 'hpcdl sweep resume {self.spec.name}' or another name)"
            )  # fmt: skip
        self._check_objective()
        self.paths.slots.mkdir(parents=True, exist_ok=True)
        self.paths.trials.mkdir(exist_ok=True)
        atomic_write_text(self.paths.spec, self.spec.model_dump_json(indent=1))
        open_study(self.spec, self.paths.root)
        return self._submit(list(range(self.spec.trials)))

    def resume(self) -> list[JobHandle]:
        """Submit only the trials still missing (never started, killed, cancelled)."""
        active = self._active_jobs(("array", "workers"))
        if active:
            raise HpcdlError(
                f"sweep {self.spec.name!r} still has jobs queued or running ({', '.join(active)}); "
                f"wait, or 'hpcdl sweep cancel {self.spec.name}' first"
            )
        missing = self.missing_slots()
        if not missing:
            raise HpcdlError(f"sweep {self.spec.name!r} has no missing trials")
        with self.paths.lock():
            for slot in self.paths.all_slots():
                if slot.slot in missing and slot.state == "running":
                    self.paths.write_slot(slot.model_copy(update={"state": "retry"}))
        self._cancel(("final",))  # its afterok on the old array can never be met
        return self._submit(missing)

    def missing_slots(self) -> list[int]:
        done = {s.slot for s in self.paths.all_slots() if s.state in FINISHED_SLOT}
        return [i for i in range(self.spec.trials) if i not in done]

    def _check_objective(self) -> None:
        from hpcdl.hpo.trial import resolve_objective

        resolve_objective(self.spec).check(self.spec)

    def _job(self, **fields: Any) -> Job:
        r = self.spec.resources
        base = {k: v for k, v in r.model_dump().items() if v is not None}
        return Job(**{**base, "name": f"sweep-{self.spec.name}", **fields})

    def _submit(self, slots: list[int]) -> list[JobHandle]:
        from hpcdl.hpo.trial import array_task_main

        root = str(self.paths.root)
        if not get_scheduler(self.site).queued:  # no queue: worker processes claim the slots
            workers = min(self.spec.parallelism, len(slots))
            handle = self._job(function=local_worker_main, args=(root,), array=workers).submit(
                self.site
            )
            self._record("workers", handle, slots)
            return [handle]
        array = self._job(
            function=array_task_main,
            args=(root, slots),
            array=len(slots),
            throttle=min(self.spec.parallelism, len(slots)),
            requeue=True,
        ).submit(self.site)
        self._record("array", array, slots)
        handles = [array]
        if self.spec.final:
            final = self._job(
                name=f"sweep-{self.spec.name}-final",
                function=final_main,
                args=(root,),
                dependencies=[f"afterok:{array.job_id}"],
            ).submit(self.site)
            self._record("final", final, [])
            handles.append(final)
        follow = Job(
            site=self.site.name if self.spec.resources.site is None else self.spec.resources.site,
            name=f"sweep-{self.spec.name}-follow",
            function=follow_up_main,
            args=(root,),
            partition=self.spec.resources.partition,
            time="00:10:00",
            dependencies=[f"afterany:{array.job_id}"],
        ).submit(self.site)
        self._record("follow", follow, [])
        return [*handles, follow]

    def _record(self, kind: str, handle: JobHandle, slots: list[int]) -> None:
        with open(self.paths.submissions, "a") as f:
            f.write(json.dumps({"kind": kind, "slots": slots, **handle.model_dump()}) + "\n")

    def submissions(self) -> list[dict[str, Any]]:
        if not self.paths.submissions.is_file():
            return []
        return [
            json.loads(line) for line in self.paths.submissions.read_text().splitlines() if line
        ]

    def _handles(self, kinds: tuple[str, ...]) -> list[JobHandle]:
        return [
            JobHandle.model_validate({k: v for k, v in s.items() if k not in {"kind", "slots"}})
            for s in self.submissions()
            if s["kind"] in kinds
        ]

    def _active(self, kinds: tuple[str, ...]) -> list[JobHandle]:
        """The sweep's jobs of these kinds still queued or running (one batched state query)."""
        from hpcdl.scheduler import FINISHED, job_states, summarize

        handles = self._handles(kinds)
        states = job_states(handles) if handles else {}
        return [h for h in handles if summarize(states[h.job_id]) not in FINISHED]

    def _active_jobs(self, kinds: tuple[str, ...] = ("array", "workers", "final")) -> list[str]:
        return [h.job_id for h in self._active(kinds)]

    # -- control ----------------------------------------------------------------------------------
    def throttle(self, parallelism: int) -> str:
        """Change how many array tasks run at once, on the live array (``scontrol update``)."""
        if parallelism < 1:
            raise ConfigError("", "parallelism", f"must be >= 1, got {parallelism}")
        arrays = self._handles(("array",))
        if not arrays:
            raise HpcdlError(f"sweep {self.spec.name!r} has no Slurm array to throttle")
        arrays[-1].backend.throttle(arrays[-1], parallelism)
        return arrays[-1].job_id

    def cancel(self) -> list[str]:
        """Cancel every queued or running job of the sweep (arrays, final, follow-up)."""
        return self._cancel(("array", "workers", "final", "follow"))

    def _cancel(self, kinds: tuple[str, ...]) -> list[str]:
        from hpcdl.scheduler import cancel_jobs

        active = self._active(kinds)
        cancel_jobs(active)  # one scancel for every Slurm job of the sweep
        return [h.job_id for h in active]

    # -- results --------------------------------------------------------------------------------
    def study(self) -> optuna.Study:
        return open_study(self.spec, self.paths.root)

    def slots(self) -> list[Slot]:
        return self.paths.all_slots()

    def status(self) -> list[dict[str, Any]]:
        """One row per trial slot: state, parameters, metric, epochs, node, W&B run."""
        by_slot = {s.slot: s for s in self.slots()}
        rows = []
        for i in range(self.spec.trials):
            s = by_slot.get(i)
            rows.append(
                {
                    "slot": i,
                    "trial": s.trial if s else None,
                    "state": s.state if s else "pending",
                    "params": s.params if s else {},
                    self.spec.metric: s.value if s else None,
                    "epochs": s.epochs if s else 0,
                    "attempts": s.attempts if s else 0,
                    "node": s.node if s else None,
                    "wandb_run": s.run_id if s else None,
                }
            )
        return rows

    def best(self) -> dict[str, Any]:
        """Best finished trial: number, value, parameters (and the final test result if any)."""
        try:
            trial = self.study().best_trial
        except ValueError:
            raise HpcdlError(f"sweep {self.spec.name!r} has no finished trial yet") from None
        out: dict[str, Any] = {
            "trial": trial.number,
            self.spec.metric: trial.value,
            "params": trial.params,
        }
        result = self.paths.final / "result.json"
        if result.is_file():
            out["final"] = json.loads(result.read_text())
        return out

    def wait(self, timeout: float, poll: float = 2.0) -> None:
        """Block until every slot is finished and the final result exists (if asked for)."""
        deadline = time.monotonic() + timeout
        while self.missing_slots() or (
            self.spec.final and not (self.paths.final / "result.json").exists()
        ):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"sweep {self.spec.name} not finished after {timeout:.0f}s: {self.status()}"
                )
            time.sleep(poll)


def final_main(sweep_dir: str) -> dict[str, Any]:
    """Retrain the best parameters on train+val and evaluate once on the held-out test split."""
    from hpcdl.hpo.trial import resolve_objective

    paths = SweepPaths(Path(sweep_dir))
    spec = paths.load_spec()
    study = open_study(spec, paths.root)
    best = study.best_trial
    paths.final.mkdir(exist_ok=True)
    try:
        scores = resolve_objective(spec).final(dict(best.params), spec, paths.final)
    except TrialRequeued as exc:  # checkpointed on a preemption signal: the requeued job goes on
        return {"requeued": str(exc)}
    result = {"trial": best.number, spec.metric: best.value, "params": best.params, **scores}
    atomic_write_json(paths.final / "result.json", result)
    return result


def follow_up_main(sweep_dir: str) -> str:
    """After the array: resubmit trials whose task was killed (retries permitting)."""
    paths = SweepPaths(Path(sweep_dir))
    sweep = Sweep(paths.load_spec())
    missing = sweep.missing_slots()
    rounds = sum(1 for s in sweep.submissions() if s["kind"] == "array")
    if not missing:
        return "all trials finished"
    if rounds > sweep.spec.max_retries:
        return f"{len(missing)} trial(s) missing after {rounds} rounds; giving up"
    sweep.resume()
    return f"resubmitted {len(missing)} trial(s)"


def local_worker_main(sweep_dir: str) -> str:
    """One local worker process: claim free slots until none are left; the last worker to
    finish runs the final retraining."""
    from hpcdl.hpo.trial import claim, run_trial

    paths = SweepPaths(Path(sweep_dir))
    spec = paths.load_spec()
    study = open_study(spec, paths.root, worker=int(os.environ.get("HPCDL_ARRAY_TASK_ID", "0")))
    done = 0
    while (slot := claim(paths, spec, study, None)) is not None:
        run_trial(paths, spec, study, slot)
        done += 1
    with paths.lock():
        finished = all(
            (s := paths.read_slot(i)) and s.state in FINISHED_SLOT for i in range(spec.trials)
        )
        marker = paths.root / ".final-started"
        run_final = spec.final and finished and not marker.exists()
        if run_final:
            marker.touch()
    if run_final:
        final_main(sweep_dir)
    return f"ran {done} trial(s)" + (" and the final retraining" if run_final else "")

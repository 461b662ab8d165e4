"""``hpcdl.Sweep``: a sweep is one ``sbatch --array`` (warm workers that run trials until none is
left, or one trial per task), plus a small follow-up job that resubmits killed trials and a final job that retrains the best parameters (their rules:
:mod:`hpcdl.hpo.lifecycle`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import optuna

from hpcdl.config import read_yaml
from hpcdl.containers import check_slurm_client
from hpcdl.errors import ConfigError, HpcdlError
from hpcdl.hpo.lifecycle import Lifecycle, SweepJob
from hpcdl.hpo.spec import SweepSpec, load_spec
from hpcdl.hpo.study import open_study
from hpcdl.hpo.trial import Slot, SweepPaths
from hpcdl.scheduler import FINISHED, JobHandle, cancel_jobs
from hpcdl.site import load_site
from hpcdl.util import atomic_write_text, share_umask


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
    @property
    def lifecycle(self) -> Lifecycle:
        return Lifecycle(self.spec, self.paths, self.site)

    def run(self) -> list[JobHandle]:
        """Validate, snapshot the base config, create the study, submit; returns at once."""
        with share_umask(self.site.share):  # the sweep tree is private (or the site's group's)
            return self._run()

    def _run(self) -> list[JobHandle]:
        if self.paths.spec.exists():
            raise ConfigError(
                "", "name", f"sweep {self.spec.name!r} exists already at {self.paths.root} "
                f"(use 'hpcdl sweep resume {self.spec.name}' or another name)"
            )  # fmt: skip
        self._check_objective()
        self._check_array()
        sbatch = "the follow-up job submits with 'sbatch'" if self.lifecycle.queued else None
        check_slurm_client(self.site.container, self.site.container.image, sbatch, "sweep")
        self.paths.slots.mkdir(parents=True, exist_ok=True)
        self.paths.trials.mkdir(exist_ok=True)
        if self.spec.train is not None:
            self.spec = snapshot_train_config(self.spec, self.paths)
        atomic_write_text(self.paths.spec, self.spec.model_dump_json(indent=1))
        open_study(self.spec, self.paths.root)
        return self.lifecycle.submit(list(range(self.spec.trials)))

    def resume(self) -> list[JobHandle]:
        """Submit the trials still missing (never started, killed, cancelled) with a new final
        job; with none missing, a final job if none will run (replacing one that never can)."""
        with share_umask(self.site.share):
            return self.lifecycle.resume()[1]

    def missing_slots(self) -> list[int]:
        return self.lifecycle.missing_slots()

    def _check_objective(self) -> None:
        from hpcdl.hpo.trial import resolve_objective

        resolve_objective(self.spec).check(self.spec)

    def _check_array(self) -> None:
        """The first round's array against the site's ``max_array_tasks`` before the sweep's
        folder and study exist (the array's own Job.check comes after them)."""
        per_trial = self.lifecycle.queued and self.spec.trials_per_task == 1
        tasks = self.spec.trials if per_trial else min(self.spec.parallelism, self.spec.trials)
        self.site.check_array(tasks, "sweep", "trials" if per_trial else "parallelism")

    def submissions(self) -> list[dict[str, Any]]:
        return self.lifecycle.submissions()

    def jobs(self) -> list[SweepJob]:
        """The sweep's jobs (arrays, workers, final, follow-up) with their tasks' states."""
        return self.lifecycle.jobs()

    def _active(self, kinds: tuple[str, ...]) -> list[JobHandle]:
        """The sweep's jobs of these kinds still queued or running (one batched state query)."""
        return [j.handle for j in self.lifecycle.jobs(kinds) if j.state not in FINISHED]

    def _active_jobs(self, kinds: tuple[str, ...] = ("array", "workers", "final")) -> list[str]:
        return [h.job_id for h in self._active(kinds)]

    def diagnose(self) -> list[str]:
        """What keeps the sweep from finishing and what to do (empty when nothing does)."""
        return self.lifecycle.diagnose(self.jobs())

    # -- control ----------------------------------------------------------------------------------
    def throttle(self, parallelism: int) -> str:
        """Change how many array tasks run at once, on the live array (``scontrol update``)."""
        if parallelism < 1:
            raise ConfigError("", "parallelism", f"must be >= 1, got {parallelism}")
        rounds = self.lifecycle.jobs(("array", "workers"))
        arrays = [j.handle for j in rounds if j.kind == "array"]
        if rounds and rounds[-1].kind == "workers":  # its tasks run until no slot is left
            raise HpcdlError(
                f"sweep {self.spec.name!r} runs warm workers ({rounds[-1].handle.array} at once, "
                "each until no trial is left): throttle applies to 'trials_per_task: 1' sweeps"
            )
        if not arrays:
            raise HpcdlError(f"sweep {self.spec.name!r} has no Slurm array to throttle")
        arrays[-1].backend.throttle(arrays[-1], parallelism)
        return arrays[-1].job_id

    def cancel(self) -> list[str]:
        """Cancel every queued or running job of the sweep (arrays, final, follow-up)."""
        return self._cancel(("array", "workers", "final", "follow"))

    def _cancel(self, kinds: tuple[str, ...]) -> list[str]:
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
                    "error": s.error if s else None,
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
                    f"\nstuck: {self.diagnose()}\nevents: {self.lifecycle.events(20)}"
                )
            time.sleep(poll)


def snapshot_train_config(spec: SweepSpec, paths: SweepPaths) -> SweepSpec:
    """Copy the base training config into the sweep folder (dataset paths made absolute) and
    point the spec at the copy: editing the original while the array is queued changes no
    trial."""
    import yaml

    assert spec.train is not None
    source = Path(spec.train)
    data = read_yaml(source)
    for key in ("train", "val"):
        value = (data.get("data") or {}).get(key)
        if isinstance(value, str) and value:
            data["data"][key] = str(Path(value).expanduser().resolve())
    copy = paths.train
    header = (
        f"# snapshot of {source} taken by 'hpcdl sweep run'; the sweep's trials read this copy\n"
    )
    atomic_write_text(copy, header + yaml.safe_dump(data, sort_keys=False))
    return spec.model_copy(update={"train": str(copy)})

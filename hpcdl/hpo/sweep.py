"""``hpcdl.Sweep``: a sweep is one ``sbatch --array`` (warm workers that run trials until none is
left, or one trial per task), plus a small follow-up job that resubmits killed trials and a final job that retrains the best parameters (their rules:
:mod:`hpcdl.hpo.lifecycle`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcdl.config import read_yaml
from hpcdl.containers import check_slurm_client
from hpcdl.errors import ConfigError, HpcdlError
from hpcdl.hpo import storage
from hpcdl.hpo.best import best_of
from hpcdl.hpo.budget import budget_line
from hpcdl.hpo.folder import Slot, SweepPaths
from hpcdl.hpo.lifecycle import Lifecycle, SweepJob
from hpcdl.hpo.spec import SweepSpec, load_spec, validate_spec
from hpcdl.scheduler import FINISHED, JobHandle, cancel_jobs
from hpcdl.site import load_site
from hpcdl.util import atomic_write_text, get_logger, share_umask

if TYPE_CHECKING:
    import optuna

log = get_logger(__name__)


#: How long ``extend`` waits for a finished sweep's last jobs to leave the queue.
EXITING_JOBS_WAIT_S = 60.0


class Sweep:
    """Create, submit and inspect a sweep from the login node (or a notebook).

    >>> sweep = Sweep("configs/sweep_digits.yaml")
    >>> sweep.run()            # returns at once
    >>> sweep.status(), sweep.best()
    """

    def __init__(
        self, spec: SweepSpec | str | Path, overrides: list[str] | None = None, source: str = ""
    ):
        if not isinstance(spec, SweepSpec):
            source = source or str(spec)
            spec = load_spec(Path(spec), overrides)
        self.spec = spec
        self.source = source or f"sweep {spec.name}"  # how errors name the sweep (its file)
        self.site = load_site(spec.resources.site)
        self.paths = SweepPaths(self.site.job_root_path / "sweeps" / spec.name)

    @classmethod
    def load(cls, name: str) -> Sweep:
        """An existing sweep by name (searched under every site's job root)."""
        from hpcdl.scheduler import registry_roots

        for root in registry_roots():
            paths = SweepPaths(root / "sweeps" / name)
            spec_file = paths.spec
            if spec_file.is_file():
                paths.check_owned()  # another user's tree names jobs that would run as us
                spec = SweepSpec.model_validate_json(spec_file.read_text())
                return cls(spec, source=str(spec_file))
        raise HpcdlError(f"no sweep named {name!r} (see 'hpcdl sweep list')")

    # -- submission -----------------------------------------------------------------------------
    @property
    def lifecycle(self) -> Lifecycle:
        return Lifecycle(self.spec, self.paths, self.site)

    def run(self) -> list[JobHandle]:
        """Validate, copy the base config into the sweep, create the study, submit; returns at once.
        Nothing is written before every check (the objective, each job of the round against
        the site) has passed: a refused sweep leaves no folder behind."""
        with share_umask(self.site.share):  # the sweep tree is private (or the site's group's)
            return self._run()

    def _run(self) -> list[JobHandle]:
        if self.paths.spec.exists():
            raise ConfigError(self.source, "name", self._exists_already())
        with _named(self.source):
            # The storage first: a database sweep's spec (saved below) names its own study.
            self.spec = storage.resolve(self.spec, self.site)
            storage.check(self.spec, "")
            self._check_objective()
            self._check_array()
            sbatch = "the follow-up job submits with 'sbatch'" if self.lifecycle.queued else None
            check_slurm_client(self.site.container, self.site.container.image, sbatch, "sweep")
            self.lifecycle.check_round(list(range(self.spec.trials)), f"{self.source}: resources")
            from hpcdl.hpo.warm import load_warm

            warm = load_warm(self.spec, self.source, _open_for_warm_start)
        self.paths.slots.mkdir(parents=True, exist_ok=True)
        self.paths.trials.mkdir(exist_ok=True)
        if self.spec.train is not None:
            self.spec = copy_train_config(self.spec, self.paths)
        atomic_write_text(self.paths.spec, self.spec.model_dump_json(indent=1))
        from hpcdl.hpo.warm import apply as apply_warm

        apply_warm(self.study(), self.spec, warm)
        return self.lifecycle.submit(list(range(self.spec.trials)), f"{self.source}: resources")

    def _exists_already(self) -> str:
        """The answer to a second ``run`` with the same name: another name, and resume only
        when there is something left to resume."""
        name, text = self.spec.name, f"sweep {self.spec.name!r} exists already at {self.paths.root}"
        old = Sweep(self.paths.load_spec(), source=str(self.paths.spec))
        life = old.lifecycle
        unfinished = life.missing_slots() or (old.spec.final and not life.has_result())
        resume = f", or continue it: 'hpcdl sweep resume {name}'" if unfinished else ""
        return f"{text}: give the new one another name (name=NEW after the spec){resume}"

    def resume(self, overrides: list[str] | None = None) -> list[JobHandle]:
        """Submit the trials still missing, with ``overrides`` (:meth:`resume_why`)."""
        return self.resume_why(overrides)[1]

    def resume_why(self, overrides: list[str] | None = None) -> tuple[str, list[JobHandle]]:
        """Submit the trials still missing (never started, killed, cancelled) with a new final
        job; with none missing, a final job if none will run (replacing one that never can).

        ``overrides`` (``KEY=VALUE``, as for ``run``) change how the rest of the sweep runs
        (``resources.*``, parallelism, retries), never what it studies; they are checked
        against the site and saved in the sweep's spec before anything is queued."""
        with share_umask(self.site.share), self.paths.changing(self.spec.name):
            self.spec = self.paths.load_spec()  # as another resume or extend may have left it
            if overrides:
                self.spec = resumed_spec(self.spec, overrides, self.source)
                life = self.lifecycle
                jobs = life.jobs()
                life.refuse_active(jobs)
                if not life.missing_slots() and (not self.spec.final or life.has_result()):
                    raise HpcdlError(life.nothing_to_resume(jobs))  # the spec stays as it was
                with _named(self.source):
                    life.check_round(life.missing_slots() or [0], f"{self.source}: resources")
                atomic_write_text(self.paths.spec, self.spec.model_dump_json(indent=1))
            return self.lifecycle.resume(f"{self.source}: resources")

    def extend(self, more: int) -> tuple[str, list[JobHandle]]:
        """``more`` trials on the same study: the spec's ``trials`` grows, and a round (array
        sized by parallelism, final and follow-up jobs) runs the new slots with any still
        missing; the final job then waits for them and retrains the best of all.

        Refused while any job of the sweep is queued or running: the live round's follow-up
        job counts rounds against ``max_retries`` and would take the new slots for a failed
        round to resubmit, and its final job could write the old best's result meanwhile.
        Extend once the round has ended, or after ``sweep cancel``."""
        if more < 1:
            raise ConfigError(self.source, "N", f"extend by at least 1 trial, got {more}")
        with share_umask(self.site.share), self.paths.changing(self.spec.name):
            self.spec = self.paths.load_spec()  # as another resume or extend may have left it
            life = self.lifecycle
            live = [f"{j.kind} {j.handle.job_id}" for j in life.jobs() if j.live]
            # A finished sweep's last jobs (its final job, the follow-up) leave the queue some
            # seconds after the result is written: `sweep run --wait` then `extend` (as the
            # sweep guide has it) was refused for them. They have nothing left to do: wait.
            deadline = time.monotonic() + EXITING_JOBS_WAIT_S
            while live and self.finished() and time.monotonic() < deadline:
                log.info("sweep %s finished; waiting for %s to leave the queue",
                         self.spec.name, ", ".join(live))  # fmt: skip
                time.sleep(1.0)
                live = [f"{j.kind} {j.handle.job_id}" for j in life.jobs() if j.live]
            if live:
                raise HpcdlError(
                    f"sweep {self.spec.name!r} still has jobs queued or running "
                    f"({', '.join(live)}): extend it when they have ended, or after "
                    f"'hpcdl sweep cancel {self.spec.name}' (its round's follow-up and final "
                    f"jobs were submitted for {self.spec.trials} trials)"
                )
            if self.paths.budget_spent.exists():  # no new trial would ever be sampled
                raise HpcdlError(
                    f"sweep {self.spec.name!r} stopped sampling: its budget is spent "
                    f"({budget_line(self.paths, self.spec)}); more trials would never run. Start "
                    f"a sweep that warm-starts from it: 'hpcdl sweep run SPEC name=NEW "
                    f"warm_start={self.spec.name}'"
                )
            data = {**self.spec.model_dump(mode="json"), "trials": self.spec.trials + more}
            with _named(self.source):
                spec = validate_spec(data, self.source)
                Lifecycle(spec, self.paths, self.site).check_round(
                    list(range(self.spec.trials, spec.trials)), f"{self.source}: resources"
                )
            old = self.paths.read_final_result()
            if old is not None:  # the best of the longer sweep gets its own final model
                kept = self.paths.final / f"result-{self.spec.trials}-trials.json"
                self.paths.final_result.replace(kept)
            self.paths.final_started.unlink(missing_ok=True)
            self.paths.archive_finished_alert(self.spec.trials)  # it will finish, and say so, again
            atomic_write_text(self.paths.spec, spec.model_dump_json(indent=1))
            self.spec = spec
            text, handles = self.lifecycle.resume(f"{self.source}: resources")
            return f"{spec.trials} trials ({more} more): {text}", handles

    def missing_slots(self) -> list[int]:
        return self.paths.missing_slots(range(self.spec.trials))

    def finished(self) -> bool:
        """Nothing left to do: every trial finished, the final result written if asked for."""
        return self.paths.finished(self.spec)

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
        # Optuna (0.16 s to import) only where a study is opened: `sweep best` and `status`
        # read the journal and the slots without it
        from hpcdl.hpo.study import open_study

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
                    **{
                        m: (s.values or {}).get(m) if s else None
                        for m in [*self.spec.metrics[1:], *self.spec.constraints]
                    },
                    "epochs": s.epochs if s else 0,
                    "attempts": s.attempts if s else 0,
                    "node": s.node if s else None,
                    "job": s.job if s else None,  # the task that holds (or held) the slot
                    "wandb_run": s.run_id if s else None,
                    "error": s.error if s else None,
                }
            )
        return rows

    def best(self) -> dict[str, Any]:
        """Best finished trial: number, value, parameters (and the final test result if any);
        with several objectives, ``pareto`` (see hpcdl.hpo.best)."""
        return best_of(self.spec, self.paths, self.source, self.study)

    def wait(self, timeout: float, poll: float = 2.0) -> None:
        """Block until every slot is finished and the final result exists (if asked for)."""
        deadline = time.monotonic() + timeout
        while not self.finished():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"sweep {self.spec.name} not finished after {timeout:.0f}s: {self.status()}"
                    f"\nstuck: {self.diagnose()}\nevents: {self.lifecycle.events(20)}"
                )
            time.sleep(poll)


#: What ``sweep resume KEY=VALUE`` may change: how the rest of the sweep runs, not what it studies.
#: Packing (trials at once per worker) is fixed per round: the workers of a round already
#: queued keep the lanes their claims name (hpcdl.hpo.worker.worker_task_main).
RESUME_KEYS = ("resources", "parallelism", "max_retries", "collective_timeout_s",
               "trials_per_node", "trials_per_gpu")  # fmt: skip


def resumed_spec(spec: SweepSpec, overrides: list[str], where: str) -> SweepSpec:
    """``spec`` with ``overrides`` applied, refusing any that would change what the study
    means (space, metric, direction, sampler, trials, objective ...)."""
    from hpcdl.config import apply_overrides

    for item in overrides:
        key = item.partition("=")[0]
        if key == "resources.site":  # the folder lives under the site's job root
            raise ConfigError(where, key, "a sweep stays on the site it was started on "
                              f"(start a new sweep for another: 'hpcdl sweep run SPEC {item}')")  # fmt: skip
        if key.split(".")[0] not in RESUME_KEYS:
            raise ConfigError(
                where, key, "a resumed sweep keeps what it studies; resume takes "
                + ", ".join(f"{k}.*" if k == "resources" else k for k in RESUME_KEYS)
                + f" (start a new sweep for this: 'hpcdl sweep run SPEC name=NEW {item}')",
            )  # fmt: skip
    data = apply_overrides(spec.model_dump(mode="json"), overrides, where)
    return validate_spec(data, where)


@contextmanager
def _named(source: str) -> Iterator[None]:
    """Name the sweep's file in errors that name no file (as training errors do)."""
    try:
        yield
    except ConfigError as exc:
        if exc.where:
            raise
        raise ConfigError(source, exc.field, exc.problem) from None


def copy_train_config(spec: SweepSpec, paths: SweepPaths) -> SweepSpec:
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
    header = f"# copy of {source} made by 'hpcdl sweep run'; the sweep's trials read this copy\n"
    atomic_write_text(copy, header + yaml.safe_dump(data, sort_keys=False))
    return spec.model_copy(update={"train": str(copy)})


def _open_for_warm_start(name: str) -> tuple[SweepSpec, optuna.Study]:
    """Another sweep a spec's ``warm_start`` names (hpcdl.hpo.warm): its spec and study."""
    old = Sweep.load(name)
    return old.spec, old.study()

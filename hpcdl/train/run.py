"""``hpcdl.Run``: one training run as an object, like ``hpcdl.Job`` and ``hpcdl.Sweep``.

A run is a resolved :class:`TrainConfig` plus a folder. Everything that turns a config into a
trained model goes through here, whoever asks (``hpcdl train``, the Python API, a sweep's
trials, ``hpcdl bench train``):

- :meth:`Run.prepare` is the one place a run folder is made (or reused, to resume): the resolved
  config (``config.yaml``) and the site-derived values (``site.json``) are written into it;
- :meth:`Run.job` and :meth:`Run.submit` queue it (checks first, the folder removed again if the
  submission fails);
- :meth:`Run.execute` is what every rank runs, through :func:`ranks`, the one start-up sequence
  (preemption flag, process group, training, leaving together);
- :meth:`Run.result` reads what the training wrote (``result.json``).

Importing this module stays light (no torch): a job unpickles its entry point,
:func:`run_job`, before any handler for the preemption signal exists.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcdl.config import apply_overrides, validate
from hpcdl.errors import HpcdlError
from hpcdl.preemption import PreemptionFlag
from hpcdl.train.config import (
    IDENTITY,
    TrainConfig,
    dump_config,
    load_train_config,
    read_run_config,
    with_absolute_data,
)
from hpcdl.util import atomic_write_json, atomic_write_text, get_logger, share_umask

if TYPE_CHECKING:
    from hpcdl.job import Job, JobHandle
    from hpcdl.launch import DistEnv
    from hpcdl.site import SiteProfile

log = get_logger(__name__)

CONFIG_FILE = "config.yaml"
SITE_FILE = "site.json"
RESULT_FILE = "result.json"

OnEpoch = Callable[[int, dict[str, float]], None]


@contextmanager
def ranks(
    flag: PreemptionFlag | None = None, finish: bool = True
) -> Iterator[tuple[PreemptionFlag, DistEnv]]:
    """The start-up sequence of every training process: the preemption flag first (it replaces
    submitit's handler, which serves rank 0 only), then the process group; on a normal exit the
    ranks leave together (``finish``). After an exception nobody waits at the final barrier:
    a failed rank's peers may never reach it."""
    from hpcdl.launch import init_distributed

    flag = flag or PreemptionFlag()
    info = init_distributed()
    try:
        yield flag, info
    except BaseException:
        if finish:  # a lone rank has no peer to wait for: leave no process group behind (an
            _drop_lone_group()  # in-process caller, e.g. a notebook, can then try again)
        raise
    if finish:
        finish_distributed()


def _drop_lone_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() == 1:
        dist.destroy_process_group()


def finish_distributed() -> None:
    """Leave together: a process that exits while a peer still tears down its gloo connections
    can abort that peer (and fail the job step). The barrier brings every rank to the teardown;
    rank 0, which also hosts the rendezvous store the others' teardown still talks to, then
    leaves last (seen once in three full test runs: rank 1 aborted as rank 0 exited). That
    abort's own cause was in the aborting rank: a gloo thread still alive at exit (development
    notes, "Flakes"); destroying the group ends those threads unless something still holds
    the group (DeepSpeed did: ``import_deepspeed`` now stops it)."""
    import sys
    import time

    dist = sys.modules.get("torch.distributed")  # never imported: no group (and no torch import)
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        last = dist.get_rank() == 0 and dist.get_world_size() > 1
        dist.destroy_process_group()
        if last:
            time.sleep(1.0)


def run_job(run_dir: str) -> dict[str, Any]:
    """What every task of a training job runs (also usable under mpiexec, srun or torchrun):
    train the run folder ``run_dir``, resuming from its newest valid checkpoint."""
    from hpcdl.train import start_gc

    flag = PreemptionFlag()  # before reading the config: the signal may come at any time
    start_gc.pause()  # until the trainer is set up (imports make no cycles)
    return Run.load(run_dir).execute(flag=flag)


def site_values(site: SiteProfile, cfg: TrainConfig) -> dict[str, Any]:
    """What the site decides for a run, as the run saw it when its folder was made."""
    return {
        "site": site.name,
        "scheduler": site.scheduler,
        "wandb_mode": cfg.log.wandb_mode or site.wandb_mode,
        "scratch": site.scratch,  # unexpanded: variables such as $SLURMD_NODENAME differ per node
        "preemption": preemption_values(site, cfg.job.partition),  # signals, delay, grace
    }


def preemption_values(site: SiteProfile, partition: str | None) -> dict[str, Any]:
    """The site's preemption settings, with the grace time of the job's partition when the
    profile gives one (Slurm's GraceTime is per partition)."""
    values = site.preemption.model_dump()
    try:
        part = site.partition(partition)
    except KeyError:  # an unknown partition is Job.check's error to report
        part = None
    if part is not None and part.grace_time_s is not None:
        values["grace_time_s"] = part.grace_time_s
    return values


class Run:
    """One training run: resolved config, run folder, job, start-up on the ranks, result.

    >>> run = Run.from_config("configs/train_digits.yaml", ["epochs=5"], site="devcluster")
    >>> handle = run.submit()              # every check, the run folder, then the job
    >>> run.wait(timeout=3600)             # 'COMPLETED' (only when asked: submit returns at once)
    >>> run.result()["val_acc"]
    """

    def __init__(
        self,
        config: TrainConfig | str | Path,
        overrides: Sequence[str] = (),
        *,
        site: str | None = None,
        where: str | None = None,
    ) -> None:
        """``config``: a YAML path or a :class:`TrainConfig`; ``overrides``: ``key=value``
        strings applied on top; ``site``: same as ``job.site=NAME``; ``where``: how errors name
        the config (default: its path)."""
        changes = [*overrides, *([f"job.site={site}"] if site else [])]
        if isinstance(config, TrainConfig):
            self.where = where or "config"
            if changes:
                data = apply_overrides(config.model_dump(mode="json"), changes, self.where)
                config = validate(TrainConfig, data, self.where)
        else:
            self.where = where or str(config)
            config = load_train_config(config, changes)
        self.config: TrainConfig = config
        self.run_dir: Path | None = None  # known once the folder exists (prepare, load)
        self.new = False  # prepare() made the folder's config (not a resume)
        self.handle: JobHandle | None = None
        self.rank = 0  # this process's rank, once execute() has started the process group
        self._site: SiteProfile | None = None

    @classmethod
    def from_config(
        cls, path: str | Path, overrides: Sequence[str] = (), site: str | None = None
    ) -> Run:
        """A run of the YAML config at ``path`` with ``key=value`` overrides."""
        return cls(path, overrides, site=site)

    @classmethod
    def load(cls, run_dir: str | Path) -> Run:
        """The run stored in an existing folder (what each task of its job does)."""
        folder = Path(run_dir).expanduser().resolve()
        run = cls(read_run_config(folder), where=str(folder / CONFIG_FILE))
        run.run_dir = folder
        return run

    @property
    def site(self) -> SiteProfile:
        """The site profile of ``job.site`` (default: ``$HPCDL_SITE``, else local)."""
        if self._site is None:
            from hpcdl.site import load_site

            self._site = load_site(self.config.job.site)
        return self._site

    # -- before the job: checks, folder, submission ----------------------------------------
    def job(self) -> Job:
        """The job that trains this run's folder on every task (requeued on preemption)."""
        from hpcdl.job import Job

        cfg = self.config
        fields = cfg.job.model_dump(exclude={"max_requeues"})
        return Job.from_dict(
            {
                **fields,
                "name": cfg.name,
                "function": run_job,
                "args": (str(self.run_dir or ""),),
                "requeue": True,
            },
            f"{self.where}: job",
        )

    def check(self) -> None:
        """Every check that can fail before queueing: the job against the site's limits, then
        datasets, model and batch for the job's ranks (one ConfigError naming the field)."""
        from hpcdl.containers import check_slurm_client
        from hpcdl.scheduler import get_scheduler
        from hpcdl.train.preflight import check_elastic, preflight

        self.job().check(self.site, f"{self.where}: job")
        check_elastic(self.config, self.where)
        job = self.config.job
        requeue = job.max_requeues > 0 and get_scheduler(self.site).queued  # from inside the image
        scontrol = "the trainer requeues itself with 'scontrol requeue'" if requeue else None
        image, where = self.job().image(self.site), f"{self.where}: job"
        check_slurm_client(self.site.container, image, scontrol, where, "set job.max_requeues=0")
        preflight(self.config, job.world_size, job.gpus_per_node > 0, self.where)

    def prepare(self) -> Path:
        """Create the run folder (or reuse it, to resume: the settings that shape the
        checkpoints must match) with the resolved config and the site's values in it.

        Dataset paths are made absolute, so the job finds them from any node and directory.
        Sets and returns :attr:`run_dir`; :attr:`new` tells whether the folder held no run yet.
        """
        cfg = self.config
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        folder = Path(cfg.run_dir or Path(cfg.output) / f"{cfg.name}-{stamp}")
        folder = folder.expanduser().resolve()
        resolved = with_absolute_data(cfg).model_copy(update={"run_dir": str(folder)})
        stored = folder / CONFIG_FILE
        new = not stored.exists()
        if not new:
            _check_same_identity(read_run_config(folder), resolved, folder, self.where)
        with share_umask(self._share()):  # the run folder is private (or the site's group's)
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(stored, dump_config(resolved))
            atomic_write_json(folder / SITE_FILE, self._site_snapshot(resolved))
            if new:  # what `hpcdl reproduce` re-runs from; a resume keeps the first record
                self._record_provenance(resolved, folder)
        self.config, self.run_dir, self.new = resolved, folder, new
        return folder

    def _share(self) -> str:
        """The site's ``share`` (private where the profile cannot be loaded: a rank elsewhere)."""
        try:
            return self.site.share
        except HpcdlError:
            return "private"

    def _record_provenance(self, cfg: TrainConfig, folder: Path) -> None:
        from hpcdl.train import provenance

        try:
            image = self.job().image(self.site)
        except HpcdlError:  # no site profile here (a rank elsewhere): none recorded
            image = None
        data = {"train": cfg.data.train, "val": cfg.data.val}
        provenance.record(folder, data, image, Path.cwd())

    def _site_snapshot(self, cfg: TrainConfig) -> dict[str, Any]:
        try:
            return site_values(self.site, cfg)
        except HpcdlError as exc:  # e.g. mpiexec on a machine without the named profile
            log.warning("run %s: site %r not recorded (%s)", cfg.name, cfg.job.site, exc)
            return {"site": cfg.job.site, "error": str(exc)}

    def submit(self) -> JobHandle:
        """Check everything, make the run folder, queue the job; returns at once. If the
        submission fails, a folder this call created is removed again (a resumed one stays)."""
        self.check()
        folder = self.prepare()
        try:
            self.handle = self.job().submit(self.site)
        except BaseException:
            if self.new:
                shutil.rmtree(folder, ignore_errors=True)
                self.run_dir, self.new = None, False
            raise
        log.info("run %s: job %s on %s", folder, self.handle.job_id, self.site.name)
        return self.handle

    def wait(self, timeout: float, poll: float = 5.0) -> str:
        """Block until the submitted job ends; its final state (raises on timeout, with the
        job's log tail)."""
        if self.handle is None:
            raise HpcdlError("this run was not submitted (call submit() first)")
        return self.handle.wait(timeout=timeout, poll=poll)

    # -- on the ranks ------------------------------------------------------------------------
    def execute(
        self,
        on_epoch: OnEpoch | None = None,
        *,
        flag: PreemptionFlag | None = None,
        finish: bool = True,
    ) -> dict[str, Any]:
        """Train on every rank of this process group (a job's tasks, mpiexec, srun, torchrun,
        or this process alone); returns the trainer's result on each rank.

        A run without a folder yet is checked for the actual ranks first, then rank 0 makes
        the folder and shares it (or its error) with the others. ``on_epoch(epoch, metrics)``
        runs after each validation; raising :class:`hpcdl.train.stop.StopTraining` from it
        ends the run early on every rank. ``finish=False`` keeps the process group (a sweep
        worker runs several trials in it)."""
        # Checkpoints, metrics and W&B files are private whatever umask started this process.
        with share_umask(self._share()), ranks(flag, finish=finish) as (flag, info):
            self.rank = info.rank
            if self.run_dir is None:
                self._prepare_on_ranks(info)
            from hpcdl.train.trainer import train

            assert self.run_dir is not None
            result = train(self.run_dir, flag, on_epoch)
        return result

    def _prepare_on_ranks(self, info: DistEnv) -> None:
        import torch
        import torch.distributed as dist

        from hpcdl.train.preflight import preflight

        preflight(self.config, info.world_size, torch.cuda.is_available(), self.where)
        box: list[Any] = [None]
        if info.rank == 0:
            try:
                box[0] = self.prepare()
            except HpcdlError as exc:
                box[0] = exc  # hpcdl's errors pickle: every rank raises rank 0's error
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], HpcdlError):
            raise box[0]
        self.run_dir = box[0]

    # -- after -------------------------------------------------------------------------------
    @property
    def folder(self) -> Path:
        if self.run_dir is None:
            raise HpcdlError("this run has no folder yet (submit() or prepare() makes it)")
        return self.run_dir

    def result(self) -> dict[str, Any]:
        """What the completed training wrote: steps, epochs, val_acc, val_loss, checkpoint..."""
        path = self.folder / RESULT_FILE
        if not path.is_file():
            raise HpcdlError(f"run {self.folder} has no {RESULT_FILE} (not completed)")
        return json.loads(path.read_text())

    def site_values(self) -> dict[str, Any]:
        """The site-derived values stored in the run folder (``site.json``)."""
        return json.loads((self.folder / SITE_FILE).read_text())


def _check_same_identity(old: TrainConfig, new: TrainConfig, folder: Path, where: str) -> None:
    """A resumed run must share the settings that shaped the checkpoints it resumes."""
    from hpcdl.errors import ConfigError

    before, after = old.model_dump(), new.model_dump()
    for key in IDENTITY:
        if before[key] != after[key]:
            raise ConfigError(
                where,
                "run_dir",
                f"{folder} holds a run with a different '{key}' ({before[key]!r}); resume it "
                "with the same settings or choose another run_dir",
            )

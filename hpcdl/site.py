"""Site profiles: what a cluster offers, written by its admins (``hpcdl/sites/*.yaml`` are shipped)."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from hpcdl.config import (
    LoginEntry,
    Memory,
    SlurmTime,
    format_minutes,
    parse_mem,
    parse_time,
    read_yaml,
    validate,
)
from hpcdl.containers import Container  # the `container` section (runtimes, binds)
from hpcdl.credentials import SecretEntry, check_no_secrets
from hpcdl.database import StorageChoice
from hpcdl.errors import ConfigError
from hpcdl.script_values import OneLine, SetupLine, SlurmName, check_one_line
from hpcdl.slurm_options import Notify, PartitionPolicy  # partitions' rules on sbatch options
from hpcdl.snapshot import Snapshot  # jobs' default code snapshot (git, rsync, none)

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")


def _env_names(v: dict[str, str]) -> dict[str, str]:
    for key in v:
        if not _ENV_NAME.match(key):
            raise ValueError(f"invalid environment variable name {key!r}")
    return v


# Environment variables a profile sets: names a shell accepts, values as strings.
EnvVars = Annotated[dict[str, str], AfterValidator(_env_names)]
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.\-]+\Z")
PACKAGE_SITE_DIR = Path(__file__).resolve().parent / "sites"  # shipped in the wheel
SYSTEM_SITE_DIR = Path("/etc/hpcdl/sites")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Partition(_Strict):
    """One Slurm partition and its limits."""

    name: str
    default: bool = False
    max_time: SlurmTime = "infinite"
    max_nodes: int | None = Field(default=None, ge=1)
    cpus_per_node: int = Field(ge=1)
    mem_per_node: Memory | None = None
    gpus_per_node: int = Field(default=0, ge=0)
    gres: str = "gpu"
    gpu_type: str | None = None
    # Slurm's per-partition preemption: REQUEUE partitions are preempted by higher tiers, and
    # their jobs get grace_time_s between SIGTERM and SIGKILL (the site-wide value otherwise).
    preempt_mode: Literal["OFF", "REQUEUE", "CANCEL", "SUSPEND"] = "OFF"
    grace_time_s: int | None = Field(default=None, ge=0, le=3600)
    features: list[str] | None = None  # node features (sinfo %f); None: not checked
    policy: PartitionPolicy = PartitionPolicy()  # sbatch option defaults, required, denied

    @field_validator("name", "gres")
    @classmethod
    def _slurm_name(cls, v: str) -> str:
        if not _SLURM_NAME.match(v):
            raise ValueError("must be letters, digits, '_', '.' or '-'")
        return v

    @property
    def max_minutes(self) -> int | None:
        return parse_time(self.max_time)

    @property
    def mem_mib(self) -> int | None:
        return None if self.mem_per_node is None else parse_mem(self.mem_per_node)


SignalName = Literal["USR1", "USR2", "TERM", "INT", "HUP"]


class Preemption(_Strict):
    """How jobs are stopped early, so they can checkpoint and requeue. ``signal`` is sent
    ``delay_s`` before the time limit (``--signal``, hpcdl asks for it). ``preempt_signals`` are
    what the site sends when a higher-priority job preempts this one: with ``PreemptMode=REQUEUE``
    Slurm sends SIGTERM to every step, waits ``GraceTime`` (``grace_time_s``), then SIGKILL. The
    trainer checkpoints on all of them at the next step boundary."""

    signal: SignalName = "USR2"
    delay_s: int = Field(default=120, ge=10, le=3600)
    preempt_signals: list[SignalName] = ["TERM"]
    grace_time_s: int = Field(default=60, ge=0, le=3600)


class LauncherPreset(_Strict):
    """What a site adds to command jobs started by one launcher (``launchers.srun``, ...)."""

    env: EnvVars = {}
    mpi: str | None = None  # srun only: ``srun --mpi=VALUE`` (pmi2, pmix, ...) for MPI programs

    @field_validator("mpi")
    @classmethod
    def _mpi(cls, v: str | None) -> str | None:
        if v is not None and not _SLURM_NAME.match(v):
            raise ValueError("must be an srun --mpi type such as pmi2 or pmix")
        return v


class SiteProfile(_Strict):
    """Everything hpcdl needs to know about one cluster."""

    name: str
    scheduler: Literal["slurm", "local"]
    description: str = ""
    partitions: list[Partition] = []
    accounts: list[SlurmName] = []
    default_account: SlurmName | None = None
    qos: list[SlurmName] = []
    default_qos: SlurmName | None = None
    module_init: OneLine | None = None
    module_paths: list[OneLine] = []
    modules: list[OneLine] = []
    setup: list[SetupLine] = []
    env: EnvVars = {}
    secrets: list[SecretEntry] = []  # NAME (from the environment) or {name: NAME, file: PATH}
    # sweeps' study storage unless a spec says `storage:`: journal, URL or {url, password_file}
    study_storage: StorageChoice | None = None
    container: Container = Container()
    job_root: OneLine = "~/.hpcdl/jobs"  # job folders' paths are written into the script
    # Who may read what hpcdl creates (job root and folders, registry, sweeps, runs, logs,
    # checkpoints): its user only (folders 0700, files 0600), or also ``share_group`` (0750 /
    # 0640; the job root is given that group, set-group-ID, so what is made below inherits it).
    share: Literal["private", "group"] = "private"
    share_group: str | None = None
    scratch: str | None = None
    preemption: Preemption = Preemption()
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    max_local_tasks: int = Field(default=8, ge=1)
    launchers: dict[Literal["srun", "torchrun"], LauncherPreset] = {}
    snapshot: Snapshot = Snapshot()  # jobs' code snapshot unless a job sets its own
    notify: Notify = Notify()  # a sweep's alerts: Slurm mail, webhook, command (hpo.alerts)
    # Slurm's MaxArraySize: array indices stop at max_array_size - 1, so hpcdl submits a larger
    # array as several Slurm arrays (hpcdl.scheduler.arrays). None: no limit (local sites).
    max_array_size: int | None = Field(default=None, ge=1, le=4_000_001)
    # Tasks one array may have in all (its parts together): each task is a job record in
    # slurmctld (MaxJobCount, shared by every user) and a pickle in the job folder, so a typo'd
    # --array 1000000 must not reach sbatch. 10,000 is Slurm's default MaxJobCount; 'site import'
    # writes the cluster's own. Job.array's le=1,000,000 stays as the last guard.
    max_array_tasks: int = Field(default=10_000, ge=1)
    login: LoginEntry | None = None  # remote mode: run the CLI there over SSH (hpcdl.cli.remote)

    @model_validator(mode="after")
    def _consistent(self) -> SiteProfile:
        names = [p.name for p in self.partitions]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"partition {sorted(dup)[0]!r} is listed twice")
        if sum(p.default for p in self.partitions) > 1:
            raise ValueError("more than one partition is marked default")
        if self.scheduler == "slurm" and not self.partitions:
            raise ValueError("a slurm site needs at least one partition")
        if self.scheduler == "local" and self.max_array_size is not None:
            raise ValueError("max_array_size is Slurm's limit: a local site has none")
        if self.default_account and self.default_account not in self.accounts:
            raise ValueError(f"default_account {self.default_account!r} is not in accounts")
        if self.default_qos and self.default_qos not in self.qos:
            raise ValueError(f"default_qos {self.default_qos!r} is not in qos")
        if self.share_group is not None and self.share != "group":
            raise ValueError("share_group needs share: group")
        if self.share_group is not None and not _SLURM_NAME.match(self.share_group):
            raise ValueError("share_group must be a group name (letters, digits, '_', '.', '-')")
        leaked = sorted(set(self.secret_names) & set(self.env))
        if leaked:
            raise ValueError(f"secret {leaked[0]!r} must not have a value in env")
        if len(set(self.secret_names)) < len(self.secrets):
            raise ValueError("a secret is listed twice")
        for name, preset in self.launchers.items():
            leaked = sorted(set(self.secret_names) & set(preset.env))
            if leaked:
                raise ValueError(f"secret {leaked[0]!r} must not have a value in launchers.{name}")
            if preset.mpi and name != "srun":
                raise ValueError(f"launchers.{name}.mpi: only srun takes an MPI type")
        return self

    # -- lookups ---------------------------------------------------------------------------
    @property
    def secret_names(self) -> list[str]:
        return [s.name for s in self.secrets]

    def check_secrets(
        self, env: dict[str, str], setup: list[str], command: list[str], name: str, where: str
    ) -> None:
        """Raise ConfigError when a job's env names a secret, or its env, setup lines, command
        or name hold a secret's value (read now from its file, checked, or the environment)."""
        fields = {f"env.{k}": v for k, v in env.items()}
        fields |= {f"setup.{i}": line for i, line in enumerate(setup)}
        fields |= {f"command.{i}": arg for i, arg in enumerate(command)} | {"name": name}
        check_no_secrets(self.secrets, fields, where, self.name)

    def partition(self, name: str | None) -> Partition | None:
        """The named partition, the default one, or ``None`` on a site without partitions."""
        if not self.partitions:
            return None
        if name is None:
            return next((p for p in self.partitions if p.default), self.partitions[0])
        for p in self.partitions:
            if p.name == name:
                return p
        raise KeyError(name)

    def check_array(self, tasks: int | None, where: str, field: str = "array") -> None:
        """Raise ConfigError when an array of ``tasks`` tasks exceeds ``max_array_tasks``."""
        if tasks is not None and tasks > self.max_array_tasks:
            raise ConfigError(where, field, f"an array of {tasks:,} tasks exceeds site "
                              f"{self.name!r} limit max_array_tasks {self.max_array_tasks:,}")  # fmt: skip

    def launcher(self, name: str) -> LauncherPreset:
        """The site's preset for a launcher (empty when the profile has none)."""
        return self.launchers.get(name, LauncherPreset())  # type: ignore[call-overload]

    @property
    def job_root_path(self) -> Path:
        """Where job folders and the registry live (``$HPCDL_JOB_ROOT`` overrides the profile)."""
        root = os.environ.get("HPCDL_JOB_ROOT") or self.job_root
        path = os.path.expandvars(os.path.expanduser(root))
        try:  # a job folder's path is written into the batch script (--output, --error)
            check_one_line(path)
        except ValueError as exc:
            raise ConfigError("HPCDL_JOB_ROOT or job_root", "", str(exc)) from None
        return Path(path)

    @property
    def scratch_path(self) -> str | None:
        """Node-local scratch with variables expanded where it is used (e.g. ``$SLURM_JOB_ID``)."""
        return os.path.expandvars(os.path.expanduser(self.scratch)) if self.scratch else None

    def module_lines(self) -> list[str]:
        """Shell lines that load the site's modules (empty if none)."""
        if not self.modules:
            return []
        lines = [f". {shlex.quote(self.module_init)}"] if self.module_init else []
        lines += [f"module use {shlex.quote(p)}" for p in self.module_paths]
        lines.append("module load " + " ".join(shlex.quote(m) for m in self.modules))
        return lines

    def env_lines(self) -> list[str]:
        """``export`` lines for the site's environment presets, safely quoted, then the lines
        that read secrets from their files on the node (the script names the file only)."""
        lines = [f"export {k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]
        return lines + [ln for s in self.secrets if (ln := s.shell_line())]

    def summary_rows(self) -> list[tuple[str, str, str, str, str, str]]:
        """(name, default, max time, max nodes, cpus, mem, gpus) rows for display."""
        return [
            (
                p.name + (" *" if p.default else ""),
                format_minutes(p.max_minutes),
                str(p.max_nodes or "-"),
                str(p.cpus_per_node),
                p.mem_per_node or "-",
                f"{p.gres}:{p.gpu_type + ':' if p.gpu_type else ''}{p.gpus_per_node}"
                if p.gpus_per_node
                else "-",
            )
            for p in self.partitions
        ]


def site_search_path() -> list[tuple[Path, str]]:
    """Profile folders, first match wins, each with its origin: ``$HPCDL_SITE_PATH`` (colon-separated),
    the user's (``~/.config/hpcdl/sites``), the system's (``/etc/hpcdl/sites``, ``/etc/xdg/hpcdl/sites``),
    then the package's (``local`` and the examples).

    Never the current folder: a ``./site/NAME.yaml`` in a checkout someone else wrote would
    silently replace the admins' profile, setup lines included. Such a file is used only when
    named: ``--site ./site/NAME.yaml``, or its folder in ``$HPCDL_SITE_PATH``."""
    import platformdirs

    env = [(Path(d), "HPCDL_SITE_PATH") for d in os.environ.get("HPCDL_SITE_PATH", "").split(":")]
    system = platformdirs.site_config_dir("hpcdl", multipath=True).split(os.pathsep)
    dirs = [*env, (Path(platformdirs.user_config_dir("hpcdl")) / "sites", "user")]
    dirs += [(SYSTEM_SITE_DIR, "system")] + [(Path(d) / "sites", "system") for d in system]
    dirs += [(PACKAGE_SITE_DIR, "package")]
    seen: dict[Path, str] = {}
    for d, label in dirs:
        if str(d) not in {"", "."}:
            seen.setdefault(d.resolve(), label)
    return list(seen.items())


def site_dirs() -> list[Path]:
    return [d for d, _ in site_search_path()]


def site_origins() -> dict[str, tuple[Path, str]]:
    """Each profile name → (its file, its folder's origin): the file ``load_site`` picks."""
    found: dict[str, tuple[Path, str]] = {}
    for d, label in site_search_path():
        for p in sorted(d.glob("*.yaml")) if d.is_dir() else []:
            found.setdefault(p.stem, (p, label))
    return found


def available_sites() -> list[str]:
    return sorted(site_origins())


def default_site_name() -> str:
    """``$HPCDL_SITE`` or the embedded ``local`` profile."""
    return os.environ.get("HPCDL_SITE", "local")


def load_site(name_or_path: str | Path | None = None) -> SiteProfile:
    """Load a profile by name (searched in :func:`site_dirs`) or by path to a YAML file."""
    ref = str(name_or_path) if name_or_path is not None else default_site_name()
    path = Path(ref)
    if not (ref.endswith((".yaml", ".yml")) or os.sep in ref):
        origins = site_origins()
        if ref not in origins:
            known = ", ".join(sorted(origins)) or "none"
            raise ConfigError("", "site", f"unknown site profile {ref!r} (available: {known})")
        path = origins[ref][0]
    data = read_yaml(path)
    profile = validate(SiteProfile, data, str(path))
    if (
        path.stem != profile.name
        and path.suffix in {".yaml", ".yml"}
        and path.parent in site_dirs()
    ):
        raise ConfigError(
            str(path), "name", f"{profile.name!r} must match the file name {path.stem!r}"
        )
    return profile


def name_mismatch(path: Path) -> str | None:
    """The ``name:`` of the profile file at ``path`` when it differs from the file name (None
    when they agree or the file does not read: loading it says why)."""
    try:
        name = read_yaml(path).get("name")
    except ConfigError:
        return None
    return str(name) if name is not None and str(name) != path.stem else None


def default_fit_problems(profile: SiteProfile) -> list[tuple[str, str]]:
    """(field, problem) for each partition policy default that does not fit its partition's
    limits: every job given it there would be refused by sbatch, or could use only part of a
    node. Only options a policy may default are here (time, mem and cpus-per-task are hpcdl's
    own, refused in a policy when the profile loads)."""
    out = []
    for i, p in enumerate(profile.partitions):
        for key, value in p.policy.defaults.items():
            try:
                problem = _default_fit(p, key, value)
            except ValueError:  # a value hpcdl cannot read: sbatch judges it
                problem = None
            if problem:
                out.append((f"partitions.{i}.policy.defaults.{key}", problem))
    return out


def _default_fit(p: Partition, key: str, value: object) -> str | None:
    where = f"partition {p.name!r}"
    refused = "every job given this default there is refused by sbatch"
    if key == "time-min" and (parse_time(str(value)) or 0) > (p.max_minutes or float("inf")):
        return f"--time-min={value} exceeds {where} max_time {p.max_time}: {refused}"
    per_node = {"mem-per-cpu": ("CPUs", p.cpus_per_node), "mem-per-gpu": ("GPUs", p.gpus_per_node)}
    if key in per_node and p.mem_mib is not None and per_node[key][1]:
        unit, count = per_node[key]
        mib = parse_mem(str(value))
        if mib > p.mem_mib:
            return f"--{key}={value} exceeds {where} mem_per_node {p.mem_per_node}: {refused}"
        if mib * count > p.mem_mib:
            return (f"--{key}={value} x {count} {unit} per node exceeds {where} mem_per_node "
                    f"{p.mem_per_node}: a job given this default can use at most "
                    f"{p.mem_mib // mib} of the {count} {unit} per node there")  # fmt: skip
    if key in {"cpus-per-gpu", "mincpus"} and int(str(value)) > p.cpus_per_node:
        return f"--{key}={value} exceeds {where} cpus_per_node {p.cpus_per_node}: {refused}"
    if (
        key == "cpus-per-gpu"
        and p.gpus_per_node
        and int(str(value)) * p.gpus_per_node > p.cpus_per_node
    ):
        return (f"--cpus-per-gpu={value} x {p.gpus_per_node} GPUs per node exceeds {where} "
                f"cpus_per_node {p.cpus_per_node}: a job given this default can use at most "
                f"{p.cpus_per_node // int(str(value))} of the {p.gpus_per_node} GPUs per node there")  # fmt: skip
    if key == "gpus-per-task" and int(str(value).split(":")[-1]) > p.gpus_per_node:
        return f"--gpus-per-task={value} exceeds {where} gpus_per_node {p.gpus_per_node}: {refused}"
    return None

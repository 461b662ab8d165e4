"""Remote mode: the CLI run on a login node over SSH, from a laptop.

``hpcdl --remote user@host CMD ...`` (or ``--site NAME`` / ``$HPCDL_SITE`` naming a profile with a
``login:`` entry) runs ``hpcdl CMD ...`` on that login node, in a copy of the current folder
shipped there with rsync, and passes its output and exit status through unchanged. One SSH
connection is opened and kept (ControlMaster, ControlPersist) so that a ``status`` loop does not
log in again each time; its socket lives in a folder only this user can enter. Host keys are
checked as ssh always does (``login.known_hosts`` names the file): never
``StrictHostKeyChecking=no``. ``hpcdl --remote ... pull PATH`` brings results back."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from hpcdl.config import LoginNode, validate
from hpcdl.errors import ConfigError, HpcdlError

#: Commands whose arguments name local files (configs, job files, folders): the current
#: folder is shipped before they run. The others run in the last copy (or an empty folder).
SHIPPING = {"submit", "render", "sweep", "train", "alloc", "serve", "export", "data"}
#: Commands that run here, against the login node (they move files, not jobs).
LOCAL = {"pull"}
#: A ControlPath must fit a Unix socket's path (108 bytes): the folder, '/', ssh's %C (40
#: characters) and the '.' and 16 characters ssh adds while it sets the master up.
_MAX_SOCKET_DIR = 48
_last: Remote | None = None  # the login node ``pull`` talks to


def split_remote(argv: list[str]) -> tuple[str | None, list[str]]:
    """``--remote X`` / ``--remote=X`` before the command, and the rest of ``argv``."""
    if argv[:1] == ["--remote"]:
        if len(argv) < 2:
            raise ConfigError("", "--remote", "give the login node as user@host")
        return argv[1], argv[2:]
    if argv and argv[0].startswith("--remote="):
        return argv[0].split("=", 1)[1], argv[1:]
    return None, argv


def _site_named(argv: list[str]) -> str | None:
    """The ``--site`` of the command line (after the command's name), else ``$HPCDL_SITE``."""
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--site" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--site="):
            return arg.split("=", 1)[1]
    return os.environ.get("HPCDL_SITE") or None


def login_for(argv: list[str]) -> tuple[LoginNode | None, list[str]]:
    """The login node this command line runs on (None: here) and the command line for it."""
    if os.environ.get("HPCDL_NO_REMOTE"):  # set by remote mode on the login node itself
        return None, argv
    host, rest = split_remote(argv)
    name = _site_named(rest)
    profile_login = None
    if name is not None:
        from hpcdl.site import load_site

        try:
            profile_login = load_site(name).login
        except HpcdlError:
            if host is None:
                return None, argv  # the command itself names the unknown site
    if host is None:
        return profile_login, rest
    data = profile_login.model_dump() if profile_login else {}
    return validate(LoginNode, {**data, "host": host}, "--remote"), rest


def control_dir() -> Path:
    """The folder of the shared connection's socket: ``~/.hpcdl/ssh``, or, where that path is
    too long for a socket, ``$XDG_RUNTIME_DIR/hpcdl-ssh`` or ``/tmp/hpcdl-ssh-UID``; each is this
    user's alone (0700, checked), never a shared folder where another user could reach a socket."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")  # /run/user/UID: private, if there is one
    choices = [Path.home() / ".hpcdl" / "ssh", *([Path(runtime) / "hpcdl-ssh"] if runtime else [])]
    short = [c for c in choices if len(str(c)) <= _MAX_SOCKET_DIR]
    folder = short[0] if short else Path("/tmp") / f"hpcdl-ssh-{os.getuid()}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise HpcdlError(f"{folder}: not a folder of yours; remove it (remote mode keeps its "
                         "SSH socket there)")  # fmt: skip
    if info.st_mode & 0o077:
        os.chmod(folder, 0o700)  # ours: made private again
    return folder


class Remote:
    """One login node: ssh and rsync over one shared connection."""

    def __init__(self, login: LoginNode) -> None:
        self.login = login

    def ssh_options(self) -> list[str]:
        opts = ["-o", "BatchMode=yes", "-o", "ControlMaster=auto",
                "-o", f"ControlPath={control_dir()}/%C", "-o", f"ControlPersist={self.login.persist}",
                "-o", "ConnectTimeout=15", "-o", "ServerAliveInterval=30"]  # fmt: skip
        if self.login.port:
            opts += ["-p", str(self.login.port)]
        if self.login.identity_file:
            opts += ["-i", os.path.expanduser(self.login.identity_file), "-o", "IdentitiesOnly=yes"]
        if self.login.known_hosts:
            opts += ["-o", f"UserKnownHostsFile={os.path.expanduser(self.login.known_hosts)}"]
        return opts

    def login_ssh(self) -> str:
        """How the login node is reached, for printed ``ssh -L`` lines."""
        port = f"-p {self.login.port} " if self.login.port else ""
        return f"{port}{self.login.host}"

    def connect(self) -> None:
        """Open (or reuse) the shared connection; one line naming ssh's reason when it fails."""
        with tempfile.TemporaryFile("w+") as err:  # not a pipe: the master keeps it open
            try:
                proc = subprocess.run(["ssh", *self.ssh_options(), "--", self.login.host, "true"],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=err, timeout=60)  # fmt: skip
            except FileNotFoundError:
                raise ConfigError("", "--remote", "ssh is not installed here") from None
            except subprocess.TimeoutExpired:
                raise HpcdlError(f"remote {self.login.host}: ssh did not connect in 60s") from None
            err.seek(0)
            lines = [ln.strip() for ln in err.read().splitlines() if ln.strip()]
        if proc.returncode != 0:
            why = lines[-1] if lines else f"ssh exited with {proc.returncode}"
            hint = (" (add its key to known_hosts first, or set login.known_hosts)"
                    if "Host key verification failed" in why else "")  # fmt: skip
            raise HpcdlError(f"remote {self.login.host}: {why}{hint}")

    def workdir(self, local: Path) -> str:
        """The copy of ``local`` on the login node, relative to its home."""
        slug = re.sub(r"[^A-Za-z0-9._-]", "_", local.name or "root").lstrip("-.") or "root"
        digest = hashlib.sha1(str(local).encode()).hexdigest()[:8]
        return f"{self.login.workdir.rstrip('/')}/{slug}-{digest}"

    def _rsync(self, args: list[str]) -> None:
        if shutil.which("rsync") is None:
            raise ConfigError("", "--remote", "rsync is not installed here: apt install rsync")
        ssh = shlex.join(["ssh", *self.ssh_options()])
        # the copy is private on the login node whatever the modes here (--chmod), like job folders
        # and so are the folders --mkpath makes (the login shell's umask would leave them 0755)
        argv = ["rsync", "-a", "--chmod=go-rwx", "--protect-args", "--mkpath", "-e", ssh,
                "--rsync-path=umask 077 && rsync", *args]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            raise HpcdlError(f"rsync with {self.login.host} failed: {(lines or ['?'])[0]}")

    def ship(self, local: Path) -> str:
        """Copy ``local`` (without .git, virtual environments, caches) to its work copy. Files
        are added and updated, never deleted there: jobs write their outputs (``runs/``,
        checkpoints) into the work copy, and ``--delete`` removed them, a running job's too,
        at the next command that ships the folder."""
        remote = self.workdir(local)
        excludes = [".git/", ".venv/", "venv/", "__pycache__/", "*.pyc", ".hpcdl/", "wandb/"]
        self._rsync([*[f"--exclude={e}" for e in excludes], f"{local}/",
                     f"{self.login.host}:{remote}/"])  # fmt: skip
        return remote

    def pull(self, path: str, dest: Path, local: Path) -> None:
        """``path`` (in the work copy of ``local``, or ``~/...`` under the home) into ``dest``."""
        if path.startswith("~/"):
            source = path[2:]
        elif path.startswith("/"):
            source = path
        else:
            source = f"{self.workdir(local)}/{path}"
        self._rsync([f"{self.login.host}:{source}", str(dest)])

    def run(self, argv: list[str], workdir: str) -> int:
        """``hpcdl ARGV`` on the login node in ``workdir``: its output and exit status."""
        env = f"HPCDL_NO_REMOTE=1 HPCDL_LOGIN_SSH={shlex.quote(self.login_ssh())}"
        if os.environ.get("HPCDL_SITE"):  # the laptop's default site is the login node's too
            env += f" HPCDL_SITE={shlex.quote(os.environ['HPCDL_SITE'])}"
        line = (f"umask 077 && mkdir -p {shlex.quote(workdir)} && cd {shlex.quote(workdir)} && "
                f"{env} {self.login.hpcdl} {shlex.join(argv)}")  # fmt: skip
        tty = ["-t"] if argv[:1] == ["alloc"] and sys.stdin.isatty() else []
        proc = subprocess.run(["ssh", *self.ssh_options(), *tty, "--", self.login.host, line])
        return proc.returncode


def route(argv: list[str]) -> int | None:
    """Run ``argv`` on the login node when remote mode applies (its exit status), else None
    (the command runs here; ``pull`` then knows the login node)."""
    global _last
    login, rest = login_for(argv)
    if login is None:
        return None
    command = next((a for a in rest if not a.startswith("-")), None)
    if command in SHIPPING:
        check_shippable(Path.cwd(), Path.home(), login.host)
    remote = Remote(login)
    remote.connect()
    if command in LOCAL:
        _last = remote
        return None
    local = Path.cwd()
    workdir = remote.ship(local) if command in SHIPPING else remote.workdir(local)
    return remote.run(rest, workdir)


def check_shippable(local: Path, home: Path, host: str) -> None:
    """Remote mode copies the current folder to the login node: from the home folder (or ``/``)
    that would be every file the user has here (keys, mail, caches), so it is refused."""
    local, home = local.resolve(), home.resolve()
    if local == home or local == Path("/") or local in home.parents:
        raise HpcdlError(f"remote mode copies the current folder to {host}, and {local} is "
                         f"{'your home folder' if local == home else 'above it'}: cd into the "
                         "project's folder first")  # fmt: skip


def current() -> Remote:
    """The login node of this command line (for ``pull``), or the error saying how to name one."""
    if _last is None:
        raise ConfigError("", "pull", "brings files back from a login node: give --remote "
                          "user@host, or --site NAME of a profile with login:")  # fmt: skip
    return _last


@click.command()
@click.argument("path")
@click.argument("dest", required=False, default=".")
@click.option("--site", help="A site profile whose login: entry names the login node.")
def pull(path: str, dest: str, site: str | None) -> None:
    """Bring results back from the login node (remote mode): PATH in the copy of this folder
    there, or ~/PATH under its home (e.g. ~/.hpcdl/jobs/sweeps/NAME, offline W&B runs included).

    \b
    hpcdl --remote alice@login1 pull ~/.hpcdl/jobs/sweeps/digits sweeps/
    hpcdl --site mycluster pull runs/digits-mlp-20261122-060342"""
    remote = current()
    remote.pull(path, Path(dest), Path.cwd())
    click.echo(f"pulled {path} from {remote.login.host} into {dest}")


def register(cli: click.Group) -> None:
    """Add this module's commands to the top-level group."""
    cli.add_command(pull)

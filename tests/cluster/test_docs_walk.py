"""The docs walked as a new user types them (issue 26): every command block of getting-started,
jobs, train, sweep-guide and site-admin, in order, in a fresh home (no job root, no config
folder, no HPCDL_* variables); each command must succeed (or fail as the page says), and the
sample outputs the pages show must have the shape of what the commands print (names, folders,
columns; numbers vary). Local blocks run in `make test`'s local part, blocks on the dev cluster
are marked slurm and cancel what they submit."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
BIN = str(Path(sys.executable).parent)
NUMBER = r"-?\d[\d.:]*(?:e[-+]?\d+)?"
# a sample's varying parts: "=value", numbers (ids, scores, times), "…" (elided), the bar
_TOKEN = re.compile(r"(=[^,\s)]+|\d[\d.:]*(?:e[-+]?\d+)?|…|━+|~|\s+)")


def fenced(page: Path, after: str, lang: str = "") -> str:
    """The first fenced block (```LANG) after the heading or text ``after`` on ``page``."""
    text = page.read_text()
    start = text.index(after)
    match = re.compile(rf"^```{lang}\n(.*?)^```", re.M | re.S).search(text, start)
    assert match, f"{page}: no ```{lang} block after {after!r}"
    return match.group(1)


def commands(block: str) -> list[str]:
    """A bash block's command lines, comments removed."""
    lines = (re.sub(r"\s+#\s.*$", "", line).strip() for line in block.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def shape(sample: str, home: Path) -> re.Pattern[str]:
    """A sample output line as a pattern: its words as they are, the parts that vary anything
    of the same kind (a number for a number, a value after '=', '…' anything, '~' the home)."""
    out = []
    for tok in _TOKEN.split(sample.strip()):
        if not tok:
            continue
        if tok.isspace():
            out.append(r"\s+")
        elif tok.startswith("="):
            out.append(r"=[^,\s)]+")
        elif tok == "…":
            out.append(".*")
        elif tok.startswith("━"):
            out.append("━+")
        elif tok == "~":
            out.append(re.escape(str(home)))
        elif re.fullmatch(NUMBER, tok):
            out.append(NUMBER)
        else:
            out.append(re.escape(tok))
    return re.compile("".join(out))


def assert_has_shape(sample_lines: list[str], output: str, home: Path, what: str) -> None:
    lines = [line.strip() for line in output.splitlines()]
    for sample in sample_lines:
        pattern = shape(sample, home)
        assert any(pattern.fullmatch(line) for line in lines), (
            f"{what}: no line of the output has the shape of the page's {sample!r}\n"
            f"--- output:\n{output}"
        )


class User:
    """A new user's shell: a fresh HOME (so no job root and no ~/.config/hpcdl), none of the
    HPCDL_* variables the other tests set, hpcdl on the PATH."""

    def __init__(self, home: Path) -> None:
        home.mkdir()
        self.home, self.cwd = home, home
        drop = ("HPCDL_", "XDG_", "COLUMNS", "WANDB_")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        self.env.update(HOME=str(home), PATH=f"{BIN}:{os.environ['PATH']}")

    def run(self, line: str, timeout: float = 180, fails: str = "", shell: str = "bash",
            or_fails: str = "") -> str:  # fmt: skip
        """Run one command line as typed (a `cd` carries over to the next); its output. It must
        succeed, or with ``fails`` exit non-zero printing that (one `error:` line, no traceback);
        with ``or_fails``, either."""
        where = self.home / ".cwd"
        where.unlink(missing_ok=True)
        proc = subprocess.run(
            [shell, "-c", f"set -e\n{line}\npwd > {where}"],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        out = proc.stdout + proc.stderr
        if or_fails and proc.returncode != 0:
            fails = or_fails
        if fails:
            assert proc.returncode != 0 and fails in out, f"$ {line}\nexit {proc.returncode}\n{out}"
            assert "Traceback" not in out and re.search(r"^error: ", out, re.M), out
            return out
        assert proc.returncode == 0, f"$ {line}\nexit {proc.returncode}\n{out}"
        self.cwd = Path(where.read_text().strip())
        return out


# -- the walker: every command block of a page, in order ---------------------------------------
# A fenced ```bash block is typed line by line; a ```text block whose first line is "$ COMMAND"
# is typed and its other lines are the sample the output must have the shape of. Other blocks
# (yaml, python, text without a prompt) are shown, not typed. The line just before a block may
# say otherwise: <!-- walk: skip: WHY --> (never typed; the reason is on the page), or
# <!-- walk: slurm --> (typed by the cluster walk). A block with `--site devcluster` or
# `site=devcluster` is a cluster block too. The local walk types the other blocks, the cluster walk the cluster blocks, each
# page in a fresh home after `hpcdl init work && cd work` (the folder the pages start from).
WALKED = ["getting-started", "jobs", "train", "sweep-guide", "site-admin"]
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
_MARK = re.compile(r"<!--\s*walk:\s*(skip|slurm)\b:?\s*(.*?)\s*-->")


@dataclass
class Block:
    lang: str
    body: str
    mark: str  # "", "skip", "slurm"
    why: str
    line: int  # of the fence, for messages

    @property
    def typed(self) -> bool:
        return self.mark != "skip" and (
            self.lang == "bash" or (self.lang == "text" and self.body.startswith("$ "))
        )

    @property
    def slurm(self) -> bool:
        return self.mark == "slurm" or bool(re.search(r"(--site |site=)devcluster", self.body))


def blocks(page: str) -> list[Block]:
    text = (DOCS / f"{page}.md").read_text()
    out = []
    for m in _FENCE.finditer(text):
        before = text[: m.start()].rstrip().rsplit("\n", 1)[-1].strip()
        mark = _MARK.fullmatch(before)
        out.append(
            Block(
                m.group(1),
                m.group(2),
                mark.group(1) if mark else "",
                mark.group(2) if mark else "",
                text.count("\n", 0, m.start()) + 1,
            )
        )
    return out


def lines_with_comments(block: str) -> list[tuple[str, str, str]]:
    """(command, its comment, the shell the block's comments name for it: '# zsh: ...')."""
    out, shell = [], "bash"
    for raw in block.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            found = re.match(r"#\s*(bash|zsh|fish)\b", line)
            shell = found.group(1) if found else shell
            continue
        parts = re.split(r"\s+#\s", line, maxsplit=1)
        if parts[0]:
            out.append((parts[0], parts[1] if len(parts) > 1 else "", shell))
    return out


class Walk:
    """One page typed by a new user: the ids of the jobs and the run folders the page's
    placeholders stand for, what was skipped, and the page's own checks."""

    def __init__(self, page: str, user: User, slurm: bool) -> None:
        self.page, self.user, self.slurm = page, user, slurm
        self.jobs: list[str] = []
        self.runs: list[str] = []
        self.skipped: list[str] = []
        self.typed = 0

    def placeholders(self, line: str) -> str:
        """What a user types for the page's placeholders: the job or run folder they just made."""
        if "JOB_ID" in line or re.search(r"\b1234\b", line):
            assert self.jobs, f"{self.page}: {line!r} names a job before any was submitted"
            line = line.replace("JOB_ID", self.jobs[-1])
            line = re.sub(r"\b1234\b", self.jobs[0], line)  # jobs.md: the page's first job
        if re.search(r"runs/digits-mlp-\d{8}-\d{6}|\bRUN\b", line):
            assert self.runs, f"{self.page}: {line!r} names a run folder before any was made"
            mlp = [r for r in self.runs if Path(r).name.startswith("digits-mlp-")]
            line = re.sub(r"runs/digits-mlp-\d{8}-\d{6}", (mlp or self.runs)[-1], line)
            line = re.sub(r"\bRUN\b", (mlp or self.runs)[-1], line)  # the page's digits run
        # the page's /tmp/digits.pt: the user's own folder, not the machine's shared /tmp
        return line.replace("/tmp/digits", f"{self.user.home}/digits")

    def type_block(self, block: Block) -> None:
        if block.lang == "text":  # "$ COMMAND" and the sample of its output
            command, *sample = block.body.splitlines()
            out = self.user.run(self.placeholders(command.removeprefix("$ ")))
            self.typed += 1
            assert_has_shape(
                [s for s in sample if s.strip()],
                out,
                self.user.home,
                f"docs/{self.page}.md:{block.line}: $ {command}",
            )
            return
        for command, comment, shell in lines_with_comments(block.body):
            if shell == "zsh" and not shutil.which("zsh"):
                self.skipped.append(f"{command} (no zsh here)")
                continue
            line = self.placeholders(command)
            expected = EXPECTED_ERRORS.get(command)
            if expected:  # the page's comment says it is an error here, and which
                assert "error" in comment, f"{self.page}: {command!r} fails: the page must say so"
                out = self.user.run(line, fails=expected)
            else:
                out = (
                    self.retrying(line)
                    if command in RETRIED
                    else self.user.run(
                        line,
                        timeout=300 if self.slurm else 180,
                        shell=shell if shell == "zsh" else "bash",
                        or_fails=WHEN_FINISHED.get(command, ""),
                    )
                )
            self.typed += 1
            self.check(command, line, out)

    def retrying(self, line: str, timeout: float = 150) -> str:
        """A command the page means to be typed once something has happened (a job's output, a
        finished trial): typed again, as a user would, until it succeeds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.user.run(line)
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)

    def check(self, command: str, line: str, out: str) -> None:
        """What the page says each kind of command prints or makes."""
        self.jobs += re.findall(r"^Submitted job (\S+) ", out, re.M)
        self.jobs += re.findall(r"^submitted job (\S+) on ", out, re.M)
        self.runs += re.findall(r"^run folder: (\S+)", out, re.M)
        self.runs += re.findall(r"^completed: .*\((\S+)\)$", out, re.M)
        if command.startswith("hpcdl init"):
            for folder in ("train", "val", "test"):  # what the page says init writes
                assert (self.user.cwd / "data/digits" / folder).is_dir(), out
            assert (self.user.cwd / "configs/sweep_digits.yaml").is_file(), out
        elif "hpcdl logs JOB_ID" in command:
            assert self.jobs[-1] in out, out  # hpcdl status lists it
            _wait_for_hello(self.user, self.jobs[-1])
        elif command.startswith("hpcdl sweep run") and self.page == "getting-started":
            sample = fenced(DOCS / "getting-started.md", "One run of the sweep here", "text")
            assert_has_shape([s for s in sample.splitlines() if s], out, self.user.home, line)
        elif command == "hpcdl site list":
            assert re.search(r"^local \(default\)\s+package\s", out, re.M), out
        elif command.startswith("hpcdl submit") and "--array" in command:
            self.user.run(f"hpcdl cancel {self.jobs[-1]}")  # the page's 1,000 tasks need not run
        elif command.startswith("hpcdl submit"):
            assert re.search(r"^Submitted job \S+ ", out, re.M), out
        elif command.startswith("hpcdl render"):
            assert out.startswith("#!"), out  # the sbatch script itself
        elif "hpcdl train" in command and ("--wait" in command or "--local" in command):
            epochs = re.search(r"epochs=(\d+)", command)
            count = epochs.group(1) if epochs else r"\d+"
            done = rf"^completed: \d+ steps, {count} epochs, val_acc "
            assert re.search(done, out, re.M), out
        elif command.startswith("hpcdl train"):
            assert re.search(r"^submitted job \S+ on devcluster", out, re.M), out
        elif command.startswith("hpcdl export"):
            weights = re.search(r"^exported step\d+ .*\n\s*weights: (\S+)", out, re.M)
            assert weights and Path(weights.group(1)).is_file(), out
        elif command.startswith("hpcdl site import"):
            assert (self.user.home / ".config/hpcdl/sites/mysite.yaml").is_file(), out
        elif command.startswith("hpcdl site check"):
            assert "matches the live cluster" in out, out
        elif "_HPCDL_COMPLETE=fish_source" in command:
            assert (self.user.home / ".config/fish/completions/hpcdl.fish").stat().st_size, out


# Commands the pages say fail where the walk types them (no W&B key, a warm-worker sweep), with
# what the error must say.
EXPECTED_ERRORS = {
    "hpcdl sweep throttle digits-slurm 4": "throttle applies to 'trials_per_task: 1' sweeps",
    "hpcdl sync digits-slurm": "did not sync",
}
# Lines the page types while the sweep runs; on a loaded machine the sweep may have finished by
# then, and the command says so (run 14: the walk's resume found nothing to resume, exit 2).
WHEN_FINISHED = {
    "hpcdl sweep cancel digits-slurm; hpcdl sweep resume digits-slurm": "nothing to resume",
    "hpcdl sweep cancel digits-slurm; hpcdl sweep resume digits-slurm resources.partition=low "
    "resources.time=2h": "nothing to resume",
}
# Typed again until they succeed: the page means them once the job ran or a trial finished.
RETRIED = {"hpcdl sweep best digits-slurm"}


def premise(page: str, block: Block, user: User) -> None:
    """What a page takes for granted of the user's folder: jobs.md (and train.md's elastic
    example) submit or render the user's own `python train.py` (and `eval.py`), from a git
    repository where it snapshots with git."""
    if "python train.py" in block.body and not (user.cwd / "train.py").exists():
        for script in ("train.py", "eval.py"):
            (user.cwd / script).write_text("import sys\nprint('training', sys.argv[1:])\n")
    if "--snapshot git" in block.body and not (user.cwd / ".git").exists():
        user.run(
            "git init -q && git add train.py eval.py configs && "
            "git -c user.name=u -c user.email=u@example.org commit -qm code"
        )


def walk(page: str, user: User, slurm: bool) -> Walk:
    w = Walk(page, user, slurm)
    todo = [b for b in blocks(page) if b.typed and b.slurm == slurm]
    assert todo, f"docs/{page}.md has no {'cluster' if slurm else 'local'} block to walk"
    if not todo[0].body.startswith("hpcdl init work && cd work"):
        user.run("hpcdl init work && cd work")  # where every page starts
    for block in todo:
        premise(page, block, user)
        w.type_block(block)
    w.skipped += [f"docs/{page}.md:{b.line}: {b.why}" for b in blocks(page) if b.mark == "skip"]
    return w


LOCAL_PAGES = [p for p in WALKED if any(b.typed and not b.slurm for b in blocks(p))]
SLURM_PAGES = [p for p in WALKED if any(b.typed and b.slurm for b in blocks(p))]


def test_every_walked_page_has_its_blocks_typed_or_skipped_with_a_reason():
    """A page's block is typed (by one of the two walks) or says why not: nothing is left out
    silently, and skips stay rare."""
    for page in WALKED:
        for b in blocks(page):
            if b.mark == "skip":
                assert b.why, f"docs/{page}.md:{b.line}: a skip says why"
    skips = sum(b.mark == "skip" for p in WALKED for b in blocks(p))
    typed = sum(b.typed for p in WALKED for b in blocks(p))
    assert skips < typed / 2, (skips, typed)
    typed_lines = {c for p in WALKED for b in blocks(p) if b.typed
                   for c, _, _ in lines_with_comments(b.body)}  # fmt: skip
    special = {*EXPECTED_ERRORS, *WHEN_FINISHED, *RETRIED}
    assert special <= typed_lines, special - typed_lines  # a page's line changed: follow it


@pytest.mark.parametrize("page", LOCAL_PAGES)
def test_docs_walk_local(page, tmp_path):
    started = time.monotonic()
    w = walk(page, User(tmp_path / "home"), slurm=False)
    if page == "getting-started":
        assert w.jobs, "the page submits a job"
        # docs/sweeps.md: the status of the page's sweep at 80 columns
        status = fenced(DOCS / "sweeps.md", "## Status at 80 columns").splitlines()
        assert status[0].startswith("$ COLUMNS=80 hpcdl sweep status "), status[0]
        out = w.user.run(status[0].removeprefix("$ "))
        _assert_status_shape(status[1:], out, w.user.home)
    print(
        f"walk {page}: {w.typed} commands, {time.monotonic() - started:.1f} s; not typed: {w.skipped}"
    )


@pytest.mark.slurm
@pytest.mark.parametrize("page", SLURM_PAGES)
def test_docs_walk_on_the_cluster(page, devcluster, tmp_path):
    started = time.monotonic()
    user = User(tmp_path / "home")
    try:
        w = walk(page, user, slurm=True)
    finally:
        _cancel_everything(user)
    print(f"walk {page} (cluster): {w.typed} commands, {time.monotonic() - started:.1f} s")


def _cancel_everything(user: User, timeout: float = 90) -> None:
    """Cancel every job the walk's user submitted (the registry lists them all, sweeps' included)
    and wait until Slurm no longer lists them; a timeout fails with what is left and its logs."""
    home = user.home
    sweeps = home / ".hpcdl/jobs/sweeps"
    for folder in sorted(sweeps.glob("*")) if sweeps.is_dir() else []:
        subprocess.run(
            [f"{BIN}/hpcdl", "sweep", "cancel", folder.name],
            env=user.env,
            capture_output=True,
            timeout=60,
        )
    registry = home / ".hpcdl/jobs/registry.jsonl"
    ids, folders = [], []
    for line in registry.read_text().splitlines() if registry.exists() else []:
        entry = json.loads(line)
        if entry.get("scheduler") == "slurm":
            ids += [entry["job_id"], *(entry.get("parts") or [])]
            folders.append(entry["folder"])
    if not ids:
        return
    deadline, tries = time.monotonic() + timeout, 0
    while tries == 0 or (left := _squeue([str(i) for i in ids])):
        if tries % 10 == 0:  # again now and then: a trial cancelled mid-checkpoint may requeue
            subprocess.run(["scancel", *map(str, ids)], capture_output=True, timeout=30)
        tries += 1
        if time.monotonic() > deadline:
            logs = "".join(
                f"--- {p}\n{p.read_text(errors='replace')[-2000:]}"
                for f in folders
                for p in Path(f).glob("*_log.*")
            )
            pytest.fail(f"the walk's jobs are still queued after scancel:\n{left}\n{logs}")
        time.sleep(1)


def _wait_for_hello(user: User, job_id: str, timeout: float = 60) -> None:
    """The page's `hpcdl logs JOB_ID` right after submitting may come before the job ran: a user
    types it again, so the test does, until the job's output is there."""
    deadline = time.monotonic() + timeout
    while "hello" not in (out := user.run(f"hpcdl logs {job_id}")):
        assert time.monotonic() < deadline, f"job {job_id} never said hello:\n{out}"
        time.sleep(0.5)


def _assert_status_shape(sample: list[str], output: str, home: Path) -> None:
    """Table rows vary from run to run (the trials drawn, which are pruned, the column blocks
    the widths give): the sample's headers must name the same columns, its legend the same
    parameters, and each of its other lines must have a line of the same shape."""

    def legend(lines: list[str]) -> list[str]:  # 'parameters: a = x.a, ...' and its wraps
        at = next(i for i, ln in enumerate(lines) if ln.startswith("parameters:"))
        end = next((i for i in range(at + 1, len(lines)) if not lines[i].startswith("  ")), None)
        return lines[at:end]

    def columns(lines: list[str]) -> tuple[list[str], set[str], set[str]]:
        headers = [ln.split() for ln in lines if ln.startswith("slot ")]
        pairs = set(re.findall(r"(\w+) = ([\w.]+)", " ".join(legend(lines))))
        return headers[0][:6], {c for h in headers for c in h}, pairs

    lines = output.splitlines()
    assert columns(lines) == columns(sample), output
    other = [
        ln
        for ln in sample
        if ln.strip()
        and ln != "..."
        and ln not in legend(sample)
        and not ln.startswith("slot ")
        and not re.match(r"\d+\s", ln)  # a row of a table
    ]
    assert other, sample
    assert_has_shape(other, output, home, "sweep status")
    rows = [ln for ln in lines if re.match(r"\d+\s+\d+\s+(complete|pruned|failed)\s", ln)]
    assert len(rows) == 16, output  # one row per trial of the 16


@pytest.mark.slurm
def test_getting_started_on_the_cluster_takes_the_profile_and_a_new_name(devcluster, tmp_path):
    """The page's cluster line: the same sweep with resources.site=NAME name=digits-cluster."""
    page = (DOCS / "getting-started.md").read_text()
    found = re.search(r"`(hpcdl sweep run \S+ resources\.site=NAME name=digits-cluster)`", page)
    assert found, "getting-started no longer shows the cluster line this test runs"
    user = User(tmp_path / "home")
    user.run("hpcdl init work && cd work")
    out = user.run(found.group(1).replace("NAME", devcluster))
    queued = re.findall(r"sweep-digits-cluster: array of \d+ (\d+)", out)
    try:
        assert queued, out
        status = user.run("hpcdl sweep status digits-cluster")
        assert status.startswith("sweep digits-cluster (devcluster): 16 trials"), status
    finally:  # the walk proves the page's line is accepted; the sweep itself is tested elsewhere
        user.run("hpcdl sweep cancel digits-cluster")
    deadline = time.monotonic() + 60
    try:
        while left := _squeue(queued):
            assert time.monotonic() < deadline, (
                f"the cancelled sweep's jobs are still queued:\n{left}"
            )
            time.sleep(1)
    finally:  # what `sweep cancel` left (a trial that requeued itself) is not left to others
        subprocess.run(["scancel", *queued], capture_output=True, timeout=30)


def _squeue(job_ids: list[str]) -> str:
    """What squeue still lists of these jobs (their follow-up jobs are cancelled with them)."""
    return subprocess.run(
        ["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %j %T"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()

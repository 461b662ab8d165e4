"""Every value that reaches a batch script: refused with one line, or carried verbatim.

Generated strings (newlines, ``#SBATCH``, quotes, ``$()``, NUL, control and non-ASCII characters)
go into every field of ``Job`` that is written into the script, into a training config's ``job:``
and a sweep's ``resources:`` (the same types), and through the CLI. For each value: refused with a
one-line error, or the script parses (``bash -n``), its directive block holds exactly the
intended ``#SBATCH`` options, and the field's option carries the value. The cluster test submits
accepted free-text values held and reads them back from Slurm.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from hpcdl import Job
from hpcdl.cli import main as cli_main
from hpcdl.config import validation_error
from hpcdl.errors import ConfigError
from hpcdl.hpo.spec import Resources as SweepResources
from hpcdl.script_values import chain_local_setup, check_setup_line
from hpcdl.site import load_site
from hpcdl.train.config import JobConfig

PIECES = [
    "\n", "\r", "\r\n", "\x00", "\t", "\x0b", "\x1b", "\x7f", "\x85", "\u2028", "\u2029",
    "#SBATCH --partition=high", "#SBATCH", "#", "'", '"', "$(touch /tmp/pwned-hpcdl)", "`id`",
    "${HOME}", "\\", " ", ";", "&&", "|", ">", "*", "=", ",", ":", "-", "_", ".", "[", "]",
    "é", "日本", "\U0001f600", "a", "Z", "0", "7", "node1", "node[1-2]", "intel", "amd&ib",
    "cpu", "high", "now+1hour", "12:30", "acct", "user@example.org", "END,FAIL", "closest",
    "a100:1", "2G", "10", "00:10:00", "echo ok",
]  # fmt: skip
VALUES = st.one_of(
    st.lists(st.sampled_from(PIECES), min_size=1, max_size=6).map("".join),
    st.text(min_size=1, max_size=12),
    st.text(alphabet=st.characters(max_codepoint=0x9F), min_size=1, max_size=12),
)
# field -> (the sbatch option it renders as, whether the option carries the value verbatim)
FIELDS: dict[str, tuple[str | None, bool]] = {
    "name": ("job-name", True),
    "partition": ("partition", True),
    "account": ("account", True),
    "qos": ("qos", True),
    "constraint": ("constraint", True),
    "reservation": ("reservation", True),
    "exclude": ("exclude", True),
    "nodelist": ("nodelist", True),
    "mail_type": ("mail-type", False),  # upper-cased, spaces dropped
    "mail_user": ("mail-user", True),
    "begin": ("begin", False),  # surrounding spaces dropped
    "comment": ("comment", True),
    "time": ("time", False),  # minutes
    "mem": ("mem", False),  # MiB
    "gpus_per_task": ("gpus-per-task", True),
    "sbatch.licenses": ("licenses", True),
    "sbatch.wckey": ("wckey", True),
    "dependencies.0": ("dependency", False),  # afterok: added
    "setup.0": (None, True),  # a line of shell, never a directive
    "env.X": (None, True),  # the pickle or the job folder's direct_command.sh, never the script
    "cwd": (None, True),
    "container": (None, True),
}
EXAMPLES = 460  # x 22 fields: over 10,000 generated values


@pytest.fixture()
def site() -> Any:
    return load_site("devcluster")


def job_fields(field: str, value: str) -> dict[str, Any]:
    base: dict[str, Any] = {"site": "devcluster", "command": ["true"], "time": "10m"}
    head, _, key = field.partition(".")
    if head == "sbatch":
        base["sbatch"] = {key: value}
    elif head in ("setup", "dependencies"):
        base[head] = [value]
    elif head == "env":
        base["env"] = {key: value}
    else:
        base[field] = value
    return base


def directives(script: str) -> dict[str, str | bool]:
    """The options sbatch reads: ``#SBATCH`` lines up to the first line that is neither blank nor
    a comment, each split as sbatch splits it (quotes, then ``#`` starts a comment)."""
    found: dict[str, str | bool] = {}
    for line in script.splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        if not line.startswith("#SBATCH"):
            continue
        for token in sbatch_split(line[len("#SBATCH") :]):
            key, eq, value = token.removeprefix("--").partition("=")
            assert key not in found, f"--{key} twice in:\n{script}"
            found[key] = value if eq else True
    return found


def sbatch_split(text: str) -> list[str]:
    """A directive's arguments as sbatch's reader splits them (Slurm's ``_get_argument``): a
    backslash escapes the next character everywhere, even inside quotes; ``'`` and ``"`` quote;
    an unquoted ``#`` starts a comment; an unmatched quote is an error (sbatch refuses)."""
    args: list[str] = []
    i = 0
    while i < len(text):
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            break
        arg, quote, escaped = [], "", False
        while i < len(text) and (quote or not text[i].isspace()):
            ch = text[i]
            if escaped:
                arg.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif quote:
                if ch == quote:
                    quote = ""
                else:
                    arg.append(ch)
            elif ch in "'\"":
                quote = ch
            elif ch == "#":
                return args
            else:
                arg.append(ch)
            i += 1
        assert not quote, f"sbatch: unmatched {quote} in {text!r}"
        args.append("".join(arg))
    return args


def bash_parses(script: str) -> bool:
    return subprocess.run(["bash", "-n"], input=script.encode(), timeout=10).returncode == 0


def one_line_message(exc: ValidationError | ConfigError) -> str:
    text = str(validation_error(exc, "job") if isinstance(exc, ValidationError) else exc)
    assert "\n" not in text and "\r" not in text, text
    return text


def render_or_refuse(field: str, value: str, site: Any) -> str | None:
    """The rendered script, or None when the value was refused with a one-line error."""
    try:
        job = Job(**job_fields(field, value))
        return job.render(site)
    except (ValidationError, ConfigError) as exc:
        one_line_message(exc)
        return None


@pytest.fixture()
def baseline(site: Any) -> dict[str, str | bool]:
    return directives(Job(**job_fields("env.X", "plain")).render(site))


@pytest.mark.parametrize("field", FIELDS)
def test_every_value_is_refused_or_carried_verbatim(field: str, site: Any, baseline: dict) -> None:
    option, verbatim = FIELDS[field]
    seen = {"accepted": 0}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(value=VALUES)
    def check(value: str) -> None:
        script = render_or_refuse(field, value, site)
        if script is None:
            return
        seen["accepted"] += 1
        assert bash_parses(script), script
        got = directives(script)
        expected_keys = set(baseline) | ({option} if option else set())
        assert set(got) == expected_keys, (value, script)
        for key in baseline.keys() - {option}:
            if key not in ("job-name", "time"):
                assert got[key] == baseline[key], (key, value, script)
        if option and verbatim:
            assert got[option] == value, (value, script)
        if field == "setup.0":
            assert value in script.splitlines()

    check()
    if field in ("comment", "setup.0", "env.X", "name", "sbatch.licenses"):
        assert seen["accepted"] > 0, (
            "the generator found no acceptable value: the test says nothing"
        )


@settings(max_examples=300, deadline=None, derandomize=True)
@given(field=st.sampled_from(["account", "qos", "partition", "comment", "reservation", "setup"]),
       value=VALUES)  # fmt: skip
def test_train_job_and_sweep_resources_take_the_same_rule(field: str, value: str) -> None:
    """A training config's ``job:`` and a sweep's ``resources:`` accept exactly what ``Job``
    accepts (same types), so they render through the same checked path."""
    data = {field: [value] if field == "setup" else value}
    outcomes = []
    for model in (Job, JobConfig, SweepResources):
        try:
            extra = {"command": ["true"]} if model is Job else {}
            model.model_validate({**data, **extra})
            outcomes.append(True)
        except ValidationError as exc:
            one_line_message(exc)
            outcomes.append(False)
    if field == "setup":  # a sweep's resources have no setup
        outcomes = outcomes[:2]
    assert len(set(outcomes)) == 1, (field, value, outcomes)


CLI_FLAGS = {
    "--account": "account", "--qos": "qos", "--comment": "comment", "--constraint": "constraint",
    "--reservation": "reservation", "-J": "job-name", "--mail-user": "mail-user",
    "--exclude": "exclude", "--setup": None, "--sbatch": "licenses",
}  # fmt: skip


@settings(max_examples=600, deadline=None, derandomize=True)
@given(flag=st.sampled_from(sorted(CLI_FLAGS)), value=VALUES)
def test_the_cli_refuses_with_one_line_or_renders_the_value(flag: str, value: str) -> None:
    if "\x00" in value:  # no argv can carry a NUL: the OS refuses it before hpcdl sees it
        return
    arg = f"licenses={value}" if flag == "--sbatch" else value
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(["render", "--site", "devcluster", "-t", "10m", flag, arg, "--", "true"])
    script = out.getvalue()
    if rc != 0:
        assert rc == 2 and not script, (rc, script, err.getvalue())
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err.getvalue()
        return
    assert bash_parses(script), script
    option = CLI_FLAGS[flag]
    if option is not None:
        assert directives(script)[option] == value, script
    else:
        assert value in script.splitlines()


@pytest.mark.parametrize(
    ("line", "ok"),
    [
        ("module load cuda # the site's", True),
        ("echo $'it\\'s'", True),
        ("#SBATCH --partition=high", False),
        ("  #sbatch -p high", False),
        ("echo a \\", False),
        ("echo a \\\\", True),
        ("echo 'unclosed", False),
        ("echo a\nb", False),
    ],
)
def test_setup_lines(line: str, ok: bool) -> None:
    if ok:
        assert check_setup_line(line) == line
    else:
        with pytest.raises(ValueError):
            check_setup_line(line)


def test_a_comment_in_a_local_setup_line_comments_out_only_that_line(tmp_path) -> None:
    """submitit's local executor joins setup lines and the program with ``&&``: a trailing
    ``# note`` used to comment out the rest of the chain, so the job never ran."""
    chain = " && ".join([*chain_local_setup(["export A=1 # note", "B=2 # more"]), "echo $A$B"])
    out = subprocess.run(["sh", "-c", chain], capture_output=True, text=True, timeout=10)
    assert out.stdout == "12\n", out  # both lines ran, and so did the program


@pytest.mark.slurm
def test_accepted_values_reach_slurm_verbatim(devcluster, site: Any) -> None:
    """Held submissions of generated names and comments: what Slurm queued is what was given."""
    accepted: list[tuple[str, str, str]] = []

    @settings(max_examples=120, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(field=st.sampled_from(["name", "comment"]), value=VALUES)
    def submit(field: str, value: str) -> None:
        try:
            job = Job(**job_fields(field, value), sbatch={"hold": True})
        except ValidationError:
            return
        handle = job.submit(site)
        accepted.append((handle.job_id, field, value))

    try:
        submit()
        assert len(accepted) >= 20, accepted
        ids = ",".join(job_id for job_id, _, _ in accepted)
        out = subprocess.run(["squeue", "--json", "-j", ids], capture_output=True, timeout=60,
                             check=True).stdout  # fmt: skip
        queued = {str(j["job_id"]): j for j in json.loads(out.decode("utf-8"))["jobs"]}
        for job_id, field, value in accepted:
            got = queued[job_id]["name" if field == "name" else "comment"]
            assert got == value, (job_id, field, value, got)
    finally:
        if accepted:
            ids = [job_id for job_id, _, _ in accepted]
            subprocess.run(["scancel", *ids], timeout=60, check=False)


@pytest.mark.slurm
def test_an_array_reaches_slurm_as_a_single_job_does(devcluster, site: Any) -> None:
    """submitit submits an array through a plain executor of its own: the array must keep
    hpcdl's quoting of directives (a backslash reached Slurm as nothing) and the interpreter
    line the job chose (a container's, for a callable)."""
    value = "a\\b \\' c\\"
    ids = []
    try:
        for array in (None, 2):
            job = Job(command=["true"], comment=value, array=array, sbatch={"hold": True})
            handle = job.submit(site)
            ids.append(handle.job_id)
            script = Path(handle.script or "").read_text()
            assert directives(script)["comment"] == value, script
        out = subprocess.run(["squeue", "--json", "-j", ",".join(ids)], capture_output=True,
                             timeout=60, check=True).stdout  # fmt: skip
        jobs = json.loads(out.decode("utf-8"))["jobs"]  # squeue --json may list other jobs too
        ours = [j for j in jobs if {str(j["job_id"]), str(j.get("array_job_id"))} & set(ids)]
        assert len(ours) >= 2 and {j["comment"] for j in ours} == {value}, ours
    finally:
        subprocess.run(["scancel", *ids], timeout=60, check=False)


def test_an_array_keeps_the_interpreter_its_job_chose(tmp_path, monkeypatch) -> None:
    """The executor submitit makes for an array is hpcdl's, with the same interpreter line."""
    from hpcdl.scheduler.slurm import _executor_class

    executor_class = _executor_class()
    ex = executor_class(folder=tmp_path, python="/opt/inside/python")
    made = []

    def record(self: Any, command: str) -> Any:
        made.append((type(self), self.python, self._make_submission_file_text(command, "x")))
        raise RuntimeError("stop before sbatch")

    monkeypatch.setattr(executor_class, "_submit_command", record)
    ex.update_parameters(time=5, comment="a\\b")
    with pytest.raises(RuntimeError, match="stop before sbatch"), ex.batch():
        for _ in range(2):
            ex.submit(print, "x")
    (kind, python, text) = made[0]
    assert kind is executor_class and python == "/opt/inside/python"
    assert "--comment='a\\\\b'" in text, text  # doubled for sbatch's reader


def test_injection_from_the_issue_is_refused() -> None:
    """The exact command of the report (issue 19, finding 1) and trailing newlines (finding 2),
    through the installed command: exit 2, one ``error:`` line naming the field, no script."""
    from conftest import run_cli

    for field, args in (
        ("account", ["--account", "acct\n#SBATCH --partition=high\necho injected #"]),
        ("comment", ["--comment", "hi\n"]),
        ("constraint", ["--constraint", "intel\n"]),
        ("sbatch", ["--sbatch", "licenses=a\n"]),
        ("qos", ["--qos", "normal\n"]),
    ):
        proc = run_cli("render", "--site", "devcluster", "-t", "10m", *args, "--", "true")
        assert proc.returncode == 2, proc
        assert proc.stdout == "" and "Traceback" not in proc.stderr, proc
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: command line: {field}"), lines


def test_a_local_job_whose_setup_line_ends_in_a_comment_runs(tmp_path) -> None:
    """Issue 19, finding 10: on the local profile ``echo x # note`` used to comment out the rest
    of the ``&&`` chain; the job never ran and was reported FAILED."""
    out = tmp_path / "ran"
    job = Job(site="local", time="5m", setup=["export HPCDL_T=ok # the site's note"],
              command=["sh", "-c", f'echo "$HPCDL_T" > {out}'])  # fmt: skip
    handle = job.submit()
    assert handle.wait(timeout=120) == "COMPLETED", handle.log_paths()[1].read_text()
    assert out.read_text() == "ok\n"


def test_status_shows_a_name_that_looks_like_markup(capsys) -> None:
    """Issue 19, finding 10: a job named ``x[/x]`` crashed ``hpcdl status`` (rich markup)."""
    for name in ("x[/x]", "[bold]y", "[/]"):
        handle = Job(site="local", time="5m", name=name, command=["true"]).submit()
        assert handle.wait(timeout=120) == "COMPLETED"
    capsys.readouterr()
    assert cli_main(["status"]) == 0
    assert cli_main(["status", handle.job_id]) == 0
    out = capsys.readouterr().out
    assert "x[/x]" in out and "[bold]y" in out and "[/]" in out, out

"""`hpcdl bench array`: an array of N tiny tasks as raw ``sbatch --array --wrap``, as an hpcdl
command array (run straight from its script) and as an hpcdl callable array, one after the other
on the same cluster; wall times side by side (Slurm side in hpcdl.scheduler.array_bench)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from hpcdl.cli.bench import _out_dir, bench
from hpcdl.cli.progress import spinner
from hpcdl.errors import ConfigError


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Environment variables set for the submissions inside (the job root, the opt-out)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@click.command("array")
@click.argument("n", type=int)
@click.option("--throttle", default=16, show_default=True, help="Tasks at once, every path.")
@click.option("--site", default="devcluster", show_default=True, help="A Slurm site profile.")
@click.option("--repeat", default=1, show_default=True, help="Rounds of every path (medians).")
@click.option("--timeout", default=900, show_default=True, help="Seconds per path at most.")
@click.option("--python-path", is_flag=True,
              help="Also the command array through submitit's runner (HPCDL_DIRECT_COMMANDS=0).")  # fmt: skip
@click.option("--out", help="Folder for the figures, jobs and logs [bench/array-STAMP].")
def array_cmd(n: int, throttle: int, site: str, repeat: int, timeout: int, python_path: bool,
              out: str | None) -> None:  # fmt: skip
    """N tiny tasks (python3 -c pass), THROTTLE at once: raw 'sbatch --array --wrap', hpcdl's
    command array, hpcdl's callable array; wall time from submission to the last task's end,
    and each path's speed relative to raw (1.00: Slurm's own)."""
    from hpcdl.job import Job
    from hpcdl.scheduler import array_bench as b
    from hpcdl.scheduler.direct import OPT_OUT
    from hpcdl.site import load_site

    profile = load_site(site)
    if profile.scheduler != "slurm":
        raise ConfigError("--site", "site", f"{site!r} is not a Slurm site")
    limit = profile.max_array_size or n
    if not 1 <= n <= limit or throttle < 1 or repeat < 1:
        raise ConfigError("", "N/--throttle", f"need 1 <= N <= {limit} (one Slurm array) , throttle and repeat >= 1")  # fmt: skip
    folder = _out_dir(out, "array")
    folder.mkdir(parents=True, exist_ok=True)
    base: dict[str, Any] = {"site": site, "array": n, "throttle": throttle, "time": "10m"}

    def hpcdl_path(**fields: Any) -> Callable[[], list[str]]:
        def submit() -> list[str]:
            handle = Job(**base, **fields).submit(profile)
            return [p.job_id for p in handle.parts] or [handle.job_id]

        return submit

    def raw() -> list[str]:
        return [b.submit_raw(profile, n, throttle, folder / "raw")]

    command = hpcdl_path(name="bench-command", command=b.COMMAND)
    callable_ = hpcdl_path(name="bench-callable", function=b.tiny_task)
    paths: list[tuple[str, Callable[[], list[str]], dict[str, str]]] = [
        ("raw sbatch --array --wrap", raw, {}),
        ("hpcdl command (from its script)", command, {}),
        ("hpcdl callable", callable_, {}),
    ]
    if python_path:
        paths.append(("hpcdl command (Python runner)",
                      hpcdl_path(name="bench-runner", command=b.COMMAND), {OPT_OUT: "0"}))  # fmt: skip
    runs: dict[str, list[b.PathResult]] = {label: [] for label, _, _ in paths}
    # the paths alternate, round after round: a neighbour's load on a shared cluster falls on
    # every path alike, and each path's median is reported
    with _environ(HPCDL_JOB_ROOT=str(folder / "jobs")):
        for k in range(repeat):
            for label, submit, env in paths:
                with spinner(f"round {k + 1}/{repeat}: {label}: {n} tasks"), _environ(**env):
                    start = time.monotonic()
                    ids = submit()
                    submitted = time.monotonic() - start
                    once = b.wait_tasks(ids, n, timeout)
                    wall = time.monotonic() - start
                runs[label].append(b.PathResult(label, ids, wall, n, once, submitted))
    results = [b.median_run(rs) for rs in runs.values()]
    for r in results:
        r.ratio = results[0].wall_s / r.wall_s if r.wall_s > 0 else 0.0
    figures = {"n": n, "throttle": throttle, "site": site, "repeat": repeat,
               "paths": [r.as_dict() for r in results],
               "runs": [r.as_dict() for rs in runs.values() for r in rs]}  # fmt: skip
    (folder / "bench_array.json").write_text(json.dumps(figures, indent=1))
    click.echo("\n".join(b.render(results, n, throttle, site, repeat)))
    click.echo(f"figures: {Path(folder) / 'bench_array.json'}")


def register(cli: click.Group) -> None:
    """Add ``bench array`` to the ``bench`` group (its own module: bench.py is full)."""
    bench.add_command(array_cmd)

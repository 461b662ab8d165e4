"""Progress bars and spinners for long commands: on stderr, and only when stderr is a terminal.

Library code reports progress through an ``on_progress(done, total)`` callback and never
prints; the commands turn it into a bar here. Off a terminal (logs, pipes, tests) nothing is
drawn, so the output stays exactly what it was, except for work that runs for many minutes
(``bar(..., lines_every_s=...)``): there a plain ``hpcdl: LABEL: DONE/TOTAL after ...`` line goes
to stderr now and then, so a batch job's log shows that it moves. ``HPCDL_NO_PROGRESS=1`` turns
bars and lines off; ``HPCDL_FORCE_PROGRESS=1`` draws bars even off a terminal (for tests).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

FORCE_ENV = "HPCDL_FORCE_PROGRESS"
OFF_ENV = "HPCDL_NO_PROGRESS"

OnProgress = Callable[[int, int], None]


def _console() -> Any:
    """The stderr console, or None when no bar should be drawn."""
    from rich.console import Console

    if _off():
        return None
    forced = os.environ.get(FORCE_ENV, "") not in ("", "0")
    console = Console(stderr=True, force_terminal=True if forced else None)
    return console if console.is_terminal else None


def _progress(console: Any, columns: list[Any], transient: bool) -> Any:
    from rich.progress import Progress

    # stdout lines go above the bar only when stdout is the same kind of terminal; a piped
    # stdout must keep its lines (rich would otherwise send them to the stderr console)
    return Progress(
        *columns,
        console=console,
        transient=transient,
        redirect_stdout=sys.stdout.isatty(),
    )


def _off() -> bool:
    return os.environ.get(OFF_ENV, "") not in ("", "0")


def _lines(label: str, every_s: float) -> OnProgress:
    """``on_progress`` that prints a plain line on stderr at most every ``every_s`` seconds,
    and at the end."""
    start, last = time.monotonic(), [-float("inf")]

    def update(done: int, total: int) -> None:
        now = time.monotonic()
        if (now - last[0] >= every_s and done) or (total and done >= total):
            last[0] = now
            print(f"hpcdl: {label}: {done}/{total} after {now - start:.0f} s", file=sys.stderr,
                  flush=True)  # fmt: skip

    return update


@contextmanager
def bar(
    label: str, *, unit: str = "items", lines_every_s: float | None = None
) -> Iterator[OnProgress | None]:
    """Yield an ``on_progress(done, total)`` that draws a bar (``unit`` "bytes" or "items").
    Off a terminal: plain lines every ``lines_every_s`` seconds when given, else None, so the
    library skips the reporting altogether."""
    console = _console()
    if console is None:
        yield _lines(label, lines_every_s) if lines_every_s is not None and not _off() else None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    count: list[Any] = (
        [DownloadColumn(binary_units=True), TransferSpeedColumn()]
        if unit == "bytes"
        else [MofNCompleteColumn()]
    )
    columns = [TextColumn("{task.description}"), BarColumn(), *count, TimeElapsedColumn(),
               TimeRemainingColumn()]  # fmt: skip
    with _progress(console, columns, transient=False) as progress:
        task = progress.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


@contextmanager
def spinner(label: str) -> Iterator[None]:
    """A spinner with the elapsed time while something without countable steps runs."""
    console = _console()
    if console is None:
        yield
        return
    from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = [SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()]
    with _progress(console, columns, transient=True) as progress:
        progress.add_task(label, total=None)
        yield

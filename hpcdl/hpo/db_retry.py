"""Whether a worker retries connecting to the study's database, and how long it waits.

Measured on the dev cluster's 64-node instance (``hpcdl bench hpo --storage postgres
--workers 256``): 256 workers starting within seconds of each other on a loaded machine each
open a connection with SCRAM authentication at once; 77 of the 256 hit libpq's connect
timeout and died with a traceback, and the sweep ran on 179 workers without a word. A site's
database meets the same storm when a large array starts, or restarts under a running sweep.

A worker therefore retries what passes (a timeout, a refused or dropped connection, "too many
clients", a server starting up or shutting down) with exponential back-off and full jitter,
so a storm spreads out instead of repeating itself, until a deadline; what will not pass (a
wrong password, a missing role or database) fails at once, as ``sweep run``'s own check does.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

#: Messages (libpq's and the server's, lower case) of connection failures that pass by
#: themselves. psycopg gives connection-phase errors no SQLSTATE, so the text is what there is.
TRANSIENT_TEXT = (
    "timeout expired",
    "connection refused",
    "could not connect",
    "server closed the connection unexpectedly",
    "terminating connection",
    "too many clients",
    "remaining connection slots are reserved",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "no route to host",
    "temporarily unavailable",
)

#: SQLSTATEs that pass: 08 connection exceptions, 53300 too many connections, 57P01-57P03
#: admin/crash shutdown and cannot-connect-now.
TRANSIENT_SQLSTATE = ("08", "53300", "57P01", "57P02", "57P03")

FIRST_DELAY_S = 0.5
MAX_DELAY_S = 20.0


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what caused it: Optuna's StorageInternalError wraps SQLAlchemy's
    OperationalError, which holds the driver's error as ``orig``."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        cur = todo.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        orig = getattr(cur, "orig", None)
        todo += [cur.__cause__, cur.__context__, orig if isinstance(orig, BaseException) else None]


def root_cause(exc: BaseException) -> BaseException:
    """The driver's own error behind Optuna's and SQLAlchemy's wrappers (for the log: Optuna's
    "An exception is raised during the commit" says nothing of a connect timeout)."""
    cur = exc
    while True:
        nxt = getattr(cur, "orig", None) or cur.__cause__ or cur.__context__
        if not isinstance(nxt, BaseException) or nxt is cur:
            return cur
        cur = nxt


def transient(exc: BaseException) -> bool:
    """True if ``exc`` (or what caused it) is a connection failure that may pass by itself."""
    for cur in _chain(exc):
        state = getattr(cur, "sqlstate", None)
        if isinstance(state, str) and state.startswith(TRANSIENT_SQLSTATE):
            return True
        if type(cur).__name__ == "ConnectionTimeout":
            return True
        text = str(cur).lower()
        if any(t in text for t in TRANSIENT_TEXT):
            return True
    return False


def delays(
    rng: random.Random, first: float = FIRST_DELAY_S, cap: float = MAX_DELAY_S
) -> Iterator[float]:
    """Waits between attempts: full jitter over an exponentially growing window (AWS's
    "exponential backoff and jitter"), so workers that failed together do not retry together."""
    window = first
    while True:
        yield rng.uniform(0.0, window)
        window = min(cap, window * 2)

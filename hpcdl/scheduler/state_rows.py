"""sacct's and squeue's ``JOBID|STATE|REASON`` rows into task states (pure functions): sacct
first (it knows finished jobs), then squeue for what sacct states only as it last saw it."""

from __future__ import annotations

from hpcdl.scheduler.interface import TaskStatus
from hpcdl.scheduler.states import expand_array_id, normalize_state

ASK_SQUEUE = ("PENDING", "REQUEUED")  # sacct states whose live form squeue knows better


def parse_state_rows(text: str, found: dict[str, TaskStatus], overwrite: bool) -> None:
    """``JOBID|STATE|REASON`` lines (sacct -P, squeue -o) into ``found``."""
    for line in text.splitlines():
        jid, _, rest = line.partition("|")
        state, _, reason = rest.partition("|")
        state = normalize_state(state)
        status = TaskStatus(state, _reason(reason) if state == "PENDING" else "")
        for tid in expand_array_id(jid):
            if overwrite or tid not in found or found[tid].state in ASK_SQUEUE:
                found[tid] = status


def _reason(raw: str) -> str:
    raw = raw.strip()
    return "" if raw in {"", "None", "(null)"} else raw


def settle_requeued(found: dict[str, TaskStatus], squeue_rows: str) -> None:
    """A task sacct still shows REQUEUED that squeue no longer lists has left the queue without
    starting again: it was cancelled while pending, and sacct keeps the requeue record (seen in
    chaos seed 4: a requeued task scancelled while it waited kept a finished sweep "queued", and
    a sweep with missing trials "live", for ever). ``squeue_rows``: squeue's answer for every job
    of those tasks."""
    listed = {tid for line in squeue_rows.splitlines() if line.strip()
              for tid in expand_array_id(line.partition("|")[0])}  # fmt: skip
    for tid, status in found.items():
        if status.state == "REQUEUED" and tid not in listed:
            found[tid] = TaskStatus("CANCELLED")

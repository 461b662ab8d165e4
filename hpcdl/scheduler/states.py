"""Job states: the scheduler's many spellings mapped onto one small set (pure functions)."""

from __future__ import annotations

import re

STATES = (
    "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
    "PREEMPTED", "OUT_OF_MEMORY", "NODE_FAIL", "REQUEUED", "SUSPENDED", "UNKNOWN",
)  # fmt: skip
FINISHED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"})
# Slurm's transitional and rare states, folded into the state a user acts on.
_ALIASES = {
    "CONFIGURING": "PENDING", "REQUEUE_HOLD": "PENDING", "REQUEUE_FED": "PENDING",
    "RESV_DEL_HOLD": "PENDING", "COMPLETING": "RUNNING", "STAGE_OUT": "RUNNING",
    "SIGNALING": "RUNNING", "RESIZING": "RUNNING", "BOOT_FAIL": "NODE_FAIL",
    "DEADLINE": "TIMEOUT", "REVOKED": "CANCELLED", "SPECIAL_EXIT": "FAILED", "STOPPED": "SUSPENDED",
}  # fmt: skip
# Unfinished states first (a job with one running task is running), then the worst outcome.
_SUMMARY_ORDER = (
    "RUNNING", "PENDING", "REQUEUED", "SUSPENDED", "PREEMPTED", "UNKNOWN",
    "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT", "FAILED", "CANCELLED",
)  # fmt: skip
_ARRAY_ID = re.compile(r"^(\d+)_\[([^\]]*)\]\Z")
_RANGE = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+))?)?\Z")


def normalize_state(raw: str) -> str:
    """sacct/squeue state (``CANCELLED by 0``, ``OUT_OF_ME+``, ``running``) → one of
    :data:`STATES`; anything unrecognised (empty, garbage) is ``UNKNOWN``."""
    words = str(raw).strip().split()
    if not words:
        return "UNKNOWN"
    word = words[0].rstrip("+").upper()
    if word.startswith("OUT_OF_ME"):  # sacct truncates to its column width
        return "OUT_OF_MEMORY"
    word = _ALIASES.get(word, word)
    return word if word in STATES else "UNKNOWN"


def expand_array_id(jid: str) -> list[str]:
    """``123_[1-3,7%2]`` → ``123_1 123_2 123_3 123_7`` (``%N`` throttles and ``:step`` steps are
    understood); plain ids (``123``, ``123_4``, ``123_*``) come back unchanged, and so does a
    bracket spec that cannot be read (a reversed range, a non-number): a state query must not
    crash on one odd line."""
    jid = jid.strip()
    m = _ARRAY_ID.match(jid)
    if not m:
        return [jid]
    base, spec = m[1], m[2].split("%")[0]
    ids: list[str] = []
    for part in spec.split(","):
        r = _RANGE.match(part.strip())
        if not r:
            return [jid]
        lo, hi, step = int(r[1]), int(r[2] or r[1]), int(r[3] or 1)
        if hi < lo or step < 1:
            return [jid]
        ids += [f"{base}_{i}" for i in range(lo, hi + 1, step)]
    return ids


def summarize(states: dict[str, str]) -> str:
    """One state for a job: any unfinished task wins, then the worst outcome; ``UNKNOWN`` for no
    tasks (or only states outside :data:`STATES`)."""
    values = set(states.values())
    for state in _SUMMARY_ORDER:
        if state in values:
            return state
    return "COMPLETED" if "COMPLETED" in values else "UNKNOWN"

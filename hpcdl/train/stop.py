"""How a caller ends a training early: raise :class:`StopTraining` from the ``on_epoch`` callback.

The callback runs on every rank with the same (all-reduced) metrics, so a decision taken from
them is the same everywhere and every rank raises at the same epoch. The trainer logs a
``stopped`` event, adds the exception's ``tag`` (e.g. ``pruned``) to the W&B run, closes its
metrics and re-raises: the caller catches it and decides what the early end means.
"""

from __future__ import annotations


class StopTraining(Exception):
    """End the training after this epoch's validation on all ranks; ``tag`` labels the W&B run
    (``None``: the generic ``stopped``)."""

    def __init__(self, message: str = "", tag: str | None = None, checkpoint: bool = False):
        super().__init__(message)
        self.tag = tag
        self.checkpoint = checkpoint  # save this step first (a PBT boundary resumes from it)

    def __reduce__(self) -> tuple[type[StopTraining], tuple[str, str | None, bool]]:
        # Keyword-only state does not survive pickling by default (Exception pickles ``args``).
        return (type(self), (str(self), self.tag, self.checkpoint))


def stop_tag(exc: BaseException) -> str:
    """The W&B tag of a run that ``exc`` (raised by ``on_epoch``) ended."""
    if isinstance(exc, StopTraining):
        return exc.tag or "stopped"
    return "stopped"

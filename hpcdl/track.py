"""Metrics of a run: one line on the terminal, one JSON row in ``RUN/metrics.jsonl``, and W&B.

W&B is offline by default (the site profile decides, ``wandb_mode``), its run id is kept in the
run folder so a requeued job continues the same run, and it can never fail training: if wandb is
missing, misconfigured or unreachable, a warning goes to stderr (the job log) once and the run
goes on.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import secrets
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcdl.util import (
    append_jsonl,
    atomic_write_text,
    configure_logging,
    get_logger,
    read_jsonl,
)

logger = get_logger(__name__)
# W&B's service of the process that started this one (wandb exports WANDB_SERVICE to children).
# A run must not use it: on a cluster it is another host's (sbatch --export=ALL carries it to
# the compute nodes), and on one host it writes this run's files with the other process's
# umask and user. Captured at import, before this process starts a service of its own.
_INHERITED_SERVICE = os.environ.get("WANDB_SERVICE")


def rewind_jsonl(path: Path, step: int, epoch: int | None = None) -> None:
    """Drop rows a resumed run will log again: ``step`` rows after ``step``; ``epoch`` rows of
    epoch ``epoch`` (the checkpoint's current epoch, whose row the resumed run logs) and later.
    Without ``epoch``: ``epoch`` rows from ``step`` on. A checkpoint taken after its epoch's row
    (at the run's end) has the next epoch as current, so that row stays. Events stay."""
    if not path.is_file():
        return
    kept = []
    for row in read_jsonl(path):  # a line cut by a kill or a full disk is dropped (and said)
        kind, at = row.get("kind"), row.get("step", 0)
        if kind == "step" and at > step:
            continue
        if kind == "epoch" and (at >= step if epoch is None else row.get("epoch", 0) >= epoch):
            continue
        kept.append(row)
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in kept), fsync=True)


class Tracker:
    """Rank 0's metrics sink; on other ranks every method does nothing."""

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        config: dict[str, Any],
        name: str,
        wandb: bool,
        wandb_mode: str,
        wandb_project: str,
        wandb_group: str | None = None,
        wandb_id: str | None = None,
        wandb_tags: list[str] | None = None,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._open = False
        self._wandb: Any = None
        if not enabled:
            return
        # The metric lines below are the job's terminal output; its warnings belong there too.
        configure_logging(logging.WARNING)
        self._open = True
        if wandb and wandb_mode != "disabled":
            start = functools.partial(
                _start_wandb, Path(run_dir), redacted(config), name, wandb_mode, wandb_project,
                group=wandb_group, run_id=wandb_id, tags=wandb_tags or [],
            )  # fmt: skip
            self._wandb = _Beside(start)

    def log(self, kind: str, row: dict[str, Any], echo: bool = True) -> None:
        """Record one row (``kind``: step, epoch or event) everywhere."""
        if not self.enabled:
            return
        full = {"kind": kind, **row, "time": round(time.time(), 3)}
        assert self._open
        append_jsonl(self.path, full)  # one whole line per write, as every hpcdl journal
        if echo:
            print(_line(kind, row), flush=True)
        if self._wandb is not None and kind != "event":
            self._wandb.call(_log, {f"{kind}/{k}": v for k, v in row.items()})

    def summary(self, values: dict[str, Any]) -> None:
        if self._wandb is not None:
            self._wandb.call(_summary, dict(values))

    def tag(self, tag: str) -> None:
        """Add a tag to the W&B run (e.g. ``pruned``)."""
        if self._wandb is not None:
            self._wandb.call(_tag, tag)

    def close(self) -> None:
        """End the W&B run (waiting for what is queued for it) and stop logging."""
        self._open = False
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None


class _Beside:
    """The W&B run of a tracker, started by a thread of its own: importing wandb and starting
    its run take 2 s here (more than the trainer's set-up), and training need not wait for
    them (issue 25). Calls made meanwhile are queued, in order, for that thread; once it has
    made them it ends, and later calls are made by the caller, as before. Made by a second
    thread all run long, they slowed training sevenfold on 2 cores (97 s instead of 14 for
    the docs' digits run: the W&B thread woke at every step beside torch's busy-waiting
    OpenMP threads). :meth:`close` waits for what is queued and ends the run. Any W&B failure
    is a warning, once, after which the rest is dropped: W&B never fails training."""

    def __init__(self, start: Callable[[], Any]):
        self._calls: queue.SimpleQueue[tuple[Callable[..., None], Any] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._handed: bool = False  # the thread has ended and left the run to the caller
        self._run: Any = None
        self._thread = threading.Thread(target=self._serve, args=(start,), daemon=True,
                                        name="hpcdl-wandb")  # fmt: skip
        self._thread.start()

    def call(self, fn: Callable[[Any, Any], None], arg: Any) -> None:
        with self._lock:
            if not self._handed:
                self._calls.put((fn, arg))
                return
        self._run = _apply(self._run, fn, arg)

    def close(self, timeout: float = 300) -> None:
        with self._lock:
            handed = self._handed
            if not handed:
                self._calls.put(None)
        if handed:
            _finish(self._run)
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning(f"W&B did not finish within {timeout:.0f} s; its run may be cut short")

    def _serve(self, start: Callable[[], Any]) -> None:
        run = start()  # None (said in a warning) when W&B is missing or unreachable
        while True:
            with self._lock:
                try:
                    item = self._calls.get_nowait()
                except queue.Empty:  # all made: the caller makes the next ones itself
                    self._run, self._handed = run, True
                    return
            if item is None:  # closed before the run was handed over
                _finish(run)
                return
            run = _apply(run, *item)


def _apply(run: Any, fn: Callable[[Any, Any], None], arg: Any) -> Any:
    """``fn(run, arg)``; the run, or None once W&B failed (said once)."""
    if run is None:
        return None
    try:
        fn(run, arg)
    except Exception as exc:
        logger.warning(f"{_FAILED[fn.__name__]}: {exc}; W&B logging stopped")
        return None
    return run


def _finish(run: Any) -> None:
    if run is not None:
        try:
            run.finish()
        except Exception as exc:
            logger.warning(f"W&B finish failed: {exc}")


_FAILED = {"_log": "W&B logging failed", "_summary": "W&B summary not written",
           "_tag": "W&B tag not written"}  # fmt: skip


def _log(run: Any, data: dict[str, Any]) -> None:
    run.log(data)


def _summary(run: Any, values: dict[str, Any]) -> None:
    run.summary.update(values)


def _tag(run: Any, tag: str) -> None:
    run.tags = (*run.tags, tag)


REDACTED = "<redacted>"
_REDACTED_KEYS = ("env", "setup")  # a job's environment and shell lines (job.env, job.setup)


def redacted(config: Any) -> Any:
    """``config`` for W&B (whose run config is uploaded at sync, to a service outside the site):
    the values of every ``env`` mapping and ``setup`` list replaced by ``<redacted>`` (the
    variable names stay), at any depth. Whatever the job's checks let through, tokens in them
    never leave the cluster this way."""
    if isinstance(config, dict):
        out: dict[Any, Any] = {}
        for key, value in config.items():
            if key in _REDACTED_KEYS and isinstance(value, dict):
                out[key] = {k: REDACTED for k in value}
            elif key in _REDACTED_KEYS and isinstance(value, list | tuple):
                out[key] = [REDACTED] * len(value)
            elif key in _REDACTED_KEYS and isinstance(value, str):
                out[key] = REDACTED
            else:
                out[key] = redacted(value)
        return out
    if isinstance(config, list | tuple):
        return [redacted(v) for v in config]
    return config


def _line(kind: str, row: dict[str, Any]) -> str:
    parts = []
    for key, value in row.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{key} {value}")
    return f"[{kind}] " + "  ".join(parts)


def _start_wandb(
    run_dir: Path, config: dict[str, Any], name: str, mode: str, project: str,
    *, group: str | None, run_id: str | None, tags: list[str],
) -> Any:  # fmt: skip
    """A W&B run whose id lives in ``RUN/wandb_id`` (so requeues resume it), or None."""
    try:
        import wandb
    except ImportError:
        logger.warning("wandb is not installed: metrics go to metrics.jsonl only")
        return None
    if _INHERITED_SERVICE and os.environ.get("WANDB_SERVICE") == _INHERITED_SERVICE:
        del os.environ["WANDB_SERVICE"]  # start this process's own service
    _lean_wandb(wandb, mode)
    id_file = run_dir / "wandb_id"
    if not id_file.is_file():
        id_file.write_text(run_id or secrets.token_hex(8))
    try:
        run = wandb.init(
            project=project,
            name=name,
            id=id_file.read_text().strip(),
            resume="allow",
            dir=str(run_dir),
            mode=mode,  # type: ignore[arg-type]  # a site profile Literal, checked there
            config=config,
            group=group,
            tags=tags or None,
            # W&B lists the installed packages at every init (0.4 s of a 0.45 s start here);
            # a sweep worker starts many runs in one environment, so the list is made once
            settings=wandb.Settings(
                silent=True, console="off", init_timeout=60, x_save_requirements=False
            ),
        )
        _save_requirements(run)
        return run
    except Exception as exc:
        logger.warning(
            f"W&B unavailable ({type(exc).__name__}: {exc}); metrics go to metrics.jsonl only"
        )
        return None


def _lean_wandb(wandb: Any, mode: str) -> None:
    """Two parts of ``wandb.init`` an hpcdl run never uses, left out (issue 25: together 0.7-1.2 s
    of interpreter time at each run's start here, in the thread that shares the interpreter with
    the first training steps).

    - W&B's own telemetry: ``mode`` is the run's, while W&B's process-wide settings stay online,
      so an *offline* run's first ``log`` built OpenTelemetry exporters (0.2-0.5 s of imports,
      two threads) that report to api.wandb.ai every 60 s and at exit (a probe with a 10 s
      timeout first): a connection from the compute nodes an offline run must not make. The
      process-wide mode set to the run's (``wandb.setup``) is what W&B checks to leave them out.
    - ``wandb.sdk.launch.inputs.internal`` (0.5 s: it pulls in W&B's public API and artifacts),
      imported by every ``init`` to apply the inputs a W&B Launch job staged in this process.
      Only that module stages them, so while it is not imported there is nothing to apply.
    Neither may fail training: what this W&B version does not have is left as it is."""
    if mode == "offline":
        try:
            wandb.setup(settings=wandb.Settings(mode="offline"))
        except Exception as exc:  # an older or stubbed wandb: the telemetry stays as W&B has it
            logger.debug(f"wandb.setup(mode=offline) failed: {exc}")
    run_class: Any = getattr(getattr(getattr(wandb, "sdk", None), "wandb_run", None), "Run", None)
    applies = getattr(run_class, "_detect_and_apply_job_inputs", None)
    if run_class is None or applies is None or getattr(applies, "_hpcdl_lean", False):
        return

    @functools.wraps(applies)
    def apply_staged(run: Any) -> None:
        if _STAGED_INPUTS in sys.modules:  # something staged inputs: W&B applies them
            applies(run)

    apply_staged._hpcdl_lean = True  # type: ignore[attr-defined]
    run_class._detect_and_apply_job_inputs = apply_staged


_STAGED_INPUTS = "wandb.sdk.launch.inputs.internal"


@functools.cache
def _requirements() -> str:
    """``name==version`` of every installed distribution (what W&B itself would save)."""
    from importlib.metadata import distributions

    found = {(d.metadata["Name"] or "").strip(): d.version for d in distributions()}
    return "".join(f"{name}=={version}\n" for name, version in sorted(found.items()) if name)


def _save_requirements(run: Any) -> None:
    """``requirements.txt`` in the run's files, as W&B saves it (it syncs the folder)."""
    try:
        Path(run.dir, "requirements.txt").write_text(_requirements())
    except Exception as exc:  # never fails training
        logger.warning(f"could not save requirements.txt in the W&B run: {exc}")

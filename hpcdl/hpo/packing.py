"""Trial packing: one allocation (one array task on one node) runs several trials at once.

``trials_per_node: N`` (or ``trials_per_gpu: K``, N = K × ``resources.gpus_per_node``) makes
each warm worker fork N *lanes*. Each lane is one process that claims and runs trials as a warm
worker does (:func:`hpcdl.hpo.worker.work`), on its own slice of the allocation: its own
``CUDA_VISIBLE_DEVICES`` (from the GPUs Slurm gave the task), its own CPUs
(``os.sched_setaffinity``) and thread counts, and its own W&B run per trial (as every trial).

Claims stay what they were: every lane claims under the sweep lock, so a slot is claimed once.
A lane claims under its own name, ``TASK+LANE`` (:func:`claimant`): a requeued task's lanes
each resume the trial *they* were running; with the task's name alone, every lane would take the
first running slot of the task, and one trial would run twice while another waited.

The decisions (how the CPUs and GPUs are split, which specs are refused) are pure functions,
tested by tables in ``tests/unit/hpo/test_packing.py``; :func:`run_lanes` carries them out.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hpcdl.hpo.space import SpecProblem
from hpcdl.preemption import task_id
from hpcdl.util import get_logger

log = get_logger(__name__)

#: Set in a lane's process: its number within the task.
LANE_ENV = "HPCDL_PACK_LANE"


@dataclass(frozen=True)
class Lane:
    """One packed trial's share of the allocation."""

    index: int
    cpus: tuple[int, ...]  # CPU ids for os.sched_setaffinity (empty: leave as it is)
    threads: int  # OMP/MKL/torch intra-op threads
    gpus: tuple[str, ...]  # CUDA_VISIBLE_DEVICES entries (empty: no GPU)


# -- decisions (pure) ----------------------------------------------------------------------------
def lanes_of(trials_per_node: int | None, trials_per_gpu: int | None, gpus_per_node: int) -> int:
    """How many trials one allocation runs at once (1: no packing)."""
    if trials_per_node:
        return trials_per_node
    if trials_per_gpu:
        return trials_per_gpu * gpus_per_node
    return 1


def check_packing(
    trials_per_node: int | None,
    trials_per_gpu: int | None,
    trials_per_task: int | None,
    nodes: int | str,
    tasks_per_node: int | None,
    gpus_per_node: int,
    cpus_per_task: int,
) -> None:
    """Raise :class:`SpecProblem` (one field, what is allowed) for a packing the allocation
    cannot honour; nothing for a sweep that does not pack."""
    if trials_per_node and trials_per_gpu:
        raise SpecProblem("trials_per_gpu", "give trials_per_node or trials_per_gpu, not both")
    if trials_per_gpu and not gpus_per_node:
        raise SpecProblem("trials_per_gpu", "needs GPUs: set resources.gpus_per_node (or give "
                          "trials_per_node to pack trials on CPUs)")  # fmt: skip
    n = lanes_of(trials_per_node, trials_per_gpu, gpus_per_node)
    field = "trials_per_node" if trials_per_node else "trials_per_gpu"
    if n == 1:
        return
    if trials_per_task == 1:
        raise SpecProblem(field, "packed trials run in warm workers: leave trials_per_task out")
    if str(nodes) != "1":  # MIN-MAX too: an elastic worker may get several nodes
        raise SpecProblem("resources.nodes", f"{nodes}: a packed trial runs on one node; give "
                          "nodes: 1 (or leave packing out for multi-node trials)")  # fmt: skip
    if (tasks_per_node or gpus_per_node or 1) != 1:
        raise SpecProblem("resources.tasks_per_node", f"{tasks_per_node or gpus_per_node}: a "
                          "packed trial is one process; give tasks_per_node: 1 (with GPUs it "
                          "defaults to one task per GPU)")  # fmt: skip
    if gpus_per_node and gpus_per_node % n and n % gpus_per_node:
        raise SpecProblem(field, f"{n} trials cannot share resources.gpus_per_node "
                          f"{gpus_per_node} evenly: give a divisor of {gpus_per_node} "
                          "(each trial its own GPUs) or trials_per_gpu")  # fmt: skip
    if cpus_per_task < n:
        raise SpecProblem("resources.cpus_per_task", f"{cpus_per_task} CPU(s) for {n} packed "
                          f"trials: each needs one at least; give cpus_per_task >= {n}")  # fmt: skip


def split_cpus(cpus: Sequence[int], n: int) -> list[tuple[int, ...]]:
    """``cpus`` (the task's affinity) in ``n`` contiguous slices, the first ones one larger when
    they do not divide evenly. With fewer CPUs than lanes (a node that declares more CPUs than
    it has, like the dev cluster's), lane ``k`` gets CPU ``k mod len``: shared, never none."""
    ids = sorted(cpus)
    if not ids:
        return [() for _ in range(n)]
    if len(ids) < n:
        return [(ids[k % len(ids)],) for k in range(n)]
    size, extra = divmod(len(ids), n)
    out, start = [], 0
    for k in range(n):
        end = start + size + (1 if k < extra else 0)
        out.append(tuple(ids[start:end]))
        start = end
    return out


def split_gpus(gpus: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """The task's GPUs (``CUDA_VISIBLE_DEVICES`` entries) among ``n`` lanes: ``len/n`` each when
    ``n`` divides them, else each GPU shared by ``n/len`` consecutive lanes (trials_per_gpu).
    ValueError when neither divides (the spec check refuses that before anything queues)."""
    if not gpus:
        return [() for _ in range(n)]
    if len(gpus) % n == 0:
        size = len(gpus) // n
        return [tuple(gpus[k * size : (k + 1) * size]) for k in range(n)]
    if n % len(gpus) == 0:
        share = n // len(gpus)
        return [(gpus[k // share],) for k in range(n)]
    raise ValueError(f"{len(gpus)} GPU(s) cannot be shared by {n} trials evenly")


def plan(n: int, cpus: Sequence[int], allocated_cpus: int, gpus: Sequence[str]) -> list[Lane]:
    """Each lane's CPUs, threads and GPUs. ``allocated_cpus``: what Slurm allotted the task
    (its thread budget, even where the affinity mask shows fewer real CPUs)."""
    threads = max(1, (allocated_cpus or len(cpus)) // n)
    return [
        Lane(k, c, threads, g)
        for k, (c, g) in enumerate(zip(split_cpus(cpus, n), split_gpus(gpus, n), strict=True))
    ]


def claimant(env: dict[str, str] | None = None, local: bool = True) -> str | None:
    """The name a claim is made under: the task's (:func:`hpcdl.preemption.task_id`), with
    ``+LANE`` in a packed lane."""
    env = dict(os.environ) if env is None else env
    me = task_id(env, local=local)
    lane = env.get(LANE_ENV)
    return f"{me}+{lane}" if me is not None and lane is not None else me


def task_of(claim: str | None) -> str | None:
    """The task a slot's claim names (a lane's ``TASK+LANE`` without its lane)."""
    return claim.partition("+")[0] if claim else claim


# -- carrying it out -----------------------------------------------------------------------------
def allocation(gpus_per_node: int) -> tuple[list[int], int, list[str]]:
    """This task's CPUs (affinity), its CPU count from Slurm, and its GPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    allotted = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SLURM_CPUS_ON_NODE")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    gpus = [g for g in visible.split(",") if g] or [str(i) for i in range(gpus_per_node)]
    return cpus, int(allotted) if allotted else len(cpus), gpus if gpus_per_node else []


def enter(lane: Lane) -> None:
    """In the lane's own process, before it runs anything: its GPUs, CPUs and threads. torch is
    told too when the worker imported it (fork keeps its thread pool's size otherwise)."""
    os.environ[LANE_ENV] = str(lane.index)
    if lane.gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(lane.gpus)
    if lane.cpus:
        os.sched_setaffinity(0, lane.cpus)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(lane.threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(lane.threads)


def run_lanes(
    lanes: list[Lane], body: Callable[[Lane], list[str]], flag: Any = None
) -> list[list[str]]:
    """Fork one process per lane running ``body(lane)``; wait for all and return what each
    returned (a lane that died returns ``[]`` and says so in the log). A stop signal the worker
    gets is passed on to every lane (Slurm signals the task's processes too: a lane's flag is
    then set twice, which changes nothing)."""
    running: dict[int, tuple[Lane, int, bytearray]] = {}
    for lane in lanes:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the lane: never returns
            os.close(read)
            _lane_main(lane, body, write)
        os.close(write)
        running[pid] = (lane, read, bytearray())
    results: dict[int, list[str]] = {}
    passed_on = False
    while running:
        if not passed_on and getattr(flag, "requested", False):
            sig = getattr(flag, "received", None) or signal.SIGTERM
            for pid in running:
                _kill(pid, sig)
            passed_on = True
        ready, _, _ = select.select([r for _, r, _ in running.values()], [], [], 0.5)
        for pid, (lane, fd, buf) in list(running.items()):
            if fd not in ready:
                continue
            chunk = os.read(fd, 65536)
            if chunk:
                buf.extend(chunk)
                continue
            os.close(fd)  # EOF: the lane is exiting
            _, status = os.waitpid(pid, 0)
            del running[pid]
            results[lane.index] = _lane_result(lane, status, bytes(buf))
    return [results[lane.index] for lane in lanes]


def _lane_main(lane: Lane, body: Callable[[Lane], list[str]], out: int) -> None:
    code = 1
    try:
        enter(lane)
        done = body(lane)
        os.write(out, json.dumps(done).encode())
        code = 0
    except BaseException:  # the lane reports and exits; the worker goes on
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # not sys.exit: the worker's atexit handlers are the worker's


def _lane_result(lane: Lane, status: int, data: bytes) -> list[str]:
    if os.waitstatus_to_exitcode(status) == 0 and data:
        return list(json.loads(data))
    log.warning("lane %d ended with status %d: its running trial stays running for a retry",
                lane.index, os.waitstatus_to_exitcode(status))  # fmt: skip
    return []


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it has just ended
        os.kill(pid, sig)

"""Test job: the gloo abort at exit made certain, then guarded two ways (or not).

The abort needs a gloo thread waiting for the GIL (to free a finished collective's tensor) as
the interpreter starts to finalize. Rank 0 arranges exactly that: its last exit hook is one C
call that holds the GIL for seconds; the hook before it tells rank 1, which then joins an
all-reduce rank 0 started and never waited for, so rank 0's gloo thread finishes it and waits
for the GIL; an object of ``__main__`` then releases the GIL while the interpreter finalizes.

``argv``: the guard, how rank 0 ends (``return|exit3|raise``), a folder.

- ``plain``: no guard: rank 0 aborts (status -6).
- ``hook``: :func:`hpcdl.exit_guard.install` first, so its exit hook runs after the C call:
  it releases the GIL until the thread is idle, and rank 0 exits with its own status.
- ``leave``: rank 0 ends with :func:`hpcdl.exit_guard.leave` and the status it chose, before
  any exit hook: even the collective still in flight cannot abort it.
"""

import atexit
import contextlib
import os
import sys
import time
import traceback
from pathlib import Path

guard, ending, folder = sys.argv[1], sys.argv[2], Path(sys.argv[3])
if guard == "hook":
    from hpcdl import exit_guard

    exit_guard.install()  # registered first: runs after the two hooks below
if os.environ["RANK"] == "0":
    (folder / "rank0.pid").write_text(str(os.getpid()))
atexit.register(sum, range(3 * 10**8))  # seconds holding the GIL, no bytecode
atexit.register((folder / "rank0-in-last-hook").touch)  # runs just before it

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

dist.init_process_group("gloo")

if dist.get_rank() == 1:
    rank0 = int((folder / "rank0.pid").read_text())  # written before the rendezvous
    deadline = time.monotonic() + 60
    while not (folder / "rank0-in-last-hook").exists() and time.monotonic() < deadline:
        if not Path(f"/proc/{rank0}").exists():
            os._exit(0)  # rank 0 left before its last hooks (exit_guard.leave did that)
        time.sleep(0.01)
    with contextlib.suppress(Exception):  # rank 0 may be gone: only its status matters
        dist.all_reduce(torch.ones(1_000_000))
    os._exit(0)

dist.all_reduce(torch.ones(1_000_000), async_op=True)  # only the gloo thread holds the work now


class SlowTeardown:
    def __del__(self) -> None:
        time.sleep(1.0)  # the interpreter is finalizing: this releases the GIL


teardown = SlowTeardown()
status = {"return": 0, "exit3": 3, "raise": 1}[ending]
if guard == "leave":
    if ending == "raise":
        try:
            raise RuntimeError("rank 0 failed")
        except RuntimeError:
            traceback.print_exc()
    from hpcdl import exit_guard

    exit_guard.leave(status)
    raise AssertionError("exit_guard.leave returned with gloo threads alive")
if ending == "exit3":
    sys.exit(3)
if ending == "raise":
    raise RuntimeError("rank 0 failed")

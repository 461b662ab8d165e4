"""Test job: the gloo abort at exit made certain, then left as hpcdl leaves (or not).

The abort needs a gloo thread that starts freeing a finished collective's tensor (it checks
that Python is initialized, then waits for the GIL) just before the interpreter starts to
finalize, and gets the GIL only after. Rank 0 arranges exactly that: its last exit hook
(registered first, before torch) is one C call that holds the GIL for seconds; the hook
before it tells rank 1, which then joins an all-reduce rank 0 started and never waited for,
so rank 0's gloo thread finishes it and waits for the GIL; an object of ``__main__`` then
releases the GIL while the interpreter finalizes. Without hpcdl's exit guard rank 0 aborts
(status -6). ``argv``: ``guard|plain``, how rank 0 ends (``return|exit3|raise``), a folder.
"""

import atexit
import contextlib
import os
import sys
import time
from pathlib import Path

folder = Path(sys.argv[3])
if os.environ["RANK"] == "0":
    (folder / "rank0.pid").write_text(str(os.getpid()))
atexit.register(sum, range(3 * 10**8))  # runs last: seconds holding the GIL, no bytecode
atexit.register((folder / "rank0-in-last-hook").touch)  # runs just before it

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

guarded, ending = sys.argv[1] == "guard", sys.argv[2]
if guarded:
    from hpcdl.launch import init_distributed

    init_distributed()
else:
    dist.init_process_group("gloo")

if dist.get_rank() == 1:
    rank0 = int((folder / "rank0.pid").read_text())  # written before the rendezvous
    deadline = time.monotonic() + 60
    while not (folder / "rank0-in-last-hook").exists() and time.monotonic() < deadline:
        if not Path(f"/proc/{rank0}").exists():
            os._exit(0)  # rank 0 left before its last hooks (the guard did that)
        time.sleep(0.01)
    with contextlib.suppress(Exception):  # rank 0 may be gone: only its status matters
        dist.all_reduce(torch.ones(1_000_000))
    os._exit(0)

dist.all_reduce(torch.ones(1_000_000), async_op=True)  # only the gloo thread holds the work now


class SlowTeardown:
    def __del__(self) -> None:
        time.sleep(1.0)  # the interpreter is finalizing: this releases the GIL


teardown = SlowTeardown()
if ending == "exit3":
    sys.exit(3)
if ending == "raise":
    raise RuntimeError("rank 0 failed")

"""A rank leaves no gloo thread running into interpreter exit: such a thread, dropping a
finished collective's tensors while the interpreter shuts down, takes the GIL, is ended by
Python and aborts the process ("terminate called without an active exception"; docs:
development, "Flakes")."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO

HELPER = str(REPO / "tests/helpers/gloo_threads.py")


def test_ranks_using_deepspeed_comm_end_their_gloo_threads_when_they_leave(tmp_path):
    """DeepSpeed's comm layer, imported after the process group started (as hpcdl does), kept
    the world group alive past destroy_process_group, and with it the group's threads."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    procs = []
    for rank in (0, 1):
        rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, HELPER, str(tmp_path / "r")],
                                      env=rank_env, stderr=subprocess.PIPE, text=True))  # fmt: skip
    for proc in procs:
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"r.{rank}.json").read_text())
        assert report["sum"] == 1.0
        assert "pt_gloo_runloop" in report["during"], report  # the check sees gloo's threads
        assert not [t for t in report["after"] if "gloo" in t], report


RACE = str(REPO / "tests/helpers/gloo_exit_race.py")


def _race(tmp_path, guard: str, ending: str) -> subprocess.CompletedProcess:
    """Rank 0's status and stderr from the certain abort (tests/helpers/gloo_exit_race.py)."""
    folder = tmp_path / f"{guard}-{ending}"
    folder.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    argv = [sys.executable, RACE, guard, ending, str(folder)]
    rank1 = subprocess.Popen(argv, env={**env, "RANK": "1", "LOCAL_RANK": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        return subprocess.run(argv, env={**env, "RANK": "0", "LOCAL_RANK": "0"}, text=True,
                              capture_output=True, timeout=120)  # fmt: skip
    finally:
        rank1.wait(timeout=120)


def test_the_abort_at_exit_happens_without_a_guard(tmp_path):
    """The reproducer is certain: unguarded, the rank aborts (if this stops failing, a torch or
    Python release changed the mechanism; docs: development, "Flakes")."""
    proc = _race(tmp_path, "plain", "return")
    assert proc.returncode == -6, proc.stderr[-2000:]
    assert "terminate called without an active exception" in proc.stderr


@pytest.mark.parametrize("guard", ["hook", "leave"])
@pytest.mark.parametrize(("ending", "status"), [("return", 0), ("exit3", 3), ("raise", 1)])
def test_a_guarded_rank_leaves_with_its_own_status(tmp_path, guard, ending, status):
    """The exit hook lets the thread that waits for the GIL finish first; ``leave`` ends the
    process before any hook, with the status it is given."""
    proc = _race(tmp_path, guard, ending)
    assert proc.returncode == status, proc.stderr[-2000:]
    assert "terminate called" not in proc.stderr
    if ending == "raise":
        assert "RuntimeError: rank 0 failed" in proc.stderr  # the traceback is still printed


def test_a_failing_pytest_run_still_fails_beside_a_gloo_world(tmp_path):
    """The hook never changes a status: a pytest run with a failed test, whose process holds a
    gloo group (as tests/unit's Trainer tests do), exits 1 (an earlier guard that guessed the
    status from sys.exit exited 0 here)."""
    test = tmp_path / "test_fails.py"
    test.write_text(
        "import os, torch, torch.distributed as dist\n"
        "from hpcdl.launch import init_distributed\n"
        "def test_fails():\n"
        "    init_distributed()\n"
        "    dist.all_reduce(torch.ones(3))\n"
        "    assert False\n"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="1", RANK="0",
               LOCAL_RANK="0")  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(test)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-2000:]

"""``hpcdl bench start`` says when hpcdl's modules have no current bytecode: a worker that
cannot write ``__pycache__`` (another user's checkout, PYTHONDONTWRITEBYTECODE) compiles them
from source at every start, inside the figure (issue 25)."""

from __future__ import annotations

import os
import py_compile
from pathlib import Path

import pytest

from hpcdl.hpo.bench_start import render, uncompiled


@pytest.mark.parametrize(
    ("compiled", "edited_after", "expected"),
    [
        ((), (), (2, 2)),  # a fresh checkout, nothing compiled
        (("a", "b"), (), (0, 2)),  # compileall ran
        (("a", "b"), ("b",), (1, 2)),  # b edited since: its .pyc is stale
        (("a",), (), (1, 2)),
    ],
)
def test_modules_without_current_bytecode(tmp_path: Path, compiled, edited_after, expected):
    for name in ("a", "b"):
        (tmp_path / f"{name}.py").write_text(f"X = {name!r}\n")
    for name in compiled:
        py_compile.compile(str(tmp_path / f"{name}.py"), doraise=True)
    for name in edited_after:
        src = tmp_path / f"{name}.py"
        src.write_text("X = 'changed, longer'\n")
        st = src.stat()
        os.utime(src, (st.st_atime, st.st_mtime + 5))
    assert uncompiled(tmp_path) == expected


def test_the_table_says_when_workers_compiled_hpcdl():
    base = {"site": "devcluster", "import_torch_s": 1.0, "claim_s": 0.4, "setup_s": 1.5,
            "start_s": 1.6, "ratio": 1.6, "ratio_range": [1.6, 1.6],
            "rounds": [{"import_torch_s": 1.0, "claim_s": 0.4, "setup_s": 1.5, "start_s": 1.6,
                        "ratio": 1.6}]}  # fmt: skip
    assert "bytecode" not in render({**base, "uncompiled": [0, 90]})[-1]
    assert render({**base, "uncompiled": [83, 90]})[-1].startswith(
        "note: 83 of hpcdl's 90 modules have no current bytecode"
    )


def test_the_table_gives_the_cpu_times_when_measured():
    """CPU time: a loaded machine's scheduling moves the wall-clock ratio by 2x or more
    between rounds; the processes' CPU time much less."""
    base = {"site": "devcluster", "import_torch_s": 1.0, "claim_s": 0.4, "setup_s": 1.5,
            "start_s": 1.6, "ratio": 1.6, "ratio_range": [1.6, 1.6],
            "rounds": [{"import_torch_s": 1.0, "claim_s": 0.4, "setup_s": 1.5, "start_s": 1.6,
                        "ratio": 1.6}]}  # fmt: skip
    assert not any(line.startswith("CPU") for line in render(base))
    lines = render({**base, "import_torch_cpu_s": 1.0, "setup_cpu_s": 1.3})
    assert (
        lines[-1]
        == "CPU time (medians): import torch 1.00 s, the worker until set up 1.30 s (1.30x)"
    )

"""MASTER_PORT agrees across processes (each one computes it alone)."""

from __future__ import annotations

import os
import subprocess
import sys

from hpcdl.launch import master_port


def test_master_port_is_the_same_in_every_process(no_port_override):
    """Every rank computes the port alone: it must not depend on the interpreter's hash seed."""
    code = "from hpcdl.launch import master_port; print(master_port('777', '3'))"
    env = {k: v for k, v in os.environ.items() if k != "HPCDL_MASTER_PORT"}
    seen = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**env, "PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert seen == {str(master_port("777", "3"))}

"""A sweep worker whose objective needs no torch never imports it (issue 21: 256 workers on
a 24 GiB machine). Asking whether the process is one rank of a process group imported
torch.distributed in every worker: 237 MB of peak RSS instead of 61, and a second of start-up.
The worker's entry point runs in a fresh interpreter (this test session has torch imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hpcdl.hpo.folder import SweepPaths
from hpcdl.hpo.spec import SweepSpec

REPO = Path(__file__).resolve().parents[2]

# Peak RSS from /proc/self/status (VmHWM: this process image's own peak), not getrusage's
# ru_maxrss, which Linux carries over fork and exec: under a pytest worker that had 1 GiB
# resident, the fresh worker reported 1,014 MB.
WORKER = """
import json, sys
from hpcdl.hpo.worker import worker_task_main
print(worker_task_main(sys.argv[1], [0, 1, 2]), file=sys.stderr)
from hpcdl.hpo.bench_scale import HEAVY
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps({"heavy": [m for m in HEAVY if m in sys.modules], "maxrss_mb": hwm / 1024}))
"""


def test_a_cheap_objectives_worker_imports_no_torch(tmp_path: Path):
    spec = SweepSpec.model_validate({"name": "lean", "objective": "hpcdl.hpo.bench_scale:cheap",
                                     "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
                                     "sampler": {"name": "random"}, "trials": 3, "final": False})  # fmt: skip
    paths = SweepPaths(tmp_path / "lean")
    paths.slots.mkdir(parents=True)
    paths.spec.write_text(spec.model_dump_json())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", WORKER, str(paths.root)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "ran 3 trial(s)" in proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["heavy"] == [], got
    assert got["maxrss_mb"] < 120, got
    assert {s.state for s in paths.all_slots()} == {"complete"}

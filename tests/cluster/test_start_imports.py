"""A worker or training process imports only what it uses, when it uses it (issue 25).

torch._dynamo (and torch._inductor behind it) cost more than torch itself to import, and eager
training never uses them. Imports are per process, and this test session has imported
everything: each check runs a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HELPERS = REPO / "tests" / "helpers"
HEAVY = ("torch", "torch._dynamo", "torch._inductor", "deepspeed", "wandb", "h5py")


def _fresh(code: str, *args: str, timeout: float = 180) -> Any:
    """Run ``code`` in a fresh interpreter (the checkout first on its path); its last stdout
    line, as JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HELPERS), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_worker_imports_nothing_heavy_before_its_first_claim():
    """What a sweep worker task loads before it claims a trial: its entry point, the default
    (training) objective's module and the claim's modules, none of the heavy ones."""
    code = (
        "import json, sys\n"
        "import hpcdl.hpo.worker, hpcdl.hpo.objective, hpcdl.hpo.trial, hpcdl.hpo.study\n"
        "import hpcdl.train.run\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    assert _fresh(code) == []


def test_the_worker_does_not_import_the_submitting_side():
    """``hpcdl.hpo``'s package import no longer brings in ``Sweep`` and its lifecycle, jobs and
    final job: the worker never submits (it failed before: the package imported them)."""
    code = (
        "import json, sys\n"
        "import hpcdl.hpo.worker, hpcdl.hpo.objective, hpcdl.hpo.trial, hpcdl.hpo.study\n"
        "from hpcdl.hpo import SweepSpec\n"
        "submitting = ('hpcdl.hpo.sweep', 'hpcdl.hpo.lifecycle', 'hpcdl.hpo.final')\n"
        "before = [m for m in submitting if m in sys.modules]\n"
        "from hpcdl.hpo import Sweep\n"
        "print(json.dumps([before, Sweep.__module__]))\n"
    )
    assert _fresh(code) == [[], "hpcdl.hpo.sweep"]


OPTIMIZERS = """
import json, sys
import torch
from hpcdl.train.lazy_dynamo import defer_dynamo
changed = defer_dynamo()

# The same optimizer steps with the deferred wrappers, then with torch's own (dynamo imported):
# bit-identical parameters and state, for every optimizer hpcdl builds.
def steps(make):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    opt = make(model.parameters())
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 5)).square().sum().backward()
        opt.step()
    opt.load_state_dict(opt.state_dict())
    opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})
    return [p.detach().clone() for p in model.parameters()], opt.state_dict()
makers = [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
          lambda p: torch.optim.Adam(p, lr=0.01), lambda p: torch.optim.AdamW(p, lr=0.01)]
lean = [steps(m) for m in makers]
still_lean = "torch._dynamo" not in sys.modules
import torch._dynamo
torchs = [steps(m) for m in makers]
same = all(torch.equal(a, b) for (pa, _), (pb, _) in zip(lean, torchs) for a, b in zip(pa, pb))
same_state = all(str(sa) == str(sb) for (_, sa), (_, sb) in zip(lean, torchs))
print(json.dumps({"changed": changed > 0, "still_lean": still_lean, "same": same,
                  "same_state": same_state}))
"""


def test_deferred_optimizer_wrappers_step_as_torchs_own():
    """torch's optimizers step, zero, save and load their state without importing
    torch._dynamo (the training side of this is the ZeRO-3 run of test_async_checkpoint), and
    exactly as with torch's own wrappers (compared in the same process once it is imported)."""
    got = _fresh(OPTIMIZERS)
    assert got == {"changed": True, "still_lean": True, "same": True, "same_state": True}, got


WANDB_RUN = """
import json, sys, threading, tempfile
from pathlib import Path
from hpcdl.track import Tracker
run_dir = Path(tempfile.mkdtemp())
t = Tracker(run_dir, enabled=True, config={"a": 1}, name="lean", wandb=True,
            wandb_mode="offline", wandb_project="p")
for step in (1, 2):
    t.log("step", {"step": step, "loss": 1.0 / step}, echo=False)
t.close()
otel = sorted(m for m in sys.modules if m.startswith("opentelemetry.exporter"))
threads = sorted({th.name.split("-")[0] for th in threading.enumerate()} - {"MainThread"})
synced = sorted(p.name for p in run_dir.glob("wandb/offline-run-*/*.wandb"))
print(json.dumps([otel, "wandb.sdk.launch.inputs.internal" in sys.modules, len(synced)]))
"""


def test_an_offline_wandb_run_builds_no_telemetry_exporter():
    """An offline run's W&B start imports no OpenTelemetry exporter (W&B's own telemetry,
    built at the first log while W&B's process-wide mode stayed online: it reports to
    api.wandb.ai from the compute node, and cost 0.2-0.5 s) and not W&B Launch's inputs (0.5 s,
    imported by every init to apply inputs nothing staged); the run is still written."""
    otel, launch, written = _fresh(WANDB_RUN)
    assert otel == [] and launch is False and written == 1

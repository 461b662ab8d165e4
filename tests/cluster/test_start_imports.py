"""A worker or training process imports only what it uses, when it uses it (issue 25).

torch._dynamo (and torch._inductor behind it) cost more than torch itself to import, and eager
training never uses them; W&B's import and run start (2 s) run beside training. Imports are
per process, and this test session has imported everything: each check runs a fresh
interpreter."""

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


TRAIN = """
import json, sys
from pathlib import Path
from train_setup import make_run, train_run
tmp = Path(sys.argv[1])
run_dir = make_run(tmp, Path(sys.argv[2]), "lean", epochs=1, max_steps=3,
                   zero_stage=2, checkpoint__every_steps=2)
result = train_run(run_dir)
loaded = [m for m in ("torch._dynamo", "torch._inductor") if m in sys.modules]

# The same optimizer steps with torch's own wrappers (dynamo imported) and with the deferred
# ones: bit-identical parameters and state, for every optimizer hpcdl builds.
import torch
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
same = all(torch.equal(a, b) for (pa, _), (pb, _) in zip(lean, [steps(m) for m in makers])
           for a, b in zip(pa, pb))
print(json.dumps({"status": result["status"], "dynamo": loaded, "still_lean": still_lean,
                  "same": same}))
"""


def test_eager_training_never_imports_torch_dynamo(tmp_path: Path, synth: Path):
    """A ZeRO-2 training (DeepSpeed engine, AdamW, a checkpoint) in a fresh process ends
    without torch._dynamo or torch._inductor; the deferred optimizer wrappers step exactly as
    torch's own (compared in the same process once dynamo is imported)."""
    got = _fresh(TRAIN, str(tmp_path), str(synth))
    assert got == {"status": "completed", "dynamo": [], "still_lean": True, "same": True}, got

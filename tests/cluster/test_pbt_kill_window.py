"""PBT's exploit step seen from a resume (issue 24): a trial killed after it took a better
trial's checkpoint, before its slot recorded the decision, must resume with that checkpoint
*and* the parameters that go with it, never the donor's weights with its own old parameters.

The kill is real (SIGKILL, in a process of its own, at the point ``HPCDL_PBT_KILL_AT=exploit``
names); the sweep folder is built by hand (two trials, one boundary), so no trainer runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from hpcdl.hpo.folder import Slot
from hpcdl.hpo.pbt import KILL_AT_ENV, resume_point
from hpcdl.hpo.protocol import TrialContext
from hpcdl.hpo.spec import SweepSpec

PARAMS = {"optimizer.lr": 0.001}
DONOR_PARAMS = {"optimizer.lr": 0.01}
TAG = "global_step00000010"
REPO = Path(__file__).resolve().parents[2]


def _spec() -> SweepSpec:
    return SweepSpec.model_validate({
        "name": "pbt-kill", "train": "train.yaml", "overrides": {"epochs": 4},
        "space": {"optimizer.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1}},
        "sampler": {"name": "random", "seed": 0}, "trials": 2, "final": False,
        "pbt": {"interval_epochs": 1, "quantile": 0.5}, "resources": {"site": "local"},
    })  # fmt: skip


def _checkpoint(folder: Path, weights: str) -> None:
    (folder / TAG).mkdir(parents=True)
    (folder / TAG / "weights").write_text(weights)
    (folder / "latest").write_text(TAG + "\n")


def _sweep(root: Path) -> Path:
    """Trial 0 recorded a better value at epoch 1 with its snapshot; trial 1 (returned) sits at
    the same boundary with its own checkpoint."""
    donor = root / "trials" / "trial-00000" / "pbt" / "epoch-00001"
    _checkpoint(donor, "donor")
    (root / "pbt").mkdir(parents=True)
    row = {"trial": 0, "slot": 0, "epoch": 1, "value": 0.9, "snapshot": str(donor),
           "params": DONOR_PARAMS, "time": 0.0}  # fmt: skip
    (root / "pbt" / "scores.jsonl").write_text(json.dumps(row) + "\n")
    trial_dir = root / "trials" / "trial-00001"
    _checkpoint(trial_dir / "checkpoints", "mine")
    return trial_dir


def _ctx(trial_dir: Path, noted: list[dict[str, Any]], pbt: list[dict[str, Any]]) -> TrialContext:
    slot = Slot(slot=1, trial=1, params=PARAMS, run_id="pbt-kill-t00001", pbt=pbt)
    return TrialContext(_spec(), slot, trial_dir, lambda e, v: None, None, noted.append)


# The trial's boundary in a process of its own, which kills itself where the env says.
BOUNDARY = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_pbt_kill_window import _ctx
from hpcdl.hpo.pbt import pbt_objective
ctx = _ctx(Path({trial_dir!r}), [], [])
pbt_objective.boundary(ctx, {params!r}, 1, 0.1)
print("not killed")
"""


def _killed_at(tmp_path: Path, point: str) -> Path:
    """A trial of a new sweep run to its boundary in a process SIGKILLed at ``point``
    (``HPCDL_PBT_KILL_AT``); its folder."""
    trial_dir = _sweep(tmp_path / "sweep")
    code = BOUNDARY.format(tests=str(Path(__file__).parent), trial_dir=str(trial_dir),
                           params=PARAMS)  # fmt: skip
    env = {**os.environ, KILL_AT_ENV: point, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    return trial_dir


def test_a_trial_killed_after_taking_a_checkpoint_resumes_it_with_its_parameters(tmp_path):
    trial_dir = _killed_at(tmp_path, "exploit")
    # killed inside the window: the donor's weights are in place, the slot knows nothing
    assert (trial_dir / "checkpoints" / TAG / "weights").read_text() == "donor"

    noted: list[dict[str, Any]] = []
    params, history = resume_point(_ctx(trial_dir, noted, []), PARAMS)
    assert (trial_dir / "checkpoints" / TAG / "weights").read_text() == "donor"
    assert params != PARAMS, "resumed the donor's checkpoint with the trial's old parameters"
    # the decision the killed process took, recorded once: explored from the donor's rate
    assert [e["action"] for e in noted] == ["exploit"] and history == noted, noted
    assert noted[0]["from_trial"] == 0 and noted[0]["params"] == params
    assert params["optimizer.lr"] in (0.01 * 0.8, 0.01 * 1.2), params
    # resumed again (killed once more before anything else): the same, and nothing noted twice
    again: list[dict[str, Any]] = []
    assert resume_point(_ctx(trial_dir, again, noted), PARAMS) == (params, noted)
    assert again == []


def test_a_kill_while_the_checkpoints_are_replaced_resumes_the_donors(tmp_path):
    """Killed between removing its own checkpoints and renaming the copy into place, the trial
    had no checkpoint at all and would have started again from scratch."""
    trial_dir = _killed_at(tmp_path, "replace")
    assert not (trial_dir / "checkpoints").exists()
    noted: list[dict[str, Any]] = []
    params, _ = resume_point(_ctx(trial_dir, noted, []), PARAMS)
    assert (trial_dir / "checkpoints" / TAG / "weights").read_text() == "donor"
    assert [e["action"] for e in noted] == ["exploit"] and noted[0]["params"] == params

"""``sweep watch``'s "no progress for stuck_after" on a live local sweep: the look is made as if
an hour had passed (``now``), so nothing waits that long. The rule: tests/unit/hpo/test_alerts.py."""

from __future__ import annotations

import json
import time

from hpcdl.hpo import Sweep, SweepSpec
from hpcdl.hpo.alerts import check


def test_a_live_sweep_without_progress_for_stuck_after_is_stuck_once(monkeypatch, tmp_path):
    monkeypatch.setenv("HPCDL_TEST_EPOCH_S", "30")  # the one trial sits in its first epoch
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))  # the user's notify.yaml: a command
    (tmp_path / "hpcdl").mkdir()
    hook = tmp_path / "alerts.jsonl"
    (tmp_path / "hpcdl/notify.yaml").write_text(
        f"command: [sh, -c, 'cat >> {hook}; echo >> {hook}']\n"
    )
    sweep = Sweep(SweepSpec.model_validate({
        "name": "idle", "objective": "tests.helpers.objectives:curve", "trials": 1,
        "parallelism": 1, "space": {"x": {"type": "uniform", "low": 0.0, "high": 1.0}},
        "resources": {"site": "local"},
    }))  # fmt: skip
    sweep.run()
    try:
        deadline = time.monotonic() + 60
        while not sweep.slots():  # the worker claimed its trial: a record, then silence
            assert time.monotonic() < deadline, sweep.status()
            time.sleep(0.2)
        assert check(sweep, "30m") == (None, False, "nothing to report")  # recent progress
        later = time.time() + 3600
        event, sent, text = check(sweep, "30m", now=later)
        assert (event, sent) == ("stuck", True) and text.startswith("no progress for 36"), text
        assert check(sweep, "30m", now=later)[:2] == ("stuck", False)  # claimed already
        assert sweep.paths.notified() == {"stuck-round1"}
        [line] = hook.read_text().strip().splitlines()
        assert json.loads(line)["event"] == "stuck"
    finally:
        sweep.cancel()

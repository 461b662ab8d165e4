"""`sweep status` reads each slot file once: with 10,000 trials a read of every slot file is a
third of a second, and the page asked three times (its rows, what is stuck, finished)."""

from __future__ import annotations

from pathlib import Path

from hpcdl.hpo import Sweep, SweepSpec
from hpcdl.hpo.folder import Slot
from hpcdl.hpo.table import status_text


def test_status_page_reads_each_slot_file_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCDL_JOB_ROOT", str(tmp_path / "jobs"))
    monkeypatch.setenv("HPCDL_SITE_PATH", str(Path(__file__).resolve().parents[3] / "hpcdl/sites"))
    spec = SweepSpec.model_validate({
        "name": "reads", "objective": "m:f", "trials": 5, "final": False,
        "space": {"x": {"type": "uniform", "low": 0, "high": 1}}, "resources": {"site": "local"}})  # fmt: skip
    sweep = Sweep(spec)
    sweep.paths.slots.mkdir(parents=True)
    for i in range(4):  # slot 4 never claimed: the page says what is stuck
        sweep.paths.write_slot(Slot(slot=i, trial=i, params={"x": 0.1}, run_id=f"r{i}",
                                    state="complete", value=0.5))  # fmt: skip
    reads: list[str] = []
    real = Path.read_text

    def counting(self: Path, *args, **kwargs):
        if self.parent == sweep.paths.slots:
            reads.append(self.name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting)
    page = status_text(sweep, 100, False, str)
    assert any("4 complete" in line for line in page) and any("stuck" in line for line in page)
    assert sorted(reads) == [f"{i}.json" for i in range(4)]
    reads.clear()
    assert sweep.paths.missing_slots(range(5)) == [4]  # outside the page: read afresh
    assert len(reads) == 4

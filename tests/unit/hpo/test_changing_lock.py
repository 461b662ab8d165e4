"""``sweep resume`` and ``sweep extend`` of one sweep never run at once (both submitted a round)."""

from __future__ import annotations

import pytest

from hpcdl.errors import HpcdlError
from hpcdl.hpo.folder import SweepPaths


def test_a_second_change_is_refused_while_the_first_runs_and_allowed_after(tmp_path):
    paths = SweepPaths(tmp_path / "s")
    paths.root.mkdir()
    refused = pytest.raises(HpcdlError, match="another 'hpcdl sweep resume' or 'extend' of 's'")
    with paths.changing("s"), refused, paths.changing("s"):
        pass
    with paths.changing("s"):  # released: the next one goes ahead
        pass

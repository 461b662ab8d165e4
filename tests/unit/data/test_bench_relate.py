"""hpcdl bench io: each row against the faster raw row, the naive row and the shuffle ceiling."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from hpcdl.data.bench import IoBench, Row, _relate

RAWS = ["raw read, 1 stream", "raw read, 2 streams"]


@pytest.mark.parametrize(
    "speeds",
    [
        # path: (samples/s, x raw, x ceiling); the faster raw row and the ceiling of its cache
        ({"raw read, 1 stream": (50, 0.5, None), "raw read, 2 streams": (100, 1.0, None),
          "shuffle ceiling": (80, 0.8, None), "hpcdl, 0 workers": (72, 0.72, 0.9),
          "naive, 2 workers": (1, 0.01, None)}),
        # no ceiling row: x ceiling stays empty
        ({"raw read, 1 stream": (100, 1.0, None), "hpcdl, 2 workers": (40, 0.4, None),
          "naive, 2 workers": (2, 0.02, None)}),
    ],
)  # fmt: skip
def test_relate(speeds: dict[str, tuple[float, float, float | None]]) -> None:
    res = IoBench(Path("d"), 1, 1, 1)
    for cache in ("cold", "warm"):
        res.rows += [Row(p, cache, s, s) for p, (s, _, _) in speeds.items()]
    _relate(res, RAWS, "naive, 2 workers")
    for r in res.rows:
        _, vs_raw, vs_ceiling = speeds[r.path]
        assert r.vs_raw == pytest.approx(vs_raw)
        if vs_ceiling is None:
            assert math.isnan(r.vs_ceiling)
        else:
            assert r.vs_ceiling == pytest.approx(vs_ceiling)

"""A model for the container tests: records, per rank, which image it was built in."""

from __future__ import annotations

import os
from pathlib import Path

from hpcdl.train.models import MLP


class ImageProbeMLP(MLP):
    """An MLP that writes ``/etc/hpcdl-image`` (the test image's marker; ``absent`` outside it)
    to ``{probe}.{RANK}`` when built: ``host`` is the submitting process's preflight."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, probe: str = "", **kw):
        super().__init__(input_shape, num_classes, **kw)
        marker = Path("/etc/hpcdl-image")
        text = marker.read_text() if marker.is_file() else "absent"
        world = os.environ.get("WORLD_SIZE", "-")
        Path(f"{probe}.{os.environ.get('RANK', 'host')}").write_text(f"{text}world {world}\n")

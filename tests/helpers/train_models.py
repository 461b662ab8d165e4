"""A model for training tests: the zoo's MLP whose forward also sleeps, so a run lasts a
predictable time whatever the machine's speed and load (and sleeping ranks leave the CPUs free)."""

from __future__ import annotations

import time

import torch

from hpcdl.train.models import MLP


class SlowMLP(MLP):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, delay_s: float = 0.02, **kw):
        super().__init__(input_shape, num_classes, **kw)
        self.delay_s = delay_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_s)
        return super().forward(x)


class CifarNet(torch.nn.Module):
    """A user model built for 3x32x32 images: it cannot take 1x8x8 digits."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.head = torch.nn.Linear(8 * 30 * 30, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).flatten(1))


class FailingMLP(MLP):
    """Breaks after ``fail_after`` training forward passes: a trial that fails mid-run."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, fail_after: int = 30, **kw):
        super().__init__(input_shape, num_classes, **kw)
        self.fail_after, self.calls = fail_after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls > self.fail_after:
                raise RuntimeError("FailingMLP breaks on purpose")
        return super().forward(x)

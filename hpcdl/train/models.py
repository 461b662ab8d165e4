"""The model zoo (MLP, small CNN, ResNet-style net), activations and losses.

Models are built from ``(input_shape, num_classes, **options)``; ``module:Class`` references a
user's ``torch.nn.Module`` built the same way, so bring-your-own models get the same checks.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from hpcdl.errors import ConfigError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}


def _act(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r} (available: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]()


def _norm2d(kind: str, channels: int) -> nn.Module:
    """GroupNorm by default: unlike BatchNorm it keeps no per-rank running statistics, so a
    resumed data-parallel run is bit-identical on every rank, not only on rank 0."""
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r} (use group, batch or none)")


class MLP(nn.Module):
    """Flatten, then ``hidden`` fully connected layers with activation and dropout."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        hidden: list[int] | tuple[int, ...] = (256, 128),
        activation: str = "relu",
        dropout: float = 0.0,
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), _act(activation)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Conv-norm-activation blocks (a 2x2 max-pool after each while the image allows it),
    global average pooling, dropout, linear head. Input ``(C, H, W)``."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        channels: list[int] | tuple[int, ...] = (32, 64),
        kernel_size: int = 3,
        activation: str = "relu",
        norm: str = "group",
        dropout: float = 0.0,
    ):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"needs (channels, height, width) samples, got {tuple(input_shape)}")
        c, size = input_shape[0], min(input_shape[1:])
        layers: list[nn.Module] = []
        for out in channels:
            layers += [
                nn.Conv2d(c, out, kernel_size, padding=kernel_size // 2),
                _norm2d(norm, out),
                _act(activation),
            ]
            if size >= 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            c = out
        layers += [
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c, num_classes),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Block(nn.Module):
    """A basic residual block: two 3x3 convolutions, projection shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, activation: str, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = _norm2d(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = _norm2d(norm, c_out)
        self.act = _act(activation)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm2d(norm, c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-style: a stem, ``len(depth)`` stages of ``depth[i]`` residual blocks, width doubling
    (and resolution halving) from one stage to the next, global pooling and a linear head."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        depth: list[int] | tuple[int, ...] = (2, 2),
        width: int = 32,
        activation: str = "relu",
        norm: str = "group",
    ):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"needs (channels, height, width) samples, got {tuple(input_shape)}")
        if not depth or any(d < 1 for d in depth) or width < 1:
            raise ValueError("depth must list >= 1 blocks per stage and width must be >= 1")
        self.stem = nn.Sequential(
            nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False),
            _norm2d(norm, width),
            _act(activation),
        )
        blocks: list[nn.Module] = []
        c = width
        for stage, n in enumerate(depth):
            out = width * 2**stage
            for i in range(n):
                blocks.append(_Block(c, out, 2 if stage and i == 0 else 1, activation, norm))
                c = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


ZOO: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": CNN, "resnet": ResNet}


def resolve_model(name: str, where: str = "") -> type[nn.Module]:
    """A zoo name or ``module:Class`` (imported here) → the model class."""
    if name in ZOO:
        return ZOO[name]
    if ":" not in name:
        raise ConfigError(
            where,
            "model.name",
            f"unknown model {name!r} (available: {', '.join(ZOO)}, or module:Class for your own)",
        )
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(where, "model.name", f"cannot import {module_name!r}: {exc}") from None
    cls = getattr(module, attr, None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise ConfigError(where, "model.name", f"{name!r} is not a torch.nn.Module class")
    return cls


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    options: dict[str, Any],
    where: str = "",
) -> nn.Module:
    """Instantiate a model; unknown or invalid options are one ConfigError naming the field."""
    cls = resolve_model(name, where)
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    accepted = [p for p in params if p not in {"self", "input_shape", "num_classes"}]
    for key in options:
        if key not in accepted and not takes_any:
            raise ConfigError(
                where,
                f"model.{key}",
                f"unknown option for model {name!r} (accepted: {', '.join(accepted) or 'none'})",
            )
    try:
        return cls(input_shape=tuple(input_shape), num_classes=num_classes, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(where, "model", f"cannot build {name!r}: {exc}") from None


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "cross_entropy": lambda logits, y, smoothing: F.cross_entropy(
        logits, y, label_smoothing=smoothing
    ),
    "multi_margin": lambda logits, y, smoothing: F.multi_margin_loss(logits, y),
    "mse": lambda logits, y, smoothing: F.mse_loss(
        logits, F.one_hot(y, logits.shape[-1]).to(logits.dtype)
    ),
}


def loss_fn(
    name: str, label_smoothing: float = 0.0
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(logits, labels)``, computed in fp32 whatever the training precision."""
    fn = LOSSES[name]
    return lambda logits, y: fn(logits.float(), y, label_smoothing)

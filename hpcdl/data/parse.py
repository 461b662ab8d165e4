"""Parsing of user-given sizes, shapes and dtypes into checked values."""

from __future__ import annotations

import re

import numpy as np

from hpcdl.errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*\Z")

DTYPES = ("uint8", "int8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64")


def parse_size(text: str | int, where: str, field: str) -> int:
    """Parse ``4MiB``, ``2GiB``, ``1.5G`` or a plain byte count into a positive number of bytes."""
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE_RE.match(text)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ConfigError(
                where, field, f"{text!r} is not a size; use bytes or a unit: 512KiB, 4MiB, 2GiB"
            )
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigError(where, field, f"{text!r} must be a positive size")
    return value


def parse_shape(text: str, where: str, field: str) -> tuple[int, ...]:
    """Parse a per-sample shape such as ``3x32x32`` (or ``3,32,32``); ``scalar`` means ``()``."""
    text = text.strip().lower()
    if text in ("scalar", "()"):
        return ()
    parts = re.split(r"[x,]", text)
    if not all(re.fullmatch(r"\d+", p.strip()) for p in parts) or any(int(p) <= 0 for p in parts):
        raise ConfigError(
            where, field, f"{text!r} is not a shape; use positive sizes joined by 'x', e.g. 3x32x32"
        )
    return tuple(int(p) for p in parts)


def parse_dtype(text: str, where: str, field: str) -> np.dtype:
    """Accept one of the plain numeric dtypes in :data:`DTYPES`."""
    if text not in DTYPES:
        raise ConfigError(
            where, field, f"{text!r} is not supported; use one of {', '.join(DTYPES)}"
        )
    return np.dtype(text)


def check_fraction(value: float, where: str, field: str) -> float:
    """A split fraction in [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise ConfigError(where, field, f"{value} must be a fraction in [0, 1)")
    return value

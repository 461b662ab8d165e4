"""The dataset manifest: fields, shapes, dtypes, shards, chunking, checksums. Written last."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hpcdl.data.parse import DTYPES
from hpcdl.errors import ConfigError, HpcdlError
from hpcdl.util import atomic_write_text

MANIFEST = "manifest.json"
FORMAT: Literal["hpcdl-shards"] = "hpcdl-shards"
VERSION: Literal[1] = 1


class FieldSpec(BaseModel):
    """One named array per sample: its dtype and per-sample shape."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: Literal[DTYPES]  # type: ignore[valid-type]
    shape: tuple[int, ...]

    @field_validator("shape")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(d <= 0 for d in v):
            raise ValueError("every dimension must be positive")
        return v

    @property
    def sample_bytes(self) -> int:
        """Bytes of one sample of this field."""
        return int(np.dtype(self.dtype).itemsize * np.prod(self.shape, dtype=np.int64))


class ShardInfo(BaseModel):
    """One HDF5 file of the dataset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(pattern=r"^[A-Za-z0-9_.-]+\.h5$")
    samples: int = Field(gt=0)
    bytes: int = Field(gt=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(BaseModel):
    """A dataset: a folder of HDF5 shards plus this file, ``manifest.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["hpcdl-shards"] = FORMAT
    version: Literal[1] = VERSION
    samples: int = Field(gt=0)
    fields: dict[str, FieldSpec] = Field(min_length=1)
    chunk_samples: int = Field(gt=0)
    compression: Literal["gzip", "lz4"] | None = None
    compression_level: int | None = None
    shards: list[ShardInfo] = Field(min_length=1)
    split: str = "train"
    seed: int = 0
    source: str = ""
    classes: list[str] | None = None

    @field_validator("fields")
    @classmethod
    def _names(cls, v: dict[str, FieldSpec]) -> dict[str, FieldSpec]:
        bad = [k for k in v if not k.isidentifier()]
        if bad:
            raise ValueError(f"field names must be identifiers, got {bad}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        total = sum(s.samples for s in self.shards)
        if total != self.samples:
            raise ValueError(f"shards hold {total} samples but 'samples' is {self.samples}")
        if len({s.file for s in self.shards}) != len(self.shards):
            raise ValueError("shard file names must be unique")
        return self

    @property
    def sample_bytes(self) -> int:
        """Bytes of one sample over all fields."""
        return sum(f.sample_bytes for f in self.fields.values())

    def digest(self) -> str:
        """A short content id: changes whenever any shard or field changes."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        """Read and validate ``DIR/manifest.json``; every problem is a one-line error naming it."""
        path = Path(directory) / MANIFEST
        if not path.is_file():
            if not Path(directory).is_dir():
                raise HpcdlError(f"{directory}: no such dataset directory")
            raise HpcdlError(
                f"{path}: missing: not a complete hpcdl dataset "
                "(the manifest is written last, so the write may have been interrupted)"
            )
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(str(path), "", f"not valid JSON: {exc}") from None
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            raise ConfigError(str(path), loc, msg) from None

    def save(self, directory: str | Path) -> Path:
        """Write atomically: a temporary file renamed over ``manifest.json``."""
        return atomic_write_text(Path(directory) / MANIFEST, self.model_dump_json(indent=1) + "\n")

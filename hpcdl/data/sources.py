"""Sources of samples to shard: numpy files, an image folder, scikit-learn's digits, synthetic data.

A :class:`Source` knows its fields and splits itself into train/val/test parts; each part reads
contiguous ranges of samples (already in their final, globally shuffled order).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from hpcdl.data.manifest import FieldSpec
from hpcdl.data.parse import DTYPES, check_fraction
from hpcdl.errors import ConfigError, HpcdlError

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class Part(Protocol):
    """One split of a source, in write order."""

    samples: int

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Samples ``start:stop`` of this split, one array per field."""
        ...


class Source(Protocol):
    """Something :func:`hpcdl.data.write_shards` can write."""

    name: str
    fields: dict[str, FieldSpec]
    classes: list[str] | None

    def split(self, val: float, test: float, seed: int) -> dict[str, Part]:
        """Shuffle globally (seeded) and cut into the non-empty splits among train/val/test."""
        ...


def split_counts(n: int, val: float, test: float) -> dict[str, int]:
    """Samples per split; train keeps the remainder and must not be empty."""
    check_fraction(val, "split", "val")
    check_fraction(test, "split", "test")
    n_val, n_test = round(n * val), round(n * test)
    n_train = n - n_val - n_test
    if n_train <= 0:
        raise ConfigError("split", "val/test", f"leave no training samples out of {n}")
    return {"train": n_train, "val": n_val, "test": n_test}


class _ArrayPart:
    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.samples = len(next(iter(arrays.values())))

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {k: v[start:stop] for k, v in self.arrays.items()}


class ArraySource:
    """In-memory arrays with a common first (sample) axis, e.g. ``{"x": images, "y": labels}``."""

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        name: str = "arrays",
        classes: list[str] | None = None,
    ):
        arrs = {k: np.asarray(v) for k, v in arrays.items()}
        lengths = {k: a.shape[0] if a.ndim else 0 for k, a in arrs.items()}
        if not arrs or len(set(lengths.values())) != 1 or 0 in lengths.values():
            raise ConfigError(
                name,
                "fields",
                f"needs arrays with one row per sample, equal lengths > 0: {lengths}",
            )
        for key, arr in arrs.items():
            if not key.isidentifier():
                raise ConfigError(name, key, "field names must be Python identifiers (x, y, ...)")
            if arr.dtype.name not in DTYPES:
                raise ConfigError(
                    name, key, f"dtype {arr.dtype} is not supported; use one of {', '.join(DTYPES)}"
                )
        self.arrays = {k: np.ascontiguousarray(a) for k, a in arrs.items()}
        self.name = name
        self.classes = classes
        self.fields = {
            k: FieldSpec(dtype=v.dtype.name, shape=v.shape[1:]) for k, v in self.arrays.items()
        }

    def split(self, val: float, test: float, seed: int) -> dict[str, Part]:
        n = len(next(iter(self.arrays.values())))
        counts = split_counts(n, val, test)
        perm = np.random.default_rng(seed).permutation(n)
        parts: dict[str, Part] = {}
        start = 0
        for split in ("test", "val", "train"):
            idx = perm[start : start + counts[split]]
            start += counts[split]
            if len(idx):
                parts[split] = _ArrayPart({k: v[idx] for k, v in self.arrays.items()})
        return {s: parts[s] for s in SPLITS if s in parts}


def digits_source() -> ArraySource:
    """scikit-learn's handwritten digits (1797 samples, shipped inside the package, no download).

    ``x``: float32 of shape (1, 8, 8) in [0, 1]; ``y``: int64 label 0-9.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    return ArraySource(
        {"x": x, "y": d.target.astype(np.int64)},
        name="sklearn digits",
        classes=[str(c) for c in range(10)],
    )


def numpy_source(path: str | Path, labels: str | Path | None = None) -> ArraySource:
    """A ``.npz`` (one field per array name) or a ``.npy`` (field ``x``, plus ``y`` from labels)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "source", "no such file")
    try:
        if path.suffix == ".npz":
            if labels is not None:
                raise ConfigError(
                    str(path), "labels", "only for a .npy source; name arrays in the .npz"
                )
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        elif path.suffix == ".npy":
            arrays = {"x": np.load(path, allow_pickle=False)}
            if labels is not None:
                if not Path(labels).is_file():
                    raise ConfigError(str(labels), "labels", "no such file")
                arrays["y"] = np.load(labels, allow_pickle=False)
        else:
            raise ConfigError(str(path), "source", "must end in .npy or .npz")
    except (ValueError, OSError) as exc:
        raise ConfigError(str(path), "source", f"not a readable numpy file: {exc}") from None
    return ArraySource(arrays, name=str(path))


def image_folder_source(root: str | Path) -> ArraySource:
    """One sub-folder per class (sorted names → labels 0..K-1), images of one size.

    Grayscale stays one channel, anything else becomes RGB. ``x``: uint8 (C, H, W); ``y``: int64.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise ConfigError(str(root), "source", "no such directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(str(root), "source", "has no class sub-folders (one per class)")
    images: list[np.ndarray] = []
    labels: list[int] = []
    first: tuple[str, tuple[int, ...]] | None = None
    for label, cls in enumerate(classes):
        files = sorted(p for p in (root / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError(str(root / cls), "source", "class folder has no images")
        for file in files:
            try:
                with Image.open(file) as im:
                    arr = np.asarray(im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB"))
            except (UnidentifiedImageError, OSError) as exc:
                raise ConfigError(str(file), "image", f"cannot be read: {exc}") from None
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            if first is None:
                first = (str(file), arr.shape)
            elif arr.shape != first[1]:
                raise ConfigError(
                    str(file),
                    "image",
                    f"has shape {arr.shape} (C, H, W) but {first[0]} has {first[1]}; "
                    "all images must have the same size and channels",
                )
            images.append(arr)
            labels.append(label)
    return ArraySource(
        {"x": np.stack(images), "y": np.asarray(labels, dtype=np.int64)},
        name=str(root),
        classes=classes,
    )


class _SynthPart:
    BLOCK = 4096  # samples generated per seeded block, so data do not depend on shard sizes

    def __init__(self, proto: np.ndarray, seed: int, split_id: int, samples: int):
        self.proto, self.seed, self.split_id, self.samples = proto, seed, split_id, samples
        self.n_classes = len(proto)

    def _block(self, b: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.split_id, b])
        n = min(self.BLOCK, self.samples - b * self.BLOCK)
        y = rng.integers(0, self.n_classes, n, dtype=np.int64)
        shape, dtype = self.proto.shape[1:], self.proto.dtype
        if dtype.kind == "f":
            x = self.proto[y] + rng.standard_normal((n, *shape), dtype=np.float32).astype(dtype)
        else:
            x = self.proto[y]
            x += (np.frombuffer(rng.bytes(x.size), np.uint8) & 63).reshape(x.shape)
        return {"x": x, "y": y}

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        b0, b1 = start // self.BLOCK, (stop - 1) // self.BLOCK
        blocks = [self._block(b) for b in range(b0, b1 + 1)]
        lo = start - b0 * self.BLOCK
        return {
            k: np.concatenate([blk[k] for blk in blocks])[lo : lo + stop - start]
            for k in ("x", "y")
        }


class SynthSource:
    """Synthetic classification: each class has a random prototype, samples add noise to it.

    Learnable (a linear model separates the classes), any size and per-sample shape; integer
    dtypes take values in [0, 255], float dtypes are unit-variance around the prototype.
    """

    def __init__(
        self,
        samples: int,
        shape: tuple[int, ...] = (3, 32, 32),
        dtype: str = "uint8",
        classes: int = 10,
    ):
        if samples <= 0:
            raise ConfigError("synth", "samples", f"{samples} must be positive")
        if classes < 2:
            raise ConfigError("synth", "classes", f"{classes} must be at least 2")
        if dtype not in DTYPES or dtype == "int8":
            raise ConfigError("synth", "dtype", f"{dtype!r}: use uint8, an int16+ or a float type")
        self.samples, self.shape, self.n_classes = samples, tuple(shape), classes
        self.dtype = np.dtype(dtype)
        self.name = f"synth {'x'.join(map(str, self.shape))} {dtype} classes={classes}"
        self.classes = [str(c) for c in range(classes)]
        self.fields = {
            "x": FieldSpec(dtype=self.dtype.name, shape=self.shape),
            "y": FieldSpec(dtype="int64", shape=()),
        }

    def split(self, val: float, test: float, seed: int) -> dict[str, Part]:
        """Splits share the class prototypes (drawn from ``seed``) and draw independent samples."""
        counts = split_counts(self.samples, val, test)
        rng = np.random.default_rng([seed, 1 << 20])
        if self.dtype.kind == "f":
            proto = rng.standard_normal((self.n_classes, *self.shape)).astype(self.dtype)
        else:
            proto = rng.integers(0, 192, (self.n_classes, *self.shape)).astype(self.dtype)
        return {s: _SynthPart(proto, seed, i, counts[s]) for i, s in enumerate(SPLITS) if counts[s]}


def load_source(spec: str, labels: str | None = None) -> Source:
    """``digits``, an image folder, a ``.npz`` or a ``.npy`` (with optional labels ``.npy``)."""
    if spec == "digits":
        return digits_source()
    path = Path(spec)
    if path.is_dir():
        if labels is not None:
            raise ConfigError(spec, "labels", "only for a .npy source; folders give labels")
        return image_folder_source(path)
    if path.suffix in (".npy", ".npz"):
        return numpy_source(path, labels)
    if not path.exists():
        raise ConfigError(spec, "source", "no such file or directory (or use 'digits')")
    raise HpcdlError(f"{spec}: source: use 'digits', an image folder, or a .npy/.npz file")

"""`hpcdl data` commands: write HDF5 shards (from files, digits or synthetic), verify, stage."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from hpcdl.cli.progress import bar, spinner
from hpcdl.errors import ConfigError


@click.group("data")
def data() -> None:
    """HDF5 shard datasets: write, verify, stage to node-local scratch."""


def _write_options(val: float, test: float) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Options shared by the writing commands."""
    opts = [
        click.option("--val", default=val, show_default=True, help="Fraction held out as OUT/val."),
        click.option("--test", default=test, show_default=True, help="Fraction for OUT/test."),
        click.option("--seed", default=0, show_default=True, help="Shuffle (and synth) seed."),
        click.option("--shard-size", default="128MiB", show_default=True, help="Bytes per shard."),
        click.option(
            "--chunk-size",
            default="1MiB",
            show_default=True,
            help="Bytes per HDF5 chunk along the sample axis (the reader's unit).",
        ),
        click.option("--compression", type=click.Choice(["none", "gzip", "lz4"]), default="none"),
        click.option("--overwrite", is_flag=True, help="Replace existing split folders."),
    ]

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        for opt in reversed(opts):
            fn = opt(fn)
        return fn

    return deco


def _write(source: Any, out: str, **kw: Any) -> None:
    from hpcdl.data.manifest import Manifest
    from hpcdl.data.writer import mpi_comm, write_shards

    comm = mpi_comm()
    if comm is not None and comm.Get_rank() != 0:
        write_shards(source, out, **kw)  # rank 0 alone reports progress and prints
        return
    with bar("writing shards", unit="bytes") as on_progress:
        dirs = write_shards(source, out, on_progress=on_progress, **kw)
    for split, path in dirs.items():
        m = Manifest.load(path)
        size = sum(s.bytes for s in m.shards) / 2**20
        click.echo(f"{split}: {path} ({m.samples} samples, {len(m.shards)} shards, {size:.1f} MiB)")


@data.command("shard")
@click.argument("source")
@click.argument("out")
@click.option("--labels", help="Labels .npy for a .npy SOURCE (field y).")
@_write_options(val=0.1, test=0.1)
def shard(source: str, out: str, labels: str | None, **kw: Any) -> None:
    """Write SOURCE as shard datasets OUT/train, OUT/val, OUT/test.

    SOURCE is 'digits' (scikit-learn's 8x8 handwritten digits: x float32 (1,8,8), y int64),
    an image folder with one sub-folder per class, a .npz (one field per array) or a .npy
    (field x; --labels adds y). Samples are shuffled once, globally. Under mpiexec/srun each
    rank writes its share of the shards.
    """
    from hpcdl.data.sources import load_source

    with spinner(f"reading {source}"):
        src = load_source(source, labels)
    _write(src, out, **kw)


@data.command("synth")
@click.argument("out")
@click.option("--size", help="Total bytes to generate, e.g. 2GiB (or give --samples).")
@click.option("--samples", type=int, help="Number of samples (or give --size).")
@click.option("--shape", default="3x32x32", show_default=True, help="Per-sample shape of x.")
@click.option("--dtype", default="uint8", show_default=True, help="dtype of x.")
@click.option("--classes", default=10, show_default=True, help="Number of classes (y).")
@_write_options(val=0.0, test=0.0)
def synth(
    out: str,
    size: str | None,
    samples: int | None,
    shape: str,
    dtype: str,
    classes: int,
    **kw: Any,
) -> None:
    """Write a synthetic, learnable classification set (class prototype + noise) under OUT."""
    from hpcdl.data.parse import parse_dtype, parse_shape, parse_size
    from hpcdl.data.sources import SynthSource

    dims = parse_shape(shape, "--shape", "shape")
    item = parse_dtype(dtype, "--dtype", "dtype").itemsize
    if (size is None) == (samples is None):
        raise ConfigError("hpcdl data synth", "--size/--samples", "give exactly one of them")
    if size is not None:
        per_sample = item * math.prod(dims) + 8  # x plus an int64 label
        samples = parse_size(size, "--size", "size") // per_sample
        if samples == 0:
            raise ConfigError("--size", "size", f"{size} holds no sample of {per_sample} bytes")
    assert samples is not None  # given, or derived from --size above
    _write(SynthSource(samples, dims, dtype, classes), out, **kw)


@data.command("verify")
@click.argument("directory")
@click.option("--no-checksums", is_flag=True, help="Skip the sha256 of every shard.")
def verify_cmd(directory: str, no_checksums: bool) -> None:
    """Check DIRECTORY (a dataset, or a folder of split datasets) against its manifest."""
    from hpcdl.data.verify import dataset_dirs, verify

    for d in dataset_dirs(directory):
        with bar(f"verifying {d.name}", unit="bytes") as on_progress:
            r = verify(d, checksums=not no_checksums, on_progress=on_progress)
        click.echo(f"ok: {r.path} ({r.samples} samples, {r.shards} shards, {r.bytes} bytes)")


@data.command("stage")
@click.argument("directory")
@click.argument("scratch")
@click.option("--checksums", is_flag=True, help="Verify the sha256 of the copy.")
def stage_cmd(directory: str, scratch: str, checksums: bool) -> None:
    """Copy dataset DIRECTORY once per node under SCRATCH; prints the local path to read."""
    from hpcdl.data.stage import stage

    with bar(f"staging {Path(directory).name}", unit="bytes") as on_progress:
        local = stage(Path(directory), Path(scratch), checksums=checksums, on_progress=on_progress)
    click.echo(str(local))


def register(cli: click.Group) -> None:
    """Add this module's commands to the top-level group."""
    cli.add_command(data)

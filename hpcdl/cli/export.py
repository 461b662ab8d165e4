"""`hpcdl export RUN_DIR`: the full weights of a checkpoint as one plain file, plus what rebuilds
the model. The work is :mod:`hpcdl.train.export`'s; this module only decides what the user sees."""

from __future__ import annotations

import click


@click.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--checkpoint",
    "tag",
    metavar="TAG",
    help="Checkpoint tag (e.g. step00000030); default: the newest one that verifies.",
)
@click.option(
    "--format",
    "fmt",
    default="pt",
    show_default=True,
    help="safetensors (needs the safetensors package) or pt.",
)
@click.option("--dtype", default="fp32", show_default=True, help="fp32, bf16 or fp16.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="Weights file to write (the model description goes beside it as .json); default: "
    "RUN_DIR/export/TAG/model.FORMAT. Never overwritten.",
)
def export(run_dir: str, tag: str | None, fmt: str, dtype: str, out: str | None) -> None:
    """Consolidate a checkpoint of RUN_DIR (any ZeRO stage, any precision) into full weights,
    in this process on the CPU, and write them with the model's description (.json)."""
    from hpcdl.train.export import export_weights

    done = export_weights(run_dir, tag=tag, fmt=fmt, dtype=dtype, out=out)
    click.echo(
        f"exported {done.tag} (step {done.step}, {done.tensors} tensors, {dtype}) from "
        f"{done.source}"
    )
    click.echo(f"weights: {done.weights}")
    click.echo(f"model:   {done.sidecar}")


def register(cli: click.Group) -> None:
    """Add this module's commands to the top-level group."""
    cli.add_command(export)

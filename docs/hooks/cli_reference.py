"""MkDocs hook: replaces ``<!-- hpcdl-cli-reference -->`` with every ``hpcdl`` command's ``--help``,
rendered by click from the installed CLI, so the reference cannot drift from the code."""

from __future__ import annotations

import click

MARKER = "<!-- hpcdl-cli-reference -->"


def commands() -> list[tuple[list[str], click.Context]]:
    """(path, context) of ``hpcdl`` and every sub-command, depth first, in name order."""
    from hpcdl.cli import _register, cli

    _register()
    out: list[tuple[list[str], click.Context]] = []

    def walk(cmd: click.Command, path: list[str], parent: click.Context | None) -> None:
        settings = {"terminal_width": 100, "max_content_width": 100, **cmd.context_settings}
        ctx = click.Context(cmd, info_name=path[-1], parent=parent, **settings)
        out.append((path, ctx))
        if isinstance(cmd, click.Group):
            for name in sorted(cmd.commands):
                walk(cmd.commands[name], [*path, name], ctx)

    walk(cli, ["hpcdl"], None)
    return out


def reference() -> str:
    parts = []
    for path, ctx in commands():
        level = "#" * min(len(path) + 1, 4)
        parts.append(f"{level} `{' '.join(path)}`\n\n```text\n{ctx.command.get_help(ctx)}\n```\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, **_: object) -> str:
    return markdown.replace(MARKER, reference()) if MARKER in markdown else markdown

"""The docs site: every `hpcdl` command (from `--help`, recursively) is named in the guides, the
strict build passes and renders the CLI and API references, and a broken link fails it."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpcdl.cli import _register, cli
from tests.conftest import REPO

MKDOCS = str(Path(sys.executable).parent / "mkdocs")
GENERATED = {"cli.md"}  # the reference generated from the CLI itself does not count


def help_tree(path: tuple[str, ...] = ()) -> dict[tuple[str, ...], str]:
    """Every command path → its `--help` text, from `hpcdl [PATH] --help` recursively (in this
    process: one interpreter start per command took ~35 s; test_cli runs the real entry point)."""
    result = CliRunner().invoke(cli, [*path, "--help"], prog_name="hpcdl")
    assert result.exit_code == 0, result.output
    tree = {path: result.output}
    if "\nCommands:\n" in result.output:
        listing = result.output.split("\nCommands:\n", 1)[1]
        for name in re.findall(r"^  ([a-z][a-z0-9-]*)\s", listing, flags=re.M):
            tree.update(help_tree((*path, name)))
    return tree


@pytest.fixture(scope="module")
def commands() -> dict[tuple[str, ...], str]:
    _register()  # what main() does before it runs a command
    return help_tree()


def guides() -> str:
    pages = [p for p in (REPO / "docs").glob("*.md") if p.name not in GENERATED]
    return "\n".join(p.read_text() for p in pages)


def build(config: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MKDOCS, "build", "--strict", "-f", str(config), "--site-dir", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            "NO_MKDOCS_2_WARNING": "1",
            "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
        },
    )


def test_every_command_is_in_the_guides(commands):
    assert len(commands) > 25 and ("sweep", "throttle") in commands and ("init",) in commands
    text = guides()
    missing = [
        "hpcdl " + " ".join(path)
        for path in commands
        if path and not re.search(re.escape("hpcdl " + " ".join(path)) + r"(?![\w-])", text)
    ]
    assert missing == [], f"commands no guide in docs/ mentions: {missing}"


def test_strict_build_renders_the_cli_and_api_references(commands, tmp_path):
    proc = build(REPO / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = (tmp_path / "site/cli/index.html").read_text()
    plain = html.unescape(re.sub(r"<[^>]+>", "", cli))
    for path, text in commands.items():
        assert f"<code>hpcdl {' '.join(path)}</code>".replace(" </code>", "</code>") in cli, path
        first = text.split("\n\n")[1].strip().splitlines()[0]  # the first line of the help
        assert first in plain, (path, first)
    api = (tmp_path / "site/api/index.html").read_text()
    for name in ["hpcdl.job.Job", "hpcdl.train.run.Run", "hpcdl.hpo.Sweep", "hpcdl.site.SiteProfile",
                 "hpcdl.scheduler.JobHandle", "hpcdl.data.reader.ShardedDataset",
                 "hpcdl.data.manifest.Manifest", "hpcdl.scheduler.get_scheduler"]:  # fmt: skip
        assert f'id="{name}"' in api, name
    assert "A batch job: a command or a Python callable" in api  # docstrings, not only headings
    nav = (REPO / "mkdocs.yml").read_text()
    for page in (REPO / "docs").glob("*.md"):
        assert page.name in nav, f"{page.name} is not in the nav"


def test_a_broken_link_fails_the_strict_build(tmp_path):
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with (tmp_path / "docs/index.md").open("a") as f:
        f.write("\nSee [the missing page](no-such-page.md).\n")
    proc = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode != 0
    assert "no-such-page.md" in proc.stderr


def test_the_readme_points_to_the_docs():
    readme = (REPO / "README.md").read_text()
    assert "make docs" in readme and "docs/index.md" in readme

"""hpcdl as an installed package: profiles shipped inside it, the search path and where each profile
comes from, `hpcdl init`, shell completion. (`make wheel-check` runs the built wheel itself.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hpcdl.site import PACKAGE_SITE_DIR, load_site, site_origins, site_search_path
from tests.conftest import REPO, run_cli

PROFILE = "name: {name}\nscheduler: local\ndescription: {description}\n"


@pytest.fixture
def search_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """One folder per place on the search path (the system one through $XDG_CONFIG_DIRS), the
    current folder an empty one: nothing of the checkout but the package's own profiles."""
    dirs = {
        "HPCDL_SITE_PATH": tmp_path / "env",
        "user": tmp_path / "config/hpcdl/sites",
        "system": tmp_path / "xdg/hpcdl/sites",
        "./site": tmp_path / "cwd/site",  # never searched: used only when named
    }
    for d in dirs.values():
        d.mkdir(parents=True)
    monkeypatch.setenv("HPCDL_SITE_PATH", str(dirs["HPCDL_SITE_PATH"]))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CONFIG_DIRS", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path / "cwd")
    return dirs


def test_the_package_ships_the_local_profile_and_the_examples():
    shipped = {p.stem for p in PACKAGE_SITE_DIR.glob("*.yaml")}
    assert {"local", "devcluster", "example-gpu-site"} <= shipped
    for name in shipped:
        assert load_site(PACKAGE_SITE_DIR / f"{name}.yaml").name == name
    assert not (REPO / "site").exists(), "profiles live in hpcdl/sites (package data) only"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"sites/*.yaml"' in pyproject and '"configs/*.yaml"' in pyproject


def test_search_order_first_match_wins_and_says_where(search_path):
    order = [label for _, label in site_search_path()]
    assert order[0] == "HPCDL_SITE_PATH" and order[-1] == "package"
    assert order.index("user") < order.index("system") < order.index("package")
    assert (
        "./site" not in order
    )  # a checkout's ./site overrides nothing (tests/cluster/test_trust.py)
    assert Path("/etc/hpcdl/sites") in [d for d, _ in site_search_path()]
    # Only the package: `local` from there, whatever ./site holds.
    (search_path["./site"] / "local.yaml").write_text(
        PROFILE.format(name="local", description="from ./site")
    )
    assert site_origins()["local"] == (PACKAGE_SITE_DIR / "local.yaml", "package")
    # Each place, from the last to the first, overrides `local` in turn.
    for origin in ["system", "user", "HPCDL_SITE_PATH"]:
        path = search_path[origin] / "local.yaml"
        path.write_text(PROFILE.format(name="local", description=f"from {origin}"))
        assert site_origins()["local"] == (path.resolve(), origin)
        assert load_site("local").description == f"from {origin}"
    (search_path["system"] / "cluster.yaml").write_text(
        PROFILE.format(name="cluster", description="the admins'")
    )
    assert site_origins()["cluster"][1] == "system"


def test_site_list_says_where_each_profile_comes_from(search_path):
    (search_path["user"] / "mine.yaml").write_text(PROFILE.format(name="mine", description="u"))
    (search_path["user"] / "local.yaml").write_text(PROFILE.format(name="local", description="u"))
    proc = run_cli("site", "list", cwd=Path.cwd())
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()}
    assert rows["mine"][1:] == ["user", str((search_path["user"] / "mine.yaml").resolve())]
    assert rows["local"][1:] == ["(default)", "user", str(search_path["user"] / "local.yaml")]
    assert rows["example-gpu-site"][1:] == [
        "package",
        str(PACKAGE_SITE_DIR / "example-gpu-site.yaml"),
    ]
    assert str(search_path["system"]) in proc.stderr  # "searched: ..."
    missing = run_cli("submit", "--site", "nowhere", "--", "true", cwd=Path.cwd())
    assert missing.returncode == 2
    assert "'nowhere' (available: devcluster, example-gpu-site, local, mine)" in missing.stderr


def test_init_writes_the_examples_and_the_digits_data(tmp_path):
    proc = run_cli("init", str(tmp_path / "work"), cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    configs = sorted(p.name for p in (tmp_path / "work/configs").glob("*.yaml"))
    assert configs == sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    spec = yaml.safe_load((tmp_path / "work/configs/sweep_digits.yaml").read_text())
    assert (tmp_path / "work/configs" / spec["train"]).is_file()
    train = yaml.safe_load((tmp_path / "work/configs/train_digits.yaml").read_text())
    for split, samples in [("train", 1437), ("val", 180), ("test", 180)]:
        manifest = json.loads((tmp_path / "work/data/digits" / split / "manifest.json").read_text())
        assert manifest["samples"] == samples
    assert (tmp_path / "work" / train["data"]["train"]).is_dir()  # the configs' relative paths
    again = run_cli("init", str(tmp_path / "work"), cwd=tmp_path)
    assert again.returncode == 2 and "use --force" in again.stderr
    assert again.stderr.startswith("error: ") and "Traceback" not in again.stderr
    forced = run_cli("init", str(tmp_path / "work"), "--force", "--no-data", cwd=tmp_path)
    assert forced.returncode == 0 and "data: skipped" in forced.stdout


def test_shell_completion_script_and_completions(tmp_path):
    script = run_cli(env={"_HPCDL_COMPLETE": "bash_source"}, cwd=tmp_path)
    assert script.returncode == 0, script.stderr
    assert "complete -o nosort -F _hpcdl_completion hpcdl" in script.stdout
    assert "_HPCDL_COMPLETE=bash_complete" in script.stdout
    for shell, mark in [("zsh", "#compdef hpcdl"), ("fish", "complete --no-files --command hpcdl")]:
        out = run_cli(env={"_HPCDL_COMPLETE": f"{shell}_source"}, cwd=tmp_path).stdout
        assert mark in out

    def complete(*words: str) -> list[str]:
        env = {
            "_HPCDL_COMPLETE": "bash_complete",
            "COMP_WORDS": " ".join(["hpcdl", *words]),
            "COMP_CWORD": str(len(words)),
        }
        proc = run_cli(env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    assert complete("sw") == ["plain,sweep"]
    assert complete("sweep", "th") == ["plain,throttle"]
    assert "plain,example-gpu-site" in complete("site", "show", "ex")
    assert "plain,init" in complete("")

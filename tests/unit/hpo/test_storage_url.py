"""The study storage's address (``storage:`` of a spec, ``study_storage:`` of a site), by table:
what is accepted, what is refused, and that a refusal never repeats a password."""

from __future__ import annotations

import pytest

from hpcdl.config import validate
from hpcdl.database import StudyDatabase, check_url
from hpcdl.errors import ConfigError
from hpcdl.hpo.spec import SweepSpec
from hpcdl.hpo.storage import database, resolve, study_name
from hpcdl.site import load_site

GOOD = [
    "postgresql://alice@db.example.org:5432/hpo",
    "postgresql://db/hpo",
    "postgres://alice@10.0.0.7/hpo_2",
    "postgresql+psycopg://alice@[::1]:5433/hpo",
    "postgresql://alice@db/hpo?sslmode=require",
]
BAD = [
    ("postgresql://alice:s3cr3t-pw@db/hpo", "holds a password"),
    ("postgresql://alice:@db/hpo", "holds a password"),
    ("postgresql://alice@db/hpo?password=s3cr3t-pw", "sets password"),
    ("postgresql://alice@db/hpo?passfile=/tmp/x", "sets passfile"),
    ("mysql://alice@db/hpo", "'journal' or a PostgreSQL URL"),
    ("sqlite:///tmp/x.db", "'journal' or a PostgreSQL URL"),
    ("postgresql://alice@db", "names no database"),
    ("postgresql://alice@db/", "names no database"),
    ("postgresql://alice@/hpo", "names no host"),
    ("postgresql://alice@db:99999/hpo", "port"),
    ("postgresql://al ice@db/hpo", "space"),
    ("postgresql://alice@db/hpo#frag", "'#' part"),
    ("postgresql://a'b@db/hpo", "user name"),
]


@pytest.mark.parametrize("url", GOOD)
def test_good_urls(url):
    check_url(url)
    assert StudyDatabase(url=url).sqlalchemy_url.startswith("postgresql+psycopg://")


@pytest.mark.parametrize(("url", "why"), BAD)
def test_bad_urls(url, why):
    with pytest.raises(ValueError, match=why.replace("(", r"\(")) as exc:
        check_url(url)
    assert "s3cr3t-pw" not in str(exc.value) and url not in str(exc.value)


def _spec(storage):
    return {"name": "s", "objective": "m:f", "trials": 2, "storage": storage,
            "space": {"x": {"type": "uniform", "low": 0, "high": 1}}}  # fmt: skip


@pytest.mark.parametrize("url", [u for u, _ in BAD])
def test_the_spec_error_is_one_line_without_the_password(url):
    with pytest.raises(ConfigError) as exc:
        validate(SweepSpec, _spec(url), "sweep.yaml")
    assert str(exc.value).startswith("sweep.yaml: storage: ")
    assert "s3cr3t-pw" not in str(exc.value) and "more problem" not in str(exc.value)


def test_journal_takes_no_database_fields():
    with pytest.raises(ConfigError, match="password_file applies to a database"):
        validate(SweepSpec, _spec({"url": "journal", "password_file": "~/pw"}), "s.yaml")


def test_the_spec_wins_over_the_site_then_the_journal(monkeypatch):
    site = load_site("local")
    plain = SweepSpec.model_validate(_spec(None))
    assert resolve(plain, site).storage.journal  # nothing said: the journal file
    pg = site.model_copy(update={"study_storage": StudyDatabase(url="postgresql://a@db/hpo")})
    chosen = resolve(plain, pg)
    assert database(chosen).url == "postgresql://a@db/hpo"
    assert study_name(chosen).split("/")[1] == "s"  # USER/SWEEP/RANDOM
    assert study_name(resolve(plain, pg)) != study_name(chosen)  # one study per sweep
    journal = SweepSpec.model_validate(_spec("journal"))
    assert resolve(journal, pg).storage.journal  # the spec's choice over the site's
    assert study_name(resolve(journal, pg)) == "s"
    assert SweepSpec.model_validate_json(chosen.model_dump_json()) == chosen  # spec.json round trip


def test_the_password_file_is_saved_as_an_absolute_path(monkeypatch, tmp_path):
    """The workers open it from another folder (or node): `sweep run` saves where it is."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    site = load_site("local")
    for given, saved in (("~/pw", tmp_path / "pw"), ("pw", tmp_path / "pw"),
                         ("$HOME/x/pw", tmp_path / "x/pw")):  # fmt: skip
        spec = SweepSpec.model_validate(
            _spec({"url": "postgresql://a@db/hpo", "password_file": given})
        )
        assert resolve(spec, site).storage.password_file == str(saved)

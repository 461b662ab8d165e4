"""Where a sweep's Optuna study lives: the journal file in the sweep folder, or a PostgreSQL
database (``storage: postgresql://USER@HOST:PORT/DB`` in a sweep spec, or a site profile's
``study_storage``).

Only the address is configuration: the password is never in a spec, a site profile, a command
line or anything hpcdl writes. It comes from ``password_file`` (a 0600 file of this user's,
read where the study is opened, the way site secrets are) or, without one, from libpq's own
``~/.pgpass``. A URL that carries a password is refused, and the error does not repeat it.

This module only parses and checks the address (it sits below ``site``, which reads it from
profiles); connecting is :mod:`hpcdl.hpo.storage`'s.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_serializer, model_validator

SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")
_HOST = re.compile(r"^[A-Za-z0-9_.:\[\]-]+$")  # names, IPv4, [IPv6]
_WORD = re.compile(r"^[A-Za-z0-9_.$-]+$")  # user and database names without quoting
#: A study name per sweep in a shared database (set by ``sweep run``, kept in the sweep's spec).
_STUDY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,199}$")


class StudyDatabase(BaseModel):
    """Where studies live: ``url`` is ``journal`` (the sweep folder's file) or a PostgreSQL
    database (no password in it); ``password_file`` (optional; else libpq's ``~/.pgpass``);
    ``study`` (the study's name in the database, unique per sweep: ``sweep run`` sets it).

    One model for both, not a union: pydantic's union errors name the member types and add a
    "more problems" for the member that did not apply."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    password_file: str | None = None
    study: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _check(cls, data: Any) -> Any:
        # Checked on the whole mapping, not the url field: pydantic's error for a field repeats
        # its value, and a URL with a password in it must not be printed.
        if not isinstance(data, dict | StudyDatabase):
            raise ValueError("give journal, a postgresql:// URL or {url, password_file}")
        if isinstance(data, dict):
            if data.get("url") == "journal":
                extra = sorted(k for k, v in data.items() if k != "url" and v is not None)
                if extra:
                    raise ValueError(f"{extra[0]} applies to a database, not to the journal")
            elif isinstance(data.get("url"), str):
                check_url(data["url"])
            pw = data.get("password_file")
            if isinstance(pw, str) and (not pw.strip() or any(c in pw for c in "\n\r\0")):
                raise ValueError("password_file must be a path on one line")
            study = data.get("study")
            if isinstance(study, str) and not _STUDY.match(study):
                raise ValueError(
                    "study must be letters, digits and '_.:/-' (200 at most), starting with "
                    "a letter or digit"
                )
        return data

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> Any:
        return "journal" if self.journal else handler(self)

    @property
    def journal(self) -> bool:
        return self.url == "journal"

    @property
    def password_path(self) -> Path | None:
        if self.password_file is None:
            return None
        return Path(os.path.expandvars(os.path.expanduser(self.password_file))).absolute()

    @property
    def sqlalchemy_url(self) -> str:
        """The URL with psycopg (v3) as SQLAlchemy's driver (its default would be psycopg2)."""
        return "postgresql+psycopg://" + self.url.split("://", 1)[1]

    def __str__(self) -> str:
        return self.url


def check_url(url: str) -> None:
    """Raise ValueError (without the URL's text) unless ``url`` is
    ``postgresql://[USER@]HOST[:PORT]/DB[?OPTION=VALUE...]`` without a password."""
    form = "give postgresql://USER@HOST:PORT/DATABASE"
    if any(c.isspace() or c == "\0" for c in url):
        raise ValueError(f"the storage URL has a space or control character: {form}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(f"the storage URL is not a URL (bad port or brackets): {form}") from None
    if parts.scheme not in SCHEMES:
        raise ValueError(f"the storage must be 'journal' or a PostgreSQL URL: {form}")
    if parts.password is not None or ":" in parts.netloc.rpartition("@")[0]:
        raise ValueError(
            "the storage URL holds a password (not shown): remove it; hpcdl reads the password "
            "from password_file (a file only you can read, chmod 600) or from ~/.pgpass"
        )
    if not parts.hostname or not _HOST.match(parts.hostname):
        raise ValueError(f"the storage URL names no host: {form}")
    if parts.username is not None and not _WORD.match(parts.username):
        raise ValueError("the storage URL's user name has characters other than A-Z a-z 0-9 _.$-")
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"the storage URL's port must be 1-65535: {form}")
    db = parts.path.removeprefix("/")
    if not db or not _WORD.match(db):
        raise ValueError(f"the storage URL names no database (or has characters other than A-Z a-z 0-9 _.$-): {form}")  # fmt: skip
    if parts.fragment:
        raise ValueError(f"the storage URL has a '#' part: {form}")
    for key, _ in parse_qsl(parts.query, keep_blank_values=True):
        if key.lower() in ("password", "passfile"):
            raise ValueError(
                f"the storage URL sets {key} (not shown): hpcdl reads the password from "
                "password_file or ~/.pgpass, never from the URL"
            )


def _as_storage(value: Any) -> Any:
    """A string is the ``url`` (``journal`` or a database's)."""
    return {"url": value} if isinstance(value, str) else value


StorageChoice = Annotated[StudyDatabase, BeforeValidator(_as_storage)]
"""``storage:`` of a spec (``study_storage:`` of a site): ``journal``, a URL, or
``{url, password_file}``."""

"""Which database errors a worker waits out (hpcdl.hpo.db_retry), on the exception chains
Optuna's RDBStorage raises: StorageInternalError from SQLAlchemy's OperationalError, whose
``orig`` is psycopg's error (the chain the 256-worker bench died of)."""

from __future__ import annotations

import random

import optuna
import psycopg
import pytest
import sqlalchemy.exc

from hpcdl.hpo import db_retry


def _as_optuna_raises(driver_error: BaseException) -> BaseException:
    """``driver_error`` wrapped as RDBStorage's session wraps it."""
    wrapped = sqlalchemy.exc.OperationalError("SELECT 1", {}, driver_error)
    try:
        try:
            raise wrapped
        except sqlalchemy.exc.OperationalError as e:
            raise optuna.exceptions.StorageInternalError(
                "An exception is raised during the commit."
            ) from e
    except optuna.exceptions.StorageInternalError as outer:
        return outer


def _with_state(state: str) -> psycopg.Error:
    """The driver's error class for SQLSTATE ``state``, as the server's error gives it."""
    return psycopg.errors.lookup(state)("x")


CASES = [
    ("connect timeout (the bench's)", psycopg.errors.ConnectionTimeout("connection timeout expired"), True),
    ("refused: server down", psycopg.OperationalError('connection failed: connection to server at "127.0.0.1", port 5433 failed: Connection refused'), True),
    ("too many clients", psycopg.OperationalError("connection failed: FATAL:  sorry, too many clients already"), True),
    ("starting up", psycopg.OperationalError("connection failed: FATAL:  the database system is starting up"), True),
    ("dropped mid-query", psycopg.OperationalError("server closed the connection unexpectedly"), True),
    ("SQLSTATE 53300", _with_state("53300"), True),
    ("SQLSTATE 57P01 admin shutdown", _with_state("57P01"), True),
    ("SQLSTATE 08006 connection failure", _with_state("08006"), True),
    ("wrong password", psycopg.OperationalError('connection failed: FATAL:  password authentication failed for user "alice"'), False),
    ("no such database", psycopg.OperationalError('connection failed: FATAL:  database "hpo" does not exist'), False),
    ("SQLSTATE 28P01 invalid password", _with_state("28P01"), False),
    ("a bug, not the connection", ValueError("invalid literal"), False),
]  # fmt: skip


@pytest.mark.parametrize("label,error,expected", CASES, ids=[c[0] for c in CASES])
def test_transient_through_optunas_wrapping(label, error, expected):
    assert db_retry.transient(error) is expected
    assert db_retry.transient(_as_optuna_raises(error)) is expected


def test_waits_grow_to_the_cap_and_differ_between_workers():
    a = list(zip(range(12), db_retry.delays(random.Random(1)), strict=False))
    b = list(zip(range(12), db_retry.delays(random.Random(2)), strict=False))
    assert all(0 <= d <= db_retry.FIRST_DELAY_S * 2**i for i, d in a[:5])
    assert all(d <= db_retry.MAX_DELAY_S for _, d in a)
    assert max(d for _, d in a[8:]) > db_retry.FIRST_DELAY_S * 4  # the window grew
    assert a != b


def test_the_log_names_the_drivers_error_not_optunas_wrapper():
    timeout = psycopg.errors.ConnectionTimeout("connection timeout expired")
    assert db_retry.root_cause(_as_optuna_raises(timeout)) is timeout
    assert db_retry.root_cause(timeout) is timeout

"""What a database error means, decided in one place: an outage to retry, a value refused, or a bug.

Postgres names every error with a SQLSTATE; asyncpg carries it on its exceptions and
SQLAlchemy keeps it on ``DBAPIError.orig``. The classes that mean "the database cannot
serve now" (connection trouble, shutdown, crash recovery, too many connections, a
serialization conflict) are worth retrying, so an HTTP caller gets 503 with ``Retry-After``
and an event consumer retries. A data exception (class 22: a NUL in text, a number out of
range) is permanent: retrying the same value fails the same way. Everything else is a bug.
"""

from __future__ import annotations

import asyncio
from enum import StrEnum

from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from lorafaas.errors import InvalidInput, LorafaasError, ServiceUnavailable

# SQLSTATE classes and codes of a database that cannot serve now but may soon.
_TRANSIENT_CLASSES = (
    "08",  # connection exception
    "40",  # serialization failure, deadlock: the transaction may succeed when retried
    "53",  # insufficient resources: too many connections, disk full, out of memory
    "57",  # operator intervention: shutdown, crash recovery (57P03 "not yet accepting connections"), timeouts
    "58",  # system error: I/O error
)
_TRANSIENT_CODES = ("55P03",)  # lock not available
_DATA_CLASS = "22"  # data exception: invalid byte sequence (NUL), numeric or datetime out of range

RETRY_AFTER_S = 1.0
# What a handler may see from the database: SQLAlchemy's errors, and a refused or timed-out
# connect (raw). Other OSErrors (a file name too long, ...) are not the database's.
DATABASE_ERRORS: tuple[type[Exception], ...] = (DBAPIError, PoolTimeout, ConnectionError, TimeoutError)


class DbFailure(StrEnum):
    UNAVAILABLE = "unavailable"  # retry later
    DATA = "data"  # permanent: the value can never be stored
    OTHER = "other"  # a constraint the caller handles (IntegrityError), or a bug


def sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE of a database error, looked up through SQLAlchemy's wrapper and the cause chain."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "sqlstate", None)
        if isinstance(code, str) and code:
            return code
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return None


def classify(error: BaseException) -> DbFailure:
    """Whether a database error is an outage, a refused value, or something else."""
    if isinstance(error, IntegrityError):
        return DbFailure.OTHER
    code = sqlstate(error)
    if code is not None:
        if code[:2] in _TRANSIENT_CLASSES or code in _TRANSIENT_CODES:
            return DbFailure.UNAVAILABLE
        if code[:2] == _DATA_CLASS:
            return DbFailure.DATA
        return DbFailure.OTHER
    if isinstance(error, (OperationalError, InterfaceError, PoolTimeout, OSError, asyncio.TimeoutError)):
        return DbFailure.UNAVAILABLE
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return DbFailure.UNAVAILABLE
    return DbFailure.OTHER


def domain_error(error: BaseException) -> LorafaasError | None:
    """The domain error a database failure stands for, or None when it is not one the caller can act on."""
    kind = classify(error)
    if kind == DbFailure.UNAVAILABLE:
        return ServiceUnavailable("the database is unavailable; retry shortly", retry_after_s=RETRY_AFTER_S)
    if kind == DbFailure.DATA:
        return InvalidInput(
            "the database refused a value of this request: a number or time out of range, "
            "or a character it cannot store (NUL)"
        )
    return None

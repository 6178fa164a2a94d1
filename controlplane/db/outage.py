"""Which database errors are worth a retry: connection trouble, not a statement Postgres refused.

A statement that Postgres refuses for its data (a NUL byte in text, a value out of range, a
broken constraint) fails the same way on every retry, so retrying it only holds its work up
for good. Only errors of the connection or of the server's state (away, restarting, in crash
recovery, out of connections, a deadlock to re-run) pass after a while.
"""

from __future__ import annotations

import asyncio

from asyncpg.exceptions import ConnectionDoesNotExistError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

# SQLSTATE classes that say "try again later", not "this statement is wrong":
# 08 connection exception, 40 transaction rollback (serialization failure, deadlock),
# 53 insufficient resources, 57 operator intervention (shutdown, crash recovery: 57P03),
# 58 system error (I/O).
TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57", "58"})


def sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE Postgres answered with, if the error came from the server."""
    orig = getattr(error, "orig", None)
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code if isinstance(code, str) else None


def is_transient(error: BaseException) -> bool:
    """True for connection-level trouble (retry later); False for an error the same statement will hit again."""
    if isinstance(error, (OSError, asyncio.TimeoutError, PoolTimeout)):
        return True
    if not isinstance(error, DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    code = sqlstate(error)
    if code is not None:
        return code[:2] in TRANSIENT_SQLSTATE_CLASSES
    # No SQLSTATE: the driver failed before the server answered. Transient only if the
    # connection broke; a value the driver could not encode (asyncpg's DataError) is permanent.
    cause = error.orig.__cause__ if error.orig is not None else None
    return isinstance(cause, OSError | asyncio.TimeoutError | ConnectionDoesNotExistError)

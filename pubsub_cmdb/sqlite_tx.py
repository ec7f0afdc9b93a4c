"""The one write-transaction helper that the CMDB store and the embedded broker share."""
import sqlite3
from contextlib import contextmanager


@contextmanager
def write_transaction(con: sqlite3.Connection):
    """BEGIN IMMEDIATE takes the write lock up front: check-then-write cannot race, nor deadlock halfway.

    The connection must be in autocommit mode (isolation_level=None); commits on success, rolls back on
    any exception.
    """
    con.execute("BEGIN IMMEDIATE")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")

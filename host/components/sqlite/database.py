"""The components database: one SQLite file, its schema, and one locked connection per
component (WAL journal, ``synchronous=FULL``: a write is on disk before the call returns)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from layotto.host.components import ComponentError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    scope TEXT NOT NULL, store TEXT NOT NULL, key TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (scope, store, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state (
    store TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, etag INTEGER NOT NULL,
    PRIMARY KEY (store, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS locks (
    store TEXT NOT NULL, resource TEXT NOT NULL, owner TEXT NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (store, resource)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS config (
    store TEXT NOT NULL, grp TEXT NOT NULL, label TEXT NOT NULL, key TEXT NOT NULL,
    content TEXT NOT NULL, tags TEXT NOT NULL, metadata TEXT NOT NULL,
    PRIMARY KEY (store, grp, label, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pubsub_messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, store TEXT NOT NULL, topic TEXT NOT NULL,
    id TEXT NOT NULL, data BLOB NOT NULL, content_type TEXT NOT NULL, metadata TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS pubsub_messages_topic ON pubsub_messages (store, topic, seq);
CREATE TABLE IF NOT EXISTS pubsub_groups (
    store TEXT NOT NULL, topic TEXT NOT NULL, grp TEXT NOT NULL, cursor INTEGER NOT NULL,
    durable INTEGER NOT NULL, PRIMARY KEY (store, topic, grp)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pubsub_pending (
    store TEXT NOT NULL, topic TEXT NOT NULL, grp TEXT NOT NULL, seq INTEGER NOT NULL,
    attempts INTEGER NOT NULL, owner TEXT NOT NULL,
    PRIMARY KEY (store, topic, grp, seq)) WITHOUT ROWID;
"""


class Database:
    """One connection to the components database, shared by the threads of one component."""

    def __init__(self, path: str | Path, *, busy_timeout: float = 30.0) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as e:
            raise ComponentError(f"cannot open the components database {self.path}: {e}") from e
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
        except sqlite3.Error as e:
            conn.close()
            raise ComponentError(f"cannot set up the components database {self.path}: {e}") from e
        self._conn: sqlite3.Connection | None = conn

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ComponentError(f"component closed (database {self.path})")
        return self._conn

    def fetch_one(self, sql: str, params: tuple[object, ...]) -> Any:
        """One row of a read (None if there is none): :meth:`read` for the hottest reads,
        without a context manager around them."""
        with self._lock:
            try:
                return self._connection().execute(sql, params).fetchone()
            except sqlite3.Error as e:
                raise ComponentError(f"components database {self.path}: {e}") from e

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._connection()
            except sqlite3.Error as e:
                raise ComponentError(f"components database {self.path}: {e}") from e

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE): committed when the block ends, rolled
        back when it raises."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise ComponentError(f"components database {self.path}: {e}") from e
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as e:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error):
                    raise ComponentError(f"components database {self.path}: {e}") from e
                raise

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def next_counter(conn: sqlite3.Connection, scope: str, store: str, key: str) -> int:
    row = conn.execute(
        "INSERT INTO counters (scope, store, key, value) VALUES (?, ?, ?, 1) "
        "ON CONFLICT (scope, store, key) DO UPDATE SET value = value + 1 RETURNING value",
        (scope, store, key),
    ).fetchone()
    return int(row[0])

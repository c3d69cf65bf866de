"""State on SQLite: etags from a counter per store, transactions in one SQLite transaction."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from layotto.host.components import ETagMismatch, OpKind, StateItem, StateOp
from layotto.host.components.sqlite.database import Database, next_counter

_GET = "SELECT value, etag FROM state WHERE store = ? AND key = ?"


class SqliteStateStore:
    """Key/value state with etags and transactions (features ETAG, TRANSACTIONAL)."""

    in_process = True  # no network wait: its calls may run on the event loop

    def __init__(self, path: str | Path, *, name: str = "default") -> None:
        self.name = name
        self._db = Database(path)

    def features(self) -> frozenset[str]:
        return frozenset({"ETAG", "TRANSACTIONAL"})

    def get(self, key: str) -> StateItem | None:
        row = self._db.fetch_one(_GET, (self.name, key))
        return None if row is None else StateItem(key, bytes(row[0]), str(row[1]))

    def bulk_get(self, keys: Sequence[str]) -> list[StateItem | None]:
        with self._db.read() as conn:
            found: list[StateItem | None] = []
            for key in keys:
                row = conn.execute(
                    "SELECT value, etag FROM state WHERE store = ? AND key = ?", (self.name, key)
                ).fetchone()
                found.append(None if row is None else StateItem(key, bytes(row[0]), str(row[1])))
        return found

    def _current(self, conn: sqlite3.Connection, key: str, etag: str | None) -> int | None:
        row = conn.execute("SELECT etag FROM state WHERE store = ? AND key = ?", (self.name, key)).fetchone()
        current = None if row is None else int(row[0])
        if etag and (current is None or str(current) != etag):
            raise ETagMismatch(f"state {self.name!r}: etag {etag!r} does not match key {key!r}")
        return current

    def _set(self, conn: sqlite3.Connection, key: str, value: bytes, etag: str | None) -> str:
        self._current(conn, key, etag)
        new = next_counter(conn, "etag", self.name, "")
        conn.execute(
            "INSERT INTO state (store, key, value, etag) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (store, key) DO UPDATE SET value = excluded.value, etag = excluded.etag",
            (self.name, key, bytes(value), new),
        )
        return str(new)

    def _delete(self, conn: sqlite3.Connection, key: str, etag: str | None) -> bool:
        if self._current(conn, key, etag) is None:
            return False
        conn.execute("DELETE FROM state WHERE store = ? AND key = ?", (self.name, key))
        return True

    def set(self, key: str, value: bytes, etag: str | None = None) -> str:
        with self._db.write() as conn:
            return self._set(conn, key, value, etag)

    def delete(self, key: str, etag: str | None = None) -> bool:
        with self._db.write() as conn:
            return self._delete(conn, key, etag)

    def transact(self, ops: Sequence[StateOp]) -> None:
        with self._db.write() as conn:
            for op in ops:
                if op.kind is OpKind.UPSERT:
                    self._set(conn, op.key, op.value, op.etag)
                elif op.kind is OpKind.DELETE:
                    self._delete(conn, op.key, op.etag)
                else:
                    raise ValueError(f"unknown state operation {op.kind!r}")

    def close(self) -> None:
        self._db.close()

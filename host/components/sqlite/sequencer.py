"""The sequencer on SQLite: a durable counter per key."""

from __future__ import annotations

from pathlib import Path

from layotto.host.components.sqlite.database import Database, next_counter


class SqliteSequencer:
    """Ids 1, 2, 3, ... per key, durable across restarts."""

    in_process = True  # no network wait: its calls may run on the event loop

    def __init__(self, path: str | Path, *, name: str = "default") -> None:
        self.name = name
        self._db = Database(path)

    def next_id(self, key: str) -> int:
        with self._db.write() as conn:
            return next_counter(conn, "sequence", self.name, key)

    def close(self) -> None:
        self._db.close()

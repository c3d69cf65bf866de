"""Locks on SQLite: a row per held resource with a wall-clock expiry (not re-entrant)."""

from __future__ import annotations

import time
from pathlib import Path

from layotto.host.components import UnlockStatus
from layotto.host.components.base import check_expire
from layotto.host.components.sqlite.database import Database


class SqliteLockStore:
    """Locks with a wall-clock expiry (not re-entrant)."""

    in_process = True  # no network wait: its calls may run on the event loop

    def __init__(self, path: str | Path, *, name: str = "default") -> None:
        self.name = name
        self._db = Database(path)

    def try_lock(self, resource_id: str, owner: str, expire_seconds: int) -> bool:
        check_expire(expire_seconds)
        with self._db.write() as conn:
            now = time.time()
            row = conn.execute(
                "SELECT expires FROM locks WHERE store = ? AND resource = ?", (self.name, resource_id)
            ).fetchone()
            if row is not None and row[0] > now:
                return False
            conn.execute(
                "INSERT INTO locks (store, resource, owner, expires) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (store, resource) DO UPDATE SET owner = excluded.owner, "
                "expires = excluded.expires",
                (self.name, resource_id, owner, now + expire_seconds),
            )
            return True

    def unlock(self, resource_id: str, owner: str) -> UnlockStatus:
        with self._db.write() as conn:
            row = conn.execute(
                "SELECT owner, expires FROM locks WHERE store = ? AND resource = ?",
                (self.name, resource_id),
            ).fetchone()
            if row is None:
                return UnlockStatus.LOCK_UNEXIST
            holder, expires = row
            now = time.time()
            if expires > now and holder != owner:
                return UnlockStatus.LOCK_BELONG_TO_OTHERS
            conn.execute("DELETE FROM locks WHERE store = ? AND resource = ?", (self.name, resource_id))
            if expires <= now:
                return UnlockStatus.LOCK_UNEXIST
            return UnlockStatus.SUCCESS

    def close(self) -> None:
        self._db.close()

"""Configuration on SQLite: items in a table, changes announced to this instance's subscribers."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from layotto.host.components import ConfigItem
from layotto.host.components.base import ConfigSubscribers, deleted_item
from layotto.host.components.sqlite.database import Database


class SqliteConfigStore:
    """Configuration items in a table; ``set``/``delete`` change them and notify this
    instance's subscribers (changes made through another instance are not noticed)."""

    in_process = True  # no network wait: its calls may run on the event loop

    def __init__(self, path: str | Path, *, name: str = "default") -> None:
        self.name = name
        self._db = Database(path)
        self._subscribers = ConfigSubscribers()

    @staticmethod
    def _item(row: Sequence[str]) -> ConfigItem:
        return ConfigItem(row[0], row[1], row[2], row[3], json.loads(row[4]), json.loads(row[5]))

    def get(self, keys: Sequence[str], *, group: str = "", label: str = "") -> list[ConfigItem]:
        sql = "SELECT key, content, grp, label, tags, metadata FROM config WHERE store = ?"
        args: list[str] = [self.name]
        if keys:
            sql += f" AND key IN ({', '.join('?' * len(keys))})"
            args += keys
        if group:
            sql += " AND grp = ?"
            args.append(group)
        if label:
            sql += " AND label = ?"
            args.append(label)
        with self._db.read() as conn:
            rows = conn.execute(sql + " ORDER BY key, grp, label", args).fetchall()
        return [self._item(row) for row in rows]

    def set(self, items: Sequence[ConfigItem]) -> None:
        """Store ``items`` (replacing those with the same key, group and label)."""
        with self._db.write() as conn:
            for item in items:
                conn.execute(
                    "INSERT INTO config (store, grp, label, key, content, tags, metadata) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (store, grp, label, key) DO UPDATE SET "
                    "content = excluded.content, tags = excluded.tags, metadata = excluded.metadata",
                    (
                        self.name,
                        item.group,
                        item.label,
                        item.key,
                        item.content,
                        json.dumps(dict(item.tags)),
                        json.dumps(dict(item.metadata)),
                    ),
                )
        self._subscribers.notify(items)

    def delete(self, keys: Sequence[str], *, group: str = "", label: str = "") -> list[ConfigItem]:
        """Remove the items with these keys (narrowed by group and label as ``get`` does;
        no keys removes nothing); returns them."""
        removed = self.get(keys, group=group, label=label) if keys else []
        with self._db.write() as conn:
            for item in removed:
                conn.execute(
                    "DELETE FROM config WHERE store = ? AND grp = ? AND label = ? AND key = ?",
                    (self.name, item.group, item.label, item.key),
                )
        self._subscribers.notify(deleted_item(item) for item in removed)
        return removed

    def subscribe(
        self, keys: Sequence[str], callback: Callable[[list[ConfigItem]], None]
    ) -> Callable[[], None]:
        return self._subscribers.add(keys, callback)

    def close(self) -> None:
        self._subscribers.clear()
        self._db.close()

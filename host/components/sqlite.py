"""Embedded components: one SQLite database file in the host's state directory.

Every component opens its own connection to the file (WAL journal, ``synchronous=FULL``:
a write is on disk before the call returns, so an acknowledged save survives ``kill -9``
of the host and a power cut) and serialises its calls with a lock, so one instance may be
used from any number of threads. Several components share one file: each keeps its rows
apart under its store name (the component's name in the registry).

Semantics shared with the Redis backend (the conformance suite pins them):

- **State.** Etags are decimal strings of a counter per store, incremented on every write
  to any key: a key deleted and written again never gets back an etag it had before.
  An empty etag means "no etag". ``set``/``delete`` with an etag on a missing key fail
  with ETagMismatch. ``transact`` applies its ops in order inside one transaction; the
  first mismatch rolls all of them back.
- **Lock.** Expiry by wall-clock time. Not re-entrant: while the lock is held (and not
  expired), ``try_lock`` is refused to every owner, its holder included. Unlock of a
  free or expired lock is LOCK_UNEXIST, by another owner LOCK_BELONG_TO_OTHERS.
- **Sequencer.** Ids start at 1 and grow by one per call, durably.
- **Pub/sub.** See ``SqlitePubSub``.
- **Configuration.** ``set``/``delete`` are the admin methods; they notify this
  instance's subscribers after the change is committed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from layotto.host.components import (
    ComponentError,
    ConfigItem,
    ETagMismatch,
    Message,
    OpKind,
    StateItem,
    StateOp,
    UnlockStatus,
)
from layotto.host.components.base import ConfigSubscribers, check_expire, deleted_item
from layotto.host.components.delivery import Claim, DeliveryLoop, Subscription

log = logging.getLogger("layotto.components.sqlite")

DEFAULT_CONTENT_TYPE = "application/octet-stream"
DEFAULT_MAX_BACKLOG = 10000  # undelivered messages a pub/sub topic keeps
DEFAULT_MAX_SUBSCRIPTIONS = 128  # subscriptions (delivery threads) per pub/sub component

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


def _next_counter(conn: sqlite3.Connection, scope: str, store: str, key: str) -> int:
    row = conn.execute(
        "INSERT INTO counters (scope, store, key, value) VALUES (?, ?, ?, 1) "
        "ON CONFLICT (scope, store, key) DO UPDATE SET value = value + 1 RETURNING value",
        (scope, store, key),
    ).fetchone()
    return int(row[0])


# --- state ------------------------------------------------------------------------------


class SqliteStateStore:
    """Key/value state with etags and transactions (features ETAG, TRANSACTIONAL)."""

    def __init__(self, path: str | Path, *, name: str = "default") -> None:
        self.name = name
        self._db = Database(path)

    def features(self) -> frozenset[str]:
        return frozenset({"ETAG", "TRANSACTIONAL"})

    def get(self, key: str) -> StateItem | None:
        with self._db.read() as conn:
            row = conn.execute(
                "SELECT value, etag FROM state WHERE store = ? AND key = ?", (self.name, key)
            ).fetchone()
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
        new = _next_counter(conn, "etag", self.name, "")
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


# --- lock ---------------------------------------------------------------------------------


class SqliteLockStore:
    """Locks with a wall-clock expiry (not re-entrant)."""

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


# --- sequencer ----------------------------------------------------------------------------


class SqliteSequencer:
    """Ids 1, 2, 3, ... per key, durable across restarts."""

    def __init__(self, path: str | Path, *, name: str = "default") -> None:
        self.name = name
        self._db = Database(path)

    def next_id(self, key: str) -> int:
        with self._db.write() as conn:
            return _next_counter(conn, "sequence", self.name, key)

    def close(self) -> None:
        self._db.close()


# --- configuration ------------------------------------------------------------------------


class SqliteConfigStore:
    """Configuration items in a table; ``set``/``delete`` change them and notify this
    instance's subscribers (changes made through another instance are not noticed)."""

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


# --- pub/sub ------------------------------------------------------------------------------


class SqlitePubSub(DeliveryLoop):
    """A durable message queue in the components database (its subscriptions and their
    delivery are ``DeliveryLoop``'s).

    Semantics (shared with ``RedisPubSub``):

    - A subscription belongs to a **group**. ``subscribe(topic, h)`` makes a group of its
      own, which exists until it is cancelled: it receives the messages published from the
      moment ``subscribe`` returns, and none published before or while it does not exist
      (a message published on a topic nobody subscribes to is not kept).
    - ``subscribe(topic, h, group="name")`` joins a **durable** group: the group exists from
      its first subscription on, across cancels, closes and restarts (until
      ``delete_group``), so messages published while none of its handlers runs wait for the
      next one. Subscriptions of one group share its messages (each goes to one of them);
      every group gets every message.
    - Per subscription, messages are delivered one at a time in publish order. RETRY (or an
      exception from the handler) delivers the same message again after ``retry_delay``
      seconds, with ``Message.attempt`` counting up, until ``max_attempts`` deliveries;
      then, as on DROP, it is discarded. A message is never delivered more than
      ``max_attempts`` times, even across a crash (attempts are recorded before delivery):
      at-least-once up to that bound.
    - Messages are on disk once ``publish`` returns. A message whose delivery a crash or
      a cancel interrupted goes, in its group, before the next new one.

    - **Bounds.** A slow, stuck or absent subscriber cannot make the store hold messages
      without limit: a topic keeps at most ``max_backlog`` undelivered messages (metadata
      ``maxBacklog``, default 10000); publishing beyond that drops the oldest ones for the
      groups that lag (logged), as a capped stream does. Each subscription is one
      delivery thread, so the component takes at most ``max_subscriptions`` of them
      (metadata ``maxSubscriptions``, default 128); one more is a ComponentError.

    One instance owns a store name in a database file at a time (a lock file beside the
    database enforces it), so that opening it can reclaim what a crashed host left.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        name: str = "default",
        poll_interval: float = 0.5,
        retry_delay: float = 0.1,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
        max_subscriptions: int = DEFAULT_MAX_SUBSCRIPTIONS,
    ) -> None:
        if max_backlog < 1 or max_subscriptions < 1:
            raise ComponentError(
                f"pubsub {name!r}: maxBacklog and maxSubscriptions must be at least 1 "
                f"(not {max_backlog}, {max_subscriptions})"
            )
        self.name = name
        self._poll_interval = poll_interval
        self.error_pause = poll_interval
        self._max_backlog = max_backlog
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        self._owner_path = Path(f"{path}.pubsub-{digest}.lock")
        self._owner_fd = self._take_ownership(self._owner_path, name)
        try:
            self._db = Database(path)
            self._recover()
        except BaseException:
            os.close(self._owner_fd)
            raise
        self._wakeup = threading.Condition()
        self._generation = 0
        self._init_loop(retry_delay=retry_delay, max_subscriptions=max_subscriptions)

    @staticmethod
    def _take_ownership(path: Path, name: str) -> int:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise ComponentError(f"pubsub {name!r}: cannot open {path}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ComponentError(
                f"pubsub {name!r} is already open (lock {path} is held by this or another process)"
            ) from None
        return fd

    def _recover(self) -> None:
        """Forget the previous owner's own groups; hand its unfinished deliveries back."""
        with self._db.write() as conn:
            conn.execute(
                "DELETE FROM pubsub_pending WHERE store = ? AND (topic, grp) IN "
                "(SELECT topic, grp FROM pubsub_groups WHERE store = ? AND durable = 0)",
                (self.name, self.name),
            )
            conn.execute("DELETE FROM pubsub_groups WHERE store = ? AND durable = 0", (self.name,))
            conn.execute("UPDATE pubsub_pending SET owner = '' WHERE store = ?", (self.name,))
            topics = conn.execute(
                "SELECT DISTINCT topic FROM pubsub_messages WHERE store = ?", (self.name,)
            ).fetchall()
            for (topic,) in topics:
                self._collect(conn, topic)

    def _collect(self, conn: sqlite3.Connection, topic: str) -> None:
        """Delete the messages of ``topic`` that no group will deliver any more."""
        (low,) = conn.execute(
            "SELECT MIN(cursor) FROM pubsub_groups WHERE store = ? AND topic = ?", (self.name, topic)
        ).fetchone()
        if low is None:
            conn.execute("DELETE FROM pubsub_messages WHERE store = ? AND topic = ?", (self.name, topic))
            return
        conn.execute(
            "DELETE FROM pubsub_messages WHERE store = ? AND topic = ? AND seq <= ? AND seq NOT IN "
            "(SELECT seq FROM pubsub_pending WHERE store = ? AND topic = ?)",
            (self.name, topic, low, self.name, topic),
        )

    # -- publishing ----------------------------------------------------------------------

    def publish(
        self, topic: str, data: bytes, content_type: str = "", metadata: Mapping[str, str] | None = None
    ) -> str:
        if not topic:
            raise ValueError("topic must not be empty")
        message_id = str(uuid.uuid4())
        with self._db.write() as conn:
            wanted = conn.execute(
                "SELECT 1 FROM pubsub_groups WHERE store = ? AND topic = ? LIMIT 1", (self.name, topic)
            ).fetchone()
            if wanted is None:
                return message_id
            conn.execute(
                "INSERT INTO pubsub_messages (store, topic, id, data, content_type, metadata) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    self.name,
                    topic,
                    message_id,
                    bytes(data),
                    content_type or DEFAULT_CONTENT_TYPE,
                    json.dumps(dict(metadata or {})),
                ),
            )
            self._bound(conn, topic)
        self._wake()
        return message_id

    def _bound(self, conn: sqlite3.Connection, topic: str) -> None:
        """Keep at most ``max_backlog`` messages of ``topic``: the groups still behind the
        newest ``max_backlog`` skip the older ones (a delivery in progress finishes)."""
        row = conn.execute(
            "SELECT seq FROM pubsub_messages WHERE store = ? AND topic = ? ORDER BY seq DESC "
            "LIMIT 1 OFFSET ?",
            (self.name, topic, self._max_backlog),
        ).fetchone()
        if row is None:
            return
        upto = row[0]
        lagging = conn.execute(
            "UPDATE pubsub_groups SET cursor = ? WHERE store = ? AND topic = ? AND cursor < ?",
            (upto, self.name, topic, upto),
        ).rowcount
        conn.execute(
            "DELETE FROM pubsub_pending WHERE store = ? AND topic = ? AND seq <= ? AND owner = ''",
            (self.name, topic, upto),
        )
        self._collect(conn, topic)
        log.warning(
            "pubsub %s: topic %s holds more than %d undelivered messages: dropped the oldest "
            "for %d lagging subscription group(s)",
            self.name,
            topic,
            self._max_backlog,
            lagging,
        )

    def _wake(self) -> None:
        with self._wakeup:
            self._generation += 1
            self._wakeup.notify_all()

    def _mark(self) -> object:
        with self._wakeup:
            return self._generation

    def _idle(self, sub: Subscription, mark: object) -> None:
        with self._wakeup:
            if not sub.stop.is_set() and mark == self._generation:
                self._wakeup.wait(self._poll_interval)

    # -- subscribing (DeliveryLoop's hooks) ----------------------------------------------

    def _open_group(self, sub: Subscription) -> None:
        with self._db.write() as conn:
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'pubsub_messages'").fetchone()
            conn.execute(
                "INSERT INTO pubsub_groups (store, topic, grp, cursor, durable) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (store, topic, grp) DO NOTHING",
                (self.name, sub.topic, sub.group, row[0] if row else 0, int(sub.durable)),
            )

    def delete_group(self, topic: str, group: str) -> None:
        """Forget durable group ``group`` of ``topic`` and its undelivered messages (the
        group must have no live subscription here)."""
        with self._subs_lock:
            if self._has_subscription(topic, group):
                raise ComponentError(f"group {group!r} of topic {topic!r} still has subscriptions")
            self._drop_group(topic, group)

    def _drop_group(self, topic: str, group: str) -> None:
        with self._db.write() as conn:
            key = (self.name, topic, group)
            conn.execute("DELETE FROM pubsub_pending WHERE store = ? AND topic = ? AND grp = ?", key)
            conn.execute("DELETE FROM pubsub_groups WHERE store = ? AND topic = ? AND grp = ?", key)
            self._collect(conn, topic)

    def _release(self, sub: Subscription) -> None:
        try:
            if not sub.durable:
                self._drop_group(sub.topic, sub.group)
            else:
                with self._db.write() as conn:
                    conn.execute(
                        "UPDATE pubsub_pending SET owner = '' WHERE store = ? AND topic = ? AND grp = ? "
                        "AND owner = ?",
                        (self.name, sub.topic, sub.group, sub.consumer),
                    )
            self._wake()
        except ComponentError:
            log.exception("pubsub %s: cannot release a subscription to %s", self.name, sub.topic)

    def _claim(self, sub: Subscription) -> Claim | None:
        """Take the group's next message: an unfinished one left by a cancelled or crashed
        subscription first, else the next new one. Returns (seq, attempts so far, message)."""
        key = (self.name, sub.topic, sub.group)
        with self._db.write() as conn:
            while True:
                row = conn.execute(
                    "SELECT seq, attempts FROM pubsub_pending WHERE store = ? AND topic = ? AND grp = ? "
                    "AND owner = '' ORDER BY seq LIMIT 1",
                    key,
                ).fetchone()
                if row is not None:
                    seq, attempts = row
                    if attempts >= sub.max_attempts:
                        log.warning(
                            "pubsub %s: dropping a message on %s after %d attempts",
                            self.name,
                            sub.topic,
                            attempts,
                        )
                        self._forget(conn, sub, seq)
                        continue
                    conn.execute(
                        "UPDATE pubsub_pending SET owner = ? WHERE store = ? AND topic = ? AND grp = ? "
                        "AND seq = ?",
                        (sub.consumer, *key, seq),
                    )
                else:
                    cursor = conn.execute(
                        "SELECT cursor FROM pubsub_groups WHERE store = ? AND topic = ? AND grp = ?", key
                    ).fetchone()
                    if cursor is None:
                        return None
                    row = conn.execute(
                        "SELECT seq FROM pubsub_messages WHERE store = ? AND topic = ? AND seq > ? "
                        "ORDER BY seq LIMIT 1",
                        (self.name, sub.topic, cursor[0]),
                    ).fetchone()
                    if row is None:
                        return None
                    seq, attempts = row[0], 0
                    conn.execute(
                        "UPDATE pubsub_groups SET cursor = ? WHERE store = ? AND topic = ? AND grp = ?",
                        (seq, *key),
                    )
                    conn.execute(
                        "INSERT INTO pubsub_pending (store, topic, grp, seq, attempts, owner) "
                        "VALUES (?, ?, ?, ?, 0, ?)",
                        (*key, seq, sub.consumer),
                    )
                msg = conn.execute(
                    "SELECT id, data, content_type, metadata FROM pubsub_messages WHERE seq = ?", (seq,)
                ).fetchone()
                return (
                    seq,
                    attempts,
                    Message(
                        id=msg[0],
                        topic=sub.topic,
                        data=bytes(msg[1]),
                        content_type=msg[2],
                        metadata=json.loads(msg[3]),
                    ),
                )

    def _forget(self, conn: sqlite3.Connection, sub: Subscription, seq: int) -> None:
        conn.execute(
            "DELETE FROM pubsub_pending WHERE store = ? AND topic = ? AND grp = ? AND seq = ?",
            (self.name, sub.topic, sub.group, seq),
        )
        self._collect(conn, sub.topic)

    def _attempt(self, sub: Subscription, ref: int, attempts: int) -> None:
        with self._db.write() as conn:
            conn.execute(
                "UPDATE pubsub_pending SET attempts = ? WHERE store = ? AND topic = ? AND grp = ? "
                "AND seq = ?",
                (attempts, self.name, sub.topic, sub.group, ref),
            )

    def _finish(self, sub: Subscription, ref: int) -> None:
        with self._db.write() as conn:
            self._forget(conn, sub, ref)

    def close(self) -> None:
        self._close_subscriptions()
        self._db.close()
        if self._owner_fd >= 0:
            os.close(self._owner_fd)
            self._owner_fd = -1

"""Pub/sub on SQLite: a durable message queue in the components database (see ``SqlitePubSub``)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path

from layotto.host.components import ComponentError, Message
from layotto.host.components.delivery import Claim, DeliveryLoop, Subscription
from layotto.host.components.sqlite.database import Database

log = logging.getLogger("layotto.components.sqlite")

DEFAULT_CONTENT_TYPE = "application/octet-stream"
DEFAULT_MAX_BACKLOG = 10000  # undelivered messages a pub/sub topic keeps
DEFAULT_MAX_SUBSCRIPTIONS = 128  # subscriptions (delivery threads) per pub/sub component


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

    in_process = True  # no network wait: its calls may run on the event loop

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

"""One conformance suite for every component backend (as dapr/components-contrib has).

Each building block's cases run against every backend that ``conformance.yml`` (beside
this file) lists for it: the embedded SQLite store, Redis (a real ``redis-server`` started
by the ``redis_server`` fixture), files and environment variables. A case's building
block is the start of its name (``test_state_...``, ``test_pubsub_...``, ``test_config_...``
for configuration); a case needing a feature says ``@pytest.mark.requires("etag")`` and
runs only on the backends the file gives that feature. Backend-specific cases follow
(durability after ``kill -9``, Redis' plain-string values, the Kubernetes secret
decoding), then the registry.
"""

from __future__ import annotations

import base64
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import yaml

from layotto.host.components import (
    ComponentError,
    ConfigItem,
    ConfigStore,
    Delivery,
    ETagMismatch,
    LockStore,
    Message,
    NotFound,
    OpKind,
    PubSub,
    SecretStore,
    Sequencer,
    StateOp,
    StateStore,
    UnlockStatus,
)
from layotto.host.components.local import (
    EnvConfigStore,
    EnvSecretStore,
    FileConfigStore,
    FileSecretStore,
)
from layotto.host.components.registry import (
    ComponentConfigError,
    UnknownComponent,
    load_components,
)
from layotto.host.components.sqlite import (
    SqliteConfigStore,
    SqliteLockStore,
    SqlitePubSub,
    SqliteSequencer,
    SqliteStateStore,
)
from tests.support import wait_for

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
CONFORMANCE = yaml.safe_load((Path(__file__).resolve().parent / "conformance.yml").read_text())
# A case's building block, from the start of its name; its backends, from conformance.yml.
BLOCKS = {
    "state": "state",
    "lock": "lock",
    "sequencer": "sequencer",
    "pubsub": "pubsub",
    "config": "configuration",
    "secrets": "secrets",
}
HARNESSES = ("backend", "config", "secrets")  # the fixtures that open a backend's components


def features(block: str, backend: str) -> frozenset[str]:
    return frozenset((CONFORMANCE[block][backend] or {}).get("features", ()))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each conformance case once per backend of its building block (conformance.yml)
    that has the features the case requires."""
    harness = next((name for name in HARNESSES if name in metafunc.fixturenames), None)
    if harness is None:
        return
    block = BLOCKS[metafunc.function.__name__.removeprefix("test_").split("_", 1)[0]]
    needed: set[str] = set()
    for mark in metafunc.definition.iter_markers("requires"):
        needed.update(mark.args)
    backends = [name for name in CONFORMANCE[block] if needed <= features(block, name)]
    metafunc.parametrize(harness, backends, indirect=True)


class Backend:
    """Opens instances of one backend's components; every instance of a kind opened by
    one Backend sees the same data (same database file, same Redis key prefix). Closes
    them all at the end of the test."""

    def __init__(self, kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.db = tmp_path / "components.db"
        self.redis = request.getfixturevalue("redis_server") if kind == "redis" else ""
        self.prefix = f"test-{uuid.uuid4().hex[:12]}:"
        self._opened: list[Any] = []
        self._raw: Any = None  # a plain Redis client, for unfinished()

    def _keep(self, component: Any) -> Any:
        self._opened.append(component)
        return component

    def _redis_meta(self, **extra: object) -> dict[str, object]:
        return {"redisHost": self.redis, "redisKeyPrefix": self.prefix, **extra}

    def state(self) -> StateStore:
        if self.kind == "sqlite":
            return self._keep(SqliteStateStore(self.db, name="state"))
        from layotto.host.components.redis import RedisStateStore

        return self._keep(RedisStateStore(self._redis_meta(), name="state"))

    def lock(self) -> LockStore:
        if self.kind == "sqlite":
            return self._keep(SqliteLockStore(self.db, name="lock"))
        from layotto.host.components.redis import RedisLockStore

        return self._keep(RedisLockStore(self._redis_meta(), name="lock"))

    def sequencer(self) -> Sequencer:
        if self.kind == "sqlite":
            return self._keep(SqliteSequencer(self.db, name="seq"))
        from layotto.host.components.redis import RedisSequencer

        return self._keep(RedisSequencer(self._redis_meta(), name="seq"))

    def pubsub(self, retry_delay: float = 0.01) -> Any:
        if self.kind == "sqlite":
            return self._keep(SqlitePubSub(self.db, name="bus", poll_interval=0.1, retry_delay=retry_delay))
        from layotto.host.components.redis import RedisPubSub

        meta = self._redis_meta(retryDelay=retry_delay, pollInterval=0.05, processingTimeout=0.3)
        return self._keep(RedisPubSub(meta, name="bus"))

    def unfinished(self, topic: str) -> int:
        """How many messages of ``topic`` (on the pub/sub named bus) a subscription has been
        handed and not finished: SQLite's pending rows, the pending entries of the Redis
        stream's consumer groups."""
        if self.kind == "sqlite":
            return sqlite_unfinished(self.db, topic)
        if self._raw is None:
            import redis

            self._raw = redis.Redis.from_url(f"redis://{self.redis}")
        return sum(int(g["pending"]) for g in self._raw.xinfo_groups(self.prefix + topic))

    def settle(self, bus: PubSub, topic: str, *receivers: Inbox | tuple[Inbox, ...]) -> None:
        """``settle`` with this backend's count of unfinished messages."""
        settle(bus, topic, lambda: self.unfinished(topic), *receivers)

    def close(self) -> None:
        for component in reversed(self._opened):
            component.close()
        if self._raw is not None:
            self._raw.close()


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = Backend(request.param, request, tmp_path)
    try:
        yield b
    finally:
        b.close()


# --- state ------------------------------------------------------------------------------


def test_state_get_set_delete(backend: Backend) -> None:
    store = backend.state()
    assert {"ETAG", "TRANSACTIONAL"} <= store.features()
    assert store.get("missing") is None
    etag = store.set("k", b"one")
    assert isinstance(etag, str) and etag
    item = store.get("k")
    assert item is not None and (item.key, item.value, item.etag) == ("k", b"one", etag)
    etag2 = store.set("k", b"two")
    assert etag2 != etag
    assert store.get("k").value == b"two"
    assert store.delete("k") is True
    assert store.get("k") is None
    assert store.delete("k") is False


@pytest.mark.requires("etag")
def test_state_etag_on_set(backend: Backend) -> None:
    store = backend.state()
    etag = store.set("k", b"v1")
    etag2 = store.set("k", b"v2", etag=etag)
    with pytest.raises(ETagMismatch):
        store.set("k", b"stale", etag=etag)
    assert store.get("k").value == b"v2"
    with pytest.raises(ETagMismatch):
        store.set("nothing-here", b"x", etag=etag2)
    assert store.get("nothing-here") is None
    assert store.set("k", b"v3", etag="")  # an empty etag is no etag
    assert store.get("k").value == b"v3"


@pytest.mark.requires("etag")
def test_state_etag_on_delete(backend: Backend) -> None:
    store = backend.state()
    etag = store.set("k", b"v1")
    store.set("k", b"v2")
    with pytest.raises(ETagMismatch):
        store.delete("k", etag=etag)
    assert store.get("k") is not None
    assert store.delete("k", etag=store.get("k").etag) is True
    with pytest.raises(ETagMismatch):
        store.delete("k", etag=etag)


@pytest.mark.requires("etag")
def test_state_etag_not_reused_after_delete(backend: Backend) -> None:
    store = backend.state()
    old = store.set("k", b"v1")
    store.delete("k")
    new = store.set("k", b"v2")
    assert new != old
    with pytest.raises(ETagMismatch):
        store.set("k", b"v3", etag=old)


def test_state_bulk_get(backend: Backend) -> None:
    store = backend.state()
    store.set("a", b"1")
    store.set("c", b"3")
    items = store.bulk_get(["c", "b", "a"])
    assert [None if i is None else (i.key, i.value) for i in items] == [("c", b"3"), None, ("a", b"1")]
    assert store.bulk_get([]) == []


def test_state_binary_values(backend: Backend) -> None:
    store = backend.state()
    blob = bytes(range(256)) * 64 + b"\x00"
    store.set("blob", blob)
    store.set("empty", b"")
    assert store.get("blob").value == blob
    assert store.get("empty").value == b""
    store.transact([StateOp(OpKind.UPSERT, "blob2", b"\xff\x00\xfe")])
    assert store.get("blob2").value == b"\xff\x00\xfe"


@pytest.mark.requires("transaction")
def test_state_transaction_all_or_nothing(backend: Backend) -> None:
    store = backend.state()
    etag_a = store.set("a", b"a0")
    store.set("b", b"b0")
    store.set("c", b"c0")
    store.set("c", b"c1")  # c's first etag is now stale
    with pytest.raises(ETagMismatch):
        store.transact(
            [
                StateOp(OpKind.UPSERT, "a", b"a1", etag=etag_a),
                StateOp(OpKind.DELETE, "b"),
                StateOp(OpKind.UPSERT, "new", b"n"),
                StateOp(OpKind.UPSERT, "c", b"c2", etag="1"),
            ]
        )
    assert store.get("a").value == b"a0"
    assert store.get("b").value == b"b0"
    assert store.get("c").value == b"c1"
    assert store.get("new") is None

    store.transact(
        [
            StateOp(OpKind.UPSERT, "a", b"a1", etag=etag_a),
            StateOp(OpKind.DELETE, "b"),
            StateOp(OpKind.UPSERT, "new", b"n"),
            StateOp(OpKind.DELETE, "never-existed"),
        ]
    )
    assert store.get("a").value == b"a1"
    assert store.get("b") is None
    assert store.get("new").value == b"n"
    assert store.get("a").etag != etag_a


@pytest.mark.requires("transaction")
def test_state_transaction_sees_its_earlier_ops(backend: Backend) -> None:
    store = backend.state()
    etag = store.set("k", b"v")
    with pytest.raises(ETagMismatch):  # k is gone by the time the second op runs
        store.transact([StateOp(OpKind.DELETE, "k"), StateOp(OpKind.UPSERT, "k", b"w", etag=etag)])
    assert store.get("k").value == b"v"
    store.transact([StateOp(OpKind.DELETE, "k", etag=etag), StateOp(OpKind.UPSERT, "k", b"w")])
    assert store.get("k").value == b"w"


@pytest.mark.requires("etag")
def test_state_concurrent_writers_one_wins(backend: Backend) -> None:
    stores = [backend.state(), backend.state()]  # two instances: two connections
    etag = stores[0].set("hot", b"start")
    writers = 8
    barrier = threading.Barrier(writers)
    won: list[int] = []
    lost: list[int] = []

    def write(i: int) -> None:
        store = stores[i % 2]
        barrier.wait()
        try:
            store.set("hot", f"writer {i}".encode(), etag=etag)
            won.append(i)
        except ETagMismatch:
            lost.append(i)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == writers - 1
    assert stores[1].get("hot").value == f"writer {won[0]}".encode()


@pytest.mark.requires("durable")
def test_state_persists_across_reopen(backend: Backend) -> None:
    first = backend.state()
    etag = first.set("k", b"kept")
    first.close()
    second = backend.state()
    item = second.get("k")
    assert item is not None and (item.value, item.etag) == (b"kept", etag)
    assert second.set("k", b"next", etag=etag) != etag


# --- lock ---------------------------------------------------------------------------------


def test_lock_owner_checks(backend: Backend) -> None:
    locks = backend.lock()
    assert locks.try_lock("res", "alice", 30) is True
    assert locks.try_lock("res", "bob", 30) is False
    assert locks.try_lock("res", "alice", 30) is False  # not re-entrant
    assert locks.unlock("res", "bob") is UnlockStatus.LOCK_BELONG_TO_OTHERS
    assert locks.unlock("res", "alice") is UnlockStatus.SUCCESS
    assert locks.unlock("res", "alice") is UnlockStatus.LOCK_UNEXIST
    assert locks.unlock("never-locked", "alice") is UnlockStatus.LOCK_UNEXIST
    assert locks.try_lock("res", "bob", 30) is True
    assert locks.try_lock("other", "alice", 30) is True  # resources are independent


def test_lock_expiry(backend: Backend) -> None:
    locks = backend.lock()
    assert locks.try_lock("res", "alice", 1) is True
    assert locks.try_lock("res", "bob", 1) is False
    time.sleep(1.2)
    assert locks.unlock("res", "alice") is UnlockStatus.LOCK_UNEXIST  # expired
    assert locks.try_lock("res", "bob", 30) is True
    assert locks.unlock("res", "alice") is UnlockStatus.LOCK_BELONG_TO_OTHERS


def test_lock_bad_expiry(backend: Backend) -> None:
    with pytest.raises(ValueError):
        backend.lock().try_lock("res", "alice", 0)


def test_lock_concurrent_one_owner(backend: Backend) -> None:
    instances = [backend.lock(), backend.lock()]
    contenders = 8
    barrier = threading.Barrier(contenders)
    results: dict[int, bool] = {}

    def take(i: int) -> None:
        barrier.wait()
        results[i] = instances[i % 2].try_lock("res", f"owner-{i}", 30)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, ok in results.items() if ok]
    assert len(winners) == 1
    assert instances[0].unlock("res", f"owner-{winners[0]}") is UnlockStatus.SUCCESS


# --- sequencer ----------------------------------------------------------------------------


def test_sequencer_strictly_increasing_across_threads(backend: Backend) -> None:
    seqs = [backend.sequencer(), backend.sequencer()]
    per_thread: dict[int, list[int]] = {}

    def draw(i: int) -> None:
        per_thread[i] = [seqs[i % 2].next_id("orders") for _ in range(50)]

    threads = [threading.Thread(target=draw, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for ids in per_thread.values():
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
    every = sorted(i for ids in per_thread.values() for i in ids)
    assert every == list(range(1, 301))
    assert seqs[0].next_id("other-key") == 1


@pytest.mark.requires("durable")
def test_sequencer_persists_across_reopen(backend: Backend) -> None:
    first = backend.sequencer()
    assert [first.next_id("k") for _ in range(3)] == [1, 2, 3]
    first.close()
    assert backend.sequencer().next_id("k") == 4


# --- pub/sub ------------------------------------------------------------------------------


MARKER = b"-- marker: the messages under test were published before this one --"


class Inbox:
    """A handler recording what it gets, answering with ``answer(message)``. The marker
    (see ``settle``) is not recorded in ``got`` and always answered SUCCESS; ``marked_at``
    is how many messages had come before it (None: it has not come)."""

    def __init__(self, answer: Callable[[Message], Delivery] = lambda m: Delivery.SUCCESS) -> None:
        self.answer = answer
        self.got: list[Message] = []
        self.marked_at: int | None = None
        self._lock = threading.Lock()

    def __call__(self, message: Message) -> Delivery:
        with self._lock:
            if message.data == MARKER:
                self.marked_at = len(self.got)
                return Delivery.SUCCESS
            self.got.append(message)
        return self.answer(message)

    def data(self) -> list[bytes]:
        with self._lock:
            return [m.data for m in self.got]

    def wait(self, count: int, timeout: float = 10.0) -> list[Message]:
        wait_for(lambda: len(self.got) >= count, timeout, what=f"{count} deliveries (got {self.data()})")
        with self._lock:
            return list(self.got)


def sqlite_unfinished(db: Path, topic: str, store: str = "bus") -> int:
    """Messages of ``topic`` handed to a subscription of SQLite pub/sub ``store`` and not
    finished yet (its pending rows; the store writes in WAL mode, so reading does not wait)."""
    with closing(sqlite3.connect(db)) as conn:
        (count,) = conn.execute(
            "SELECT COUNT(*) FROM pubsub_pending WHERE store = ? AND topic = ?", (store, topic)
        ).fetchone()
    return int(count)


def settle(
    bus: PubSub, topic: str, unfinished: Callable[[], int], *receivers: Inbox | tuple[Inbox, ...]
) -> None:
    """Return once ``receivers`` have had every message of ``topic`` they will ever get, so
    that a test can then assert that nothing more came (no redelivery, no duplicate, no
    dropped message coming back) without sleeping through a quiet window. A receiver is a
    subscription's Inbox, or a tuple of the Inboxes of one group's subscriptions.

    A group (a subscription's own, or a durable one) gets its messages in publish order, one
    at a time, a message a cancel, crash or RETRY left unfinished before the next new one
    (delivery.py delivers each subscription on one thread; the backends' ``_claim``). So a
    marker published now reaches a receiver only after everything ordered before it. One
    path is ordered by time instead: Redis hands a message nobody acknowledged to the group
    again once it has been idle for processingTimeout. Waiting, after the markers, until no
    message of the topic is unfinished (``unfinished()``, handed out and not finished) closes
    it too: nothing is left to deliver again, and nothing was published after the marker.
    A single subscription must have had nothing after its marker."""
    bus.publish(topic, MARKER)
    for receiver in receivers:
        inboxes = receiver if isinstance(receiver, tuple) else (receiver,)
        wait_for(
            lambda group=inboxes: any(inbox.marked_at is not None for inbox in group),
            what=f"the marker on {topic} (got {[inbox.data() for inbox in inboxes]})",
        )
    wait_for(lambda: unfinished() == 0, what=f"every message of {topic} finished")
    for receiver in receivers:
        if isinstance(receiver, Inbox):
            late = receiver.data()[receiver.marked_at :]
            assert not late, f"delivered after the marker: {late}"


def test_pubsub_delivers_in_order(backend: Backend) -> None:
    bus: PubSub = backend.pubsub()
    inbox = Inbox()
    cancel = bus.subscribe("orders", inbox)
    ids = [bus.publish("orders", f"m{i}".encode()) for i in range(20)]
    other = bus.publish("elsewhere", b"not for us", "text/plain", {"k": "v"})
    got = inbox.wait(20)
    assert [m.data for m in got] == [f"m{i}".encode() for i in range(20)]
    assert [m.id for m in got] == ids and len(set(ids)) == 20 and other not in ids
    assert all(m.topic == "orders" and m.attempt == 1 for m in got)
    assert got[0].content_type == "application/octet-stream"
    cancel()


def test_pubsub_message_fields(backend: Backend) -> None:
    bus: PubSub = backend.pubsub()
    inbox = Inbox()
    bus.subscribe("t", inbox)
    blob = bytes(range(256))
    mid = bus.publish("t", blob, "application/json", {"trace": "abc", "n": "1"})
    (m,) = inbox.wait(1)
    assert (m.id, m.topic, m.data, m.content_type, dict(m.metadata)) == (
        mid,
        "t",
        blob,
        "application/json",
        {"trace": "abc", "n": "1"},
    )


def test_pubsub_only_subscriptions_existing_at_publish_time(backend: Backend) -> None:
    bus: PubSub = backend.pubsub()
    bus.publish("t", b"before anyone subscribed")
    first = Inbox()
    bus.subscribe("t", first)
    bus.publish("t", b"m1")
    first.wait(1)
    second = Inbox()
    bus.subscribe("t", second)  # fan-out: every subscription gets every later message
    bus.publish("t", b"m2")
    first.wait(2)
    second.wait(1)
    backend.settle(bus, "t", first, second)
    assert first.data() == [b"m1", b"m2"]
    assert second.data() == [b"m2"]


def test_pubsub_retry_redelivers_with_attempt_count(backend: Backend) -> None:
    bus: PubSub = backend.pubsub()
    inbox = Inbox(lambda m: Delivery.SUCCESS if m.attempt >= 3 or m.data == b"next" else Delivery.RETRY)
    bus.subscribe("t", inbox, max_attempts=5)
    bus.publish("t", b"flaky")
    bus.publish("t", b"next")
    got = inbox.wait(4)
    backend.settle(bus, "t", inbox)
    assert [(m.data, m.attempt) for m in inbox.got] == [
        (b"flaky", 1),
        (b"flaky", 2),
        (b"flaky", 3),
        (b"next", 1),
    ]
    assert len({m.id for m in got[:3]}) == 1


def test_pubsub_handler_exception_is_retry(backend: Backend) -> None:
    bus: PubSub = backend.pubsub()

    def answer(m: Message) -> Delivery:
        if m.attempt == 1:
            raise RuntimeError("handler crashed")
        return Delivery.SUCCESS

    inbox = Inbox(answer)
    bus.subscribe("t", inbox)
    bus.publish("t", b"x")
    assert [m.attempt for m in inbox.wait(2)] == [1, 2]


def test_pubsub_max_attempts_then_dropped(backend: Backend) -> None:
    bus: PubSub = backend.pubsub()
    inbox = Inbox(lambda m: Delivery.RETRY if m.data == b"poison" else Delivery.SUCCESS)
    bus.subscribe("t", inbox, max_attempts=3)
    bus.publish("t", b"poison")
    bus.publish("t", b"after")
    inbox.wait(4)
    backend.settle(bus, "t", inbox)
    assert [(m.data, m.attempt) for m in inbox.got] == [
        (b"poison", 1),
        (b"poison", 2),
        (b"poison", 3),
        (b"after", 1),
    ]


def test_pubsub_drop_is_not_redelivered(backend: Backend) -> None:
    bus: PubSub = backend.pubsub()
    inbox = Inbox(lambda m: Delivery.DROP if m.data == b"bad" else Delivery.SUCCESS)
    bus.subscribe("t", inbox, max_attempts=5)
    bus.publish("t", b"bad")
    bus.publish("t", b"good")
    inbox.wait(2)
    backend.settle(bus, "t", inbox)
    assert [(m.data, m.attempt) for m in inbox.got] == [(b"bad", 1), (b"good", 1)]


def test_pubsub_cancel_stops_delivery(backend: Backend) -> None:
    bus: PubSub = backend.pubsub()
    inbox = Inbox()
    cancel = bus.subscribe("t", inbox)
    bus.publish("t", b"1")
    inbox.wait(1)
    cancel()
    bus.publish("t", b"2")
    # A quiet window, not a marker: a cancelled subscription gets no later message that
    # could mark the end of its deliveries, and another subscription's marker shows
    # nothing about this one (each subscription has a delivery thread of its own, with no
    # order between them). So the test watches a short while for "2" not to come.
    time.sleep(0.4)
    assert inbox.data() == [b"1"]
    # cancelling from inside the handler works too
    cancels: list[Callable[[], None]] = []
    selfish = Inbox(lambda m: (cancels[0](), Delivery.SUCCESS)[1])
    cancels.append(bus.subscribe("t", selfish))
    bus.publish("t", b"3")
    bus.publish("t", b"4")
    selfish.wait(1)
    time.sleep(0.4)  # a quiet window, as above: "4" must not come
    assert selfish.data() == [b"3"]


@pytest.mark.requires("durable")
def test_pubsub_durable_group_keeps_messages_while_away(backend: Backend) -> None:
    bus = backend.pubsub()
    first = Inbox()
    cancel = bus.subscribe("t", first, group="workers")
    bus.publish("t", b"m1")
    first.wait(1)
    cancel()
    bus.publish("t", b"m2")  # nobody is listening, but the group exists
    bus.publish("t", b"m3")
    second = Inbox()
    bus.subscribe("t", second, group="workers")
    second.wait(2)
    backend.settle(bus, "t", second)  # first: cancel() returned once its delivery thread ended
    assert first.data() == [b"m1"]
    assert second.data() == [b"m2", b"m3"]


def test_pubsub_group_members_share_messages(backend: Backend) -> None:
    bus = backend.pubsub()
    a, b, solo = Inbox(), Inbox(), Inbox()
    bus.subscribe("t", a, group="g")
    bus.subscribe("t", b, group="g")
    bus.subscribe("t", solo)
    sent = [f"m{i}".encode() for i in range(30)]
    for data in sent:
        bus.publish("t", data)
    wait_for(lambda: len(a.got) + len(b.got) >= 30, what="the group's deliveries")
    solo.wait(30)
    backend.settle(bus, "t", (a, b), solo)  # the group's marker goes to a or to b
    assert sorted(a.data() + b.data()) == sorted(sent)
    assert a.data() == sorted(a.data(), key=sent.index)  # each member sees publish order
    assert solo.data() == sent


@pytest.mark.requires("durable")
def test_pubsub_durable_across_reopen(backend: Backend) -> None:
    first = backend.pubsub(retry_delay=30.0)  # closed while it waits to deliver again
    failing = Inbox(lambda m: Delivery.RETRY)
    first.subscribe("t", failing, max_attempts=5, group="g")
    first.publish("t", b"interrupted")
    failing.wait(1)
    first.close()  # the host goes away mid-retry

    publisher = backend.pubsub()
    publisher.publish("t", b"while-away")
    publisher.close()

    second = backend.pubsub()
    inbox = Inbox()
    second.subscribe("t", inbox, max_attempts=5, group="g")
    got = inbox.wait(2)
    assert [(m.data, m.attempt) for m in got] == [(b"interrupted", 2), (b"while-away", 1)]


@pytest.mark.requires("durable")
def test_pubsub_attempts_bound_holds_across_reopen(backend: Backend) -> None:
    first = backend.pubsub()
    failing = Inbox(lambda m: Delivery.RETRY)
    first.subscribe("t", failing, max_attempts=2, group="g")
    first.publish("t", b"poison")
    wait_for(lambda: len(failing.got) == 2 or None, what="two attempts")
    first.close()
    second = backend.pubsub()
    inbox = Inbox()
    second.subscribe("t", inbox, max_attempts=2, group="g")
    second.publish("t", b"fresh")
    inbox.wait(1)
    # poison, were it delivered again: before the marker, or (Redis) while still unfinished
    backend.settle(second, "t", inbox)
    assert inbox.data() == [b"fresh"]


def test_pubsub_bad_arguments(backend: Backend) -> None:
    bus = backend.pubsub()
    with pytest.raises(ValueError):
        bus.subscribe("t", Inbox(), max_attempts=0)
    with pytest.raises(ValueError):
        bus.publish("", b"x")


def test_sqlite_pubsub_single_owner(tmp_path: Path) -> None:
    bus = SqlitePubSub(tmp_path / "c.db", name="bus")
    with pytest.raises(ComponentError, match="already open"):
        SqlitePubSub(tmp_path / "c.db", name="bus")
    other = SqlitePubSub(tmp_path / "c.db", name="other-bus")  # another store name is fine
    other.close()
    bus.close()
    SqlitePubSub(tmp_path / "c.db", name="bus").close()


def test_sqlite_pubsub_forgets_unwanted_messages(tmp_path: Path) -> None:
    import sqlite3

    bus = SqlitePubSub(tmp_path / "c.db", name="bus", poll_interval=0.05)
    bus.publish("t", b"nobody listens")
    inbox = Inbox()
    cancel = bus.subscribe("t", inbox)
    for i in range(5):
        bus.publish("t", str(i).encode())
    inbox.wait(5)
    cancel()
    bus.close()
    with sqlite3.connect(tmp_path / "c.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM pubsub_messages").fetchone() == (0,)
        assert conn.execute("SELECT COUNT(*) FROM pubsub_groups").fetchone() == (0,)
        assert conn.execute("SELECT COUNT(*) FROM pubsub_pending").fetchone() == (0,)


def test_sqlite_pubsub_backlog_is_bounded(tmp_path: Path) -> None:
    """A group that does not keep up cannot make the store hold more than maxBacklog
    messages of a topic: the oldest are dropped for it."""
    import sqlite3

    bus = SqlitePubSub(tmp_path / "c.db", name="bus", poll_interval=0.05, max_backlog=5)
    try:
        bus.subscribe("t", Inbox(), group="slow")()  # a durable group, nobody running
        for i in range(20):
            bus.publish("t", str(i).encode())
        with sqlite3.connect(tmp_path / "c.db") as conn:
            (held,) = conn.execute("SELECT COUNT(*) FROM pubsub_messages WHERE store = 'bus'").fetchone()
        assert held <= 5
        inbox = Inbox()
        cancel = bus.subscribe("t", inbox, group="slow")
        inbox.wait(5)
        settle(bus, "t", lambda: sqlite_unfinished(tmp_path / "c.db", "t"), inbox)
        cancel()
        assert inbox.data() == [str(i).encode() for i in range(15, 20)]
    finally:
        bus.close()
    with pytest.raises(ComponentError, match="at least 1"):
        SqlitePubSub(tmp_path / "d.db", name="bus", max_backlog=0)


def test_pubsub_subscriptions_are_limited(backend: Backend, tmp_path: Path) -> None:
    """Each subscription is a delivery thread: a component takes at most maxSubscriptions."""
    if backend.kind == "sqlite":
        bus: Any = backend._keep(SqlitePubSub(tmp_path / "lim.db", name="lim", max_subscriptions=2))
    else:
        from layotto.host.components.redis import RedisPubSub

        bus = backend._keep(RedisPubSub(backend._redis_meta(maxSubscriptions=2), name="lim"))
    first = bus.subscribe("a", Inbox())
    bus.subscribe("b", Inbox())
    before = threading.active_count()
    with pytest.raises(ComponentError, match="maxSubscriptions"):
        bus.subscribe("c", Inbox())
    assert threading.active_count() == before
    first()
    bus.subscribe("c", Inbox())  # a cancelled subscription frees its place


def test_redis_pubsub_streams_are_capped(redis_server: str) -> None:
    from layotto.host.components.redis import DEFAULT_MAX_LEN, RedisPubSub

    prefix = f"cap{uuid.uuid4().hex}:"
    default = RedisPubSub({"redisHost": redis_server, "redisKeyPrefix": prefix}, name="d")
    assert default._maxlen == DEFAULT_MAX_LEN  # bounded unless the operator says 0
    default.close()
    bus = RedisPubSub({"redisHost": redis_server, "redisKeyPrefix": prefix, "maxLenApprox": 10}, name="c")
    try:
        for i in range(500):
            bus.publish("t", str(i).encode())
        assert bus._client.xlen(prefix + "t") < 250  # trimmed (approximately: whole nodes)
    finally:
        bus.close()


# --- configuration ------------------------------------------------------------------------


class ConfigHarness:
    """A configuration store and a way to change what it holds (``set`` writes items:
    through the admin method, a rewritten file or the environment)."""

    def __init__(self, kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.kind = kind
        self.groups = "groups" in features("configuration", kind)
        self._items: dict[tuple[str, str, str], ConfigItem] = {}
        self._env = pytest.MonkeyPatch()
        self.prefix = f"LAYOTTO_TEST_{uuid.uuid4().hex[:8].upper()}_"
        self.path = tmp_path / "config.yaml"
        self.store: Any
        if kind == "sqlite":
            self.store = SqliteConfigStore(tmp_path / "c.db", name="cfg")
        elif kind == "redis":
            from layotto.host.components.redis import RedisConfigStore

            meta = {"redisHost": request.getfixturevalue("redis_server"), "redisKeyPrefix": self.prefix}
            self.store = RedisConfigStore(meta, name="cfg")
        elif kind == "file":
            self.path.write_text("{}\n")
            self.store = FileConfigStore(self.path, name="cfg", poll_interval=0.05)
        else:
            self.store = EnvConfigStore(self.prefix, name="cfg", poll_interval=0.05)

    def set(self, *items: ConfigItem) -> None:
        if self.kind in ("sqlite", "redis"):
            self.store.set(list(items))
            return
        for item in items:
            self._items[(item.key, item.group, item.label)] = item
        self._write()

    def delete(self, key: str) -> None:
        if self.kind in ("sqlite", "redis"):
            self.store.delete([key])
            return
        self._items = {k: v for k, v in self._items.items() if k[0] != key}
        self._write()

    def _write(self) -> None:
        if self.kind == "env":
            for item in self._items.values():
                assert not item.group and not item.label and not item.tags
                self._env.setenv(self.prefix + item.key, item.content)
            for var in list(os.environ):
                if var.startswith(self.prefix) and (var[len(self.prefix) :], "", "") not in self._items:
                    self._env.delenv(var)
            return
        doc: dict[str, list[dict[str, object]]] = {}
        for item in self._items.values():
            doc.setdefault(item.key, []).append(
                {"content": item.content, "group": item.group, "label": item.label, "tags": dict(item.tags)}
            )
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc))
        tmp.replace(self.path)  # a new inode: seen even within one mtime tick

    def close(self) -> None:
        self.store.close()
        self._env.undo()


@pytest.fixture
def config(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ConfigHarness]:
    h = ConfigHarness(request.param, request, tmp_path)
    try:
        yield h
    finally:
        h.close()


def test_config_get_keys_and_all(config: ConfigHarness) -> None:
    store: ConfigStore = config.store
    assert store.get([]) == []
    config.set(ConfigItem("a", "1"), ConfigItem("b", "two words"), ConfigItem("c", "3"))
    assert [(i.key, i.content) for i in store.get(["a"])] == [("a", "1")]
    assert [(i.key, i.content) for i in store.get(["c", "a", "missing"])] == [("a", "1"), ("c", "3")]
    assert [i.key for i in store.get([])] == ["a", "b", "c"]
    assert store.get(["missing"]) == []
    config.set(ConfigItem("a", "changed"))
    assert store.get(["a"])[0].content == "changed"


def test_config_group_and_label_filter(config: ConfigHarness) -> None:
    store: ConfigStore = config.store
    if not config.groups:  # environment items have no group or label
        config.set(ConfigItem("a", "1"))
        assert store.get(["a"], group="g") == [] and store.get([], label="prod") == []
        assert [i.key for i in store.get(["a"])] == ["a"]
        return
    config.set(
        ConfigItem("url", "dev-db", group="backend", label="dev", tags={"owner": "ops"}),
        ConfigItem("url", "prod-db", group="backend", label="prod"),
        ConfigItem("url", "front", group="frontend", label="prod"),
        ConfigItem("plain", "p"),
    )
    got = store.get(["url"], group="backend", label="prod")
    assert [(i.content, i.group, i.label) for i in got] == [("prod-db", "backend", "prod")]
    assert sorted(i.content for i in store.get(["url"], group="backend")) == ["dev-db", "prod-db"]
    assert sorted(i.content for i in store.get([], label="prod")) == ["front", "prod-db"]
    assert sorted(i.content for i in store.get(["url"])) == ["dev-db", "front", "prod-db"]
    (dev,) = store.get(["url"], label="dev")
    assert dict(dev.tags) == {"owner": "ops"}
    assert store.get(["plain"], group="backend") == []


def test_config_subscribe_gets_changes(config: ConfigHarness) -> None:
    store: ConfigStore = config.store
    config.set(ConfigItem("a", "1"), ConfigItem("b", "1"))
    store.get([])
    seen: list[ConfigItem] = []
    all_seen: list[ConfigItem] = []
    cancel = store.subscribe(["a"], seen.extend)
    store.subscribe([], all_seen.extend)
    config.set(ConfigItem("b", "2"))
    config.set(ConfigItem("a", "2"))
    wait_for(lambda: any(i.key == "a" and i.content == "2" for i in seen), what="a's change")
    wait_for(lambda: any(i.key == "b" for i in all_seen), what="b's change")
    assert all(i.key == "a" for i in seen)
    config.delete("a")
    wait_for(lambda: any(i.metadata.get("deleted") == "true" for i in seen), what="a's deletion")
    assert [i.content for i in seen if i.metadata.get("deleted")] == [""]
    cancel()
    before = len(seen)
    config.set(ConfigItem("a", "3"))
    wait_for(lambda: any(i.content == "3" for i in all_seen), what="a's last change")
    assert len(seen) == before


# --- secrets ------------------------------------------------------------------------------


class SecretHarness:
    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self._env = pytest.MonkeyPatch()
        self.prefix = f"LAYOTTO_TEST_SECRET_{uuid.uuid4().hex[:8].upper()}_"
        self.path = tmp_path / "secrets.yaml"
        self._secrets: dict[str, str] = {}
        self.store: SecretStore
        if kind == "file":
            self.path.write_text("{}\n")
            self.store = FileSecretStore(self.path, name="sec")
        else:
            self.store = EnvSecretStore(self.prefix, name="sec")

    def put(self, name: str, value: str) -> None:
        """Make the one-key secret ``{name: value}``."""
        self._secrets[name] = value
        if self.kind == "env":
            self._env.setenv(self.prefix + name, value)
        else:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(yaml.safe_dump(dict(self._secrets)))
            tmp.replace(self.path)

    def close(self) -> None:
        self.store.close()
        self._env.undo()


@pytest.fixture
def secrets(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SecretHarness]:
    h = SecretHarness(request.param, tmp_path)
    try:
        yield h
    finally:
        h.close()


def test_secrets_get_bulk_not_found(secrets: SecretHarness) -> None:
    store = secrets.store
    assert store.bulk() == {}
    with pytest.raises(NotFound):
        store.get("db_password")
    secrets.put("db_password", "s3cret")
    secrets.put("API_TOKEN", "t0ken with spaces")
    assert store.get("db_password") == {"db_password": "s3cret"}
    assert store.bulk() == {
        "db_password": {"db_password": "s3cret"},
        "API_TOKEN": {"API_TOKEN": "t0ken with spaces"},
    }
    with pytest.raises(NotFound):
        store.get("missing")
    with pytest.raises(NotFound):
        store.get("")


def test_file_secrets_multi_key_and_formats(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text('{"db": {"user": "app", "password": "pw", "port": 5432}, "token": "abc"}')
    store = FileSecretStore(path)
    assert store.get("db") == {"user": "app", "password": "pw", "port": "5432"}
    assert store.get("token") == {"token": "abc"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ComponentError, match="mapping"):
        FileSecretStore(bad)
    with pytest.raises(ComponentError, match="cannot read"):
        FileSecretStore(tmp_path / "absent.yaml")


def test_namespaced_secret_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``N/S`` (host.scoping's name for secret S of namespace N): the env store's variable
    ``<prefix>N__S``, the file store's key ``"N/S"``; either answers under the name S."""
    monkeypatch.setenv("NSTEST_shop__db", "shop-pw")
    monkeypatch.setenv("NSTEST_db", "node-pw")
    env = EnvSecretStore("NSTEST_")
    assert env.get("shop/db") == {"db": "shop-pw"}
    assert env.get("db") == {"db": "node-pw"}
    with pytest.raises(NotFound, match="NSTEST_other__db"):
        env.get("other/db")
    with pytest.raises(NotFound):
        env.get("shop/")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"shop/token": "abc", "shop/db": {"password": "pw"}, "token": "node"}))
    store = FileSecretStore(path)
    assert store.get("shop/token") == {"token": "abc"}
    assert store.get("shop/db") == {"password": "pw"}
    with pytest.raises(NotFound):
        store.get("other/token")


def test_file_config_formats(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        textwrap.dedent(
            """
            greeting: hello
            timeout: 30
            enabled: true
            feature:
              - {content: "on", label: dev}
              - {content: "off", label: prod, tags: {owner: qa}}
            """
        )
    )
    store = FileConfigStore(path)
    assert [(i.key, i.content) for i in store.get(["greeting", "timeout", "enabled"])] == [
        ("enabled", "true"),
        ("greeting", "hello"),
        ("timeout", "30"),
    ]
    assert [i.content for i in store.get(["feature"], label="prod")] == ["off"]
    path.write_text("key: {group: g}\n")  # invalid now: the last good content stays
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert store.get(["greeting"])[0].content == "hello"
    store.close()
    path.write_text("key: {contents: x}\n")
    with pytest.raises(ComponentError, match="no 'content'"):
        FileConfigStore(path)


# --- durability: kill -9 of the host ------------------------------------------------------


def test_sqlite_survives_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "components.db"
    code = textwrap.dedent(
        """
        import sys, time
        from layotto.host.components import Delivery
        from layotto.host.components.sqlite import SqlitePubSub, SqliteSequencer, SqliteStateStore

        state = SqliteStateStore(sys.argv[1], name="state_demo")
        etags = [state.set(f"k{i}", f"v{i}".encode()) for i in range(100)]
        seq = SqliteSequencer(sys.argv[1], name="seq")
        ids = [seq.next_id("k") for _ in range(5)]
        bus = SqlitePubSub(sys.argv[1], name="bus")
        bus.subscribe("t", lambda m: Delivery.SUCCESS, group="g")()  # make the durable group
        bus.publish("t", b"published before the crash")
        print("saved", etags[-1], ids[-1], flush=True)
        time.sleep(120)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(db)], stdout=subprocess.PIPE, cwd=REPO_ROOT, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[:1] == ["saved"], line
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    state = SqliteStateStore(db, name="state_demo")
    assert [state.get(f"k{i}").value for i in range(100)] == [f"v{i}".encode() for i in range(100)]
    assert state.get("k99").etag == line[1]
    state.close()
    seq = SqliteSequencer(db, name="seq")
    assert seq.next_id("k") == int(line[2]) + 1
    seq.close()
    bus = SqlitePubSub(db, name="bus", poll_interval=0.05)  # the dead host's lock is gone
    inbox = Inbox()
    bus.subscribe("t", inbox, group="g")
    assert inbox.wait(1)[0].data == b"published before the crash"
    bus.close()


# --- Redis specifics ----------------------------------------------------------------------


def test_redis_plain_string_values_and_prefix(redis_server: str) -> None:
    import redis

    from layotto.host.components.redis import RedisStateStore

    raw = redis.Redis.from_url(f"redis://{redis_server}")
    prefix = f"p{uuid.uuid4().hex[:8]}:"
    raw.set(prefix + "book1", b"100")  # as `redis-cli set book1 100` in Layotto's FaaS demo
    store = RedisStateStore({"redisHost": redis_server, "redisKeyPrefix": prefix})
    item = store.get("book1")
    assert item is not None and (item.value, item.etag) == (b"100", "")
    with pytest.raises(ETagMismatch):
        store.set("book1", b"101", etag="1")
    etag = store.set("book1", b"101")
    assert store.get("book1").etag == etag
    assert raw.type(prefix + "book1") == b"hash"
    other = RedisStateStore({"redisHost": redis_server, "redisKeyPrefix": "elsewhere:"})
    assert other.get("book1") is None
    store.close()
    other.close()
    raw.close()


def test_redis_unreachable_is_component_error() -> None:
    from layotto.host.components.redis import RedisStateStore

    store = RedisStateStore({"redisHost": "127.0.0.1:1", "readTimeout": 1})
    with pytest.raises(ComponentError):
        store.get("k")
    store.close()


# --- Kubernetes secrets: decoding and configuration only (no API server here) -------------


def test_k8s_secret_decoding() -> None:
    from kubernetes import client

    from layotto.host.components.k8s import decode_secret_data, secret_to_dict

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    assert decode_secret_data({"user": b64(b"app"), "empty": ""}) == {"user": "app", "empty": ""}
    assert decode_secret_data(None) == {}
    assert decode_secret_data({"bin": b64(b"\xff\xfeok")}) == {"bin": "\ufffd\ufffdok"}
    with pytest.raises(ComponentError, match="not base64"):
        decode_secret_data({"k": "not base64!"}, "db")
    secret = client.V1Secret(
        metadata=client.V1ObjectMeta(name="db"), data={"password": b64("pässword".encode())}
    )
    assert secret_to_dict(secret) == {"password": "pässword"}


def test_k8s_client_configuration(tmp_path: Path) -> None:
    from layotto.host.components.k8s import KubernetesSecretStore, client_configuration

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "c1", "cluster": {"server": "https://127.0.0.1:6443"}},
                    {"name": "c2", "cluster": {"server": "https://10.0.0.2:6443"}},
                ],
                "users": [{"name": "u", "user": {"token": "t0ken"}}],
                "contexts": [
                    {"name": "one", "context": {"cluster": "c1", "user": "u", "namespace": "team"}},
                    {"name": "two", "context": {"cluster": "c2", "user": "u"}},
                ],
                "current-context": "one",
            }
        )
    )
    cfg, ns = client_configuration({"kubeconfigPath": str(kubeconfig)}, environ={})
    assert (cfg.host, ns) == ("https://127.0.0.1:6443", "team")
    assert "Bearer t0ken" in cfg.api_key.values()
    cfg, ns = client_configuration({"kubeconfigPath": str(kubeconfig), "context": "two"}, environ={})
    assert (cfg.host, ns) == ("https://10.0.0.2:6443", "default")
    _, ns = client_configuration({"kubeconfigPath": str(kubeconfig), "namespace": "x"}, environ={})
    assert ns == "x"
    _, ns = client_configuration({}, environ={"KUBECONFIG": str(kubeconfig)})
    assert ns == "team"
    with pytest.raises(ComponentError, match="no usable cluster configuration"):
        client_configuration({"kubeconfigPath": str(tmp_path / "absent")}, environ={})
    with pytest.raises(ComponentError, match="no usable cluster configuration"):
        # in a pod without a mounted service account token
        client_configuration({}, environ={"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    store = KubernetesSecretStore({"kubeconfigPath": str(kubeconfig)}, name="k8s")
    assert store.namespace == "team"
    store.close()


# --- registry -----------------------------------------------------------------------------


def test_registry_default_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYOTTO_SECRET_db", "pw")
    with load_components(None, tmp_path) as components:
        state = components.state("state_demo")
        assert isinstance(state, StateStore) and components.state("") is state
        state.set("k", b"v")
        assert isinstance(components.pubsub("pub_subs_demo"), PubSub)
        assert isinstance(components.configuration("config_demo"), ConfigStore)
        assert components.lock("lock_demo").try_lock("r", "me", 5)
        assert components.sequencer("sequencer_demo").next_id("k") == 1
        assert components.secrets("secret_demo").get("db") == {"db": "pw"}
        with pytest.raises(UnknownComponent, match="no state component named 'redis'.*state_demo"):
            components.state("redis")
    assert (tmp_path / "components.db").is_file()
    with load_components(None, tmp_path) as again:  # same file: the data is still there
        assert again.state("state_demo").get("k").value == b"v"
        assert again.sequencer("sequencer_demo").next_id("k") == 2


def test_registry_yaml_file(tmp_path: Path, redis_server: str) -> None:
    (tmp_path / "app-config.yaml").write_text("greeting: hi\n")
    (tmp_path / "secrets.json").write_text('{"db": {"password": "pw"}}')
    path = tmp_path / "components.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            state:
              state_demo: {{type: sqlite}}
              cache: {{type: redis, metadata: {{redisHost: "{redis_server}", redisKeyPrefix: "reg:"}}}}
            pub_subs:
              bus: {{type: redis, metadata: {{redisHost: "{redis_server}", redisKeyPrefix: "reg:"}}}}
              local: {{type: sqlite, metadata: {{path: other.db, pollInterval: 0.05}}}}
            configuration:
              files: {{type: file, metadata: {{path: app-config.yaml}}}}
              env: {{type: env, metadata: {{prefix: APP_}}}}
            lock:
              default: {{type: redis, metadata: {{redisHost: "{redis_server}", redisKeyPrefix: "reg:"}}}}
              other: {{type: sqlite}}
            sequencer:
              ids: {{type: redis, metadata: {{redisHost: "{redis_server}", redisKeyPrefix: "reg:"}}}}
            secret_store:
              secret_demo: {{type: file, metadata: {{path: secrets.json}}}}
            """
        )
    )
    state_dir = tmp_path / "state"
    with load_components(path, state_dir) as components:
        assert components.names("state") == ["state_demo", "cache"]
        assert type(components.state("cache")).__name__ == "RedisStateStore"
        components.state("cache").set("k", b"v")
        assert components.state("cache").get("k").value == b"v"
        assert components.state("").get("k") is None  # the first declared: state_demo (sqlite)
        assert components.configuration("files").get(["greeting"])[0].content == "hi"
        assert components.secrets("secret_demo").get("db") == {"password": "pw"}
        assert type(components.lock("")).__name__ == "RedisLockStore"  # the one named default
        assert components.sequencer("ids").next_id("n") == 1
        inbox = Inbox()
        components.pubsub("local").subscribe("t", inbox)
        components.pubsub("local").publish("t", b"x")
        inbox.wait(1)
    assert (state_dir / "components.db").is_file() and (state_dir / "other.db").is_file()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("state:\n  s: {type: mongodb}\n", "unknown type 'mongodb' \\(known state types: redis, sqlite\\)"),
        ("secrets:\n  s: {type: sqlite}\n", "unknown type 'sqlite'"),
        ("queues:\n  q: {type: sqlite}\n", "unknown component kind 'queues'"),
        ("state:\n  s: {metadata: {}}\n", "unknown type ''"),
        ("state:\n  s: {type: sqlite, meta: {}}\n", "unknown fields"),
        ("state: [a, b]\n", "must map component names"),
        ("configuration:\n  c: {type: file}\n", "needs metadata 'path'"),
        ("configuration:\n  c: {type: file, metadata: {path: absent.yaml}}\n", "cannot read"),
        ("- a\n", "expected a mapping"),
        ("state: {s: {type: sqlite}\n", "not valid YAML"),
    ],
)
def test_registry_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "components.yaml"
    path.write_text(text)
    with pytest.raises(ComponentConfigError, match=message):
        load_components(path, tmp_path)


def test_registry_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ComponentConfigError, match="cannot read the components file"):
        load_components(tmp_path / "absent.yaml", tmp_path)

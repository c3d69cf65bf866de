"""Redis components (the ``redis`` package; Redis 5 or later for streams, 6.2 for XAUTOCLAIM).

Metadata, as Dapr's and Layotto's Redis components take it:

- ``redisHost``: ``host:port`` (default ``localhost:6379``); ``redisUsername``,
  ``redisPassword``, ``redisDB`` (default 0), ``enableTLS`` (default false).
- ``redisKeyPrefix``: prepended to every Redis key a component writes (default empty).
  (``keyPrefix`` is the namespacing mode, ``appid``/``name``/``none``, as in Layotto.)
- ``readTimeout``: socket timeout in seconds (default 10).

Key layout (``P`` is the key prefix):

- state: ``P<key>``, a hash {data, version}; ``P__layotto_etag__`` is the etag counter.
  A plain string at ``P<key>`` (``redis-cli set book1 100``) reads as a value without an
  etag, as Dapr's Redis store does; a write replaces it with a hash.
- lock: ``P lock||<resource>``, value the owner, with a PX expiry.
- sequencer: ``P sequencer||<key>``, INCR.
- pubsub: the stream ``P<topic>``; one consumer group per subscription (or per durable
  group), created at ``$``.
- configuration: the hash ``P config||<group>||<label>`` (field = key, value = JSON), the
  set ``P config||index`` of [group, label] pairs, change notices on the channel
  ``P config||changes``.

The semantics are the SQLite backend's (see ``layotto.host.components.sqlite``); the
conformance suite runs against both.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import redis

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
from layotto.host.components.base import (
    ConfigSubscribers,
    Metadata,
    check_expire,
    deleted_item,
    matches,
    meta_bool,
    meta_float,
    meta_int,
    meta_str,
)
from layotto.host.components.delivery import Claim, DeliveryLoop, Subscription

log = logging.getLogger("layotto.components.redis")

DEFAULT_CONTENT_TYPE = "application/octet-stream"
DEFAULT_MAX_LEN = 10000  # entries a pub/sub stream keeps (approximately)
DEFAULT_MAX_SUBSCRIPTIONS = 128  # subscriptions (delivery threads) per pub/sub component
_ETAG_MISMATCH = "ETAG_MISMATCH"


def connect(metadata: Metadata) -> redis.Redis:
    """A client for the server the metadata names (connections are made lazily)."""
    address = meta_str(metadata, "redisHost", "localhost:6379")
    host, sep, port_text = address.rpartition(":")
    if not sep:
        host, port_text = address, "6379"
    try:
        port = int(port_text)
    except ValueError:
        raise ComponentError(f"redisHost must be host:port, not {address!r}") from None
    timeout = meta_float(metadata, "readTimeout", 10.0)
    return redis.Redis(
        host=host.strip("[]") or "localhost",
        port=port,
        db=meta_int(metadata, "redisDB", 0),
        username=meta_str(metadata, "redisUsername") or None,
        password=meta_str(metadata, "redisPassword") or None,
        ssl=meta_bool(metadata, "enableTLS", False),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
    )


@contextmanager
def _errors(what: str) -> Iterator[None]:
    try:
        yield
    except redis.ResponseError as e:
        if _ETAG_MISMATCH in str(e):
            raise ETagMismatch(f"{what}: {str(e).replace(_ETAG_MISMATCH, 'etag mismatch')}") from None
        raise ComponentError(f"{what}: {e}") from e
    except redis.RedisError as e:
        raise ComponentError(f"{what}: {e}") from e


class _RedisComponent:
    def __init__(self, metadata: Metadata | None = None, *, name: str = "default") -> None:
        metadata = metadata or {}
        self.name = name
        self.prefix = meta_str(metadata, "redisKeyPrefix")
        self._client = connect(metadata)

    def close(self) -> None:
        self._client.close()


# --- state ------------------------------------------------------------------------------

_GET = """
local out = {}
for i, k in ipairs(KEYS) do
  local t = redis.call('TYPE', k)['ok']
  out[i] = false
  if t == 'hash' then
    local r = redis.call('HMGET', k, 'data', 'version')
    if r[1] then out[i] = {r[1], r[2] or ''} end
  elseif t == 'string' then
    out[i] = {redis.call('GET', k), ''}
  end
end
return out
"""

_SET = """
local t = redis.call('TYPE', KEYS[1])['ok']
if ARGV[2] ~= '' then
  local v = false
  if t == 'hash' then v = redis.call('HGET', KEYS[1], 'version') end
  if v ~= ARGV[2] then return redis.error_reply('ETAG_MISMATCH on key ' .. KEYS[1]) end
end
if t == 'string' then redis.call('DEL', KEYS[1]) end
local n = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'data', ARGV[1], 'version', n)
return n
"""

_DELETE = """
local t = redis.call('TYPE', KEYS[1])['ok']
if ARGV[1] ~= '' then
  local v = false
  if t == 'hash' then v = redis.call('HGET', KEYS[1], 'version') end
  if v ~= ARGV[1] then return redis.error_reply('ETAG_MISMATCH on key ' .. KEYS[1]) end
end
return redis.call('DEL', KEYS[1])
"""

# KEYS[1] is the etag counter, KEYS[i+1] the key of op i; ARGV holds (kind, value, etag)
# per op. Every etag is checked (with the effect of the earlier ops) before any write.
_TRANSACT = """
local n = #KEYS - 1
local seen = {}
for i = 1, n do
  local k = KEYS[i + 1]
  local etag = ARGV[3 * i]
  local v = seen[k]
  if v == nil then
    local t = redis.call('TYPE', k)['ok']
    v = false
    if t == 'hash' then v = redis.call('HGET', k, 'version') or false
    elseif t == 'string' then v = '' end
  end
  if etag ~= '' and v ~= etag then return redis.error_reply('ETAG_MISMATCH on key ' .. k) end
  if ARGV[3 * i - 2] == 'upsert' then seen[k] = '\\0written' else seen[k] = false end
end
for i = 1, n do
  local k = KEYS[i + 1]
  if ARGV[3 * i - 2] == 'upsert' then
    if redis.call('TYPE', k)['ok'] == 'string' then redis.call('DEL', k) end
    redis.call('HSET', k, 'data', ARGV[3 * i - 1], 'version', redis.call('INCR', KEYS[1]))
  else
    redis.call('DEL', k)
  end
end
return n
"""


class RedisStateStore(_RedisComponent):
    """Key/value state with etags and transactions (features ETAG, TRANSACTIONAL)."""

    def __init__(self, metadata: Metadata | None = None, *, name: str = "default") -> None:
        super().__init__(metadata, name=name)
        self._counter = f"{self.prefix}__layotto_etag__"
        self._get = self._client.register_script(_GET)
        self._set = self._client.register_script(_SET)
        self._delete = self._client.register_script(_DELETE)
        self._transact = self._client.register_script(_TRANSACT)

    def features(self) -> frozenset[str]:
        return frozenset({"ETAG", "TRANSACTIONAL"})

    def get(self, key: str) -> StateItem | None:
        return self.bulk_get([key])[0]

    def bulk_get(self, keys: Sequence[str]) -> list[StateItem | None]:
        if not keys:
            return []
        with _errors(f"state {self.name!r}"):
            rows = self._get(keys=[self.prefix + k for k in keys])
        return [
            None if row is None else StateItem(key, bytes(row[0]), row[1].decode())
            for key, row in zip(keys, rows, strict=True)
        ]

    def set(self, key: str, value: bytes, etag: str | None = None) -> str:
        with _errors(f"state {self.name!r}"):
            return str(self._set(keys=[self.prefix + key, self._counter], args=[bytes(value), etag or ""]))

    def delete(self, key: str, etag: str | None = None) -> bool:
        with _errors(f"state {self.name!r}"):
            return bool(self._delete(keys=[self.prefix + key], args=[etag or ""]))

    def transact(self, ops: Sequence[StateOp]) -> None:
        if not ops:
            return
        args: list[bytes | str] = []
        for op in ops:
            if op.kind not in (OpKind.UPSERT, OpKind.DELETE):
                raise ValueError(f"unknown state operation {op.kind!r}")
            args += [op.kind.value, bytes(op.value), op.etag or ""]
        with _errors(f"state {self.name!r}"):
            self._transact(keys=[self._counter] + [self.prefix + op.key for op in ops], args=args)


# --- lock ---------------------------------------------------------------------------------

_UNLOCK = """
local v = redis.call('GET', KEYS[1])
if not v then return 1 end
if v ~= ARGV[1] then return 2 end
redis.call('DEL', KEYS[1])
return 0
"""


class RedisLockStore(_RedisComponent):
    """SET NX PX locks; unlock checks the owner in a script (not re-entrant)."""

    def __init__(self, metadata: Metadata | None = None, *, name: str = "default") -> None:
        super().__init__(metadata, name=name)
        self._unlock = self._client.register_script(_UNLOCK)

    def try_lock(self, resource_id: str, owner: str, expire_seconds: int) -> bool:
        check_expire(expire_seconds)
        with _errors(f"lock {self.name!r}"):
            return bool(
                self._client.set(
                    f"{self.prefix}lock||{resource_id}", owner, nx=True, px=int(expire_seconds * 1000)
                )
            )

    def unlock(self, resource_id: str, owner: str) -> UnlockStatus:
        with _errors(f"lock {self.name!r}"):
            return UnlockStatus(int(self._unlock(keys=[f"{self.prefix}lock||{resource_id}"], args=[owner])))


# --- sequencer ----------------------------------------------------------------------------


class RedisSequencer(_RedisComponent):
    """INCR: ids 1, 2, 3, ... per key (as durable as the server's persistence)."""

    def next_id(self, key: str) -> int:
        with _errors(f"sequencer {self.name!r}"):
            return int(self._client.incr(f"{self.prefix}sequencer||{key}"))


# --- configuration ------------------------------------------------------------------------


def _item_json(item: ConfigItem) -> dict[str, object]:
    return {
        "key": item.key,
        "content": item.content,
        "group": item.group,
        "label": item.label,
        "tags": dict(item.tags),
        "metadata": dict(item.metadata),
    }


def _item_from(doc: Mapping[str, object]) -> ConfigItem:
    return ConfigItem(
        key=str(doc["key"]),
        content=str(doc.get("content", "")),
        group=str(doc.get("group", "")),
        label=str(doc.get("label", "")),
        tags=dict(doc.get("tags") or {}),  # type: ignore[call-overload]
        metadata=dict(doc.get("metadata") or {}),  # type: ignore[call-overload]
    )


class RedisConfigStore(_RedisComponent):
    """Configuration items in one hash per (group, label); ``set``/``delete`` (the admin
    methods) publish the change on a channel every instance listens to."""

    def __init__(self, metadata: Metadata | None = None, *, name: str = "default") -> None:
        super().__init__(metadata, name=name)
        self._index = f"{self.prefix}config||index"
        self._channel = f"{self.prefix}config||changes"
        self._subscribers = ConfigSubscribers()
        self._listener: threading.Thread | None = None
        self._pubsub: redis.client.PubSub | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def _hash(self, group: str, label: str) -> str:
        return f"{self.prefix}config||{group}||{label}"

    def _pairs(self, group: str, label: str) -> list[tuple[str, str]]:
        if group and label:
            return [(group, label)]
        members = self._client.smembers(self._index)
        pairs = [tuple(json.loads(m)) for m in members]
        return sorted(
            (str(g), str(lb)) for g, lb in pairs if (not group or g == group) and (not label or lb == label)
        )

    def get(self, keys: Sequence[str], *, group: str = "", label: str = "") -> list[ConfigItem]:
        items: list[ConfigItem] = []
        with _errors(f"configuration {self.name!r}"):
            for g, lb in self._pairs(group, label):
                if keys:
                    values = self._client.hmget(self._hash(g, lb), list(keys))
                else:
                    values = list(self._client.hgetall(self._hash(g, lb)).values())
                items += [_item_from(json.loads(v)) for v in values if v is not None]
        return sorted(
            (i for i in items if matches(i, keys, group, label)), key=lambda i: (i.key, i.group, i.label)
        )

    def set(self, items: Sequence[ConfigItem]) -> None:
        """Store ``items`` (replacing those with the same key, group and label)."""
        if not items:
            return
        with _errors(f"configuration {self.name!r}"):
            pipe = self._client.pipeline(transaction=True)
            for item in items:
                pipe.hset(self._hash(item.group, item.label), item.key, json.dumps(_item_json(item)))
                pipe.sadd(self._index, json.dumps([item.group, item.label]))
            pipe.publish(self._channel, json.dumps([_item_json(i) for i in items]))
            pipe.execute()

    def delete(self, keys: Sequence[str], *, group: str = "", label: str = "") -> list[ConfigItem]:
        """Remove the items with these keys (narrowed by group and label as ``get`` does;
        no keys removes nothing); returns them."""
        removed = self.get(keys, group=group, label=label) if keys else []
        if not removed:
            return []
        with _errors(f"configuration {self.name!r}"):
            pipe = self._client.pipeline(transaction=True)
            for item in removed:
                pipe.hdel(self._hash(item.group, item.label), item.key)
            pipe.publish(self._channel, json.dumps([_item_json(deleted_item(i)) for i in removed]))
            pipe.execute()
        return removed

    def subscribe(
        self, keys: Sequence[str], callback: Callable[[list[ConfigItem]], None]
    ) -> Callable[[], None]:
        with self._lock:
            if self._listener is None:
                self._start_listener()
        return self._subscribers.add(keys, callback)

    def _start_listener(self) -> None:
        with _errors(f"configuration {self.name!r}"):
            pubsub = self._client.pubsub(ignore_subscribe_messages=False)
            pubsub.subscribe(self._channel)
            # Wait for the confirmation: changes made after subscribe() returns are seen.
            while True:
                msg = pubsub.get_message(timeout=5.0)
                if msg is None:
                    pubsub.close()
                    raise ComponentError(f"configuration {self.name!r}: no answer to SUBSCRIBE")
                if msg["type"] == "subscribe":
                    break
        self._pubsub = pubsub
        self._listener = threading.Thread(
            target=self._listen, args=(pubsub,), name=f"config-{self.name}", daemon=True
        )
        self._listener.start()

    def _listen(self, pubsub: redis.client.PubSub) -> None:
        while not self._stop.is_set():
            try:
                msg = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            except redis.RedisError:
                if self._stop.is_set():
                    return
                log.exception("configuration %s: change listener failed; retrying", self.name)
                self._stop.wait(1.0)
                continue
            if msg is None or msg["type"] != "message":
                continue
            try:
                changed = [_item_from(doc) for doc in json.loads(msg["data"])]
            except (ValueError, KeyError, TypeError):
                log.error("configuration %s: bad change notice %r", self.name, msg["data"])
                continue
            self._subscribers.notify(changed)

    def close(self) -> None:
        self._stop.set()
        self._subscribers.clear()
        if self._listener is not None and self._listener is not threading.current_thread():
            self._listener.join()
        if self._pubsub is not None:
            self._pubsub.close()
        super().close()


# --- pub/sub ------------------------------------------------------------------------------


class RedisPubSub(DeliveryLoop, _RedisComponent):
    """Pub/sub on Redis Streams: a stream per topic, a consumer group per subscription
    (created at ``$``, destroyed when cancelled) or per durable group (kept), XACK once a
    message is finished; subscriptions and their delivery are ``DeliveryLoop``'s.
    Semantics as ``SqlitePubSub``'s, except that a message whose subscription died (a
    crash, a cancel mid-retry) is taken over by the group's other or next subscription
    only once it has been idle for ``processingTimeout`` seconds (default 60; so is a
    message whose handler runs longer than that, as in Dapr).

    A cancelled subscription's group is destroyed, but one a crash left behind stays in
    Redis (no other host can tell it is dead); it holds no messages, only a cursor. A
    stream keeps every message (also those no group wanted) unless ``maxLenApprox`` trims it.

    Extra metadata: ``processingTimeout`` (seconds), ``retryDelay`` (seconds between
    redeliveries, default 0.1), ``pollInterval`` (seconds a read blocks, default 0.2),
    ``maxLenApprox`` (trim streams to about this many entries, default 10000, so a slow or
    absent group cannot make a stream grow without bound; 0: never trim), and
    ``maxSubscriptions`` (each subscription is a delivery thread; default 128, one more is
    a ComponentError).
    """

    def __init__(self, metadata: Metadata | None = None, *, name: str = "default") -> None:
        metadata = metadata or {}
        super().__init__(metadata, name=name)
        self._idle_ms = int(meta_float(metadata, "processingTimeout", 60.0) * 1000)
        self._block_ms = max(1, int(meta_float(metadata, "pollInterval", 0.2) * 1000))
        self._maxlen = meta_int(metadata, "maxLenApprox", DEFAULT_MAX_LEN) or None
        max_subscriptions = meta_int(metadata, "maxSubscriptions", DEFAULT_MAX_SUBSCRIPTIONS)
        if max_subscriptions < 1:
            raise ComponentError(f"pubsub {name!r}: maxSubscriptions must be at least 1")
        self._init_loop(
            retry_delay=meta_float(metadata, "retryDelay", 0.1), max_subscriptions=max_subscriptions
        )

    def _stream(self, topic: str) -> str:
        return self.prefix + topic

    def publish(
        self, topic: str, data: bytes, content_type: str = "", metadata: Mapping[str, str] | None = None
    ) -> str:
        if not topic:
            raise ValueError("topic must not be empty")
        message_id = str(uuid.uuid4())
        fields = {
            "id": message_id,
            "data": bytes(data),
            "contentType": content_type or DEFAULT_CONTENT_TYPE,
            "metadata": json.dumps(dict(metadata or {})),
        }
        with _errors(f"pubsub {self.name!r}"):
            self._client.xadd(
                self._stream(topic),
                fields,  # type: ignore[arg-type]
                maxlen=self._maxlen,
                approximate=True,
            )
        return message_id

    # -- subscribing (DeliveryLoop's hooks) ----------------------------------------------

    group_prefix = "layotto-"

    def _open_group(self, sub: Subscription) -> None:
        with _errors(f"pubsub {self.name!r}"):
            try:
                self._client.xgroup_create(self._stream(sub.topic), sub.group, id="$", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    def delete_group(self, topic: str, group: str) -> None:
        """Forget durable group ``group`` of ``topic`` (it must have no subscription here)."""
        with self._subs_lock:
            if self._has_subscription(topic, group):
                raise ComponentError(f"group {group!r} of topic {topic!r} still has subscriptions")
        with _errors(f"pubsub {self.name!r}"):
            self._client.xgroup_destroy(self._stream(topic), group)

    def _release(self, sub: Subscription) -> None:
        stream = self._stream(sub.topic)
        try:
            with _errors(f"pubsub {self.name!r}"):
                if not sub.durable:
                    self._client.xgroup_destroy(stream, sub.group)
                    return
                if sub.unfinished is not None:
                    # Hand it back: make it look idle for longer than the processing
                    # timeout, so the group's next claim takes it at once.
                    self._client.xclaim(
                        stream,
                        sub.group,
                        sub.consumer,
                        0,
                        [sub.unfinished],
                        idle=self._idle_ms + 1000,
                        justid=True,
                    )
                for consumer in self._client.xinfo_consumers(stream, sub.group):
                    if _text(consumer["name"]) == sub.consumer and consumer["pending"] == 0:
                        self._client.xgroup_delconsumer(stream, sub.group, sub.consumer)
        except ComponentError:
            log.exception("pubsub %s: cannot release a subscription to %s", self.name, sub.topic)

    def _message(self, sub: Subscription, fields: Mapping[bytes, bytes]) -> Message:
        return Message(
            id=_text(fields.get(b"id", b"")),
            topic=sub.topic,
            data=bytes(fields.get(b"data", b"")),
            content_type=_text(fields.get(b"contentType", b"")) or DEFAULT_CONTENT_TYPE,
            metadata=json.loads(fields.get(b"metadata", b"{}")),
        )

    def _claim(self, sub: Subscription) -> Claim | None:
        """The group's next message: one a dead subscription left (idle for the processing
        timeout) first, else a new one. Returns (entry id, attempts so far, message)."""
        stream = self._stream(sub.topic)
        with _errors(f"pubsub {self.name!r}"):
            while True:
                reply = self._client.xautoclaim(
                    stream, sub.group, sub.consumer, min_idle_time=self._idle_ms, start_id="0-0", count=1
                )
                entries = reply[1]
                if not entries:
                    break
                entry_id, fields = entries[0]
                pending = self._client.xpending_range(stream, sub.group, entry_id, entry_id, 1)
                delivered = int(pending[0]["times_delivered"]) if pending else 1
                attempts = delivered - 1  # XAUTOCLAIM counted this delivery already
                if fields is None or attempts >= sub.max_attempts:
                    log.warning(
                        "pubsub %s: dropping a message on %s after %d attempts",
                        self.name,
                        sub.topic,
                        attempts,
                    )
                    self._client.xack(stream, sub.group, entry_id)
                    continue
                return entry_id, attempts, self._message(sub, fields)
            reply = self._client.xreadgroup(
                sub.group, sub.consumer, {stream: ">"}, count=1, block=self._block_ms
            )
            if not reply:
                return None
            entry_id, fields = reply[0][1][0]
            return entry_id, 0, self._message(sub, fields)

    def _retry(self, sub: Subscription, ref: bytes) -> None:
        try:
            with _errors(f"pubsub {self.name!r}"):
                # Claim it again: counts the delivery, and keeps the idle time short so
                # that no other consumer takes it over.
                self._client.xclaim(self._stream(sub.topic), sub.group, sub.consumer, 0, [ref])
        except ComponentError:
            log.exception("pubsub %s: cannot reclaim a message on %s", self.name, sub.topic)

    def _finish(self, sub: Subscription, ref: bytes) -> None:
        try:
            with _errors(f"pubsub {self.name!r}"):
                self._client.xack(self._stream(sub.topic), sub.group, ref)
        except ComponentError:
            log.exception("pubsub %s: cannot acknowledge a message on %s", self.name, sub.topic)

    def close(self) -> None:
        self._close_subscriptions()
        super().close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

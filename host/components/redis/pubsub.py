"""Pub/sub on Redis Streams (see ``RedisPubSub``)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping

import redis

from layotto.host.components import ComponentError, Message
from layotto.host.components.base import Metadata, meta_float, meta_int
from layotto.host.components.delivery import Claim, DeliveryLoop, Subscription
from layotto.host.components.redis.client import RedisComponent, redis_errors

log = logging.getLogger("layotto.components.redis")

DEFAULT_CONTENT_TYPE = "application/octet-stream"
DEFAULT_MAX_LEN = 10000  # entries a pub/sub stream keeps (approximately)
DEFAULT_MAX_SUBSCRIPTIONS = 128  # subscriptions (delivery threads) per pub/sub component


class RedisPubSub(DeliveryLoop, RedisComponent):
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
        with redis_errors(f"pubsub {self.name!r}"):
            self._client.xadd(
                self._stream(topic),
                fields,
                maxlen=self._maxlen,
                approximate=True,
            )
        return message_id

    # -- subscribing (DeliveryLoop's hooks) ----------------------------------------------

    group_prefix = "layotto-"

    def _open_group(self, sub: Subscription) -> None:
        with redis_errors(f"pubsub {self.name!r}"):
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
        with redis_errors(f"pubsub {self.name!r}"):
            self._client.xgroup_destroy(self._stream(topic), group)

    def _release(self, sub: Subscription) -> None:
        stream = self._stream(sub.topic)
        try:
            with redis_errors(f"pubsub {self.name!r}"):
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
        with redis_errors(f"pubsub {self.name!r}"):
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
            with redis_errors(f"pubsub {self.name!r}"):
                # Claim it again: counts the delivery, and keeps the idle time short so
                # that no other consumer takes it over.
                self._client.xclaim(self._stream(sub.topic), sub.group, sub.consumer, 0, [ref])
        except ComponentError:
            log.exception("pubsub %s: cannot reclaim a message on %s", self.name, sub.topic)

    def _finish(self, sub: Subscription, ref: bytes) -> None:
        try:
            with redis_errors(f"pubsub {self.name!r}"):
                self._client.xack(self._stream(sub.topic), sub.group, ref)
        except ComponentError:
            log.exception("pubsub %s: cannot acknowledge a message on %s", self.name, sub.topic)

    def close(self) -> None:
        self._close_subscriptions()
        super().close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

"""Configuration on Redis: a hash per (group, label), changes announced on a channel."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence

import redis

from layotto.host.components import ComponentError, ConfigItem
from layotto.host.components.base import ConfigSubscribers, Metadata, deleted_item, matches
from layotto.host.components.redis.client import RedisComponent, redis_errors

log = logging.getLogger("layotto.components.redis")


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
        tags=dict(doc.get("tags") or {}),
        metadata=dict(doc.get("metadata") or {}),
    )


class RedisConfigStore(RedisComponent):
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
        with redis_errors(f"configuration {self.name!r}"):
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
        with redis_errors(f"configuration {self.name!r}"):
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
        with redis_errors(f"configuration {self.name!r}"):
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
        with redis_errors(f"configuration {self.name!r}"):
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

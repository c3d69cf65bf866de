"""Helpers shared by the component backends: metadata parsing, config subscriber lists,
cancellable worker threads."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence

from layotto.host.components import ComponentError, ConfigItem, Delivery, Handler, Message

log = logging.getLogger("layotto.components")

Metadata = Mapping[str, object]


def meta_str(metadata: Metadata, name: str, default: str = "") -> str:
    value = metadata.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool | int | float | str):
        return str(value)
    raise ComponentError(f"metadata {name!r} must be a string, not {type(value).__name__}")


def meta_float(metadata: Metadata, name: str, default: float) -> float:
    value = metadata.get(name, default)
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ComponentError(f"metadata {name!r} must be a number, not {value!r}") from None
    if result < 0:
        raise ComponentError(f"metadata {name!r} must not be negative, not {value!r}")
    return result


def meta_int(metadata: Metadata, name: str, default: int) -> int:
    value = metadata.get(name, default)
    if isinstance(value, bool):
        raise ComponentError(f"metadata {name!r} must be an integer, not {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ComponentError(f"metadata {name!r} must be an integer, not {value!r}") from None


def meta_bool(metadata: Metadata, name: str, default: bool) -> bool:
    value = metadata.get(name, default)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ComponentError(f"metadata {name!r} must be a boolean, not {value!r}")


def check_expire(expire_seconds: int) -> None:
    if expire_seconds <= 0:
        raise ValueError(f"expire_seconds must be positive, not {expire_seconds}")


def matches(item: ConfigItem, keys: Sequence[str] | set[str], group: str, label: str) -> bool:
    """The filter every ConfigStore.get applies: empty keys/group/label match anything."""
    return (
        (not keys or item.key in keys)
        and (not group or item.group == group)
        and (not label or item.label == label)
    )


def deleted_item(item: ConfigItem) -> ConfigItem:
    """How a removed configuration item is reported to subscribers."""
    return ConfigItem(item.key, "", item.group, item.label, {}, {"deleted": "true"})


class ConfigSubscribers:
    """The subscriptions of one ConfigStore: ``notify`` hands each callback the changed
    items whose key it watches (all keys when it watches none)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: dict[int, tuple[frozenset[str], Callable[[list[ConfigItem]], None]]] = {}
        self._next = 0

    def add(self, keys: Sequence[str], callback: Callable[[list[ConfigItem]], None]) -> Callable[[], None]:
        with self._lock:
            token = self._next
            self._next += 1
            self._subs[token] = (frozenset(keys), callback)

        def cancel() -> None:
            with self._lock:
                self._subs.pop(token, None)

        return cancel

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._subs)

    def clear(self) -> None:
        with self._lock:
            self._subs.clear()

    def notify(self, changed: Iterable[ConfigItem]) -> None:
        changed = list(changed)
        if not changed:
            return
        with self._lock:
            subs = list(self._subs.values())
        for keys, callback in subs:
            mine = [item for item in changed if not keys or item.key in keys]
            if not mine:
                continue
            try:
                callback(mine)
            except Exception:
                log.exception("configuration subscriber failed")


def diff_items(
    old: Mapping[tuple[str, str, str], ConfigItem], new: Mapping[tuple[str, str, str], ConfigItem]
) -> list[ConfigItem]:
    """Items added or changed in ``new``, and removed ones (as ``deleted_item``)."""
    changed = [item for ident, item in new.items() if old.get(ident) != item]
    changed += [deleted_item(item) for ident, item in old.items() if ident not in new]
    return changed


class Poller:
    """A daemon thread calling ``tick`` every ``interval`` seconds until stopped."""

    def __init__(self, name: str, interval: float, tick: Callable[[], None]) -> None:
        self._interval = interval
        self._tick = tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._tick()
            except Exception:
                log.exception("%s failed", self._thread.name)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()


def with_attempt(message: Message, attempt: int) -> Message:
    return Message(message.id, message.topic, message.data, message.content_type, message.metadata, attempt)


def call_handler(handler: Handler, message: Message, store: str) -> Delivery:
    """Run a subscriber's handler; an exception or a non-Delivery answer means RETRY."""
    try:
        result = handler(message)
    except Exception:
        log.exception("pubsub %s: handler for %s failed", store, message.topic)
        return Delivery.RETRY
    if not isinstance(result, Delivery):
        log.error("pubsub %s: handler for %s returned %r, not a Delivery", store, message.topic, result)
        return Delivery.RETRY
    return result

"""Deliver a function's pub/sub topics and configuration changes to it as HTTP requests.

A function names what it listens to in its annotations (parsed by :mod:`layotto.host.admission`);
the names reach the node's shared components through :mod:`layotto.host.scoping`, so a
function only ever hears its own namespace's topics and its own app's configuration items.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from layotto.host import scoping
from layotto.host.components import ConfigItem, Delivery
from layotto.host.components import Message as PubSubMessage
from layotto.host.function import Function, Request

log = logging.getLogger(__name__)

Cancel = Callable[[], None]


class Wanted(Protocol):
    """What a function listens to: the admission's fields this module reads."""

    namespace: str
    subscriptions: Sequence[tuple[str, str]]  # (pubsub, topic)
    config_subscriptions: Sequence[tuple[str, Sequence[str]]]  # (store, keys)


def subscribe(fn: Function, wanted: Wanted) -> list[Cancel]:
    """Deliver the pub/sub topics in ``wanted`` to ``fn`` as ``POST /<topic>`` requests
    (2xx acknowledges, 404 drops, anything else retries). Returns the cancel functions;
    a topic that cannot be subscribed is logged to the function's log and skipped."""
    components = _components(fn)
    if components is None:
        return []
    cancels = []
    for pubsub_name, topic in wanted.subscriptions:
        item = f"{pubsub_name}/{topic}"
        try:
            pubsub = components.pubsub(pubsub_name)
            # Topics are per namespace: another namespace's publishers never reach it.
            scoped = scoping.scoped_topic(components, pubsub_name, wanted.namespace, topic)
        except Exception as exc:
            log.warning("%s: cannot subscribe to %s: %s", fn.name, item, exc)
            fn.log.add("host", f"cannot subscribe to {item}: {exc}")
            continue
        cancels.append(pubsub.subscribe(scoped, _deliverer(fn, topic)))
        fn.log.add("host", f"subscribed to {item}")
    return cancels


def watch_configuration(fn: Function, wanted: Wanted) -> list[Cancel]:
    """Tell ``fn`` about changes of the configuration items in ``wanted``: each change is a
    ``POST /_layotto/config/<store>`` request whose body is a JSON list of the changed items
    (key, content, group, label; deleted items have ``"deleted": true``). The function sees
    its own app's items only, under the keys it named. Returns the cancel functions."""
    components = _components(fn)
    if components is None:
        return []
    cancels = []
    for store_name, keys in wanted.config_subscriptions:
        item = f"{store_name}/{'+'.join(keys)}"
        try:
            cancel = scoping.subscribe_configuration(
                components, store_name, wanted.namespace, fn.app_id, keys, _config_notifier(fn, store_name)
            )
        except Exception as exc:
            fn.log.add("host", f"cannot watch configuration {item}: {exc}")
            continue
        cancels.append(cancel)
        fn.log.add("host", f"watching configuration {item}")
    return cancels


def _components(fn: Function) -> Any:
    return fn.services.components if fn.services is not None else None


def _deliverer(fn: Function, topic: str) -> Callable[[PubSubMessage], Delivery]:
    """A pub/sub handler that hands each message to ``fn`` as ``POST /<topic>``."""

    def deliver(message: PubSubMessage) -> Delivery:
        request = Request(
            b"POST",
            b"/" + topic.encode(),
            b"",
            [
                (b"content-type", message.content_type.encode()),
                (b"x-layotto-topic", topic.encode()),
                (b"x-layotto-message-id", message.id.encode()),
                (b"x-layotto-attempt", str(message.attempt).encode()),
            ],
            message.data,
        )
        status = fn.call_sync(request).status
        if 200 <= status < 300:
            return Delivery.SUCCESS
        if status == 404:
            return Delivery.DROP
        return Delivery.RETRY

    return deliver


def _config_notifier(fn: Function, store: str) -> Callable[[list[ConfigItem]], None]:
    """A configuration callback that hands changed items to ``fn`` as a JSON list."""

    def notify(items: list[ConfigItem]) -> None:
        body = json.dumps(
            [
                {
                    "key": i.key,
                    "content": i.content,
                    "group": i.group,
                    "label": i.label,
                    **({"deleted": True} if dict(i.metadata).get("deleted") == "true" else {}),
                }
                for i in items
            ]
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"x-layotto-config-store", store.encode())]
        response = fn.call_sync(Request(b"POST", b"/_layotto/config/" + store.encode(), b"", headers, body))
        if response.status >= 300:
            fn.log.add("host", f"configuration change for {store} answered {response.status}")

    return notify

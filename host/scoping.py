"""Who owns what in the node's shared components: one rule for every caller.

The Runtime ABI (``host/abi_host.py``), the gRPC Runtime API (``host/grpc_api.py``) and the
subscription wiring all name components on behalf of a tenant; every name they pass goes
through this module, so the rule is written once. :func:`owner` scopes an app id under the
caller's namespace (an id a module chose for itself becomes ``<namespace>.<id>``); keys and
configuration items are per app (the store's ``keyPrefix``), topics and secrets per
namespace (``topicPrefix`` / ``secretPrefix: none`` opt out), and a name that could step out
of its scope raises :class:`ScopeError`. A caller with no namespace (``None``) is the host
itself or a test harness: its names are used as given, its keys prefixed by its app id alone.

See docs/components.md ("Who sees what", "keyPrefix") and docs/security.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from layotto.host.components import ConfigItem
from layotto.host.errors import ScopeError

SEPARATOR = "||"
SECRET_SEPARATOR = "/"


def _metadata(components: Any, kind: str, name: str) -> Mapping[str, object]:
    lookup = getattr(components, "metadata", None)
    if not callable(lookup):
        return {}
    try:
        return lookup(kind, name) or {}
    except Exception:  # an unknown component: the safe (scoped) default applies
        return {}


def _mode(components: Any, kind: str, name: str, field: str, default: str) -> str:
    return str(_metadata(components, kind, name).get(field, default) or default).strip().lower()


def owner(namespace: str | None, app_id: str) -> str:
    """The app id keys are scoped by: ``app_id`` when it belongs to ``namespace`` (starts
    with ``<namespace>.``), else ``<namespace>.<app_id>``; ``app_id`` itself without a
    namespace."""
    if namespace is None or app_id.startswith(f"{namespace}."):
        return app_id
    return f"{namespace}.{app_id}"


def check_key(key: str, what: str = "key") -> None:
    """Refuse a key (or topic) containing the separator of scoped keys."""
    if SEPARATOR in key:
        raise ScopeError(f"input {what} '{key}' can't contain '{SEPARATOR}'")


def key_prefix(components: Any, kind: str, store: str, app_id: str, namespace: str | None = None) -> str:
    """What keys of ``store`` (a component of ``kind``) are prefixed with for this caller:
    ``<owner>||``, ``<store>||`` or ``""`` (see the module docstring)."""
    mode = _mode(components, kind, store, "keyPrefix", "appid")
    if mode == "none":
        return ""
    if mode == "name":
        return f"{store}{SEPARATOR}"
    who = owner(namespace, app_id)
    return f"{who}{SEPARATOR}" if who else ""


def state_key(
    components: Any, kind: str, store: str, key: str, app_id: str, namespace: str | None = None
) -> str:
    """``key`` as stored in ``store``: state, lock (``kind`` "lock") and sequencer
    (``kind`` "sequencer") keys. A key containing ``||`` is refused."""
    check_key(key)
    return key_prefix(components, kind, store, app_id, namespace) + key


def scoped_topic(components: Any, pubsub_name: str, namespace: str | None, topic: str) -> str:
    """The component topic for ``topic`` published or subscribed from ``namespace``:
    ``<namespace>||<topic>``, or ``topic`` itself when the pub/sub component says
    ``topicPrefix: none`` (or for the host itself, namespace None)."""
    check_key(topic, "topic")
    if namespace is None or _mode(components, "pubsub", pubsub_name, "topicPrefix", "namespace") == "none":
        return topic
    return f"{namespace}{SEPARATOR}{topic}"


def scoped_secret(components: Any, store: str, namespace: str | None, name: str) -> str:
    """The store's name for secret ``name`` requested from ``namespace``: ``<namespace>/<name>``,
    or ``name`` itself when the store says ``secretPrefix: none`` (or for the host itself).
    A name containing ``/`` is refused."""
    if SECRET_SEPARATOR in name:
        raise ScopeError(f"secret name '{name}' can't contain '{SECRET_SEPARATOR}'")
    if namespace is None or _mode(components, "secrets", store, "secretPrefix", "namespace") == "none":
        return name
    return f"{namespace}{SECRET_SEPARATOR}{name}"


def _unscoped(items: Sequence[ConfigItem], prefix: str) -> list[ConfigItem]:
    return [replace(i, key=i.key[len(prefix) :]) for i in items if i.key.startswith(prefix)]


def get_configuration(
    components: Any,
    store_name: str,
    namespace: str | None,
    app_id: str,
    keys: Sequence[str],
    *,
    group: str = "",
    label: str = "",
) -> list[ConfigItem]:
    """The caller's configuration items for ``keys`` (all of its items when ``keys`` is
    empty), with the keys as the caller names them."""
    for key in keys:
        check_key(key)
    store = components.configuration(store_name)
    prefix = key_prefix(components, "configuration", store_name, app_id, namespace)
    if not prefix:
        return store.get(list(keys), group=group, label=label)
    items = store.get([prefix + k for k in keys], group=group, label=label)
    return _unscoped(items, prefix)


def subscribe_configuration(
    components: Any,
    store_name: str,
    namespace: str | None,
    app_id: str,
    keys: Sequence[str],
    callback: Callable[[list[ConfigItem]], None],
) -> Callable[[], None]:
    """Subscribe ``callback`` to changes of the caller's items ``keys`` (all of its items
    when empty) in configuration store ``store_name``: it sees only its own app's items,
    under the keys it named. Returns the cancel function."""
    for key in keys:
        check_key(key)
    store = components.configuration(store_name)
    prefix = key_prefix(components, "configuration", store_name, app_id, namespace)
    if not prefix:
        return store.subscribe(list(keys), callback)

    def mine(items: list[ConfigItem]) -> None:
        own = _unscoped(items, prefix)
        if own:
            callback(own)

    return store.subscribe([prefix + k for k in keys], mine)

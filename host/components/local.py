"""Configuration and secrets from a local file or from environment variables.

**Configuration file** (YAML, or JSON, which YAML reads too): a mapping of key to item::

    greeting: hello                  # content "hello", no group or label
    timeout: 30                      # scalars become their JSON text ("30", "true")
    db_url:                          # one item with a group, a label, tags
      content: "postgres://db/app"
      group: backend
      label: prod
      tags: {owner: ops}
    feature_x:                       # several variants of one key
      - {content: "on", label: dev}
      - {content: "off", label: prod}

The file is read again whenever its modification time, size or inode changes: checked on
every ``get`` and every ``pollInterval`` seconds (default 1) while someone subscribes.
Subscribers get the items that changed; a removed item arrives with empty content and
metadata ``{"deleted": "true"}``. A file that becomes unreadable or invalid keeps the last
good content (logged).

**Configuration from the environment**: every variable whose name starts with ``prefix``
is an item whose key is the rest of the name (no group, no label). ``os.environ`` is
polled as the file is.

**Secret file**: a mapping of secret name to a mapping of key to value (``db: {user: app,
password: s3cret}``); a scalar makes a one-key secret named after itself (``token: abc``
is ``{"token": "abc"}``), as Dapr's local.file store does. Read again when it changes.
A namespace's secrets (``host.scoping``: secret ``S`` asked from namespace ``N`` is the
store's ``N/S``) are the names ``"N/S"`` (``shop/db: {...}``); the one-key secret of a
scalar ``"shop/token": abc`` is ``{"token": "abc"}``.

**Secrets from the environment**: secret ``NAME`` is the variable ``<prefix>NAME``, as
the one-key secret ``{"NAME": value}`` (as Dapr's local.env store does). A namespace's
secret ``N/NAME`` is the variable ``<prefix>N__NAME`` (``/`` is written ``__``: variable
names cannot hold a ``/`` in most tools), still the one-key secret ``{"NAME": value}``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import yaml

from layotto.host.components import ComponentError, ConfigItem, NotFound
from layotto.host.components.base import ConfigSubscribers, Poller, diff_items, matches

log = logging.getLogger("layotto.components.local")

Ident = tuple[str, str, str]


def _scalar(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _str_map(value: object, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ComponentError(f"{what} must be a mapping, not {type(value).__name__}")
    return {str(k): _scalar(v) for k, v in value.items()}


def parse_config(doc: object, source: str) -> dict[Ident, ConfigItem]:
    """The items a configuration document describes (see the module docstring)."""
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise ComponentError(f"{source}: configuration must be a mapping of key to item")
    items: dict[Ident, ConfigItem] = {}
    for raw_key, spec in doc.items():
        key = str(raw_key)
        for variant in spec if isinstance(spec, list) else [spec]:
            if isinstance(variant, Mapping):
                if "content" not in variant:
                    raise ComponentError(f"{source}: item {key!r} has no 'content'")
                unknown = set(variant) - {"content", "group", "label", "tags", "metadata"}
                if unknown:
                    raise ComponentError(f"{source}: item {key!r} has unknown fields {sorted(unknown)}")
                item = ConfigItem(
                    key=key,
                    content=_scalar(variant["content"]),
                    group=str(variant.get("group") or ""),
                    label=str(variant.get("label") or ""),
                    tags=_str_map(variant.get("tags"), f"{source}: tags of {key!r}"),
                    metadata=_str_map(variant.get("metadata"), f"{source}: metadata of {key!r}"),
                )
            elif isinstance(variant, list):
                raise ComponentError(f"{source}: item {key!r}: nested lists are not items")
            else:
                item = ConfigItem(key=key, content=_scalar(variant))
            items[(item.key, item.group, item.label)] = item
    return items


def _read_document(path: Path) -> object:
    try:
        text = path.read_text()
    except OSError as e:
        raise ComponentError(f"cannot read {path}: {e}") from e
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ComponentError(
            f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}"
        ) from e


class _WatchedFile:
    """A file parsed again whenever its stat signature changes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._signature: tuple[int, int, int] | None = None

    def _stat(self) -> tuple[int, int, int]:
        st = self.path.stat()
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self) -> object:
        try:
            self._signature = self._stat()
        except OSError as e:
            raise ComponentError(f"cannot read {self.path}: {e}") from e
        return _read_document(self.path)

    def changed(self) -> bool:
        try:
            return self._stat() != self._signature
        except OSError:
            return False  # gone: keep what we had


class _PollingConfigStore:
    """A read-only store whose items are loaded again on demand; changes seen on a
    ``get`` or by the poller (running while anyone subscribes) go to the subscribers."""

    in_process = True  # no network wait: its calls may run on the event loop

    def __init__(self, name: str, poll_interval: float) -> None:
        self.name = name
        self._poll_interval = poll_interval
        self._subscribers = ConfigSubscribers()
        self._refresh_lock = threading.Lock()
        self._poller: Poller | None = None
        self._items: dict[Ident, ConfigItem] = self._load()

    def _load(self) -> dict[Ident, ConfigItem]:
        raise NotImplementedError

    def _stale(self) -> bool:
        return True

    def _refresh(self) -> None:
        with self._refresh_lock:
            if not self._stale():
                return
            try:
                new = self._load()
            except ComponentError as e:
                log.error("configuration %s: keeping the last good content: %s", self.name, e)
                return
            old, self._items = self._items, new
        self._subscribers.notify(diff_items(old, new))

    def get(self, keys: Sequence[str], *, group: str = "", label: str = "") -> list[ConfigItem]:
        self._refresh()
        wanted = set(keys)
        items = [i for i in self._items.values() if matches(i, wanted, group, label)]
        return sorted(items, key=lambda i: (i.key, i.group, i.label))

    def subscribe(
        self, keys: Sequence[str], callback: Callable[[list[ConfigItem]], None]
    ) -> Callable[[], None]:
        cancel = self._subscribers.add(keys, callback)
        with self._refresh_lock:
            if self._poller is None:
                self._poller = Poller(f"config-{self.name}", self._poll_interval, self._refresh)
        return cancel

    def close(self) -> None:
        self._subscribers.clear()
        with self._refresh_lock:
            poller, self._poller = self._poller, None
        if poller is not None:
            poller.stop()


class FileConfigStore(_PollingConfigStore):
    def __init__(self, path: str | Path, *, name: str = "default", poll_interval: float = 1.0) -> None:
        self._file = _WatchedFile(path)
        super().__init__(name, poll_interval)

    def _load(self) -> dict[Ident, ConfigItem]:
        return parse_config(self._file.load(), str(self._file.path))

    def _stale(self) -> bool:
        return self._file.changed()


class EnvConfigStore(_PollingConfigStore):
    def __init__(self, prefix: str = "", *, name: str = "default", poll_interval: float = 1.0) -> None:
        self.prefix = prefix
        super().__init__(name, poll_interval)

    def _load(self) -> dict[Ident, ConfigItem]:
        n = len(self.prefix)
        return {
            (var[n:], "", ""): ConfigItem(var[n:], value)
            for var, value in os.environ.items()
            if var.startswith(self.prefix) and len(var) > n
        }


def parse_secrets(doc: object, source: str) -> dict[str, dict[str, str]]:
    """The secrets a secret document describes (see the module docstring)."""
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise ComponentError(f"{source}: secrets must be a mapping of name to secret")
    secrets: dict[str, dict[str, str]] = {}
    for raw_name, value in doc.items():
        name = str(raw_name)
        if isinstance(value, Mapping):
            secrets[name] = _str_map(value, f"{source}: secret {name!r}")
        elif isinstance(value, list):
            raise ComponentError(f"{source}: secret {name!r} must be a mapping or a scalar")
        else:
            secrets[name] = {name.rpartition("/")[2]: _scalar(value)}
    return secrets


class FileSecretStore:
    in_process = True  # no network wait: its calls may run on the event loop

    def __init__(self, path: str | Path, *, name: str = "default") -> None:
        self.name = name
        self._file = _WatchedFile(path)
        self._lock = threading.Lock()
        self._secrets = parse_secrets(self._file.load(), str(self._file.path))

    def _current(self) -> dict[str, dict[str, str]]:
        with self._lock:
            if self._file.changed():
                try:
                    self._secrets = parse_secrets(self._file.load(), str(self._file.path))
                except ComponentError as e:
                    log.error("secrets %s: keeping the last good content: %s", self.name, e)
            return self._secrets

    def get(self, name: str) -> dict[str, str]:
        found = self._current().get(name)
        if found is None:
            raise NotFound(f"secret store {self.name!r} has no secret {name!r}")
        return dict(found)

    def bulk(self) -> dict[str, dict[str, str]]:
        return {name: dict(value) for name, value in self._current().items()}

    def close(self) -> None:
        pass


class EnvSecretStore:
    in_process = True  # no network wait: its calls may run on the event loop

    def __init__(self, prefix: str = "", *, name: str = "default") -> None:
        self.name = name
        self.prefix = prefix

    def variable(self, name: str) -> str:
        """The environment variable of secret ``name`` (``N/S`` is ``<prefix>N__S``)."""
        return self.prefix + name.replace("/", "__")

    def get(self, name: str) -> dict[str, str]:
        variable = self.variable(name)
        value = os.environ.get(variable) if name.rpartition("/")[2] else None
        if value is None:
            raise NotFound(f"secret store {self.name!r} has no secret {name!r} (no ${variable})")
        return {name.rpartition("/")[2]: value}

    def bulk(self) -> dict[str, dict[str, str]]:
        n = len(self.prefix)
        return {
            var[n:]: {var[n:]: value}
            for var, value in os.environ.items()
            if var.startswith(self.prefix) and len(var) > n
        }

    def close(self) -> None:
        pass

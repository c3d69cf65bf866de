"""The node's named components, read from one YAML file (like Layotto's config.json or Dapr's
component files), or from :data:`DEFAULT_CONFIG` without one.

The file maps each kind (``state``, ``pubsub``, ``configuration``, ``lock``, ``sequencer``,
``secrets``; Layotto's ``pub_subs``, ``config_store`` and ``secret_store`` too) to its
components by name, and each to its ``type`` and ``metadata``. Unknown kinds, types and
fields are errors; every component is built when the host starts, so a bad file stops the
host then instead of failing a call later; a backend's module (Redis, Kubernetes) is
imported only when a component of its type is declared.

The format, every type's metadata and the defaults: see docs/components.md.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from layotto.host.components import (
    ComponentError,
    ConfigStore,
    LockStore,
    PubSub,
    SecretStore,
    Sequencer,
    StateStore,
)
from layotto.host.components.base import meta_float, meta_int, meta_str
from layotto.host.errors import ComponentConfigError, UnknownComponent

log = logging.getLogger("layotto.components")

KINDS = ("state", "pubsub", "configuration", "lock", "sequencer", "secrets")
KIND_ALIASES = {"pub_subs": "pubsub", "config_store": "configuration", "secret_store": "secrets"}

DEFAULT_CONFIG = """
state:
  state_demo: {type: sqlite}
pubsub:
  pub_subs_demo: {type: sqlite}
configuration:
  config_demo: {type: sqlite}
lock:
  lock_demo: {type: sqlite}
sequencer:
  sequencer_demo: {type: sqlite}
secrets:
  secret_demo: {type: env, metadata: {prefix: LAYOTTO_SECRET_}}
"""


@dataclass(frozen=True)
class ComponentSpec:
    kind: str
    name: str
    type: str
    metadata: Mapping[str, object]


@dataclass(frozen=True)
class _Context:
    state_dir: Path
    base_dir: Path  # where relative file paths are


def _in(base: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


def _db(spec: ComponentSpec, ctx: _Context) -> Path:
    return _in(ctx.state_dir, meta_str(spec.metadata, "path", "components.db"))


def _required(spec: ComponentSpec, key: str) -> str:
    value = meta_str(spec.metadata, key)
    if not value:
        raise ComponentConfigError(f"{spec.kind} {spec.name!r} (type {spec.type}) needs metadata {key!r}")
    return value


def _sqlite_state(spec: ComponentSpec, ctx: _Context) -> object:
    from layotto.host.components.sqlite import SqliteStateStore

    return SqliteStateStore(_db(spec, ctx), name=spec.name)


def _sqlite_pubsub(spec: ComponentSpec, ctx: _Context) -> object:
    from layotto.host.components.sqlite import (
        DEFAULT_MAX_BACKLOG,
        DEFAULT_MAX_SUBSCRIPTIONS,
        SqlitePubSub,
    )

    return SqlitePubSub(
        _db(spec, ctx),
        name=spec.name,
        poll_interval=meta_float(spec.metadata, "pollInterval", 0.5),
        retry_delay=meta_float(spec.metadata, "retryDelay", 0.1),
        max_backlog=meta_int(spec.metadata, "maxBacklog", DEFAULT_MAX_BACKLOG),
        max_subscriptions=meta_int(spec.metadata, "maxSubscriptions", DEFAULT_MAX_SUBSCRIPTIONS),
    )


def _sqlite_config(spec: ComponentSpec, ctx: _Context) -> object:
    from layotto.host.components.sqlite import SqliteConfigStore

    return SqliteConfigStore(_db(spec, ctx), name=spec.name)


def _sqlite_lock(spec: ComponentSpec, ctx: _Context) -> object:
    from layotto.host.components.sqlite import SqliteLockStore

    return SqliteLockStore(_db(spec, ctx), name=spec.name)


def _sqlite_sequencer(spec: ComponentSpec, ctx: _Context) -> object:
    from layotto.host.components.sqlite import SqliteSequencer

    return SqliteSequencer(_db(spec, ctx), name=spec.name)


def _needs(package: str, type_: str) -> ComponentConfigError:
    return ComponentConfigError(
        f"components of type {type_} need the Python package {package!r}: pip install {package}"
    )


def _redis(class_name: str) -> Callable[[ComponentSpec, _Context], object]:
    def build(spec: ComponentSpec, ctx: _Context) -> object:
        try:
            from layotto.host.components import redis as backend
        except ImportError as e:
            raise _needs("redis", "redis") from e

        return getattr(backend, class_name)(spec.metadata, name=spec.name)

    return build


def _file_config(spec: ComponentSpec, ctx: _Context) -> object:
    from layotto.host.components.local import FileConfigStore

    return FileConfigStore(
        _in(ctx.base_dir, _required(spec, "path")),
        name=spec.name,
        poll_interval=meta_float(spec.metadata, "pollInterval", 1.0),
    )


def _env_config(spec: ComponentSpec, ctx: _Context) -> object:
    from layotto.host.components.local import EnvConfigStore

    return EnvConfigStore(
        meta_str(spec.metadata, "prefix"),
        name=spec.name,
        poll_interval=meta_float(spec.metadata, "pollInterval", 1.0),
    )


def _file_secrets(spec: ComponentSpec, ctx: _Context) -> object:
    from layotto.host.components.local import FileSecretStore

    return FileSecretStore(_in(ctx.base_dir, _required(spec, "path")), name=spec.name)


def _env_secrets(spec: ComponentSpec, ctx: _Context) -> object:
    from layotto.host.components.local import EnvSecretStore

    return EnvSecretStore(meta_str(spec.metadata, "prefix"), name=spec.name)


def _k8s_secrets(spec: ComponentSpec, ctx: _Context) -> object:
    try:
        from layotto.host.components.k8s import KubernetesSecretStore
    except ImportError as e:
        raise _needs("kubernetes", "kubernetes") from e

    return KubernetesSecretStore(spec.metadata, name=spec.name)


FACTORIES: dict[str, dict[str, Callable[[ComponentSpec, _Context], object]]] = {
    "state": {"sqlite": _sqlite_state, "redis": _redis("RedisStateStore")},
    "pubsub": {"sqlite": _sqlite_pubsub, "redis": _redis("RedisPubSub")},
    "configuration": {
        "sqlite": _sqlite_config,
        "redis": _redis("RedisConfigStore"),
        "file": _file_config,
        "env": _env_config,
    },
    "lock": {"sqlite": _sqlite_lock, "redis": _redis("RedisLockStore")},
    "sequencer": {"sqlite": _sqlite_sequencer, "redis": _redis("RedisSequencer")},
    "secrets": {"file": _file_secrets, "env": _env_secrets, "kubernetes": _k8s_secrets},
}


def parse_config(doc: object, source: str) -> list[ComponentSpec]:
    """The component specs of a parsed components document."""
    if doc is None:
        return []
    if not isinstance(doc, Mapping):
        raise ComponentConfigError(f"{source}: expected a mapping of kind to components")
    specs: list[ComponentSpec] = []
    seen: set[tuple[str, str]] = set()
    for raw_kind, components in doc.items():
        kind = KIND_ALIASES.get(str(raw_kind), str(raw_kind))
        if kind not in FACTORIES:
            raise ComponentConfigError(
                f"{source}: unknown component kind {raw_kind!r} (known: {', '.join(KINDS)})"
            )
        if components is None:
            continue
        if not isinstance(components, Mapping):
            raise ComponentConfigError(f"{source}: {raw_kind} must map component names to specs")
        for raw_name, body in components.items():
            name = str(raw_name)
            where = f"{source}: {kind} {name!r}"
            if not isinstance(body, Mapping):
                raise ComponentConfigError(f"{where}: expected {{type: ..., metadata: {{...}}}}")
            unknown = set(body) - {"type", "metadata", "version"}
            if unknown:
                raise ComponentConfigError(f"{where}: unknown fields {sorted(map(str, unknown))}")
            type_ = str(body.get("type") or "")
            if type_ not in FACTORIES[kind]:
                known = ", ".join(sorted(FACTORIES[kind]))
                raise ComponentConfigError(f"{where}: unknown type {type_!r} (known {kind} types: {known})")
            metadata = body.get("metadata") or {}
            if not isinstance(metadata, Mapping):
                raise ComponentConfigError(f"{where}: metadata must be a mapping")
            if (kind, name) in seen:
                raise ComponentConfigError(f"{where}: declared twice")
            seen.add((kind, name))
            specs.append(ComponentSpec(kind, name, type_, {str(k): v for k, v in metadata.items()}))
    return specs


_NO_METADATA: Mapping[str, object] = MappingProxyType({})


class Components:
    """The node's components by kind and name. Built eagerly (configuration errors show at
    start); ``close`` closes them all."""

    def __init__(self, specs: list[ComponentSpec], state_dir: str | Path, base_dir: str | Path) -> None:
        self.specs = list(specs)
        self._metadata: dict[str, dict[str, Mapping[str, object]]] = {}
        for spec in self.specs:
            self._metadata.setdefault(spec.kind, {})[spec.name] = MappingProxyType(dict(spec.metadata))
        ctx = _Context(Path(state_dir), Path(base_dir))
        self._lock = threading.Lock()
        self._by_kind: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
        try:
            for spec in self.specs:
                try:
                    self._by_kind[spec.kind][spec.name] = FACTORIES[spec.kind][spec.type](spec, ctx)
                except ComponentError as e:
                    raise ComponentConfigError(f"{spec.kind} {spec.name!r} (type {spec.type}): {e}") from e
        except BaseException:
            self.close()
            raise

    def names(self, kind: str) -> list[str]:
        return list(self._by_kind[KIND_ALIASES.get(kind, kind)])

    @staticmethod
    def _default_of(names: Collection[str]) -> str:
        """The component an empty name stands for: ``default`` if there is one, else the
        first one declared."""
        return "default" if "default" in names else next(iter(names), "")

    def resolve(self, kind: str, name: str = "") -> str:
        """The name of the component ``name`` means (an empty name: the kind's default)."""
        return name or self._default_of(self.names(kind))

    def _get(self, kind: str, name: str) -> Any:
        with self._lock:
            found = self._by_kind[kind]
            name = name or self._default_of(found)  # the dict itself: no list per call
            component = found.get(name)
        if component is None:
            known = ", ".join(repr(n) for n in found) or "none"
            raise UnknownComponent(f"no {kind} component named {name!r} (configured: {known})")
        return component

    def metadata(self, kind: str, name: str = "") -> Mapping[str, object]:
        """The configured metadata of a component (empty for an unknown one), read-only:
        asked for on every state call (key scoping), so looked up in one dict."""
        by_name = self._metadata.get(KIND_ALIASES.get(kind, kind))
        if by_name is None:
            return _NO_METADATA
        return by_name.get(name or self._default_of(by_name), _NO_METADATA)

    def state(self, name: str = "") -> StateStore:
        return self._get("state", name)

    def pubsub(self, name: str = "") -> PubSub:
        return self._get("pubsub", name)

    def configuration(self, name: str = "") -> ConfigStore:
        return self._get("configuration", name)

    def lock(self, name: str = "") -> LockStore:
        return self._get("lock", name)

    def sequencer(self, name: str = "") -> Sequencer:
        return self._get("sequencer", name)

    def secrets(self, name: str = "") -> SecretStore:
        return self._get("secrets", name)

    def close(self) -> None:
        with self._lock:
            built = [c for kind in self._by_kind.values() for c in kind.values()]
            for kind in self._by_kind.values():
                kind.clear()
        for component in reversed(built):
            try:
                component.close()
            except Exception:
                log.exception("closing a component failed")

    def __enter__(self) -> Components:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_components(path: str | Path | None, state_dir: str | Path) -> Components:
    """The components described by the YAML file ``path``, or ``DEFAULT_CONFIG`` when
    ``path`` is None."""
    if path is None:
        return Components(parse_config(yaml.safe_load(DEFAULT_CONFIG), "default components"), state_dir, ".")
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ComponentConfigError(f"cannot read the components file {path}: {e}") from e
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ComponentConfigError(f"{path} is not valid YAML: {e}") from e
    return Components(parse_config(doc, str(path)), state_dir, path.parent)

"""Components: the building blocks behind the Runtime ABI and the gRPC Runtime API.

One small interface per building block (as Dapr's components-contrib and Layotto do),
implemented by an embedded default (SQLite in the host's state directory, files, env)
and by Redis; one conformance suite runs against every backend. All calls are
synchronous: they are made from wasm host functions (on the ingress thread or a worker
thread) and from the gRPC API's worker threads. Implementations must be thread-safe.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, runtime_checkable

# The components' errors live in the host's one exception tree (layotto.host.errors).
from layotto.host.errors import ComponentError as ComponentError
from layotto.host.errors import ETagMismatch as ETagMismatch
from layotto.host.errors import NotFound as NotFound

# --- state ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateItem:
    key: str
    value: bytes
    etag: str


class OpKind(Enum):
    UPSERT = "upsert"
    DELETE = "delete"


@dataclass(frozen=True)
class StateOp:
    kind: OpKind
    key: str
    value: bytes = b""
    etag: str | None = None


@runtime_checkable
class StateStore(Protocol):
    """Key/value state with etags. Features: "ETAG", "TRANSACTIONAL"."""

    def features(self) -> frozenset[str]: ...

    def get(self, key: str) -> StateItem | None: ...

    def bulk_get(self, keys: Sequence[str]) -> list[StateItem | None]: ...

    def set(self, key: str, value: bytes, etag: str | None = None) -> str:
        """Store ``value``; with ``etag``, only if it matches (else ETagMismatch). Returns the new etag."""
        ...

    def delete(self, key: str, etag: str | None = None) -> bool:
        """Remove ``key`` (etag checked as for set); False when it did not exist."""
        ...

    def transact(self, ops: Sequence[StateOp]) -> None:
        """Apply every op or none (an etag mismatch aborts the whole transaction)."""
        ...

    def close(self) -> None: ...


# --- pub/sub ------------------------------------------------------------------------------


class Delivery(Enum):
    SUCCESS = "success"  # acknowledged: never delivered again
    RETRY = "retry"  # delivered again later (up to the subscription's max attempts)
    DROP = "drop"  # discarded without retry


@dataclass(frozen=True)
class Message:
    id: str
    topic: str
    data: bytes
    content_type: str = "application/octet-stream"
    metadata: Mapping[str, str] = field(default_factory=dict)
    attempt: int = 1


Handler = Callable[[Message], Delivery]


@runtime_checkable
class PubSub(Protocol):
    def publish(
        self, topic: str, data: bytes, content_type: str = "", metadata: Mapping[str, str] | None = None
    ) -> str:
        """Publish; returns the message id. Durable once it returns (for durable backends)."""
        ...

    def subscribe(
        self, topic: str, handler: Handler, *, max_attempts: int = 3, group: str = ""
    ) -> Callable[[], None]:
        """Deliver every message published on ``topic`` from now on to ``handler`` (on a
        component thread). RETRY redelivers until ``max_attempts``, then the message is dropped.
        Returns a function that cancels the subscription.

        With ``group``, the subscription joins that durable consumer group: the group keeps
        the messages published while none of its subscriptions runs (across restarts, for
        durable backends), and its subscriptions share the messages (each to one of them)."""
        ...

    def close(self) -> None: ...


# --- configuration ----------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigItem:
    key: str
    content: str
    group: str = ""
    label: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class ConfigStore(Protocol):
    def get(self, keys: Sequence[str], *, group: str = "", label: str = "") -> list[ConfigItem]:
        """Items for ``keys`` (all items when ``keys`` is empty); missing keys are left out."""
        ...

    def subscribe(
        self, keys: Sequence[str], callback: Callable[[list[ConfigItem]], None]
    ) -> Callable[[], None]:
        """Call ``callback`` with changed items whenever one of ``keys`` changes; returns a
        cancel function."""
        ...

    def close(self) -> None: ...


# --- lock ---------------------------------------------------------------------------------


class UnlockStatus(Enum):
    SUCCESS = 0
    LOCK_UNEXIST = 1
    LOCK_BELONG_TO_OTHERS = 2
    INTERNAL_ERROR = 3


@runtime_checkable
class LockStore(Protocol):
    def try_lock(self, resource_id: str, owner: str, expire_seconds: int) -> bool:
        """Take the lock if free or expired; True when ``owner`` now holds it."""
        ...

    def unlock(self, resource_id: str, owner: str) -> UnlockStatus: ...

    def close(self) -> None: ...


# --- sequencer ----------------------------------------------------------------------------


@runtime_checkable
class Sequencer(Protocol):
    def next_id(self, key: str) -> int:
        """A strictly increasing id for ``key`` (across restarts and concurrent callers)."""
        ...

    def close(self) -> None: ...


# --- secrets ------------------------------------------------------------------------------


@runtime_checkable
class SecretStore(Protocol):
    def get(self, name: str) -> dict[str, str]:
        """The secret's key/value pairs; NotFound when there is no such secret."""
        ...

    def bulk(self) -> dict[str, dict[str, str]]: ...

    def close(self) -> None: ...

"""A function's request and response, as the ingress, the Runtime ABI's invoke and the
subscriptions hand them to a function (a module without imports of its own, so that any
part of the host can build one without an import cycle)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Request:
    method: bytes
    path: bytes
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(slots=True)
class Response:
    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

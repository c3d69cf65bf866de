"""The client every Redis component uses, and its errors as the components' own."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis

from layotto.host.components import ComponentError, ETagMismatch
from layotto.host.components.base import Metadata, meta_bool, meta_float, meta_int, meta_str

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
def redis_errors(what: str) -> Iterator[None]:
    """Redis errors in the block raised as ComponentError (ETagMismatch when a script
    refused an etag), named after ``what``."""
    try:
        yield
    except redis.ResponseError as e:
        if _ETAG_MISMATCH in str(e):
            raise ETagMismatch(f"{what}: {str(e).replace(_ETAG_MISMATCH, 'etag mismatch')}") from None
        raise ComponentError(f"{what}: {e}") from e
    except redis.RedisError as e:
        raise ComponentError(f"{what}: {e}") from e


class RedisComponent:
    """What every Redis component has: a name, the key prefix and a client."""

    def __init__(self, metadata: Metadata | None = None, *, name: str = "default") -> None:
        metadata = metadata or {}
        self.name = name
        self.prefix = meta_str(metadata, "redisKeyPrefix")
        self._client = connect(metadata)

    def close(self) -> None:
        self._client.close()

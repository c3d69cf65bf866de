"""Redis components (the ``redis`` package; Redis 5 or later for streams, 6.2 for XAUTOCLAIM).

Metadata, as Dapr's and Layotto's Redis components take it:

- ``redisHost``: ``host:port`` (default ``localhost:6379``); ``redisUsername``,
  ``redisPassword``, ``redisDB`` (default 0), ``enableTLS`` (default false).
- ``redisKeyPrefix``: prepended to every Redis key a component writes (default empty).
  (``keyPrefix`` is the namespacing mode, ``appid``/``name``/``none``, as in Layotto.)
- ``readTimeout``: socket timeout in seconds (default 10).

Key layout (``P`` is the key prefix):

- state: ``P<key>``, a hash {data, version}; ``P__layotto_etag__`` is the etag counter.
  A plain string at ``P<key>`` (``redis-cli set book1 100``) reads as a value without an
  etag, as Dapr's Redis store does; a write replaces it with a hash.
- lock: ``P lock||<resource>``, value the owner, with a PX expiry.
- sequencer: ``P sequencer||<key>``, INCR.
- pubsub: the stream ``P<topic>``; one consumer group per subscription (or per durable
  group), created at ``$``.
- configuration: the hash ``P config||<group>||<label>`` (field = key, value = JSON), the
  set ``P config||index`` of [group, label] pairs, change notices on the channel
  ``P config||changes``.

The semantics are the SQLite backend's (see ``layotto.host.components.sqlite``); the
conformance suite runs against both. One module per building block (``state``, ``lock``,
``sequencer``, ``configuration``, ``pubsub``) over the shared client helper in ``client``;
every name is importable from this package too.
"""

from layotto.host.components.redis.client import RedisComponent, connect
from layotto.host.components.redis.configuration import RedisConfigStore
from layotto.host.components.redis.lock import RedisLockStore
from layotto.host.components.redis.pubsub import (
    DEFAULT_CONTENT_TYPE,
    DEFAULT_MAX_LEN,
    DEFAULT_MAX_SUBSCRIPTIONS,
    RedisPubSub,
)
from layotto.host.components.redis.sequencer import RedisSequencer
from layotto.host.components.redis.state import RedisStateStore

__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "DEFAULT_MAX_LEN",
    "DEFAULT_MAX_SUBSCRIPTIONS",
    "RedisComponent",
    "RedisConfigStore",
    "RedisLockStore",
    "RedisPubSub",
    "RedisSequencer",
    "RedisStateStore",
    "connect",
]

"""The sequencer on Redis: INCR per key."""

from __future__ import annotations

from layotto.host.components.redis.client import RedisComponent, redis_errors


class RedisSequencer(RedisComponent):
    """INCR: ids 1, 2, 3, ... per key (as durable as the server's persistence)."""

    def next_id(self, key: str) -> int:
        with redis_errors(f"sequencer {self.name!r}"):
            return int(self._client.incr(f"{self.prefix}sequencer||{key}"))

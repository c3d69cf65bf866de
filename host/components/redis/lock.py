"""Locks on Redis: SET NX PX, unlocked by a script that checks the owner."""

from __future__ import annotations

from layotto.host.components import UnlockStatus
from layotto.host.components.base import Metadata, check_expire
from layotto.host.components.redis.client import RedisComponent, redis_errors

_UNLOCK = """
local v = redis.call('GET', KEYS[1])
if not v then return 1 end
if v ~= ARGV[1] then return 2 end
redis.call('DEL', KEYS[1])
return 0
"""


class RedisLockStore(RedisComponent):
    """SET NX PX locks; unlock checks the owner in a script (not re-entrant)."""

    def __init__(self, metadata: Metadata | None = None, *, name: str = "default") -> None:
        super().__init__(metadata, name=name)
        self._unlock = self._client.register_script(_UNLOCK)

    def try_lock(self, resource_id: str, owner: str, expire_seconds: int) -> bool:
        check_expire(expire_seconds)
        with redis_errors(f"lock {self.name!r}"):
            return bool(
                self._client.set(
                    f"{self.prefix}lock||{resource_id}", owner, nx=True, px=int(expire_seconds * 1000)
                )
            )

    def unlock(self, resource_id: str, owner: str) -> UnlockStatus:
        with redis_errors(f"lock {self.name!r}"):
            return UnlockStatus(int(self._unlock(keys=[f"{self.prefix}lock||{resource_id}"], args=[owner])))

"""State on Redis: a hash {data, version} per key, etags from one counter, Lua scripts for
the etag checks and transactions."""

from __future__ import annotations

from collections.abc import Sequence

from layotto.host.components import OpKind, StateItem, StateOp
from layotto.host.components.base import Metadata
from layotto.host.components.redis.client import RedisComponent, redis_errors

_GET = """
local out = {}
for i, k in ipairs(KEYS) do
  local t = redis.call('TYPE', k)['ok']
  out[i] = false
  if t == 'hash' then
    local r = redis.call('HMGET', k, 'data', 'version')
    if r[1] then out[i] = {r[1], r[2] or ''} end
  elseif t == 'string' then
    out[i] = {redis.call('GET', k), ''}
  end
end
return out
"""

_SET = """
local t = redis.call('TYPE', KEYS[1])['ok']
if ARGV[2] ~= '' then
  local v = false
  if t == 'hash' then v = redis.call('HGET', KEYS[1], 'version') end
  if v ~= ARGV[2] then return redis.error_reply('ETAG_MISMATCH on key ' .. KEYS[1]) end
end
if t == 'string' then redis.call('DEL', KEYS[1]) end
local n = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'data', ARGV[1], 'version', n)
return n
"""

_DELETE = """
local t = redis.call('TYPE', KEYS[1])['ok']
if ARGV[1] ~= '' then
  local v = false
  if t == 'hash' then v = redis.call('HGET', KEYS[1], 'version') end
  if v ~= ARGV[1] then return redis.error_reply('ETAG_MISMATCH on key ' .. KEYS[1]) end
end
return redis.call('DEL', KEYS[1])
"""

# KEYS[1] is the etag counter, KEYS[i+1] the key of op i; ARGV holds (kind, value, etag)
# per op. Every etag is checked (with the effect of the earlier ops) before any write.
_TRANSACT = """
local n = #KEYS - 1
local seen = {}
for i = 1, n do
  local k = KEYS[i + 1]
  local etag = ARGV[3 * i]
  local v = seen[k]
  if v == nil then
    local t = redis.call('TYPE', k)['ok']
    v = false
    if t == 'hash' then v = redis.call('HGET', k, 'version') or false
    elseif t == 'string' then v = '' end
  end
  if etag ~= '' and v ~= etag then return redis.error_reply('ETAG_MISMATCH on key ' .. k) end
  if ARGV[3 * i - 2] == 'upsert' then seen[k] = '\\0written' else seen[k] = false end
end
for i = 1, n do
  local k = KEYS[i + 1]
  if ARGV[3 * i - 2] == 'upsert' then
    if redis.call('TYPE', k)['ok'] == 'string' then redis.call('DEL', k) end
    redis.call('HSET', k, 'data', ARGV[3 * i - 1], 'version', redis.call('INCR', KEYS[1]))
  else
    redis.call('DEL', k)
  end
end
return n
"""


class RedisStateStore(RedisComponent):
    """Key/value state with etags and transactions (features ETAG, TRANSACTIONAL)."""

    def __init__(self, metadata: Metadata | None = None, *, name: str = "default") -> None:
        super().__init__(metadata, name=name)
        self._counter = f"{self.prefix}__layotto_etag__"
        self._get = self._client.register_script(_GET)
        self._set = self._client.register_script(_SET)
        self._delete = self._client.register_script(_DELETE)
        self._transact = self._client.register_script(_TRANSACT)

    def features(self) -> frozenset[str]:
        return frozenset({"ETAG", "TRANSACTIONAL"})

    def get(self, key: str) -> StateItem | None:
        return self.bulk_get([key])[0]

    def bulk_get(self, keys: Sequence[str]) -> list[StateItem | None]:
        if not keys:
            return []
        with redis_errors(f"state {self.name!r}"):
            rows = self._get(keys=[self.prefix + k for k in keys])
        return [
            None if row is None else StateItem(key, bytes(row[0]), row[1].decode())
            for key, row in zip(keys, rows, strict=True)
        ]

    def set(self, key: str, value: bytes, etag: str | None = None) -> str:
        with redis_errors(f"state {self.name!r}"):
            return str(self._set(keys=[self.prefix + key, self._counter], args=[bytes(value), etag or ""]))

    def delete(self, key: str, etag: str | None = None) -> bool:
        with redis_errors(f"state {self.name!r}"):
            return bool(self._delete(keys=[self.prefix + key], args=[etag or ""]))

    def transact(self, ops: Sequence[StateOp]) -> None:
        if not ops:
            return
        args: list[bytes | str] = []
        for op in ops:
            if op.kind not in (OpKind.UPSERT, OpKind.DELETE):
                raise ValueError(f"unknown state operation {op.kind!r}")
            args += [op.kind.value, bytes(op.value), op.etag or ""]
        with redis_errors(f"state {self.name!r}"):
            self._transact(keys=[self._counter] + [self.prefix + op.key for op in ops], args=args)

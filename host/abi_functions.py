"""The Runtime ABI's host functions, one implementation per entry of abi/layotto_abi.yaml.

Each takes the caller's :class:`~layotto.host.abi_context.AbiContext` and the lowered
``i32`` arguments and returns a :class:`~layotto.host.errors.Status`; :data:`IMPLEMENTATIONS`
is the table, and :func:`check_table` fails when it and the ABI's table disagree. The rules
they keep (checked pointers, out-pointers before side effects, limits) are in docs/abi.md.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable

from layotto.abi.maps import decode_map, encode_map
from layotto.host.abi_context import BUFFER_TYPES, MAX_KEY, MAX_VALUE, SPEC, AbiContext
from layotto.host.components import OpKind, StateOp, UnlockStatus
from layotto.host.errors import AbiStatus, Status

# --- implementations (lowered arguments, return a Status) -----------------------------


def _log(ctx: AbiContext, level: int, ptr: int, length: int) -> Status:
    if not 0 <= level <= 5:
        return Status.BAD_ARGUMENT
    text = ctx.read(ptr, length, 64 << 10).decode(errors="replace")
    names = ("trace", "debug", "info", "warn", "error", "critical")
    if ctx.logger is not None:
        ctx.logger(names[level], text)
    return Status.OK


def _time_now(ctx: AbiContext, out: int) -> Status:
    ctx.write(out, struct.pack("<q", time.time_ns()))
    return Status.OK


def _random(ctx: AbiContext, ptr: int, length: int) -> Status:
    if length > MAX_VALUE:
        return Status.LIMIT_EXCEEDED
    ctx.check_writable(ptr, length)
    ctx.write(ptr, os.urandom(length))
    return Status.OK


def _state_get(
    ctx: AbiContext, sp: int, sl: int, kp: int, kl: int, vpp: int, vlp: int, epp: int, elp: int
) -> Status:
    store_name, key = ctx.read_str(sp, sl), ctx.read_str(kp, kl)
    ctx.check_out(vpp, vlp, epp, elp)
    item = ctx.component("state", store_name).get(ctx.state_key(store_name, key))
    if item is None:
        return Status.NOT_FOUND
    ctx.give(vpp, vlp, item.value, checked=True)
    ctx.give(epp, elp, item.etag.encode(), checked=True)
    return Status.OK


def _state_get_bulk(ctx: AbiContext, sp: int, sl: int, kp: int, kl: int, rpp: int, rlp: int) -> Status:
    store_name = ctx.read_str(sp, sl)
    try:
        keys = [k.decode() for k, _ in decode_map(ctx.read(kp, kl))]
    except ValueError as exc:  # UnicodeDecodeError included
        raise AbiStatus(Status.PARSE_FAILURE, str(exc)) from exc
    ctx.check_out(rpp, rlp)
    store = ctx.component("state", store_name)
    items = store.bulk_get([ctx.state_key(store_name, k) for k in keys])
    pairs = [(k.encode(), item.value) for k, item in zip(keys, items, strict=True) if item is not None]
    ctx.give(rpp, rlp, encode_map(pairs))
    return Status.OK


def _state_save(
    ctx: AbiContext,
    sp: int,
    sl: int,
    kp: int,
    kl: int,
    vp: int,
    vl: int,
    ep: int,
    el: int,
    npp: int,
    nlp: int,
) -> Status:
    store_name, key = ctx.read_str(sp, sl), ctx.read_str(kp, kl)
    value = ctx.read(vp, vl)
    etag = ctx.read_str(ep, el) or None
    ctx.check_out(npp, nlp)
    store = ctx.component("state", store_name, changes=True)
    new_etag = store.set(ctx.state_key(store_name, key), value, etag)
    ctx.give(npp, nlp, str(new_etag).encode())
    return Status.OK


def _state_delete(ctx: AbiContext, sp: int, sl: int, kp: int, kl: int, ep: int, el: int) -> Status:
    store_name, key = ctx.read_str(sp, sl), ctx.read_str(kp, kl)
    etag = ctx.read_str(ep, el) or None
    existed = ctx.component("state", store_name, changes=True).delete(ctx.state_key(store_name, key), etag)
    return Status.OK if existed else Status.NOT_FOUND


def _state_transaction(ctx: AbiContext, sp: int, sl: int, op: int, ol: int) -> Status:
    store_name = ctx.read_str(sp, sl)
    ops = decode_ops(ctx.read(op, ol))
    store = ctx.component("state", store_name, changes=True)
    store.transact(
        [StateOp(kind, ctx.state_key(store_name, key), value, etag or None) for kind, key, value, etag in ops]
    )
    return Status.OK


def _invoke(
    ctx: AbiContext, ip: int, il: int, mp: int, ml: int, dp: int, dl: int, rpp: int, rlp: int
) -> Status:
    target, method = ctx.read_str(ip, il), ctx.read_str(mp, ml)
    data = ctx.read(dp, dl)
    ctx.check_out(rpp, rlp)
    if ctx.invoker is None:
        return Status.UNIMPLEMENTED
    result = ctx.invoker.invoke(ctx, target, method, data)
    ctx.give(rpp, rlp, result, checked=True)
    return Status.OK


def _publish(ctx: AbiContext, pp: int, pl: int, tp: int, tl: int, dp: int, dl: int) -> Status:
    pubsub_name, topic = ctx.read_str(pp, pl), ctx.read_str(tp, tl)
    data = ctx.read(dp, dl)
    if not topic:
        return Status.BAD_ARGUMENT
    pubsub = ctx.component("pubsub", pubsub_name, changes=True)
    pubsub.publish(ctx.topic(pubsub_name, topic), data, "application/octet-stream", {"source": ctx.app_id})
    return Status.OK


def _config_get(
    ctx: AbiContext,
    sp: int,
    sl: int,
    gp: int,
    gl: int,
    lp: int,
    ll: int,
    kp: int,
    kl: int,
    vpp: int,
    vlp: int,
) -> Status:
    store_name, group, label, key = (
        ctx.read_str(sp, sl),
        ctx.read_str(gp, gl),
        ctx.read_str(lp, ll),
        ctx.read_str(kp, kl),
    )
    ctx.check_out(vpp, vlp)
    items = ctx.configuration(store_name, [key], group, label)
    item = next((i for i in items if i.key == key), None)
    if item is None:
        return Status.NOT_FOUND
    ctx.give(vpp, vlp, item.content.encode())
    return Status.OK


def _try_lock(
    ctx: AbiContext, sp: int, sl: int, rp: int, rl: int, op: int, ol: int, expire: int, out: int
) -> Status:
    store_name, resource, owner = ctx.read_str(sp, sl), ctx.read_str(rp, rl), ctx.read_str(op, ol)
    if expire <= 0 or not owner or not resource:
        return Status.BAD_ARGUMENT
    ctx.check_out(out)
    taken = ctx.component("lock", store_name, changes=True).try_lock(
        ctx.state_key(store_name, resource, "lock"), owner, expire
    )
    ctx.write(out, struct.pack("<i", 1 if taken else 0))
    return Status.OK


def _unlock(ctx: AbiContext, sp: int, sl: int, rp: int, rl: int, op: int, ol: int, out: int) -> Status:
    store_name, resource, owner = ctx.read_str(sp, sl), ctx.read_str(rp, rl), ctx.read_str(op, ol)
    ctx.check_out(out)
    locks = ctx.component("lock", store_name, changes=True)
    status = locks.unlock(ctx.state_key(store_name, resource, "lock"), owner)
    if status == UnlockStatus.INTERNAL_ERROR:
        return Status.INTERNAL_FAILURE
    ctx.write(out, struct.pack("<i", status.value))
    return Status.OK


def _next_id(ctx: AbiContext, sp: int, sl: int, kp: int, kl: int, out: int) -> Status:
    store_name, key = ctx.read_str(sp, sl), ctx.read_str(kp, kl)
    ctx.check_writable(out, 8)
    sequencer = ctx.component("sequencer", store_name, changes=True)
    value = sequencer.next_id(ctx.state_key(store_name, key, "sequencer"))
    ctx.write(out, struct.pack("<q", value))
    return Status.OK


def _get_secret(ctx: AbiContext, sp: int, sl: int, np_: int, nl: int, rpp: int, rlp: int) -> Status:
    store_name, name = ctx.read_str(sp, sl), ctx.read_str(np_, nl)
    ctx.check_out(rpp, rlp)
    # a missing secret raises NotFound: NOT_FOUND (errors.abi_status)
    secret = ctx.component("secrets", store_name).get(ctx.secret_name(store_name, name))
    ctx.give(rpp, rlp, encode_map([(k.encode(), v.encode()) for k, v in secret.items()]))
    return Status.OK


# --- Layotto's own ABI (module env) ----------------------------------------------------


def _proxy_get_state(ctx: AbiContext, sp: int, sl: int, kp: int, kl: int, vpp: int, vlp: int) -> Status:
    store_name, key = ctx.read_str(sp, sl), ctx.read_str(kp, kl)
    ctx.check_out(vpp, vlp)
    item = ctx.component("state", store_name).get(ctx.state_key(store_name, key))
    if item is None:
        return Status.NOT_FOUND
    ctx.give(vpp, vlp, item.value)
    return Status.OK


def _proxy_get_buffer_bytes(
    ctx: AbiContext, btype: int, start: int, max_size: int, dpp: int, dlp: int
) -> Status:
    if btype not in BUFFER_TYPES:
        return Status.BAD_ARGUMENT
    ctx.check_out(dpp, dlp)
    buf = ctx.buffers.get(btype)
    if buf is None:
        return Status.NOT_FOUND
    if start < 0 or max_size < 0:
        return Status.BAD_ARGUMENT
    ctx.give(dpp, dlp, bytes(buf[start : start + max_size]))
    return Status.OK


def _proxy_set_buffer_bytes(ctx: AbiContext, btype: int, start: int, size: int, dp: int, dl: int) -> Status:
    if btype not in BUFFER_TYPES or start < 0 or size < 0:
        return Status.BAD_ARGUMENT
    buffers = ctx.buffers
    buf = buffers.get(btype)
    length = len(buf) if buf is not None else 0
    # The sizes after the write, checked before anything is read or kept: a refused write
    # changes nothing (start >= length appends, else `size` bytes at `start` are replaced).
    new_length = length + dl if start >= length else length - min(size, length - start) + dl
    if new_length > MAX_VALUE:
        return Status.LIMIT_EXCEEDED
    if sum(map(len, buffers.values())) - length + new_length > ctx.buffer_limit:
        ctx.note(f"proxy_set_buffer_bytes: the instance's buffers would exceed {ctx.buffer_limit} bytes")
        return Status.LIMIT_EXCEEDED
    data = ctx.read(dp, dl)
    if buf is None:
        buf = buffers[btype] = bytearray()
    if start >= length:
        buf += data
    else:
        buf[start : start + size] = data
    return Status.OK


def _proxy_set_effective_context(ctx: AbiContext, _context_id: int) -> Status:
    return Status.OK


IMPLEMENTATIONS: dict[tuple[str, str], Callable[..., Status]] = {
    ("layotto", "layotto_log"): _log,
    ("layotto", "layotto_time_now"): _time_now,
    ("layotto", "layotto_random"): _random,
    ("layotto", "layotto_state_get"): _state_get,
    ("layotto", "layotto_state_get_bulk"): _state_get_bulk,
    ("layotto", "layotto_state_save"): _state_save,
    ("layotto", "layotto_state_delete"): _state_delete,
    ("layotto", "layotto_state_transaction"): _state_transaction,
    ("layotto", "layotto_invoke"): _invoke,
    ("layotto", "layotto_publish"): _publish,
    ("layotto", "layotto_config_get"): _config_get,
    ("layotto", "layotto_try_lock"): _try_lock,
    ("layotto", "layotto_unlock"): _unlock,
    ("layotto", "layotto_next_id"): _next_id,
    ("layotto", "layotto_get_secret"): _get_secret,
    ("env", "proxy_get_state"): _proxy_get_state,
    ("env", "proxy_invoke_service"): _invoke,  # same parameters as layotto_invoke
    ("env", "proxy_log"): _log,
    ("env", "proxy_get_buffer_bytes"): _proxy_get_buffer_bytes,
    ("env", "proxy_set_buffer_bytes"): _proxy_set_buffer_bytes,
    ("env", "proxy_set_effective_context"): _proxy_set_effective_context,
}


def check_table() -> None:
    """The implementations match the ABI table exactly (names and arities)."""
    import inspect

    declared = {(f.module, f.name): f for f in SPEC.all_functions()}
    missing = sorted(set(declared) - set(IMPLEMENTATIONS))
    extra = sorted(set(IMPLEMENTATIONS) - set(declared))
    if missing or extra:
        raise RuntimeError(f"ABI table mismatch: unimplemented {missing}, undeclared {extra}")
    for key, fn in declared.items():
        arity = len(inspect.signature(IMPLEMENTATIONS[key]).parameters) - 1
        if arity != fn.arity:
            raise RuntimeError(f"{key}: the table says {fn.arity} parameters, the host takes {arity}")


# --- encodings ----------------------------------------------------------------------------


_OP = struct.Struct("<IIII")


def decode_ops(data: bytes) -> list[tuple[OpKind, str, bytes, str]]:
    if len(data) < 4:
        raise AbiStatus(Status.PARSE_FAILURE, "transaction shorter than its count")
    (count,) = struct.unpack_from("<I", data)
    pos = 4
    ops = []
    for _ in range(count):
        if pos + _OP.size > len(data):
            raise AbiStatus(Status.PARSE_FAILURE, "truncated transaction")
        kind, klen, vlen, elen = _OP.unpack_from(data, pos)
        pos += _OP.size
        if kind not in (0, 1) or pos + klen + vlen + elen > len(data) or klen > MAX_KEY:
            raise AbiStatus(Status.PARSE_FAILURE, "bad transaction operation")
        try:
            key = data[pos : pos + klen].decode()
            etag = data[pos + klen + vlen : pos + klen + vlen + elen].decode()
        except UnicodeDecodeError as exc:
            raise AbiStatus(Status.BAD_ARGUMENT, "not valid UTF-8") from exc
        value = data[pos + klen : pos + klen + vlen]
        pos += klen + vlen + elen
        ops.append((OpKind.UPSERT if kind == 0 else OpKind.DELETE, key, value, etag))
    return ops

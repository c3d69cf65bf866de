"""The host side of the Runtime ABI: the import table every function gets.

Each host function is generated from abi/layotto_abi.yaml's signature and bound to an
implementation here; ``check_table`` (run at start-up and by the tests) fails when the
two disagree. Host functions never trust the guest: every pointer and length is checked
against the caller's linear memory (INVALID_MEMORY_ACCESS), every size against the ABI's
limits (LIMIT_EXCEEDED), every capability against the pod's grant (PERMISSION_DENIED),
and out-pointers are checked *before* any side effect, so a bad pointer never leaves a
write half done. No guest input can raise out of a host function: a bug becomes
INTERNAL_FAILURE in the function's log, never a host crash.

The caller is found through a thread-local stack: whoever calls into a guest (a function
instance, a nanoprocess) pushes its :class:`AbiContext` for the duration of the call.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import wasmtime

from layotto.abi import spec as abi_spec
from layotto.abi.maps import decode_map, encode_map
from layotto.host import capi, scoping
from layotto.host.components import ConfigItem, OpKind, StateOp, UnlockStatus
from layotto.host.errors import (
    AbiStatus,
    ComponentDenied,
    ComponentError,
    LayottoError,
    Status,
    abi_status,
)

log = logging.getLogger(__name__)

SPEC = abi_spec.load()
S = SPEC.status  # status name -> code (errors.Status is the typed form)
MAX_KEY = SPEC.limits.get("max_key", 1024)
MAX_VALUE = SPEC.limits.get("max_value", 4 << 20)
KNOWN_CAPABILITIES = frozenset(SPEC.capabilities)

BUFFER_REQUEST_BODY = 0
BUFFER_RESPONSE_BODY = 1
BUFFER_CALL_DATA = 8
# Of proxy-wasm's BufferType values, the ones this host serves (layotto_abi.yaml); any
# other type is BAD_ARGUMENT, never a new host-side buffer.
BUFFER_TYPES = frozenset({BUFFER_REQUEST_BODY, BUFFER_RESPONSE_BODY, BUFFER_CALL_DATA})
# All the buffers of one instance together hold at most this much (a largest request body
# and a largest response); a write past it is LIMIT_EXCEEDED. The host empties them after
# every request.
BUFFER_LIMIT = 2 * MAX_VALUE


class GuestMemory(Protocol):
    def view(self) -> memoryview: ...


class Invoker(Protocol):
    def invoke(self, caller: AbiContext, target: str, method: str, data: bytes) -> bytes: ...


@dataclass
class AbiContext:
    """Everything a host function needs to know about its caller."""

    name: str
    memory: GuestMemory
    allocate: Callable[[int], int]
    capabilities: frozenset[str]
    app_id: str
    components: Any  # host.components.registry.Components (or None: every component call fails)
    invoker: Invoker | None = None
    logger: Callable[[str, str], None] | None = None
    namespace: str | None = None  # the caller's namespace (None: not scoped, host-internal)
    buffers: dict[int, bytearray] = field(default_factory=dict)  # proxy-wasm's, per request
    buffer_limit: int = BUFFER_LIMIT  # what ``buffers`` may hold in all
    _view: memoryview | None = field(default=None, repr=False)

    # --- guest memory, checked --------------------------------------------------------

    def view(self) -> memoryview:
        """The guest's memory, fetched once per host call (until the guest allocates)."""
        view = self._view
        if view is None:
            view = self._view = self.memory.view()
        return view

    def reset_view(self) -> None:
        self._view = None

    def guest_alloc(self, size: int) -> int:
        addr = self.allocate(size)
        self._view = None  # the allocator may have grown (moved) the memory
        return addr

    def read(self, ptr: int, length: int, limit: int = MAX_VALUE) -> bytes:
        if length > limit:
            raise AbiStatus(Status.LIMIT_EXCEEDED, f"{length} bytes exceeds the limit of {limit}")
        view = self.view()
        if ptr < 0 or length < 0 or ptr + length > len(view):
            raise AbiStatus(Status.INVALID_MEMORY_ACCESS, f"[{ptr:#x}, +{length}) is outside linear memory")
        return bytes(view[ptr : ptr + length])

    def read_str(self, ptr: int, length: int) -> str:
        raw = self.read(ptr, length, MAX_KEY)
        try:
            return raw.decode()
        except UnicodeDecodeError as exc:
            raise AbiStatus(Status.BAD_ARGUMENT, "not valid UTF-8") from exc

    def check_writable(self, ptr: int, length: int) -> None:
        view = self.view()
        if ptr < 0 or length < 0 or ptr + length > len(view):
            raise AbiStatus(Status.INVALID_MEMORY_ACCESS, f"[{ptr:#x}, +{length}) is outside linear memory")

    def write(self, ptr: int, data: bytes) -> None:
        view = self.view()
        if ptr < 0 or ptr + len(data) > len(view):
            raise AbiStatus(
                Status.INVALID_MEMORY_ACCESS, f"[{ptr:#x}, +{len(data)}) is outside linear memory"
            )
        view[ptr : ptr + len(data)] = data

    def give(self, ptr_ptr: int, len_ptr: int, data: bytes) -> None:
        """Copy ``data`` into a guest-allocated buffer and return it through the out-pointers."""
        if len(data) > MAX_VALUE:
            raise AbiStatus(Status.LIMIT_EXCEEDED, f"a result of {len(data)} bytes exceeds {MAX_VALUE}")
        self.check_writable(ptr_ptr, 4)
        self.check_writable(len_ptr, 4)
        addr = 0
        if data:
            addr = self.guest_alloc(len(data))
            if not addr:
                raise AbiStatus(Status.INVALID_MEMORY_ACCESS, "the guest allocator returned 0")
            self.write(addr, data)
        self.write(ptr_ptr, struct.pack("<I", addr))
        self.write(len_ptr, struct.pack("<I", len(data)))

    # --- components ---------------------------------------------------------------------

    def component(self, kind: str, name: str) -> Any:
        if self.components is None:
            raise AbiStatus(Status.INTERNAL_FAILURE, "no components are configured")
        try:
            return getattr(self.components, kind)(name)
        except ComponentDenied as exc:  # the operator's policy does not grant it
            raise AbiStatus(Status.PERMISSION_DENIED, str(exc)) from exc
        except (KeyError, LookupError, ComponentError) as exc:
            raise AbiStatus(Status.NOT_FOUND, f"no {kind} component named {name!r}") from exc

    def state_key(self, store: str, key: str, kind: str = "state") -> str:
        """``key`` as stored: the shared rule of ``host.scoping.state_key`` (per app unless
        the store says ``keyPrefix: name`` or ``none``)."""
        try:
            return scoping.state_key(self.components, kind, store, key, self.app_id, self.namespace)
        except scoping.ScopeError as exc:
            raise AbiStatus(Status.BAD_ARGUMENT, str(exc)) from exc

    def topic(self, pubsub_name: str, topic: str) -> str:
        """The component topic for ``topic``: per namespace (``host.scoping.scoped_topic``)."""
        try:
            return scoping.scoped_topic(self.components, pubsub_name, self.namespace, topic)
        except scoping.ScopeError as exc:
            raise AbiStatus(Status.BAD_ARGUMENT, str(exc)) from exc

    def secret_name(self, store: str, name: str) -> str:
        """The store's name for secret ``name``: per namespace (``host.scoping.scoped_secret``)."""
        try:
            return scoping.scoped_secret(self.components, store, self.namespace, name)
        except scoping.ScopeError as exc:
            raise AbiStatus(Status.BAD_ARGUMENT, str(exc)) from exc

    def configuration(self, store: str, keys: list[str], group: str, label: str) -> list[ConfigItem]:
        """This app's configuration items (``host.scoping.get_configuration``)."""
        self.component("configuration", store)  # NOT_FOUND for an unknown store
        try:
            return scoping.get_configuration(
                self.components, store, self.namespace, self.app_id, keys, group=group, label=label
            )
        except scoping.ScopeError as exc:
            raise AbiStatus(Status.BAD_ARGUMENT, str(exc)) from exc

    def note(self, line: str) -> None:
        if self.logger is not None:
            self.logger("abi", line)


_local = threading.local()


def current() -> AbiContext | None:
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


class calling:  # noqa: N801 - used as a context manager, reads like a clause
    """``with calling(ctx): <call into the guest>`` makes ``ctx`` the ABI caller."""

    __slots__ = ("ctx",)

    def __init__(self, ctx: AbiContext | None) -> None:
        self.ctx = ctx

    def __enter__(self) -> None:
        stack = getattr(_local, "stack", None)
        if stack is None:
            stack = _local.stack = []
        stack.append(self.ctx)

    def __exit__(self, *exc: object) -> None:
        _local.stack.pop()


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
    for p in (vpp, vlp, epp, elp):
        ctx.check_writable(p, 4)
    item = ctx.component("state", store_name).get(ctx.state_key(store_name, key))
    if item is None:
        return Status.NOT_FOUND
    ctx.give(vpp, vlp, item.value)
    ctx.give(epp, elp, item.etag.encode())
    return Status.OK


def _state_get_bulk(ctx: AbiContext, sp: int, sl: int, kp: int, kl: int, rpp: int, rlp: int) -> Status:
    store_name = ctx.read_str(sp, sl)
    try:
        keys = [k.decode() for k, _ in decode_map(ctx.read(kp, kl))]
    except ValueError as exc:  # UnicodeDecodeError included
        raise AbiStatus(Status.PARSE_FAILURE, str(exc)) from exc
    ctx.check_writable(rpp, 4)
    ctx.check_writable(rlp, 4)
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
    ctx.check_writable(npp, 4)
    ctx.check_writable(nlp, 4)
    new_etag = ctx.component("state", store_name).set(ctx.state_key(store_name, key), value, etag)
    ctx.give(npp, nlp, str(new_etag).encode())
    return Status.OK


def _state_delete(ctx: AbiContext, sp: int, sl: int, kp: int, kl: int, ep: int, el: int) -> Status:
    store_name, key = ctx.read_str(sp, sl), ctx.read_str(kp, kl)
    etag = ctx.read_str(ep, el) or None
    existed = ctx.component("state", store_name).delete(ctx.state_key(store_name, key), etag)
    return Status.OK if existed else Status.NOT_FOUND


def _state_transaction(ctx: AbiContext, sp: int, sl: int, op: int, ol: int) -> Status:
    store_name = ctx.read_str(sp, sl)
    ops = decode_ops(ctx.read(op, ol))
    store = ctx.component("state", store_name)
    store.transact(
        [StateOp(kind, ctx.state_key(store_name, key), value, etag or None) for kind, key, value, etag in ops]
    )
    return Status.OK


def _invoke(
    ctx: AbiContext, ip: int, il: int, mp: int, ml: int, dp: int, dl: int, rpp: int, rlp: int
) -> Status:
    target, method = ctx.read_str(ip, il), ctx.read_str(mp, ml)
    data = ctx.read(dp, dl)
    ctx.check_writable(rpp, 4)
    ctx.check_writable(rlp, 4)
    if ctx.invoker is None:
        return Status.UNIMPLEMENTED
    result = ctx.invoker.invoke(ctx, target, method, data)
    ctx.give(rpp, rlp, result)
    return Status.OK


def _publish(ctx: AbiContext, pp: int, pl: int, tp: int, tl: int, dp: int, dl: int) -> Status:
    pubsub_name, topic = ctx.read_str(pp, pl), ctx.read_str(tp, tl)
    data = ctx.read(dp, dl)
    if not topic:
        return Status.BAD_ARGUMENT
    pubsub = ctx.component("pubsub", pubsub_name)
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
    ctx.check_writable(vpp, 4)
    ctx.check_writable(vlp, 4)
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
    ctx.check_writable(out, 4)
    taken = ctx.component("lock", store_name).try_lock(
        ctx.state_key(store_name, resource, "lock"), owner, expire
    )
    ctx.write(out, struct.pack("<i", 1 if taken else 0))
    return Status.OK


def _unlock(ctx: AbiContext, sp: int, sl: int, rp: int, rl: int, op: int, ol: int, out: int) -> Status:
    store_name, resource, owner = ctx.read_str(sp, sl), ctx.read_str(rp, rl), ctx.read_str(op, ol)
    ctx.check_writable(out, 4)
    status = ctx.component("lock", store_name).unlock(ctx.state_key(store_name, resource, "lock"), owner)
    if status == UnlockStatus.INTERNAL_ERROR:
        return Status.INTERNAL_FAILURE
    ctx.write(out, struct.pack("<i", status.value))
    return Status.OK


def _next_id(ctx: AbiContext, sp: int, sl: int, kp: int, kl: int, out: int) -> Status:
    store_name, key = ctx.read_str(sp, sl), ctx.read_str(kp, kl)
    ctx.check_writable(out, 8)
    value = ctx.component("sequencer", store_name).next_id(ctx.state_key(store_name, key, "sequencer"))
    ctx.write(out, struct.pack("<q", value))
    return Status.OK


def _get_secret(ctx: AbiContext, sp: int, sl: int, np_: int, nl: int, rpp: int, rlp: int) -> Status:
    store_name, name = ctx.read_str(sp, sl), ctx.read_str(np_, nl)
    ctx.check_writable(rpp, 4)
    ctx.check_writable(rlp, 4)
    # a missing secret raises NotFound: NOT_FOUND (errors.abi_status)
    secret = ctx.component("secrets", store_name).get(ctx.secret_name(store_name, name))
    ctx.give(rpp, rlp, encode_map([(k.encode(), v.encode()) for k, v in secret.items()]))
    return Status.OK


# --- Layotto's own ABI (module env) ----------------------------------------------------


def _proxy_get_state(ctx: AbiContext, sp: int, sl: int, kp: int, kl: int, vpp: int, vlp: int) -> Status:
    store_name, key = ctx.read_str(sp, sl), ctx.read_str(kp, kl)
    ctx.check_writable(vpp, 4)
    ctx.check_writable(vlp, 4)
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
    ctx.check_writable(dpp, 4)
    ctx.check_writable(dlp, 4)
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


# Statuses a guest meets in normal operation: not written to the function's log.
_QUIET = frozenset({Status.NOT_FOUND, Status.CAS_MISMATCH})


def host_function(fn: abi_spec.Function) -> Callable[..., int]:
    """The wasm-callable host function for one ABI entry."""
    impl = IMPLEMENTATIONS[(fn.module, fn.name)]
    capability = fn.capability

    def call(*args: int) -> int:
        ctx = current()
        if ctx is None:
            return Status.INTERNAL_FAILURE
        ctx.reset_view()
        if capability not in ctx.capabilities:
            ctx.note(f"{fn.name}: permission denied (the pod does not grant {capability!r})")
            return Status.PERMISSION_DENIED
        try:
            return impl(ctx, *args)
        except (wasmtime.Trap, wasmtime.WasmtimeError):
            raise  # a trap inside a nested call (the guest allocator): the caller traps too
        except (LayottoError, OSError) as exc:
            status = abi_status(exc) or Status.INTERNAL_FAILURE
            if status not in _QUIET:
                failure = "" if isinstance(exc, AbiStatus) else "component failure: "
                ctx.note(f"{fn.name}: {failure}{exc}")
            return status
        except Exception as exc:  # never let guest input crash the host
            log.exception("ABI %s failed", fn.name)
            ctx.note(f"{fn.name}: internal error: {type(exc).__name__}: {exc}")
            return Status.INTERNAL_FAILURE

    call.__name__ = fn.name
    return call


_callbacks: list[object] = []  # the ctypes callbacks must live as long as the linkers


def _raw_callback(fn: abi_spec.Function) -> object:
    """wasmtime's unchecked host-function callback for ``fn``: arguments straight from
    the raw value array (about 1 µs per call, against 7-10 µs through ``define_func``).
    Pointers and lengths are read unsigned, ``i32`` parameters signed."""
    host = host_function(fn)
    signed = tuple(suffix == "" for p in fn.params for suffix in abi_spec.LOWERING[p.type])
    arity = fn.arity

    def callback(_env: object, _caller: object, vals: Any, _count: int) -> int:
        try:
            args = [vals[i].i32 if signed[i] else vals[i].i32 & 0xFFFFFFFF for i in range(arity)]
            vals[0].i32 = host(*args)
            return 0
        except BaseException as exc:  # a trap in a nested guest call (the allocator)
            return capi.new_trap(f"{fn.name}: {exc}")

    return capi.UncheckedCallback(callback)


def define_imports(linker: wasmtime.Linker) -> None:
    """Add every ABI function (both modules) to ``linker``."""
    check_table()
    i32 = wasmtime.ValType.i32()
    for fn in SPEC.all_functions():
        ty = wasmtime.FuncType([i32] * fn.arity, [i32])
        callback = _raw_callback(fn)
        _callbacks.append(callback)
        capi.define_unchecked(linker, fn.module, fn.name, ty, callback)


def is_known_import(module: str, name: str) -> bool:
    return SPEC.lookup(module, name) is not None


def parse_capabilities(value: str | None) -> frozenset[str]:
    """The capabilities a pod grants (annotation ``layotto.io/capabilities``)."""
    granted = set(SPEC.default_capabilities)
    if value:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            if item == "all":
                granted |= KNOWN_CAPABILITIES
            elif item not in KNOWN_CAPABILITIES:
                raise ValueError(
                    f"unknown capability {item!r} (known: {', '.join(sorted(KNOWN_CAPABILITIES))})"
                )
            else:
                granted.add(item)
    return frozenset(granted)


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


# --- invoking other functions and applications ------------------------------------------


class HostInvoker:
    """``layotto_invoke``: another function on this node in process, or an app over HTTP."""

    def __init__(
        self,
        functions: Any,
        apps: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        may_invoke: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.functions = functions  # host.function_registry.FunctionRegistry
        self.apps = dict(apps or {})
        self.timeout = timeout
        # (caller's namespace, callee's) → allowed; None: only within one namespace
        self.may_invoke = may_invoke

    def _function(self, caller: AbiContext | None, target: str) -> Any:
        """The function ``target`` as the caller may reach it: a function id belongs to one
        namespace, and a caller reaches another namespace's only when the operator's policy
        says so (``invokeNamespaces``). The host itself (no namespace) reaches any."""
        if self.functions is None:
            return None
        namespace = caller.namespace if caller is not None else None
        if namespace is None:
            return self.functions.get(target)
        owner = self.functions.owner(target)
        if owner is None:
            return None
        if owner != namespace and (self.may_invoke is None or not self.may_invoke(namespace, owner)):
            return None
        return self.functions.get(target)

    def invoke(self, caller: AbiContext | None, target: str, method: str, data: bytes) -> bytes:
        fn = self._function(caller, target)
        if fn is not None:
            from layotto.host.function import Request

            path = b"/" + method.lstrip("/").encode() if method else b"/"
            request = Request(b"POST", path, b"", [(b"content-type", b"application/octet-stream")], data)
            response = fn.call_sync(request)
            if response.status == 404:
                raise AbiStatus(Status.NOT_FOUND, f"{target} answered 404")
            if response.status >= 400:
                reason = response.body[:200].decode(errors="replace").strip()
                raise AbiStatus(Status.INTERNAL_FAILURE, f"{target} answered {response.status}: {reason}")
            return response.body
        base = self.apps.get(target)
        if base is None:
            raise AbiStatus(Status.NOT_FOUND, f"no function or application with id {target!r}")
        url = base.rstrip("/") + "/" + method.lstrip("/")
        request = urllib.request.Request(url, data=data, method="POST", headers={"id": target})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 - configured apps
                return response.read(MAX_VALUE + 1)
        except urllib.error.HTTPError as exc:
            raise AbiStatus(
                Status.NOT_FOUND if exc.code == 404 else Status.INTERNAL_FAILURE, f"{url}: HTTP {exc.code}"
            ) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise AbiStatus(Status.INTERNAL_FAILURE, f"{url}: {exc}") from exc


class WasmtimeMemory:
    """A GuestMemory over wasmtime-py's Memory (for callers without raw handles)."""

    def __init__(self, store: wasmtime.Store, memory: wasmtime.Memory) -> None:
        self.store = store
        self.memory = memory

    def view(self) -> memoryview:
        import ctypes

        size = self.memory.data_len(self.store)
        if not size:
            return memoryview(bytearray())
        base = ctypes.addressof(self.memory.data_ptr(self.store).contents)
        return memoryview((ctypes.c_ubyte * size).from_address(base)).cast("B")


def wasmtime_allocator(store: wasmtime.Store, exports: Any) -> Callable[[int], int]:
    """The guest allocator (``proxy_on_memory_allocate``, else ``malloc``) as a callable;
    one that always fails (returns 0) when the module exports neither."""
    for name in ("proxy_on_memory_allocate", "malloc"):
        func = exports.get(name) if hasattr(exports, "get") else None
        if isinstance(func, wasmtime.Func):
            return lambda size, f=func: int(f(store, size)) & 0xFFFFFFFF
    return lambda size: 0

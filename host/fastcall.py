"""Calling into wasm through wasmtime's C API directly, for the per-request hot path.

wasmtime-py's ``Func.__call__`` rebuilds the function type and converts every value on
each call (about 15 µs); ``Memory.read``/``write`` add about 7 µs. A request to a function
needs a handful of calls and copies, so the host keeps raw addresses per instance, calls
``wasmtime_func_call_unchecked`` through host/capi.py's prototype (plain integers, no
per-argument conversion) with a preallocated argument array, and reads and writes linear
memory through a memoryview over it, rebuilt only when the memory grows; every range is
checked against the memory's current size.

Handler-ABI functions go one step further: :class:`HandlerStore` makes an instance and
serves a request in one call each into ``host/_handler.c``, which does those same calls and
checks in C. The ctypes paths here serve everything else: Layotto-style modules, the
Runtime ABI's host side, command modules' stores.
"""

from __future__ import annotations

import ctypes
from typing import Any

import wasmtime

from layotto.host import _handler, capi
from layotto.host.capi import EXTERN_FUNC, EXTERN_MEMORY, EpochWatch, Extern, InstanceRaw, ValRaw

__all__ = ["EXTERN_FUNC", "EXTERN_MEMORY"]

# Per-store limits besides memory (a module needing more fails to instantiate, clearly).
# One memory per store: the memory limit is per memory, and the engine refuses modules
# declaring more than one (multi-memory is off), so this is the whole of a store's memory.
TABLE_ELEMENTS = 100_000
INSTANCES = 4
TABLES = 8
MEMORIES = 1

_memory_data = capi.memory_data
_memory_data_size = capi.memory_data_size
_call_unchecked = capi.func_call_unchecked
_call_i32 = _handler.call_i32
_memory_size = _handler.memory_size


class OutOfBounds(Exception):
    """A guest pointer or length outside its linear memory."""


def set_epoch_deadline(store_ctx: int, ticks: int) -> None:
    """Interrupt the store's wasm ``ticks`` epochs from now (its watch decides)."""
    capi.context_set_epoch_deadline(store_ctx, ticks)


# --- Instantiating without the Python wrappers ---------------------------------------
#
# A fresh instance per request must cost tens of microseconds, not the ~150 µs the
# wrapper classes take (Store, Instance, export objects, a callback closure each). The
# host keeps an InstancePre per function and builds each Store with raw calls; the
# store's epoch deadlines go to its own EpochWatch (host/capi.py).


class _Exports:
    """Export lookups by name, for both kinds of store below."""

    __slots__ = ()
    ctx: int | None
    instance_addr: int
    _externs: list[Extern]

    def export(self, name: bytes, kind: int) -> int | None:
        """The address of export ``name`` (a wasmtime_func_t or wasmtime_memory_t), or None."""
        ext = Extern()
        if not capi.instance_export_get(self.ctx, self.instance_addr, name, len(name), ctypes.addressof(ext)):
            return None
        if ext.kind != kind:
            return None
        self._externs.append(ext)  # the address stays valid while we hold it
        return ctypes.addressof(ext.of)


class RawStore(_Exports):
    """A Store, its context and one instance, created through the C API; its epoch
    deadlines go to ``on_deadline`` (through ``watch``, which keeps why it stopped a call)."""

    __slots__ = ("store", "ctx", "watch", "instance", "instance_addr", "_externs")

    def __init__(
        self,
        engine: wasmtime.Engine,
        pre: wasmtime.InstancePre,
        *,
        memory_limit: int,
        on_deadline: Any,
        wasi: wasmtime.WasiConfig | None = None,
    ) -> None:
        self.watch = EpochWatch(on_deadline)  # lives as long as the store (freed first)
        self.store = capi.store_new(capi.engine_address(engine), None, None)
        self.ctx = capi.store_context(self.store)
        self._externs: list[Extern] = []
        try:
            capi.store_limiter(self.store, memory_limit, TABLE_ELEMENTS, INSTANCES, TABLES, MEMORIES)
            capi.watch_store(self.store, self.watch)
            capi.context_set_epoch_deadline(self.ctx, capi.FAR_AWAY)
            if wasi is not None:
                capi.raise_failure(capi.context_set_wasi(self.ctx, capi.take_wasi(wasi)), None)
            self.instance = InstanceRaw()
            self.instance_addr = ctypes.addressof(self.instance)
            trap = ctypes.c_void_p()
            error = capi.instance_pre_instantiate(
                capi.instance_pre_address(pre), self.ctx, self.instance_addr, ctypes.addressof(trap)
            )
            capi.raise_failure(error, trap.value)
        except BaseException:
            self.delete()
            raise

    def delete(self) -> None:
        """Free the store (once; later calls do nothing)."""
        if self.store:
            store, self.store, self.ctx = self.store, None, None
            capi.store_delete(store)

    def __del__(self) -> None:  # a store nobody closed is freed with its last reference
        try:
            self.delete()
        except Exception:  # interpreter shutdown: the module may be half torn down
            pass


# What host/_handler.c's instantiate and call report first.
HANDLER_OK = 0
HANDLER_WASM_ERROR = 1
HANDLER_STATUS = 2
HANDLER_NO_MEMORY = 3
HANDLER_BAD_GUEST = 4
HANDLER_MISSING = 5
HANDLER_BAD_HEADERS = 6


class MissingExport(Exception):
    """A function module lacks an export the handler ABI needs."""


class HandlerStore(_Exports):
    """A Store with one instance of a handler-ABI module, made in one C call
    (host/_handler.c). A request is one more: ``_handler.call(store.instance, method, path,
    query, headers, body)`` answers ``(HANDLER_OK, status, headers, body)``, or what
    :func:`raise_result` raises: traps and errors as wasmtime's own exceptions, a bad guest
    pointer as OutOfBounds, a failed allocation as MemoryError.

    The store is a ``_handler.Instance``, which owns it: ``delete`` frees it once, and
    an instance never deleted is freed with its last reference."""

    __slots__ = (
        "instance",
        "ctx",
        "watch",
        "out",
        "alloc_addr",
        "handler_addr",
        "mem_addr",
        "instance_addr",
        "_externs",
    )

    def __init__(
        self,
        engine: wasmtime.Engine,
        pre: wasmtime.InstancePre,
        handler: str,
        *,
        memory_limit: int,
        on_deadline: Any,
        wasi: wasmtime.WasiConfig | None = None,
    ) -> None:
        self.watch = EpochWatch(on_deadline)
        self._externs: list[Extern] = []
        result = _handler.instantiate(
            capi.engine_address(engine),
            capi.instance_pre_address(pre),
            memory_limit,
            TABLE_ELEMENTS,
            INSTANCES,
            TABLES,
            MEMORIES,
            capi.EPOCH_CALLBACK_ADDRESS,
            self.watch,
            capi.take_wasi(wasi) if wasi is not None else 0,
            handler,
        )
        if result[0] != HANDLER_OK:
            raise_result(result)
        self.instance: _handler.Instance = result[1]
        addresses = self.instance.addresses()
        self.ctx, self.alloc_addr, self.handler_addr, self.mem_addr, self.out, self.instance_addr = addresses

    def delete(self) -> None:
        """Free the store now (a second delete does nothing)."""
        self.instance.delete()
        self.ctx = None
        self._externs.clear()


class MalformedHeaders(Exception):
    """The response's headers map is malformed."""


class HandlerStatus(Exception):
    """The handler returned a nonzero status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"handler returned status {status}")
        self.status = status


def raise_result(result: tuple) -> Any:
    """Raise what a failed host/_handler.c call reported."""
    kind = result[0]
    if kind == HANDLER_WASM_ERROR:
        capi.raise_failure(result[1], result[2])
    if kind == HANDLER_STATUS:
        raise HandlerStatus(result[1])
    if kind == HANDLER_NO_MEMORY:
        raise MemoryError(result[1])
    if kind == HANDLER_BAD_GUEST:
        raise OutOfBounds(result[1])
    if kind == HANDLER_MISSING:
        raise MissingExport(result[1])
    if kind == HANDLER_BAD_HEADERS:
        raise MalformedHeaders(result[1])
    raise RuntimeError(f"unexpected result from the handler path: {result!r}")


class Func:
    """An exported function by address: i32 arguments, one i32 result (unsigned)."""

    __slots__ = ("ctx", "func_addr", "vals", "vals_addr", "size", "trap", "trap_addr")

    def __init__(self, ctx: int, func_addr: int, slots: int) -> None:
        self.ctx = ctx
        self.func_addr = func_addr
        self.size = max(slots, 1)
        self.vals = (ValRaw * self.size)()
        self.vals_addr = ctypes.addressof(self.vals)
        self.trap = ctypes.c_void_p()
        self.trap_addr = ctypes.addressof(self.trap)

    def call0(self) -> None:
        self._invoke()

    def call(self, *args: int) -> int:
        vals = self.vals
        for i, value in enumerate(args):
            vals[i].i32 = value
        return self._invoke()

    __call__ = call

    def call1(self, a: int) -> int:
        if self.size == 1:  # one slot: host/_handler.c's call, without ctypes' conversions
            result = _call_i32(self.ctx, self.func_addr, a)
            if result.__class__ is tuple:
                capi.raise_failure(*result)
            return result
        self.vals[0].i32 = a
        return self._invoke()

    def _invoke(self) -> int:
        error = _call_unchecked(self.ctx, self.func_addr, self.vals_addr, self.size, self.trap_addr)
        if error or self.trap.value:
            trap, self.trap.value = self.trap.value, None
            capi.raise_failure(error, trap)
        return self.vals[0].i32 & 0xFFFFFFFF


class Memory:
    """Bounds-checked access to an instance's linear memory, by address: a memoryview over
    it, rebuilt only when the memory grows (valid until the next wasm call). With ``owner``
    (the HandlerStore or RawStore holding the Store, whose ``ctx`` becomes None when it is
    freed), a Memory outliving its Store refuses to read it."""

    __slots__ = ("ctx", "mem_addr", "owner", "_base", "_size", "_view")

    def __init__(self, ctx: int, mem_addr: int, owner: Any = None) -> None:
        self.ctx = ctx
        self.mem_addr = mem_addr
        self.owner = owner
        self._base = 0
        self._size = -1
        self._view = memoryview(b"")

    def _check(self) -> None:
        if self.owner is not None and self.owner.ctx is None:
            raise RuntimeError("linear memory of a deleted store")

    def size(self) -> int:
        self._check()
        return _memory_data_size(self.ctx, self.mem_addr)

    def view(self) -> memoryview:
        self._check()
        size = _memory_size(self.ctx, self.mem_addr)
        if size == self._size:  # a memory moves only when it grows: same size, same place
            return self._view
        base = _memory_data(self.ctx, self.mem_addr) or 0
        self._base, self._size = base, size
        self._view = (
            memoryview((ctypes.c_char * size).from_address(base)).cast("B") if size else memoryview(b"")
        )
        return self._view

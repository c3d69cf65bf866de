"""Calling into wasm through wasmtime's C API directly, for the per-request hot path.

wasmtime-py's ``Func.__call__`` rebuilds the function type and converts every value on
each call (about 15 µs); ``Memory.read``/``write`` add about 7 µs. A request to a function
needs a handful of calls and copies, so the host keeps raw addresses per instance, calls
``wasmtime_func_call_unchecked`` through its own ctypes prototype (plain integers, no
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
import inspect
import weakref
from collections.abc import Callable
from typing import Any

import wasmtime
from wasmtime import _bindings as ffi

from layotto.host import _handler

_vp = ctypes.c_void_p
_call_unchecked = ctypes.CFUNCTYPE(_vp, _vp, _vp, _vp, ctypes.c_size_t, _vp)(
    ("wasmtime_func_call_unchecked", ffi.dll)
)
# Calls that never block keep the GIL (no release and re-acquire around them). A wasm
# call always releases it: the epoch ticker (a Python thread) must be able to run while
# wasm loops, or nothing would ever interrupt it.
_memory_data = ctypes.PYFUNCTYPE(_vp, _vp, _vp)(("wasmtime_memory_data", ffi.dll))
_memory_data_size = ctypes.PYFUNCTYPE(ctypes.c_size_t, _vp, _vp)(("wasmtime_memory_data_size", ffi.dll))
_set_deadline = ctypes.PYFUNCTYPE(None, _vp, ctypes.c_uint64)(
    ("wasmtime_context_set_epoch_deadline", ffi.dll)
)


def _address(obj: object) -> int:
    return ctypes.cast(obj, _vp).value or 0  # type: ignore[arg-type]


class OutOfBounds(Exception):
    """A guest pointer or length outside its linear memory."""


def set_epoch_deadline(store_ctx: int, ticks: int) -> None:
    """Interrupt the store's wasm ``ticks`` epochs from now (its callback decides)."""
    _set_deadline(store_ctx, ticks)


# --- Instantiating without the Python wrappers ---------------------------------------
#
# A fresh instance per request must cost tens of microseconds, not the ~150 µs the
# wrapper classes take (Store, Instance, export objects, a callback closure each). The
# host keeps an InstancePre per function and builds each Store with raw calls; one
# epoch-deadline callback serves every such store, finding its owner by a key.

# Only instantiation runs wasm (a start function), so only it gives up the GIL; the
# bookkeeping calls around it are short and keep it (a release and re-acquire per call
# would cost more than the call, and invite a thread switch).
_store_new = ctypes.PYFUNCTYPE(_vp, _vp, _vp, _vp)(("wasmtime_store_new", ffi.dll))
_store_context = ctypes.PYFUNCTYPE(_vp, _vp)(("wasmtime_store_context", ffi.dll))
_store_delete = ctypes.PYFUNCTYPE(None, _vp)(("wasmtime_store_delete", ffi.dll))
_i64 = ctypes.c_int64
_store_limiter = ctypes.PYFUNCTYPE(None, _vp, _i64, _i64, _i64, _i64, _i64)(
    ("wasmtime_store_limiter", ffi.dll)
)
_store_epoch_callback = ctypes.PYFUNCTYPE(None, _vp, _vp, _vp, _vp)(
    ("wasmtime_store_epoch_deadline_callback", ffi.dll)
)
_pre_instantiate = ctypes.CFUNCTYPE(_vp, _vp, _vp, _vp, _vp)(("wasmtime_instance_pre_instantiate", ffi.dll))
_export_get = ctypes.PYFUNCTYPE(ctypes.c_bool, _vp, _vp, ctypes.c_char_p, ctypes.c_size_t, _vp)(
    ("wasmtime_instance_export_get", ffi.dll)
)
_set_wasi = ctypes.PYFUNCTYPE(_vp, _vp, _vp)(("wasmtime_context_set_wasi", ffi.dll))
_error_new = ctypes.CFUNCTYPE(_vp, ctypes.c_char_p)(("wasmtime_error_new", ffi.dll))

# Per-store limits besides memory (a module needing more fails to instantiate, clearly).
# One memory per store: the memory limit is per memory, and the engine refuses modules
# declaring more than one (multi-memory is off), so this is the whole of a store's memory.
TABLE_ELEMENTS = 100_000
INSTANCES = 4
TABLES = 8
MEMORIES = 1

EXTERN_FUNC = 0
EXTERN_MEMORY = 3

# Store key -> a reference to its deadline handler: weak for a bound method, so that a
# store's owner (an instance) is not kept alive by this table; dropped without close(), it
# is collected and its store freed with it (HandlerStore.__del__).
_deadline_handlers: dict[int, Callable[[], object]] = {}
_next_key = iter(range(1, 1 << 62))


def _handler_ref(on_deadline: object) -> Callable[[], object]:
    if inspect.ismethod(on_deadline):
        return weakref.WeakMethod(on_deadline)
    return lambda: on_deadline


@ctypes.CFUNCTYPE(ctypes.c_size_t, _vp, _vp, ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint8))
def _on_epoch_deadline(_ctx, env, delta, kind):  # noqa: ANN001, ANN202
    ref = _deadline_handlers.get(env or 0)
    handler = ref() if ref is not None else None
    verdict = handler() if handler is not None else "killed"  # type: ignore[operator]
    if isinstance(verdict, str):
        return _error_new(f"layotto: {verdict}".encode()) or 0
    # Keep running: look again after ``verdict`` more ticks (an epoch bump that was not
    # this store's deadline, e.g. another module's kill, lands here).
    delta[0] = verdict if isinstance(verdict, int) and verdict > 0 else 1 << 40
    kind[0] = 0
    return 0


_EPOCH_CALLBACK_ADDR = ctypes.cast(_on_epoch_deadline, _vp).value


def _raise_error(error: int | None, trap: ctypes.c_void_p) -> None:
    if error:
        raise wasmtime.WasmtimeError._from_ptr(ctypes.cast(error, ctypes.POINTER(ffi.wasmtime_error_t)))
    if trap.value:
        raise wasmtime.Trap._from_ptr(ctypes.cast(trap.value, ctypes.POINTER(ffi.wasm_trap_t)))


class _Store:
    """What both kinds of Store below share: export lookups, and freeing the store when
    nobody closed it (``delete`` is theirs)."""

    __slots__ = ()
    ctx: int | None
    instance_addr: int
    _externs: list[ffi.wasmtime_extern_t]

    def export(self, name: bytes, kind: int) -> int | None:
        """The address of export ``name`` (a wasmtime_func_t or wasmtime_memory_t), or None."""
        ext = ffi.wasmtime_extern_t()
        if not _export_get(self.ctx, self.instance_addr, name, len(name), ctypes.addressof(ext)):
            return None
        if ext.kind != kind:
            return None
        self._externs.append(ext)  # the address stays valid while we hold it
        return ctypes.addressof(ext.of)

    def delete(self) -> None:
        raise NotImplementedError

    def __del__(self) -> None:  # a store nobody closed is freed with its last reference
        try:
            self.delete()
        except Exception:  # interpreter shutdown: the module may be half torn down
            pass


class RawStore(_Store):
    """A Store, its context and one instance, created through the C API."""

    __slots__ = ("store", "ctx", "key", "instance", "instance_addr", "_externs")

    def __init__(
        self,
        engine: wasmtime.Engine,
        pre: wasmtime.InstancePre,
        *,
        memory_limit: int,
        on_deadline: object,
        wasi: wasmtime.WasiConfig | None = None,
    ) -> None:
        self.store = _store_new(_address(engine.ptr()), None, None)
        self.ctx = _store_context(self.store)
        self.key = next(_next_key)
        self._externs: list[ffi.wasmtime_extern_t] = []
        _deadline_handlers[self.key] = _handler_ref(on_deadline)
        try:
            _store_limiter(self.store, memory_limit, TABLE_ELEMENTS, INSTANCES, TABLES, MEMORIES)
            _store_epoch_callback(self.store, _EPOCH_CALLBACK_ADDR, self.key, None)
            _set_deadline(self.ctx, 1 << 40)
            if wasi is not None:
                error = _set_wasi(self.ctx, _address(wasi._consume()))
                _raise_error(error, ctypes.c_void_p())
            self.instance = ffi.wasmtime_instance_t()
            self.instance_addr = ctypes.addressof(self.instance)
            trap = ctypes.c_void_p()
            error = _pre_instantiate(
                _address(pre.ptr()), self.ctx, ctypes.addressof(self.instance), ctypes.addressof(trap)
            )
            _raise_error(error, trap)
        except BaseException:
            self.delete()
            raise

    def delete(self) -> None:
        if self.store:
            _deadline_handlers.pop(self.key, None)
            _store_delete(self.store)
            self.store = None
            self.ctx = None


# --- The handler ABI's hot path, in C (host/_handler.c) ---------------------------------

_handler.bind(
    {
        name: ctypes.cast(getattr(ffi.dll, name), _vp).value
        for name in (
            "wasmtime_store_new",
            "wasmtime_store_context",
            "wasmtime_store_delete",
            "wasmtime_store_limiter",
            "wasmtime_store_epoch_deadline_callback",
            "wasmtime_context_set_epoch_deadline",
            "wasmtime_context_set_wasi",
            "wasmtime_instance_pre_instantiate",
            "wasmtime_instance_export_get",
            "wasmtime_func_call_unchecked",
            "wasmtime_memory_data",
            "wasmtime_memory_data_size",
        )
    },
    ctypes.sizeof(ffi.wasmtime_extern_t),
    ctypes.sizeof(ffi.wasmtime_instance_t),
    ctypes.sizeof(ffi.wasmtime_val_raw_t),
    ctypes.sizeof(ffi.wasmtime_func_t),
    ctypes.sizeof(ffi.wasmtime_memory_t),
)

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


class HandlerStore(_Store):
    """A Store with one instance of a handler-ABI module, made and called in one C call
    each (host/_handler.c): ``call`` takes the request's parts and returns the response's
    (status, headers, body); traps and errors raise as wasmtime's own exceptions,
    a bad guest pointer as OutOfBounds, a failed allocation as MemoryError."""

    __slots__ = (
        "handle",
        "ctx",
        "key",
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
        on_deadline: object,
        wasi: wasmtime.WasiConfig | None = None,
    ) -> None:
        self.handle = 0
        self._externs: list[ffi.wasmtime_extern_t] = []
        self.key = next(_next_key)
        _deadline_handlers[self.key] = _handler_ref(on_deadline)
        result = _handler.instantiate(
            _address(engine.ptr()),
            _address(pre.ptr()),
            memory_limit,
            TABLE_ELEMENTS,
            INSTANCES,
            TABLES,
            MEMORIES,
            _EPOCH_CALLBACK_ADDR,
            self.key,
            _address(wasi._consume()) if wasi is not None else 0,
            handler,
        )
        if result[0] != HANDLER_OK:
            _deadline_handlers.pop(self.key, None)
            _raise_result(result)
        self.handle = result[1]
        addresses = _handler.addresses(self.handle)
        self.ctx, self.alloc_addr, self.handler_addr, self.mem_addr, self.out, self.instance_addr = addresses

    def call(
        self, method: bytes, path: bytes, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Serve one request: the response's (status, headers, body)."""
        result = _handler.call(self.handle, method, path, query, headers, body)
        if result[0] == HANDLER_OK:
            return result[1:]
        return _raise_result(result)

    def delete(self) -> None:
        if self.handle:
            _deadline_handlers.pop(self.key, None)
            handle, self.handle = self.handle, 0
            _handler.delete(handle)
            self.ctx = None


class MalformedHeaders(Exception):
    """The response's headers map is malformed."""


class HandlerStatus(Exception):
    """The handler returned a nonzero status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"handler returned status {status}")
        self.status = status


def _raise_result(result: tuple) -> Any:
    kind = result[0]
    if kind == HANDLER_WASM_ERROR:
        _raise_error(result[1], ctypes.c_void_p(result[2]))
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
        self.vals = (ffi.wasmtime_val_raw_t * self.size)()
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
        self.vals[0].i32 = a
        return self._invoke()

    def call4(self, a: int, b: int, c: int, d: int) -> int:
        vals = self.vals
        vals[0].i32 = a
        vals[1].i32 = b
        vals[2].i32 = c
        vals[3].i32 = d
        return self._invoke()

    def _invoke(self) -> int:
        error = _call_unchecked(self.ctx, self.func_addr, self.vals_addr, self.size, self.trap_addr)
        if error or self.trap.value:
            trap = ctypes.c_void_p(self.trap.value)
            self.trap.value = None
            _raise_error(error, trap)
        return self.vals[0].i32 & 0xFFFFFFFF


class Memory:
    """Bounds-checked access to an instance's linear memory, by address: a memoryview over
    it, rebuilt only when the memory grows (valid until the next wasm call)."""

    __slots__ = ("ctx", "mem_addr", "_base", "_size", "_view")

    def __init__(self, ctx: int, mem_addr: int) -> None:
        self.ctx = ctx
        self.mem_addr = mem_addr
        self._base = 0
        self._size = -1
        self._view = memoryview(b"")

    def size(self) -> int:
        return _memory_data_size(self.ctx, self.mem_addr)

    def view(self) -> memoryview:
        size = _memory_data_size(self.ctx, self.mem_addr)
        if size == self._size:  # a memory moves only when it grows: same size, same place
            return self._view
        base = _memory_data(self.ctx, self.mem_addr) or 0
        self._base, self._size = base, size
        self._view = (
            memoryview((ctypes.c_char * size).from_address(base)).cast("B") if size else memoryview(b"")
        )
        return self._view


class RawFunc(Func):
    """A Func made from wasmtime-py's objects (a Store and one of its exported Funcs)."""

    __slots__ = ("func",)

    def __init__(self, store: wasmtime.Store, func: wasmtime.Func, slots: int) -> None:
        super().__init__(_address(store._context()), ctypes.addressof(func._func), slots)
        self.func = func  # keeps the wasmtime_func_t alive

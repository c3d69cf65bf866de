"""Calling into wasm through wasmtime's C API directly, for the per-request hot path.

wasmtime-py's ``Func.__call__`` rebuilds the function type and converts every value on
each call (about 15 µs); ``Memory.read``/``write`` add about 7 µs. A request to a function
needs a handful of calls and copies, so the host keeps raw addresses per instance, calls
``wasmtime_func_call_unchecked`` through its own ctypes prototype (plain integers, no
per-argument conversion) with a preallocated argument array, and reads and writes linear
memory through a memoryview over it, rebuilt only when the memory grows or moves; every
range is checked against the memory's current size.
"""

from __future__ import annotations

import ctypes

import wasmtime
from wasmtime import _bindings as ffi

_vp = ctypes.c_void_p
_call_unchecked = ctypes.CFUNCTYPE(_vp, _vp, _vp, _vp, ctypes.c_size_t, _vp)(
    ("wasmtime_func_call_unchecked", ffi.dll)
)
_memory_data = ctypes.CFUNCTYPE(_vp, _vp, _vp)(("wasmtime_memory_data", ffi.dll))
_memory_data_size = ctypes.CFUNCTYPE(ctypes.c_size_t, _vp, _vp)(("wasmtime_memory_data_size", ffi.dll))
_set_deadline = ctypes.CFUNCTYPE(None, _vp, ctypes.c_uint64)(("wasmtime_context_set_epoch_deadline", ffi.dll))


def _address(obj: object) -> int:
    return ctypes.cast(obj, _vp).value or 0  # type: ignore[arg-type]


class OutOfBounds(Exception):
    """A guest pointer or length outside its linear memory."""


class RawFunc:
    """One export of one instance, callable with i32 arguments returning one i32 (unsigned)."""

    __slots__ = ("ctx", "func", "func_addr", "vals", "vals_addr", "size", "trap", "trap_addr")

    def __init__(self, store: wasmtime.Store, func: wasmtime.Func, slots: int) -> None:
        self.ctx = _address(store._context())
        self.func = func  # keeps the wasmtime_func_t alive
        self.func_addr = ctypes.addressof(func._func)
        self.size = max(slots, 1)
        self.vals = (ffi.wasmtime_val_raw_t * self.size)()
        self.vals_addr = ctypes.addressof(self.vals)
        self.trap = ctypes.c_void_p()
        self.trap_addr = ctypes.addressof(self.trap)

    def __call__(self, *args: int) -> int:
        vals = self.vals
        for i, value in enumerate(args):
            vals[i].i32 = value
        return self._invoke()

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
        if error:
            raise wasmtime.WasmtimeError._from_ptr(ctypes.cast(error, ctypes.POINTER(ffi.wasmtime_error_t)))
        if self.trap.value:
            trap = ctypes.cast(self.trap.value, ctypes.POINTER(ffi.wasm_trap_t))
            self.trap.value = None
            raise wasmtime.Trap._from_ptr(trap)
        return self.vals[0].i32 & 0xFFFFFFFF


class RawMemory:
    """Bounds-checked access to an instance's linear memory."""

    __slots__ = ("ctx", "memory", "mem_addr", "_base", "_size", "_view")

    def __init__(self, store: wasmtime.Store, memory: wasmtime.Memory) -> None:
        self.ctx = _address(store._context())
        self.memory = memory
        self.mem_addr = ctypes.addressof(memory._memory)
        self._base = 0
        self._size = -1
        self._view = memoryview(b"")

    def size(self) -> int:
        return _memory_data_size(self.ctx, self.mem_addr)

    def view(self) -> memoryview:
        """The whole linear memory as a writable memoryview (valid until the next wasm call)."""
        size = _memory_data_size(self.ctx, self.mem_addr)
        base = _memory_data(self.ctx, self.mem_addr) or 0
        if base != self._base or size != self._size:
            self._base, self._size = base, size
            self._view = (
                memoryview((ctypes.c_char * size).from_address(base)).cast("B") if size else memoryview(b"")
            )
        return self._view


def check(view: memoryview, ptr: int, length: int) -> None:
    if ptr < 0 or length < 0 or ptr + length > len(view):
        raise OutOfBounds(f"range [{ptr:#x}, +{length}) is outside linear memory ({len(view)} bytes)")


def set_epoch_deadline(store_ctx: int, ticks: int) -> None:
    """Interrupt the store's wasm ``ticks`` epochs from now (its callback decides)."""
    _set_deadline(store_ctx, ticks)


def context_address(store: wasmtime.Store) -> int:
    return _address(store._context())

"""wasmtime's C API, declared once, for the host's raw paths.

Every C function the host calls directly is declared here, once, with its GIL behaviour
in its name: :func:`_keeps_gil` (``ctypes.PYFUNCTYPE``) for short calls that never run
wasm and never block, :func:`_releases_gil` (``ctypes.CFUNCTYPE``) for calls that run
wasm, so the epoch ticker and other threads keep going meanwhile. This is also the one
module that reaches into wasmtime-py's private parts (``wasmtime._bindings``,
``wasmtime._ffi``, ``.ptr()``, ``._consume()``, ``_from_ptr``...): everything else gets
plain addresses and wasmtime's own exception objects from the helpers below.

Epoch deadlines have one mechanism for every store (functions' instances, command
modules on threads or fibers): the store's callback environment is an
:class:`EpochWatch`, whose handler returns a typed decision, :class:`Resume` or a
:class:`Stop`. A stop becomes a trap, and the watch keeps the :class:`Stop` it came
from, so the caller learns why its call ended from that field, never from error text.

The compiling child (host/compiler.py) keeps its own few declarations: it may import
only the standard library.
"""

from __future__ import annotations

import ctypes
import enum
import inspect
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import wasmtime
from wasmtime import _bindings as _b
from wasmtime import _ffi

from layotto.host import _handler

log = logging.getLogger(__name__)

#: The libwasmtime wasmtime-py loaded (the compiling child loads the same file).
LIBRARY_PATH: str = str(_ffi.filename)
#: That library, for callers that declare settings by name (compiler.apply_engine_settings).
DLL: ctypes.CDLL = _b.dll

_vp = ctypes.c_void_p
_size = ctypes.c_size_t
_i64 = ctypes.c_int64
_u64 = ctypes.c_uint64

# wasmtime's structures, as wasmtime-py declares them.
Extern = _b.wasmtime_extern_t
InstanceRaw = _b.wasmtime_instance_t
ValRaw = _b.wasmtime_val_raw_t
Val = _b.wasmtime_val_t

EXTERN_FUNC = 0
EXTERN_MEMORY = 3
VAL_I32 = 0


def _keeps_gil(name: str, restype: Any, *argtypes: Any) -> Any:
    """A C function called with the GIL held: short, never runs wasm, never blocks."""
    return ctypes.PYFUNCTYPE(restype, *argtypes)((name, DLL))


def _releases_gil(name: str, restype: Any, *argtypes: Any) -> Any:
    """A C function called with the GIL released: it may run wasm (or unwind a fiber)."""
    return ctypes.CFUNCTYPE(restype, *argtypes)((name, DLL))


# --- stores and contexts ---------------------------------------------------------------
store_new = _keeps_gil("wasmtime_store_new", _vp, _vp, _vp, _vp)
store_context = _keeps_gil("wasmtime_store_context", _vp, _vp)
store_delete = _keeps_gil("wasmtime_store_delete", None, _vp)
store_limiter = _keeps_gil("wasmtime_store_limiter", None, _vp, _i64, _i64, _i64, _i64, _i64)
store_epoch_deadline_callback = _keeps_gil("wasmtime_store_epoch_deadline_callback", None, _vp, _vp, _vp, _vp)
context_set_epoch_deadline = _keeps_gil("wasmtime_context_set_epoch_deadline", None, _vp, _u64)
context_set_wasi = _keeps_gil("wasmtime_context_set_wasi", _vp, _vp, _vp)
caller_context = _keeps_gil("wasmtime_caller_context", _vp, _vp)

# --- instances, exports, memory ----------------------------------------------------------
instance_pre_instantiate = _releases_gil("wasmtime_instance_pre_instantiate", _vp, _vp, _vp, _vp, _vp)
instance_export_get = _keeps_gil(
    "wasmtime_instance_export_get", ctypes.c_bool, _vp, _vp, ctypes.c_char_p, _size, _vp
)
caller_export_get = _keeps_gil("wasmtime_caller_export_get", ctypes.c_bool, _vp, ctypes.c_char_p, _size, _vp)
memory_data = _keeps_gil("wasmtime_memory_data", _vp, _vp, _vp)
memory_data_size = _keeps_gil("wasmtime_memory_data_size", _size, _vp, _vp)

# --- calls -------------------------------------------------------------------------------
func_call_unchecked = _releases_gil("wasmtime_func_call_unchecked", _vp, _vp, _vp, _vp, _size, _vp)
func_call_async = _releases_gil("wasmtime_func_call_async", _vp, _vp, _vp, _vp, _size, _vp, _size, _vp, _vp)
linker_instantiate_async = _releases_gil(
    "wasmtime_linker_instantiate_async", _vp, _vp, _vp, _vp, _vp, _vp, _vp
)
call_future_poll = _releases_gil("wasmtime_call_future_poll", ctypes.c_bool, _vp)
call_future_delete = _releases_gil("wasmtime_call_future_delete", None, _vp)

# --- host functions, errors and traps ----------------------------------------------------
# (linker, module, module length, name, name length, type, callback, env, finalizer)
_DEFINE_ARGS = (_vp, ctypes.c_char_p, _size, ctypes.c_char_p, _size, _vp, _vp, _vp, _vp)
linker_define_func_unchecked = _keeps_gil("wasmtime_linker_define_func_unchecked", _vp, *_DEFINE_ARGS)
linker_define_async_func = _keeps_gil("wasmtime_linker_define_async_func", _vp, *_DEFINE_ARGS)
error_new = _keeps_gil("wasmtime_error_new", _vp, ctypes.c_char_p)
trap_new = _keeps_gil("wasmtime_trap_new", _vp, ctypes.c_char_p, _size)


class Continuation(ctypes.Structure):
    """wasmtime_async_continuation_t: what an async host function returns."""

    _fields_ = [("callback", _vp), ("env", _vp), ("finalizer", _vp)]


#: ``(env, caller, args, nargs, results, nresults, trap_ret, continuation)``
AsyncCallback = ctypes.CFUNCTYPE(None, _vp, _vp, _vp, _size, _vp, _size, _vp, ctypes.POINTER(Continuation))
#: ``(env) -> done``: polled until the async host function is complete.
ContinuationCallback = ctypes.CFUNCTYPE(ctypes.c_bool, _vp)


# --- wasmtime-py's objects as addresses, and errors back as its exceptions ---------------


def address(pointer: object) -> int:
    """The address a ctypes pointer or function pointer holds, read from its buffer
    (``ctypes.cast`` would keep a reference to every result in the source object)."""
    return _vp.from_buffer(pointer).value or 0


def engine_address(engine: wasmtime.Engine) -> int:
    return address(engine.ptr())


def config_address(config: wasmtime.Config) -> int:
    return address(config.ptr())


def linker_address(linker: wasmtime.Linker) -> int:
    return address(linker.ptr())


def module_address(module: wasmtime.Module) -> int:
    return address(module.ptr())


def instance_pre_address(pre: wasmtime.InstancePre) -> int:
    return address(pre.ptr())


def functype_address(ty: wasmtime.FuncType) -> int:
    return address(ty.ptr())


def store_address(store: wasmtime.Store) -> int:
    return address(store.ptr())


def context_address(store: wasmtime.Store) -> int:
    """The store's wasmtime_context_t."""
    return address(store._context())


def func_address(func: wasmtime.Func) -> int:
    """The address of the wasmtime_func_t inside ``func`` (valid while ``func`` lives)."""
    return ctypes.addressof(func._func)


def take_wasi(wasi: wasmtime.WasiConfig) -> int:
    """The WASI config's address, now owned by whoever it is given to (wasmtime)."""
    return address(wasi._consume())


def instance_from_raw(raw: InstanceRaw) -> wasmtime.Instance:
    return wasmtime.Instance._from_raw(raw)


def error_from(pointer: int) -> wasmtime.WasmtimeError:
    """wasmtime-py's exception for a wasmtime_error_t (which it then owns)."""
    return wasmtime.WasmtimeError._from_ptr(ctypes.cast(pointer, ctypes.POINTER(_b.wasmtime_error_t)))


def trap_from(pointer: int) -> wasmtime.Trap:
    """wasmtime-py's exception for a wasm_trap_t (which it then owns)."""
    return wasmtime.Trap._from_ptr(ctypes.cast(pointer, ctypes.POINTER(_b.wasm_trap_t)))


def raise_failure(error: int | None, trap: int | None) -> None:
    """Raise the error or trap a call reported, if any."""
    if error:
        raise error_from(error)
    if trap:
        raise trap_from(trap)


def new_trap(message: str) -> int:
    """A wasm_trap_t for a host function to return (wasmtime takes it)."""
    data = message.encode()
    return trap_new(data, len(data)) or 0


def define_host_function(
    linker: wasmtime.Linker, module: str, name: str, ty: wasmtime.FuncType, fn: object, unsigned_mask: int
) -> None:
    """Define ``module.name`` in ``linker`` as the host function ``fn`` (host/_handler.c
    ``host_function``: ``fn(*i32 arguments)`` returns the result, or a str to trap with;
    bit i of ``unsigned_mask`` reads argument i unsigned). The definition owns a reference
    to ``fn``: it lives as long as the linker and every store that uses it, and no longer."""
    m, n = module.encode(), name.encode()
    callback, env, finalizer = _handler.host_function(fn, len(ty.params), unsigned_mask)
    error = linker_define_func_unchecked(
        linker_address(linker), m, len(m), n, len(n), functype_address(ty), callback, env, finalizer
    )
    raise_failure(error, None)  # (a refused definition's env is freed by wasmtime too)


def set_pooling_allocation(
    config: wasmtime.Config, *, instances: int, max_memory_size: int, keep_resident: int, decommit_batch: int
) -> None:
    """Give ``config`` wasmtime's pooling allocator with ``instances`` slots of each kind."""
    pool = _b.wasmtime_pooling_allocation_config_new()
    try:
        _b.wasmtime_pooling_allocation_config_total_core_instances_set(pool, instances)
        _b.wasmtime_pooling_allocation_config_total_memories_set(pool, instances)
        _b.wasmtime_pooling_allocation_config_total_tables_set(pool, instances)
        _b.wasmtime_pooling_allocation_config_max_memory_size_set(pool, max_memory_size)
        _b.wasmtime_pooling_allocation_config_linear_memory_keep_resident_set(pool, keep_resident)
        _b.wasmtime_pooling_allocation_config_decommit_batch_size_set(pool, decommit_batch)
        _b.wasmtime_pooling_allocation_strategy_set(config.ptr(), pool)
    finally:
        _b.wasmtime_pooling_allocation_config_delete(pool)


# --- epoch deadlines ----------------------------------------------------------------------

#: A deadline that never comes by itself (only an explicit one, or a kill's epoch bump).
FAR_AWAY = 1 << 40


class Stop(enum.Enum):
    """Why the host ended a call at an epoch deadline."""

    KILLED = "killed"
    INLINE_BUDGET = "inline budget"
    DEADLINE = "deadline"


@dataclass(frozen=True, slots=True)
class Resume:
    """Keep running and look again ``ticks`` epochs from now; ``yield_fiber``: suspend the
    fiber first (its scheduler polls it again)."""

    ticks: int = 1
    yield_fiber: bool = False


Decision = Stop | Resume
RESUME = Resume()
YIELD = Resume(1, yield_fiber=True)


class EpochWatch:
    """The epoch-deadline state of one store: the handler that decides, and the
    :class:`Stop` of the trap it caused (``stopped``, until :meth:`take_stop`).

    A bound method is held weakly, so that a store's owner is not kept alive by its own
    store; once the owner is gone, every deadline stops the call.
    """

    __slots__ = ("_handler", "stopped")

    def __init__(self, handler: Callable[[], Decision]) -> None:
        if inspect.ismethod(handler):
            method = weakref.WeakMethod(handler)
            self._handler: Callable[[], Callable[[], Decision] | None] = method
        else:
            self._handler = lambda: handler
        self.stopped: Stop | None = None

    def decide(self) -> Decision:
        handler = self._handler()
        return handler() if handler is not None else Stop.KILLED

    def take_stop(self) -> Stop | None:
        """The Stop that ended the last call, if the host ended it (and forget it)."""
        stop, self.stopped = self.stopped, None
        return stop


def _on_epoch_deadline(_ctx: int, watch: EpochWatch, delta: Any, kind: Any) -> int:
    try:
        decision = watch.decide()
    except Exception:  # a host bug: stop the call rather than leave the update unset
        log.exception("epoch deadline handler failed")
        decision = Stop.KILLED
    if isinstance(decision, Stop):
        watch.stopped = decision
        return error_new(f"layotto: {decision.value}".encode()) or 0
    delta[0] = decision.ticks if decision.ticks > 0 else FAR_AWAY
    kind[0] = 1 if decision.yield_fiber else 0  # WASMTIME_UPDATE_DEADLINE_YIELD / _CONTINUE
    return 0


# The environment is the store's EpochWatch itself, kept alive by the store's owner for
# at least as long as the store (see watch_store and host/_handler.c).
_EPOCH_CALLBACK = ctypes.CFUNCTYPE(
    _size, _vp, ctypes.py_object, ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint8)
)(_on_epoch_deadline)
EPOCH_CALLBACK_ADDRESS: int = address(_EPOCH_CALLBACK)


def watch_store(store: int, watch: EpochWatch) -> None:
    """Route the epoch deadlines of ``store`` (a wasmtime_store_t address) to ``watch``,
    which the caller keeps alive for as long as the store."""
    store_epoch_deadline_callback(store, EPOCH_CALLBACK_ADDRESS, id(watch), None)


# --- the handler ABI's hot path, in C (host/_handler.c) -----------------------------------

_handler.bind(
    {
        name: ctypes.cast(getattr(DLL, name), _vp).value
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
            "wasmtime_trap_new",
        )
    },
    ctypes.sizeof(Extern),
    ctypes.sizeof(InstanceRaw),
    ctypes.sizeof(ValRaw),
    ctypes.sizeof(_b.wasmtime_func_t),
    ctypes.sizeof(_b.wasmtime_memory_t),
)

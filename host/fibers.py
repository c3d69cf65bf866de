"""Command modules as fibers: many nanoprocesses on a few scheduler threads.

A nanoprocess on an OS thread of its own costs the host that thread: its stack, Python's
thread state and a share of a malloc arena, about 30 KiB of RSS for a module that only
sleeps. wasmtime can run wasm on a stack of its own instead (``wasmtime_func_call_async``:
a future whose every ``wasmtime_call_future_poll`` runs the module until it finishes or
suspends), so a handful of scheduler threads can run any number of command modules:

- a sleep is an async ``poll_oneoff``: the host function returns a continuation, the
  module's fiber suspends, and the scheduler polls it again once the sleep is over or the
  module is killed (the continuation then traps);
- a busy module yields at epoch deadlines (the engine's ticker runs while a fiber runs),
  so one loop cannot starve the others; a CPU quota parks the fiber until its period ends;
- a kill bumps the epoch (a running fiber traps in its deadline callback) and wakes a
  parked one.

Host functions run on the fiber's stack, on a scheduler thread: one that blocks (WASI
output into a full fifo, say) holds that thread until it returns, so modules whose calls
may block for long (Runtime ABI users, stdin readers) keep threads of their own (see
``host/nanoprocess.py``).

Only the C API is used here, through ctypes prototypes declared from wasmtime's
``wasmtime/async.h`` (the Python bindings do not cover the async functions).
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import wasmtime
from wasmtime import _bindings as ffi

from layotto.host.engine import EpochTicker

log = logging.getLogger(__name__)

_vp = ctypes.c_void_p
_size = ctypes.c_size_t
_dll = ffi.dll

# Polling runs wasm: it releases the GIL (CFUNCTYPE), so the ticker and other workers run.
_future_poll = ctypes.CFUNCTYPE(ctypes.c_bool, _vp)(("wasmtime_call_future_poll", _dll))
_future_delete = ctypes.CFUNCTYPE(None, _vp)(("wasmtime_call_future_delete", _dll))
_func_call_async = ctypes.CFUNCTYPE(_vp, _vp, _vp, _vp, _size, _vp, _size, _vp, _vp)(
    ("wasmtime_func_call_async", _dll)
)
_linker_instantiate_async = ctypes.CFUNCTYPE(_vp, _vp, _vp, _vp, _vp, _vp, _vp)(
    ("wasmtime_linker_instantiate_async", _dll)
)
_define_async_func = ctypes.CFUNCTYPE(
    _vp, _vp, ctypes.c_char_p, _size, ctypes.c_char_p, _size, _vp, _vp, _vp, _vp
)(("wasmtime_linker_define_async_func", _dll))
# Short, non-blocking calls made from inside host callbacks: they keep the GIL.
_caller_context = ctypes.PYFUNCTYPE(_vp, _vp)(("wasmtime_caller_context", _dll))
_caller_export_get = ctypes.PYFUNCTYPE(ctypes.c_bool, _vp, ctypes.c_char_p, _size, _vp)(
    ("wasmtime_caller_export_get", _dll)
)
_memory_data = ctypes.PYFUNCTYPE(_vp, _vp, _vp)(("wasmtime_memory_data", _dll))
_memory_data_size = ctypes.PYFUNCTYPE(_size, _vp, _vp)(("wasmtime_memory_data_size", _dll))
_trap_new = ctypes.PYFUNCTYPE(_vp, ctypes.c_char_p, _size)(("wasmtime_trap_new", _dll))
_error_new = ctypes.PYFUNCTYPE(_vp, ctypes.c_char_p)(("wasmtime_error_new", _dll))


class _Continuation(ctypes.Structure):
    _fields_ = [("callback", _vp), ("env", _vp), ("finalizer", _vp)]


_AsyncCallback = ctypes.CFUNCTYPE(None, _vp, _vp, _vp, _size, _vp, _size, _vp, ctypes.POINTER(_Continuation))
_ContinuationCallback = ctypes.CFUNCTYPE(ctypes.c_bool, _vp)
_EpochCallback = ctypes.CFUNCTYPE(
    _size, _vp, _vp, ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint8)
)

UPDATE_CONTINUE = 0
UPDATE_YIELD = 1
_EXTERN_MEMORY = 3
_WASMTIME_I32 = 0


class FiberError(Exception):
    """A future ended with an error or trap (the wasmtime exception is ``__cause__``)."""


class CallFuture:
    """One wasmtime_call_future_t and the slots it writes its outcome to."""

    __slots__ = ("ptr", "trap", "error", "_keep")

    def __init__(self) -> None:
        self.ptr: int | None = None
        self.trap = ctypes.c_void_p()
        self.error = ctypes.c_void_p()
        self._keep: tuple[object, ...] = ()

    @classmethod
    def instantiate(
        cls, linker: wasmtime.Linker, store: wasmtime.Store, module: wasmtime.Module
    ) -> tuple[CallFuture, ffi.wasmtime_instance_t]:
        future = cls()
        instance = ffi.wasmtime_instance_t()
        future._keep = (linker, store, module, instance)
        future.ptr = _linker_instantiate_async(
            _addr(linker.ptr()),
            _addr(store._context()),
            _addr(module.ptr()),
            ctypes.addressof(instance),
            ctypes.addressof(future.trap),
            ctypes.addressof(future.error),
        )
        return future, instance

    @classmethod
    def call(cls, store: wasmtime.Store, func: wasmtime.Func) -> CallFuture:
        """Call ``func`` (no parameters, no results) as a future."""
        future = cls()
        future._keep = (store, func)
        future.ptr = _func_call_async(
            _addr(store._context()),
            ctypes.addressof(func._func),
            None,
            0,
            None,
            0,
            ctypes.addressof(future.trap),
            ctypes.addressof(future.error),
        )
        return future

    def poll(self) -> bool:
        """Run until done (True) or suspended (False)."""
        assert self.ptr is not None
        return bool(_future_poll(self.ptr))

    def outcome(self) -> BaseException | None:
        """After ``poll`` returned True: the error or trap it ended with, if any."""
        if self.error.value:
            ptr, self.error.value = self.error.value, None
            return wasmtime.WasmtimeError._from_ptr(ctypes.cast(ptr, ctypes.POINTER(ffi.wasmtime_error_t)))
        if self.trap.value:
            ptr, self.trap.value = self.trap.value, None
            return wasmtime.Trap._from_ptr(ctypes.cast(ptr, ctypes.POINTER(ffi.wasm_trap_t)))
        return None

    def delete(self) -> None:
        if self.ptr is not None:
            ptr, self.ptr = self.ptr, None
            _future_delete(ptr)
            self._keep = ()


def _addr(obj: object) -> int:
    """The address a ctypes pointer or function pointer holds, read from its buffer
    (``ctypes.cast`` would keep a reference to every result in the source object)."""
    return _vp.from_buffer(obj).value or 0  # type: ignore[arg-type]


class FiberTask(Protocol):
    """What the scheduler drives: a nanoprocess running as a fiber."""

    killed: bool
    wake_at: float  # monotonic; a step that suspends with wake_at in the future parks it

    def step(self) -> bool:
        """Poll the module once; True once it has finished."""
        ...

    def on_deadline(self) -> int | None:
        """Its store's epoch deadline passed: None to trap (killed), else UPDATE_YIELD or
        UPDATE_CONTINUE (setting ``wake_at`` ahead parks it once it has yielded)."""
        ...


# --- the fiber a worker thread is polling (host callbacks find their fiber here) ------

_local = threading.local()


def current() -> FiberTask | None:
    """The fiber this thread is polling right now, if any."""
    return getattr(_local, "fiber", None)


class FiberScheduler:
    """A few worker threads polling runnable fibers; parked ones wait on a timer heap."""

    def __init__(self, ticker: EpochTicker, workers: int | None = None) -> None:
        self.ticker = ticker
        self.workers = workers or max(1, min(4, os.cpu_count() or 1))
        self._cond = threading.Condition()
        self._ready: deque[FiberTask] = deque()
        self._timers: list[tuple[float, int, FiberTask]] = []
        self._parked: dict[int, int] = {}  # id(fiber) -> its timer's sequence number
        self._stale = 0  # timers of fibers woken early (a kill): dropped in batches
        self._seq = itertools.count()
        self._threads: list[threading.Thread] = []
        self.fibers = 0  # fibers submitted and not finished

    def submit(self, fiber: FiberTask) -> None:
        with self._cond:
            self.fibers += 1
            self._ready.append(fiber)
            if len(self._threads) < min(self.workers, self.fibers):
                thread = threading.Thread(target=self._work, name=f"fibers-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
            self._cond.notify()

    def wake(self, fiber: FiberTask) -> None:
        """Make a parked fiber runnable now (a kill)."""
        with self._cond:
            if self._parked.pop(id(fiber), None) is not None:
                self._ready.append(fiber)
                self._stale += 1
                if self._stale > 64 and self._stale * 2 > len(self._timers):
                    # A killed sleeper's timer may lie an hour ahead: do not keep the
                    # nanoprocess alive that long.
                    self._timers = [t for t in self._timers if self._parked.get(id(t[2])) == t[1]]
                    heapq.heapify(self._timers)
                    self._stale = 0
                self._cond.notify()

    def _next(self) -> FiberTask:
        with self._cond:
            while True:
                now = time.monotonic()
                timers = self._timers
                while timers and timers[0][0] <= now:
                    _, seq, fiber = heapq.heappop(timers)
                    if self._parked.get(id(fiber)) == seq:
                        del self._parked[id(fiber)]
                        self._ready.append(fiber)
                    else:
                        self._stale = max(0, self._stale - 1)
                if self._ready:
                    return self._ready.popleft()
                self._cond.wait(timers[0][0] - now if timers else None)

    def _work(self) -> None:
        while True:
            fiber = self._next()
            _local.fiber = fiber
            self.ticker.acquire()  # a running fiber yields at every tick
            try:
                done = fiber.step()
            except BaseException:  # step reports its own errors; never lose the worker
                done = True
            finally:
                self.ticker.release()
                _local.fiber = None
            with self._cond:
                if done:
                    self.fibers -= 1
                elif fiber.killed or fiber.wake_at <= time.monotonic():
                    self._ready.append(fiber)
                else:
                    seq = next(self._seq)
                    self._parked[id(fiber)] = seq
                    heapq.heappush(self._timers, (fiber.wake_at, seq, fiber))
                    self._cond.notify()  # another worker may have to wait less long now


# --- the async host function and the epoch callback -----------------------------------

#: ``handler(base, size, in_ptr, out_ptr, nsubs, nevents_ptr)``: the guest memory (address,
#: length) and the call's arguments; it writes the events and returns the WASI errno (an
#: int), or the seconds (a float) to sleep before the call completes with success.
PollHandler = Callable[[int, int, int, int, int, int], "float | int"]


class AsyncPoll:
    """``poll_oneoff`` as an async host function: a sleep suspends the fiber.

    The scheduler polls the fiber again once its ``wake_at`` has passed or it is killed;
    the continuation then completes the call, or traps with ``killed_message``.
    """

    def __init__(self, handler: PollHandler, killed_message: str) -> None:
        self._handler = handler
        self._message = killed_message.encode()
        self._callback = _AsyncCallback(self._call)
        self._continue = _ContinuationCallback(self._check)
        self._continue_addr = _addr(self._continue)
        self._done = _ContinuationCallback(lambda _env: True)
        self._done_addr = _addr(self._done)
        self._type: wasmtime.FuncType | None = None

    def define(
        self, linker: wasmtime.Linker, module: str = "wasi_snapshot_preview1", name: str = "poll_oneoff"
    ) -> None:
        i32 = wasmtime.ValType.i32()
        ty = wasmtime.FuncType([i32, i32, i32, i32], [i32])
        error = _define_async_func(
            _addr(linker.ptr()),
            module.encode(),
            len(module),
            name.encode(),
            len(name),
            _addr(ty.ptr()),
            _addr(self._callback),
            None,
            None,
        )
        if error:
            raise wasmtime.WasmtimeError._from_ptr(ctypes.cast(error, ctypes.POINTER(ffi.wasmtime_error_t)))
        self._type = ty  # the linker copied it; keep ours alive anyway

    def _call(self, _env, caller, args, nargs, results, _nresults, trap_ret, cont):  # noqa: ANN001, ANN202
        cont[0].callback = self._done_addr
        cont[0].env = None
        cont[0].finalizer = None
        vals = ctypes.cast(args, ctypes.POINTER(ffi.wasmtime_val_t))
        out = ctypes.cast(results, ctypes.POINTER(ffi.wasmtime_val_t))
        fiber = current()
        ext = ffi.wasmtime_extern_t()
        if not _caller_export_get(caller, b"memory", 6, ctypes.addressof(ext)) or ext.kind != _EXTERN_MEMORY:
            base = size = 0
        else:
            ctx = _caller_context(caller)
            mem = ctypes.addressof(ext.of)
            base, size = _memory_data(ctx, mem) or 0, _memory_data_size(ctx, mem)
        try:
            verdict = self._handler(base, size, *(vals[i].of.i32 & 0xFFFFFFFF for i in range(min(nargs, 4))))
        except Exception as exc:  # a host bug: trap the module rather than crash the host
            message = f"poll_oneoff: host error: {exc}".encode()
            ctypes.c_void_p.from_address(trap_ret).value = _trap_new(message, len(message))
            return
        out[0].kind = _WASMTIME_I32
        if isinstance(verdict, float):
            out[0].of.i32 = 0
            if fiber is not None:
                fiber.wake_at = time.monotonic() + verdict
                # The slot stays valid until the continuation reports completion.
                cont[0].env = trap_ret
                cont[0].callback = self._continue_addr
        else:
            out[0].of.i32 = verdict

    def _check(self, trap_ret: int | None) -> bool:
        fiber = current()
        if fiber is None:
            return True
        if fiber.killed:
            if trap_ret:
                ctypes.c_void_p.from_address(trap_ret).value = _trap_new(self._message, len(self._message))
            return True
        return time.monotonic() >= fiber.wake_at


@_EpochCallback
def _on_epoch_deadline(_ctx, _env, delta, kind):  # noqa: ANN001, ANN202
    fiber = current()
    try:
        verdict = fiber.on_deadline() if fiber is not None else None
    except Exception:  # a host bug: stop the module rather than leave kind unset
        log.exception("epoch deadline handler failed")
        verdict = None
    if verdict is None:
        return _error_new(b"nanoprocess killed") or 0
    delta[0] = 1
    kind[0] = verdict
    return 0


_store_epoch_callback = ctypes.CFUNCTYPE(None, _vp, _vp, _vp, _vp)(
    ("wasmtime_store_epoch_deadline_callback", _dll)
)


def watch_epoch(store: wasmtime.Store) -> None:
    """Route the store's epoch deadlines to the fiber being polled (its ``on_deadline``)."""
    _store_epoch_callback(_addr(store.ptr()), _addr(_on_epoch_deadline), None, None)

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

The async functions of wasmtime's C API (``wasmtime/async.h``) are declared in
``host/capi.py``; the Python bindings do not cover them.
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import wasmtime

from layotto.host import capi
from layotto.host.engine import EpochTicker


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
    ) -> tuple[CallFuture, capi.InstanceRaw]:
        future = cls()
        instance = capi.InstanceRaw()
        future._keep = (linker, store, module, instance)
        future.ptr = capi.linker_instantiate_async(
            capi.linker_address(linker),
            capi.context_address(store),
            capi.module_address(module),
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
        future.ptr = capi.func_call_async(
            capi.context_address(store),
            capi.func_address(func),
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
        return bool(capi.call_future_poll(self.ptr))

    def outcome(self) -> BaseException | None:
        """After ``poll`` returned True: the error or trap it ended with, if any."""
        if self.error.value:
            ptr, self.error.value = self.error.value, None
            return capi.error_from(ptr)
        if self.trap.value:
            ptr, self.trap.value = self.trap.value, None
            return capi.trap_from(ptr)
        return None

    def delete(self) -> None:
        if self.ptr is not None:
            ptr, self.ptr = self.ptr, None
            capi.call_future_delete(ptr)
            self._keep = ()


class FiberTask(Protocol):
    """What the scheduler drives: a nanoprocess running as a fiber. Its store's epoch
    deadlines (every tick while it runs, and every kill) make it yield or trap."""

    killed: bool
    wake_at: float  # monotonic; a step that suspends with wake_at in the future parks it

    def step(self) -> bool:
        """Poll the module once; True once it has finished."""
        ...


class FiberScheduler:
    """A few worker threads polling runnable fibers; parked ones wait on a timer heap."""

    def __init__(self, ticker: EpochTicker, workers: int | None = None) -> None:
        self.ticker = ticker
        self._local = threading.local()  # the fiber each worker thread is polling
        self.workers = workers or max(1, min(4, os.cpu_count() or 1))
        self._cond = threading.Condition()
        self._ready: deque[FiberTask] = deque()
        self._timers: list[tuple[float, int, FiberTask]] = []
        self._parked: dict[int, int] = {}  # id(fiber) -> its timer's sequence number
        self._stale = 0  # timers of fibers woken early (a kill): dropped in batches
        self._seq = itertools.count()
        self._threads: list[threading.Thread] = []
        self.fibers = 0  # fibers submitted and not finished

    def current(self) -> FiberTask | None:
        """The fiber the calling thread is polling right now, if it is one of ours."""
        return getattr(self._local, "fiber", None)

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
            self._local.fiber = fiber
            self.ticker.acquire()  # a running fiber yields at every tick
            try:
                done = fiber.step()
            except BaseException:  # step reports its own errors; never lose the worker
                done = True
            finally:
                self.ticker.release()
                self._local.fiber = None
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


# --- the async host function ---------------------------------------------------------

#: ``handler(base, size, in_ptr, out_ptr, nsubs, nevents_ptr)``: the guest memory (address,
#: length) and the call's arguments; it writes the events and returns the WASI errno (an
#: int), or the seconds (a float) to sleep before the call completes with success.
PollHandler = Callable[[int, int, int, int, int, int], "float | int"]


class AsyncPoll:
    """``poll_oneoff`` as an async host function: a sleep suspends the fiber.

    The scheduler polls the fiber again once its ``wake_at`` has passed or it is killed;
    the continuation then completes the call, or traps with ``killed_message``. It finds
    the fiber it runs for as the one ``scheduler``'s thread is polling.
    """

    def __init__(self, handler: PollHandler, killed_message: str, scheduler: FiberScheduler) -> None:
        self._handler = handler
        self._message = killed_message
        self._scheduler = scheduler
        self._callback = capi.AsyncCallback(self._call)
        self._continue = capi.ContinuationCallback(self._check)
        self._continue_addr = capi.address(self._continue)
        self._done = capi.ContinuationCallback(lambda _env: True)
        self._done_addr = capi.address(self._done)
        self._type: wasmtime.FuncType | None = None

    def define(
        self, linker: wasmtime.Linker, module: str = "wasi_snapshot_preview1", name: str = "poll_oneoff"
    ) -> None:
        i32 = wasmtime.ValType.i32()
        ty = wasmtime.FuncType([i32, i32, i32, i32], [i32])
        error = capi.linker_define_async_func(
            capi.linker_address(linker),
            module.encode(),
            len(module),
            name.encode(),
            len(name),
            capi.functype_address(ty),
            capi.address(self._callback),
            None,
            None,
        )
        capi.raise_failure(error, None)
        self._type = ty  # the linker copied it; keep ours alive anyway

    def _call(
        self,
        _env: int | None,
        caller: int,
        args: int,
        nargs: int,
        results: int,
        _nresults: int,
        trap_ret: int,
        cont: Any,
    ) -> None:
        cont[0].callback = self._done_addr
        cont[0].env = None
        cont[0].finalizer = None
        vals = ctypes.cast(args, ctypes.POINTER(capi.Val))
        out = ctypes.cast(results, ctypes.POINTER(capi.Val))
        fiber = self._scheduler.current()
        ext = capi.Extern()
        if (
            not capi.caller_export_get(caller, b"memory", 6, ctypes.addressof(ext))
            or ext.kind != capi.EXTERN_MEMORY
        ):
            base = size = 0
        else:
            ctx = capi.caller_context(caller)
            mem = ctypes.addressof(ext.of)
            base, size = capi.memory_data(ctx, mem) or 0, capi.memory_data_size(ctx, mem)
        try:
            verdict = self._handler(base, size, *(vals[i].of.i32 & 0xFFFFFFFF for i in range(min(nargs, 4))))
        except Exception as exc:  # a host bug: trap the module rather than crash the host
            ctypes.c_void_p.from_address(trap_ret).value = capi.new_trap(f"poll_oneoff: host error: {exc}")
            return
        out[0].kind = capi.VAL_I32
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
        fiber = self._scheduler.current()
        if fiber is None:
            return True
        if fiber.killed:
            if trap_ret:
                ctypes.c_void_p.from_address(trap_ret).value = capi.new_trap(self._message)
            return True
        return time.monotonic() >= fiber.wake_at

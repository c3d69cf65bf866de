"""Running nanoprocesses as fibers on a few scheduler threads (host/fibers.py).

An idle fiber costs the host its Store, its touched linear memory and the touched part of
its fiber stack, not a thread. The runner owns the scheduler and the linker its fibers
instantiate against (WASI with the async ``poll_oneoff``, so a sleep suspends the fiber);
the node runtime makes one and hands it the modules that fit a fiber
(host/nanoprocess.py ``fits_a_fiber``).
"""

from __future__ import annotations

import logging
import threading
import time

import wasmtime

from layotto.host import capi
from layotto.host.capi import Stop
from layotto.host.engine import WasmEngine
from layotto.host.fibers import AsyncPoll, CallFuture, FiberScheduler
from layotto.host.nanoprocess import TRAP_EXIT, Nanoprocess
from layotto.host.wasi_poll import poll_oneoff_async

log = logging.getLogger(__name__)


class FiberRunner:
    """Runs nanoprocesses as fibers of one scheduler (at most ``workers`` threads)."""

    def __init__(self, engine: WasmEngine, workers: int | None = None) -> None:
        self.engine = engine
        self.scheduler = FiberScheduler(engine.ticker, workers)
        self.linker = wasmtime.Linker(engine.engine)
        self.linker.define_wasi()
        self.linker.allow_shadowing = True
        self._poll = AsyncPoll(poll_oneoff_async, "nanoprocess killed", self.scheduler)
        self._poll.define(self.linker)

    def launch(self, proc: Nanoprocess, ready: threading.Event) -> FiberRun:
        run = FiberRun(self, proc, ready)
        self.scheduler.submit(run)
        return run


class FiberRun:
    """One nanoprocess as a fiber: the future being polled, and when it is due again."""

    __slots__ = (
        "runner", "proc", "wake_at", "_ready", "_future", "_instance_raw", "_store", "_slice_start",
        "__weakref__",
    )  # fmt: skip

    def __init__(self, runner: FiberRunner, proc: Nanoprocess, ready: threading.Event) -> None:
        self.runner = runner
        self.proc = proc
        self.wake_at = 0.0  # monotonic; a parked fiber is due again then
        self._ready: threading.Event | None = ready
        self._future: CallFuture | None = None
        self._instance_raw: capi.InstanceRaw | None = None
        self._slice_start = 0.0  # the scheduler thread's CPU clock when this slice began
        self._store: wasmtime.Store | None = None

    @property
    def killed(self) -> bool:
        return self.proc.killed

    def kill(self) -> None:
        self.runner.scheduler.wake(self)  # a parked fiber runs (and traps) at once

    def cpu_seconds(self) -> float | None:
        return None  # the slices, added up as they end

    def _set_ready(self) -> None:
        ready, self._ready = self._ready, None
        if ready is not None:
            ready.set()

    def _start_failed(self, exc: BaseException) -> None:
        ready, self._ready = self._ready, None
        self.proc.start_failed(exc, ready or threading.Event())

    def step(self) -> bool:
        """Poll the module once (on a scheduler thread); True once it has finished."""
        try:
            return self._step()
        except Exception as exc:  # a host bug must not leave the task running forever
            log.exception("%s: unexpected error in its fiber", self.proc.spec.name)
            future, self._future = self._future, None
            if future is not None:
                future.delete()
            self.proc.finish(TRAP_EXIT, f"host error: {exc}")
            self.proc.drop_store()
            self._set_ready()
            return True

    def _step(self) -> bool:
        proc = self.proc
        if self._future is None:  # first step: build the Store, instantiate as a future
            try:
                store = proc.configure(self.on_deadline)
                self._future, self._instance_raw = CallFuture.instantiate(
                    self.runner.linker, store, proc.compiled.module
                )
            except Exception as exc:
                self._start_failed(exc)
                return True
            self._store = store
        future = self._future
        self._slice_start = time.thread_time()
        try:
            done = future.poll()
        finally:
            proc.cpu_used += time.thread_time() - self._slice_start
            self._slice_start = 0.0
        if not done:
            return False
        exc = future.outcome()
        future.delete()
        if self._instance_raw is not None:  # instantiated: now call the entry point
            raw, self._instance_raw = self._instance_raw, None
            store = self._store
            assert store is not None
            try:
                if exc is not None:
                    raise exc
                entry = proc.entry(store, capi.instance_from_raw(raw))
                self._future = CallFuture.call(store, entry)
            except Exception as exc:
                self._store = None
                self._start_failed(exc)
                return True
            if proc.spec.cpu_quota_us:
                proc.throttle.period_start = time.monotonic()
                proc.throttle.cpu_at_period_start = proc.cpu_used
            self._set_ready()
            self.wake_at = 0.0
            return False
        status, reason = proc.outcome(exc)
        proc.finish(status, reason)
        self._future = None
        self._store = None
        proc.drop_store()
        return True

    def on_deadline(self) -> capi.Decision:
        """The fiber's epoch deadline passed (a tick, or a kill): trap, or yield."""
        proc = self.proc
        if proc.killed:
            return Stop.KILLED
        if proc.spec.cpu_quota_us:
            cpu = proc.cpu_used + (time.thread_time() - self._slice_start)
            pause = proc.throttle_pause(cpu)
            if pause > 0:  # park until the period ends; it restarts then
                now = time.monotonic()
                self.wake_at = now + pause
                proc.throttle.period_start, proc.throttle.cpu_at_period_start = now + pause, cpu
                proc.throttle.periods += 1
        return capi.YIELD

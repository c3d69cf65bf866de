"""Function modules: wasm reactors serving HTTP requests from the host's ingress.

A function has a pool of instances (each its own Store, so its own linear memory and
limits). Calls run in one of two places:

- **inline**, on the ingress's event-loop thread: the fast path, no thread hand-off. Each
  inline call gets a short CPU budget (an epoch deadline). A call that exceeds it is
  interrupted before it can hold up other functions; its instance is thrown away, the
  function is moved to worker threads, and the request is run again there from the start
  on a fresh instance (nothing the interrupted call did can have left its instance: the
  handler ABI gives it no way to).
- **on worker threads**, for functions that have shown they take longer. wasm runs
  without the GIL, so a slow or looping function does not stop the event loop; its
  requests queue (bounded: 503 past it) and each has a deadline (504, instance replaced).

A trap answers 500 and replaces the instance; the function stays usable.

Bounds a function cannot get past:

- at most ``pool_size`` instances exist at once, whoever calls (worker threads, in-process
  invocations, pub/sub deliveries, configuration notifications); callers beyond that wait
  for a free instance (at most ``queue_limit`` of them, each up to the function's timeout)
  or get 503;
- a call's deadline callback runs at least every :data:`CHECK_TICKS` ticks, so stopping a
  function interrupts its calls in flight within about 50 ms, and the function keeps the
  epoch ticker until its last call has ended;
- its log holds at most 500 lines of at most :data:`LOG_LINE_LIMIT` bytes each, however
  the guest writes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import wasmtime

from layotto.host.abi_host import (
    BUFFER_LIMIT,
    AbiContext,
)
from layotto.host.capi import Decision
from layotto.host.engine import TICK, WASI_MODULES, CompiledModule, WasmEngine, module_facts
from layotto.host.errors import ModuleError, describe_error
from layotto.host.fastcall import (
    Memory,
    OutOfBounds,
    RawStore,
)
from layotto.host.function_instances import (
    CHECK_TICKS,
    HANDLER_EXPORT,
    INLINE_BUDGET,
    INLINE_BUDGET_TICKS,
    BaseInstance,
    BudgetExceeded,
    DeadlineExceeded,
    HandlerError,
    Instance,
    Killed,
    ProxyInstance,
    Request,
    Response,
    encode_request,
)
from layotto.host.function_pool import Unavailable, WorkerPool, stopped_response
from layotto.host.function_stats import LATENCY_BUCKETS, LOG_LINE_LIMIT, FunctionLog, Stats

log = logging.getLogger(__name__)

__all__ = [
    "BACK_INLINE_AFTER",
    "CHECK_TICKS",
    "DEFAULT_MEMORY_LIMIT",
    "INLINE_BUDGET",
    "INLINE_BUDGET_TICKS",
    "LATENCY_BUCKETS",
    "LOG_LINE_LIMIT",
    "BudgetExceeded",
    "DeadlineExceeded",
    "Function",
    "FunctionLog",
    "HandlerError",
    "HostServices",
    "Killed",
    "Request",
    "Response",
    "Unavailable",
    "encode_request",
    "is_function_module",
]

DEFAULT_MEMORY_LIMIT = 128 << 20
BACK_INLINE_AFTER = 2000  # consecutive fast calls on threads before a function returns inline
FAST_CALL = 0.001

PROXY_EXPORTS = ("proxy_on_request_body", "proxy_on_request_headers")


def is_function_module(compiled: CompiledModule) -> bool:
    """A module serving HTTP: our handler entry point, or Layotto's proxy-wasm callbacks."""
    return HANDLER_EXPORT in compiled.exports or any(e in compiled.exports for e in PROXY_EXPORTS)


@dataclass
class HostServices:
    """What the Runtime ABI reaches: the components and the invoker."""

    components: Any = None
    invoker: Any = None


class Function:
    """A function module serving requests under an id."""

    def __init__(
        self,
        *,
        name: str,
        function_id: str,
        engine: WasmEngine,
        linker: wasmtime.Linker,
        compiled: CompiledModule,
        argv: list[str],
        env: list[tuple[str, str]],
        memory_limit: int | None,
        pool_size: int | None = None,
        fresh_instances: bool = False,
        timeout: float = 10.0,
        queue_limit: int = 1024,
        image: str = "",
        capabilities: frozenset[str] = frozenset(),
        app_id: str = "",
        services: HostServices | None = None,
        namespace: str = "default",
    ) -> None:
        self.name = name
        self.id = function_id
        self.namespace = namespace  # the Kubernetes/containerd namespace that owns the id
        self.capabilities = capabilities
        self.app_id = app_id or function_id
        self.services = services
        self.module_id = ""  # what a Layotto-style module names itself (proxy_get_id)
        self.engine = engine
        self.linker = linker
        self.compiled = compiled
        self.argv = argv
        self.env = env
        self.image = image
        self.memory_limit = memory_limit or DEFAULT_MEMORY_LIMIT
        self.pool_size = pool_size or os.cpu_count() or 1
        self.fresh = fresh_instances
        self.timeout = timeout
        self.queue_limit = queue_limit
        self.log = FunctionLog()
        self.stats = Stats()
        self.stopped = False
        self.threaded = False
        self.started_at = time.time()
        self._idle: list[BaseInstance] = []
        self._live = 0  # instances in existence: idle, on a call, or being made
        self._busy = 0  # instances on a call or being made for one (at most pool_size)
        self._waiting = 0  # callers waiting for an instance to come free
        self._lock = threading.Lock()
        self._free = threading.Condition(self._lock)
        self._ticker_held = False
        self._workers: WorkerPool | None = None
        self._fast_streak = 0
        facts = module_facts(compiled.module)
        try:
            self.pre = facts.instance_pre(linker, compiled.module)
        except wasmtime.WasmtimeError as exc:
            raise ModuleError(f"{name}: cannot link the function: {describe_error(exc)}") from exc
        self.needs_wasi = not facts.import_modules.isdisjoint(WASI_MODULES)
        self.uses_abi = facts.uses_abi
        self.proxy_style = HANDLER_EXPORT not in compiled.exports
        self.export_arity = facts.export_arity
        self.instance_class: type[BaseInstance] = ProxyInstance if self.proxy_style else Instance
        # Calls into the Runtime ABI block on components (SQLite, Redis, other functions):
        # such functions run on worker threads from the start, never on the event loop.
        self.threaded = self.uses_abi
        # Held from before the first instance (a Layotto-style module runs its start-up
        # code under a deadline) until the function is stopped and its last call has ended.
        engine.ticker.acquire()
        self._ticker_held = True
        try:
            self._idle.append(self._new_instance())  # fails Start on a broken module
        except BaseException:
            self._ticker_held = False
            engine.ticker.release()
            raise
        if not function_id and self.module_id:
            self.id = self.module_id

    # --- instances -------------------------------------------------------------------

    def wasi_config(self) -> wasmtime.WasiConfig | None:
        """A WASI context for one instance (None when the module imports no WASI)."""
        if not self.needs_wasi:
            return None
        wasi = wasmtime.WasiConfig()
        wasi.argv = self.argv
        wasi.env = self.env
        wasi.stdout_custom = self.log.writer("stdout")
        wasi.stderr_custom = self.log.writer("stderr")
        return wasi

    def new_store(self, on_deadline: Callable[[], Decision]) -> RawStore:
        """A Store with this function's limits and WASI context, and one instance in it."""
        return RawStore(
            self.engine.engine,
            self.pre,
            memory_limit=self.memory_limit,
            on_deadline=on_deadline,
            wasi=self.wasi_config(),
        )

    def abi_context(
        self, memory: Memory, allocate: Callable[[int], int], *, always: bool = False
    ) -> AbiContext | None:
        """The Runtime ABI's view of one instance (None when the module imports no ABI,
        unless ``always``: Layotto-style modules keep their request buffers there)."""
        if not self.uses_abi and not always:
            return None
        services = self.services
        return AbiContext(
            name=self.name,
            memory=memory,
            allocate=allocate,
            capabilities=self.capabilities,
            app_id=self.app_id,
            components=services.components if services else None,
            invoker=services.invoker if services else None,
            logger=self.log.add,
            namespace=self.namespace,
            # host memory the guest's buffers may take: never more than its own memory
            buffer_limit=min(BUFFER_LIMIT, self.memory_limit),
        )

    def _construct(self) -> BaseInstance:
        try:
            return self.instance_class(self)
        except ModuleError:
            raise
        except Exception as exc:
            raise ModuleError(f"{self.name}: cannot instantiate the function: {describe_error(exc)}") from exc

    def _new_instance(self) -> BaseInstance:
        """A new instance, counted as live (outside the pool's slots: start-up and tests)."""
        instance = self._construct()
        with self._lock:
            self._live += 1
        return instance

    def _take(self, wait: float | None = None, *, limit_waiters: bool = True) -> BaseInstance | None:
        """An instance for one call, holding one of the pool's ``pool_size`` slots until
        :meth:`_give_back`. With the pool full: None at once when ``wait`` is None (the
        inline path, which must not block), else wait up to ``wait`` seconds (among at most
        ``queue_limit`` waiters when ``limit_waiters``). Raises :class:`Unavailable` when
        the function is stopped, the waiters are too many or the wait ran out."""
        with self._lock:
            if self.stopped:
                raise Unavailable(stopped_response())
            if self._busy >= self.pool_size:
                if wait is None:
                    return None
                self._wait_for_slot(wait, limit_waiters)
            self._busy += 1
            if self._idle and not self.fresh:
                return self._idle.pop()
            self._live += 1  # counted while being made: the ticker stays until it is gone
        try:
            return self._construct()
        except BaseException:
            self._release_slot()
            raise

    def _wait_for_slot(self, wait: float, limit_waiters: bool) -> None:
        # Called with self._lock held.
        if limit_waiters and self._waiting >= self.queue_limit:
            raise Unavailable(Response(503, body=b"function busy: too many calls waiting for an instance\n"))
        deadline = time.monotonic() + wait
        self._waiting += 1
        try:
            while self._busy >= self.pool_size and not self.stopped:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Unavailable(
                        Response(503, body=b"function busy: no instance came free within its timeout\n")
                    )
                self._free.wait(left)
        finally:
            self._waiting -= 1
        if self.stopped:
            raise Unavailable(stopped_response())

    def _release_slot(self) -> None:
        """Give up the slot of an instance that could not be made."""
        with self._lock:
            self._busy -= 1
            self._live -= 1
            if self._waiting:
                self._free.notify()
            release = self._drop_ticker_locked()
        if release:
            self.engine.ticker.release()

    def _drop_ticker_locked(self) -> bool:
        """Whether to release the ticker now: stopped, and no instance left that could be
        running (called with self._lock held; the caller releases outside it)."""
        if self.stopped and self._live <= 0 and self._ticker_held:
            self._ticker_held = False
            return True
        return False

    def _give_back(self, instance: BaseInstance, healthy: bool) -> None:
        with self._lock:
            self._busy -= 1
            if self._waiting:
                self._free.notify()
            if healthy and not self.fresh and not self.stopped:
                self._idle.append(instance)
                return
            self._live -= 1
            if not healthy:
                self.stats.replaced += 1
            release = self._drop_ticker_locked()
        instance.close()
        if release:
            self.engine.ticker.release()

    @property
    def instances(self) -> int:
        return self._live

    def memory_bytes(self) -> int:
        with self._lock:
            idle = list(self._idle)
        total = 0
        for instance in idle:
            try:
                total += instance.memory.size()
            except Exception:
                pass
        return total

    # --- invocation --------------------------------------------------------------------

    def _run(self, instance: BaseInstance, request: Request, ticks: int, kind: str) -> Response:
        # Inline calls run on the event loop thread, which does nothing else meanwhile:
        # wall time is their CPU time (and perf_counter is far cheaper than thread_time).
        clock = time.perf_counter if kind == "inline" else time.thread_time
        cpu = clock()
        try:
            response = instance.call(request, ticks, kind)
        except BudgetExceeded:
            self._give_back(instance, healthy=False)
            raise
        except DeadlineExceeded:
            self._give_back(instance, healthy=False)
            self.log.add("host", f"request exceeded its {self.timeout:g}s deadline; instance replaced")
            return Response(504, body=b"function timed out\n")
        except Killed:
            self._give_back(instance, healthy=False)
            return Response(503, body=b"function stopped\n")
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            self._give_back(instance, healthy=False)
            message = describe_error(exc)
            self.log.add("host", f"trap: {message}; instance replaced")
            log.warning("function %s (%s): trap: %s", self.id, self.name, message)
            return Response(500, body=f"function trapped: {message}\n".encode())
        except (HandlerError, OutOfBounds, MemoryError) as exc:
            self._give_back(instance, healthy=False)
            self.log.add("host", f"bad response: {exc}; instance replaced")
            return Response(500, body=f"function failed: {exc}\n".encode())
        except BaseException:  # a host bug: the instance (and its slot) must not leak
            self._give_back(instance, healthy=False)
            raise
        finally:
            spent = clock() - cpu
            self.stats.cpu_seconds += spent
            if kind == "thread":
                self._fast_streak = self._fast_streak + 1 if spent < FAST_CALL else 0
        self._give_back(instance, healthy=True)
        return response

    def call_inline(self, request: Request) -> Response | None:
        """Serve a request on the calling (event loop) thread, or return None when the
        function runs on worker threads: then ``await call_threaded(request)``."""
        if self.stopped:
            return stopped_response()
        if self.threaded:
            return None
        started = time.perf_counter()
        try:
            instance = self._take()
            if instance is None:  # every instance is busy elsewhere: queue on the workers
                return None
            response = self._run(instance, request, INLINE_BUDGET_TICKS, "inline")
        except BudgetExceeded:
            self._go_threaded()
            return None
        except Unavailable as exc:
            response = exc.response
        except ModuleError as exc:
            response = Response(500, body=f"{exc}\n".encode())
        self.stats.observe(response.status, time.perf_counter() - started)
        return response

    async def call_threaded(self, request: Request) -> Response:
        started = time.perf_counter()
        response = await self._invoke_threaded(request)
        self.stats.observe(response.status, time.perf_counter() - started)
        if not self.uses_abi:
            # A function moved to threads by one slow call (or a busy machine) comes back
            # to the inline path once its calls have been consistently fast again.
            if self._fast_streak >= BACK_INLINE_AFTER:
                self._fast_streak = 0
                self.threaded = False
                self.log.add("host", f"{BACK_INLINE_AFTER} fast calls in a row: back to inline calls")
                log.info("function %s back to inline calls", self.id)
        return response

    def _go_threaded(self) -> None:
        if not self.threaded:
            self.threaded = True
            self.log.add(
                "host", f"a request ran past the inline budget; running on {self.pool_size} worker threads"
            )
            log.info("function %s moved to worker threads", self.id)

    async def _invoke_threaded(self, request: Request) -> Response:
        if self._workers is None:
            self._workers = WorkerPool(self, asyncio.get_running_loop())
        return await self._workers.submit(request, max(1, int(self.timeout / TICK)))

    def _threaded_call(self, request: Request, ticks: int, *, limit_waiters: bool = True) -> Response:
        try:
            instance = self._take(self.timeout, limit_waiters=limit_waiters)
        except Unavailable as exc:
            return exc.response
        except ModuleError as exc:
            return Response(500, body=f"{exc}\n".encode())
        assert instance is not None  # _take waits (or raises) when given a wait
        try:
            return self._run(instance, request, ticks, "thread")
        except BudgetExceeded:  # not expected on a thread; treat like a deadline
            return Response(504, body=b"function timed out\n")

    def call_sync(self, request: Request) -> Response:
        """Serve a request on the calling thread, with the request deadline (used by
        in-process invocation, pub/sub delivery and configuration notifications, which run
        off the event loop). Shares the function's ``pool_size`` instances with its worker
        threads: with all of them busy it waits up to the function's timeout for one (then
        the call has its own timeout), among at most ``queue_limit`` waiters; past either,
        503 "function busy"."""
        if self.stopped:
            return stopped_response()
        started = time.perf_counter()
        response = self._threaded_call(request, max(1, int(self.timeout / TICK)))
        self.stats.observe(response.status, time.perf_counter() - started)
        return response

    def stop(self) -> None:
        """Stop taking requests and interrupt the calls in flight (503): each notices at
        its next deadline check, within CHECK_TICKS ticks. The epoch ticker stays acquired
        until the last of them has ended, or nothing would ever interrupt them."""
        with self._lock:
            if self.stopped:
                return
            self.stopped = True
            self._live -= len(self._idle)
            idle, self._idle = self._idle, []
            self._free.notify_all()  # waiters answer 503 at once
            release = self._drop_ticker_locked()
        for instance in idle:
            instance.close()
        if release:
            self.engine.ticker.release()
        if self._workers is not None:
            self._workers.stop()

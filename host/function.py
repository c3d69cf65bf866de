"""Function modules: wasm reactors serving HTTP requests from the host's ingress.

A function has a pool of instances (each its own Store, so its own linear memory and
limits). Each call runs in one of two places, chosen per call from the function's measured
CPU cost per call (docs/scaling.md):

- **inline**, on the ingress's event-loop thread: no hand-off at all. Cheap calls
  (:data:`INLINE_CHEAP`) always run there; costly ones (:data:`INLINE_HEAVY`) never; the
  ones in between while the loop has CPU to spare. An inline call has a short CPU budget
  (an epoch deadline): past it, it is interrupted, its instance thrown away, and the
  request run again from the start on a worker (nothing the interrupted call did can have
  left its instance). The Runtime ABI runs inline too while it stays in process (embedded
  SQLite, in-process invoke, local pub/sub); a call about to wait on the network is
  stopped the same way before it has changed anything (host/scheduler.py).
- **on a worker** of the node's :class:`~layotto.host.scheduler.CallScheduler`, which
  runs the functions' queues on every core in proportion to their ``requests.cpu`` and
  enforces their ``limits.cpu``. wasm runs without the GIL, so a slow or looping function
  does not stop the event loop; its requests queue (bounded: 503 past it) and each has a
  deadline (504, instance replaced).

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
from time import perf_counter, thread_time
from typing import Any

import wasmtime

from layotto.host import scheduler
from layotto.host._handler import run_begin, run_end, runs_in_progress
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
    INLINE_GRACE,
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
from layotto.host.function_pool import InstancePool, Unavailable, stopped_response
from layotto.host.function_stats import LATENCY_BUCKETS, LOG_LINE_LIMIT, FunctionLog, Stats

log = logging.getLogger(__name__)

__all__ = [
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
# Where a call runs, by its function's measured CPU cost per call (a moving average):
INLINE_CHEAP = 50e-6  # this cheap: inline always (a hand-off to a worker costs about as much)
INLINE_HEAVY = 1e-3  # this costly: never inline (it would hold up every other request)
COST_WEIGHT = 0.1  # weight of the latest call in the average
DEADLINE_HEADER = b"layotto-deadline-ms"  # a remote caller's time left (host/remote_invoke.py)

PROXY_EXPORTS = ("proxy_on_request_body", "proxy_on_request_headers")


def _average(average: float, sample: float) -> float:
    """The moving average with ``sample`` added. A sample far above the average counts as
    twice the average (plus INLINE_CHEAP) only: a thread preempted once on a busy machine
    must not move a function off the loop. A function that really became costly raises it
    by steps, or passes the inline budget at once."""
    cap = 2 * average + INLINE_CHEAP
    if sample > cap:
        sample = cap
    return average + (sample - average) * COST_WEIGHT


def is_function_module(compiled: CompiledModule) -> bool:
    """A module serving HTTP: our handler entry point, or Layotto's proxy-wasm callbacks."""
    return HANDLER_EXPORT in compiled.exports or any(e in compiled.exports for e in PROXY_EXPORTS)


@dataclass
class HostServices:
    """What the Runtime ABI reaches: the components and the invoker."""

    components: Any = None
    invoker: Any = None


class Function(InstancePool):
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
        call_scheduler: scheduler.CallScheduler | None = None,
        cpu_shares: int | None = None,
        cpu_quota: float | None = None,
        cpu_period: float = 0.1,
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
        self.scheduler = call_scheduler or scheduler.default_scheduler()
        self.share = self.scheduler.share(
            name,
            shares=cpu_shares,
            slots=self.pool_size,
            queue_limit=queue_limit,
            quota=cpu_quota,
            period=cpu_period,
        )
        self.cost = 0.0  # CPU seconds per call, a moving average
        self._plain_call = scheduler.Call(inline=True)  # reused by call_inline (no ABI imports)
        self.wasm_cost = 0.0  # ... of which in wasm (not in the Runtime ABI's host functions)
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
        # Never inline: a CPU limit is enforced on workers (a throttled call waits there).
        self.threaded = self.share.quota is not None
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
        self,
        memory: Memory,
        allocate: Callable[[int], int],
        *,
        always: bool = False,
        raw: tuple[int, int, int] | None = None,
        owner: Any = None,
    ) -> AbiContext | None:
        """The Runtime ABI's view of one instance (None when the module imports no ABI,
        unless ``always``: Layotto-style modules keep their request buffers there);
        ``raw``: its store context, memory and allocator addresses (AbiContext.raw), and
        ``owner`` what holds that Store (a _handler.Instance or a RawStore)."""
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
            raw=raw,
            owner=owner,
        )

    # --- invocation --------------------------------------------------------------------

    @property
    def cpu_seconds(self) -> float:
        """CPU time of its calls so far, inline or on workers (a function it invoked is
        charged for its own part)."""
        return self.share.cpu_seconds

    @property
    def mode(self) -> str:
        """Where its next call would run: ``inline`` or ``workers`` (from any thread: the
        loop's load as last measured)."""
        return "inline" if self._inline_ok(measure=False) else "workers"

    def _inline_ok(self, *, measure: bool = True) -> bool:
        """Whether a call may run inline: costly calls never; calls with little time in
        wasm always; the ones in between while the event loop has CPU to spare (else a
        worker runs them on another core). A function with a CPU limit, or that has waited
        on the network, stays on workers."""
        if self.threaded or self.cost >= INLINE_HEAVY:
            return False
        # The host functions of the Runtime ABI run under the GIL wherever the call runs:
        # only its time in wasm would move to another core.
        if self.wasm_cost <= INLINE_CHEAP:
            return True
        return not (self.scheduler.loop_busy() if measure else self.scheduler.loop_was_busy)

    def _leave_inline(self, why: str) -> None:
        """For good: the function waits on the network (it would block the loop)."""
        if not self.threaded:
            self.threaded = True
            self.log.add("host", f"{why}: its calls run on worker threads from now on")
            log.info("function %s moved to worker threads: %s", self.id, why)

    def too_costly_inline(self) -> None:
        """A call ran past the inline budget: its next calls go to workers, until its
        measured cost has come down again (a busy machine can stretch any call once)."""
        self.cost = max(self.cost, INLINE_HEAVY)
        self.wasm_cost = max(self.wasm_cost, INLINE_HEAVY)

    def _run(self, instance: BaseInstance, request: Request, ticks: int, kind: str) -> Response:
        """One call on this thread, its CPU time charged to this function."""
        if not self.uses_abi and self.share.quota is None and not runs_in_progress():
            # Nothing can nest in it (no Runtime ABI), nor is it nested, nor does a CPU limit
            # charge it at checkpoints during the call (run_checkpoint): its time is its own,
            # all of it in wasm. The inline fast path. (The clocks: as _handler.run_begin's.)
            clock = perf_counter if kind == "inline" else thread_time
            began = clock()
            try:
                return self._serve(instance, request, ticks, kind, None)
            finally:
                spent = clock() - began
                self.share.charge(spent)
                self.cost = self.wasm_cost = _average(self.cost, spent)
        call = scheduler.current()
        run_begin(self.share, kind == "inline")  # metered in C: host/_handler.c
        try:
            return self._serve(instance, request, ticks, kind, call)
        finally:
            own, in_wasm = run_end()  # in wasm: what a worker would take off the loop
            self.cost = _average(self.cost, own)
            self.wasm_cost = _average(self.wasm_cost, in_wasm)

    def _serve(
        self, instance: BaseInstance, request: Request, ticks: int, kind: str, call: scheduler.Call | None
    ) -> Response:
        try:
            response = instance.call(request, ticks, kind)
        except BudgetExceeded:
            self._give_back(instance, healthy=False)
            raise
        except DeadlineExceeded:
            self._give_back(instance, healthy=False)
            if kind == "inline":
                self.too_costly_inline()
                grace = f"{INLINE_GRACE * 1000:g} ms"
                self.log.add("host", f"request stopped {grace} into an inline call; instance replaced")
            else:
                self.log.add("host", f"request exceeded its {self.timeout:g}s deadline; instance replaced")
            return Response(504, body=b"function timed out\n")
        except Killed:
            self._give_back(instance, healthy=False)
            return Response(503, body=b"function stopped\n")
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            self._give_back(instance, healthy=False)
            if call is not None and call.would_block:
                raise BudgetExceeded from None  # stopped before any effect: re-run on a worker
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
        self._give_back(instance, healthy=True)
        return response

    def call_inline(self, request: Request) -> Response | None:
        """Serve a request on the calling (event loop) thread, or return None when it is
        to run on a worker: then ``await call_threaded(request)``."""
        if self.stopped:
            return stopped_response()
        if not self._inline_ok():
            return None
        started = time.perf_counter()
        # A function without Runtime ABI imports changes nothing and nests nothing: its Call
        # (there for a WASI sleep, which must not wait on the loop) is reused.
        call = scheduler.Call(inline=True) if self.uses_abi else self._plain_call
        try:
            instance = self._take()
            if instance is None:  # every instance is busy elsewhere: queue for a worker
                return None
            scheduler.enter(call)
            try:
                response = self._run(instance, request, INLINE_BUDGET_TICKS, "inline")
            finally:
                scheduler.leave()
        except BudgetExceeded:
            if call.network:
                self._leave_inline("an inline call was about to wait on the network")
            else:
                self.too_costly_inline()
            call.would_block = call.network = False
            return None
        except Unavailable as exc:
            response = exc.response
        except ModuleError as exc:
            response = Response(500, body=f"{exc}\n".encode())
        if call.went_blocking:
            self._leave_inline("an inline call waited on the network")
        self.stats.observe(response.status, time.perf_counter() - started)
        return response

    async def call_threaded(self, request: Request) -> Response:
        """Serve a request on a worker, in this function's turn (its queue and share)."""
        started = time.perf_counter()
        future, deliver = self.scheduler.answers(asyncio.get_running_loop()).future()
        if self.share.submit(self._worker_job(request), deliver):
            response = await future
        else:
            response = self._refused()
        self.stats.observe(response.status, time.perf_counter() - started)
        return response

    def _refused(self) -> Response:
        if self.stopped:
            return stopped_response()
        return Response(503, body=b"function busy: request queue is full\n")

    def _worker_job(self, request: Request) -> Callable[[], Response]:
        ticks = max(1, int(self._time_limit(request) / TICK))

        def job() -> Response:
            if self.stopped:
                return stopped_response()
            with scheduler.running(scheduler.Call(inline=False)):
                # Admitted by the queue already: waits for an instance without a limit on
                # waiters (the scheduler runs at most pool_size of its calls), up to the timeout.
                return self._threaded_call(request, ticks, limit_waiters=False)

        return job

    def _time_limit(self, request: Request) -> float:
        """The call's time limit: the function's timeout, or less when the request carries
        a caller's deadline (``layotto-deadline-ms``, what a node host sends along with a
        call from another node): a caller that has given up gets no more of its time."""
        for name, value in request.headers:
            if name.lower() == DEADLINE_HEADER:
                try:
                    left = int(value) / 1000
                except ValueError:
                    break
                if left > 0:
                    return min(self.timeout, left)
                break
        return self.timeout

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
        """Serve a request for in-process callers: another function's invoke (run on the
        caller's thread, no hand-off; inline only while that stays cheap and cannot wait),
        pub/sub deliveries, configuration notifications and the gRPC API (queued in this
        function's turn like its HTTP requests, and waited for). Either way the call counts
        against the function's ``pool_size`` instances and its ``queue_limit``; past them,
        503 "function busy"."""
        if self.stopped:
            return stopped_response()
        started = time.perf_counter()
        call = scheduler.current()
        if call is not None:
            response = self._nested_call(request, call)
        else:
            response = self._scheduled_call(request)
        self.stats.observe(response.status, time.perf_counter() - started)
        return response

    def _nested_call(self, request: Request, call: scheduler.Call) -> Response:
        if not call.inline:  # on a worker: run here, with this function's own deadline
            return self._threaded_call(request, max(1, int(self.timeout / TICK)))
        # On the event loop, inside another function's inline call.
        wait = None if not call.effects else INLINE_GRACE
        try:
            instance = self._take(wait) if self._inline_ok() or call.effects else None
            if instance is None:  # not on the loop now: the whole call goes to a worker
                call.would_block = True
                raise scheduler.WouldBlock(f"{self.id} does not run inline now")
            return self._run(instance, request, INLINE_BUDGET_TICKS, "inline")
        except BudgetExceeded:  # past the budget, or stopped to run again on a worker
            if not call.would_block:
                self.too_costly_inline()
            call.would_block = True
            raise scheduler.WouldBlock(f"{self.id} cannot run inline now") from None
        except Unavailable as exc:
            return exc.response
        except ModuleError as exc:
            return Response(500, body=f"{exc}\n".encode())

    def _scheduled_call(self, request: Request) -> Response:
        done = threading.Event()
        box: list[Any] = []

        def deliver(result: Any) -> None:
            box.append(result)
            done.set()

        if not self.share.submit(self._worker_job(request), deliver):
            return self._refused()
        # The call has its own deadline on the worker; this bound only guards the host.
        if not done.wait(self.timeout * 2 + 5):
            return Response(504, body=b"function timed out waiting for a worker\n")
        result = box[0]
        if isinstance(result, BaseException):
            return Response(500, body=f"function failed: {result}\n".encode())
        return result

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
        for job in self.share.stop():
            job.deliver(stopped_response())

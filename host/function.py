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
import bisect
import collections
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import wasmtime

from layotto.abi.maps import encode_map
from layotto.host.abi_host import (
    BUFFER_CALL_DATA,
    BUFFER_LIMIT,
    BUFFER_REQUEST_BODY,
    BUFFER_RESPONSE_BODY,
    AbiContext,
    calling,
)
from layotto.host.capi import RESUME, Decision, Resume, Stop
from layotto.host.engine import TICK, WASI_MODULES, CompiledModule, WasmEngine, module_facts
from layotto.host.errors import ModuleError, describe_error
from layotto.host.fastcall import (
    EXTERN_FUNC,
    EXTERN_MEMORY,
    Func,
    HandlerStatus,
    HandlerStore,
    MalformedHeaders,
    Memory,
    MissingExport,
    OutOfBounds,
    RawStore,
    set_epoch_deadline,
)

log = logging.getLogger(__name__)

HANDLER_EXPORT = "layotto_http_handle"
DEFAULT_MEMORY_LIMIT = 128 << 20
INLINE_BUDGET_TICKS = 2  # first look after 5-10 ms ...
INLINE_BUDGET = 0.010  # ... an inline call may run 10 ms before its function moves to threads
BACK_INLINE_AFTER = 2000  # consecutive fast calls on threads before a function returns inline
FAST_CALL = 0.001
# A call's deadline callback runs at least every CHECK_TICKS ticks (50 ms), whatever its
# timeout: that is how soon a stopped function's calls in flight are interrupted.
CHECK_TICKS = 10
LOG_LINE_LIMIT = 16 << 10  # a longer line (or output without a newline) is cut into lines this long
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

_HEADER = struct.Struct("<5I")


PROXY_EXPORTS = ("proxy_on_request_body", "proxy_on_request_headers")


def is_function_module(compiled: CompiledModule) -> bool:
    """A module serving HTTP: our handler entry point, or Layotto's proxy-wasm callbacks."""
    return HANDLER_EXPORT in compiled.exports or any(e in compiled.exports for e in PROXY_EXPORTS)


@dataclass
class HostServices:
    """What the Runtime ABI reaches: the components and the invoker."""

    components: Any = None
    invoker: Any = None


@dataclass(slots=True)
class Request:
    method: bytes
    path: bytes
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(slots=True)
class Response:
    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""


class BudgetExceeded(Exception):
    """An inline call ran past its CPU budget (it will be re-run on a worker thread)."""


class DeadlineExceeded(Exception):
    """A call ran past its request deadline."""


class Killed(Exception):
    """The function was stopped while the call ran."""


_STOPPED: dict[Stop, type[Exception]] = {
    Stop.INLINE_BUDGET: BudgetExceeded,
    Stop.DEADLINE: DeadlineExceeded,
    Stop.KILLED: Killed,
}


class Unavailable(Exception):
    """No instance for this call: the function is stopped, or its pool is full and stays so."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.body.decode(errors="replace").strip())
        self.response = response


def _stopped() -> Response:
    return Response(503, body=b"function stopped\n")


def encode_request(req: Request) -> bytes:
    """The request as the handler ABI lays it out in linear memory (abi/http.md). The host's
    own calls lay it out in C (host/_handler.c); this is the reference the tests hold it to."""
    headers = encode_map(req.headers)
    return (
        _HEADER.pack(len(req.method), len(req.path), len(req.query), len(headers), len(req.body))
        + req.method
        + req.path
        + req.query
        + headers
        + req.body
    )


_STDOUT_STREAMS = frozenset({"stdout", "trace", "debug", "info", "warn"})


class FunctionLog:
    """The last lines a function wrote (stdout, stderr, traps), for `layotto logs`."""

    def __init__(self, limit: int = 500, line_limit: int = LOG_LINE_LIMIT) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=limit)
        self.line_limit = line_limit
        self._partial = {"stdout": b"", "stderr": b""}
        self._write_lock = threading.Lock()  # instances on several threads share a stream
        # The container's own stdout/stderr (containerd's fifos, so `kubectl logs` and
        # `ctr` see the function's output too); set by the Task service.
        self.sinks: dict[str, Callable[[bytes], None]] = {}

    def writer(self, stream: str) -> Callable[[bytes], None]:
        """A WASI output callback: complete lines go to the log; an unfinished line is kept
        until its newline, but never more than ``line_limit`` bytes of it (a longer one is
        logged in pieces of that size), so the host holds a bounded amount per stream."""

        def write(data: bytes) -> None:
            limit = self.line_limit
            with self._write_lock:
                pending = self._partial[stream]
                start, size = 0, len(data)
                while start < size:
                    newline = data.find(b"\n", start)
                    end = size if newline < 0 else newline
                    while len(pending) + (end - start) > limit:
                        take = limit - len(pending)
                        self.add(stream, (pending + data[start : start + take]).decode(errors="replace"))
                        pending, start = b"", start + take
                    if newline < 0:
                        pending += data[start:end]
                        break
                    self.add(stream, (pending + data[start:end]).decode(errors="replace"))
                    pending, start = b"", newline + 1
                self._partial[stream] = pending

        return write

    def add(self, stream: str, line: str) -> None:
        # Kept lines are cut at line_limit too (a layotto_log call may pass 64 KiB), so the
        # log holds at most limit × line_limit characters.
        kept = line if len(line) <= self.line_limit else line[: self.line_limit] + " [cut]"
        self.lines.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {stream} {kept}")
        if self.sinks:
            # The module's own output and its log calls go to stdout; what the host says
            # about it (traps, denied calls, deadlines) goes to stderr.
            sink = self.sinks.get("stdout" if stream in _STDOUT_STREAMS else "stderr")
            if sink is not None:
                sink(line.encode() + b"\n")


class BaseInstance:
    """What every kind of function instance shares: its Store, deadlines and budgets."""

    fn: Function
    raw: HandlerStore | RawStore
    ctx: int
    deadline_kind: str
    ticker: Any
    _deadline_at: int
    _started: float

    def _on_deadline(self) -> Decision:
        """Called on the calling thread when the store's epoch deadline passes: stop the
        call, or look again after some ticks. Budgets are checked against the clock, so an
        epoch bump from elsewhere (another module's kill, a ticker running late) never cuts
        a call short."""
        if self.fn.stopped:
            return Stop.KILLED
        elapsed = time.perf_counter() - self._started
        if self.deadline_kind == "inline":
            return Stop.INLINE_BUDGET if elapsed >= INLINE_BUDGET else RESUME
        left = self.fn.timeout - elapsed
        if left <= 0:
            return Stop.DEADLINE
        # Look again at the deadline, or sooner: a kill must not wait for the deadline.
        return Resume(min(CHECK_TICKS, int(left / TICK) + 1))

    def close(self) -> None:
        """Free the Store (its linear memory) now rather than at garbage collection."""
        self.raw.delete()

    def _arm(self, ticks: int, kind: str) -> None:
        self._started = time.perf_counter()
        self.raw.watch.stopped = None
        # Resetting the deadline is needed only once the ticker has moved on since the
        # last reset (it ticks far less often than requests arrive). The first look comes
        # after at most CHECK_TICKS ticks; the callback then decides (it reads the clock).
        now = self.ticker.ticks
        if now != self._deadline_at or kind != self.deadline_kind:
            self.deadline_kind = kind
            self._deadline_at = now
            set_epoch_deadline(self.ctx, ticks if ticks < CHECK_TICKS else CHECK_TICKS)

    def _classify(self) -> None:
        """After a call failed: raise what the host's deadline stopped it for, if it did."""
        stop = self.raw.watch.take_stop()
        if stop is not None:
            raise _STOPPED[stop]() from None

    def call(self, request: Request, ticks: int, kind: str) -> Response:
        raise NotImplementedError


class Instance(BaseInstance):
    """One instance of a function module written against our handler ABI (its own Store).

    Creating it and each call are one C call each (host/_handler.c, through
    :class:`HandlerStore`); the Python views of its memory and exports are made only when
    something asks for them (the Runtime ABI, diagnostics).
    """

    def __init__(self, fn: Function) -> None:
        self.fn = fn
        self.deadline_kind = "inline"
        self.ticker = fn.engine.ticker
        self._deadline_at = -1
        self._started = 0.0
        self.calls = 0
        self._memory: Memory | None = None
        self._alloc: Func | None = None
        try:
            self.raw = HandlerStore(
                fn.engine.engine,
                fn.pre,
                HANDLER_EXPORT,
                memory_limit=fn.memory_limit,
                on_deadline=self._on_deadline,
                wasi=fn.wasi_config(),
            )
        except MissingExport as exc:
            raise ModuleError(
                f"{fn.name}: a function module must export {HANDLER_EXPORT}, memory and "
                f"proxy_on_memory_allocate (or malloc); it lacks {exc}"
            ) from None
        except MemoryError as exc:
            raise ModuleError(f"{fn.name}: {exc}") from None
        self.ctx = self.raw.ctx
        self.out = self.raw.out
        self.abi = fn.abi_context(self.memory, self.alloc.call1) if fn.uses_abi else None

    @property
    def memory(self) -> Memory:
        if self._memory is None:
            self._memory = Memory(self.ctx, self.raw.mem_addr)
        return self._memory

    @property
    def alloc(self) -> Func:
        if self._alloc is None:
            self._alloc = Func(self.ctx, self.raw.alloc_addr, 1)
        return self._alloc

    def call(self, request: Request, ticks: int, kind: str) -> Response:
        """Run the handler on one request."""
        abi = self.abi
        if abi is None:
            return self._call(request, ticks, kind)
        with calling(abi):
            try:
                return self._call(request, ticks, kind)
            finally:
                if abi.buffers:  # what the guest left in Layotto's buffers lives one request
                    abi.buffers = {}

    def _call(self, request: Request, ticks: int, kind: str) -> Response:
        self.calls += 1
        self._arm(ticks, kind)  # the budget covers the allocation too
        try:
            code, headers, body = self.raw.call(
                request.method, request.path, request.query, request.headers, request.body
            )
        except (wasmtime.WasmtimeError, wasmtime.Trap):
            self._classify()
            raise
        except HandlerStatus as exc:
            raise HandlerError(str(exc)) from None
        except MalformedHeaders as exc:
            raise HandlerError(f"malformed response headers: {exc}") from None
        if code == 0:
            code = 200
        elif not 100 <= code <= 599:
            raise HandlerError(f"invalid HTTP status {code}")
        return Response(code, headers, body)


class ProxyInstance(BaseInstance):
    """An instance of a module written against Layotto's own ABI (proxy-wasm callbacks).

    Per request, as Layotto's HTTP filter does: ``proxy_on_context_create``, then
    ``proxy_on_request_headers`` and ``proxy_on_request_body`` (a request without a body
    gets its query string as the body), then ``proxy_on_done`` and ``proxy_on_delete``;
    the response is what the module appended to the response-body buffer. At start-up the
    module runs ``_start`` (or ``_initialize``), names itself through ``proxy_get_id``
    (call-data buffer 8) and gets its root context created.
    """

    CALLBACKS = (
        "proxy_on_context_create",
        "proxy_on_vm_start",
        "proxy_on_configure",
        "proxy_on_request_headers",
        "proxy_on_request_body",
        "proxy_on_done",
        "proxy_on_delete",
        "proxy_get_id",
    )
    ROOT = 1

    def __init__(self, fn: Function) -> None:
        self.fn = fn
        self.deadline_kind = "thread"
        self.ticker = fn.engine.ticker
        self._deadline_at = -1
        self._started = 0.0
        self.calls = 0
        self._next_context = self.ROOT + 1
        self.raw = fn.new_store(self._on_deadline)
        try:
            ctx = self.ctx = self.raw.ctx
            alloc = self.raw.export(b"proxy_on_memory_allocate", EXTERN_FUNC) or self.raw.export(
                b"malloc", EXTERN_FUNC
            )
            memory = self.raw.export(b"memory", EXTERN_MEMORY)
            if alloc is None or memory is None:
                raise ModuleError(f"{fn.name}: a Layotto function must export memory and malloc")
            self.alloc = Func(ctx, alloc, 1)
            self.memory = Memory(ctx, memory)
            abi = fn.abi_context(self.memory, self.alloc.call1, always=True)
            assert abi is not None  # always=True
            self.abi: AbiContext = abi
            arity = fn.export_arity
            self.callbacks: dict[str, tuple[Func, int]] = {}
            for name in self.CALLBACKS:
                addr = self.raw.export(name.encode(), EXTERN_FUNC)
                if addr is not None:
                    self.callbacks[name] = (Func(ctx, addr, max(arity.get(name, 0), 1)), arity.get(name, 0))
            with calling(self.abi):
                self._arm(max(1, int(fn.timeout / TICK)), "thread")
                for start in (b"_initialize", b"_start"):
                    addr = self.raw.export(start, EXTERN_FUNC)
                    if addr is not None:
                        try:
                            Func(ctx, addr, 0).call0()
                        except wasmtime.ExitTrap as exc:
                            if exc.code != 0:
                                raise ModuleError(
                                    f"{fn.name}: {start.decode()} exited with {exc.code}"
                                ) from exc
                        break
                self.abi.buffers = {}
                self._callback("proxy_get_id")
                module_id = (
                    bytes(self.abi.buffers.get(BUFFER_CALL_DATA, b"")).decode(errors="replace").strip()
                )
                if module_id and not fn.module_id:
                    fn.module_id = module_id
                self._callback("proxy_on_context_create", self.ROOT, 0)
                self._callback("proxy_on_vm_start", self.ROOT, 0)
                self._callback("proxy_on_configure", self.ROOT, 0)
                self.abi.buffers = {}
        except BaseException:
            self.raw.delete()
            raise

    def _callback(self, name: str, *args: int) -> None:
        found = self.callbacks.get(name)
        if found is not None:
            func, arity = found
            func.call(*args[:arity])

    def call(self, request: Request, ticks: int, kind: str) -> Response:
        with calling(self.abi):
            self.calls += 1
            self._arm(ticks, kind)
            context = self._next_context
            self._next_context += 1
            body = request.body or request.query
            self.abi.buffers = {BUFFER_REQUEST_BODY: bytearray(body), BUFFER_RESPONSE_BODY: bytearray()}
            try:
                self._callback("proxy_on_context_create", context, self.ROOT)
                self._callback("proxy_on_request_headers", context, len(request.headers), 0 if body else 1)
                if body:
                    self._callback("proxy_on_request_body", context, len(body), 1)
                self._callback("proxy_on_done", context)
                self._callback("proxy_on_delete", context)
                body_out = bytes(self.abi.buffers.get(BUFFER_RESPONSE_BODY, b""))
            except (wasmtime.WasmtimeError, wasmtime.Trap):
                self._classify()
                raise
            finally:
                self.abi.buffers = {}  # the buffers live one request, whatever happened
        return Response(200, [(b"content-type", b"text/plain; charset=utf-8")], body_out)


class WorkerPool:
    """The worker threads of one function (at most ``pool_size``), fed from a bounded queue.

    Cheaper than an executor per request: a worker takes requests until the queue is
    empty (no wake-up per request under load), and answers reach the event loop in
    batches (one ``call_soon_threadsafe`` per batch, not per request).
    """

    def __init__(self, fn: Function, loop: asyncio.AbstractEventLoop) -> None:
        self.fn = fn
        self.loop = loop
        self.queue: collections.deque[tuple[Request, int, asyncio.Future[Response]]] = collections.deque()
        self.cond = threading.Condition()
        self.threads: list[threading.Thread] = []
        self.idle = 0
        self.stopped = False
        self._done: list[tuple[asyncio.Future[Response], Response]] = []
        self._done_lock = threading.Lock()

    def submit(self, request: Request, ticks: int) -> asyncio.Future[Response]:
        future: asyncio.Future[Response] = self.loop.create_future()
        with self.cond:
            if self.stopped:
                future.set_result(Response(503, body=b"function stopped\n"))
                return future
            busy = len(self.threads) - self.idle
            if len(self.queue) >= self.fn.queue_limit and busy >= self.fn.pool_size:
                future.set_result(Response(503, body=b"function busy: request queue is full\n"))
                return future
            self.queue.append((request, ticks, future))
            if self.idle:
                self.cond.notify()
            elif len(self.threads) < self.fn.pool_size:
                thread = threading.Thread(
                    target=self._work, name=f"fn-{self.fn.id[:20]}-{len(self.threads)}", daemon=True
                )
                self.threads.append(thread)
                thread.start()
        return future

    def _work(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.stopped:
                    self.idle += 1
                    self.cond.wait()
                    self.idle -= 1
                if not self.queue:
                    return  # stopped and drained
                request, ticks, future = self.queue.popleft()
            if self.stopped:
                response = _stopped()
            else:
                # Admitted by the queue already: waits for an instance without a limit on
                # waiters (there are at most pool_size workers), up to the timeout.
                response = self.fn._threaded_call(request, ticks, limit_waiters=False)
            self._answer(future, response)

    def _answer(self, future: asyncio.Future[Response], response: Response) -> None:
        with self._done_lock:
            self._done.append((future, response))
            first = len(self._done) == 1
        if first:
            try:
                self.loop.call_soon_threadsafe(self._flush)
            except RuntimeError:  # the event loop is closed: the host is going away
                pass

    def _flush(self) -> None:
        with self._done_lock:
            done, self._done = self._done, []
        for future, response in done:
            if not future.done():
                future.set_result(response)

    def stop(self) -> None:
        """Answer what is queued with 503 and let the workers end (the function's stop
        interrupts their calls in flight)."""
        with self.cond:
            self.stopped = True
            queued = list(self.queue)
            self.queue.clear()
            self.cond.notify_all()
        for _request, _ticks, future in queued:
            self._answer(future, Response(503, body=b"function stopped\n"))


class HandlerError(Exception):
    """The handler reported failure or returned a malformed response."""


class Stats:
    """Counters of one function, read by `layotto ps` and the metrics endpoint."""

    def __init__(self) -> None:
        self.invocations = 0
        self.errors = 0
        self.codes: collections.Counter[int] = collections.Counter()
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.replaced = 0
        self.cpu_seconds = 0.0

    def observe(self, code: int, seconds: float) -> None:
        self.invocations += 1
        self.codes[code] += 1
        if code >= 500:
            self.errors += 1
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds


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
                raise Unavailable(_stopped())
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
            raise Unavailable(_stopped())

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
            return _stopped()
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
            return _stopped()
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

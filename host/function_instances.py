"""A function's instances: one Store each, serving one request at a time.

:class:`Instance` serves a module written against our handler ABI (one C call per
request, host/_handler.c); :class:`ProxyInstance` a module written against Layotto's
proxy-wasm callbacks. Each call runs under an epoch deadline its instance decides
(:meth:`BaseInstance._on_deadline`): an inline call's short CPU budget, a thread call's
request deadline, or the function's stop; the typed :class:`~layotto.host.capi.Stop`
it ended with becomes :class:`BudgetExceeded`, :class:`DeadlineExceeded` or
:class:`Killed`.
"""

from __future__ import annotations

import struct
import time
from typing import TYPE_CHECKING, Any

import wasmtime

from layotto.abi.maps import encode_map
from layotto.host import _handler, scheduler
from layotto.host.abi_host import (
    BUFFER_CALL_DATA,
    BUFFER_REQUEST_BODY,
    BUFFER_RESPONSE_BODY,
    AbiContext,
    calling,
)
from layotto.host.abi_linker import caller_stack
from layotto.host.capi import RESUME, Decision, Resume, Stop
from layotto.host.engine import TICK
from layotto.host.errors import ModuleError
from layotto.host.fastcall import (
    EXTERN_FUNC,
    EXTERN_MEMORY,
    HANDLER_OK,
    Func,
    HandlerStatus,
    HandlerStore,
    MalformedHeaders,
    Memory,
    MissingExport,
    RawStore,
    raise_result,
    set_epoch_deadline,
)
from layotto.host.messages import Request, Response

if TYPE_CHECKING:
    from layotto.host.function import Function

_handler_call = _handler.call

HANDLER_EXPORT = "layotto_http_handle"
INLINE_BUDGET_TICKS = 2  # first look after 5-10 ms ...
INLINE_BUDGET = 0.010  # ... an inline call may run 10 ms before it is re-run on a worker
INLINE_GRACE = 0.1  # ... or, once it changed something (no re-run), before it is stopped
# A call's deadline callback runs at least every CHECK_TICKS ticks (50 ms), whatever its
# timeout: that is how soon a stopped function's calls in flight are interrupted.
CHECK_TICKS = 10

_HEADER = struct.Struct("<5I")


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


class HandlerError(Exception):
    """The handler reported failure or returned a malformed response."""


class BaseInstance:
    """What every kind of function instance shares: its Store, deadlines and budgets."""

    fn: Function
    raw: HandlerStore | RawStore
    ctx: int
    deadline_kind: str
    ticker: Any
    _deadline_at: int
    _started: float
    _limit: float = 0.0

    def _on_deadline(self) -> Decision:
        """Called on the calling thread when the store's epoch deadline passes: stop the
        call, or look again after some ticks. Budgets are checked against the clock, so an
        epoch bump from elsewhere (another module's kill, a ticker running late) never cuts
        a call short."""
        fn = self.fn
        if fn.stopped:
            return Stop.KILLED
        elapsed = time.perf_counter() - self._started
        if self.deadline_kind == "inline":
            if elapsed < INLINE_BUDGET:
                return RESUME
            call = scheduler.current()
            if call is None or not call.effects:
                return Stop.INLINE_BUDGET  # re-run on a worker
            # It changed something already: a re-run would repeat it. It may finish here
            # within the grace, or it is stopped; its next calls go to workers.
            fn.too_costly_inline()
            # CPU, not wall time: a loop preempted on a busy machine is not using the grace.
            return Stop.DEADLINE if time.thread_time() - call.effects_cpu >= INLINE_GRACE else RESUME
        left = self._limit - elapsed
        if left <= 0:
            return Stop.DEADLINE
        if fn.share.quota is not None:  # limits.cpu: charge what it used, wait if over
            _handler.run_checkpoint()
            if not fn.share.throttle():
                return Stop.KILLED
            return Resume(1)
        # Look again at the deadline, or sooner: a kill must not wait for the deadline.
        return Resume(min(CHECK_TICKS, int(left / TICK) + 1))

    def close(self) -> None:
        """Free the Store (its linear memory) now rather than at garbage collection."""
        self.raw.delete()

    def _arm(self, ticks: int, kind: str) -> None:
        self._started = time.perf_counter()
        self._limit = ticks * TICK  # a thread call's deadline: the function's timeout, or less
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
        self.handle = self.raw.instance
        self.abi = (
            fn.abi_context(
                self.memory,
                self.alloc.call1,
                raw=(self.ctx, self.raw.mem_addr, self.raw.alloc_addr),
                owner=self.handle,
            )
            if fn.uses_abi
            else None
        )

    @property
    def memory(self) -> Memory:
        if self._memory is None:
            self._memory = Memory(self.ctx, self.raw.mem_addr, self.raw)
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
        abi.deadline = time.monotonic() + self.fn.timeout  # carried by calls to other nodes
        callers = caller_stack()  # (abi_linker.calling, inlined: this is every request's path)
        callers.append(abi)
        try:
            return self._call(request, ticks, kind)
        finally:
            callers.pop()
            if abi.buffers:  # what the guest left in Layotto's buffers lives one request
                abi.buffers = {}

    def _call(self, request: Request, ticks: int, kind: str) -> Response:
        self.calls += 1
        self._arm(ticks, kind)  # the budget covers the allocation too
        # One C call: the request in, the handler run, the response out (fastcall.HandlerStore).
        result = _handler_call(
            self.handle, request.method, request.path, request.query, request.headers, request.body
        )
        if result[0] != HANDLER_OK:
            try:
                raise_result(result)
            except (wasmtime.WasmtimeError, wasmtime.Trap):
                self._classify()
                raise
            except HandlerStatus as exc:
                raise HandlerError(str(exc)) from None
            except MalformedHeaders as exc:
                raise HandlerError(f"malformed response headers: {exc}") from None
        _, code, headers, body = result
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
            self.memory = Memory(ctx, memory, self.raw)
            abi = fn.abi_context(
                self.memory, self.alloc.call1, always=True, raw=(ctx, memory, alloc), owner=self.raw
            )
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
        self.abi.deadline = time.monotonic() + self.fn.timeout  # carried by calls to other nodes
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

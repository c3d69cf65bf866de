"""The handler ABI's hot path (host/_handler.c) against hand-written modules that break
each of its rules: every guest pointer and length is checked, every failure is a clear
500 and a replaced instance, and the function keeps serving afterwards."""

from __future__ import annotations

import pytest
import wasmtime

from layotto.host.errors import ModuleError
from layotto.host.function import Function, Request, encode_request
from layotto.host.runtime import NodeRuntime
from tests.support import make_function

# A bump allocator, and a handler whose body each case fills in. The handler's response
# goes at 512: status, headers length, body length (u32 each), then the body "ok".
MODULE = """
(module
  (memory (export "memory") 1)
  (global $bump (mut i32) (i32.const 4096))
  (func (export "{alloc_name}") (param $n i32) (result i32)
    {alloc})
  (func $respond (param $at i32) (param $status i32) (param $hlen i32) (param $op i32) (param $ol i32)
    (i32.store (local.get $at) (local.get $status))
    (i32.store offset=4 (local.get $at) (local.get $hlen))
    (i32.store offset=8 (local.get $at) (i32.const 2))
    (i32.store16 offset=12 (local.get $at) (i32.const 0x6b6f))
    (i32.store (local.get $op) (local.get $at))
    (i32.store (local.get $ol) (i32.const 14)))
  (func (export "layotto_http_handle") (param $req i32) (param $len i32) (param $op i32) (param $ol i32)
    (result i32)
    {handle})
)
"""
BUMP = """(global.get $bump)
    (global.set $bump (i32.add (global.get $bump) (i32.add (local.get $n) (i32.const 8))))"""


def respond(at: int, status: int, headers_len: int = 0) -> str:
    """Handler code: write a response at ``at`` and return 0."""
    args = f"(i32.const {at}) (i32.const {status}) (i32.const {headers_len})"
    return f"(call $respond {args} (local.get $op) (local.get $ol)) (i32.const 0)"


RESPOND_OK = respond(512, 0)


@pytest.fixture(scope="module")
def runtime() -> NodeRuntime:
    return NodeRuntime(None)


def function(
    runtime: NodeRuntime,
    *,
    handle: str = RESPOND_OK,
    alloc: str = BUMP,
    alloc_name: str = "proxy_on_memory_allocate",
    fresh: bool = False,
) -> Function:
    wasm = wasmtime.wat2wasm(
        MODULE.replace("{alloc}", alloc).replace("{handle}", handle).replace("{alloc_name}", alloc_name)
    )
    return make_function(runtime, bytes(wasm), "handler", fresh_instances=fresh)


def call(fn: Function, body: bytes = b"") -> tuple[int, bytes]:
    response = fn.call_inline(Request(b"POST", b"/", b"", [(b"x-test", b"1")], body))
    assert response is not None
    return response.status, response.body


@pytest.mark.parametrize("fresh", [False, True])
def test_a_good_response_and_its_status_default(runtime: NodeRuntime, fresh: bool) -> None:
    fn = function(runtime, fresh=fresh)
    try:
        for _ in range(3):
            assert call(fn, b"x" * 1000) == (200, b"ok")
        assert fn.stats.replaced == 0
    finally:
        fn.stop()


@pytest.mark.parametrize(
    ("name", "handle", "alloc", "expected"),
    [
        (
            "nonzero handler status",
            "(i32.const 3)",
            BUMP,
            b"handler returned status 3",
        ),
        (
            "status out of HTTP range",
            respond(512, 700),
            BUMP,
            b"invalid HTTP status 700",
        ),
        (
            "lengths past the response",
            respond(512, 200, headers_len=100),
            BUMP,
            b"response lengths exceed the response buffer",
        ),
        (
            "response outside memory",
            "(i32.store (local.get $op) (i32.const 65530)) (i32.store (local.get $ol) (i32.const 14))"
            " (i32.const 0)",
            BUMP,
            b"outside linear memory",
        ),
        (
            "response shorter than its header",
            "(i32.store (local.get $op) (i32.const 512)) (i32.store (local.get $ol) (i32.const 11))"
            " (i32.const 0)",
            BUMP,
            b"shorter than its 12-byte header",
        ),
        (
            "request buffer outside memory",
            RESPOND_OK,
            # the first allocation (the 8-byte response slot) is fine, the request's is not
            "(if (result i32) (i32.eq (local.get $n) (i32.const 8)) (then (i32.const 64))"
            " (else (i32.const 0xfffffff0)))",
            b"outside linear memory",
        ),
        (
            "allocator out of memory",
            RESPOND_OK,
            "(if (result i32) (i32.eq (local.get $n) (i32.const 8))"
            " (then (i32.const 64)) (else (i32.const 0)))",
            b"out of memory",
        ),
        (
            "a malformed headers map",
            "(i32.store (i32.const 512) (i32.const 200)) (i32.store (i32.const 516) (i32.const 4))"
            " (i32.store (i32.const 520) (i32.const 0)) (i32.store (i32.const 524) (i32.const 5))"
            " (i32.store (local.get $op) (i32.const 512)) (i32.store (local.get $ol) (i32.const 16))"
            " (i32.const 0)",
            BUMP,
            b"malformed response headers: map count exceeds its size",
        ),
        (
            "a trap",
            "(unreachable)",
            BUMP,
            b"function trapped",
        ),
    ],
)
def test_each_broken_rule_is_a_clear_500_and_the_function_keeps_serving(
    runtime: NodeRuntime, name: str, handle: str, alloc: str, expected: bytes
) -> None:
    fn = function(runtime, handle=handle, alloc=alloc)
    try:
        for round_ in range(3):  # the instance is replaced each time; the next one fails alike
            status, body = call(fn)
            assert status == 500, (name, status, body)
            assert expected in body, (name, body)
            assert fn.stats.replaced == round_ + 1
    finally:
        fn.stop()


def test_a_handler_that_grows_its_memory_is_read_from_the_grown_memory(runtime: NodeRuntime) -> None:
    # Respond from the second page, which exists only after memory.grow: the host must read
    # the memory's new size (and base) after the call, not what it saw before.
    handle = f"(drop (memory.grow (i32.const 1))) {respond(70000, 201)}"
    fn = function(runtime, handle=handle)
    try:
        assert call(fn) == (201, b"ok")
    finally:
        fn.stop()


def test_a_module_without_an_allocator_fails_to_start_naming_it(runtime: NodeRuntime) -> None:
    with pytest.raises(ModuleError, match=r"lacks proxy_on_memory_allocate \(or malloc\)"):
        function(runtime, alloc_name="my_alloc")


def test_malloc_serves_as_the_allocator(runtime: NodeRuntime) -> None:
    fn = function(runtime, alloc_name="malloc")
    try:
        assert call(fn) == (200, b"ok")
    finally:
        fn.stop()


def test_response_headers_and_request_parts_cross_the_boundary_intact(runtime: NodeRuntime) -> None:
    # The handler answers with one header, ("abc", "de"), and echoes the request it was
    # given (as the host laid it out) as the body.
    handle = (
        "(i32.store (i32.const 600) (i32.const 0)) (i32.store (i32.const 604) (i32.const 19))"
        " (i32.store (i32.const 608) (local.get $len))"
        " (i32.store (i32.const 612) (i32.const 1)) (i32.store (i32.const 616) (i32.const 3))"
        " (i32.store (i32.const 620) (i32.const 2)) (i32.store (i32.const 624) (i32.const 0x00636261))"
        " (i32.store (i32.const 628) (i32.const 0x00006564))"
        " (memory.copy (i32.const 631) (local.get $req) (local.get $len))"
        " (i32.store (local.get $op) (i32.const 600))"
        " (i32.store (local.get $ol) (i32.add (i32.const 31) (local.get $len)))"
        " (i32.const 0)"
    )
    fn = function(runtime, handle=handle)
    try:
        request = Request(b"PUT", b"/p", b"q=1", [(b"a", b"bc"), (b"x-long", b"v" * 300)], b"body!")
        response = fn.call_inline(request)
        assert response is not None and response.status == 200, response
        assert response.headers == [(b"abc", b"de")]
        assert response.body == encode_request(request)
    finally:
        fn.stop()


def test_an_instance_dropped_without_close_frees_its_store(runtime: NodeRuntime) -> None:
    from layotto.host import _handler

    fn = function(runtime)
    try:
        before = _handler.live()
        for _ in range(200):
            instance = fn._new_instance()
            assert _handler.live() == before + 1
            del instance  # never closed: the store goes with its last reference
        assert _handler.live() == before
    finally:
        fn.stop()


def test_an_instance_deleted_twice_is_freed_once(runtime: NodeRuntime) -> None:
    from layotto.host import _handler

    fn = function(runtime)
    try:
        before = _handler.live()
        instance = fn._new_instance()
        handle = instance.raw.instance
        assert isinstance(handle, _handler.Instance) and handle.alive
        assert _handler.live() == before + 1
        instance.close()
        instance.close()  # a second delete does nothing
        handle.delete()
        assert not handle.alive and _handler.live() == before
        with pytest.raises(ValueError, match="deleted"):
            _handler.call(handle, b"GET", b"/", b"", [], b"")
        with pytest.raises(ValueError, match="deleted"):
            handle.addresses()
        with pytest.raises(TypeError):  # an address is no instance
            _handler.call(id(handle), b"GET", b"/", b"", [], b"")
        with pytest.raises(TypeError):  # and only instantiate makes one
            _handler.Instance()
        assert call(fn) == (200, b"ok")  # the function's own instances are untouched
    finally:
        fn.stop()


LOOP = "(loop $spin (br $spin)) (i32.const 0)"


def test_a_stop_at_a_deadline_is_a_typed_value(runtime: NodeRuntime) -> None:
    from layotto.host.capi import Resume, Stop
    from layotto.host.fastcall import EXTERN_FUNC, Func, RawStore, set_epoch_deadline

    fn = function(runtime, handle=LOOP)  # holds the epoch ticker while it lives
    looks: list[int] = []

    def decide() -> Resume | Stop:
        looks.append(1)
        return Stop.DEADLINE if len(looks) >= 3 else Resume(1)

    try:
        store = RawStore(runtime.engine.engine, fn.pre, memory_limit=1 << 20, on_deadline=decide)
        handle = store.export(b"layotto_http_handle", EXTERN_FUNC)
        assert handle is not None and store.ctx is not None
        set_epoch_deadline(store.ctx, 1)
        with pytest.raises((wasmtime.WasmtimeError, wasmtime.Trap)):
            Func(store.ctx, handle, 4).call(0, 0, 0, 0)
        assert len(looks) == 3  # resumed twice, then stopped
        assert store.watch.take_stop() is Stop.DEADLINE
        assert store.watch.take_stop() is None  # read once
        store.delete()
        store.delete()
    finally:
        fn.stop()


def test_an_inline_call_past_its_budget_is_told_apart_by_type(runtime: NodeRuntime) -> None:
    from layotto.host.function import INLINE_BUDGET_TICKS, BudgetExceeded

    fn = function(runtime, handle=LOOP)
    try:
        instance = fn._new_instance()
        with pytest.raises(BudgetExceeded):
            instance.call(Request(b"GET", b"/", b"", [], b""), INLINE_BUDGET_TICKS, "inline")
        assert instance.raw.watch.stopped is None  # taken by the classification
        instance.close()
        fn.timeout = 0.05
        response = fn.call_sync(Request(b"GET", b"/", b"", [], b""))
        assert response.status == 504  # the request deadline: a Stop.DEADLINE, not a trap
    finally:
        fn.stop()

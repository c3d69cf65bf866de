"""A function cannot get past its limits (issue 9), in process against real modules:

- stopping a function interrupts its calls in flight promptly, whatever their timeout,
  even when nothing else keeps the engine's epoch ticker running;
- what a guest makes the host hold is bounded: Layotto's proxy buffers (only the buffer
  types the host serves, a cap per instance, emptied after every request, for handler-ABI
  and Layotto-style instances alike) and its output without a newline;
- every caller (in-process invokes, deliveries, worker threads) shares the function's
  ``pool_size`` instances; callers beyond them wait, up to ``queue_limit`` of them and up
  to the function's timeout, else get 503.

No fixed sleeps: each test waits for a condition, with a deadline.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import wasmtime

from layotto.host.abi_host import BUFFER_LIMIT, MAX_VALUE, S
from layotto.host.function import LOG_LINE_LIMIT, Function, FunctionLog, Request
from layotto.host.runtime import NodeRuntime
from layotto.host.scheduler import CallScheduler
from tests.support import make_function, wait_for

MIB = 1 << 20
CAPABILITIES = frozenset({"log", "time", "random"})


@pytest.fixture(scope="module")
def runtime() -> NodeRuntime:
    return NodeRuntime(None)


@pytest.fixture
def own_runtime() -> NodeRuntime:
    """A runtime (engine, epoch ticker) no other function uses."""
    return NodeRuntime(None)


def make(runtime: NodeRuntime, wasm: bytes, name: str, **options: object) -> Function:
    return make_function(runtime, wasm, name, capabilities=CAPABILITIES, **options)


def misbehave(runtime: NodeRuntime, wasm_dir: Path, **options: object) -> Function:
    return make(runtime, (wasm_dir / "fn_misbehave.wasm").read_bytes(), "fn_misbehave", **options)


def get(path: bytes, query: bytes = b"") -> Request:
    return Request(b"GET", path, query, [], b"")


def post(body: bytes) -> Request:
    return Request(b"POST", b"/", b"", [], body)


def rss() -> int:
    return psutil.Process().memory_info().rss


class Caller(threading.Thread):
    """One call on a thread of its own, remembering the response and when it came."""

    def __init__(self, call: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.call = call
        self.response: object = None
        self.ended = 0.0

    def run(self) -> None:
        self.response = self.call()
        self.ended = time.perf_counter()


def thread_cpu(thread: threading.Thread) -> float:
    """A thread's CPU time so far (psutil, by its native id)."""
    for t in psutil.Process().threads():
        if t.id == thread.native_id:
            return t.user_time + t.system_time
    return 0.0


@pytest.fixture
def cleanup() -> Iterator[list[Function]]:
    functions: list[Function] = []
    yield functions
    for fn in functions:
        fn.stop()


# --------------------------------------------------------------------------- stop kills


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fn-worker-")]


def _call_on_a_worker_thread(fn: Function, request: Request) -> object:
    fn.threaded = True
    return asyncio.run(fn.call_threaded(request))


@pytest.mark.parametrize("path", ["call_sync", "worker"])
def test_stop_interrupts_a_looping_call_promptly_though_its_timeout_is_30s(
    own_runtime: NodeRuntime, wasm_dir: Path, path: str
) -> None:
    """The function is the ticker's only user: stopping it used to release the ticker, so
    the epoch never moved again and the loop burned a core until the process ended."""
    fn = misbehave(own_runtime, wasm_dir, timeout=30.0)
    ticker = own_runtime.engine.ticker
    assert ticker._users == 1  # nobody else keeps the epoch moving
    request = get(b"/loop")
    if path == "call_sync":
        caller = Caller(lambda: fn.call_sync(request))
    else:
        caller = Caller(lambda: _call_on_a_worker_thread(fn, request))
    before = {t.native_id: thread_cpu(t) for t in _workers()}
    caller.start()
    wait_for(lambda: fn._busy == 1, what="the call started")
    # either way the wasm runs on one of the scheduler's workers
    wait_for(
        lambda: any(thread_cpu(t) - before.get(t.native_id, 0.0) > 0.1 for t in _workers()),
        what="the loop is burning CPU on a worker",
    )
    stopped = time.perf_counter()
    fn.stop()
    caller.join(timeout=5)
    assert not caller.is_alive(), "the looping call was not interrupted"
    wait_for(lambda: fn.scheduler.stats()["running"] == 0, timeout=2, what="the worker let go")
    took = caller.ended - stopped
    assert took < 0.3, f"the call ended {took * 1000:.0f} ms after stop()"
    assert caller.response.status == 503
    assert b"stopped" in caller.response.body
    # its thread burns nothing any more (it has ended), and the ticker is let go
    wait_for(lambda: ticker._users == 0, timeout=2, what="the ticker released")
    assert fn.instances == 0 and fn._busy == 0


def test_the_ticker_stays_until_the_last_call_of_a_stopped_function_ends(
    own_runtime: NodeRuntime, wasm_dir: Path
) -> None:
    fn = misbehave(own_runtime, wasm_dir, timeout=30.0, pool_size=2)
    ticker = own_runtime.engine.ticker
    held = fn._take(0)  # a call in flight, as far as the pool knows
    assert held is not None
    fn.stop()
    assert ticker._users == 1 and fn.instances == 1  # kept for the call still running
    fn._give_back(held, healthy=True)  # the call ends
    assert ticker._users == 0 and fn.instances == 0


def test_a_stopped_function_takes_no_new_call(runtime: NodeRuntime, wasm_dir: Path) -> None:
    fn = misbehave(runtime, wasm_dir)
    fn.stop()
    assert fn.call_sync(get(b"/count")).status == 503
    assert fn.call_inline(get(b"/count")).status == 503
    assert fn.instances == 0


def test_the_deadline_still_holds_with_frequent_checks(
    runtime: NodeRuntime, wasm_dir: Path, cleanup: list[Function]
) -> None:
    fn = misbehave(runtime, wasm_dir, timeout=0.3)
    cleanup.append(fn)
    started = time.perf_counter()
    response = fn.call_sync(get(b"/loop"))
    took = time.perf_counter() - started
    assert response.status == 504
    assert 0.3 <= took < 1.0, took
    # and a call shorter than the timeout (several checks long) is not cut short
    assert fn.call_sync(get(b"/sleep", b"ms=150")).status == 200


# --------------------------------------------------------------------------- proxy buffers

# A Layotto-style module (proxy-wasm callbacks). Its request body is a list of commands,
# three u32 each: (buffer type, bytes per write, writes). For each it calls
# proxy_set_buffer_bytes that many times, appending that many bytes from 1 MiB into its
# memory, and answers 8 bytes per command: the writes that succeeded, and the status of
# the last one that did not (0: none failed). Its response is written first and filled in
# place at the end, so that a full set of buffers cannot crowd it out.
PROXY_MODULE = """
(module
  (import "env" "proxy_get_buffer_bytes" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_buffer_bytes" (func $set (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 96)
  (global $bump (mut i32) (i32.const 65536))
  (func (export "malloc") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $bump))
    (global.set $bump (i32.add (global.get $bump)
      (i32.and (i32.add (local.get $n) (i32.const 15)) (i32.const -16))))
    (local.get $p))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_request_body") (param $ctx i32) (param $size i32) (param $eos i32)
    (result i32)
    (local $body i32) (local $len i32) (local $i i32) (local $o i32) (local $k i32)
    (local $ok i32) (local $last i32) (local $status i32) (local $cmd i32) (local $n i32)
    (global.set $bump (i32.const 65536))
    (drop (call $get (i32.const 0) (i32.const 0) (local.get $size) (i32.const 16) (i32.const 20)))
    (local.set $body (i32.load (i32.const 16)))
    (local.set $len (i32.load (i32.const 20)))
    (local.set $n (i32.mul (i32.div_u (local.get $len) (i32.const 12)) (i32.const 8)))
    (drop (call $set (i32.const 1) (i32.const 0) (i32.const 0) (i32.const 4096) (local.get $n)))
    (local.set $o (i32.const 4096))
    (block $done (loop $cmds
      (br_if $done (i32.gt_u (i32.add (local.get $i) (i32.const 12)) (local.get $len)))
      (local.set $cmd (i32.add (local.get $body) (local.get $i)))
      (local.set $ok (i32.const 0)) (local.set $last (i32.const 0)) (local.set $k (i32.const 0))
      (block $written (loop $writes
        (br_if $written (i32.ge_u (local.get $k) (i32.load offset=8 (local.get $cmd))))
        (local.set $status (call $set (i32.load (local.get $cmd)) (i32.const 0x7fffffff)
          (i32.const 0) (i32.const 0x100000) (i32.load offset=4 (local.get $cmd))))
        (if (i32.eqz (local.get $status))
          (then (local.set $ok (i32.add (local.get $ok) (i32.const 1))))
          (else (local.set $last (local.get $status))))
        (local.set $k (i32.add (local.get $k) (i32.const 1)))
        (br $writes)))
      (i32.store (local.get $o) (local.get $ok))
      (i32.store offset=4 (local.get $o) (local.get $last))
      (local.set $o (i32.add (local.get $o) (i32.const 8)))
      (local.set $i (i32.add (local.get $i) (i32.const 12)))
      (br $cmds)))
    (drop (call $set (i32.const 1) (i32.const 0) (local.get $n) (i32.const 4096) (local.get $n)))
    (i32.const 0))
)
"""


def commands(*cmds: tuple[int, int, int]) -> bytes:
    return b"".join(struct.pack("<III", t & 0xFFFFFFFF, size, count) for t, size, count in cmds)


def results(body: bytes, count: int) -> list[tuple[int, int]]:
    return [struct.unpack_from("<II", body, 8 * i) for i in range(count)]


@pytest.fixture(scope="module")
def proxy_wasm() -> bytes:
    return bytes(wasmtime.wat2wasm(PROXY_MODULE))


def test_undefined_buffer_types_are_bad_arguments(
    runtime: NodeRuntime, proxy_wasm: bytes, cleanup: list[Function]
) -> None:
    fn = make(runtime, proxy_wasm, "proxy-buffers")
    cleanup.append(fn)
    assert fn.proxy_style
    cmds = [(2, 16, 1), (3, 16, 1), (7, 16, 1), (9, 16, 1), (0x10000, 16, 1), (-1, 16, 1), (8, 16, 1)]
    response = fn.call_sync(post(commands(*cmds)))
    assert response.status == 200, response
    bad = S["BAD_ARGUMENT"]
    assert results(response.body, len(cmds)) == [(0, bad)] * 6 + [(1, 0)]


def test_the_buffers_of_an_instance_are_capped_in_all(
    runtime: NodeRuntime, proxy_wasm: bytes, cleanup: list[Function]
) -> None:
    fn = make(runtime, proxy_wasm, "proxy-buffers")
    cleanup.append(fn)
    assert BUFFER_LIMIT == 2 * MAX_VALUE == 8 * MIB
    limit = S["LIMIT_EXCEEDED"]
    # one buffer: at most MAX_VALUE
    response = fn.call_sync(post(commands((8, MIB, 5))))
    assert results(response.body, 1) == [(4, limit)]
    # each buffer under MAX_VALUE, but together past the instance's cap
    cmds = [(8, MIB, 4), (0, MIB, 3), (1, MIB, 3)]
    response = fn.call_sync(post(commands(*cmds)))
    assert results(response.body, 3) == [(4, 0), (3, 0), (0, limit)]
    # emptied after the request: the next one starts from nothing
    assert all(not instance.abi.buffers for instance in fn._idle)
    response = fn.call_sync(post(commands((8, MIB, 4))))
    assert results(response.body, 1) == [(4, 0)]


def test_a_function_with_little_memory_gets_a_smaller_cap(
    runtime: NodeRuntime, proxy_wasm: bytes, cleanup: list[Function]
) -> None:
    compiled = runtime.engine.load(proxy_wasm, name="proxy-buffers")
    fn = Function(
        name="test/proxy-small",
        function_id="proxy-small",
        engine=runtime.engine,
        linker=runtime.linker,
        compiled=compiled,
        argv=[],
        env=[],
        memory_limit=7 * MIB,  # the module's memory is 6 MiB
        capabilities=CAPABILITIES,
    )
    cleanup.append(fn)
    response = fn.call_sync(post(commands((8, MIB, 3), (0, MIB, 4))))
    assert results(response.body, 2) == [(3, 0), (3, S["LIMIT_EXCEEDED"])]


def test_host_memory_stays_flat_under_a_proxy_buffer_flood(
    runtime: NodeRuntime, proxy_wasm: bytes, cleanup: list[Function]
) -> None:
    """Every call tries to leave 4 MiB in each of 38 buffer types (the host used to keep a
    buffer for every type the guest named, 152 MiB for this request)."""
    fn = make(runtime, proxy_wasm, "proxy-buffers", pool_size=2)
    cleanup.append(fn)
    types = [*range(2, 8), *range(9, 40), 8]
    request = post(commands(*[(t, 4 * MIB, 1) for t in types]))
    for _ in range(5):  # warm up: the host's own buffers and allocator settle
        assert fn.call_sync(request).status == 200
    before = rss()
    peak = [before]
    done = threading.Event()

    def sample() -> None:  # the peak counts too, not only what is left at the end
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for _ in range(200):
            response = fn.call_sync(request)
            assert results(response.body, len(types))[-1] == (1, 0)
            assert results(response.body, 1) == [(0, S["BAD_ARGUMENT"])]
    finally:
        done.set()
        sampler.join()
    grown = max(peak[0], rss()) - before
    assert grown < 48 * MIB, f"host RSS grew by up to {grown / MIB:.0f} MiB over 200 calls"
    assert all(not instance.abi.buffers for instance in fn._idle)


# A handler-ABI module that also imports Layotto's buffer calls: each request writes 4 MiB
# into the call-data buffer and 4 MiB into a buffer type of its own (1000 + n for the nth
# request), and answers both statuses. Its buffers used to live as long as the instance.
HANDLER_MODULE = """
(module
  (import "env" "proxy_set_buffer_bytes" (func $set (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 96)
  (global $bump (mut i32) (i32.const 65536))
  (global $n (mut i32) (i32.const 0))
  (func (export "malloc") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $bump))
    (global.set $bump (i32.add (global.get $bump)
      (i32.and (i32.add (local.get $n) (i32.const 15)) (i32.const -16))))
    (if (i32.gt_u (global.get $bump) (i32.const 0xf0000)) (then (global.set $bump (i32.const 65536))))
    (local.get $p))
  (func (export "layotto_http_handle") (param $req i32) (param $len i32) (param $op i32) (param $ol i32)
    (result i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (i32.store (i32.const 512) (i32.const 200))
    (i32.store (i32.const 516) (i32.const 0))
    (i32.store (i32.const 520) (i32.const 8))
    (i32.store (i32.const 524)
      (call $set (i32.const 8) (i32.const 0x7fffffff) (i32.const 0)
        (i32.const 0x100000) (i32.const 0x400000)))
    (i32.store (i32.const 528)
      (call $set (i32.add (i32.const 1000) (global.get $n)) (i32.const 0) (i32.const 0)
        (i32.const 0x100000) (i32.const 0x400000)))
    (i32.store (local.get $op) (i32.const 512))
    (i32.store (local.get $ol) (i32.const 20))
    (i32.const 0))
)
"""


def test_a_handler_abi_instance_lets_go_of_its_buffers_after_each_request(
    runtime: NodeRuntime, cleanup: list[Function]
) -> None:
    fn = make(runtime, bytes(wasmtime.wat2wasm(HANDLER_MODULE)), "handler-buffers", pool_size=1)
    cleanup.append(fn)
    assert not fn.proxy_style and fn.uses_abi
    for _ in range(5):
        assert fn.call_sync(post(b"")).status == 200
    before = rss()
    for _ in range(200):
        response = fn.call_sync(post(b""))
        assert response.status == 200, response
        assert struct.unpack("<II", response.body) == (S["OK"], S["BAD_ARGUMENT"])
        (instance,) = fn._idle
        assert instance.abi.buffers == {}
    grown = rss() - before
    assert grown < 48 * MIB, f"host RSS grew by {grown / MIB:.0f} MiB over 200 calls"


# --------------------------------------------------------------------------- output

# A handler-ABI module that writes 50 MiB of "x" to stdout, 1 MiB per fd_write, without
# a newline, then answers 200.
NOISY_MODULE = """
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 34)
  (func (export "malloc") (param $n i32) (result i32) (i32.const 65536))
  (func (export "layotto_http_handle") (param $req i32) (param $len i32) (param $op i32) (param $ol i32)
    (result i32)
    (local $i i32)
    (memory.fill (i32.const 0x100000) (i32.const 0x78) (i32.const 0x100000))
    (i32.store (i32.const 0) (i32.const 0x100000))
    (i32.store (i32.const 4) (i32.const 0x100000))
    (block $done (loop $more
      (br_if $done (i32.ge_u (local.get $i) (i32.const 50)))
      (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $more)))
    (i32.store (i32.const 512) (i32.const 200))
    (i32.store (i32.const 516) (i32.const 0))
    (i32.store (i32.const 520) (i32.const 0))
    (i32.store (local.get $op) (i32.const 512))
    (i32.store (local.get $ol) (i32.const 12))
    (i32.const 0))
)
"""


def test_output_without_a_newline_is_held_only_up_to_the_line_limit(
    runtime: NodeRuntime, cleanup: list[Function]
) -> None:
    fn = make(runtime, bytes(wasmtime.wat2wasm(NOISY_MODULE)), "noisy")
    cleanup.append(fn)
    assert fn.needs_wasi
    response = fn.call_sync(post(b""))
    assert response.status == 200, response
    log = fn.log
    assert len(log._partial["stdout"]) <= LOG_LINE_LIMIT
    assert len(log.lines) == log.lines.maxlen == 500
    held = sum(len(line) for line in log.lines) + len(log._partial["stdout"])
    assert held <= 500 * (LOG_LINE_LIMIT + 64) + LOG_LINE_LIMIT
    assert all(line.endswith("x" * LOG_LINE_LIMIT) for line in log.lines)
    # 50 MiB is a whole number of pieces: the last one waits (full) for a newline
    assert log._partial["stdout"] == b"x" * LOG_LINE_LIMIT


def test_the_log_writer_cuts_long_lines_and_keeps_short_ones_whole() -> None:
    log = FunctionLog(line_limit=8)
    write = log.writer("stdout")
    write(b"abc")
    write(b"def\nghijklmnopqrstu")  # "abcdef", then "ghijklmn"; "opqrstu" held
    write(b"v\n\nw")
    sinks: list[bytes] = []
    log.sinks["stdout"] = sinks.append
    write(b"x" * 20)
    texts = [line.split(" ", 2)[2] for line in log.lines]
    assert texts == ["abcdef", "ghijklmn", "opqrstuv", "", "wxxxxxxx", "xxxxxxxx"]
    assert log._partial["stdout"] == b"xxxxx"
    assert sinks == [b"wxxxxxxx\n", b"xxxxxxxx\n"]


# --------------------------------------------------------------------------- the pool


def _sampler(fn: Function, stop: threading.Event, seen: list[int]) -> threading.Thread:
    def sample() -> None:
        while not stop.is_set():
            seen.append(fn.instances)
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    return thread


def test_fifty_in_process_callers_share_a_pool_of_two(
    runtime: NodeRuntime, wasm_dir: Path, cleanup: list[Function]
) -> None:
    """In-process invokes, deliveries and the ingress's worker threads together never have
    more than pool_size instances; the callers beyond them wait their turn."""
    fn = misbehave(runtime, wasm_dir, pool_size=2, queue_limit=100, timeout=20.0)
    cleanup.append(fn)
    stop, seen = threading.Event(), []
    sampler = _sampler(fn, stop, seen)
    callers = [Caller(lambda: fn.call_sync(get(b"/sleep", b"ms=10"))) for _ in range(50)]

    async def through_workers() -> list[object]:
        return await asyncio.gather(*(fn.call_threaded(get(b"/sleep", b"ms=10")) for _ in range(20)))

    def via_workers() -> list[object]:  # as the ingress serves a function on worker threads
        fn.threaded = True
        return asyncio.run(through_workers())

    workers = Caller(via_workers)
    for caller in callers:
        caller.start()
    workers.start()
    for caller in [*callers, workers]:
        caller.join(timeout=30)
        assert not caller.is_alive()
    stop.set()
    sampler.join()
    assert max(seen) <= 2, f"{max(seen)} instances live at once"
    assert fn.instances <= 2
    assert [c.response.status for c in callers] == [200] * 50
    assert [r.status for r in workers.response] == [200] * 20


def test_callers_past_the_queue_limit_are_told_the_function_is_busy(
    runtime: NodeRuntime, wasm_dir: Path, cleanup: list[Function]
) -> None:
    # a scheduler of its own: workers busy with other tests' calls would change the count
    own = CallScheduler(2)
    fn = misbehave(runtime, wasm_dir, pool_size=2, queue_limit=5, timeout=20.0, call_scheduler=own)
    cleanup.append(fn)
    held = [fn._take(0), fn._take(0)]  # two calls in flight: the pool is full
    assert fn.call_inline(get(b"/count")) is None  # the inline path does not wait: to the workers
    callers = [Caller(lambda: fn.call_sync(get(b"/count"))) for _ in range(20)]
    for caller in callers:
        caller.start()
    # Queued in the function's turn: two dispatched (waiting for the held instances) and
    # queue_limit more in its queue; the other 13 are turned away at once.
    wait_for(lambda: sum(not c.is_alive() for c in callers) == 13, what="13 callers answered")
    assert fn._waiting == 2 and len(fn.share.queue) == 5
    turned_away = [c for c in callers if not c.is_alive()]
    assert all(c.response.status == 503 for c in turned_away)
    assert all(b"busy" in c.response.body for c in turned_away)
    for instance in held:
        fn._give_back(instance, healthy=True)
    for caller in callers:
        caller.join(timeout=10)
    served = [c for c in callers if c not in turned_away]
    assert [c.response.status for c in served] == [200] * 7
    assert fn.instances <= 2


def test_a_caller_waits_at_most_the_timeout_for_an_instance(
    runtime: NodeRuntime, wasm_dir: Path, cleanup: list[Function]
) -> None:
    fn = misbehave(runtime, wasm_dir, pool_size=1, timeout=0.2)
    cleanup.append(fn)
    held = fn._take(0)
    started = time.perf_counter()
    response = fn.call_sync(get(b"/count"))
    took = time.perf_counter() - started
    assert response.status == 503 and b"busy" in response.body
    assert 0.2 <= took < 1.0
    fn._give_back(held, healthy=True)
    assert fn.call_sync(get(b"/count")).status == 200


def test_stopping_a_function_answers_its_waiting_callers(runtime: NodeRuntime, wasm_dir: Path) -> None:
    fn = misbehave(runtime, wasm_dir, pool_size=1, timeout=30.0, call_scheduler=CallScheduler(2))
    held = fn._take(0)
    callers = [Caller(lambda: fn.call_sync(get(b"/count"))) for _ in range(3)]
    for caller in callers:
        caller.start()
    # one dispatched (waiting for the held instance), two in the function's queue
    wait_for(lambda: fn._waiting == 1 and len(fn.share.queue) == 2, what="3 callers waiting")
    fn.stop()
    for caller in callers:
        caller.join(timeout=2)
        assert not caller.is_alive()
        assert caller.response.status == 503
    fn._give_back(held, healthy=True)
    assert fn.instances == 0


def test_a_kept_log_line_is_cut_at_the_line_limit():
    """The host's and the ABI's own lines (layotto_log passes up to 64 KiB) are kept cut, so
    a function's log stays within its lines × line limit."""
    from layotto.host.function import FunctionLog

    log = FunctionLog(limit=3, line_limit=100)
    for _ in range(5):
        log.add("abi", "x" * 10_000)
    assert len(log.lines) == 3
    assert all(len(line) < 200 and line.endswith("[cut]") for line in log.lines)

"""The node's call scheduler (host/scheduler.py): fair shares, CPU limits, queue limits,
and where calls run (inline on the event loop, or on workers).

The scheduler's order is tested with jobs that charge a fixed CPU time (deterministic);
CPU limits and the inline/worker decisions with real wasm calls; the limit's wiring from
the OCI spec through a real containerd (`ctr run --cpu-quota`). Timings are the
benchmarks' business (tests/bench/fairness.py); these assert behaviour.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from layotto.host import scheduler
from layotto.host.abi_host import HostInvoker, parse_capabilities
from layotto.host.components.registry import load_components
from layotto.host.function import Function, HostServices, Request
from layotto.host.function_registry import FunctionRegistry
from layotto.host.runtime import NodeRuntime
from layotto.host.scheduler import CallScheduler
from tests.support import make_function, wait_for
from tests.test_functions import Node, new_id
from tests.test_functions import fn_images as fn_images
from tests.test_functions import node as node


def get(path: bytes, query: bytes = b"") -> Request:
    return Request(b"GET", path, query, [], b"")


class Recorder:
    """Jobs that charge a fixed CPU time to their share and record the order they ran."""

    def __init__(self, sched: CallScheduler) -> None:
        self.sched = sched
        self.order: list[str] = []
        self.done = threading.Semaphore(0)
        self.gate = threading.Event()  # the first job holds the only core until set

    def job(self, share: scheduler.Share, name: str, cost: float, *, hold: bool = False):
        def run() -> str:
            if hold:
                self.gate.wait(10)
            self.order.append(name)
            share.charge(cost)
            return name

        return run

    def deliver(self, _result: object) -> None:
        self.done.release()

    def wait(self, n: int) -> None:
        for _ in range(n):
            assert self.done.acquire(timeout=10), "a job never ran"

    def hold_the_core(self, share: scheduler.Share, cost: float = 0.0) -> None:
        """A first call of ``share`` that keeps the only core until :attr:`gate` is set, so
        that what is queued meanwhile is ordered by the scheduler alone."""
        assert share.submit(self.job(share, "blocker", cost, hold=True), self.deliver)
        wait_for(lambda: self.sched.stats()["running"] == 1, what="the blocker runs")


def test_a_saturated_function_does_not_starve_a_light_one() -> None:
    """100 calls of a heavy function are queued; a light function's call, submitted after
    them, runs next (it has used no CPU), not after the 100."""
    sched = CallScheduler(cores=1, nice=0)
    rec = Recorder(sched)
    heavy = sched.share("heavy", slots=4)
    light = sched.share("light")
    rec.hold_the_core(heavy, 0.01)
    for i in range(100):
        heavy.submit(rec.job(heavy, f"heavy-{i}", 0.01), rec.deliver)
    light.submit(rec.job(light, "light", 0.0001), rec.deliver)
    rec.gate.set()
    rec.wait(102)
    assert rec.order.index("light") <= 2, rec.order[:5]


def test_cpu_shares_divide_a_saturated_core_in_proportion() -> None:
    """Two functions with 4096 and 1024 shares (requests.cpu 4 and 1), both always
    queued: of the first 50 calls (equal cost each), four in five go to the first."""
    sched = CallScheduler(cores=1, nice=0)
    rec = Recorder(sched)
    big = sched.share("big", shares=4096, slots=4)
    small = sched.share("small", shares=1024, slots=4)
    rec.hold_the_core(big)
    for _ in range(60):
        big.submit(rec.job(big, "big", 0.001), rec.deliver)
        small.submit(rec.job(small, "small", 0.001), rec.deliver)
    rec.gate.set()
    rec.wait(121)
    first = rec.order[1:51]
    assert 38 <= first.count("big") <= 42, first
    assert big.cpu_seconds == pytest.approx(0.06) and small.cpu_seconds == pytest.approx(0.06)


def test_idling_earns_no_credit() -> None:
    """A function that was idle while another ran for a long time does not then get the
    core to itself until it has caught up: both are served from where the busy one is."""
    sched = CallScheduler(cores=1, nice=0)
    rec = Recorder(sched)
    a, b = sched.share("a", slots=4), sched.share("b", slots=4)
    for _ in range(20):
        a.submit(rec.job(a, "a", 0.01), rec.deliver)
    rec.wait(20)
    rec.order.clear()
    rec.hold_the_core(a)
    for _ in range(10):
        a.submit(rec.job(a, "a", 0.01), rec.deliver)
        b.submit(rec.job(b, "b", 0.01), rec.deliver)
    rec.gate.set()
    rec.wait(21)
    assert rec.order[1:11].count("a") >= 4, rec.order  # not ten b's first


def test_queue_limit_refuses_past_it() -> None:
    sched = CallScheduler(cores=1, nice=0)
    rec = Recorder(sched)
    share = sched.share("f", slots=1, queue_limit=3)
    rec.hold_the_core(share)
    accepted = [share.submit(rec.job(share, "x", 0.0), rec.deliver) for _ in range(5)]
    assert accepted == [True, True, True, False, False]
    rec.gate.set()
    rec.wait(4)


def test_a_waiting_worker_lets_another_run() -> None:
    """With one core, a call waiting on the network does not hold the core: a second call
    runs meanwhile (and the first then finishes)."""
    sched = CallScheduler(cores=1, nice=0)
    release = threading.Event()
    order: list[str] = []
    done = threading.Semaphore(0)
    share = sched.share("f", slots=2)

    def waits() -> None:
        with scheduler.running(scheduler.Call(inline=False)), scheduler.network_wait("test"):
            release.wait(10)
        order.append("waiter")

    def quick() -> None:
        order.append("quick")
        release.set()

    share.submit(waits, lambda _r: done.release())
    share.submit(quick, lambda _r: done.release())
    assert done.acquire(timeout=10) and done.acquire(timeout=10)
    assert order == ["quick", "waiter"]


def test_network_wait_inline_stops_a_call_without_effects_and_not_one_with() -> None:
    call = scheduler.Call(inline=True)
    with scheduler.running(call):
        with pytest.raises(scheduler.WouldBlock):
            with scheduler.network_wait("redis"):
                pytest.fail("the wait must not start on the event loop")
    assert call.would_block and call.network
    call = scheduler.Call(inline=True)
    with scheduler.running(call):
        scheduler.touch()  # it changed something: a re-run would repeat it
        with scheduler.network_wait("redis"):
            pass
    assert call.went_blocking and not call.would_block


# ---------------------------------------------------------------- with real wasm calls


@pytest.fixture(scope="module")
def runtime() -> NodeRuntime:
    return NodeRuntime(None)


def make(runtime: NodeRuntime, wasm_dir: Path, module: str, **kw: object) -> Function:
    kw.setdefault("function_id", new_id(module))
    return make_function(runtime, (wasm_dir / f"{module}.wasm").read_bytes(), module, **kw)


def make_id_1(runtime: NodeRuntime, wasm_dir: Path, services: HostServices) -> Function:
    """faas_fn1 as Layotto's demo runs it: id ``id_1``, invoking ``id_2``."""
    invoke = parse_capabilities("invoke")
    return make(runtime, wasm_dir, "faas_fn1", services=services, capabilities=invoke, function_id="id_1")


def test_a_cpu_limited_function_uses_at_most_its_quota(runtime: NodeRuntime, wasm_dir: Path) -> None:
    """limits.cpu 100m: eight callers keep the function busy for a second of wall time;
    it gets about 0.1 s of CPU (not the ~2 cores it would take), never runs inline, and
    its calls were held by the quota."""
    fn = make(runtime, wasm_dir, "fn_work", pool_size=4, cpu_quota=0.01, cpu_period=0.1)
    try:
        assert fn.mode == "workers" and fn.call_inline(get(b"/", b"us=500")) is None
        stop = time.monotonic() + 1.0

        def caller() -> int:
            n = 0
            while time.monotonic() < stop:
                assert fn.call_sync(get(b"/", b"us=2000")).status == 200
                n += 1
            return n

        began, cpu0 = time.monotonic(), fn.cpu_seconds
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            calls = sum(pool.map(lambda _: caller(), range(8)))
        wall, used = time.monotonic() - began, fn.cpu_seconds - cpu0
        assert calls > 0
        assert used <= 0.1 * wall * 1.5 + 0.01, f"{used:.3f} s of CPU in {wall:.2f} s"
        assert fn.share.throttled > 0
    finally:
        fn.stop()


def test_one_long_call_is_held_to_its_quota_while_it_runs(runtime: NodeRuntime, wasm_dir: Path) -> None:
    """limits.cpu 100m on a function without ABI imports: a single call of ~60 ms of work is
    charged at its checkpoints as it runs, so the quota holds it back during the call (not
    only the calls after it)."""
    fn = make(runtime, wasm_dir, "fn_work", cpu_quota=0.01, cpu_period=0.1)
    try:
        assert fn.call_sync(get(b"/", b"us=60000")).status == 200
        assert fn.share.throttled > 0
        assert fn.share.throttled_seconds > 0.1
    finally:
        fn.stop()


@pytest.fixture
def chain(runtime: NodeRuntime, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Chain]:
    """Layotto's demo chain in process: id_1 invokes id_2, which reads book1 from the state
    store ``state_demo``: embedded SQLite, or Redis (parametrized by the test)."""
    kind = request.param
    meta: dict[str, str] = {"keyPrefix": "none"}
    if kind == "redis":
        meta |= {
            "redisHost": request.getfixturevalue("redis_server"),
            "redisKeyPrefix": new_id("sched") + ":",
        }
    (tmp_path / "components.yaml").write_text(
        yaml.safe_dump({"state": {"state_demo": {"type": kind, "metadata": meta}}})
    )
    (tmp_path / "state").mkdir()
    with load_components(tmp_path / "components.yaml", tmp_path / "state") as components:
        components.state("state_demo").set("book1", b"100")
        functions = FunctionRegistry()
        services = HostServices(components, HostInvoker(functions))
        fn2 = make(
            runtime,
            request.getfixturevalue("wasm_dir"),
            "faas_fn2",
            services=services,
            capabilities=parse_capabilities("state"),
            function_id="id_2",
        )
        fn1 = make_id_1(runtime, request.getfixturevalue("wasm_dir"), services)
        functions.add(fn2)
        functions.add(fn1)
        try:
            yield Chain(fn1, fn2)
        finally:
            fn1.stop()
            fn2.stop()


@dataclass
class Chain:
    fn1: Function
    fn2: Function


BOOK = get(b"/", b"name=book1")
ANSWER = b"There are 100 inventories for book1."


@pytest.mark.parametrize("chain", ["sqlite"], indirect=True)
def test_the_runtime_abi_in_process_runs_inline(chain: Chain) -> None:
    """Embedded SQLite and an in-process invoke never wait on the network: the whole chain
    is served on the event loop, no hop to a worker."""
    for _ in range(50):
        response = chain.fn1.call_inline(BOOK)
        if response is None:  # a call stretched past the budget on a busy machine: once
            continue
        assert (response.status, response.body) == (200, ANSWER)
    assert chain.fn1.mode == chain.fn2.mode == "inline"
    assert not chain.fn1.threaded and not chain.fn2.threaded


@pytest.mark.parametrize("chain", ["redis"], indirect=True)
def test_a_call_about_to_wait_on_the_network_moves_to_a_worker(chain: Chain) -> None:
    """id_2 reads Redis: on the event loop that read would stop every other request. The
    call (id_1's, which invoked id_2) is stopped before the read, with nothing changed, and
    served on a worker; both functions' later calls run on workers."""
    assert chain.fn1.call_inline(BOOK) is None
    assert chain.fn1.threaded  # the root of the call moves for good
    response = asyncio.run(chain.fn1.call_threaded(BOOK))
    assert (response.status, response.body) == (200, ANSWER)
    assert chain.fn1.stats.replaced == 1  # the stopped instance is not reused


def test_cpu_time_is_charged_per_function_exactly(runtime: NodeRuntime, wasm_dir: Path) -> None:
    """Calls inline and on workers are both accounted; two functions' times do not mix."""
    a = make(runtime, wasm_dir, "fn_work")
    b = make(runtime, wasm_dir, "fn-hello")
    try:
        for _ in range(20):
            assert a.call_sync(get(b"/", b"us=2000")).status == 200
        for _ in range(20):
            assert b.call_sync(get(b"/", b"name=x")).status == 200
        assert a.cpu_seconds >= 20 * 0.0015
        assert b.cpu_seconds < a.cpu_seconds / 10
    finally:
        a.stop()
        b.stop()


def test_time_in_wasm_is_each_functions_own(runtime: NodeRuntime, wasm_dir: Path) -> None:
    """What decides inline or worker is a function's time in wasm: a caller's excludes its
    host calls, the function it invoked included (~2 ms of wasm in fn_work here); the
    callee's is its own. Measured by the C trampoline per nesting depth
    (host/_handler.c: run_begin, run_end)."""
    functions = FunctionRegistry()
    services = HostServices(None, HostInvoker(functions))
    work = make(runtime, wasm_dir, "fn_work", services=services, function_id="id_2")
    caller = make_id_1(runtime, wasm_dir, services)
    functions.add(work)
    functions.add(caller)
    try:
        for _ in range(60):
            response = caller.call_sync(BOOK)
            assert response.status == 200 and response.body.startswith(b"There are n="), response.body
        assert work.wasm_cost > 500e-6  # its ~2 ms of work (the average climbs in steps)
        assert caller.wasm_cost < work.wasm_cost / 10
        assert caller.cost < work.cost / 5  # its CPU: the callee's time is charged to the callee
        assert work.cpu_seconds > 10 * caller.cpu_seconds
    finally:
        caller.stop()
        work.stop()


# ---------------------------------------------------------------- through containerd


def test_limits_cpu_from_the_oci_spec_throttles_a_function(node: Node) -> None:
    """`ctr run --cpu-quota 10000 --cpu-period 100000` (limits.cpu 100m) on a function:
    the host reads the limit from the bundle, `layotto ps` shows it, and a saturating load
    leaves the function throttled at about a tenth of a core."""
    fid = new_id("limited")
    task = node.start("fn_work", "--cpu-quota", "10000", "--cpu-period", "100000", fid=fid)
    row = node.tasks_info()[task]
    assert row["cpu_limit"] == 0.1 and row["mode"] == "workers"
    cpu0 = row["cpu_seconds"]
    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda _: node.get("/?us=2000", fid=fid).status, range(60)))
    wall = time.monotonic() - began
    assert statuses == [200] * 60
    row = node.tasks_info()[task]
    used = row["cpu_seconds"] - cpu0
    assert row["throttled"] > 0
    assert used <= 0.1 * wall * 1.5 + 0.02, f"{used:.3f} s of CPU in {wall:.2f} s"


def test_cpu_shares_reach_the_function(node: Node) -> None:
    task = node.start("fn_work", "--cpu-shares", "512", fid=new_id("shares"))
    assert node.tasks_info()[task]["cpu_shares"] == 512
    plain = node.start("fn-hello", fid=new_id("plain"))
    assert node.tasks_info()[plain]["cpu_shares"] == 1024  # no requests.cpu: one CPU's weight


def test_making_fresh_instances_is_charged_to_the_function(runtime: NodeRuntime, wasm_dir: Path) -> None:
    """A fresh instance per request: instantiating is part of every call's cost, and is
    charged (a function in fresh mode cannot use CPU its limit and shares do not see)."""
    reuse = make(runtime, wasm_dir, "fn-hello")
    fresh = make(runtime, wasm_dir, "fn-hello", fresh_instances=True)
    try:
        for fn in (reuse, fresh):
            for _ in range(200):
                assert fn.call_sync(get(b"/", b"name=x")).status == 200
        assert fresh.cpu_seconds > 2 * reuse.cpu_seconds, (fresh.cpu_seconds, reuse.cpu_seconds)
    finally:
        reuse.stop()
        fresh.stop()


def test_a_remote_callers_deadline_bounds_the_call(runtime: NodeRuntime, wasm_dir: Path) -> None:
    """A call from another node carries its caller's time left (layotto-deadline-ms): a
    looping call ends with 504 when that is up, not at the function's 30 s timeout; a
    header that is not a number of milliseconds changes nothing."""
    fn = make(runtime, wasm_dir, "fn_misbehave", timeout=30.0)
    fn.threaded = True  # as the ingress hands it to a worker

    def call(path: bytes, deadline: bytes) -> tuple[int, float]:
        request = Request(b"GET", path, b"", [(b"Layotto-Deadline-Ms", deadline)], b"")
        started = time.monotonic()
        response = asyncio.run(fn.call_threaded(request))
        return response.status, time.monotonic() - started

    try:
        status, took = call(b"/loop", b"300")
        assert status == 504 and took < 5, (status, took)
        assert call(b"/count", b"soon")[0] == 200
        assert call(b"/count", b"-5")[0] == 200
    finally:
        fn.stop()

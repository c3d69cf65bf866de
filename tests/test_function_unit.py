"""Function instances in process: inline budgets, epochs from elsewhere, moving between
the inline path and the scheduler's workers."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

import pytest

from layotto.host.function import INLINE_BUDGET, INLINE_CHEAP, INLINE_HEAVY, Function, Request
from layotto.host.function_stats import LATENCY_BUCKETS, Stats
from layotto.host.runtime import NodeRuntime
from tests.support import make_function


@pytest.fixture(scope="module")
def runtime() -> NodeRuntime:
    return NodeRuntime(None)


def make(runtime: NodeRuntime, wasm_dir: Path, module: str) -> Function:
    return make_function(runtime, (wasm_dir / f"{module}.wasm").read_bytes(), module)


def get(path: bytes, query: bytes = b"") -> Request:
    return Request(b"GET", path, query, [], b"")


def test_epoch_bumps_from_elsewhere_do_not_cut_inline_calls_short(
    runtime: NodeRuntime, wasm_dir: Path
) -> None:
    """Another module's kill bumps the shared engine's epoch; a function's inline calls
    must not be stopped for it (the budget is read from the clock, not the epoch)."""
    fn = make(runtime, wasm_dir, "fn_work")
    try:
        for _ in range(300):
            for _ in range(3):
                runtime.engine.engine.increment_epoch()
            fn.cost = 0.0  # keep it inline whatever this machine's speed
            started = time.perf_counter()
            response = fn.call_inline(get(b"/", b"us=20"))
            took = time.perf_counter() - started
            if response is None:
                # Only a call that really held the loop for the whole budget may be stopped
                # (this thread preempted on a loaded machine), never a short one.
                assert took >= INLINE_BUDGET, f"a {took * 1000:.1f} ms call was stopped"
                continue
            assert response.status == 200
        assert fn.stats.replaced <= 3
    finally:
        fn.stop()


def test_a_looping_call_moves_its_function_to_workers_within_the_budget(
    runtime: NodeRuntime, wasm_dir: Path
) -> None:
    fn = make(runtime, wasm_dir, "fn_misbehave")
    try:
        assert fn.mode == "inline"
        started = time.perf_counter()
        assert fn.call_inline(get(b"/loop")) is None  # interrupted: run it again on a worker
        assert time.perf_counter() - started < 0.5
        assert fn.mode == "workers"
        assert fn.stats.replaced == 1  # the interrupted instance is never reused
        assert fn.call_inline(get(b"/count")) is None  # on workers now
    finally:
        fn.stop()


def test_where_a_call_runs_follows_its_measured_cost(runtime: NodeRuntime, wasm_dir: Path) -> None:
    """Costly calls go to workers, and come back inline once the function is cheap again;
    a function that waited on the network (``threaded``) stays on workers."""
    fn = make(runtime, wasm_dir, "fn_work")

    async def serve(query: bytes, n: int) -> None:
        for _ in range(n):
            response = await fn.call_threaded(get(b"/", query))
            assert response.status == 200

    try:
        asyncio.run(serve(b"us=3000", 60))  # the average rises by steps (host/function.py)
        assert fn.cost >= INLINE_HEAVY and fn.mode == "workers"
        assert fn.call_inline(get(b"/", b"n=1")) is None
        asyncio.run(serve(b"n=1", 200))
        assert fn.cost <= INLINE_CHEAP and fn.mode == "inline"
        assert fn.call_inline(get(b"/", b"n=1")).status == 200
        fn.threaded = True
        assert fn.mode == "workers" and fn.call_inline(get(b"/", b"n=1")) is None
    finally:
        fn.stop()


def test_configuration_changes_reach_a_subscribed_function(
    runtime: NodeRuntime, wasm_dir: Path, tmp_path: Path
) -> None:
    """``layotto.io/config-subscriptions`` → each change is a POST /_layotto/config/<store>."""
    from types import SimpleNamespace

    from layotto.host import scoping
    from layotto.host.components import ConfigItem
    from layotto.host.components.registry import load_components
    from layotto.host.function import HostServices
    from layotto.host.subscriptions import watch_configuration

    fn = make(runtime, wasm_dir, "fn_echo")
    seen: list[bytes] = []
    original = fn.call_sync

    def recording(request: Request):  # the real call, remembering what was delivered
        seen.append(request.path + b" " + request.body)
        return original(request)

    fn.call_sync = recording
    with load_components(None, tmp_path) as components:
        fn.services = HostServices(components, None)
        # what admission (host/admission.py) reads off the annotation
        # layotto.io/config-subscriptions: config_demo/feature at Create
        wanted = SimpleNamespace(
            subscriptions=(), config_subscriptions=(("config_demo", ("feature",)),), namespace="ns"
        )
        cancels = watch_configuration(fn, wanted)
        assert len(cancels) == 1
        store = components.configuration("config_demo")
        # The function's own item (its app's prefix), an item it did not name, and the same
        # key of another app: only the first reaches it, under the key it named.
        mine = scoping.key_prefix(components, "configuration", "config_demo", fn.app_id, "ns")
        assert mine
        store.set(
            [
                ConfigItem(mine + "feature", "on"),
                ConfigItem(mine + "other", "x"),
                ConfigItem("ns.x||feature", "no"),
            ]
        )
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        cancels[0]()
    fn.stop()
    assert seen and seen[0].startswith(b"/_layotto/config/config_demo ")
    assert b'"key": "feature"' in seen[0] and b'"content": "on"' in seen[0]
    assert b"other" not in seen[0] and b'"content": "no"' not in seen[0] and b"||" not in seen[0]
    assert fn.stats.invocations >= 1


def test_call_counters_count_every_outcome_from_every_thread() -> None:
    """Stats folds the outcomes it was given when read (and when many are waiting):
    threads observing at once, reads in between, nothing lost or counted twice."""
    stats = Stats()
    per_thread = Stats.FOLD_AT + 1000  # each thread passes the fold threshold too

    def observe(code: int) -> None:
        for i in range(per_thread):
            stats.observe(code, 0.0002 if i % 2 else 0.2)
            if i % 997 == 0:
                assert stats.invocations >= 0  # a read folds meanwhile

    threads = [threading.Thread(target=observe, args=(code,)) for code in (200, 404, 503, 200)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert stats.invocations == 4 * per_thread
    assert stats.codes == {200: 2 * per_thread, 404: per_thread, 503: per_thread}
    assert stats.errors == per_thread
    assert sum(stats.buckets) == 4 * per_thread
    fast = LATENCY_BUCKETS.index(0.00025)
    assert stats.buckets[fast] == 2 * per_thread
    assert stats.latency_sum == pytest.approx(4 * per_thread / 2 * (0.0002 + 0.2))


def test_memory_is_measured_only_while_instances_are_idle_in_the_pool(
    runtime: NodeRuntime, wasm_dir: Path
) -> None:
    """CRI's stats read the idle instances' memory while requests take, trap and close
    instances on other threads, and a stop closes the idle ones: an instance's memory is
    read only under the pool's lock, while the pool still holds it (a Store freed under a
    reader would crash the node host)."""
    fn = make(runtime, wasm_dir, "fn-hello")
    try:
        for _ in range(3):
            assert fn.call_inline(get(b"/", b"name=x")) is not None
        instance = fn._idle[0]
        seen: list[bool] = []
        memory = instance.memory

        class Watched:
            def size(self) -> int:
                seen.append(fn._lock.locked())
                return memory.size()

        instance._memory = Watched()  # type: ignore[assignment]
        assert fn.memory_bytes() > 0
        assert seen and all(seen)
        # And under a race: takers closing instances (as after a trap) while stats are read.
        instance._memory = memory
        stop = time.monotonic() + 1.0

        def churn() -> None:
            while time.monotonic() < stop:
                taken = fn._take()
                if taken is not None:
                    fn._give_back(taken, healthy=False)

        worker = threading.Thread(target=churn)
        worker.start()
        while time.monotonic() < stop:
            fn.memory_bytes()
        worker.join()
    finally:
        fn.stop()

"""Runtime ABI benchmark: what an ABI call costs against a raw wasm call, and the FaaS demo chain.

``python -m tests.bench.abi [--duration S] [--connections C] [--micro-seconds S] [--profile]
[--no-redis] [--no-micro | --no-containerd] [--json PATH]``:

1. in this process, without containerd: builds :class:`layotto.host.function.Function` objects
   on :class:`layotto.host.runtime.NodeRuntime` as the node host does, with components from
   :func:`layotto.host.components.registry.load_components` (``state_demo`` on the embedded
   SQLite and, when a ``redis-server`` binary is installed, ``redis_demo`` on a private
   redis-server started here, both ``keyPrefix: none`` and seeded with ``book1 = 100``) and
   the host's in-process invoker over fn-hello, faas_fn2 (``id_2``) and faas_fn1 (``id_1``);
2. times, in µs per call (best of 7 batches): a raw wasm call from Python through the host's
   own call path (``layotto.host.fastcall.Func`` on a trivial export), then calls made
   *from inside wasm*: a small WAT module (built here, see :func:`bench_wat`) exports one
   loop per import that calls it N times, so Python's call overhead is paid once per batch,
   not per call: per call = (time of loop(N) - time of loop(0)) / N. Loops: a wasm-to-wasm
   call (reference); an import that is a bare ctypes callback defined through the C API
   (the floor for a host function written in Python); an import that is a Python
   ``lambda`` defined with wasmtime-py's ``Linker.define_func``, as the ABI's are (the
   crossing alone); ``layotto_time_now``; ``layotto_log`` to a null logger;
   ``layotto_state_get`` on SQLite and on Redis; ``layotto_invoke`` of fn-hello and of
   faas_fn2 (in process). Each ABI function's implementation is also called from Python
   with the same arguments, and its backend timed alone (the component's ``get``, the
   callee's ``Function.call_sync``), which cuts a call into the crossing, the ABI's own
   code and the backend. Every loop must answer OK and its last result is checked
   (``100``, ``Hello, world!``, the clock, the log line);
3. times whole requests in process (no HTTP): fn-hello ``call_inline`` (how the ingress
   runs a function without ABI imports) and ``call_sync``; faas_fn2 and faas_fn1 (the
   chain) ``call_sync``; and the hand-off to a worker thread that every request to a
   function importing the ABI takes (``call_threaded`` on an event loop, one at a time);
4. through containerd: a private containerd (no CRI) whose node host gets the components
   file through ``LAYOTTO_COMPONENTS`` (``state_demo``: SQLite, ``keyPrefix: none``) and
   serves its gRPC Runtime API on the unix socket only (``LAYOTTO_GRPC_ADDRESS=``) runs,
   with ``ctr run -d``: faas_fn2 (``layotto.io/function-id=id_2``, capabilities ``state``),
   faas_fn1 (``id_1``, ``invoke``), fn-hello, and abi-noop (the WAT module without its
   benchmark imports: it imports the ABI, so it runs on worker threads, and calls nothing).
   Seeds ``book1 = 100`` through ``<state>/layotto/runtime.sock`` (``SaveState``, read back
   with ``GetState``), checks every response body, then loads each function through the
   HTTP ingress with ``wrk -t1 -c32 -d10s --latency`` (after a 2 s warm-up): req/s, p50/p99,
   the node host's CPU (user, system) and context switches per request. fn-hello ->
   abi-noop -> faas_fn2 -> the chain ``id: id_1`` -> ``id_2`` -> ``state_demo`` adds one
   step at a time; each step's extra host CPU is shown beside the same step in process;
5. ``--profile`` adds one more wrk run of the chain under ``py-spy record --gil`` (when
   py-spy is installed): how busy the GIL was and who held it; ``--json PATH`` writes every
   number (and the collapsed stacks beside it).

There are no targets: the figures are informational (exit status 0 once everything ran).
containerd is always stopped at the end, taking the node host along; the redis-server and
temporary files are removed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import http.client
import json
import logging
import os
import platform
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from layotto.images.builder import build_image
from tests import containerd_env
from tests.bench.coldstart import BenchError
from tests.bench.invoke import per_call_us, run_wrk
from tests.bench.startrate import (
    LAYOTTO_RUNTIME,
    Fleet,
    Kind,
    common_arguments,
    ensure_modules,
    host_pid,
    load_note,
    machine_info,
    positive,
    preflight,
    progress_enabled,
    write_json,
)
from tests.containerd_env import Containerd, ContainerdError, CtrError, default_snapshotter

FUNCTION_ID = "layotto.io/function-id"
CAPABILITIES = "layotto.io/capabilities"
BOOK, INVENTORY = "book1", b"100"
CHAIN_BODY = b"There are 100 inventories for book1."
HELLO_BODY = b"Hello, book1!\n"
HELLO_INVOKED = b"Hello, world!\n"  # fn-hello called through layotto_invoke: no query string
LOG_LINE = b"abi benchmark: one log line"
NOOP_BODY = b"ok\n"  # what the benchmark module's handler answers

HELLO = Kind(
    "hello",
    "fn-hello (no ABI)",
    "docker.io/library/fn-hello:abi",
    LAYOTTO_RUNTIME,
    annotations=((FUNCTION_ID, "fn-hello"),),
)
FN2 = Kind(
    "fn2",
    "faas_fn2 (id_2): state_get",
    "docker.io/library/faas-fn2:abi",
    LAYOTTO_RUNTIME,
    annotations=((FUNCTION_ID, "id_2"), (CAPABILITIES, "state")),
)
FN1 = Kind(
    "fn1",
    "faas_fn1 (id_1) -> id_2: the chain",
    "docker.io/library/faas-fn1:abi",
    LAYOTTO_RUNTIME,
    annotations=((FUNCTION_ID, "id_1"), (CAPABILITIES, "invoke")),
)
NOOP = Kind(
    "noop",
    "abi-noop: imports the ABI, no call",
    "docker.io/library/abi-noop:abi",
    LAYOTTO_RUNTIME,
    annotations=((FUNCTION_ID, "abi-noop"),),
)
MODULES = {HELLO.key: "fn-hello", FN2.key: "faas_fn2", FN1.key: "faas_fn1"}
#: (kind, function id, expected body) of each wrk target, in the order they are loaded.
TARGETS = (
    (HELLO, "fn-hello", HELLO_BODY),
    (NOOP, "abi-noop", NOOP_BODY),
    (FN2, "id_2", INVENTORY),
    (FN1, "id_1", CHAIN_BODY),
)

# --------------------------------------------------------------------------- the WAT module

#: Strings the loops pass to the imports, at fixed addresses (data segments).
STRINGS = {
    "state_demo": b"state_demo",
    "redis_demo": b"redis_demo",
    "book1": BOOK.encode(),
    "fn-hello": b"fn-hello",
    "id_2": b"id_2",
    "log": LOG_LINE,
}
STRINGS_AT = 256
RESPONSE_AT = 16  # the handler's response: status 200, no headers, body NOOP_BODY
OUT_VALUE, OUT_VALUE_LEN, OUT_ETAG, OUT_ETAG_LEN = 1024, 1028, 1032, 1036
OUT_TIME = 1040  # i64
OUT_RESULT, OUT_RESULT_LEN = 1048, 1052
STATE_OUTS = (OUT_VALUE, OUT_VALUE_LEN, OUT_ETAG, OUT_ETAG_LEN)
HEAP_AT = 65536  # the allocator's heap: page 1 for the host's own allocations
SCRATCH_AT = 131072  # every loop iteration resets the heap here: results never pile up
MEMORY_PAGES = 4
#: Batches per in-process measurement; the best one counts (short ones catch quiet moments).
BATCHES = 7

_IMPORTS = {
    "now": ('"layotto" "layotto_time_now"', 1),
    "log": ('"layotto" "layotto_log"', 3),
    "get": ('"layotto" "layotto_state_get"', 8),
    "invoke": ('"layotto" "layotto_invoke"', 8),
    "noop": ('"bench" "noop"', 0),
    "rawnoop": ('"bench" "rawnoop"', 0),
}
#: Loop export → (extra parameters, the call whose i32 status each iteration ORs in).
_LOOPS = {
    "loop_internal": ((), "(call $inner (local.get $i))"),
    "loop_noop": ((), "(call $noop)"),
    "loop_rawnoop": ((), "(call $rawnoop)"),
    "loop_time_now": ((), f"(call $now (i32.const {OUT_TIME}))"),
    "loop_log": (
        ("$p", "$l"),
        "(call $log (i32.const 2) (local.get $p) (local.get $l))",
    ),
    "loop_state_get": (
        ("$sp", "$sl", "$kp", "$kl"),
        "(call $get (local.get $sp) (local.get $sl) (local.get $kp) (local.get $kl)"
        f" (i32.const {OUT_VALUE}) (i32.const {OUT_VALUE_LEN})"
        f" (i32.const {OUT_ETAG}) (i32.const {OUT_ETAG_LEN}))",
    ),
    "loop_invoke": (
        ("$ip", "$il", "$dp", "$dl"),
        "(call $invoke (local.get $ip) (local.get $il) (i32.const 0) (i32.const 0)"
        f" (local.get $dp) (local.get $dl) (i32.const {OUT_RESULT}) (i32.const {OUT_RESULT_LEN}))",
    ),
}


def string_layout() -> dict[str, tuple[int, int]]:
    """name → (address, length) of each string in :data:`STRINGS`."""
    layout, at = {}, STRINGS_AT
    for name, data in STRINGS.items():
        layout[name] = (at, len(data))
        at += (len(data) + 8) & ~7
    return layout


def bench_wat(*, abi_only: bool = False) -> str:
    """A function module (handler, allocator, memory) whose exports call one import N times.
    ``abi_only``: without the ``bench`` imports and their loops (a module the node host
    accepts: it imports the ABI, so it runs on worker threads, and its handler calls nothing)."""

    def wat_bytes(data: bytes) -> str:
        return "".join(f"\\{b:02x}" for b in data)

    imports = [
        f"  (import {where} (func ${name} (param{' i32' * arity}) (result i32)))"
        if arity
        else f"  (import {where} (func ${name} (result i32)))"
        for name, (where, arity) in _IMPORTS.items()
        if not (abi_only and where.startswith('"bench"'))
    ]
    response = b"".join(n.to_bytes(4, "little") for n in (200, 0, len(NOOP_BODY))) + NOOP_BODY
    data = [f'  (data (i32.const {RESPONSE_AT}) "{wat_bytes(response)}")']
    for name, (at, _) in string_layout().items():
        data.append(f'  (data (i32.const {at}) "{wat_bytes(STRINGS[name])}")')
    loops = []
    for export, (params, call) in _LOOPS.items():
        if abi_only and "noop" in call:
            continue
        extra = "".join(f" (param {p} i32)" for p in params)
        loops.append(
            f"""  (func (export "{export}") (param $n i32){extra} (result i32)
    (local $i i32) (local $bad i32)
    (block $done
      (loop $top
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (global.set $heap (i32.const {SCRATCH_AT}))
        (local.set $bad (i32.or (local.get $bad) {call}))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $top)))
    (local.get $bad))"""
        )
    return "\n".join(
        [
            "(module",
            *imports,
            f'  (memory (export "memory") {MEMORY_PAGES})',
            f"  (global $heap (mut i32) (i32.const {HEAP_AT}))",
            *data,
            # A bump allocator: the host puts results here. Full, it starts over at the scratch
            # area (host calls from Python reuse it too); 0 for what cannot fit at all.
            f"""  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $p i32)
    (if (i32.gt_u (local.get $size) (i32.const {MEMORY_PAGES * 65536 - SCRATCH_AT}))
      (then (return (i32.const 0))))
    (if (i32.gt_u (i32.add (global.get $heap) (local.get $size)) (i32.const {MEMORY_PAGES * 65536}))
      (then (global.set $heap (i32.const {SCRATCH_AT}))))
    (local.set $p (global.get $heap))
    (global.set $heap
      (i32.and (i32.add (i32.add (local.get $p) (local.get $size)) (i32.const 7)) (i32.const -8)))
    (local.get $p))""",
            f"""  (func (export "layotto_http_handle") (param i32 i32 i32 i32) (result i32)
    (i32.store (local.get 2) (i32.const {RESPONSE_AT}))
    (i32.store (local.get 3) (i32.const {12 + len(NOOP_BODY)}))
    (i32.const 0))""",
            '  (func (export "nop") (param i32) (result i32) (local.get 0))',
            "  (func $inner (param i32) (result i32) (i32.and (local.get 0) (i32.const 0)))",
            *loops,
            ")",
        ]
    )


# --------------------------------------------------------------------------- helpers


def define_raw_noop(linker: Any) -> object:
    """``bench.rawnoop``: an import that is a bare ctypes callback defined through the C API
    (``wasmtime_linker_define_func_unchecked``: raw values, no per-call conversion), the floor
    a host function can cost from Python. Returns what must stay alive while it is used."""
    import ctypes

    import wasmtime
    from wasmtime import _bindings as ffi

    @ffi.wasmtime_func_unchecked_callback_t
    def rawnoop(env: int, caller: Any, values: Any, count: int) -> int:
        values[0].i32 = 0
        return 0  # no trap

    no_finalizer = ffi._wasmtime_linker_define_func_unchecked.argtypes[8]()
    ty = wasmtime.FuncType([], [wasmtime.ValType.i32()])
    module, name = b"bench", b"rawnoop"
    error = ffi.wasmtime_linker_define_func_unchecked(
        linker.ptr(),
        ctypes.create_string_buffer(module),
        len(module),
        ctypes.create_string_buffer(name),
        len(name),
        ty.ptr(),
        rawnoop,
        None,
        no_finalizer,
    )
    if error:
        raise wasmtime.WasmtimeError._from_ptr(error)
    return (rawnoop, ty)


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str | None]:
    """A private redis-server (the tests' harness starts it); None when none is installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    try:
        with containerd_env.redis_server(workdir, binary) as address:
            yield address
    except containerd_env.RedisError as exc:
        raise BenchError(str(exc)) from exc


def loop_us(call: Callable[[int], int], budget: float, batches: int = 5) -> dict[str, Any]:
    """µs per iteration of a wasm loop export ``call(n)`` (returns the OR of the statuses):
    (time of call(N) - time of call(0)) / N, N sized so a batch takes ~budget/batches s."""
    n = 4
    while True:
        began = time.perf_counter()
        status = call(n)
        elapsed = time.perf_counter() - began
        if status:
            raise BenchError(f"the loop's calls answered status bits {status:#x}, not OK")
        if elapsed > 0.02 or n >= 1 << 28:
            break
        n *= 4
    size = max(16, min(int(budget / batches / (elapsed / n)), (1 << 31) - 1))
    results = []
    for _ in range(batches):
        began = time.perf_counter()
        call(0)
        empty = time.perf_counter() - began
        began = time.perf_counter()
        status = call(size)
        elapsed = time.perf_counter() - began
        if status:
            raise BenchError(f"the loop's calls answered status bits {status:#x}, not OK")
        results.append(max(elapsed - empty, 0.0) / size * 1e6)
    return {"best": min(results), "median": statistics.median(results), "calls_per_batch": size}


def async_us(make_call: Callable[[], Any], budget: float, batches: int = 5) -> dict[str, Any]:
    """µs per awaited call of ``make_call()`` (a coroutine), one at a time on a fresh event
    loop (uvloop, as the node host runs, when installed)."""

    async def main() -> dict[str, Any]:
        await make_call()
        began, calls = time.perf_counter(), 0
        while time.perf_counter() - began < 0.05:
            await make_call()
            calls += 1
        size = max(10, int(budget / batches / ((time.perf_counter() - began) / calls)))
        results = []
        for _ in range(batches):
            t0 = time.perf_counter()
            for _ in range(size):
                await make_call()
            results.append((time.perf_counter() - t0) / size * 1e6)
        return {"best": min(results), "median": statistics.median(results), "calls_per_batch": size}

    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


# --------------------------------------------------------------------------- in process


def in_process(budget: float, use_redis: bool, progress: bool) -> dict[str, Any]:
    """Every in-process figure (see the module doc, steps 1-3)."""
    # The host's own warnings (a trap, a function moved to threads) would interleave with the
    # report: the measurements note what matters themselves.
    host_log = logging.getLogger("layotto")
    level = host_log.level
    host_log.setLevel(logging.CRITICAL)
    try:
        with tempfile.TemporaryDirectory(prefix="abi-bench-") as tmp:
            workdir = Path(tmp)
            redis_cm = redis_server(workdir) if use_redis else contextlib.nullcontext(None)
            with redis_cm as redis_address:
                return _in_process(workdir, redis_address, budget, progress)
    finally:
        host_log.setLevel(level)


def _in_process(workdir: Path, redis_address: str | None, budget: float, progress: bool) -> dict[str, Any]:
    import wasmtime
    import yaml

    from layotto.host import scheduler
    from layotto.host.abi_host import IMPLEMENTATIONS, HostInvoker, calling, parse_capabilities
    from layotto.host.components.registry import load_components
    from layotto.host.engine import CompiledModule
    from layotto.host.fastcall import EXTERN_FUNC, Func, set_epoch_deadline
    from layotto.host.function import Function, HostServices, Request
    from layotto.host.function_registry import FunctionRegistry
    from layotto.host.nanoprocess import build_linker
    from layotto.host.runtime import NodeRuntime

    doc: dict[str, Any] = {"state": {"state_demo": {"type": "sqlite", "metadata": {"keyPrefix": "none"}}}}
    if redis_address:
        doc["state"]["redis_demo"] = {
            "type": "redis",
            "metadata": {"redisHost": redis_address, "keyPrefix": "none", "redisKeyPrefix": "abi-bench:"},
        }
    components_yaml = workdir / "components.yaml"
    components_yaml.write_text(yaml.safe_dump(doc))
    (workdir / "state").mkdir()
    components = load_components(components_yaml, workdir / "state")
    stores = ["state_demo"] + (["redis_demo"] if redis_address else [])
    for store in stores:
        components.state(store).set(BOOK, INVENTORY)

    runtime = NodeRuntime(None)
    functions = FunctionRegistry()
    services = HostServices(components, HostInvoker(functions))
    paths = ensure_modules(*MODULES.values())
    made: list[Function] = []

    def function(module: str, function_id: str, caps: str = "", **kw: Any) -> Function:
        compiled = kw.pop("compiled", None) or runtime.load(paths[module], name=module)
        fn = Function(
            name=f"bench/{module}",
            function_id=function_id,
            engine=runtime.engine,
            linker=kw.pop("linker", runtime.linker),
            compiled=compiled,
            argv=[f"/{module}.wasm"],
            env=[],
            memory_limit=None,
            capabilities=parse_capabilities(caps),
            services=services,
            **kw,
        )
        made.append(fn)
        return fn

    results: dict[str, Any] = {"stores": stores, "redis": redis_address}
    errors: dict[str, str] = {}
    notes: dict[str, str] = {}
    kept: list[Any] = []
    try:
        hello = function("fn-hello", "fn-hello")
        fn2 = function("faas_fn2", "id_2", "state")
        fn1 = function("faas_fn1", "id_1", "invoke")
        for fn in (hello, fn2, fn1):
            functions.add(fn)

        # The benchmark module: the ABI plus two imports that do nothing: a Python function
        # through wasmtime-py's define_func (as the ABI's host functions are defined) and a
        # raw ctypes callback. Not imports the host knows: compiled here, not by engine.load.
        linker = build_linker(runtime.engine)
        linker.define_func("bench", "noop", wasmtime.FuncType([], [wasmtime.ValType.i32()]), lambda: 0)
        kept_alive = define_raw_noop(linker)
        module = wasmtime.Module(runtime.engine.engine, wasmtime.wat2wasm(bench_wat()))
        compiled = CompiledModule(
            "abi-bench", module, frozenset(e.name for e in module.exports), "compiled", reads_stdin=False
        )
        bench_fn = function("abi-bench", "abi-bench", "state,invoke", compiled=compiled, linker=linker)
        check = bench_fn.call_sync(Request(b"GET", b"/", b"", [], b""))
        if check.status != 200 or check.body != NOOP_BODY:
            raise BenchError(f"the benchmark module's handler answered {check.status} {check.body!r}")
        inst = bench_fn._new_instance()
        kept.append(inst)
        memory = inst.memory
        strings = string_layout()

        def export(name: str, params: int) -> Func:
            addr = inst.raw.export(name.encode(), EXTERN_FUNC)
            if addr is None:
                raise BenchError(f"the benchmark module lacks export {name}")
            return Func(inst.ctx, addr, params)

        def looped(name: str, *args: int) -> Callable[[int], int]:
            func = export(name, 1 + len(args))
            ctx = inst.abi

            def call(n: int) -> int:
                set_epoch_deadline(inst.ctx, 1 << 40)
                with calling(ctx):
                    return func.call(n, *args)

            return call

        def on_the_loop(call: Callable[..., Any]) -> Callable[..., Any]:
            """``call`` as the event loop's inline calls run: inside an inline scheduler.Call,
            so that a function it invokes runs on this thread, as in the live chain (outside
            any call, ``call_sync`` queues the call for a worker)."""

            def run(*args: Any) -> Any:
                scheduler.enter(scheduler.Call(inline=True))
                try:
                    return call(*args)
                finally:
                    scheduler.leave()

            return run

        def out_bytes(ptr_at: int, len_at: int) -> bytes:
            view = memory.view()
            ptr = int.from_bytes(view[ptr_at : ptr_at + 4], "little")
            length = int.from_bytes(view[len_at : len_at + 4], "little")
            return bytes(view[ptr : ptr + length])

        def measure(
            key: str,
            make: Callable[[], Callable[[int], int]],
            verify: Callable[[], str | None],
            impl: tuple[str, tuple[int, ...]] | None = None,
            wrap: Callable[[Callable[..., Any]], Callable[..., Any]] = lambda call: call,
        ) -> None:
            """Time loop export calls (results[key]) and, with ``impl`` (an ABI function's
            name and arguments), its host implementation called from Python (key_impl);
            each call through ``wrap``."""
            if progress:
                print(f"\r\033[K  in process: {key}", end="", file=sys.stderr, flush=True)
            try:
                call = wrap(make())
                if call(3):
                    raise BenchError("the first calls did not answer OK")
                why = verify()
                if why:
                    raise BenchError(why)
                results[key] = loop_us(call, budget, BATCHES)
                why = verify()
                if why:
                    raise BenchError(f"after the timed loops: {why}")
                if impl is not None:
                    fn, args = IMPLEMENTATIONS[("layotto", impl[0])], impl[1]
                    ctx = inst.abi
                    implementation = wrap(lambda: fn(ctx, *args))
                    status = implementation()
                    if status != "OK":
                        raise BenchError(f"{impl[0]} called from Python answered {status}")
                    results[f"{key}_impl"] = per_call_us(implementation, budget, BATCHES)
                    why = verify()
                    if why:
                        raise BenchError(f"after the calls from Python: {why}")
            except Exception as e:  # the host's internals move: report, do not crash
                errors[key] = f"{type(e).__name__}: {e}"

        # (a) the raw call from Python, and a wasm→wasm call for scale.
        nop = export("nop", 1)
        results["raw_call"] = per_call_us(lambda: nop.call1(7), budget, BATCHES)
        measure("wasm_internal", lambda: looped("loop_internal"), lambda: None)
        measure("host_noop", lambda: looped("loop_noop"), lambda: None)
        measure("host_rawnoop", lambda: looped("loop_rawnoop"), lambda: None)

        def clock_ok() -> str | None:
            ns = int.from_bytes(memory.view()[OUT_TIME : OUT_TIME + 8], "little", signed=True)
            return None if abs(ns - time.time_ns()) < 60e9 else f"layotto_time_now wrote {ns}"

        measure("time_now", lambda: looped("loop_time_now"), clock_ok, ("layotto_time_now", (OUT_TIME,)))

        # layotto_log: first with a recording logger (the line must arrive), then a null one.
        seen: list[tuple[str, str]] = []
        inst.abi.logger = lambda level, text: seen.append((level, text))
        looped("loop_log", *strings["log"])(1)
        if seen != [("info", LOG_LINE.decode())]:
            errors["log_null"] = f"layotto_log delivered {seen!r}"
        else:
            inst.abi.logger = lambda level, text: None
            log_args = (2, *strings["log"])
            measure(
                "log_null",
                lambda: looped("loop_log", *strings["log"]),
                lambda: None,
                ("layotto_log", log_args),
            )

        def value_is(expected: bytes, ptr_at: int, len_at: int) -> Callable[[], str | None]:
            def verify() -> str | None:
                got = out_bytes(ptr_at, len_at)
                return None if got == expected else f"the last result was {got!r}, not {expected!r}"

            return verify

        for store in stores:
            key = f"state_get_{'sqlite' if store == 'state_demo' else 'redis'}"
            measure(
                key,
                lambda store=store: looped("loop_state_get", *strings[store], *strings["book1"]),
                value_is(INVENTORY, OUT_VALUE, OUT_VALUE_LEN),
                ("layotto_state_get", (*strings[store], *strings["book1"], *STATE_OUTS)),
            )
            component = components.state(store)
            results[f"{key}_component"] = per_call_us(
                lambda component=component: component.get(BOOK), budget, BATCHES
            )

        for key, target, expected in (
            ("invoke_hello", "fn-hello", HELLO_INVOKED),
            ("invoke_fn2", "id_2", INVENTORY),
        ):
            measure(
                key,
                lambda target=target: looped("loop_invoke", *strings[target], *strings["book1"]),
                value_is(expected, OUT_RESULT, OUT_RESULT_LEN),
                ("layotto_invoke", (*strings[target], 0, 0, *strings["book1"], OUT_RESULT, OUT_RESULT_LEN)),
                wrap=on_the_loop,
            )

        # (b) whole requests, no HTTP. The invoker's request, as layotto_invoke sends it:
        invoked = Request(b"POST", b"/", b"", [(b"content-type", b"application/octet-stream")], BOOK.encode())
        get = Request(b"GET", b"/", f"name={BOOK}".encode(), [(b"host", b"127.0.0.1")], b"")

        def request(key: str, fn: Function, call: Callable[[], Any], expected: bytes) -> None:
            """Time whole requests; the timed ones are not checked one by one, so the
            function's own counters must show nothing but 200s meanwhile."""
            if progress:
                print(f"\r\033[K  in process: {key}", end="", file=sys.stderr, flush=True)
            # One call preempted past the inline budget earlier (this VM) would keep the
            # function off the loop here, where no worker run brings its cost back down.
            fn.cost = fn.wasm_cost = 0.0
            try:
                r = call()
                if r is None or r.status != 200 or r.body != expected:
                    raise BenchError(f"answered {r and r.status} {r and r.body!r}, not 200 {expected!r}")
                codes = collections.Counter(fn.stats.codes)
                results[key] = per_call_us(call, budget, BATCHES)
                other = {c: n for c, n in (fn.stats.codes - codes).items() if c != 200}
                if other:
                    notes[key] = f"{sum(other.values())} of the timed calls answered {other}"
            except Exception as e:
                errors[key] = f"{type(e).__name__}: {e}"

        hello_inline = function("fn-hello", "fn-hello-inline")
        request("hello_call_inline", hello_inline, lambda: hello_inline.call_inline(get), HELLO_BODY)
        if hello_inline.threaded:
            errors["hello_call_inline"] = "moved to worker threads (an inline call ran past its budget)"
            results.pop("hello_call_inline", None)
        # call_sync as an invoke makes it, inside the caller's inline call (on_the_loop).
        hello_invoked = on_the_loop(lambda: hello.call_sync(invoked))
        request("hello_invoked_call_sync", hello, hello_invoked, HELLO_INVOKED)
        request("hello_call_sync", hello, on_the_loop(lambda: hello.call_sync(get)), HELLO_BODY)
        request("fn2_invoked_call_sync", fn2, on_the_loop(lambda: fn2.call_sync(invoked)), INVENTORY)
        request("fn2_call_sync", fn2, on_the_loop(lambda: fn2.call_sync(get)), INVENTORY)
        request("fn1_call_sync", fn1, on_the_loop(lambda: fn1.call_sync(get)), CHAIN_BODY)

        # (c) the hop to a worker thread (every request to a function importing the ABI).
        hello_threaded = function("fn-hello", "fn-hello-threaded")
        hello_threaded.threaded = True
        try:
            results["hello_call_threaded"] = async_us(
                lambda: hello_threaded.call_threaded(get), budget, BATCHES
            )
        except Exception as e:
            errors["hello_call_threaded"] = f"{type(e).__name__}: {e}"
        if progress:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
        del kept_alive  # the linker and its instances are gone with the functions below
    finally:
        for inst in kept:
            inst.close()
        for fn in made:
            fn.stop()
        components.close()
    results["errors"] = errors
    results["notes"] = notes
    return results


# --------------------------------------------------------------------------- through containerd


def http_get(port: int, function_id: str, timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", f"/?name={BOOK}", headers={"id": function_id})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


BENCH_TOKEN = secrets.token_urlsafe(24)


def seed_state(c: Containerd, timeout: float = 20.0) -> dict[str, Any]:
    """``book1 = 100`` in ``state_demo`` through the host's gRPC Runtime API (unix socket),
    read back with GetState."""
    import grpc

    from layotto.host.grpc_api import METHODS, SERVICE
    from layotto.host.protocol import runtime_api_pb2 as pb

    sock = c.state / "layotto" / "runtime.sock"
    deadline = time.monotonic() + timeout
    while not sock.exists():
        if time.monotonic() > deadline:
            raise BenchError(f"the node host's Runtime API socket {sock} did not appear")
        time.sleep(0.05)
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout)

        def call(name: str, request: Any) -> Any:
            rpc = channel.unary_unary(
                f"/{SERVICE}/{name}",
                request_serializer=type(request).SerializeToString,
                response_deserializer=METHODS[name][1].FromString,
            )
            return rpc(request, timeout=timeout, metadata=(("authorization", f"Bearer {BENCH_TOKEN}"),))

        began = time.perf_counter()
        call(
            "SaveState",
            pb.SaveStateRequest(store_name="state_demo", states=[pb.StateItem(key=BOOK, value=INVENTORY)]),
        )
        saved_ms = (time.perf_counter() - began) * 1000
        got = call("GetState", pb.GetStateRequest(store_name="state_demo", key=BOOK))
    if got.data != INVENTORY:
        raise BenchError(f"GetState {BOOK} answered {got.data!r} after SaveState {INVENTORY!r}")
    return {"socket": str(sock), "save_ms": saved_ms, "etag": got.etag}


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if os.access(beside, os.X_OK) else shutil.which("py-spy")


def summarize_profile(raw: str, top: int = 14) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's ``--format raw`` output
    (``frame;frame;...;leaf count`` per line, frames ``name (file:line)``)."""
    self_counts: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f]
        code = [f for f in frames if not f.startswith(("process ", "thread "))]
        named = [_frame_name(f) for f in code]
        thread = next((f for f in frames if f.startswith("thread ")), "")
        threads[_thread_kind(thread, named)] += n
        if named:
            self_counts[named[-1]] += n
        # Inclusive: the project's own functions only (not the threading/asyncio scaffolding).
        for name in {_frame_name(f) for f in code if _is_project_frame(f)}:
            incl[name] += n
    share = {k: v / total for k, v in self_counts.most_common(top)} if total else {}
    inclusive = {k: v / total for k, v in incl.most_common(top)} if total else {}
    return {
        "samples": total,
        "self": share,
        "inclusive": inclusive,
        "threads": {k: v / total for k, v in threads.most_common()} if total else {},
    }


def _is_project_frame(frame: str) -> bool:
    where = frame.partition(" (")[2]
    return any(part in where for part in ("host/", "shim/", "layotto/"))


def _frame_name(frame: str) -> str:
    # "call_sync (layotto/host/function.py:620)" → "call_sync (function.py)"
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({Path(path).name})" if path else name


def _thread_kind(thread: str, named: list[str]) -> str:
    text = " ".join(named)
    if "_threaded_call" in text or "_worker (thread.py)" in text:
        return "function worker threads"
    if "run_forever" in text or "serve" in text or "main (" in text:
        return "event loop (ingress)"
    if "grpc" in text:
        return "gRPC server"
    return "other"


def profile_chain(c: Containerd, port: int, args: argparse.Namespace) -> dict[str, Any]:
    """One more wrk run of the chain with py-spy sampling the node host's GIL holder (wasm,
    SQLite and system calls run without the GIL: they are not in these samples)."""
    spy = py_spy()
    pid = host_pid(c)
    if spy is None or pid is None:
        return {"error": "py-spy is not installed (pip install py-spy)" if spy is None else "no host pid"}
    out = c.base / "chain-profile.txt"
    rate = 200
    argv = [spy, "record", "--pid", str(pid), "--duration", str(args.duration), "--rate", str(rate)]
    argv += ["--gil", "--nonblocking", "--threads", "--format", "raw", "--output", str(out)]
    spy_proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        time.sleep(0.5)  # let py-spy attach
        wrk = run_wrk(
            f"http://127.0.0.1:{port}/?name={BOOK}",
            function_id="id_1",
            duration=args.duration,
            connections=args.connections,
            threads=1,
            pid=pid,
        )
        spy_out, _ = spy_proc.communicate(timeout=args.duration + 60)
    finally:
        if spy_proc.poll() is None:
            spy_proc.kill()
            spy_proc.wait()
    if not out.exists():
        return {"error": f"py-spy wrote nothing: {spy_out.decode(errors='replace')[-500:]}"}
    summary = summarize_profile(out.read_text(errors="replace"))
    summary["rps_while_profiled"] = wrk["rps"]
    # --gil: a sample only when some thread holds the GIL, so samples / ticks is its busy share.
    summary["gil_busy"] = summary["samples"] / (rate * args.duration)
    if args.json:
        kept = args.json.with_suffix(".profile.txt")
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, kept)
        summary["raw_file"] = str(kept)
    return summary


def host_tasks(c: Containerd) -> list[dict[str, Any]]:
    """The node host's ``GET /tasks`` on its admin socket (what ``layotto ps`` shows)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(c.state / "layotto" / "admin.sock"))
            sock.sendall(b"GET /tasks HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return json.loads(data.split(b"\r\n\r\n", 1)[1])
    except (OSError, ValueError, IndexError):
        return []


def host_counters(pid: int | None) -> dict[str, float] | None:
    """The node host's user and system CPU seconds and its threads' context switches so far."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        out = {"user": int(fields[11]) / tick, "sys": int(fields[12]) / tick, "cs_vol": 0.0, "cs_invol": 0.0}
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        out["cs_vol"] += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        out["cs_invol"] += int(line.split()[1])
        return out
    except (OSError, ValueError, IndexError):
        return None


def through_containerd(args: argparse.Namespace) -> dict[str, Any]:
    """Step 4 of the module doc (and 5 with --profile); containerd always stopped."""
    c = Containerd(
        path_prepend=[Path(sys.executable).parent],
        cri=False,
        snapshotter=default_snapshotter(),
        log_level=args.log_level,
    )
    components_yaml = c.base / "components.yaml"
    components_yaml.write_text("state:\n  state_demo: {type: sqlite, metadata: {keyPrefix: none}}\n")
    # The node host reads its components file from LAYOTTO_COMPONENTS; '' serves the gRPC
    # Runtime API on the unix socket only (no fight over 127.0.0.1:34904 with another host).
    # The seeding app's Runtime API token, as an operator provisions one.
    policy = c.base / "policy.yaml"
    policy.write_text(f"runtimeApi:\n  apps: [{{namespace: default, app: bench, token: {BENCH_TOKEN}}}]\n")
    c.env.update(
        {
            "LAYOTTO_COMPONENTS": str(components_yaml),
            "LAYOTTO_GRPC_ADDRESS": "",
            "LAYOTTO_POLICY": str(policy),
        }
    )
    fleet = Fleet(c, progress_enabled(args.quiet))
    progress = progress_enabled(args.quiet)
    results: dict[str, Any] = {"snapshotter": c.snapshotter}
    try:
        c.start()
        images = c.base / "images"
        images.mkdir()
        import wasmtime

        paths = ensure_modules(*MODULES.values())
        paths["abi-noop"] = images / "abi-noop.wasm"
        paths["abi-noop"].write_bytes(wasmtime.wat2wasm(bench_wat(abi_only=True)))
        for kind in (HELLO, NOOP, FN2, FN1):
            module = MODULES.get(kind.key, "abi-noop")
            tar = images / f"{kind.key}.tar"
            build_image(tar, {f"/{module}.wasm": paths[module]}, name=kind.image, cmd=[f"/{module}.wasm"])
            c.import_image(tar)
        ids = {kind.key: fleet.start(kind, 1, 1, label=kind.key)[1] for kind in (FN2, FN1, HELLO, NOOP)}
        port = c.host_port("http")
        pid = host_pid(c)
        results["seed"] = seed_state(c)
        for _kind, fid, expected in TARGETS:
            status, body = http_get(port, fid)
            if status != 200 or body != expected:
                raise BenchError(f"GET /?name={BOOK} (id {fid}) answered {status} {body[:200]!r}")
        http: dict[str, Any] = {}
        url = f"http://127.0.0.1:{port}/?name={BOOK}"

        def load(kind: Kind, fid: str) -> dict[str, Any]:
            if progress:
                print(f"\r\033[K  wrk {fid} (2 + {args.duration} s)", end="", file=sys.stderr, flush=True)
            run_wrk(url, function_id=fid, duration=2, connections=args.connections, threads=1, pid=pid)
            before = host_counters(pid)
            r = run_wrk(
                url, function_id=fid, duration=args.duration, connections=args.connections, threads=1, pid=pid
            )
            after = host_counters(pid)
            if before and after and r["requests"]:
                r["host_per_request"] = {
                    k: (after[k] - before[k]) / r["requests"] * (1e6 if k in ("user", "sys") else 1)
                    for k in after
                }  # user/sys in µs, context switches in counts
            row = next((t for t in host_tasks(c) if t.get("function_id") == fid), {})
            r.update(function_id=fid, label=kind.label, host_mode=row.get("mode"))
            r.update(host_invocations=row.get("invocations"), host_errors=row.get("errors"))
            if r["non_2xx"] or r["socket_errors"]:
                r["warning"] = f"{r['non_2xx']} non-2xx responses, {r['socket_errors']} socket errors"
            return r

        flips = 0
        for kind, fid, expected in TARGETS:
            r = load(kind, fid)
            # An inline call preempted past its budget (wall-clock epochs: a busy machine
            # does it) moves fn-hello to worker threads for good: run a new container, twice
            # at most, rather than report the threaded path as fn-hello's.
            while kind is HELLO and r.get("host_mode") == "workers" and flips < 2:
                flips += 1
                fleet.delete(ids[kind.key])
                ids[kind.key] = fleet.start(kind, 1, 1, label=kind.key)[1]
                status, body = http_get(port, fid)
                if status != 200 or body != expected:
                    raise BenchError(f"the new {fid} answered {status} {body[:200]!r}")
                r = load(kind, fid)
            if kind is HELLO and r.get("host_mode") == "workers":
                r["warning"] = (
                    "the host moved fn-hello to worker threads (an inline call ran past its budget)"
                )
            http[kind.key] = r
        results["hello_moved_to_threads"] = flips
        if progress:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
        for _kind, fid, expected in TARGETS:  # still right after the load
            status, body = http_get(port, fid)
            if status != 200 or body != expected:
                raise BenchError(f"after wrk: id {fid} answered {status} {body[:200]!r}")
        results["http"] = http
        results["host_threads"] = len(os.listdir(f"/proc/{pid}/task")) if pid else None
        if args.profile:
            results["profile"] = profile_chain(c, port, args)
    except (BenchError, ContainerdError, CtrError) as e:
        print(f"containerd log ({c.log}), last lines:\n{c.log_tail(20)}", file=sys.stderr)
        host_log = c.state / "layotto" / "host.log"
        if host_log.exists():
            tail = host_log.read_text(errors="replace").splitlines()[-20:]
            print(f"node host log ({host_log}), last lines:\n" + "\n".join(tail), file=sys.stderr)
        raise e
    finally:
        if fleet.live and c.running:
            try:
                fleet.delete()
            except (BenchError, ContainerdError, CtrError, subprocess.TimeoutExpired) as e:
                print(f"abi: cleanup: {e}", file=sys.stderr)
        c.stop()
    return results


# --------------------------------------------------------------------------- report


def _best(results: dict[str, Any], key: str) -> float | None:
    value = results.get(key)
    return value["best"] if isinstance(value, dict) else None


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def abi_rows(micro: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(label, key, the backend's key) of the per-call table."""
    rows: list[tuple[str, str, str | None]] = [
        ("raw wasm call from Python (fastcall.Func)", "raw_call", None),
        ("wasm -> wasm call (internal function)", "wasm_internal", None),
        ("wasm -> host: bare ctypes callback (C API)", "host_rawnoop", None),
        ("wasm -> host: Python lambda (define_func)", "host_noop", None),
        ("layotto_time_now", "time_now", None),
        ("layotto_log (null logger)", "log_null", None),
        ("layotto_state_get: SQLite (embedded)", "state_get_sqlite", "state_get_sqlite_component"),
    ]
    if "redis_demo" in micro.get("stores", []):
        rows.append(("layotto_state_get: Redis (loopback)", "state_get_redis", "state_get_redis_component"))
    rows += [
        ("layotto_invoke fn-hello (in process)", "invoke_hello", "hello_invoked_call_sync"),
        ("layotto_invoke id_2 (faas_fn2: state_get)", "invoke_fn2", "fn2_invoked_call_sync"),
    ]
    return rows


def abi_split(micro: dict[str, Any], key: str, backend_key: str | None) -> dict[str, float | None]:
    """One ABI call cut in three: crossing (wasm -> host and back: wasmtime-py's trampoline and
    the host function's dispatch) = from wasm - the implementation called from Python; ABI
    code (checks, guest memory, allocation) = implementation - backend; the backend itself
    (the component's get, the callee's call_sync)."""
    total, impl = _best(micro, key), _best(micro, f"{key}_impl")
    backend = _best(micro, backend_key) if backend_key else None
    if key in ("host_noop", "host_rawnoop"):
        return {"crossing": total, "code": None, "backend": None}
    return {
        "crossing": None if total is None or impl is None else total - impl,
        "code": None if impl is None else impl - (backend or 0.0),
        "backend": backend,
    }


def report(results: dict[str, Any]) -> str:
    nan = float("nan")
    lines: list[str] = []
    micro = results.get("micro")
    if micro:
        raw = _best(micro, "raw_call")
        lines += [
            f"ABI call cost, in process (wasmtime {results.get('wasmtime', '?')}, "
            f"Python {results['python']}, {results['cpus']} CPUs): µs per call, best of {BATCHES} batches",
            "  (ABI calls are timed from inside wasm: one export calls the import N times. crossing: wasm ->",
            "   host -> wasm; ABI code: checks, guest memory, allocation; backend: the component's get or",
            "   the callee's Function.call_sync; crossing = total - the implementation called from Python)",
            "",
            f"  {'':<44}{'µs':>9}{'median':>9}{'x raw':>8}{'crossing':>10}{'ABI code':>10}{'backend':>9}",
        ]
        for label, key, backend_key in abi_rows(micro):
            value = _best(micro, key)
            if value is None:
                why = micro.get("errors", {}).get(key, "not run")
                lines.append(f"  {label:<44}      n/a  ({why})")
                continue
            median = micro[key]["median"]
            ratio = value / raw if raw else nan
            split = abi_split(micro, key, backend_key) if key != "raw_call" else {}
            lines.append(
                f"  {label:<44}{value:9.3f}{median:9.3f}{ratio:8.1f}"
                f"{_fmt(split.get('crossing'), '10.2f'):>10}{_fmt(split.get('code'), '10.2f'):>10}"
                f"{_fmt(split.get('backend'), '9.2f'):>9}"
            )
        lines += [
            "",
            "  whole requests in process (no HTTP), µs per request:",
        ]
        for label, key in (
            ("fn-hello Function.call_inline (ingress fast path)", "hello_call_inline"),
            ("fn-hello call_sync, on the loop (as an invoke runs it)", "hello_call_sync"),
            ("fn-hello call_threaded: worker-thread hop, one at a time", "hello_call_threaded"),
            ("faas_fn2 (id_2) on the loop: handler + state_get", "fn2_call_sync"),
            ("faas_fn1 (id_1) on the loop: handler + invoke id_2", "fn1_call_sync"),
        ):
            lines.append(f"  {label:<58}{_fmt(_best(micro, key), '9.2f'):>9}")
        for key, err in micro.get("errors", {}).items():
            if not any(key == r[1] for r in abi_rows(micro)):  # shown in the table
                lines.append(f"  n/a {key}: {err}")
        for key, note in micro.get("notes", {}).items():
            lines.append(f"  note: {key}: {note}")
        if micro.get("redis") is None:
            lines.append("  (no Redis row: --no-redis, or no redis-server installed)")
    chain = results.get("chain")
    if chain:
        http = chain["http"]
        lines += [
            "",
            f"the demo chain through containerd: `wrk -t1 -c{results['connections']} "
            f"-d{results['duration']}s --latency` on loopback ({results['cpus']} CPUs shared with wrk)",
            "",
            f"  {'':<38}{'req/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}"
            f"{'host µs/req':>12}{'user':>6}{'sys':>6}{'cs/req':>7}{'host':>6}{'wrk':>5}{'other':>6}  mode",
        ]
        for kind in (HELLO, NOOP, FN2, FN1):
            r = http.get(kind.key)
            if not r:
                continue
            pct = r["percentiles_ms"]
            per = r.get("host_per_request") or {}
            switches = per["cs_vol"] + per["cs_invol"] if per else None
            lines.append(
                f"  {kind.label:<38}{r['rps']:9,.0f}{pct.get('50', nan):8.2f}{pct.get('99', nan):8.2f}"
                f"{r.get('max_ms', nan):8.1f}{_fmt(r.get('server_cpu_us_per_request'), '12.1f'):>12}"
                f"{_fmt(per.get('user'), '6.0f'):>6}{_fmt(per.get('sys'), '6.0f'):>6}"
                f"{_fmt(switches, '7.1f'):>7}"
                f"{r.get('server_cpu_cores', nan):6.2f}{r['wrk_cpu_cores']:5.2f}"
                f"{r.get('other_cpu_cores', nan):6.2f}  {r.get('host_mode') or '?'}"
            )
            if r.get("warning"):
                lines.append(f"    warning: {r['warning']}")
        lines.append(
            "  (host µs/req: the node host's CPU per request, all its threads, split in user and sys;"
            "\n   cs/req: its threads' context switches per request; host, wrk, other: CPU cores used by the"
            "\n   node host, by wrk and by everything else; mode: inline, or worker threads)"
        )
        hello, fn1 = http.get("hello"), http.get("fn1")
        if hello and fn1:
            lines.append(
                f"  chain / fn-hello: {fn1['rps'] / hello['rps']:.2f}x the req/s, "
                f"p99 {fn1['percentiles_ms'].get('99', nan) / hello['percentiles_ms'].get('99', nan):.1f}x"
            )
        seed = chain.get("seed")
        if seed:
            lines.append(
                f"  seeded book1 = 100 with SaveState on {seed['socket']} ({seed['save_ms']:.1f} ms)"
            )
        lines += where_the_time_goes(results)
        profile = chain.get("profile")
        if profile:
            lines += profile_lines(profile)
    lines += load_note(results)
    return "\n".join(lines)


def where_the_time_goes(results: dict[str, Any]) -> list[str]:
    """Each step from fn-hello to the chain: the node host's extra CPU per request against
    the same step's cost in process."""
    micro = results.get("micro") or {}
    http = results["chain"]["http"]
    host = {k: http[k].get("server_cpu_us_per_request") for k in http}
    if any(host.get(k) is None for k in ("hello", "noop", "fn2", "fn1")):
        return []

    def diff(a: str, b: str) -> float | None:
        x, y = _best(micro, a), _best(micro, b)
        return None if x is None or y is None else x - y

    inline = _best(micro, "hello_call_inline")
    steps = [
        ("fn-hello: HTTP layer + inline call", host["hello"], inline, "the call alone, call_inline"),
        (
            "+ the worker-thread path (abi-noop)",
            host["noop"] - host["hello"],
            diff("hello_call_threaded", "hello_call_sync"),
            "the hop, one request at a time",
        ),
        (
            "+ faas_fn2's handler + state_get",
            host["fn2"] - host["noop"],
            diff("fn2_call_sync", "hello_call_sync"),
            "faas_fn2 - fn-hello call_sync",
        ),
        (
            "+ faas_fn1's handler + invoke id_2",
            host["fn1"] - host["fn2"],
            diff("fn1_call_sync", "fn2_call_sync"),
            "faas_fn1 - faas_fn2 call_sync",
        ),
    ]
    lines = [
        "",
        "  where the time goes: node host CPU µs per request, step by step, against the same step in process",
        f"  {'':<40}{'host':>8}{'in process':>12}",
    ]
    for label, value, inproc, what in steps:
        lines.append(f"  {label:<40}{value:8.1f}{_fmt(inproc, '12.1f'):>12}  ({what})")
    if http["hello"].get("host_mode") == "workers":
        lines.append("  (not a clean split: fn-hello ran on worker threads too, see its warning above)")
    lines.append(f"  {'= the chain':<40}{host['fn1']:8.1f}{_fmt(_best(micro, 'fn1_call_sync'), '12.1f'):>12}")
    return lines


def profile_lines(profile: dict[str, Any]) -> list[str]:
    if "error" in profile:
        return ["", f"  profile: n/a ({profile['error']})"]
    lines = [
        "",
        f"  py-spy --gil on the node host during one more chain run ({profile['samples']} samples, "
        f"{profile['rps_while_profiled']:,.0f} req/s while sampled):",
        f"    the GIL was held {profile.get('gil_busy', float('nan')):.0%} of the time; by thread: "
        + ", ".join(f"{k} {v:.0%}" for k, v in profile["threads"].items()),
        f"    {'self (leaf) share of GIL time':<52}{'':>6}  inclusive share (layotto code)",
    ]
    selfs = list(profile["self"].items())
    incl = list(profile["inclusive"].items())
    for i in range(max(len(selfs), len(incl))):
        left = f"{selfs[i][0][:50]:<52}{selfs[i][1]:6.1%}" if i < len(selfs) else " " * 58
        right = f"{incl[i][1]:6.1%}  {incl[i][0][:50]}" if i < len(incl) else ""
        lines.append(f"    {left}  {right}")
    if profile.get("raw_file"):
        lines.append(f"    (collapsed stacks: {profile['raw_file']})")
    return lines


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.abi",
        description="The cost of Runtime ABI calls (state get, invoke) against a raw wasm call, in "
        "process; and requests per second of the FaaS demo chain (faas_fn1 -> faas_fn2 -> state) "
        "through containerd and the HTTP ingress, against fn-hello.",
    )
    parser.add_argument("--duration", type=positive, default=10, help="seconds per wrk run (10)")
    parser.add_argument("--connections", type=positive, default=32, help="wrk connections (32)")
    parser.add_argument(
        "--micro-seconds", type=float, default=1.0, help="seconds per in-process measurement (1.0)"
    )
    parser.add_argument("--no-micro", action="store_true", help="skip the in-process measurements")
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis state_get")
    parser.add_argument("--no-containerd", action="store_true", help="in-process measurements only")
    parser.add_argument(
        "--profile", action="store_true", help="one more chain run under py-spy: where the host spends it"
    )
    common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.no_micro and args.no_containerd:
        print("abi: nothing to run (--no-micro and --no-containerd)", file=sys.stderr)
        return 2
    if not args.no_containerd:
        why = preflight()
        if why is None and not shutil.which("wrk"):
            why = "wrk is not installed (apt-get install -y wrk)"
        if why:
            print(f"abi: {why}", file=sys.stderr)
            return 2
    from importlib.metadata import version

    results: dict[str, Any] = machine_info()
    results.update(
        duration=args.duration,
        connections=args.connections,
        wasmtime=version("wasmtime"),
        python=platform.python_version(),
    )
    progress = progress_enabled(args.quiet)
    try:
        if not args.no_micro:
            results["micro"] = in_process(args.micro_seconds, not args.no_redis, progress)
        if not args.no_containerd:
            results["chain"] = through_containerd(args)
    except (
        BenchError,
        ContainerdError,
        CtrError,
        subprocess.CalledProcessError,
        subprocess.TimeoutExpired,
        OSError,
    ) as e:
        print(f"abi: {e}", file=sys.stderr)
        return 1
    results["loadavg_after"] = os.getloadavg()[0]
    print(report(results))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Invocation benchmark: fn-hello through the node host's HTTP ingress, and where the time goes.

``python -m tests.bench.invoke [--duration S] [--connections C] [--json PATH]``:

1. in this process, without containerd: builds a :class:`layotto.host.function.Function`
   on fn-hello with :class:`layotto.host.runtime.NodeRuntime`, as the task service does,
   and times one call at each layer, innermost first (best of 5 batches, µs per call): a
   bare call of the module's allocator (stock wasmtime-py ``Func.__call__``, the raw
   ``fastcall.Func`` C-API path, the host instance's own entry point); allocate + copy the
   request in + call the handler (no decoding); ``Instance.call`` (adds the ABI's response
   decoding); ``Function.call_inline`` (adds request encoding, the instance pool, stats);
   for the fresh mode, ``call_inline`` on a function that creates an instance per call,
   and creating + closing one instance on its own;
2. a bare ingress: the host's own ``layotto.host.ingress`` under uvloop in a child process
   of its own (no containerd, no node host), serving (a) a stub that answers without wasm
   (the HTTP layer alone), (b) a real fn-hello Function, (c) the same with a fresh instance
   per request; each loaded with wrk like the node host below;
3. through containerd: starts a private containerd, runs two fn-hello containers with
   ``ctr run -d`` (``fn-*``: default pooled instances; ``fn-fresh-*``: annotation
   ``layotto.io/instance-mode=fresh``) and loads each through the node host's ingress with
   ``wrk -t1 -c32 -d10s --latency`` on loopback (after a 2 s warm-up run), with the CPU the
   host, wrk and everything else used; the host's /metrics must count every request, and
   its admin socket must still show the function on the inline path afterwards;
4. prints req/s and p50/p99 against the targets (reused >= 50,000 req/s with p99 <= 2 ms;
   fresh >= 25,000 req/s with p99 <= 3 ms; informational: the exit status is 0 either
   way), and the per-request split: HTTP layer vs ABI/copying vs the raw wasm call;
5. ``--json PATH`` writes every number, wrk's output included.

containerd is always stopped at the end, taking the node host along; bare ingresses are
killed after their run.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import inspect
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.bench.coldstart import BenchError, cpu_seconds
from tests.bench.startrate import (
    FN,
    Fleet,
    Kind,
    common_arguments,
    ensure_modules,
    host_pid,
    load_note,
    machine_cpu_seconds,
    positive,
    run_fleet_benchmark,
    write_json,
)
from tests.containerd_env import Containerd

TARGETS = {
    "reuse": {"rps": 50_000.0, "p99_ms": 2.0},
    "fresh": {"rps": 25_000.0, "p99_ms": 3.0},
}
REUSE = Kind("fn", "fn-hello, reused instances", FN.image, FN.runtime)
FRESH = Kind(
    "fn-fresh",
    "fn-hello, fresh instance per request",
    FN.image,
    FN.runtime,
    annotations=(("layotto.io/instance-mode", "fresh"),),
)
NAME = "bench"
EXPECTED_BODY = f"Hello, {NAME}!\n".encode()

# A bare ingress: the host's own HTTP ingress (under uvloop, as in the node host) in a
# process of its own, without containerd, the Task API or anything else the node host runs.
# argv[1] "stub": a function that answers a constant response without wasm (the HTTP layer
# alone); "reuse" / "fresh": a real fn-hello Function built as the task service builds it.
BARE_INGRESS = r"""
import asyncio, sys
from pathlib import Path
from layotto.host.function import Response
from layotto.host.function_registry import FunctionRegistry
from layotto.host.ingress import Ingress

class Stub:
    id = "fn"
    RESPONSE = Response(200, [(b"content-type", b"text/plain")], b"Hello, bench!\n")
    def call_inline(self, request):
        return self.RESPONSE

def real(fresh):
    from layotto.host.function import Function
    from layotto.host.runtime import NodeRuntime
    runtime = NodeRuntime(None)
    compiled = runtime.load(Path(sys.argv[2]), name="fn-hello")
    engine, linker = runtime.engine, runtime.linker
    if fresh and hasattr(runtime, "pooled"):
        engine, linker = runtime.pooled()
        compiled = runtime.engine.to_pooled(compiled)
    return Function(name="bench/fn", function_id="fn", engine=engine, linker=linker, compiled=compiled,
                    argv=["/fn-hello.wasm"], env=[], memory_limit=None, fresh_instances=fresh)

fn = Stub() if sys.argv[1] == "stub" else real(sys.argv[1] == "fresh")

async def main():
    registry = FunctionRegistry()
    registry.add(fn)
    port = await Ingress(registry).listen("127.0.0.1", 0)
    print(port, flush=True)
    while True:
        await asyncio.sleep(0.5)
        if getattr(fn, "threaded", False):
            print("moved to worker threads", file=sys.stderr, flush=True)
            return

try:
    import uvloop
except ImportError:
    asyncio.run(main())
else:
    uvloop.run(main())
"""


# --------------------------------------------------------------------------- in-process


def per_call_us(fn: Callable[[], object], budget: float, batches: int = 5) -> dict[str, float]:
    """µs per call of *fn*: batches sized to take ~budget/batches seconds each."""
    fn()
    began = time.perf_counter()
    calls = 0
    while time.perf_counter() - began < 0.02:
        fn()
        calls += 1
    per = (time.perf_counter() - began) / calls
    size = max(10, int(budget / batches / per))
    results = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(size):
            fn()
        results.append((time.perf_counter() - t0) / size * 1e6)
    return {"best": min(results), "median": statistics.median(results), "calls_per_batch": size}


def microbenchmarks(budget: float) -> dict[str, Any]:
    """Time each layer of one fn-hello call inside this process (see the module doc)."""
    import wasmtime

    from layotto.host import capi, fastcall
    from layotto.host.function import INLINE_BUDGET_TICKS, Function, Request, encode_request
    from layotto.host.runtime import NodeRuntime

    wasm = ensure_modules("fn-hello")["fn-hello"]
    runtime = NodeRuntime(None)
    compiled = runtime.load(wasm, name="fn-hello")

    def function(fresh: bool) -> Function:
        engine, linker, module = runtime.engine, runtime.linker, compiled
        if fresh and hasattr(runtime, "pooled"):
            # As the task service does: fresh instances come from the pooling allocator.
            engine, linker = runtime.pooled()
            module = runtime.engine.to_pooled(compiled)
        return Function(
            name="bench/fn-hello",
            function_id="fn-hello",
            engine=engine,
            linker=linker,
            compiled=module,
            argv=["/fn-hello.wasm"],
            env=[],
            memory_limit=None,
            fresh_instances=fresh,
        )

    request = Request(b"GET", b"/", f"name={NAME}".encode(), [(b"host", b"127.0.0.1"), (b"id", b"fn")], b"")
    payload = encode_request(request)
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    flips: dict[str, int] = {}  # measurements discarded: the function left the inline path

    def measure(key: str, make: Callable[[], Callable[[], object]], check: Callable[[object], bool]) -> None:
        try:
            call = make()
            value = call()
            if not check(value):
                raise BenchError(f"unexpected result {value!r}")
            results[key] = per_call_us(call, budget)
        except Exception as e:  # the host's internals move: report, do not crash
            errors[key] = f"{type(e).__name__}: {e}"

    def ok_response(r: object) -> bool:
        return getattr(r, "status", None) == 200 and getattr(r, "body", None) == EXPECTED_BODY

    reuse = function(False)
    fresh = function(True)
    stock_store: list[Any] = []
    try:
        # (1) the allocator, bare: stock wasmtime-py, a fastcall.Func over wasmtime-py's objects,
        # the host's own entry point.
        def stock(keep: bool = True) -> tuple[wasmtime.Store, wasmtime.Func]:
            store = wasmtime.Store(runtime.engine.engine)
            store.set_epoch_deadline(1 << 40)
            instance = runtime.linker.instantiate(store, compiled.module)
            exports = instance.exports(store)
            init = exports.get("_initialize")
            if isinstance(init, wasmtime.Func):
                init(store)
            alloc = exports["proxy_on_memory_allocate"]
            assert isinstance(alloc, wasmtime.Func)
            if keep:
                stock_store.append(store)
            return store, alloc

        def make_stock() -> Callable[[], object]:
            store, alloc = stock()
            return lambda: alloc(store, 1)

        def make_rawfunc() -> Callable[[], object]:
            store, alloc = stock()
            raw = fastcall.Func(capi.context_address(store), capi.func_address(alloc), 1)
            return lambda: raw.call1(1) if alloc else 0  # alloc: keeps the wasmtime_func_t alive

        # Each allocates 1 byte that is never freed (fn-hello exports no free): a few MB in all.
        measure("alloc_stock_func_call", make_stock, lambda v: isinstance(v, int) and v > 0)
        measure("alloc_rawfunc", make_rawfunc, lambda v: isinstance(v, int) and v > 0)

        def make_host_alloc() -> Callable[[], object]:
            inst = reuse._new_instance()
            stock_store.append(inst)
            return lambda: inst.alloc.call1(1)

        measure("alloc_host_instance", make_host_alloc, lambda v: isinstance(v, int) and v > 0)

        # (2) allocate + copy in + handler, no decoding (the handler frees the request buffer).
        def make_handler() -> Callable[[], object]:
            inst = reuse._new_instance()
            stock_store.append(inst)
            alloc, memory, out = inst.alloc, inst.memory, inst.out
            handle = fastcall.Func(inst.ctx, inst.raw.handler_addr, 4)
            size = len(payload)

            def call() -> int:
                ptr = alloc.call1(size)
                view = memory.view()
                view[ptr : ptr + size] = payload
                return handle.call(ptr, size, out, out + 4)

            return call

        measure("alloc_copy_handle", make_handler, lambda v: v == 0)

        # (3) Instance.call: the whole ABI, the response decoded into a Response.
        def make_instance_call() -> Callable[[], object]:
            inst = reuse._new_instance()
            stock_store.append(inst)
            first = next(iter(inspect.signature(inst.call).parameters))
            arg = request if first == "request" else payload
            return lambda: inst.call(arg, INLINE_BUDGET_TICKS, "inline")

        measure("instance_call", make_instance_call, ok_response)

        # (4) Function.call_inline: what the ingress calls. An inline call that runs past its
        # budget (wall-clock epochs: a preempted thread counts) moves the function to worker
        # threads for good, after which call_inline returns None at once: such a run is
        # discarded and counted, and measured again on a new Function.
        for key, is_fresh in (("call_inline_reuse", False), ("call_inline_fresh", True)):
            for _attempt in range(3):
                fn = function(is_fresh)
                try:
                    measure(key, lambda fn=fn: lambda: fn.call_inline(request), ok_response)
                    moved = fn.threaded
                finally:
                    fn.stop()
                if not moved:
                    break
                results.pop(key, None)
                flips[key] = flips.get(key, 0) + 1
            if key not in results and key not in errors:
                errors[key] = "the function moved to worker threads in every attempt"

        def make_instance_lifecycle(fn: Function) -> Callable[[], Callable[[], object]]:
            def make() -> Callable[[], object]:
                def cycle() -> object:
                    inst = fn._new_instance()
                    close = getattr(inst, "close", None)
                    if close is not None:
                        close()
                    return inst

                return cycle

            return make

        measure("instance_create_close", make_instance_lifecycle(reuse), lambda v: v is not None)
        if fresh.engine is not reuse.engine:
            measure("instance_create_close_pooled", make_instance_lifecycle(fresh), lambda v: v is not None)
        # For scale: the stock wasmtime-py way (Store + Linker.instantiate + exports).
        measure("instance_stock_api", lambda: lambda: stock(keep=False)[1], lambda v: v is not None)
    finally:
        reuse.stop()
        fresh.stop()
        for kept in stock_store:
            close = getattr(kept, "close", None)
            if close is not None:
                close()
        stock_store.clear()
        gc.collect()
    results["errors"] = errors
    results["moved_to_threads"] = flips
    return results


# --------------------------------------------------------------------------- wrk

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def parse_wrk(text: str) -> dict[str, Any]:
    """Requests/s, latency percentiles (ms), counts and errors from wrk's --latency output."""
    out: dict[str, Any] = {"percentiles_ms": {}}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m:
        raise BenchError(f"cannot read wrk's output:\n{text}")
    out["rps"] = float(m.group(1))
    for pct, value, unit in re.findall(r"^\s+(\d+(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M):
        out["percentiles_ms"][pct] = _ms(value, unit)
    m = re.search(r"Latency\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s|m)", text)
    if m:
        out["mean_ms"] = _ms(m.group(1), m.group(2))
        out["stdev_ms"] = _ms(m.group(3), m.group(4))
        out["max_ms"] = _ms(m.group(5), m.group(6))
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    out["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    out["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(map(int, m.groups())) if m else 0
    return out


def run_wrk(
    url: str,
    *,
    function_id: str | None,
    duration: int,
    connections: int,
    threads: int,
    pid: int | None,
) -> dict[str, Any]:
    """wrk against *url* (with an ``id`` header), plus the server's and wrk's CPU time."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency"]
    if function_id:
        argv += ["-H", f"id: {function_id}"]
    argv.append(url)
    server0, machine0 = cpu_seconds(pid), machine_cpu_seconds()
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    server1, machine1 = cpu_seconds(pid), machine_cpu_seconds()
    if r.returncode != 0:
        raise BenchError(f"{subprocess.list2cmdline(argv)} exited {r.returncode}:\n{r.stdout}{r.stderr}")
    out = parse_wrk(r.stdout)
    out["argv"] = argv
    out["output"] = r.stdout
    seconds = duration
    out["wrk_cpu_cores"] = (kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime) / seconds
    out["machine_cpu_cores"] = (machine1 - machine0) / seconds
    if server0 is not None and server1 is not None and out["requests"]:
        out["server_cpu_cores"] = (server1 - server0) / seconds
        out["server_cpu_us_per_request"] = (server1 - server0) / out["requests"] * 1e6
        # Everything else the machine ran meanwhile (other processes, the kernel's softirqs
        # charged elsewhere): CPU the server and wrk could not have.
        out["other_cpu_cores"] = out["machine_cpu_cores"] - out["server_cpu_cores"] - out["wrk_cpu_cores"]
    return out


def get_once(port: int, function_id: str | None) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", f"/?name={NAME}", headers={"id": function_id} if function_id else {})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200 or body != EXPECTED_BODY:
        raise BenchError(f"GET (id {function_id}) answered {resp.status} {body[:200]!r}")


def bare_ingress(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """wrk against a bare ingress in a child process (see BARE_INGRESS)."""
    wasm = ensure_modules("fn-hello")["fn-hello"]
    proc = subprocess.Popen(
        [sys.executable, "-c", BARE_INGRESS, mode, str(wasm)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            err = proc.stderr.read() if proc.poll() is not None else ""
            raise BenchError(f"the bare ingress ({mode}) did not start: {line!r} {err[-2000:]}")
        port = int(line)
        get_once(port, "fn")
        url = f"http://127.0.0.1:{port}/?name={NAME}"
        kw = {"function_id": "fn", "connections": args.connections, "threads": 1, "pid": proc.pid}
        run_wrk(url, duration=2, **kw)
        result = run_wrk(url, duration=args.duration, **kw)
        if proc.poll() is not None:
            result["warning"] = proc.stderr.read().strip()[-500:] or "the bare ingress exited"
        return result
    finally:
        proc.kill()
        proc.wait()


def admin_tasks(c: Containerd) -> list[dict[str, Any]] | None:
    """The host's ``GET /tasks`` (what ``layotto ps`` shows), or None when unavailable."""
    path = c.state / "layotto" / "admin.sock"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(b"GET /tasks HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return json.loads(data.split(b"\r\n\r\n", 1)[1])
    except (OSError, ValueError, IndexError):
        return None


def metrics_invocations(port: int) -> dict[tuple[str, str], float]:
    """(function, code) → invocations, from the host's Prometheus endpoint."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    out = {}
    for labels, value in re.findall(r"^layotto_function_invocations_total\{([^}]*)\}\s+(\S+)$", text, re.M):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        out[(fields.get("function", ""), fields.get("code", ""))] = float(value)
    return out


def through_containerd(c: Containerd, fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    modes = {}
    _, (reuse_id,) = fleet.start(REUSE, 1, 1, label="fn-reuse")
    _, (fresh_id,) = fleet.start(FRESH, 1, 1, label="fn-fresh")
    port = c.host_port("http")
    try:
        mport: int | None = c.host_port("metrics", timeout=2)
    except (FileNotFoundError, ValueError):
        mport = None
    pid = host_pid(c)
    for mode, fid in (("reuse", reuse_id), ("fresh", fresh_id)):
        get_once(port, fid)
        url = f"http://127.0.0.1:{port}/?name={NAME}"
        before = metrics_invocations(mport) if mport else {}
        run_wrk(url, function_id=fid, duration=2, connections=args.connections, threads=1, pid=pid)
        result = run_wrk(
            url, function_id=fid, duration=args.duration, connections=args.connections, threads=1, pid=pid
        )
        if mport:
            after = metrics_invocations(mport)
            counts = {
                code: after.get((fid, code), 0.0) - before.get((fid, code), 0.0)
                for fn, code in after
                if fn == fid
            }
            result["host_counted"] = counts
        result["function_id"] = fid
        modes[mode] = result
        if result["non_2xx"] or result["socket_errors"]:
            result["warning"] = (
                f"{result['non_2xx']} non-2xx responses, {result['socket_errors']} socket errors"
            )
    # An inline call preempted past its budget moves the function to worker threads for
    # good: say so, since every later request then takes the slower threaded path.
    tasks = admin_tasks(c)
    if tasks is not None:
        for result in modes.values():
            row = next((t for t in tasks if t.get("id") == result["function_id"]), {})
            result["host_mode"] = row.get("mode")
            if row.get("mode") == "workers":
                result["warning"] = (result.get("warning", "") + "; ").lstrip(
                    "; "
                ) + "the host moved this function to worker threads (an inline call ran past its budget)"
    verdicts = {}
    for mode, target in TARGETS.items():
        r = modes[mode]
        p99 = r["percentiles_ms"].get("99")
        verdicts[mode] = (
            r["rps"] >= target["rps"]
            and p99 is not None
            and p99 <= target["p99_ms"]
            and not r["non_2xx"]
            and not r["socket_errors"]
        )
    return {"http": modes, "verdicts": verdicts, "pass": all(verdicts.values())}


# --------------------------------------------------------------------------- report


def _us(micro: dict[str, Any], key: str) -> float | None:
    value = micro.get(key)
    return value["best"] if isinstance(value, dict) else None


def _server_us(run: dict[str, Any] | None) -> float | None:
    return None if not run else run.get("server_cpu_us_per_request")


def split_rows(results: dict[str, Any]) -> list[tuple[str, float | None, str]]:
    """(layer, µs per request, what it adds) for the reused path, innermost first."""
    micro = results.get("micro", {})
    bare = results.get("bare", {})
    return [
        ("stock Func.__call__ of the allocator", _us(micro, "alloc_stock_func_call"), "for comparison"),
        ("raw C-API call of the allocator (fastcall.Func)", _us(micro, "alloc_rawfunc"), "raw wasm call"),
        ("the host instance's allocator entry point", _us(micro, "alloc_host_instance"), "raw wasm call"),
        ("alloc + copy request in + handler", _us(micro, "alloc_copy_handle"), "2 raw calls + handler"),
        ("Instance.call (+ response decoding)", _us(micro, "instance_call"), "+ ABI/copying"),
        ("Function.call_inline (+ encode, pool, stats)", _us(micro, "call_inline_reuse"), "+ ABI/copying"),
        ("bare ingress, stub without wasm: CPU/request", _server_us(bare.get("stub")), "HTTP layer alone"),
        ("bare ingress + fn-hello Function: CPU/request", _server_us(bare.get("reuse")), "HTTP + function"),
        ("node host through containerd: CPU/request", _server_us(results["http"]["reuse"]), "everything"),
    ]


def report(results: dict[str, Any]) -> str:
    nan = float("nan")
    lines = [
        f"invocation: fn-hello through the HTTP ingress, `wrk -t1 -c{results['connections']} "
        f"-d{results['duration']}s --latency` on loopback ({results['cpus']} CPUs shared with wrk)",
        "",
        f"  {'':<42}{'req/s':>8}{'p50 ms':>7}{'p99 ms':>7}{'max ms':>7}{'server':>7}{'wrk':>5}{'other':>6}"
        "  target",
    ]
    bare = results.get("bare", {})
    rows: list[tuple[str, dict[str, Any] | None, str | None]] = [
        ("bare ingress, stub without wasm", bare.get("stub"), None),
        ("bare ingress + fn-hello, reused", bare.get("reuse"), None),
        ("bare ingress + fn-hello, fresh", bare.get("fresh"), None),
        ("node host: fn-hello, reused instances", results["http"]["reuse"], "reuse"),
        ("node host: fn-hello, fresh per request", results["http"]["fresh"], "fresh"),
    ]
    for name, r, mode in rows:
        if not r or "rps" not in r:
            lines.append(f"  {name:<42}  n/a {(r or {}).get('error', '(not run)')[:200]}")
            continue
        pct = r["percentiles_ms"]
        target = ""
        if mode:
            t = TARGETS[mode]
            verdict = "PASS" if results["verdicts"][mode] else "MISS"
            target = f">= {t['rps']:,.0f}, p99 <= {t['p99_ms']:g}: {verdict}"
        lines.append(
            f"  {name:<42}{r['rps']:8,.0f}{pct.get('50', nan):7.2f}{pct.get('99', nan):7.2f}"
            f"{r.get('max_ms', nan):7.1f}{r.get('server_cpu_cores', nan):7.2f}"
            f"{r['wrk_cpu_cores']:5.2f}{r.get('other_cpu_cores', nan):6.2f}  {target}"
        )
        if r.get("warning"):
            lines.append(f"    warning: {r['warning']}")
    lines.append(
        "  (bare ingress: layotto.host.ingress + a Function in a process of its own, no containerd or node"
        "\n   host; server, wrk, other: CPU cores used by the server, by wrk, by everything else meanwhile)"
    )
    for mode, target in TARGETS.items():
        r = results["http"][mode]
        line = (
            f"  {mode}: {r['rps'] / target['rps']:.2f}x the req/s target, p99 "
            f"{r['percentiles_ms'].get('99', nan) / target['p99_ms']:.2f}x its bound"
        )
        if "host_counted" in r:
            codes = ", ".join(f"{k}: {v:,.0f}" for k, v in sorted(r["host_counted"].items()))
            line += f"; the host counted {sum(r['host_counted'].values()):,.0f} calls ({codes})"
        lines.append(line)
    micro = results.get("micro")
    if micro:
        lines += ["", "  per-request cost, reused instance (in-process figures: best of 5 batches):"]
        lines.append(f"  {'µs per request':<50}{'µs':>8}")
        for name, value, what in split_rows(results):
            lines.append(f"  {name:<50}{_fmt(value):>8}  {what}")
        inline = _us(micro, "call_inline_reuse")
        raw = _us(micro, "alloc_host_instance")
        stub = _server_us(bare.get("stub"))
        together = _server_us(bare.get("reuse"))
        host = _server_us(results["http"]["reuse"])
        if None not in (inline, raw, stub, together, host):
            assert inline is not None and raw is not None and stub is not None
            assert together is not None and host is not None
            abi, calls = inline - 2 * raw, 2 * raw
            extra, env = together - stub - inline, host - together
            lines += [
                f"  => HTTP layer ~ {stub:.1f} µs; ABI/copying/pool ~ {abi:.1f} µs; "
                f"two raw wasm calls ~ {calls:.1f} µs.",
                f"     together in one bare ingress they cost {extra:+.1f} µs more than apart;",
                f"     the node host then adds {env:+.1f} µs per request (other threads, heap, GC, load).",
            ]
        lines += ["", "  fresh instance per request:"]
        for name, value in (
            ("Function.call_inline, fresh instance each call", _us(micro, "call_inline_fresh")),
            ("create + close one host Instance (default engine)", _us(micro, "instance_create_close")),
            ("create + close one host Instance (pooling engine)", _us(micro, "instance_create_close_pooled")),
            ("stock wasmtime-py Store + instantiate (reference)", _us(micro, "instance_stock_api")),
            ("bare ingress + fresh fn-hello: CPU/request", _server_us(bare.get("fresh"))),
            ("node host through containerd: CPU/request", _server_us(results["http"]["fresh"])),
        ):
            lines.append(f"  {name:<50}{_fmt(value):>8}")
        for key, err in micro.get("errors", {}).items():
            lines.append(f"  n/a {key}: {err}")
        for key, count in micro.get("moved_to_threads", {}).items():
            lines.append(
                f"  {key}: {count} run(s) discarded: the function ran past its inline budget (wall-clock "
                "epochs,\n    so a preempted call counts) and moved to worker threads for good"
            )
    lines += load_note(results)
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.invoke",
        description="fn-hello requests per second and latency through the node host's HTTP ingress "
        "(reused and fresh instances), and the per-request cost of each layer.",
    )
    parser.add_argument("--duration", type=positive, default=10, help="seconds per wrk run (10)")
    parser.add_argument("--connections", type=positive, default=32, help="wrk connections (32)")
    parser.add_argument(
        "--micro-seconds", type=float, default=1.0, help="seconds per in-process measurement (1.0)"
    )
    parser.add_argument("--no-micro", action="store_true", help="skip the in-process measurements")
    parser.add_argument(
        "--no-bare", action="store_true", help="skip the bare ingress (no containerd, no node host) runs"
    )
    common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not shutil.which("wrk"):
        print("invoke: wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    pre: dict[str, Any] = {"duration": args.duration, "connections": args.connections}
    if not args.no_micro:
        pre["micro"] = microbenchmarks(args.micro_seconds)
    if not args.no_bare:
        pre["bare"] = {}
        for mode in ("stub", "reuse", "fresh"):
            try:
                pre["bare"][mode] = bare_ingress(mode, args)
            except (BenchError, OSError, subprocess.TimeoutExpired) as e:
                pre["bare"][mode] = {"error": str(e)}
    status, results = run_fleet_benchmark(
        "invoke", args, (FN,), lambda c, fleet: through_containerd(c, fleet, args)
    )
    if results is None:
        return status
    results = {**pre, **results}
    results["os_cpu_count"] = os.cpu_count()
    print(report(results))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Event-loop benchmark ("beyond two cores", issue 11): the loop's own CPU per request.

``python -m tests.bench.loop [--duration S] [--connections C] [--json PATH]`` (``make bench``):

The node host runs its asyncio (uvloop) event loop on its main thread (``layotto.host.daemon``
calls ``uvloop.run`` there): the ingress parses, routes and writes on it, and inline function
calls run on it too; worker threads run the offloaded calls with the GIL released. This
benchmark measures how much CPU one request costs that thread, since one loop can never serve
more than ``1e6 / (µs of loop CPU per request)`` requests per second, however many cores the
node has:

1. in this process: ``Function.call_inline`` of fn-hello (the wasm call with its ABI, as the
   loop runs it inline), µs per call;
2. a bare ingress without wasm (tests/bench/invoke.py's stub, a process of its own): the
   HTTP layer's CPU per request;
3. through a private containerd, ``wrk -t1 --latency`` against (a) fn-hello with C
   connections, (b) abi-noop (tests/bench/abi.py's module that imports the Runtime ABI and
   makes no call) with C connections, (c) fn_work at ~2 ms per request (tests/modules/fn_work.c)
   with 8 connections: per thread of the node host, CPU time on a CPU from
   ``/proc/<pid>/task/<tid>/schedstat`` (ns) and its user/system split from ``stat``, over the
   requests served, less what the loop thread spends idle (measured for 2 s before the runs).
   Reported per function: how the host ran it (its ``mode`` in the admin socket's /tasks:
   inline on the loop, or on worker threads), the loop thread's µs per request (user and
   system), every other thread's, the whole process's, and the one-loop ceiling derived from
   it.

Informational (no target): docs/scaling.md reads these figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from layotto.images.builder import build_image
from tests.bench.abi import NOOP, bench_wat
from tests.bench.fairness import WORK, get_work, host_cmdline, host_modes, import_work_images, run_detached
from tests.bench.invoke import EXPECTED_BODY, NAME, bare_ingress, get_once, run_wrk
from tests.bench.startrate import (
    FN,
    Fleet,
    common_arguments,
    ensure_modules,
    host_pid,
    load_note,
    positive,
    run_fleet_benchmark,
    write_json,
)
from tests.containerd_env import Containerd

TICK = os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> dict[int, dict[str, Any]]:
    """tid -> {comm, cpu_ns (schedstat: time on a CPU), runs (schedstat: times it was put on a
    CPU, i.e. woken or switched back in), user_s, sys_s} of every thread of *pid*."""
    out: dict[int, dict[str, Any]] = {}
    base = Path(f"/proc/{pid}/task")
    for entry in base.iterdir():
        try:
            tid = int(entry.name)
            comm = (entry / "comm").read_text().strip()
            sched = (entry / "schedstat").read_text().split()
            cpu_ns, runs = int(sched[0]), int(sched[2])
            fields = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
        user, system = int(fields[11]) / TICK, int(fields[12]) / TICK
        out[tid] = {"comm": comm, "cpu_ns": cpu_ns, "runs": runs, "user_s": user, "sys_s": system}
    return out


WORK_QUERY = "/?us=2000"
#: (key, label, function id (None: fn-hello's container id), path and query, connections
#: (None: --connections))
LOADS = (
    ("hello", "fn-hello", None, f"/?name={NAME}", None),
    ("noop", "abi-noop", "abi-noop", f"/?name={NAME}", None),
    ("work", "fn_work ~2 ms", "work", WORK_QUERY, 8),
)


def per_request(
    pid: int, before: dict[int, dict[str, Any]], requests: int, seconds: float, idle_loop_cores: float = 0.0
) -> dict[str, Any]:
    """Per-thread CPU since *before*, in µs per request; the loop thread is the main thread,
    less *idle_loop_cores* (what it spends with nothing to serve) over *seconds*."""
    after = threads(pid)
    rows = []
    for tid, now in after.items():
        then = before.get(tid, {"cpu_ns": 0, "runs": 0, "user_s": 0.0, "sys_s": 0.0})
        cpu_us = (now["cpu_ns"] - then["cpu_ns"]) / 1e3
        if cpu_us <= 0:
            continue
        rows.append(
            {
                "tid": tid,
                "comm": now["comm"],
                "loop": tid == pid,
                "cpu_s": cpu_us / 1e6,
                "runs_per_request": (now["runs"] - then["runs"]) / requests,
                "us_per_request": cpu_us / requests,
                "user_us_per_request": (now["user_s"] - then["user_s"]) * 1e6 / requests,
                "sys_us_per_request": (now["sys_s"] - then["sys_s"]) * 1e6 / requests,
            }
        )
    rows.sort(key=lambda r: -r["cpu_s"])
    loop = next((r for r in rows if r["loop"]), None)
    idle_us = idle_loop_cores * seconds * 1e6 / requests
    if loop:
        loop["us_per_request"] = max(0.0, loop["us_per_request"] - idle_us)
    total = sum(r["us_per_request"] for r in rows)
    loop_us = loop["us_per_request"] if loop else float("nan")
    return {
        "threads": rows,
        "loop_us_per_request": loop_us,
        "loop_user_us_per_request": loop["user_us_per_request"] if loop else None,
        "loop_sys_us_per_request": loop["sys_us_per_request"] if loop else None,
        "loop_runs_per_request": loop["runs_per_request"] if loop else None,
        "others_us_per_request": total - (loop_us if loop else 0.0),
        "total_us_per_request": total,
        "loop_ceiling_rps": 1e6 / loop_us if loop and loop_us > 0 else None,
        "idle_loop_us_subtracted": idle_us,
        "busiest_is_loop": bool(rows) and rows[0]["loop"],
    }


def in_process(seconds: float, size: int = 1000) -> dict[str, Any]:
    """µs per ``Function.call_inline`` of fn-hello, built as the task service builds it: the
    best and median of batches of *size* calls, as many as fit in about *seconds*. A batch
    in which the function left the inline path (call_inline answered None: on a busy machine
    a preempted call looks costly, and without a running host nothing brings the function
    back) is discarded and run again on a new Function, up to as many times as there are
    batches."""
    from layotto.host.function import Function, Request
    from layotto.host.runtime import NodeRuntime

    wasm = ensure_modules("fn-hello")["fn-hello"]
    runtime = NodeRuntime(None)
    compiled = runtime.load(wasm, name="fn-hello")
    request = Request(b"GET", b"/", f"name={NAME}".encode(), [(b"host", b"127.0.0.1"), (b"id", b"fn")], b"")

    def new() -> Function:
        return Function(
            name="bench/fn-hello",
            function_id="fn-hello",
            engine=runtime.engine,
            linker=runtime.linker,
            compiled=compiled,
            argv=["/fn-hello.wasm"],
            env=[],
            memory_limit=None,
        )

    fn = new()
    try:
        response = fn.call_inline(request)
        if response is None or response.body != EXPECTED_BODY:
            return {"error": f"unexpected response {response!r}"}
        batches = max(5, int(seconds / (size * 5e-6)))  # ~5 µs per call
        tries = batches
        results: list[float] = []
        discarded = 0
        while len(results) < batches and discarded < tries:
            call = fn.call_inline
            missed = 0
            began = time.perf_counter()
            for _ in range(size):
                if call(request) is None:
                    missed += 1
            took = time.perf_counter() - began
            if missed:
                discarded += 1
                fn.stop()
                fn = new()
                continue
            results.append(took / size * 1e6)
    finally:
        fn.stop()
    if not results:
        return {"error": f"the function left the inline path in each of {discarded} batches"}
    return {
        "best": min(results),
        "median": sorted(results)[len(results) // 2],
        "calls_per_batch": size,
        "batches": len(results),
        "discarded_batches": discarded,
    }


def import_noop(c: Containerd) -> None:
    import wasmtime

    images = c.base / "images"
    images.mkdir(exist_ok=True)
    wasm = images / "abi-noop.wasm"
    wasm.write_bytes(wasmtime.wat2wasm(bench_wat(abi_only=True)))
    build_image(images / "noop.tar", {"/abi-noop.wasm": wasm}, name=NOOP.image, cmd=["/abi-noop.wasm"])
    c.import_image(images / "noop.tar")


def idle_loop(pid: int, seconds: float = 2.0) -> float:
    """Cores the loop thread uses with nothing to serve (timers, housekeeping)."""
    before = threads(pid)[pid]["cpu_ns"]
    time.sleep(seconds)
    return (threads(pid)[pid]["cpu_ns"] - before) / 1e9 / seconds


def through_containerd(c: Containerd, fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    import_noop(c)
    import_work_images(c)
    _, (hello_id,) = fleet.start(FN, 1, 1, label="fn-hello")
    fleet.start(NOOP, 1, 1, label="abi-noop")
    run_detached(c, fleet, WORK, "work")
    port = c.host_port("http")
    pid = host_pid(c)
    if pid is None:
        raise RuntimeError("no node host pid")
    get_once(port, hello_id)
    get_work(port, "work")
    out: dict[str, Any] = {"host_pid": pid, "host_cmdline": host_cmdline(pid)}
    out["idle_loop_cores"] = idle = idle_loop(pid)
    for key, label, fid, path, connections in LOADS:
        fid = fid or hello_id
        url = f"http://127.0.0.1:{port}{path}"
        kw = {"function_id": fid, "connections": connections or args.connections, "threads": 1, "pid": pid}
        warm = run_wrk(url, duration=1, **kw)
        if warm["non_2xx"]:
            raise RuntimeError(f"{fid} answered non-2xx")
        before = threads(pid)
        run = run_wrk(url, duration=args.duration, **kw)
        run["cpu"] = per_request(pid, before, run["requests"], args.duration, idle)
        run["function_id"] = fid
        run["label"] = label
        run["mode"] = host_modes(c).get(fid)
        out[key] = run
    return out


def report(r: dict[str, Any]) -> str:
    nan = float("nan")
    lines = [
        f"event loop: CPU per request of the node host's loop thread (its main thread), "
        f"`wrk -t1 -c{r['connections']} -d{r['duration']}s` on loopback, {r['cpus']} CPUs shared with wrk",
        "",
    ]
    micro = r.get("micro", {})
    if "best" in micro:
        lines.append(
            "  Function.call_inline of fn-hello in process (wasm + ABI + scheduling): "
            f"best {micro['best']:.2f} µs, "
            f"median {micro['median']:.2f} µs ({micro['batches']} batches of {micro['calls_per_batch']}"
            + (
                f"; {micro['discarded_batches']} discarded: the function left the inline path)"
                if micro.get("discarded_batches")
                else ")"
            )
        )
    elif micro:
        lines.append(f"  Function.call_inline of fn-hello in process: n/a ({micro.get('error')})")
    stub = r.get("bare_stub", {})
    if "server_cpu_us_per_request" in stub:
        lines.append(
            "  bare ingress, stub without wasm (HTTP layer alone): "
            f"{stub['server_cpu_us_per_request']:.1f} µs CPU/request at {stub['rps']:,.0f} req/s"
        )
    lines.append("")
    lines.append(
        f"  {'through containerd':<30}{'req/s':>9}{'p99 ms':>8}{'loop µs':>9}{'user':>7}{'sys':>7}"
        f"{'others':>8}{'total':>7}{'loop cores':>11}{'ceiling req/s':>15}"
    )
    for key, *_ in LOADS:
        run = r.get(key)
        if not run:
            continue
        label = f"{run['label']} ({run.get('mode') or '?'})"
        cpu = run["cpu"]
        loop_cores = cpu["loop_us_per_request"] * run["rps"] / 1e6
        lines.append(
            f"  {label:<30}{run['rps']:9,.0f}{run['percentiles_ms'].get('99', nan):8.2f}"
            f"{cpu['loop_us_per_request']:9.1f}{cpu['loop_user_us_per_request'] or nan:7.1f}"
            f"{cpu['loop_sys_us_per_request'] or nan:7.1f}{cpu['others_us_per_request']:8.1f}"
            f"{cpu['total_us_per_request']:7.1f}{loop_cores:11.2f}{cpu['loop_ceiling_rps'] or nan:15,.0f}"
        )
        top = ", ".join(
            f"{t['comm']}[{t['tid']}]{' (loop)' if t['loop'] else ''} {t['us_per_request']:.1f}"
            for t in cpu["threads"][:4]
        )
        lines.append(f"    busiest threads, µs/request: {top}")
        lines.append(
            f"    the loop thread was woken or switched in {cpu.get('loop_runs_per_request') or nan:.2f} "
            "times per request"
        )
    lines.append(
        "  (loop µs: the main thread's time on a CPU per request (schedstat), less its idle "
        f"{r.get('idle_loop_cores', 0.0) * 100:.1f}% of a core;\n   user/sys from its stat; others: every "
        "other thread of the host; ceiling: 1e6 / loop µs,\n   one loop's limit on any node; (mode): how "
        "the host ran the function, from its admin socket)"
    )
    lines += load_note(r)
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.loop",
        description="The node host's event-loop CPU per request (inline and offloaded calls), its ceiling.",
    )
    parser.add_argument("--duration", type=positive, default=8, help="seconds per wrk run (8)")
    parser.add_argument("--connections", type=positive, default=32, help="wrk connections (32)")
    parser.add_argument("--micro-seconds", type=float, default=1.0, help="seconds of in-process calls (1.0)")
    common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not shutil.which("wrk"):
        print("loop: wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    pre: dict[str, Any] = {"duration": args.duration, "connections": args.connections}
    pre["micro"] = in_process(args.micro_seconds)
    try:
        pre["bare_stub"] = bare_ingress("stub", args)
    except Exception as e:  # informational: report and go on
        pre["bare_stub"] = {"error": f"{type(e).__name__}: {e}"}
    status, results = run_fleet_benchmark(
        "loop", args, (FN,), lambda c, fleet: through_containerd(c, fleet, args)
    )
    if results is None:
        return status
    results = {**pre, **results}
    print(report(results))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

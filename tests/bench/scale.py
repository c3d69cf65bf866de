"""Scale benchmark: start rate, memory per function and request latency as functions pile up.

``python -m tests.bench.scale [--max N] [--clients C] [--client grpc|ctr] [--json PATH]``:

1. starts a private containerd (no CRI), imports fn-hello, starts one warm-up function
   (the node host's start and the module's compilation stay out of every step) and reads
   the limits that cap one node: ``vm.max_map_count`` (each live wasm instance costs the
   host a few memory mappings) and the open-file limits of the host and of containerd
   (each container costs both some descriptors: containerd's ttrpc connection and the
   shim log fifo, the container's stdio fifos);
2. grows the population of idle fn-hello function modules through 10, 100, 1000 and
   (``--max 10000``) 10,000, each step started by C parallel clients: threads of one
   long-lived gRPC client (``--client grpc``, the default; :mod:`tests.containerd_client`,
   containers without stdio) or ``ctr run -d`` processes (``--client ctr``, with stdio
   fifos); after each step reports:
   - start rate of the step's new containers (until every one is RUNNING), and one
     start's latency under that load;
   - the node host's memory growth per function (RSS, USS), mappings, fds and threads,
     and containerd's own RSS and fds per container;
   - request latency: ``wrk -t1 -c32 --latency`` against one function for a few seconds,
     and one request each to up to 1000 random functions (most never called before)
     over one keep-alive connection (p50/p99/max);
   - how long ``ctr tasks ls`` takes (containerd asks the host for every task's state);
3. projects how many containers each limit allows, from the measured use per container;
   a step that would cross one of the node host's is cut to 90% of what it allows (rounded
   down to hundreds) and is the last; a step that fails (say, a limit reached anyway) ends
   the growth too, and is reported. containerd's own open-file limit is not the host's:
   containerd 1.6 keeps 3 fds per task, so under a hard limit of 20,000 (this sandbox's,
   which no process here may raise) it holds about 6,600. Past 90% of that, the rest of a
   step is created in the same node host over its Task API directly, as containerd would
   (:mod:`tests.bench.hostdirect`), and reported apart; ``--no-direct`` stops there instead;
4. deletes everything (timed, through the same client) and ``--json PATH`` writes every
   number.

containerd is always stopped at the end, taking its shims, the node host and mounts along.
"""

from __future__ import annotations

import argparse
import http.client
import random
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

from tests.bench.coldstart import BenchError, percentile
from tests.bench.hostdirect import DirectTasks
from tests.bench.invoke import EXPECTED_BODY, NAME, run_wrk
from tests.bench.startrate import (
    FN,
    WASM_DIR,
    Fleet,
    clear_note,
    client_arguments,
    common_arguments,
    host_pid,
    load_note,
    note,
    positive,
    proc_memory,
    run_fleet_benchmark,
    write_json,
)
from tests.containerd_env import Containerd

STEPS = (10, 100, 1000, 10_000, 100_000)
SWEEP = 1000  # functions probed with one request each per step
SETTLE = 0.5
KiB = 1024.0


def read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def open_file_limit(pid: int) -> int | None:
    """The soft ``Max open files`` of *pid*."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    value = line.split()[3]
                    return None if value == "unlimited" else int(value)
    except (OSError, ValueError, IndexError):
        return None
    return None


def sweep(port: int, ids: Sequence[str]) -> dict[str, Any]:
    """One GET to each of *ids* over one keep-alive connection: latency percentiles (ms)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    samples = []
    try:
        for fid in ids:
            began = time.perf_counter()
            conn.request("GET", f"/?name={NAME}", headers={"id": fid})
            resp = conn.getresponse()
            body = resp.read()
            samples.append((time.perf_counter() - began) * 1000.0)
            if resp.status != 200 or body != EXPECTED_BODY:
                raise BenchError(f"GET with id {fid}: {resp.status} {body[:200]!r}")
    finally:
        conn.close()
    return {
        "n": len(samples),
        "p50_ms": percentile(samples, 50),
        "p99_ms": percentile(samples, 99),
        "max_ms": max(samples),
    }


def timed_list(fleet: Fleet) -> tuple[float, int]:
    began = time.perf_counter()
    status = fleet.ctr_task_status()  # `ctr tasks ls` whichever client starts the fleet
    return time.perf_counter() - began, sum(1 for s in status.values() if s == "RUNNING")


def caps(
    limits: dict[str, int | None], base: dict[str, int], per: dict[str, float]
) -> dict[str, float | None]:
    """How many functions each limit allows: (limit - baseline use) / use per function."""
    return {what: None if not limit else (limit - base[what]) / per[what] for what, limit in limits.items()}


def grow(c: Containerd, fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    steps = sorted({n for n in STEPS if n < args.max} | {args.max})
    direct: DirectTasks | None = None  # functions started past what containerd can hold
    _, warm = fleet.start(FN, 1, 1, label="warm-up")
    hpid = host_pid(c)
    if hpid is None:
        raise BenchError("no node host pid file")
    assert c.process is not None
    cpid = c.process.pid
    time.sleep(SETTLE)
    base = proc_memory(hpid)
    ctrd_base = proc_memory(cpid)
    # What caps one host (and containerd): mappings per process, open files per process.
    limits = {
        "host maps": read_int("/proc/sys/vm/max_map_count"),
        "host fds": open_file_limit(hpid),
        "containerd fds": open_file_limit(cpid),
    }
    usage = {"host maps": base["maps"], "host fds": base["fds"], "containerd fds": ctrd_base["fds"]}
    per = {"host maps": 3.0, "host fds": 1.0, "containerd fds": 3.0}  # until measured
    port = c.host_port("http")
    out: dict[str, Any] = {
        "max": args.max,
        "clients": args.clients,
        "limits": limits,
        "vm_max_map_count": limits["host maps"],
        "host_open_file_limit": limits["host fds"],
        "containerd_open_file_limit": limits["containerd fds"],
        "host_base": base,
        "containerd_base": ctrd_base,
        "steps": [],
    }
    ids: list[str] = []
    through_containerd = 0
    rng = random.Random(1)
    for n in steps:
        allowed = caps(limits, usage, per)
        # containerd's own fds are not the host's limit: past them (with --direct) the rest
        # of the step is created in the node host over its Task API (tests/bench/hostdirect.py).
        host_caps = {
            w: cap for w, cap in allowed.items() if cap and not (args.direct and w == "containerd fds")
        }
        tight = min(((cap, what) for what, cap in host_caps.items()), default=None)
        if tight is not None and n > 0.95 * tight[0]:
            cap, what = tight
            # Go as far as the limit allows (rounded down to hundreds), then stop.
            clamped = int(0.9 * cap) // 100 * 100
            out["stopped"] = f"{n:,} functions would cross the {what} limit (room for ~{cap:,.0f})"
            if clamped <= len(ids):
                break
            out["stopped"] += f": last step clamped to {clamped:,}"
            n = clamped
        add = n - len(ids)
        containerd_room = allowed.get("containerd fds")
        add_containerd = add
        if args.direct and containerd_room and through_containerd + add > 0.9 * containerd_room:
            add_containerd = max(0, int(0.9 * containerd_room) // 100 * 100 - through_containerd)
        add_direct = add - add_containerd
        result = None
        try:
            if add_containerd:
                result, new = fleet.start(FN, add_containerd, args.clients, label=f"step {n}")
                ids += new
                through_containerd += len(new)
            direct_stats = None
            if add_direct:
                if direct is None:
                    direct = DirectTasks(
                        c.state / "layotto" / "host.sock", c.base / "direct", WASM_DIR / "fn-hello.wasm"
                    )
                note(f"  step {n}: {add_direct} functions directly in the node host", fleet.progress)
                new_direct = [f"direct-{len(direct.ids) + i}" for i in range(add_direct)]
                began = time.perf_counter()
                times = direct.start(new_direct, concurrency=args.clients)
                took = time.perf_counter() - began
                ids += new_direct
                direct_stats = {
                    "n": add_direct,
                    "rate_per_s": add_direct / took,
                    "start_ms": {
                        "median": percentile([t * 1000 for t in times], 50),
                        "p90": percentile([t * 1000 for t in times], 90),
                    },
                }
        except BenchError as e:
            out["stopped"] = f"step {n:,} failed: {e}"
            break
        time.sleep(SETTLE)
        mem = proc_memory(hpid)
        ctrd = proc_memory(cpid)
        per = {
            "host maps": max(0.5, (mem["maps"] - base["maps"]) / n),
            "host fds": max(0.5, (mem["fds"] - base["fds"]) / n),
            "containerd fds": max(0.5, (ctrd["fds"] - ctrd_base["fds"]) / max(1, through_containerd)),
        }
        note(f"  step {n}: probing latency", fleet.progress)
        probe = sweep(port, rng.sample(ids, min(SWEEP, len(ids))))
        wrk = run_wrk(
            f"http://127.0.0.1:{port}/?name={NAME}",
            function_id=ids[-1],
            duration=args.probe_seconds,
            connections=32,
            threads=1,
            pid=hpid,
        )
        list_s, running = timed_list(fleet)
        if running < through_containerd + len(warm):
            raise BenchError(f"only {running} tasks RUNNING, expected {through_containerd + len(warm)}")
        summary = None
        if result is not None:
            summary = result.summary()
            summary["ctr_run_ms"].pop("samples")
        out["steps"].append(
            {
                "n": n,
                "added": add,
                "through_containerd": through_containerd,
                "direct": len(direct.ids) if direct is not None else 0,
                "start": summary,
                "direct_start": direct_stats,
                "host": mem,
                "containerd": ctrd,
                "per_function": {
                    "rss": (mem["rss"] - base["rss"]) / n,
                    "uss": (mem["uss"] - base["uss"]) / n,
                    "maps": per["host maps"],
                    "fds": per["host fds"],
                    "threads": (mem["threads"] - base["threads"]) / n,
                },
                "containerd_per_container": {
                    "rss": (ctrd["rss"] - ctrd_base["rss"]) / max(1, through_containerd),
                    "fds": per["containerd fds"],
                },
                "sweep": probe,
                "wrk": {k: v for k, v in wrk.items() if k != "output"},
                "ctr_tasks_ls_s": list_s,
            }
        )
        clear_note(fleet.progress)
        if out.get("stopped"):
            break
    out["client"] = fleet.client
    out["grpc_channels"] = fleet.grpc_channels
    out["projected_max_functions"] = caps(limits, usage, per)
    total = len(fleet.live)
    note(f"  deleting {total} containers", fleet.progress)
    began = time.perf_counter()
    if direct is not None:
        total += direct.delete_all(concurrency=args.clients)
    fleet.delete(clients=args.clients)
    out["teardown_s"] = time.perf_counter() - began
    out["teardown_per_s"] = total / out["teardown_s"] if out["teardown_s"] else 0.0
    clear_note(fleet.progress)
    return out


def client_text(results: dict[str, Any]) -> str:
    if results.get("client", "ctr") == "grpc":
        return f"gRPC client threads (channels: {results.get('grpc_channels', 'per-client')})"
    return "`ctr run -d` clients"


def report(results: dict[str, Any]) -> str:
    grpc = results.get("client", "ctr") == "grpc"
    lines = [
        f"scale: idle fn-hello function modules in one node host, started with {results['clients']} "
        f"parallel {client_text(results)} ({results['containerd']}, {results['cpus']} CPUs)",
        f"  limits: vm.max_map_count = {results['vm_max_map_count']}, open files: host "
        f"{results['host_open_file_limit']}, containerd {results['containerd_open_file_limit']}",
        f"  host at baseline (1 warm-up function): {results['host_base']['rss'] / 2**20:.1f} MiB RSS, "
        f"{results['host_base']['maps']} mappings, {results['host_base']['fds']} fds; containerd "
        f"{results['containerd_base']['rss'] / 2**20:.1f} MiB, {results['containerd_base']['fds']} fds",
        "",
        f"  {'N':>6}{'start/s':>8}{'st p50':>8}{'p90':>6}"
        f"{'KiB/fn':>8}{'USS':>6}{'maps':>6}{'fds':>5}{'host MiB':>9}{'ctrd MiB':>9}"
        f"{'wrk r/s':>8}{'p50':>6}{'p99':>6}{'sweep p50':>10}{'p99':>6}{'max':>6}{'ls s':>6}",
    ]
    for s in results["steps"]:
        st, pf, w, sw = s["start"], s["per_function"], s["wrk"], s["sweep"]
        pct = w["percentiles_ms"]
        if st is None:  # every new function of this step started directly in the host
            ds = s["direct_start"]
            st, run = {"rate_per_s": ds["rate_per_s"]}, ds["start_ms"]
        else:
            run = st["ctr_run_ms"]
        lines.append(
            f"  {s['n']:>6}{st['rate_per_s']:8.1f}{run['median']:8.0f}{run['p90']:6.0f}"
            f"{pf['rss'] / KiB:8.1f}{pf['uss'] / KiB:6.1f}{pf['maps']:6.2f}{pf['fds']:5.2f}"
            f"{s['host']['rss'] / 2**20:9.1f}{s['containerd']['rss'] / 2**20:9.1f}"
            f"{w['rps']:8,.0f}{pct.get('50', float('nan')):6.2f}{pct.get('99', float('nan')):6.2f}"
            f"{sw['p50_ms']:10.2f}{sw['p99_ms']:6.2f}{sw['max_ms']:6.1f}{s['ctr_tasks_ls_s']:6.2f}"
        )
    lines += [
        "  (start/s: the step's new containers until all RUNNING; st: ms of one start "
        + ("(gRPC run_detached)" if grpc else "(`ctr run -d`)")
        + "; KiB/fn, USS,",
        "   maps, fds: host growth per function since the baseline; wrk: -c32 against one function, ms;",
        f"   sweep: one request each to up to {SWEEP} random functions, ms; ls s: `ctr tasks ls`)",
    ]
    for s in results["steps"]:
        ds = s.get("direct_start")
        if ds:
            lines.append(
                f"  step {s['n']:,}: {ds['n']:,} functions created directly in the node host over its "
                f"Task API (ttrpc, as containerd does): {ds['rate_per_s']:.0f}/s, Create + Start p50 "
                f"{ds['start_ms']['median']:.1f} ms; {s['through_containerd']:,} through containerd in all"
            )
    if any(s.get("direct_start") for s in results["steps"]):
        lines.append(
            "  (containerd 1.6 keeps 3 fds per task, 2 of them on the shim-log fifo, under this sandbox's"
            " hard limit of 20,000 open files that no process here may raise; see tests/bench/hostdirect.py)"
        )
    if results["steps"]:
        last = results["steps"][-1]
        cd, pf = last["containerd_per_container"], last["per_function"]
        lines.append(
            f"  containerd per container at N={last['n']:,}: {cd['rss'] / KiB:.0f} KiB RSS, {cd['fds']:.2f} "
            f"fds (host per function: {pf['rss'] / KiB:.1f} KiB, {pf['fds']:.2f} fds)"
        )
    proj = results.get("projected_max_functions")
    if proj:
        parts = [f"{what}: ~{cap:,.0f}" for what, cap in proj.items() if cap]
        lines.append("  containers before each limit is hit, at the measured rates: " + ", ".join(parts))
    if results.get("stopped"):
        lines.append(f"  stopped early: {results['stopped']}")
    how = (
        "gRPC Kill + Wait + Tasks.Delete + Containers.Delete + Snapshots.Remove, one container at a time"
        if grpc
        else "`ctr tasks delete -f` + `ctr containers delete` in batches of 50"
    )
    lines.append(
        f"  teardown: {results['teardown_s']:.1f} s ({results['teardown_per_s']:.0f} containers/s, "
        f"{how}, {results['clients']} clients)"
    )
    lines += load_note(results)
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.scale",
        description="Start rate, memory per function and request latency at 10, 100, 1000 (and up to "
        "--max) idle function modules in one node host.",
    )
    parser.add_argument("--max", type=positive, default=1000, help="largest population (1000; try 10000)")
    parser.add_argument("--clients", type=positive, default=8, help="parallel clients (8)")
    parser.add_argument("--probe-seconds", type=positive, default=3, help="wrk seconds per step (3)")
    parser.add_argument(
        "--no-direct",
        dest="direct",
        action="store_false",
        help="stop where containerd's open files run out, instead of creating the rest of the functions "
        "directly in the node host over its Task API",
    )
    client_arguments(parser, default="grpc", both=False)
    common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not shutil.which("wrk"):
        print("scale: wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    status, results = run_fleet_benchmark("scale", args, (FN,), lambda c, fleet: grow(c, fleet, args))
    if results is None:
        return status
    print(report(results))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

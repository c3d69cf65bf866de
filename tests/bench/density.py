"""Density benchmark: memory per idle container, layotto's node host against runc's shims.

``python -m tests.bench.density [--n N] [--runc-n M] [--clients C] [--json PATH]``:

1. starts a private containerd (no CRI) and imports fn-hello (a function module), sleeper
   (a command module blocked in one long sleep) and a static busybox for runc;
2. warms up: a few containers of each layotto kind stay running, so one-time costs (the
   host's start, module compilation, first-use allocations) are not charged to the
   measured ones; the memory of that warm-up is reported on its own;
3. layotto, all through ``ctr run -d --runtime io.containerd.layotto.v1`` with C parallel
   clients, reading the node host's memory (/proc/<pid>/smaps_rollup: RSS, PSS, USS, plus
   mappings, threads, fds) after each step:
   a. N idle fn-hello function modules (instantiated, never called);
   b. one request to each of them through the HTTP ingress (an instance that has run once
      has touched more of its memory);
   c. N sleeper command modules (each a nanoprocess blocked in a WASI sleep);
   d. all of them deleted: what the host keeps afterwards; then the same cycle again
      (a second rise tells a leak from memory the allocator keeps for reuse);
   and the growth split by kind of mapping (/proc/<pid>/smaps): thread stacks, fiber stacks, wasm
   memory images, other anonymous memory, files;
4. runc: M busybox ``sleep`` containers (``ctr run -d``), then the memory of every
   ``containerd-shim-runc-v2`` (one per container) and of the containers' own processes;
5. prints per-container growth and the ratio runc-shim-RSS / layotto-host-RSS-growth against
   the targets (<= 64 KiB per idle function, >= 200x denser than runc; informational: the
   exit status is 0 either way), with USS ratios too: many runc shims share their text
   pages, which RSS counts once per shim and USS not at all;
6. ``--json PATH`` writes every reading.

containerd is always stopped at the end, taking its shims, the node host and mounts along.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import time
from collections.abc import Sequence
from typing import Any

from tests.bench.coldstart import BenchError
from tests.bench.startrate import (
    FN,
    RUNC,
    SLEEPER,
    Fleet,
    common_arguments,
    host_pid,
    load_note,
    memory_delta,
    positive,
    proc_memory,
    run_fleet_benchmark,
    write_json,
)
from tests.containerd_env import Containerd

#: Targets: host memory growth per idle function, and runc shim RSS / that growth.
TARGET_BYTES = 64 * 1024
TARGET_RATIO = 200.0
WARMUP = 4  # containers of each layotto kind kept running before the baseline
SETTLE = 0.5  # seconds between the last start and a reading
KiB = 1024.0


def call_each(c: Containerd, ids: Sequence[str], name: str = "density") -> float:
    """One GET per function through the ingress (one keep-alive connection); returns the
    mean seconds per request. Raises BenchError on a wrong answer."""
    port = c.host_port("http")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    expected = f"Hello, {name}!\n".encode()
    began = time.perf_counter()
    try:
        for fid in ids:
            conn.request("GET", f"/?name={name}", headers={"id": fid})
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200 or body != expected:
                raise BenchError(
                    f"GET with id {fid}: {resp.status} {body[:200]!r}, expected 200 {expected!r}"
                )
    finally:
        conn.close()
    return (time.perf_counter() - began) / max(1, len(ids))


THREAD_STACK_KB = 8192  # glibc's default pthread stack (RLIMIT_STACK), one mapping each
FIBER_STACK_KB = 2048  # wasmtime's default async stack: one per command module run as a fiber


def rss_breakdown(pid: int) -> dict[str, int]:
    """RSS by kind of mapping (bytes), from /proc/<pid>/smaps: thread stacks (anonymous
    rw mappings of exactly the default stack size), fiber stacks (anonymous rw mappings of
    exactly wasmtime's async stack size right above their one-page guard: a large malloc
    can be a 2 MiB mapping too, but has no guard), wasmtime's copy-on-write memory images
    (memfd:wasm-memory-image), other anonymous memory (the heaps, wasm linear memories,
    wasmtime's stores) and file-backed mappings (code, libraries)."""
    out = {
        "rss_thread_stacks": 0,
        "rss_fiber_stacks": 0,
        "rss_wasm_images": 0,
        "rss_anon_other": 0,
        "rss_files": 0,
    }
    key = "rss_anon_other"
    guard_end = -1  # where the last one-page inaccessible mapping ended
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if head and not head[0].endswith(":") and "-" in head[0]:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                path = head[5].strip() if len(head) > 5 else ""
                guarded, guard_end = (
                    guard_end == lo,
                    hi if (hi - lo == 4096 and head[1].startswith("---")) else -1,
                )
                if path.startswith("/memfd:wasm-memory-image"):
                    key = "rss_wasm_images"
                elif path and not path.startswith("["):
                    key = "rss_files"
                elif not path and (hi - lo) == THREAD_STACK_KB * 1024 and head[1].startswith("rw"):
                    key = "rss_thread_stacks"
                elif not path and guarded and (hi - lo) == FIBER_STACK_KB * 1024 and head[1].startswith("rw"):
                    key = "rss_fiber_stacks"
                else:
                    key = "rss_anon_other"
            elif head and head[0] == "Rss:":
                out[key] += int(head[1]) * 1024
    return out


def host_reading(c: Containerd) -> dict[str, int]:
    time.sleep(SETTLE)
    pid = host_pid(c)
    if pid is None:
        raise BenchError("no node host pid file")
    return {**proc_memory(pid), **rss_breakdown(pid)}


def containerd_reading(c: Containerd) -> dict[str, int]:
    assert c.process is not None
    return proc_memory(c.process.pid)


def summed(pids: Sequence[int]) -> dict[str, int]:
    total: dict[str, int] = {}
    for pid in pids:
        for key, value in proc_memory(pid).items():
            total[key] = total.get(key, 0) + value
    return total


def measure(c: Containerd, fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    n, clients = args.n, args.clients
    out: dict[str, Any] = {"n": n, "runc_n": args.runc_n, "clients": clients}
    readings: dict[str, dict[str, int]] = {}
    ctrd: dict[str, dict[str, int]] = {}

    # Warm-up: the host starts with the first container; its one-time costs stay out.
    ctrd["empty"] = containerd_reading(c)
    _, warm_fn = fleet.start(FN, 1, 1, label="warm-up")
    readings["first"] = host_reading(c)
    fleet.start(FN, WARMUP - 1, clients, label="warm-up")
    fleet.start(SLEEPER, WARMUP, clients, label="warm-up")
    call_each(c, warm_fn)
    readings["base"] = host_reading(c)
    ctrd["base"] = containerd_reading(c)

    _, fn_ids = fleet.start(FN, n, clients, label=f"{n} fn-hello")
    readings["fn"] = host_reading(c)
    ctrd["fn"] = containerd_reading(c)
    out["fn_request_ms"] = call_each(c, fn_ids) * 1000.0
    readings["fn_called"] = host_reading(c)
    _, sleeper_ids = fleet.start(SLEEPER, n, clients, label=f"{n} sleeper")
    readings["sleeper"] = host_reading(c)
    ctrd["sleeper"] = containerd_reading(c)
    out["layotto_teardown_s"] = fleet.delete([*fn_ids, *sleeper_ids], clients)
    readings["deleted"] = host_reading(c)
    ctrd["deleted"] = containerd_reading(c)
    # The same again: memory kept after a second cycle tells a leak (it grows again)
    # from a high-water mark the allocator keeps for reuse (it does not).
    _, fn_ids = fleet.start(FN, n, clients, label=f"again {n} fn-hello")
    call_each(c, fn_ids)
    _, sleeper_ids = fleet.start(SLEEPER, n, clients, label=f"again {n} sleeper")
    fleet.delete([*fn_ids, *sleeper_ids], clients)
    readings["deleted_again"] = host_reading(c)

    # runc: one containerd-shim-runc-v2 per container (no pod grouping through ctr).
    ctrd["runc_base"] = containerd_reading(c)
    _, runc_ids = fleet.start(RUNC, args.runc_n, clients, label=f"{args.runc_n} runc")
    time.sleep(SETTLE)
    shims, inits = fleet.runc_shims(runc_ids)
    runc_shim = summed(shims)
    runc_init = summed(inits)
    ctrd["runc"] = containerd_reading(c)
    out["runc_teardown_s"] = fleet.delete(clients=clients)

    per = {
        "fn_idle": memory_delta(readings["fn"], readings["base"], n),
        "fn_called": memory_delta(readings["fn_called"], readings["base"], n),
        "sleeper_idle": memory_delta(readings["sleeper"], readings["fn_called"], n),
        "runc_shim": {k: v / args.runc_n for k, v in runc_shim.items()},
        "runc_container_process": {k: v / args.runc_n for k, v in runc_init.items()},
    }
    ctrd_per = {
        "layotto": memory_delta(ctrd["sleeper"], ctrd["base"], 2 * n),
        "runc": memory_delta(ctrd["runc"], ctrd["runc_base"], args.runc_n),
    }
    ratios = {}
    for key in ("fn_idle", "fn_called", "sleeper_idle"):
        rss, uss = per[key]["rss"], per[key]["uss"]
        ratios[key] = {
            "rss": per["runc_shim"]["rss"] / rss if rss > 0 else None,
            "uss": per["runc_shim"]["uss"] / uss if uss > 0 else None,
        }
    verdicts = {}
    for key in ("fn_idle", "sleeper_idle"):
        rss, ratio = per[key]["rss"], ratios[key]["rss"]
        verdicts[key] = rss <= TARGET_BYTES and ratio is not None and ratio >= TARGET_RATIO
    out.update(
        readings=readings,
        containerd_readings=ctrd,
        per_container=per,
        containerd_per_container=ctrd_per,
        ratio_vs_runc=ratios,
        host_kept_after_delete={
            "first": readings["deleted"]["rss"] - readings["base"]["rss"],
            "second": readings["deleted_again"]["rss"] - readings["base"]["rss"],
        },
        warmup_host_rss={
            "first_container": readings["first"]["rss"],
            "base": readings["base"]["rss"],
            "warmup_containers": 2 * WARMUP,
        },
        target_bytes=TARGET_BYTES,
        target_ratio=TARGET_RATIO,
        verdicts=verdicts,
        **{"pass": all(verdicts.values())},
    )
    return out


def _kib(value: float) -> str:
    return f"{value / KiB:9.1f}"


def report(results: dict[str, Any]) -> str:
    per = results["per_container"]
    n = results["n"]
    warm = results["warmup_host_rss"]
    lines = [
        f"density: {n} idle containers per layotto kind, {results['runc_n']} runc containers "
        f"({results['containerd']}, {results['cpus']} CPUs, {results['snapshotter']})",
        f"  node host at start (first container): {warm['first_container'] / 2**20:.1f} MiB RSS; after "
        f"{warm['warmup_containers']} warm-up containers (kept running): {warm['base'] / 2**20:.1f} MiB",
        "",
        f"  {'growth per container, KiB':<44}{'RSS':>9}{'PSS':>9}{'USS':>9}{'maps':>6}{'thr':>5}{'fds':>5}",
    ]
    rows = [
        (f"layotto fn-hello, idle (host, N={n})", per["fn_idle"]),
        ("layotto fn-hello, after one request each", per["fn_called"]),
        (f"layotto sleeper, idle (host, N={n})", per["sleeper_idle"]),
        (f"runc: containerd-shim-runc-v2 (N={results['runc_n']})", per["runc_shim"]),
        ("runc: the container's own process (sleep)", per["runc_container_process"]),
    ]
    for name, p in rows:
        lines.append(
            f"  {name:<44}{_kib(p['rss'])}{_kib(p['pss'])}{_kib(p['uss'])}"
            f"{p['maps']:6.1f}{p['threads']:5.1f}{p['fds']:5.1f}"
        )
    ctrd = results["containerd_per_container"]
    lines += [
        f"  (containerd itself grew by {ctrd['layotto']['rss'] / KiB:.0f} KiB RSS per layotto container, "
        f"{ctrd['runc']['rss'] / KiB:.0f} KiB per runc one:",
        "   common to both runtimes and not counted above; a Go heap, so noisy at small N)",
        "",
    ]
    labels = {"fn_idle": "fn-hello idle", "sleeper_idle": "sleeper idle", "fn_called": "fn called"}
    for key, label in labels.items():
        r = results["ratio_vs_runc"][key]
        rss = per[key]["rss"]
        rss_ratio = "n/a" if r["rss"] is None else f"{r['rss']:.0f}x"
        uss_ratio = "n/a" if r["uss"] is None else f"{r['uss']:.0f}x"
        line = f"  {label:<14}{rss / KiB:6.1f} KiB RSS; runc shim RSS / this: {rss_ratio:>5}"
        line += f" (USS: {uss_ratio:>4})"
        if key in results["verdicts"]:
            verdict = "PASS" if results["verdicts"][key] else "MISS"
            line += f"  target <= {TARGET_BYTES // 1024} KiB, >= {TARGET_RATIO:.0f}x: {verdict}"
        lines.append(line)
    lines.append("")
    lines.append(
        f"  {'host RSS growth by mapping, KiB per container':<44}{'stacks':>9}{'fibers':>9}{'wasm img':>9}"
        f"{'anon':>9}{'files':>9}"
    )
    for key, label in (
        ("fn_idle", "fn-hello idle"),
        ("fn_called", "fn-hello called"),
        ("sleeper_idle", "sleeper idle"),
    ):
        p = per[key]
        if "rss_anon_other" in p:
            lines.append(
                f"  {label:<44}{_kib(p['rss_thread_stacks'])}{_kib(p.get('rss_fiber_stacks', 0))}"
                f"{_kib(p['rss_wasm_images'])}{_kib(p['rss_anon_other'])}{_kib(p['rss_files'])}"
            )
    lines.append(
        "  (stacks: 8 MiB thread-stack mappings; fibers: 2 MiB wasmtime fiber stacks of command modules;"
        "\n   wasm img: wasmtime's memfd memory images; anon: heaps, wasm linear memories, stores;"
        "\n   files: code and libraries)"
    )
    kept = results["host_kept_after_delete"]
    leak = (kept["second"] - kept["first"]) / (2 * n)
    lines += [
        "",
        f"  host RSS after deleting all {2 * n} layotto containers: {kept['first'] / KiB:+.0f} KiB from the "
        f"baseline;\n  after a second cycle: {kept['second'] / KiB:+.0f} KiB "
        f"({leak / KiB:+.1f} KiB per container "
        "of the second cycle)",
        f"  fn-hello first request through the ingress: {results['fn_request_ms']:.2f} ms mean "
        f"(sequential, one connection); teardown: layotto {results['layotto_teardown_s']:.1f} s, "
        f"runc {results['runc_teardown_s']:.1f} s",
    ]
    lines += load_note(results)
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.density",
        description="Memory per idle container: layotto function and command modules (node host RSS "
        "growth) against runc busybox sleep (containerd-shim-runc-v2 RSS).",
    )
    parser.add_argument("--n", type=positive, default=200, help="containers per layotto kind (200)")
    parser.add_argument("--runc-n", type=positive, default=20, help="runc containers (20; ~13 MiB each)")
    parser.add_argument("--clients", type=positive, default=8, help="parallel ctr clients (8)")
    common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    status, results = run_fleet_benchmark(
        "density", args, (FN, SLEEPER, RUNC), lambda c, fleet: measure(c, fleet, args)
    )
    if results is None:
        return status
    print(report(results))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

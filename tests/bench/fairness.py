"""Fairness benchmark (issue 11): cores used, tenants isolated, CPU limits and shares honoured.

``python -m tests.bench.fairness [--duration S] [--ctr-runs N] [--json PATH]`` (``make bench``),
all in one run against one private containerd and its node host, with the CPU-bound test
function fn_work (tests/modules/fn_work.c, ~2 ms of integer work per request) and fn-hello:

a. **cores**: fn_work with ``wrk -c1`` then ``wrk -c8``; the 8-connection req/s must reach
   0.8 x cores x the 1-connection req/s; the node host's CPU (cores) during each;
b. **noisy neighbour**: fn-hello with ``wrk -c4 --latency`` alone, then again while another
   wrk drives fn_work with 8 connections: p99 under load <= max(5 ms, 3 x p99 alone) and
   req/s >= 30% of alone; ``ctr run --rm`` of the hello command image idle and under the
   same neighbour load (median of N each): <= 3 x idle;
c. **CPU limit**: fn_work started with ``ctr run --cpu-quota 25000 --cpu-period 100000``
   (250m), saturated with ``wrk -c8``: the cores its task used (``cpu_seconds`` from the
   host's admin socket, as ``layotto ps`` shows) over the wall time: <= 0.3;
d. **shares** (informational): two fn_work tasks with ``--cpu-shares 1024`` and ``256``
   saturated at once: their req/s ratio and CPU ratio next to the shares ratio (4);
e. **FaaS chain** (informational here): Layotto's id_1 -> id_2 -> SQLite chain is measured
   by the abi benchmark; its latest figure is copied from ``abi.json`` next to this one's
   JSON (target >= 15,000 req/s, p99 <= 5 ms) when present.

Missing a target is informational: the exit status is 0 either way. ``--json PATH`` writes
every number (wrk's output included) with PASS/MISS per target.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from layotto.images.builder import build_image
from tests.bench.coldstart import HELLO_IMAGE, HELLO_WASM, Bench, BenchError, cpu_seconds
from tests.bench.invoke import admin_tasks, get_once, parse_wrk, run_wrk
from tests.bench.startrate import (
    FN,
    LAYOTTO_RUNTIME,
    REPO_ROOT,
    Fleet,
    Kind,
    common_arguments,
    ensure_modules,
    host_pid,
    load_note,
    positive,
    run_fleet_benchmark,
    write_json,
)
from tests.containerd_env import Containerd

WORK_IMAGE = "docker.io/library/fn-work:bench"
WORK = Kind("work", "fn_work (~2 ms of integer work per request)", WORK_IMAGE, LAYOTTO_RUNTIME)
WORK_QUERY = "/?us=2000"
HELLO_QUERY = "/?name=bench"
LIMIT_FLAGS = ("--cpu-quota", "25000", "--cpu-period", "100000")  # 250m
SHARES = (1024, 256)

TARGETS = {
    "cores": "8-conn req/s >= 0.8 x cores x 1-conn req/s",
    "neighbour_p99": "fn-hello p99 under load <= max(5 ms, 3 x alone)",
    "neighbour_rps": "fn-hello req/s under load >= 30% of alone",
    "neighbour_ctr_run": "ctr run --rm hello under load <= 3 x idle (medians)",
    "limit": "fn_work at 250m under wrk -c8 uses <= 0.3 cores",
}
CHAIN_TARGET = {"rps": 15_000.0, "p99_ms": 5.0}


# --------------------------------------------------------------------------- helpers


def import_work_images(c: Containerd) -> None:
    """fn_work as a function image and hello.wasm as a command image."""
    images = c.base / "images"
    images.mkdir(exist_ok=True)
    wasm = ensure_modules("fn_work", "hello")
    build_image(
        images / "work.tar", {"/fn_work.wasm": wasm["fn_work"]}, name=WORK_IMAGE, cmd=["/fn_work.wasm"]
    )
    c.import_image(images / "work.tar")
    build_image(images / "hello.tar", {"/hello.wasm": HELLO_WASM}, name=HELLO_IMAGE, cmd=["/hello.wasm"])
    c.import_image(images / "hello.tar")


def run_detached(c: Containerd, fleet: Fleet, kind: Kind, cid: str, *flags: str) -> str:
    """``ctr run -d`` of *kind* with extra ctr flags (CPU quota, shares); the fleet deletes it."""
    argv = c.ctr_argv(
        "run", "-d", "--snapshotter", c.snapshotter, "--runtime", LAYOTTO_RUNTIME, *flags, kind.image, cid
    )
    fleet.live[cid] = kind
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    if r.returncode != 0:
        raise BenchError(
            f"ctr run -d {cid} {' '.join(flags)} exited {r.returncode}: {r.stderr.decode().strip()}"
        )
    fleet.wait_running([cid])
    return cid


def host_cmdline(pid: int | None) -> str | None:
    """The node host's command line: which interpreter (and so which checkout) was measured."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except (OSError, TypeError):
        return None


def get_work(port: int, function_id: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", WORK_QUERY, headers={"id": function_id})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200 or not body.startswith(b"n="):
        raise BenchError(f"GET fn_work (id {function_id}) answered {resp.status} {body[:200]!r}")


class Background:
    """A wrk run of open-ended length in the background, stopped with SIGINT (wrk then
    prints its statistics as usual)."""

    def __init__(self, url: str, function_id: str, connections: int, limit: float = 300) -> None:
        self.argv = [
            "wrk", "-t1", f"-c{connections}", f"-d{int(limit)}s", "--latency", "-H", f"id: {function_id}", url
        ]  # fmt: skip
        self.began = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=30)
        seconds = time.perf_counter() - self.began
        try:
            result = parse_wrk(out)
        except BenchError:
            raise BenchError(f"background wrk ({' '.join(self.argv)}) failed: {out}{err}") from None
        result["argv"] = self.argv
        result["output"] = out
        result["seconds"] = seconds
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def host_modes(c: Containerd) -> dict[str, Any]:
    """Task id and function id -> how the host runs it now ("inline" on the loop, on worker
    threads, ...)."""
    modes: dict[str, Any] = {}
    for t in admin_tasks(c) or []:
        if t.get("kind") == "function":
            modes[str(t.get("id"))] = modes[str(t.get("function_id") or t.get("id"))] = t.get("mode")
    return modes


def task_cpu(c: Containerd) -> dict[str, float]:
    """Task id -> CPU seconds the node host accounts to it (its admin socket's /tasks)."""
    rows = admin_tasks(c) or []
    return {str(r.get("id")): float(r.get("cpu_seconds") or 0.0) for r in rows}


def ctr_runs(bench: Bench, label: str, runs: int, budget: float) -> dict[str, Any]:
    """Up to *runs* ``ctr run --rm`` of hello (stops early once *budget* seconds are spent)."""
    samples: list[float] = []
    began = time.perf_counter()
    for i in range(runs):
        samples.append(bench.run(bench.layotto_argv(f"hello-{label}-{i}"), f"ctr run hello ({label})"))
        if time.perf_counter() - began > budget:
            break
    return {
        "n": len(samples),
        "median_ms": statistics.median(samples) * 1000,
        "samples_ms": [s * 1000 for s in samples],
    }


def p99(run: dict[str, Any]) -> float:
    return float(run["percentiles_ms"].get("99", float("nan")))


def chain_figure(json_dir: Path | None) -> dict[str, Any] | None:
    """The FaaS chain's figure from the abi benchmark's JSON (id_1 -> id_2 -> SQLite)."""
    for path in [
        p for p in ((json_dir / "abi.json") if json_dir else None, REPO_ROOT / "build/bench/abi.json") if p
    ]:
        try:
            data = json.loads(path.read_text())
            run = data["chain"]["http"]["fn1"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        return {
            "source": str(path),
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime)),
            "rps": run["rps"],
            "p99_ms": p99(run),
            "loadavg": data.get("loadavg_before"),
            "pass": run["rps"] >= CHAIN_TARGET["rps"] and p99(run) <= CHAIN_TARGET["p99_ms"],
        }
    return None


# --------------------------------------------------------------------------- the run


def fairness(c: Containerd, fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    import_work_images(c)
    _, (hello_id,) = fleet.start(FN, 1, 1, label="fn-hello")
    work = run_detached(c, fleet, WORK, "work-a")
    limited = run_detached(c, fleet, WORK, "work-250m", *LIMIT_FLAGS)
    hi = run_detached(c, fleet, WORK, f"work-shares-{SHARES[0]}", "--cpu-shares", str(SHARES[0]))
    lo = run_detached(c, fleet, WORK, f"work-shares-{SHARES[1]}", "--cpu-shares", str(SHARES[1]))
    port = c.host_port("http")
    pid = host_pid(c)
    cores = os.cpu_count() or 1
    get_once(port, hello_id)
    for fid in (work, limited, hi, lo):
        get_work(port, fid)
    modes: dict[str, dict[str, Any]] = {"start": host_modes(c)}
    work_url = f"http://127.0.0.1:{port}{WORK_QUERY}"
    hello_url = f"http://127.0.0.1:{port}{HELLO_QUERY}"
    d = args.duration
    out: dict[str, Any] = {"cores": cores, "duration": d, "ids": {"hello": hello_id, "work": work}}
    out["host_cmdline"] = host_cmdline(pid)
    verdicts: dict[str, bool] = {}

    # (a) one connection vs eight on a CPU-bound function
    run_wrk(work_url, function_id=work, duration=1, connections=8, threads=1, pid=pid)  # warm-up
    one = run_wrk(work_url, function_id=work, duration=d, connections=1, threads=1, pid=pid)
    eight = run_wrk(work_url, function_id=work, duration=d, connections=8, threads=1, pid=pid)
    ratio = eight["rps"] / one["rps"] if one["rps"] else 0.0
    out["cores_test"] = {"c1": one, "c8": eight, "ratio": ratio, "target_ratio": 0.8 * cores}
    verdicts["cores"] = ratio >= 0.8 * cores
    modes["after a"] = host_modes(c)

    # (b) noisy neighbour
    run_wrk(hello_url, function_id=hello_id, duration=1, connections=4, threads=1, pid=pid)  # warm-up
    alone = run_wrk(hello_url, function_id=hello_id, duration=d, connections=4, threads=1, pid=pid)
    bench = Bench(c)
    bench.run(bench.layotto_argv("hello-warm-up"), "ctr run hello (warm-up)")
    idle = ctr_runs(bench, "idle", args.ctr_runs, budget=10)
    neighbour = Background(work_url, work, 8)
    try:
        time.sleep(1)
        host0 = cpu_seconds(pid)
        loaded = run_wrk(hello_url, function_id=hello_id, duration=d, connections=4, threads=1, pid=None)
        host1 = cpu_seconds(pid)
        busy = ctr_runs(bench, "loaded", args.ctr_runs, budget=max(10, 3 * d))
    finally:
        neighbour_run = neighbour.stop()
    if host0 is not None and host1 is not None:
        loaded["host_cpu_cores"] = (host1 - host0) / d
    p99_bound = max(5.0, 3 * p99(alone))
    out["neighbour"] = {
        "alone": alone,
        "loaded": loaded,
        "neighbour": neighbour_run,
        "p99_bound_ms": p99_bound,
        "rps_fraction": loaded["rps"] / alone["rps"] if alone["rps"] else 0.0,
        "ctr_run": {"idle": idle, "loaded": busy, "ratio": busy["median_ms"] / idle["median_ms"]},
    }
    verdicts["neighbour_p99"] = p99(loaded) <= p99_bound
    verdicts["neighbour_rps"] = out["neighbour"]["rps_fraction"] >= 0.3
    verdicts["neighbour_ctr_run"] = out["neighbour"]["ctr_run"]["ratio"] <= 3.0
    modes["after b"] = host_modes(c)

    # (c) a CPU limit of 250m
    cpu0, t0 = task_cpu(c), time.perf_counter()
    lim = run_wrk(work_url, function_id=limited, duration=d, connections=8, threads=1, pid=pid)
    cpu1, wall = task_cpu(c), time.perf_counter() - t0
    used = (cpu1.get(limited, 0.0) - cpu0.get(limited, 0.0)) / wall
    out["limit"] = {"wrk": lim, "task_cpu_cores": used, "wall_s": wall, "quota": "25000/100000 (250m)"}
    verdicts["limit"] = 0 < used <= 0.3
    modes["after c"] = host_modes(c)

    # (d) shares 1024 vs 256, both saturated at once
    cpu0, t0 = task_cpu(c), time.perf_counter()
    runs = {fid: Background(work_url, fid, 8) for fid in (hi, lo)}
    try:
        time.sleep(d)
    finally:
        results = {fid: r.stop() for fid, r in runs.items()}
    cpu1, wall = task_cpu(c), time.perf_counter() - t0
    share_cpu = {fid: (cpu1.get(fid, 0.0) - cpu0.get(fid, 0.0)) / wall for fid in (hi, lo)}
    out["shares"] = {
        "shares": dict(zip((hi, lo), SHARES, strict=True)),
        "wrk": results,
        "task_cpu_cores": share_cpu,
        "shares_ratio": SHARES[0] / SHARES[1],
        "rps_ratio": results[hi]["rps"] / results[lo]["rps"] if results[lo]["rps"] else float("inf"),
        "cpu_ratio": share_cpu[hi] / share_cpu[lo] if share_cpu[lo] else float("inf"),
    }

    modes["after d"] = host_modes(c)
    out["host_modes"] = modes
    out["verdicts"] = verdicts
    out["pass"] = all(verdicts.values())
    return out


# --------------------------------------------------------------------------- report


def report(r: dict[str, Any]) -> str:
    nan = float("nan")

    def pm(key: str) -> str:
        return "PASS" if r["verdicts"][key] else "MISS"

    def line(run: dict[str, Any]) -> str:
        pct = run["percentiles_ms"]
        return f"{run['rps']:9,.0f} req/s  p50 {pct.get('50', nan):6.2f} ms  p99 {pct.get('99', nan):6.2f} ms"

    a, b, lim, sh = r["cores_test"], r["neighbour"], r["limit"], r["shares"]
    lines = [
        f"fairness: one node host, {r['cores']} CPUs shared with wrk, {r['duration']} s per wrk run",
        "",
        "  a. fn_work (~2 ms/request), one connection vs eight:",
        f"     wrk -c1 {line(a['c1'])}  host {a['c1'].get('server_cpu_cores', nan) * 100:4.0f}% CPU"
        f", other processes {a['c1'].get('other_cpu_cores', nan) * 100:3.0f}%",
        f"     wrk -c8 {line(a['c8'])}  host {a['c8'].get('server_cpu_cores', nan) * 100:4.0f}% CPU"
        f", other processes {a['c8'].get('other_cpu_cores', nan) * 100:3.0f}%",
        f"     ratio {a['ratio']:.2f}x (>= {a['target_ratio']:.2f}x): {pm('cores')}",
        "  b. noisy neighbour: fn-hello wrk -c4, alone and while wrk -c8 drives fn_work:",
        f"     alone   {line(b['alone'])}",
        f"     loaded  {line(b['loaded'])}  (neighbour {b['neighbour']['rps']:,.0f} req/s)",
        f"     p99 {p99(b['loaded']):.2f} ms (<= {b['p99_bound_ms']:.2f}): {pm('neighbour_p99')}; "
        f"req/s {b['rps_fraction'] * 100:.0f}% of alone (>= 30%): {pm('neighbour_rps')}",
        f"     ctr run --rm hello: idle median {b['ctr_run']['idle']['median_ms']:.0f} ms "
        f"(n={b['ctr_run']['idle']['n']}), loaded {b['ctr_run']['loaded']['median_ms']:.0f} ms "
        f"(n={b['ctr_run']['loaded']['n']}): {b['ctr_run']['ratio']:.1f}x (<= 3x): {pm('neighbour_ctr_run')}",
        f"  c. fn_work limited to 250m under wrk -c8: {lim['wrk']['rps']:,.0f} req/s, "
        f"{lim['task_cpu_cores']:.2f} cores (<= 0.3): {pm('limit')}",
        f"  d. shares {sh['shares_ratio']:.0f}:1, both under wrk -c8: req/s "
        + " vs ".join(f"{sh['wrk'][f]['rps']:,.0f}" for f in sh["shares"])
        + f" ({sh['rps_ratio']:.2f}x), CPU "
        + " vs ".join(f"{sh['task_cpu_cores'][f]:.2f}" for f in sh["shares"])
        + f" cores ({sh['cpu_ratio']:.2f}x) (informational)",
    ]
    chain = r.get("chain")
    if chain:
        lines.append(
            f"  e. FaaS chain id_1 -> id_2 -> SQLite (abi benchmark, {chain['measured_at']}): "
            f"{chain['rps']:,.0f} req/s p99 {chain['p99_ms']:.2f} ms (>= 15,000, <= 5 ms): "
            + ("PASS" if chain["pass"] else "MISS")
        )
    else:
        lines.append("  e. FaaS chain: measured by the abi benchmark (no abi.json found)")
    # How the host ran each function after each phase: a change means the host moved it
    # between the loop and worker threads mid-run, and the figures around it mix both.
    phases = r.get("host_modes", {})
    for fid in sorted({f for m in phases.values() for f in m}):
        seen = [f"{phase}: {m.get(fid)}" for phase, m in phases.items()]
        if len({m.get(fid) for m in phases.values()}) > 1:
            lines.append(f"  note: the host changed how it runs {fid}: " + ", ".join(seen))
    last = list(phases.values())[-1] if phases else {}
    lines.append("  host modes at the end: " + ", ".join(f"{k}: {v}" for k, v in sorted(last.items())))
    lines += load_note(r)
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.fairness",
        description="Cores used, noisy neighbours, CPU limits and shares of functions in one node host.",
    )
    parser.add_argument("--duration", type=positive, default=5, help="seconds per wrk run (5)")
    parser.add_argument(
        "--ctr-runs", type=positive, default=7, help="ctr run --rm of hello, idle and loaded (7)"
    )
    common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not shutil.which("wrk"):
        print("fairness: wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    status, results = run_fleet_benchmark("fairness", args, (FN,), lambda c, fleet: fairness(c, fleet, args))
    if results is None:
        return status
    results["chain"] = chain_figure(args.json.parent if args.json else None)
    print(report(results))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

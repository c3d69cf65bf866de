"""Soak benchmark: create/start/stop/delete cycles of commands and functions, parallel clients.

``python -m tests.bench.soak [--cycles N] [--workers W] [--settle S] [--json PATH]``:

1. starts a private containerd (no CRI) whose PATH finds this interpreter's shim, and
   imports hello (a command module printing one line) and fn-hello (a function module);
2. warms up: one hello run (starts the node host, compiles), then 2W cycles of each kind
   from W clients (the host's thread pools reach this load's size), then reads the
   baseline: the node host's RSS, fds and threads, containerd's fds, the mounts
   under containerd's state directory, the number of node host processes;
3. runs N cycles of each kind, interleaved, from W parallel client threads:

   - command: ``ctr run --rm`` hello.wasm; exit 0 and its output complete
     ("Hello from a Layotto nanoprocess!") is a pass, exit 0 with that line missing is an
     *output loss*, anything else a failure;
   - function: ``ctr run -d`` fn-hello with a ``layotto.io/function-id`` annotation, one
     GET through the node host's HTTP ingress (answer checked), ``ctr tasks kill``, wait
     until STOPPED, ``ctr tasks delete``, ``ctr containers delete``; any step going wrong is
     a failure;

   while a monitor thread counts node host processes (there must be exactly one);
4. after a settle wait, reads the same figures again (re-reading for a few seconds until
   they are back within the slack, since the last fds close asynchronously);
5. prints failures by kind (with the first messages), output losses, before/after figures
   and cycles per second; PASS when nothing failed, no output was lost, one host served
   throughout and fds, threads and mounts came back to baseline within a small slack.
   ``--json PATH`` writes everything.

containerd is always stopped at the end, taking its shims, the node host and mounts along.
"""

from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil

from layotto.images.builder import build_image
from tests.bench.coldstart import BenchError
from tests.bench.startrate import (
    FN,
    FN_IMAGE,
    LAYOTTO_RUNTIME,
    clear_note,
    common_arguments,
    ensure_modules,
    host_pid,
    load_note,
    note,
    positive,
    proc_memory,
    progress_enabled,
    run_fleet_benchmark,
    write_json,
)
from tests.containerd_env import Containerd, mounts_under

HELLO_IMAGE = "docker.io/library/hello:soak"
EXPECTED = "Hello from a Layotto nanoprocess!"
FN_NAME = "soak"
CTR_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
#: Allowed growth between the baseline and the settled reading.
SLACK = {"host_fds": 4, "host_threads": 2, "containerd_fds": 6, "mounts": 0}
MAX_MESSAGES = 5
MiB = 2.0**20


# --------------------------------------------------------------------------- readings


def host_processes(c: Containerd) -> list[int]:
    """Pids of top-level node host processes serving *c* (as tests/conftest.py's
    find_host_process picks candidates; children such as a compiler child are not counted)."""
    state, ttrpc = str(c.state), str(c.ttrpc_address)
    found: dict[int, int] = {}
    for proc in psutil.process_iter(["pid", "ppid", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.info["cmdline"] or ())
            if "layotto" not in cmdline or "host" not in cmdline or "containerd-shim-runc" in cmdline:
                continue
            if state in cmdline or proc.environ().get("TTRPC_ADDRESS") == ttrpc:
                found[proc.pid] = proc.info["ppid"]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return sorted(pid for pid, ppid in found.items() if ppid not in found)


def reading(c: Containerd) -> dict[str, Any]:
    pid = host_pid(c)
    if pid is None:
        raise BenchError("no node host pid file")
    host = proc_memory(pid)
    assert c.process is not None
    return {
        "host_pid": pid,
        "host_rss": host["rss"],
        "host_fds": host["fds"],
        "host_threads": host["threads"],
        "containerd_fds": len(os.listdir(f"/proc/{c.process.pid}/fd")),
        "mounts": len(mounts_under(c.state)),
        "host_processes": len(host_processes(c)),
    }


def back_to_baseline(before: dict[str, Any], after: dict[str, Any]) -> dict[str, bool]:
    return {key: after[key] - before[key] <= slack for key, slack in SLACK.items()}


# --------------------------------------------------------------------------- cycles


class Soak:
    def __init__(self, c: Containerd, progress: bool) -> None:
        self.c = c
        self.progress = progress
        self.port = c.host_port("http")
        self.lock = threading.Lock()
        self.done = {"command": 0, "function": 0}
        self.failures: dict[str, list[str]] = {"command": [], "function": []}
        self.lost: list[str] = []
        self.cycle_seconds: dict[str, list[float]] = {"command": [], "function": []}

    def ctr(self, *args: str, timeout: float = CTR_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return self.c.ctr(*args, check=False, timeout=timeout)

    def command(self, i: int) -> None:
        cid = f"soak-cmd-{i}"
        r = self.ctr(
            "run", "--rm", "--snapshotter", self.c.snapshotter, "--runtime", LAYOTTO_RUNTIME, HELLO_IMAGE, cid
        )
        lines = r.stdout.splitlines()
        if r.returncode != 0:
            raise BenchError(f"{cid}: ctr run --rm exited {r.returncode}: {r.stderr.strip()[-300:]}")
        if lines != [EXPECTED]:
            with self.lock:
                self.lost.append(f"{cid}: printed {r.stdout[:200]!r}, stderr {r.stderr.strip()[-200:]!r}")

    def task_status(self, cid: str) -> str:
        r = self.ctr("tasks", "ls")
        for line in r.stdout.splitlines()[1:]:
            parts = line.split()
            if parts and parts[0] == cid:
                return parts[-1]
        return ""

    def function(self, i: int) -> None:
        cid = f"soak-fn-{i}"  # (9000xx: the warm-up)
        fid = f"soak-fid-{i}"
        step = "run -d"
        try:
            r = self.ctr(
                "run",
                "-d",
                "--snapshotter",
                self.c.snapshotter,
                "--runtime",
                LAYOTTO_RUNTIME,
                "--annotation",
                f"layotto.io/function-id={fid}",
                FN_IMAGE,
                cid,
            )
            if r.returncode != 0:
                raise BenchError(f"exited {r.returncode}: {r.stderr.strip()[-300:]}")
            step = "GET"
            self.get(fid)
            step = "tasks kill"
            r = self.ctr("tasks", "kill", cid)
            if r.returncode != 0:
                raise BenchError(f"exited {r.returncode}: {r.stderr.strip()[-300:]}")
            step = "wait STOPPED"
            deadline = time.monotonic() + STOP_TIMEOUT
            while (status := self.task_status(cid)) != "STOPPED":
                if time.monotonic() > deadline:
                    raise BenchError(f"still {status or 'absent'} after {STOP_TIMEOUT:.0f} s")
                time.sleep(0.02)
            step = "tasks delete"
            r = self.ctr("tasks", "delete", cid)
            if r.returncode != 0:
                raise BenchError(f"exited {r.returncode}: {r.stderr.strip()[-300:]}")
            step = "containers delete"
            r = self.ctr("containers", "delete", cid)
            if r.returncode != 0:
                raise BenchError(f"exited {r.returncode}: {r.stderr.strip()[-300:]}")
        except (BenchError, OSError, subprocess.TimeoutExpired) as e:
            # Leave nothing behind for the next readings.
            self.ctr("tasks", "kill", "--signal", "SIGKILL", cid)
            time.sleep(0.2)
            self.ctr("tasks", "delete", "--force", cid)
            self.ctr("containers", "delete", cid)
            raise BenchError(f"{cid}: {step}: {e}") from e

    def get(self, fid: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", f"/?name={FN_NAME}", headers={"id": fid})
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        expected = f"Hello, {FN_NAME}!\n".encode()
        if resp.status != 200 or body != expected:
            raise BenchError(f"{resp.status} {body[:200]!r}, expected 200 {expected!r}")

    def one(self, kind: str, i: int) -> None:
        began = time.perf_counter()
        try:
            (self.command if kind == "command" else self.function)(i)
        except (BenchError, OSError, subprocess.TimeoutExpired) as e:
            with self.lock:
                self.failures[kind].append(str(e))
        seconds = time.perf_counter() - began
        with self.lock:
            self.done[kind] += 1
            self.cycle_seconds[kind].append(seconds)
            total = self.done["command"] + self.done["function"]
            failed = sum(len(v) for v in self.failures.values())
        note(f"soak: {total} cycles, {failed} failed, {len(self.lost)} lost", self.progress)


class HostMonitor(threading.Thread):
    """Counts node host processes every *interval* seconds while the soak runs."""

    def __init__(self, c: Containerd, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.c = c
        self.interval = interval
        self.stop_event = threading.Event()
        self.counts: list[int] = []
        self.pids: set[int] = set()

    def run(self) -> None:
        while not self.stop_event.is_set():
            pids = host_processes(self.c)
            self.counts.append(len(pids))
            self.pids.update(pids)
            self.stop_event.wait(self.interval)


# --------------------------------------------------------------------------- the benchmark


def import_hello(c: Containerd) -> None:
    wasm = ensure_modules("hello")["hello"]
    images = c.base / "images"
    images.mkdir(exist_ok=True)
    build_image(images / "hello.tar", {"/hello.wasm": wasm}, name=HELLO_IMAGE, cmd=["/hello.wasm"])
    c.import_image(images / "hello.tar")


def measure(c: Containerd, args: argparse.Namespace) -> dict[str, Any]:
    progress = progress_enabled(args.quiet)
    import_hello(c)
    # Warm-up: starts the node host and compiles both modules; its failures are fatal.
    # A command first: Soak() reads the ingress port, which the host writes when it starts.
    r = c.ctr(
        "run", "--rm", "--snapshotter", c.snapshotter, "--runtime", LAYOTTO_RUNTIME, HELLO_IMAGE, "soak-warm"
    )
    if EXPECTED not in r.stdout:
        raise BenchError(f"warm-up hello printed {r.stdout!r}")
    # Then a parallel round of each kind: the host's thread pools grow to this load's
    # high-water mark before the baseline (growth during the soak itself is what counts).
    warm = Soak(c, progress)
    warm_jobs = [(kind, 900000 + i) for i in range(2 * args.workers) for kind in ("command", "function")]
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        list(pool.map(lambda job: warm.one(*job), warm_jobs))
    clear_note(progress)
    if any(warm.failures.values()) or warm.lost:
        raise BenchError(f"warm-up failed: {warm.failures}, lost: {warm.lost[:MAX_MESSAGES]}")
    time.sleep(args.settle)
    before = reading(c)
    before["mount_points"] = mounts_under(c.state)

    soak = Soak(c, progress)
    jobs = [(kind, i) for i in range(args.cycles) for kind in ("command", "function")]
    monitor = HostMonitor(c)
    monitor.start()
    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        list(pool.map(lambda job: soak.one(*job), jobs))
    elapsed = time.perf_counter() - began
    monitor.stop_event.set()
    monitor.join()
    clear_note(progress)

    time.sleep(args.settle)
    deadline = time.monotonic() + 10.0
    while True:
        after = reading(c)
        ok = back_to_baseline(before, after)
        if all(ok.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    after["mount_points"] = mounts_under(c.state)
    leftover = [
        line.split()[0] for line in c.ctr("containers", "ls", "-q").stdout.splitlines() if line.strip()
    ]

    failures = {kind: len(msgs) for kind, msgs in soak.failures.items()}
    host_counts = monitor.counts or [after["host_processes"]]
    one_host = (
        max(host_counts) == 1
        and min(host_counts) == 1
        and before["host_processes"] == 1
        and after["host_processes"] == 1
        and before["host_pid"] == after["host_pid"]
    )
    ok = back_to_baseline(before, after)
    passed = not any(failures.values()) and not soak.lost and one_host and all(ok.values()) and not leftover
    per_kind_ms = {
        kind: {
            "median": sorted(s)[len(s) // 2] * 1000.0 if s else None,
            "max": max(s) * 1000.0 if s else None,
        }
        for kind, s in soak.cycle_seconds.items()
    }
    return {
        "cycles": args.cycles,
        "workers": args.workers,
        "settle_s": args.settle,
        "elapsed_s": elapsed,
        "cycles_per_s": 2 * args.cycles / elapsed,
        "cycle_ms": per_kind_ms,
        "failures": failures,
        "failure_messages": {kind: msgs[:MAX_MESSAGES] for kind, msgs in soak.failures.items()},
        "output_lost": len(soak.lost),
        "output_lost_messages": soak.lost[:MAX_MESSAGES],
        "before": before,
        "after": after,
        "slack": SLACK,
        "back_to_baseline": ok,
        "host_processes_seen": {
            "min": min(host_counts),
            "max": max(host_counts),
            "pids": sorted(monitor.pids),
        },
        "one_host": one_host,
        "leftover_containers": leftover,
        "pass": passed,
    }


def report(results: dict[str, Any]) -> str:
    b, a = results["before"], results["after"]
    n = results["cycles"]
    lines = [
        f"soak: {n} command + {n} function cycles, {results['workers']} parallel clients "
        f"({results['containerd']}, {results['cpus']} CPUs, {results['snapshotter']})",
        f"  {2 * n} cycles in {results['elapsed_s']:.1f} s: {results['cycles_per_s']:.1f} cycles/s "
        f"(one cycle, median/max: command {results['cycle_ms']['command']['median']:.0f}/"
        f"{results['cycle_ms']['command']['max']:.0f} ms, function "
        f"{results['cycle_ms']['function']['median']:.0f}/{results['cycle_ms']['function']['max']:.0f} ms)",
        f"  failures: command {results['failures']['command']}, function {results['failures']['function']}; "
        f"output lost: {results['output_lost']} of {n} command runs",
    ]
    for kind, msgs in results["failure_messages"].items():
        for msg in msgs:
            lines.append(f"    {kind}: {msg}")
    for msg in results["output_lost_messages"]:
        lines.append(f"    lost: {msg}")
    seen = results["host_processes_seen"]
    lines += [
        "",
        f"  {'':<28}{'before':>10}{'after':>10}  (settled {results['settle_s']:.0f} s)",
        f"  {'node host RSS, MiB':<28}{b['host_rss'] / MiB:10.1f}{a['host_rss'] / MiB:10.1f}",
    ]
    for key, label in (
        ("host_fds", "node host fds"),
        ("host_threads", "node host threads"),
        ("containerd_fds", "containerd fds"),
        ("mounts", "mounts under state dir"),
        ("host_processes", "node host processes"),
    ):
        mark = ""
        if key in results["back_to_baseline"]:
            mark = f"  (slack +{SLACK[key]}: {'ok' if results['back_to_baseline'][key] else 'NOT back'})"
        lines.append(f"  {label:<28}{b[key]:10d}{a[key]:10d}{mark}")
    lines.append(
        f"  node host processes during the soak: {seen['min']}..{seen['max']} (pids {seen['pids']}); "
        f"same host before and after: {b['host_pid'] == a['host_pid']}"
    )
    if results["leftover_containers"]:
        lines.append(f"  containers left behind: {results['leftover_containers'][:10]}")
    lines.append(f"  verdict: {'PASS' if results['pass'] else 'MISS'}")
    lines += load_note(results)
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.soak",
        description="Create/start/stop/delete cycles of commands (ctr run --rm hello) and functions "
        "(fn-hello run, called, killed, deleted) from parallel clients: failures, lost output, and the "
        "node host's and containerd's resources before and after.",
    )
    parser.add_argument("--cycles", type=positive, default=250, help="cycles of each kind (250)")
    parser.add_argument("--workers", type=positive, default=4, help="parallel client threads (4)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before each reading (2)")
    common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    status, results = run_fleet_benchmark("soak", args, (FN,), lambda c, fleet: measure(c, args))
    if results is None:
        return status
    print(report(results))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

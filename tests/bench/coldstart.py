"""Cold-start benchmark: ``ctr run --rm`` of hello.wasm under layotto vs. busybox echo under runc.

``python -m tests.bench.coldstart [--runs N] [--shim-runs M] [--json PATH]`` (``make bench``):

1. starts a private containerd (no CRI) whose PATH finds this interpreter's shim;
2. builds and imports the hello image (``/hello.wasm``) and a static busybox image;
3. warms up with one run of each; the first layotto run starts the node host and compiles
   the module, and is reported on its own;
4. times N interleaved runs of each runtime (wall time of the whole ``ctr run --rm``; the
   order alternates every iteration so neither runtime always follows the other); every run
   must exit 0 and print the greeting, or the benchmark stops with an error;
5. prints median/p10/p90/min per runtime and the median ratio layotto/runc against the
   target (<= 0.5, informational: the exit status is 0 either way), and the node host's CPU
   time per layotto run (from /proc: only layotto runs use the host);
6. times the shim binary's ``start`` and ``delete`` actions executed directly, as containerd
   executes them, on fake bundles: the fast paths (node host alive, nothing mounted) and the
   slow ``delete`` (no host: the Python bootstrap runs), plus ``/bin/true`` and bare Python
   interpreter starts for reference;
7. ``--json PATH`` writes every sample and summary.

containerd is always stopped at the end, taking its shims, the node host and mounts along.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from layotto.images.builder import build_image, busybox_image
from tests.containerd_env import Containerd, ContainerdError, default_snapshotter

REPO_ROOT = Path(__file__).resolve().parents[2]
HELLO_WASM = REPO_ROOT / "build" / "wasm" / "hello.wasm"
SHIM_NAME = "containerd-shim-layotto-v1"
LAYOTTO_RUNTIME = "io.containerd.layotto.v1"
HELLO_IMAGE = "docker.io/library/hello:latest"
BUSYBOX_IMAGE = "docker.io/library/busybox:layotto"
GREETING = "Hello from a Layotto nanoprocess!"
TASK_DIR = "io.containerd.runtime.v2.task"
FAKE_NAMESPACE = "bench"

#: Target for the median wall-time ratio layotto/runc.
TARGET_RATIO = 0.5
#: ctr's and containerd's own share of a ``ctr run --rm`` (a no-op shim answering from an
#: already-running server), measured on these machines: see implementation-notes.md.
FLOOR_MS = 34.0
RUN_TIMEOUT = 60.0


class BenchError(RuntimeError):
    """A run failed: the benchmark stops, the failed run is never counted."""


# --------------------------------------------------------------------------- statistics


def percentile(samples: Sequence[float], q: float) -> float:
    """The *q*-th percentile (0..100) with linear interpolation between closest ranks."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(samples_s: Sequence[float]) -> dict[str, Any]:
    """Summary of wall times given in seconds, reported in milliseconds."""
    ms = [s * 1000.0 for s in samples_s]
    return {
        "n": len(ms),
        "median": percentile(ms, 50),
        "p10": percentile(ms, 10),
        "p90": percentile(ms, 90),
        "min": min(ms),
        "max": max(ms),
        "mean": sum(ms) / len(ms),
        "samples": [round(x, 3) for x in ms],
    }


# --------------------------------------------------------------------------- process timing


def timed(
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = RUN_TIMEOUT,
) -> tuple[float, subprocess.CompletedProcess[bytes]]:
    """(wall seconds, result) of one ``subprocess.run``; stdin is /dev/null, stdout and
    stderr are pipes (as containerd reads a shim's output: Go's CombinedOutput)."""
    began = time.perf_counter()
    try:
        r = subprocess.run(
            list(argv),
            cwd=cwd,
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{subprocess.list2cmdline(argv)} timed out after {timeout} s") from e
    return time.perf_counter() - began, r


def _failure(what: str, r: subprocess.CompletedProcess[bytes], why: str) -> BenchError:
    return BenchError(
        f"{what}: {why}\n  command: {subprocess.list2cmdline(r.args)}\n  exit status: {r.returncode}\n"
        f"--- stdout ---\n{r.stdout.decode(errors='replace')}\n"
        f"--- stderr ---\n{r.stderr.decode(errors='replace')}"
    )


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds *pid* has used so far (clock-tick resolution), or None."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    # Fields 14 and 15 of stat(5) (utime, stime); fields[0] here is field 3 (state).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Bench:
    """The private containerd, its images, and the ctr command lines being timed."""

    def __init__(self, c: Containerd) -> None:
        self.c = c

    def layotto_argv(self, cid: str) -> list[str]:
        return self.c.ctr_argv(
            "run", "--rm", "--snapshotter", self.c.snapshotter, "--runtime", LAYOTTO_RUNTIME, HELLO_IMAGE, cid
        )

    def runc_argv(self, cid: str) -> list[str]:
        return self.c.ctr_argv(
            "run", "--rm", "--snapshotter", self.c.snapshotter, BUSYBOX_IMAGE, cid, "/bin/echo", GREETING
        )

    def run(self, argv: list[str], what: str) -> float:
        """Wall seconds of one ``ctr run --rm``; BenchError unless it exits 0 with the greeting."""
        seconds, r = timed(argv)
        if r.returncode != 0:
            raise _failure(what, r, "ctr run failed")
        if GREETING not in r.stdout.decode(errors="replace"):
            raise _failure(what, r, f"output lacks {GREETING!r}")
        return seconds

    def prepare_images(self) -> None:
        if not HELLO_WASM.exists():
            subprocess.run(
                ["make", "-f", "images/build.mk", "build/wasm/hello.wasm"], cwd=REPO_ROOT, check=True
            )
        images = self.c.base / "images"
        images.mkdir(exist_ok=True)
        hello_tar = images / "hello.tar"
        build_image(hello_tar, {"/hello.wasm": HELLO_WASM}, name=HELLO_IMAGE, cmd=["/hello.wasm"])
        busybox_tar = images / "busybox.tar"
        busybox_image(busybox_tar, BUSYBOX_IMAGE)
        self.c.import_image(hello_tar)
        self.c.import_image(busybox_tar)

    def cold_starts(self, runs: int, progress: bool) -> dict[str, Any]:
        first_layotto = self.run(self.layotto_argv("bench-l-warmup"), "layotto warm-up run")
        first_runc = self.run(self.runc_argv("bench-r-warmup"), "runc warm-up run")
        host_pid = self.host_pid()
        host_cpu_before = cpu_seconds(host_pid)
        layotto: list[float] = []
        runc: list[float] = []
        for i in range(runs):
            pair = [
                (layotto, self.layotto_argv(f"bench-l-{i}"), f"layotto run {i}"),
                (runc, self.runc_argv(f"bench-r-{i}"), f"runc run {i}"),
            ]
            if i % 2:
                pair.reverse()
            for samples, argv, what in pair:
                samples.append(self.run(argv, what))
            if progress:
                print(f"\r  run {i + 1}/{runs}", end="", file=sys.stderr, flush=True)
        if progress:
            print("\r" + " " * 20 + "\r", end="", file=sys.stderr, flush=True)
        host_cpu_after = cpu_seconds(host_pid)
        host_cpu_ms = None
        if host_cpu_before is not None and host_cpu_after is not None:
            host_cpu_ms = (host_cpu_after - host_cpu_before) * 1000.0 / runs
        return {
            "first_run_ms": {"layotto": first_layotto * 1000.0, "runc": first_runc * 1000.0},
            "layotto": summarize(layotto),
            "runc": summarize(runc),
            # Only layotto runs use the node host, so its CPU time is theirs alone.
            "host_cpu_ms_per_run": host_cpu_ms,
        }

    def host_pid(self) -> int | None:
        try:
            return int((self.c.state / "layotto" / "host.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    # ------------------------------------------------------------------ shim execs

    def shim_argv(self, shim: Path, cid: str, action: str, bundle: Path | None = None) -> list[str]:
        """The command line containerd 1.6 builds for a shim action."""
        argv = [
            str(shim),
            "-namespace",
            FAKE_NAMESPACE,
            "-address",
            str(self.c.address),
            "-publish-binary",
            shutil.which("containerd") or "/usr/bin/containerd",
            "-id",
            cid,
        ]
        if bundle is not None:
            argv += ["-bundle", str(bundle)]
        return [*argv, action]

    def shim_env(self) -> dict[str, str]:
        env = self.c.environ()
        env["TTRPC_ADDRESS"] = str(self.c.ttrpc_address)
        return env

    def shim_execs(self, shim: Path, runs: int) -> dict[str, Any]:
        """Each action in a loop of its own, so no exec is timed right after a different one
        (a 1 ms exec measured just after a 40 ms Python start comes out noticeably slower)."""
        env = self.shim_env()
        # The host of this layotto version: <state>/layotto/<version>/host.sock.
        version = importlib.metadata.version("layotto")
        host_address = f"unix://{self.c.state / 'layotto' / version / 'host.sock'}"
        fake_tasks = self.c.state / TASK_DIR / FAKE_NAMESPACE
        # A state dir whose host never ran: `delete` cannot reach one and takes the slow path.
        hostless_tasks = self.c.base / "hostless" / TASK_DIR / FAKE_NAMESPACE
        ids = [f"shim-{i}" for i in range(runs)]
        starts: list[float] = []
        deletes: list[float] = []
        slow_deletes: list[float] = []
        try:
            for cid in ids:
                bundle = fake_tasks / cid
                bundle.mkdir(parents=True)
                seconds, r = timed(self.shim_argv(shim, cid, "start"), cwd=bundle, env=env)
                if r.returncode != 0 or r.stdout.decode(errors="replace").strip() != host_address:
                    raise _failure("shim start", r, f"expected exit 0 and {host_address}")
                starts.append(seconds)
            for cid in ids:
                bundle = fake_tasks / cid
                seconds, r = timed(self.shim_argv(shim, cid, "delete", bundle), cwd=bundle, env=env)
                if r.returncode != 0:
                    raise _failure("shim delete (fast path)", r, "non-zero exit")
                if r.stdout:
                    raise _failure("shim delete (fast path)", r, "took the slow path (it printed a response)")
                deletes.append(seconds)
            for cid in ids:
                bundle = hostless_tasks / cid
                bundle.mkdir(parents=True)
                seconds, r = timed(self.shim_argv(shim, cid, "delete", bundle), cwd=bundle, env=env)
                if r.returncode != 0 or not r.stdout:
                    raise _failure("shim delete (slow path)", r, "expected exit 0 and a DeleteResponse")
                slow_deletes.append(seconds)
        finally:
            shutil.rmtree(fake_tasks, ignore_errors=True)
            shutil.rmtree(self.c.base / "hostless", ignore_errors=True)
        return {
            "start_fast": summarize(starts),
            "delete_fast": summarize(deletes),
            "delete_slow": summarize(slow_deletes),
        }


def reference_execs(runs: int) -> dict[str, Any]:
    """Exec times of trivial programs, through the same subprocess.run as everything else."""
    python = str(Path(sys.executable).parent / "python3")
    if not os.access(python, os.X_OK):
        python = sys.executable
    commands = {
        "/bin/true": ["/bin/true"],
        "sh -c :": ["/bin/sh", "-c", ":"],
        "python3 -I -S -c pass": [python, "-I", "-S", "-c", "pass"],
        "python3 -I -c pass": [python, "-I", "-c", "pass"],
    }
    result = {}
    for name, argv in commands.items():
        samples = []
        for _ in range(runs):
            seconds, r = timed(argv)
            if r.returncode != 0:
                raise _failure(name, r, "non-zero exit")
            samples.append(seconds)
        result[name] = summarize(samples)
    return result


# --------------------------------------------------------------------------- report


def _version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"


def _containerd_version() -> str:
    # "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3"
    fields = _version(["containerd", "--version"]).split()
    return f"containerd {fields[2]}" if len(fields) > 2 else "containerd ?"


def report(results: dict[str, Any]) -> str:
    cold = results["cold_start"]
    lay, runc = cold["layotto"], cold["runc"]
    ratio = results["ratio_median"]
    lines = [
        f"cold start: `ctr run --rm`, {lay['n']} interleaved runs per runtime "
        f"({results['containerd']}, {results['cpus']} CPUs, load {results['loadavg_before']:.2f} -> "
        f"{results['loadavg_after']:.2f})",
        f"  first run (host start + compile): {cold['first_run_ms']['layotto']:8.1f} ms"
        f"    (runc first run: {cold['first_run_ms']['runc']:.1f} ms)",
        "",
        f"  {'ms':<28}{'median':>8}{'p10':>8}{'p90':>8}{'min':>8}{'max':>8}",
    ]
    for name, s in (("layotto (hello.wasm)", lay), ("runc (busybox echo)", runc)):
        lines.append(
            f"  {name:<28}{s['median']:8.1f}{s['p10']:8.1f}{s['p90']:8.1f}{s['min']:8.1f}{s['max']:8.1f}"
        )
    verdict = "PASS" if results["pass"] else "MISS"
    lines += [
        "",
        f"  median ratio layotto/runc: {ratio:.3f}   target <= {TARGET_RATIO}: {verdict}",
        "  node host CPU per layotto run: "
        + ("?" if cold["host_cpu_ms_per_run"] is None else f"{cold['host_cpu_ms_per_run']:.1f} ms"),
        f"  floor: ctr + containerd's own share ~ {FLOOR_MS:.0f} ms (no-op shim; a known figure from an "
        "idle machine, not measured here)",
        f"         -> ratio floor ~ {FLOOR_MS / runc['median']:.2f} against this runc median; "
        f"layotto's own share (median - floor) ~ {lay['median'] - FLOOR_MS:.1f} ms",
    ]
    busy = max(results["loadavg_before"], results["loadavg_after"])
    if busy > 0.5 * (results["cpus"] or 1):
        lines.append(
            f"  note: load average {busy:.2f} on {results['cpus']} CPUs: other work competed for them; every "
            "figure\n        (the floor too) is inflated and noisier than on an idle machine"
        )
    lines += [
        "",
        f"shim binary exec, {results['shim']['start_fast']['n']} times each (as containerd runs it)",
        f"  {'ms':<50}{'median':>8}{'p90':>8}",
    ]
    rows = [
        ("start  (fast path: host alive)", results["shim"]["start_fast"]),
        ("delete (fast path: host alive, nothing mounted)", results["shim"]["delete_fast"]),
        ("delete (slow path: no host, Python bootstrap)", results["shim"]["delete_slow"]),
    ]
    rows += [(f"reference: {name}", s) for name, s in results["reference"].items()]
    for name, s in rows:
        lines.append(f"  {name:<50}{s['median']:8.1f}{s['p90']:8.1f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.coldstart",
        description="Time `ctr run --rm` of hello.wasm under layotto against busybox echo under runc, "
        "and the shim binary's start/delete execs.",
    )
    parser.add_argument("--runs", type=_positive, default=30, help="interleaved runs per runtime (30)")
    parser.add_argument(
        "--shim-runs", type=_positive, default=None, help="execs per shim action (default: --runs)"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write all numbers as JSON")
    parser.add_argument("--log-level", default="info", help="containerd's log level (info)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    shim = Path(sys.executable).parent / SHIM_NAME
    if not os.access(shim, os.X_OK):
        print(f"{shim} is missing: install the project (`make venv`)", file=sys.stderr)
        return 2
    for tool in ("containerd", "ctr", "runc"):
        if not shutil.which(tool):
            print(f"{tool} is not installed (`make deps`)", file=sys.stderr)
            return 2

    c = Containerd(
        path_prepend=[Path(sys.executable).parent],
        cri=False,
        snapshotter=default_snapshotter(),
        log_level=args.log_level,
    )
    results: dict[str, Any] = {
        "runs": args.runs,
        "containerd": _containerd_version(),
        "runc": _version(["runc", "--version"]),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "snapshotter": c.snapshotter,
        "loadavg_before": os.getloadavg()[0],
        "target_ratio": TARGET_RATIO,
        "floor_ms": FLOOR_MS,
    }
    progress = not args.quiet and sys.stderr.isatty()
    try:
        c.start()
        bench = Bench(c)
        bench.prepare_images()
        results["cold_start"] = bench.cold_starts(args.runs, progress)
        results["shim"] = bench.shim_execs(shim, args.shim_runs or args.runs)
        results["reference"] = reference_execs(args.shim_runs or args.runs)
        host_log = c.state / "layotto" / "host.log"
        results["host_log_bytes"] = host_log.stat().st_size if host_log.exists() else None
    except (BenchError, ContainerdError) as e:
        print(f"coldstart: {e}", file=sys.stderr)
        print(f"containerd log ({c.log}), last lines:\n{c.log_tail(20)}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"coldstart: {e}", file=sys.stderr)
        return 1
    finally:
        c.stop()

    results["loadavg_after"] = os.getloadavg()[0]
    lay = results["cold_start"]["layotto"]["median"]
    runc = results["cold_start"]["runc"]["median"]
    results["ratio_median"] = lay / runc
    results["pass"] = results["ratio_median"] <= TARGET_RATIO
    print(report(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

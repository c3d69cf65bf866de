"""Start-rate benchmark: containers per second through containerd, layotto against runc.

``python -m tests.bench.startrate [--n N] [--clients C] [--client ctr|grpc|both]
[--grpc-channels per-client|shared] [--rounds R] [--json PATH]``:

1. starts a private containerd (no CRI) whose PATH finds this interpreter's shim, and
   imports three images: fn-hello (a function module), sleeper (a command module that
   blocks in one long sleep) and a static busybox for runc;
2. warms up: one container of each kind is started and deleted (this starts the node host
   and compiles both modules, so no timed phase pays for it);
3. for each client and kind, starts N containers with C parallel clients (threads, each
   starting its share of the ids one after the other), then polls the task list until
   every one of them is RUNNING; the rate is N / (time until all are RUNNING). Two clients,
   measured in the same containerd run (``--client both``, the default):

   - ``ctr``: each start is a ``ctr run -d`` process (a Go program started per container,
     which resolves the image again every time), as a person at a shell would;
   - ``grpc``: each start is :meth:`ContainerdClient.run_detached
     <tests.containerd_client.ContainerdClient.run_detached>` in this process, a
     long-lived gRPC client the way kubelet talks to containerd (it reads each image
     once). ``--grpc-channels per-client`` (default) gives every client thread a channel
     and connection of its own, like C separate clients; ``shared``: one channel for all.

   Every kind's containers are deleted again (by the same client) before the next kind
   starts, so each phase starts on the same (empty) containerd. ``--rounds`` repeats the
   phases, alternating their order, and reports the best round of each client and kind;
4. prints per client and kind: containers/s, the latency of one start under that load
   (p50/p90/max), the CPU per container of each party (the client: the ctr processes
   and this process, which forks them or is the gRPC client; containerd; the shim
   binary's execs; the node host or runc's shims + runc + ``runc init``) and of the whole
   machine, and per client the rate ratio layotto/runc against the target (>= 4,
   informational: the exit status is 0 either way), with the ratio of CPU per container
   (what the rate ratio tends to once the machine is the limit) and the ceiling that the
   client's + containerd's own CPU puts on it;
5. ``--json PATH`` writes every sample and summary.

containerd is always stopped at the end, taking its shims, the node host and mounts along.

This module also holds the harness the other benchmarks (density, invoke, scale) share:
the images, :class:`Fleet` (parallel starts through ``ctr run -d`` or the gRPC client,
waiting for RUNNING, parallel teardown), :func:`run_fleet_benchmark` (containerd up,
images in, always torn down) and process memory and CPU readings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layotto.images.builder import build_image, busybox_image
from tests.bench.coldstart import BenchError, cpu_seconds, percentile
from tests.containerd_client import ClientError, ContainerdClient, ImageCache
from tests.containerd_env import Containerd, ContainerdError, CtrError, default_snapshotter

REPO_ROOT = Path(__file__).resolve().parents[2]
WASM_DIR = REPO_ROOT / "build" / "wasm"
SHIM_NAME = "containerd-shim-layotto-v1"
LAYOTTO_RUNTIME = "io.containerd.layotto.v1"
FN_IMAGE = "docker.io/library/fn-hello:bench"
SLEEPER_IMAGE = "docker.io/library/sleeper:bench"
BUSYBOX_IMAGE = "docker.io/library/busybox:layotto"

#: Target: layotto containers per second >= this many times runc's.
TARGET_RATIO = 4.0
CTR_TIMEOUT = 120.0
#: How the fleet starts and removes containers: ``ctr`` processes or the gRPC client.
CLIENTS = ("ctr", "grpc")
GRPC_CHANNELS = ("per-client", "shared")


# --------------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class Kind:
    """One kind of container the fleet benchmarks start."""

    key: str
    label: str
    image: str
    runtime: str | None  # None: containerd's default (runc)
    args: tuple[str, ...] = ()  # command override after the container id
    annotations: tuple[tuple[str, str], ...] = ()

    @property
    def layotto(self) -> bool:
        return self.runtime == LAYOTTO_RUNTIME


FN = Kind("fn", "layotto fn-hello (function)", FN_IMAGE, LAYOTTO_RUNTIME)
SLEEPER = Kind("sleeper", "layotto sleeper (command)", SLEEPER_IMAGE, LAYOTTO_RUNTIME)
RUNC = Kind("runc", "runc busybox sleep", BUSYBOX_IMAGE, None, ("/bin/sleep", "86400"))
KINDS = {k.key: k for k in (FN, SLEEPER, RUNC)}


# --------------------------------------------------------------------------- environment


def preflight(tools: Sequence[str] = ("containerd", "ctr", "runc")) -> str | None:
    """Why the benchmarks cannot run here, or None."""
    if os.geteuid() != 0:
        return "benchmarks must run as root (they start a private containerd and runc)"
    shim = Path(sys.executable).parent / SHIM_NAME
    if not os.access(shim, os.X_OK):
        return f"{shim} is missing: install the project (`make venv`)"
    for tool in tools:
        if not shutil.which(tool):
            return f"{tool} is not installed (`make deps`)"
    return None


def ensure_modules(*names: str) -> dict[str, Path]:
    """Paths of the named modules in build/wasm, building the missing ones."""
    paths = {name: WASM_DIR / f"{name}.wasm" for name in names}
    missing = [str(p.relative_to(REPO_ROOT)) for p in paths.values() if not p.exists()]
    if missing:
        subprocess.run(["make", "-f", "images/build.mk", *missing], cwd=REPO_ROOT, check=True)
    return paths


def _version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.strip().splitlines()[0] if out.strip() else "?"


def source_info() -> dict[str, Any]:
    """The commit measured, and which host/shim files differed from it (others edit them)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "host", "shim", "abi"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split("\n")
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {"head": head, "modified": [line[3:] for line in dirty if line.strip()]}


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    fields = _version(["containerd", "--version"]).split()
    return {
        "source": source_info(),
        "containerd": f"containerd {fields[2]}" if len(fields) > 2 else "containerd ?",
        "runc": _version(["runc", "--version"]),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_before": os.getloadavg()[0],
    }


def progress_enabled(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def note(text: str, enabled: bool) -> None:
    """A transient progress line on stderr (only on a terminal)."""
    if enabled:
        print("\r\033[K" + text, end="", file=sys.stderr, flush=True)


def clear_note(enabled: bool) -> None:
    if enabled:
        print("\r\033[K", end="", file=sys.stderr, flush=True)


def new_containerd(log_level: str = "warn") -> Containerd:
    return Containerd(
        path_prepend=[Path(sys.executable).parent],
        cri=False,
        snapshotter=default_snapshotter(),
        log_level=log_level,
    )


def import_images(c: Containerd, kinds: Iterable[Kind]) -> None:
    """Build and import the images the given kinds run."""
    wanted = {k.image for k in kinds}
    images = c.base / "images"
    images.mkdir(exist_ok=True)
    if FN_IMAGE in wanted:
        wasm = ensure_modules("fn-hello")["fn-hello"]
        build_image(images / "fn.tar", {"/fn-hello.wasm": wasm}, name=FN_IMAGE, cmd=["/fn-hello.wasm"])
        c.import_image(images / "fn.tar")
    if SLEEPER_IMAGE in wanted:
        wasm = ensure_modules("sleeper")["sleeper"]
        # The sleeper's argument: seconds to sleep (far longer than any benchmark).
        cmd = ["/sleeper.wasm", "86400"]
        build_image(images / "sleeper.tar", {"/sleeper.wasm": wasm}, name=SLEEPER_IMAGE, cmd=cmd)
        c.import_image(images / "sleeper.tar")
    if BUSYBOX_IMAGE in wanted:
        busybox_image(images / "busybox.tar", BUSYBOX_IMAGE)
        c.import_image(images / "busybox.tar")


def host_pid(c: Containerd) -> int | None:
    """The node host's pid (from ``<state>/layotto/host.pid``), or None."""
    try:
        return int((c.state / "layotto" / "host.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def machine_cpu_seconds() -> float:
    """CPU seconds every CPU of the machine has spent busy (not idle/iowait) so far."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # minus idle and iowait; guest is in user
    return busy / os.sysconf("SC_CLK_TCK")


def reaped_cpu_seconds(pid: int | None) -> float | None:
    """CPU seconds of the children *pid* has waited for (cutime + cstime), or None: for
    containerd, the shim binary's ``start``/``delete`` execs; for a runc shim, runc's."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """User + system CPU of this process's waited-for children (the ctr commands)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def self_cpu_seconds() -> float:
    """User + system CPU of this process, every thread (the gRPC client lives here)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --------------------------------------------------------------------------- memory readings


def proc_memory(pid: int) -> dict[str, int]:
    """Memory of one process in bytes (rss, pss, uss = private clean + dirty, swap) from
    /proc/<pid>/smaps_rollup, plus its number of memory mappings, threads and fds."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    with open(f"/proc/{pid}/maps", "rb") as f:
        maps = sum(1 for _ in f)
    threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = -1
    return {
        "rss": out.get("Rss", 0),
        "pss": out.get("Pss", 0),
        "uss": out.get("Private_Clean", 0) + out.get("Private_Dirty", 0),
        "swap": out.get("Swap", 0),
        "maps": maps,
        "threads": threads,
        "fds": fds,
    }


def memory_delta(after: dict[str, int], before: dict[str, int], count: int) -> dict[str, float]:
    """Per-item growth between two :func:`proc_memory` readings."""
    return {key: (after[key] - before[key]) / count for key in after if key in before}


def ppid_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[1])


# --------------------------------------------------------------------------- the fleet


@dataclass
class StartResult:
    """One parallel start of ``n`` containers."""

    kind: str
    n: int
    clients: int
    client: str = "ctr"  # "ctr" (a `ctr run -d` per container) or "grpc" (ContainerdClient)
    ctr_seconds: list[float] = field(default_factory=list)  # each start (`ctr run -d` or gRPC), wall
    all_returned: float = 0.0  # seconds until the last start returned
    all_running: float = 0.0  # seconds until the task list showed every one RUNNING
    host_cpu: float | None = None  # node host CPU seconds during the phase
    containerd_cpu: float | None = None
    ctr_cpu: float = 0.0  # the ctr processes themselves (this process's reaped children)
    harness_cpu: float = 0.0  # this process: forking ctr, or being the gRPC client
    shim_exec_cpu: float | None = None  # shim binary execs containerd ran (its reaped children)
    runc_shim_cpu: float | None = None  # runc: the shims, the runc they ran, `runc init`
    machine_cpu: float = 0.0  # busy CPU seconds of the whole machine

    @property
    def rate(self) -> float:
        return self.n / self.all_running

    def summary(self) -> dict[str, Any]:
        ms = [s * 1000.0 for s in self.ctr_seconds]
        per = 1000.0 / self.n

        def cpu(seconds: float | None) -> float | None:
            return None if seconds is None else seconds * per

        return {
            "kind": self.kind,
            "client": self.client,
            "n": self.n,
            "clients": self.clients,
            "rate_per_s": self.rate,
            "all_returned_s": self.all_returned,
            "all_running_s": self.all_running,
            "ctr_run_ms": {
                "median": percentile(ms, 50),
                "p90": percentile(ms, 90),
                "p99": percentile(ms, 99),
                "max": max(ms),
                "samples": [round(x, 2) for x in ms],
            },
            "host_cpu_ms_per_container": cpu(self.host_cpu),
            "containerd_cpu_ms_per_container": cpu(self.containerd_cpu),
            "ctr_cpu_ms_per_container": cpu(self.ctr_cpu),
            "harness_cpu_ms_per_container": cpu(self.harness_cpu),
            # The client side, whichever client: ctr processes + this process.
            "client_cpu_ms_per_container": cpu(self.ctr_cpu + self.harness_cpu),
            "shim_exec_cpu_ms_per_container": cpu(self.shim_exec_cpu),
            "runc_shim_cpu_ms_per_container": cpu(self.runc_shim_cpu),
            # Everything attributable to this phase's containers, however busy the machine.
            "attributed_cpu_ms_per_container": sum(
                x * per
                for x in (
                    self.host_cpu,
                    self.containerd_cpu,
                    self.ctr_cpu,
                    self.harness_cpu,
                    self.shim_exec_cpu,
                    self.runc_shim_cpu,
                )
                if x is not None
            ),
            "machine_cpu_ms_per_container": self.machine_cpu * per,
            "machine_cpu_utilization": self.machine_cpu / self.all_running / (os.cpu_count() or 1),
        }


def split(items: Sequence[str], parts: int) -> list[list[str]]:
    """Round-robin shares of *items* for *parts* clients (empty shares dropped)."""
    return [list(items[i::parts]) for i in range(parts) if items[i::parts]]


class Fleet:
    """Containers started by parallel clients, and their teardown.

    ``client`` picks how: ``"ctr"`` runs one ``ctr run -d`` process per container (and
    ``ctr`` for listing and teardown); ``"grpc"`` uses :class:`ContainerdClient` from
    this process: with ``grpc_channels="per-client"`` each client thread has its own
    channel (its own connection), with ``"shared"`` all threads share one. The clients
    share one image cache, so only the first start of an image reads it. ``client`` may
    be changed between phases (:meth:`use`).
    """

    def __init__(
        self, c: Containerd, progress: bool = False, client: str = "ctr", grpc_channels: str = "per-client"
    ) -> None:
        if client not in CLIENTS:
            raise ValueError(f"unknown client {client!r}: choose from {', '.join(CLIENTS)}")
        if grpc_channels not in GRPC_CHANNELS:
            raise ValueError(
                f"unknown channel mode {grpc_channels!r}: choose from {', '.join(GRPC_CHANNELS)}"
            )
        self.c = c
        self.progress = progress
        self.client = client
        self.grpc_channels = grpc_channels
        self.live: dict[str, Kind] = {}  # containers created (maybe not started) and not deleted
        self._lock = threading.Lock()
        self._serial = 0
        self._images = ImageCache()
        self._grpc: dict[int, ContainerdClient] = {}  # client slot -> its gRPC client

    def use(self, client: str) -> None:
        """Start, list and delete through *client* ("ctr" or "grpc") from now on."""
        if client not in CLIENTS:
            raise ValueError(f"unknown client {client!r}: choose from {', '.join(CLIENTS)}")
        self.client = client

    def grpc(self, slot: int = 0) -> ContainerdClient:
        """The gRPC client of client thread *slot* (one for all with shared channels)."""
        key = slot if self.grpc_channels == "per-client" else 0
        with self._lock:
            found = self._grpc.get(key)
            if found is None:
                found = self._grpc[key] = ContainerdClient(
                    str(self.c.address),
                    snapshotter=self.c.snapshotter,
                    private_connection=self.grpc_channels == "per-client",
                    image_cache=self._images,
                    timeout=CTR_TIMEOUT,
                )
            return found

    def close(self) -> None:
        """Close the gRPC clients' channels."""
        with self._lock:
            clients, self._grpc = list(self._grpc.values()), {}
        for client in clients:
            client.close()

    def ids(self, kind: Kind, n: int) -> list[str]:
        with self._lock:
            first = self._serial
            self._serial += n
        return [f"{kind.key}-{i}" for i in range(first, first + n)]

    def run_argv(self, kind: Kind, cid: str) -> list[str]:
        args = ["run", "-d", "--snapshotter", self.c.snapshotter]
        if kind.runtime:
            args += ["--runtime", kind.runtime]
        for key, value in kind.annotations:
            args += ["--annotation", f"{key}={value}"]
        return self.c.ctr_argv(*args, kind.image, cid, *kind.args)

    def _run_one(self, kind: Kind, cid: str, slot: int = 0) -> float:
        with self._lock:
            self.live[cid] = kind
        if self.client == "grpc":
            return self._run_grpc(kind, cid, slot)
        began = time.perf_counter()
        try:
            r = subprocess.run(
                self.run_argv(kind, cid),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=CTR_TIMEOUT,
            )
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"ctr run -d {cid} timed out after {CTR_TIMEOUT} s") from e
        seconds = time.perf_counter() - began
        if r.returncode != 0:
            raise BenchError(
                f"ctr run -d {cid} ({kind.label}) exited {r.returncode}:\n"
                f"{r.stderr.decode(errors='replace').strip()}"
            )
        return seconds

    def _run_grpc(self, kind: Kind, cid: str, slot: int) -> float:
        client = self.grpc(slot)
        began = time.perf_counter()
        try:
            client.run_detached(cid, kind.image, kind.runtime, kind.args, kind.annotations)
        except ClientError as e:
            with self._lock:
                self.live.pop(cid, None)  # run_detached removed what it had created
            raise BenchError(f"gRPC start of {cid} ({kind.label}) failed: {e}") from e
        return time.perf_counter() - began

    def task_status(self) -> dict[str, str]:
        """Container id → task status (RUNNING, STOPPED, ...), from ``ctr tasks ls`` or,
        with the gRPC client, Tasks.List."""
        if self.client == "grpc":
            return self._grpc_call(lambda g: g.task_statuses())
        return self.ctr_task_status()

    def ctr_task_status(self) -> dict[str, str]:
        """Container id → task status, always from ``ctr tasks ls``."""
        out = self.c.ctr("tasks", "ls", timeout=CTR_TIMEOUT).stdout
        result = {}
        for line in out.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 3:
                result[parts[0]] = parts[-1]
        return result

    def task_pids(self) -> dict[str, int]:
        if self.client == "grpc":
            return self._grpc_call(lambda g: {cid: t.pid for cid, t in g.tasks().items() if t.pid})
        out = self.c.ctr("tasks", "ls", timeout=CTR_TIMEOUT).stdout
        result = {}
        for line in out.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 3 and parts[1].isdigit():
                result[parts[0]] = int(parts[1])
        return result

    def _grpc_call(self, call: Callable[[ContainerdClient], Any]) -> Any:
        try:
            return call(self.grpc())
        except ClientError as e:
            raise BenchError(str(e)) from e

    def runc_shims(self, ids: Sequence[str]) -> tuple[list[int], list[int]]:
        """(shim pids, container init pids) of the runc containers *ids*: one
        ``containerd-shim-runc-v2`` per container, the parent of its init process."""
        pids = self.task_pids()
        inits = [pids[cid] for cid in ids if cid in pids]
        shims = []
        for pid in inits:
            shim = ppid_of(pid)
            with open(f"/proc/{shim}/cmdline", "rb") as f:
                if b"containerd-shim-runc-v2" not in f.read():
                    raise BenchError(f"the parent of container process {pid} is not containerd-shim-runc-v2")
            shims.append(shim)
        if len(inits) != len(ids) or len(set(shims)) != len(ids):
            raise BenchError(f"expected one shim per runc container, found {len(set(shims))} for {len(ids)}")
        return shims, inits

    def wait_running(self, ids: Sequence[str], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            status = self.task_status()
            bad = {cid: status.get(cid, "missing") for cid in ids if status.get(cid) != "RUNNING"}
            if not bad:
                return
            stopped = {cid: s for cid, s in bad.items() if s == "STOPPED"}
            if stopped or time.monotonic() > deadline:
                shown = ", ".join(f"{cid}: {s}" for cid, s in list(bad.items())[:5])
                raise BenchError(f"{len(bad)} of {len(ids)} containers are not RUNNING ({shown})")
            time.sleep(0.01)

    def start(self, kind: Kind, n: int, clients: int, label: str = "") -> tuple[StartResult, list[str]]:
        """Start *n* containers of *kind* with *clients* parallel clients; returns the
        timings and the new ids. Raises BenchError on the first failed start."""
        ids = self.ids(kind, n)
        result = StartResult(kind.key, n, clients, self.client)
        shares = split(ids, clients)
        if self.client == "grpc":
            for slot in range(len(shares)):
                self.grpc(slot)  # channels exist before the clock starts, as in a long-lived client
        hpid = host_pid(self.c) if kind.layotto else None
        cpid = self.c.process.pid if self.c.process is not None else None
        host0, ctrd0, mach0 = cpu_seconds(hpid), cpu_seconds(cpid), machine_cpu_seconds()
        ctr0, self0, execs0 = children_cpu_seconds(), self_cpu_seconds(), reaped_cpu_seconds(cpid)
        failed = threading.Event()
        done = [0]

        def client(slot: int, share: list[str]) -> list[float]:
            times = []
            for cid in share:
                if failed.is_set():
                    break
                try:
                    times.append(self._run_one(kind, cid, slot))
                except BaseException:
                    failed.set()
                    raise
                with self._lock:
                    done[0] += 1
                    count = done[0]
                if count % 25 == 0:
                    note(f"  {label or kind.key}: {count}/{n} started", self.progress)
            return times

        began = time.perf_counter()
        with ThreadPoolExecutor(max(1, clients)) as pool:
            futures = [pool.submit(client, slot, share) for slot, share in enumerate(shares)]
            errors = []
            for fut in futures:
                try:
                    result.ctr_seconds += fut.result()
                except BaseException as e:  # collected, the first one re-raised below
                    errors.append(e)
        result.all_returned = time.perf_counter() - began
        if errors:
            raise errors[0]
        self.wait_running(ids)
        result.all_running = time.perf_counter() - began
        if kind.layotto and hpid is None:
            hpid = host_pid(self.c)  # the host was started by this phase: count from here
            host0 = None
        host1, ctrd1 = cpu_seconds(hpid), cpu_seconds(cpid)
        result.host_cpu = None if host0 is None or host1 is None else host1 - host0
        result.containerd_cpu = None if ctrd0 is None or ctrd1 is None else ctrd1 - ctrd0
        result.machine_cpu = machine_cpu_seconds() - mach0
        result.ctr_cpu = children_cpu_seconds() - ctr0
        result.harness_cpu = self_cpu_seconds() - self0
        execs1 = reaped_cpu_seconds(cpid)
        result.shim_exec_cpu = None if execs0 is None or execs1 is None else execs1 - execs0
        if not kind.layotto:
            # Each runc container has a shim of its own, started by this phase: all its CPU
            # (and runc's, its reaped children) is this phase's.
            # The container's own process counts too: it was `runc init` (namespaces, mounts,
            # the Go runtime) until it exec'd the command.
            shims, inits = self.runc_shims(ids)
            total = 0.0
            for pid in [*shims, *inits]:
                total += (cpu_seconds(pid) or 0.0) + (reaped_cpu_seconds(pid) or 0.0)
            result.runc_shim_cpu = total
        clear_note(self.progress)
        return result, ids

    def delete(self, ids: Sequence[str] | None = None, clients: int = 8, batch: int = 50) -> float:
        """Force-delete the tasks and containers *ids* (default: every live one), in
        batches spread over *clients* threads (with the gRPC client: one container at a
        time per thread); returns the seconds it took."""
        ids = list(self.live if ids is None else ids)
        if not ids:
            return 0.0
        if self.client == "grpc":
            return self._delete_grpc(ids, clients)
        began = time.perf_counter()
        batches = [ids[i : i + batch] for i in range(0, len(ids), batch)]

        def one(chunk: list[str]) -> None:
            r = self.c.ctr("tasks", "delete", "-f", *chunk, check=False, timeout=CTR_TIMEOUT)
            if r.returncode != 0:  # some task was already gone: go one by one
                for cid in chunk:
                    self.c.ctr("tasks", "delete", "-f", cid, check=False, timeout=CTR_TIMEOUT)
            r = self.c.ctr("containers", "delete", *chunk, check=False, timeout=CTR_TIMEOUT)
            if r.returncode != 0:
                for cid in chunk:
                    self.c.ctr("containers", "delete", cid, check=False, timeout=CTR_TIMEOUT)

        with ThreadPoolExecutor(max(1, clients)) as pool:
            list(pool.map(one, batches))
        with self._lock:
            for cid in ids:
                self.live.pop(cid, None)
        left = set(ids) & set(self.c.ctr("containers", "ls", "-q", timeout=CTR_TIMEOUT).stdout.split())
        if left:
            raise BenchError(f"{len(left)} containers survived deletion, e.g. {sorted(left)[:3]}")
        return time.perf_counter() - began

    def _delete_grpc(self, ids: list[str], clients: int) -> float:
        began = time.perf_counter()
        errors: list[str] = []

        def one(slot: int, share: list[str]) -> None:
            client = self.grpc(slot)
            for cid in share:
                try:
                    client.delete(cid)
                except ClientError as e:
                    errors.append(str(e))

        with ThreadPoolExecutor(max(1, clients)) as pool:
            futures = [pool.submit(one, slot, share) for slot, share in enumerate(split(ids, clients))]
            for fut in futures:
                fut.result()
        with self._lock:
            for cid in ids:
                self.live.pop(cid, None)
        left = set(ids) & set(self._grpc_call(lambda g: g.containers()))
        if left or errors:
            raise BenchError(
                f"{len(left)} containers survived deletion, e.g. {sorted(left)[:3]}"
                + (f"; {len(errors)} errors, the first: {errors[0]}" if errors else "")
            )
        return time.perf_counter() - began

    def warm_up(self, kinds: Iterable[Kind]) -> dict[str, float]:
        """Start and delete one container of each kind (starts the node host, compiles
        the modules, unpacks nothing new later); returns each first start's seconds."""
        firsts = {}
        for kind in kinds:
            result, ids = self.start(kind, 1, 1, label=f"warm-up {kind.key}")
            firsts[kind.key] = result.all_running
            self.delete(ids)
        return firsts


def run_fleet_benchmark(
    name: str,
    args: argparse.Namespace,
    kinds: Sequence[Kind],
    body: Callable[[Containerd, Fleet], dict[str, Any]],
) -> tuple[int, dict[str, Any] | None]:
    """Common frame: preflight, containerd up, images in, *body*, containerd always down.
    Returns (exit status, results or None)."""
    why = preflight()
    if why:
        print(f"{name}: {why}", file=sys.stderr)
        return 2, None
    c = new_containerd(args.log_level)
    # Benchmarks with a --client option start their fleets through it; the others use ctr.
    client = getattr(args, "client", "ctr")
    fleet = Fleet(
        c,
        progress_enabled(args.quiet),
        client if client in CLIENTS else "ctr",
        getattr(args, "grpc_channels", "per-client"),
    )
    results: dict[str, Any] = machine_info()
    results["snapshotter"] = c.snapshotter
    try:
        c.start()
        import_images(c, kinds)
        results.update(body(c, fleet))
    except (BenchError, ContainerdError, CtrError) as e:
        clear_note(progress_enabled(args.quiet))
        print(f"{name}: {e}", file=sys.stderr)
        print(f"containerd log ({c.log}), last lines:\n{c.log_tail(20)}", file=sys.stderr)
        host_log = c.state / "layotto" / "host.log"
        if host_log.exists():
            tail = host_log.read_text(errors="replace").splitlines()[-20:]
            print(f"node host log ({host_log}), last lines:\n" + "\n".join(tail), file=sys.stderr)
        return 1, None
    except subprocess.CalledProcessError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 1, None
    finally:
        if fleet.live and c.running:
            try:  # in parallel: containerd's own stop() deletes tasks one at a time
                fleet.delete()
            except (BenchError, ContainerdError, CtrError, subprocess.TimeoutExpired) as e:
                print(f"{name}: cleanup: {e}", file=sys.stderr)
        fleet.close()
        c.stop()
    results["loadavg_after"] = os.getloadavg()[0]
    return 0, results


def write_json(path: Path | None, results: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {path}")


def load_note(results: dict[str, Any]) -> list[str]:
    busy = max(results["loadavg_before"], results.get("loadavg_after", 0.0))
    if busy > 0.5 * (results["cpus"] or 1):
        return [
            f"  note: load average {busy:.2f} on {results['cpus']} CPUs before/after: other work "
            "competed for them; figures are inflated and noisier than on an idle machine"
        ]
    return []


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def client_arguments(parser: argparse.ArgumentParser, default: str = "grpc", both: bool = True) -> None:
    """--client (how fleets start containers) and --grpc-channels."""
    choices = [*CLIENTS, "both"] if both else list(CLIENTS)
    parser.add_argument(
        "--client",
        choices=choices,
        default=default,
        help=f"start containers with `ctr run -d` processes or the long-lived gRPC client ({default})",
    )
    parser.add_argument(
        "--grpc-channels",
        choices=GRPC_CHANNELS,
        default="per-client",
        help="gRPC client threads: a channel (connection) each, or one shared (per-client)",
    )


def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write all numbers as JSON")
    parser.add_argument("--log-level", default="warn", help="containerd's log level (warn)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


# --------------------------------------------------------------------------- start rate


def start_rates(c: Containerd, fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    kinds = [KINDS[k] for k in args.kinds]
    modes = list(CLIENTS) if args.client == "both" else [args.client]
    firsts = {}
    for mode in modes:  # each client reads the images, starts the host, compiles: untimed
        fleet.use(mode)
        firsts[mode] = fleet.warm_up(kinds)
    rounds: list[dict[str, dict[str, Any]]] = []
    for r in range(args.rounds):
        phase: dict[str, dict[str, Any]] = {}
        for mode in modes if r % 2 == 0 else list(reversed(modes)):
            fleet.use(mode)
            phase[mode] = {}
            for kind in kinds if r % 2 == 0 else list(reversed(kinds)):
                label = f"round {r + 1} {mode} {kind.key}"
                result, ids = fleet.start(kind, args.n, args.clients, label=label)
                summary = result.summary()
                summary["teardown_s"] = fleet.delete(ids, args.clients)
                phase[mode][kind.key] = summary
        rounds.append(phase)
    best: dict[str, dict[str, Any]] = {}
    ratios: dict[str, dict[str, float]] = {}
    passed: dict[str, bool] = {}
    for mode in modes:
        best[mode] = {
            k.key: max((rnd[mode][k.key] for rnd in rounds), key=lambda s: s["rate_per_s"]) for k in kinds
        }
        ratios[mode] = {}
        if "runc" in best[mode]:
            runc_rate = best[mode]["runc"]["rate_per_s"]
            ratios[mode] = {
                key: s["rate_per_s"] / runc_rate for key, s in best[mode].items() if key != "runc"
            }
        passed[mode] = bool(ratios[mode]) and all(v >= TARGET_RATIO for v in ratios[mode].values())
    # The verdict is the gRPC client's when it ran: that is how orchestrators start containers.
    judged = "grpc" if "grpc" in modes else modes[0]
    return {
        "n": args.n,
        "clients": args.clients,
        "client_modes": modes,
        "grpc_channels": args.grpc_channels,
        "first_start_s": firsts,
        "rounds": rounds,
        "best": best,
        "ratio_by_client": ratios,
        # Flat, for `python -m tests.bench`'s one-line verdict: "<kind> (<client>)" -> ratio.
        "ratio_vs_runc": {f"{key} ({mode})": v for mode in modes for key, v in ratios[mode].items()},
        "target_ratio": TARGET_RATIO,
        "pass_by_client": passed,
        "judged_client": judged,
        "pass": passed[judged],
    }


CLIENT_TEXT = {
    "ctr": "`ctr run -d` processes",
    "grpc": "one gRPC client process (ContainerdClient.run_detached)",
}


def report(results: dict[str, Any]) -> str:
    channels = results.get("grpc_channels", "per-client")
    lines = [
        f"start rate: {results['n']} containers per kind and client, {results['clients']} parallel clients "
        f"({results['containerd']}, {results['cpus']} CPUs, {results['snapshotter']}, "
        f"best of {len(results['rounds'])} round(s), gRPC channels: {channels})",
    ]

    def ms(value: float | None) -> str:
        return f"{'-' if value is None else f'{value:.1f}':>6}"

    for mode, best in results["best"].items():
        lines += [
            "",
            f"  client {mode}: {CLIENT_TEXT[mode]}",
            f"  {'':<29}{'cont/s':>7}{'all up':>7}{'st p50':>7}{'p90':>6}{'max':>6}"
            f"{'ctr':>6}{'self':>6}{'ctrd':>6}{'shim':>6}{'rt':>6}{'sum':>6}{'mach':>6}"
            f"{'busy':>5}{'rm s':>6}",
        ]
        for key, s in best.items():
            run = s["ctr_run_ms"]
            runtime = (
                s["host_cpu_ms_per_container"] if KINDS[key].layotto else s["runc_shim_cpu_ms_per_container"]
            )
            lines.append(
                f"  {KINDS[key].label:<29}{s['rate_per_s']:7.1f}{s['all_running_s']:7.2f}"
                f"{run['median']:7.0f}{run['p90']:6.0f}{run['max']:6.0f}"
                + ms(s["ctr_cpu_ms_per_container"])
                + ms(s.get("harness_cpu_ms_per_container"))
                + ms(s["containerd_cpu_ms_per_container"])
                + ms(s["shim_exec_cpu_ms_per_container"])
                + ms(runtime)
                + ms(s["attributed_cpu_ms_per_container"])
                + ms(s["machine_cpu_ms_per_container"])
                + f"{s['machine_cpu_utilization']:5.0%}{s['teardown_s']:6.1f}"
            )
    lines += [
        "",
        "  (all up: s until every task was RUNNING; st p50..max: ms of one start (`ctr run -d`, or",
        "   run_detached) under this load; CPU ms per container of: ctr: the ctr processes; self: this",
        "   process (forking ctr, or the gRPC client); ctrd: containerd; shim: the shim binary execs",
        "   containerd ran; rt: the node host, or runc's shims, runc and `runc init`; sum: all of",
        "   those; mach: the whole machine, other work included; busy: its CPU use; rm s: teardown)",
    ]
    for mode, ratios in results["ratio_by_client"].items():
        best = results["best"][mode]
        lines.append("")
        for key, ratio in ratios.items():
            verdict = "PASS" if ratio >= TARGET_RATIO else "MISS"
            line = f"  {mode}: rate ratio {key}/runc: {ratio:5.2f}x   target >= {TARGET_RATIO:g}x: {verdict}"
            lay, runc = best[key], best["runc"]
            lay_cpu, runc_cpu = (
                lay["attributed_cpu_ms_per_container"],
                runc["attributed_cpu_ms_per_container"],
            )
            if lay_cpu and runc_cpu:
                # runc's attributed CPU misses kernel work done in kernel threads (cgroups,
                # namespaces, mounts); the machine's CPU includes it, and other work too.
                runc_hi = max(runc_cpu, runc["machine_cpu_ms_per_container"])
                common = (lay["containerd_cpu_ms_per_container"] or 0) + lay["client_cpu_ms_per_container"]
                line += (
                    f"\n    CPU per container runc/{key}: {runc_cpu / lay_cpu:.2f}x attributed, "
                    f"{runc_hi / lay_cpu:.2f}x counting runc's phase's whole machine CPU"
                    f"\n    (what the rate ratio tends to once CPU-bound); the client + containerd alone "
                    f"take {common:.1f} of {key}'s {lay_cpu:.1f} ms,\n    so even a free shim and host "
                    "would give "
                    f"{runc_cpu / common:.1f}x-{runc_hi / common:.1f}x"
                )
            lines.append(line)
    if len(results["rounds"]) > 1:
        for mode in results["best"]:
            for key in results["best"][mode]:
                rates = ", ".join(f"{rnd[mode][key]['rate_per_s']:.1f}" for rnd in results["rounds"])
                lines.append(f"  {mode} {key} containers/s per round: {rates}")
    lines.append(
        f"  verdict ({results['judged_client']} client, how orchestrators start containers): "
        + ("PASS" if results["pass"] else "MISS")
    )
    lines += load_note(results)
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.startrate",
        description="Containers per second through containerd with parallel clients (`ctr run -d` "
        "processes and a long-lived gRPC client): layotto (function and command modules) against "
        "runc (busybox sleep).",
    )
    parser.add_argument("--n", type=positive, default=200, help="containers per kind and round (200)")
    parser.add_argument("--clients", type=positive, default=8, help="parallel clients (8)")
    parser.add_argument("--rounds", type=positive, default=1, help="rounds; the best of each kind counts (1)")
    parser.add_argument(
        "--kinds",
        type=lambda s: [k for k in s.split(",") if k],
        default=["fn", "sleeper", "runc"],
        help="comma-separated subset of fn,sleeper,runc (all)",
    )
    client_arguments(parser, default="both")
    common_arguments(parser)
    args = parser.parse_args(argv)
    unknown = [k for k in args.kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown kinds {unknown}: choose from {', '.join(KINDS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    kinds = [KINDS[k] for k in args.kinds]
    status, results = run_fleet_benchmark(
        "startrate", args, kinds, lambda c, fleet: start_rates(c, fleet, args)
    )
    if results is None:
        return status
    print(report(results))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

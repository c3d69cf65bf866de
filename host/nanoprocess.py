"""A nanoprocess: one WebAssembly command module running in its own Store.

Each nanoprocess has its own Store (so its own linear memory and limits), a WASI context
built from the container's OCI process (argv, env, a preopened rootfs), and stdio routed
to the files containerd gave the task. It runs as a fiber on the host's few scheduler
threads (``host/fibers.py``), or on a thread of its own when its host calls may block.
Killing it is immediate even inside a busy loop: the engine's epoch is bumped and the
store's epoch-deadline callback turns the kill into a trap at the next loop header or
call. A sleep inside WASI is interruptible too, because the host provides its own
``poll_oneoff``.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import posixpath
import struct
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import wasmtime

from layotto.host import capi
from layotto.host.abi_host import AbiContext, WasmtimeMemory, calling, wasmtime_allocator
from layotto.host.capi import EpochWatch, Stop
from layotto.host.engine import CompiledModule, WasmEngine, module_facts
from layotto.host.errors import ModuleError, describe_error
from layotto.host.fastcall import INSTANCES, MEMORIES, TABLE_ELEMENTS, TABLES
from layotto.host.fibers import AsyncPoll, CallFuture, FiberScheduler
from layotto.host.function import DEFAULT_MEMORY_LIMIT, FunctionLog
from layotto.host.rootpath import DirMount, fd_path, open_host_dir, open_in_root, open_root

log = logging.getLogger(__name__)

SIGKILL = 9
SIGTERM = 15
TRAP_EXIT = 134  # 128 + SIGABRT, what the wasmtime CLI reports for a trap
KILL_GRACE = 0.25  # seconds a killed module may take to unwind before we report it gone

_current = threading.local()

#: The linear-memory cap (bytes) of a command module whose container sets no memory
#: limit: the operator's default, the same as a function instance's. Read at each start.
COMMAND_MEMORY_LIMIT = DEFAULT_MEMORY_LIMIT


@dataclass
class ProcessSpec:
    """Everything a nanoprocess needs, taken from the OCI bundle and the Create request."""

    name: str
    args: list[str]
    env: list[str]
    rootfs: Path
    cwd: str = "/"
    entry: str = "_start"
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    memory_limit: int | None = None  # None: COMMAND_MEMORY_LIMIT
    capabilities: frozenset[str] = frozenset()
    app_id: str = ""
    services: object = None  # host.function.HostServices (components, invoker)
    cpu_quota_us: int | None = None  # CFS-style quota per period, as in the OCI spec
    cpu_period_us: int = 100_000
    namespace: str = "default"  # the tenant (Kubernetes/containerd namespace) it runs for
    readonly: bool = False  # root.readonly: the rootfs, and a cwd in it, are preopened read-only
    mounts: tuple[DirMount, ...] = ()  # host directories bind-mounted into the container

    @property
    def memory_cap(self) -> int:
        """The memory limit in force: the container's, else COMMAND_MEMORY_LIMIT."""
        return self.memory_limit or COMMAND_MEMORY_LIMIT


@dataclass
class Preopen:
    """A directory the module sees at ``guest``: an open O_PATH descriptor of it."""

    fd: int
    guest: str
    writable: bool


def _mount_for(cwd: str, mounts: tuple[DirMount, ...]) -> tuple[DirMount, str] | None:
    """The mount the working directory is in (the last of the deepest), and the rest of
    the path under it; None for a cwd in the rootfs. Decided on the path's lexical form."""
    normal = "/" + posixpath.normpath("/" + cwd).lstrip("/")
    found: tuple[DirMount, str] | None = None
    for mount in mounts:
        dest = mount.destination
        if normal == dest or normal.startswith(dest + "/"):
            if found is None or len(dest) >= len(found[0].destination):
                found = (mount, normal[len(dest) :])
    return found


def open_preopens(spec: ProcessSpec) -> list[Preopen]:
    """Open the directories a command module's WASI context gives it, in order: the
    rootfs at ``/``, each bind mount at its destination, and the working directory at
    ``.`` (when not ``/``).

    Nothing the container names is followed on the host: the working directory is
    resolved inside the rootfs (or inside the mount it is in) with openat2's
    RESOLVE_IN_ROOT, so ``..`` and symlinks stay inside (host/rootpath.py); a mount source
    must be a directory and not a symlink. A working directory that does not resolve to a
    directory is an error naming it; runc would create a missing one, but the rootfs may
    be read-only and a typo is better reported than papered over. Raises ModuleError;
    the caller closes the descriptors (close_preopens).
    """
    opened: list[Preopen] = []
    try:
        try:
            root = open_root(spec.rootfs)
        except OSError as exc:
            raise ModuleError(f"cannot open the container's rootfs {spec.rootfs}: {exc.strerror}") from None
        opened.append(Preopen(root, "/", not spec.readonly))
        mount_fds: dict[DirMount, int] = {}
        for mount in spec.mounts:
            try:
                fd = open_host_dir(mount.source)
            except OSError as exc:
                raise ModuleError(
                    f"bind mount at {mount.destination}: source {mount.source}: {exc.strerror}"
                ) from None
            opened.append(Preopen(fd, mount.destination, not mount.readonly))
            mount_fds[mount] = fd
        if spec.cwd not in ("", "/"):
            inside = _mount_for(spec.cwd, spec.mounts)
            base, rest, writable = root, spec.cwd, not spec.readonly
            if inside is not None:
                mount, rest = inside
                base, writable = mount_fds[mount], not mount.readonly
            try:
                cwd = open_in_root(base, rest, directory=True)
            except OSError as exc:
                why = {
                    errno.ENOENT: "does not exist in the container",
                    errno.ENOTDIR: "is not a directory in the container",
                    errno.ELOOP: "goes through a symbolic link loop (or a magic link)",
                }.get(exc.errno or 0, exc.strerror)
                raise ModuleError(f"working directory {spec.cwd!r} {why}") from None
            opened.append(Preopen(cwd, ".", writable))
    except BaseException:
        close_preopens(opened)
        raise
    return opened


def close_preopens(preopens: list[Preopen]) -> None:
    for preopen in preopens:
        os.close(preopen.fd)
    preopens.clear()


@dataclass
class Throttle:
    """CPU accounting for a nanoprocess with a CPU quota (cgroups' cpu.stat, per module)."""

    periods: int = 0
    throttled_periods: int = 0
    throttled_seconds: float = 0.0
    period_start: float = 0.0  # monotonic
    cpu_at_period_start: float = 0.0  # the module thread's CPU seconds


@dataclass
class ExitInfo:
    status: int
    exited_at: float
    reason: str = ""
    oom: bool = False


class Output:
    """A write end for the module's stdout or stderr (a containerd fifo or a file)."""

    def __init__(self, target: str, *, lazy: bool = False) -> None:
        self.fd: int | None = None
        self.lock = threading.Lock()
        self._pending = target if lazy else ""
        self._closed = False
        if not target or lazy:
            return  # lazy: opened on the first write (an idle function holds no descriptor)
        self._open(target)

    def _open(self, target: str) -> None:
        if target.startswith("file://"):
            path = target.removeprefix("file://")
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            return
        path = target.removeprefix("fifo://")
        try:
            # Non-blocking open: a fifo with no reader must not hang the host.
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ENXIO, errno.ENOENT):
                log.info("no reader for %s; output dropped", path)
                return
            raise
        os.set_blocking(fd, True)
        self.fd = fd

    def write(self, data: bytes) -> None:
        with self.lock:
            if self._pending and not self._closed:
                target, self._pending = self._pending, ""
                try:
                    self._open(target)
                except OSError as exc:
                    log.info("cannot open %s: %s; output dropped", target, exc)
            view = memoryview(data)
            while view and self.fd is not None:
                try:
                    written = os.write(self.fd, view)
                except InterruptedError:
                    continue
                except OSError:  # EPIPE after `ctr run -d` returned, and the like: drop
                    self._close_locked()
                    return
                view = view[written:]

    def _close_locked(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def close(self) -> None:
        with self.lock:
            self._closed = True
            self._pending = ""
            self._close_locked()


class StdinPump:
    """Feeds a containerd stdin fifo to the module through a pipe the host owns.

    wasmtime opens ``stdin_file`` itself, and opening a fifo for reading blocks until a
    writer appears (``ctr run`` without ``-i`` never opens one). So the module reads the
    read end of our own pipe, and a helper thread copies the fifo into it; at the module's
    exit a non-blocking open of the fifo's write end releases a helper still waiting.
    """

    def __init__(self, fifo: str) -> None:
        self.fifo = fifo
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._copy, name="stdin-pump", daemon=True)
        self._thread.start()

    @property
    def path(self) -> str:
        return f"/proc/self/fd/{self.read_fd}"

    def _copy(self) -> None:
        try:
            src = os.open(self.fifo, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            src = -1
        try:
            while src >= 0 and not self._stop.is_set():
                data = os.read(src, 65536)
                if not data:
                    break
                os.write(self.write_fd, data)
        except OSError:
            pass
        finally:
            if src >= 0:
                os.close(src)
            self._close_write()

    def _close_write(self) -> None:
        fd, self.write_fd = self.write_fd, -1
        if fd >= 0:
            os.close(fd)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            try:  # wake a helper blocked in open(): it then reads EOF
                os.close(os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
            except OSError:
                pass
        if self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1


def build_linker(engine: WasmEngine) -> wasmtime.Linker:
    """WASI preview 1 (with an interruptible ``poll_oneoff`` in place of wasmtime's) and
    the Runtime ABI's host functions."""
    from layotto.host.abi_host import define_imports

    linker = wasmtime.Linker(engine.engine)
    linker.define_wasi()
    define_imports(linker)
    linker.allow_shadowing = True
    i32 = wasmtime.ValType.i32()
    linker.define_func(
        "wasi_snapshot_preview1",
        "poll_oneoff",
        wasmtime.FuncType([i32, i32, i32, i32], [i32]),
        _poll_oneoff,
        access_caller=True,
    )
    return linker


_SUB = struct.Struct("<QB7xIxxxxQQH6x")  # userdata, tag, (clock id, timeout, precision, flags)
_SUB_SIZE = 48
_EVENT_SIZE = 32
_WASI_EINVAL = 28
_WASI_EFAULT = 21
_WASI_ENOTSUP = 58
_EVENT = struct.Struct("<QHBxxxxxQH6x")  # userdata, error, type, (nbytes, flags)


def _poll_plan(raw: bytes, nsubs: int) -> tuple[bytes, float]:
    """The events a ``poll_oneoff`` over ``raw`` subscriptions reports, and the seconds to
    wait first: fd subscriptions are reported ready at once, else the earliest clock."""
    clocks: list[tuple[int, float]] = []
    ready: list[tuple[int, int]] = []  # (userdata, type) of fd subscriptions
    for i in range(nsubs):
        userdata, tag, clock_id, timeout, _precision, flags = _SUB.unpack_from(raw, i * _SUB_SIZE)
        if tag == 0:
            seconds = timeout / 1e9
            if flags & 1:  # absolute time
                now = time.time() if clock_id == 0 else time.monotonic()
                seconds -= now
            clocks.append((userdata, max(0.0, seconds)))
        else:
            ready.append((userdata, tag))
    events = bytearray()
    if ready:
        for userdata, tag in ready:
            events += _EVENT.pack(userdata, 0, tag, 0, 0)
        return bytes(events), 0.0
    wait = min(seconds for _, seconds in clocks)
    for userdata, seconds in clocks:
        if seconds <= wait:
            events += _EVENT.pack(userdata, 0, 0, 0, 0)
    return bytes(events), wait


def _poll_oneoff(caller: wasmtime.Caller, in_ptr: int, out_ptr: int, nsubs: int, nevents_ptr: int) -> int:
    """WASI poll_oneoff: sleeps wait on the nanoprocess's kill event, fds are reported ready."""
    proc: Nanoprocess | None = getattr(_current, "proc", None)
    memory = caller.get("memory")
    if not isinstance(memory, wasmtime.Memory):
        return _WASI_ENOTSUP
    if nsubs == 0:
        return _WASI_EINVAL
    size = memory.data_len(caller)
    if in_ptr + nsubs * _SUB_SIZE > size or out_ptr + nsubs * _EVENT_SIZE > size or nevents_ptr + 4 > size:
        return _WASI_EFAULT
    raw = bytes(memory.read(caller, in_ptr, in_ptr + nsubs * _SUB_SIZE))
    events, wait = _poll_plan(raw, nsubs)
    if wait > 0:
        if proc is not None and proc.kill_event is not None:
            if proc.kill_event.wait(wait):
                raise wasmtime.Trap("nanoprocess killed")
        else:
            time.sleep(wait)
    memory.write(caller, events, out_ptr)
    memory.write(caller, struct.pack("<I", len(events) // _EVENT_SIZE), nevents_ptr)
    return 0


def _poll_oneoff_async(
    base: int, size: int, in_ptr: int, out_ptr: int, nsubs: int, nevents_ptr: int
) -> int | float:
    """The fibers' poll_oneoff: the events are written now, the sleep is the scheduler's."""
    if not base:
        return _WASI_ENOTSUP
    if nsubs == 0:
        return _WASI_EINVAL
    if in_ptr + nsubs * _SUB_SIZE > size or out_ptr + nsubs * _EVENT_SIZE > size or nevents_ptr + 4 > size:
        return _WASI_EFAULT
    events, wait = _poll_plan(ctypes.string_at(base + in_ptr, nsubs * _SUB_SIZE), nsubs)
    ctypes.memmove(base + out_ptr, events, len(events))
    ctypes.memmove(base + nevents_ptr, struct.pack("<I", len(events) // _EVENT_SIZE), 4)
    return wait if wait > 0 else 0


# --- fibers: one scheduler and one linker (with the async poll_oneoff) per engine -------

#: LAYOTTO_FIBERS=0 runs every command module on a thread of its own, as before fibers.
FIBERS_ENABLED = os.environ.get("LAYOTTO_FIBERS", "1") != "0"

_fiber_state: weakref.WeakKeyDictionary[WasmEngine, tuple[FiberScheduler, wasmtime.Linker, AsyncPoll]] = (
    weakref.WeakKeyDictionary()
)
_fiber_lock = threading.Lock()


def _fibers(engine: WasmEngine) -> tuple[FiberScheduler, wasmtime.Linker, AsyncPoll]:
    with _fiber_lock:
        state = _fiber_state.get(engine)
        if state is None:
            linker = wasmtime.Linker(engine.engine)
            linker.define_wasi()
            linker.allow_shadowing = True
            scheduler = FiberScheduler(engine.ticker)
            poll = AsyncPoll(_poll_oneoff_async, "nanoprocess killed", scheduler)
            poll.define(linker)
            state = _fiber_state[engine] = (scheduler, linker, poll)
        return state


def _scheduler(engine: WasmEngine) -> FiberScheduler:
    return _fibers(engine)[0]


def _fiber_linker(engine: WasmEngine) -> wasmtime.Linker:
    return _fibers(engine)[1]


class _NoMemory:
    def view(self) -> memoryview:
        return memoryview(bytearray())


class Nanoprocess:
    """One running command module: a fiber on the shared scheduler, or a thread of its own.

    Plain WASI modules run as fibers (``host/fibers.py``): an idle one costs the host its
    Store, its touched linear memory and the touched part of its fiber stack. A module that
    imports the Runtime ABI (its calls may block for as long as a component or another
    function takes) or reads a stdin fifo (a blocking read) keeps a thread of its own, so
    it can never hold up the other modules.
    """

    __slots__ = (
        "engine", "linker", "compiled", "spec", "killed", "kill_event", "kill_signal", "exit",
        "started_at", "start_error", "stdout", "stderr", "throttle", "log", "fiber", "wake_at",
        "_thread", "_thread_id", "_cpu_seconds", "_exit_callbacks", "_exit_lock", "_store",
        "_memory", "_outputs", "_stdin", "_watch", "_future", "_instance_raw", "_ready",
        "_slice_start", "_preopens", "__weakref__",
    )  # fmt: skip

    def __init__(
        self, engine: WasmEngine, linker: wasmtime.Linker, compiled: CompiledModule, spec: ProcessSpec
    ):
        if spec.entry not in compiled.exports:
            raise ModuleError(
                f"{spec.args[0] if spec.args else spec.name} has no export named {spec.entry!r} "
                f"(exports: {', '.join(sorted(compiled.exports)) or 'none'})"
            )
        self.engine = engine
        self.linker = linker
        self.compiled = compiled
        self.spec = spec
        # Set on a kill; a module on a thread of its own also gets an Event to wait on.
        self.killed = False
        self.kill_event: threading.Event | None = None
        self.kill_signal = 0
        self.exit: ExitInfo | None = None
        self.started_at: float | None = None
        self.start_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._thread_id: int | None = None
        self._cpu_seconds = 0.0
        self._exit_callbacks: list[Callable[[ExitInfo], None]] = []
        self._exit_lock = threading.Lock()
        self._store: wasmtime.Store | None = None
        self._memory: wasmtime.Memory | None = None
        self._outputs: list[Output] = []
        self._stdin: StdinPump | None = None
        self._watch: EpochWatch | None = None
        self.throttle = Throttle()
        self.log = FunctionLog()
        blocking_stdin = bool(spec.stdin) and compiled.reads_stdin
        self.fiber = FIBERS_ENABLED and not module_facts(compiled.module).uses_abi and not blocking_stdin
        # As a fiber: the future being polled, and when a parked fiber is due again.
        self.wake_at = 0.0
        self._future: CallFuture | None = None
        self._instance_raw: capi.InstanceRaw | None = None
        self._ready: threading.Event | None = None
        self._slice_start = 0.0  # the scheduler thread's CPU clock when this slice began
        self._preopens: list[Preopen] = []  # opened by start(), handed to WASI by _configure()

    # --- lifecycle -----------------------------------------------------------------

    def on_exit(self, callback: Callable[[ExitInfo], None]) -> None:
        with self._exit_lock:
            if self.exit is None:
                self._exit_callbacks.append(callback)
                return
        callback(self.exit)

    def start(self) -> threading.Event:
        """Start the module; the returned event is set once it is instantiated.

        Raises ModuleError when its filesystem cannot be set up (see open_preopens)."""
        self._preopens = open_preopens(self.spec)
        try:
            self.stdout = Output(self.spec.stdout)
            self.stderr = Output(self.spec.stderr) if self.spec.stderr != self.spec.stdout else self.stdout
        except BaseException:
            close_preopens(self._take_preopens())
            raise
        self._outputs = [self.stdout, self.stderr]
        ready = threading.Event()
        self.started_at = time.time()
        if self.fiber:
            self._ready = ready
            _scheduler(self.engine).submit(self)
            return ready
        self.kill_event = threading.Event()
        if self.killed:
            self.kill_event.set()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name=f"nanoprocess-{self.spec.name}", daemon=True
        )
        self._thread.start()
        return ready

    def kill(self, signal: int) -> None:
        """Stop the module: takes effect at its next loop iteration, call or sleep."""
        if self.exit is not None:
            return
        if not self.kill_signal:
            self.kill_signal = signal
        self.killed = True
        if self.kill_event is not None:
            self.kill_event.set()
        self.engine.engine.increment_epoch()
        if self.fiber:
            _scheduler(self.engine).wake(self)
        timer = threading.Timer(KILL_GRACE, self._reap_stuck)
        timer.daemon = True
        timer.start()

    def _reap_stuck(self) -> None:
        # Still inside a blocking WASI call (a read from a fifo nobody writes, say):
        # report the exit now and close its output; the thread ends when the call returns.
        if self.exit is None:
            log.warning(
                "%s: did not stop within %.2fs of the kill; reporting it exited", self.spec.name, KILL_GRACE
            )
            self._finish(128 + self.kill_signal, "killed")

    # --- shared by both ways of running ----------------------------------------------

    def _throttle_pause(self, cpu: float) -> float:
        """CPU quota: the seconds to pause now (0: keep running); ``cpu`` is the module's
        CPU clock. A pause is accounted here; the caller restarts the period after it."""
        t = self.throttle
        quota = (self.spec.cpu_quota_us or 0) / 1e6
        period = self.spec.cpu_period_us / 1e6
        now = time.monotonic()
        if now - t.period_start >= period:
            t.period_start, t.cpu_at_period_start = now, cpu
            t.periods += 1
            return 0.0
        if cpu - t.cpu_at_period_start < quota:
            return 0.0
        pause = t.period_start + period - now
        t.throttled_periods += 1
        t.throttled_seconds += pause
        return pause

    def _configure(self) -> wasmtime.Store:
        spec = self.spec
        store = wasmtime.Store(self.engine.engine)
        store.set_limits(
            memory_size=spec.memory_cap,
            table_elements=TABLE_ELEMENTS,
            instances=INSTANCES,
            tables=TABLES,
            memories=MEMORIES,
        )
        store.set_epoch_deadline(1)
        # The watch outlives the store: this nanoprocess holds both, and drops the store first.
        self._watch = EpochWatch(self.on_deadline if self.fiber else self._on_epoch_deadline)
        capi.watch_store(capi.store_address(store), self._watch)
        wasi = wasmtime.WasiConfig()
        wasi.argv = list(spec.args)
        wasi.env = [tuple(e.split("=", 1)) if "=" in e else (e, "") for e in spec.env]
        preopens = self._take_preopens()
        try:
            # wasmtime opens each directory by path; /proc/self/fd/<n> is exactly the one
            # resolved, with no path walk left to race. Its descriptors are wasmtime's own.
            for preopen in preopens:
                wasi.preopen_dir(fd_path(preopen.fd), preopen.guest, preopen.writable)
            if spec.stdin and self.compiled.reads_stdin:
                self._stdin = StdinPump(spec.stdin.removeprefix("file://"))
                wasi.stdin_file = self._stdin.path
            wasi.stdout_custom = self._tee(self.stdout, "stdout")
            wasi.stderr_custom = self._tee(self.stderr, "stderr")
            store.set_wasi(wasi)
        finally:
            close_preopens(preopens)
        return store

    def _take_preopens(self) -> list[Preopen]:
        """The preopens' descriptors, now the caller's to close (exactly one caller gets them)."""
        with self._exit_lock:
            preopens, self._preopens = self._preopens, []
        return preopens

    def _tee(self, out: Output, stream: str) -> Callable[[bytes], None]:
        keep = self.log.writer(stream)

        def write(data: bytes) -> None:
            out.write(data)
            keep(data)

        return write

    def _exports(self, store: wasmtime.Store, instance: wasmtime.Instance) -> wasmtime.Func:
        exports = instance.exports(store)
        entry = exports[self.spec.entry]
        memory = exports.get("memory") if hasattr(exports, "get") else None
        self._memory = memory if isinstance(memory, wasmtime.Memory) else None
        self._store = store
        if not isinstance(entry, wasmtime.Func):
            raise ModuleError(f"export {self.spec.entry!r} is not a function")
        return entry

    def _start_failed(self, exc: BaseException, ready: threading.Event | None = None) -> None:
        self.start_error = ModuleError(
            f"{self.spec.name}: cannot instantiate the module: {describe_error(exc)}"
        )
        ready, self._ready = ready or self._ready, None
        if ready is not None:
            ready.set()
        self._finish(1, str(self.start_error), emit_stderr=False)

    def _outcome(self, exc: BaseException | None) -> tuple[int, str]:
        """The exit status and reason for ``_start`` ending with ``exc``."""
        if exc is None:
            return 0, ""
        if isinstance(exc, wasmtime.ExitTrap):
            return exc.code, ""
        if isinstance(exc, (wasmtime.Trap, wasmtime.WasmtimeError, ModuleError)):
            if self.killed:
                return 128 + self.kill_signal, "killed"
            reason = f"wasm trap: {describe_error(exc)}"
            self.stderr.write(f"{self.spec.name}: {reason}\n".encode())
            self.log.add("host", reason)
            return TRAP_EXIT, reason
        log.error("%s: unexpected error", self.spec.name, exc_info=exc)
        return TRAP_EXIT, f"host error: {exc}"

    # --- as a fiber ----------------------------------------------------------------------

    def step(self) -> bool:
        """Poll the module once (on a scheduler thread); True once it has finished."""
        try:
            return self._step()
        except Exception as exc:  # a host bug must not leave the task running forever
            log.exception("%s: unexpected error in its fiber", self.spec.name)
            future, self._future = self._future, None
            if future is not None:
                future.delete()
            self._finish(TRAP_EXIT, f"host error: {exc}")
            self._memory = self._store = None
            ready, self._ready = self._ready, None
            if ready is not None:
                ready.set()
            return True

    def _step(self) -> bool:
        if self._future is None:  # first step: build the Store, instantiate as a future
            try:
                store = self._configure()
                self._future, self._instance_raw = CallFuture.instantiate(
                    self.linker_for_fibers(), store, self.compiled.module
                )
            except Exception as exc:
                self._start_failed(exc)
                return True
            self._store = store
        future = self._future
        self._slice_start = time.thread_time()
        try:
            done = future.poll()
        finally:
            self._cpu_seconds += time.thread_time() - self._slice_start
            self._slice_start = 0.0
        if not done:
            return False
        exc = future.outcome()
        future.delete()
        if self._instance_raw is not None:  # instantiated: now call the entry point
            raw, self._instance_raw = self._instance_raw, None
            store = self._store
            assert store is not None
            try:
                if exc is not None:
                    raise exc
                entry = self._exports(store, capi.instance_from_raw(raw))
                self._future = CallFuture.call(store, entry)
            except Exception as exc:
                self._store = self._memory = None
                self._start_failed(exc)
                return True
            if self.spec.cpu_quota_us:
                self.throttle.period_start = time.monotonic()
                self.throttle.cpu_at_period_start = self._cpu_seconds
            ready, self._ready = self._ready, None
            if ready is not None:
                ready.set()
            self.wake_at = 0.0
            return False
        status, reason = self._outcome(exc)
        self._finish(status, reason)
        self._future = None
        self._memory = None
        self._store = None
        return True

    def on_deadline(self) -> capi.Decision:
        """The fiber's epoch deadline passed (a tick, or a kill): trap, or yield."""
        if self.killed:
            return Stop.KILLED
        if self.spec.cpu_quota_us:
            cpu = self._cpu_seconds + (time.thread_time() - self._slice_start)
            pause = self._throttle_pause(cpu)
            if pause > 0:  # park until the period ends; it restarts then
                now = time.monotonic()
                self.wake_at = now + pause
                self.throttle.period_start, self.throttle.cpu_at_period_start = now + pause, cpu
                self.throttle.periods += 1
        return capi.YIELD

    def linker_for_fibers(self) -> wasmtime.Linker:
        return _fiber_linker(self.engine)

    # --- on a thread of its own ----------------------------------------------------------

    def _on_epoch_deadline(self) -> capi.Decision:
        # Runs on the module's own thread whenever the engine's epoch passes this store's
        # deadline: on every kill, and every tick while CPU-limited modules run.
        if self.killed:
            return Stop.KILLED
        if self.spec.cpu_quota_us:
            self._throttle()
            if self.killed:
                return Stop.KILLED
        return capi.RESUME

    def _throttle(self) -> None:
        """Sleep out the rest of the period once this period's CPU quota is used up."""
        pause = self._throttle_pause(time.thread_time())
        if pause > 0:
            t = self.throttle
            assert self.kill_event is not None
            self.kill_event.wait(pause)
            t.period_start, t.cpu_at_period_start = time.monotonic(), time.thread_time()
            t.periods += 1

    def _run(self, ready: threading.Event) -> None:
        _current.proc = self
        self._thread_id = threading.get_ident()
        try:
            store = self._configure()
            instance = self.linker.instantiate(store, self.compiled.module)
            entry = self._exports(store, instance)
        except Exception as exc:  # instantiation failed: report it from Start
            self._cpu_seconds = time.thread_time()
            self._store = self._memory = None
            self._start_failed(exc, ready)
            return
        abi = None
        if module_facts(self.compiled.module).uses_abi:
            services = self.spec.services
            abi = AbiContext(
                name=self.spec.name,
                memory=WasmtimeMemory(store, self._memory) if self._memory is not None else _NoMemory(),
                allocate=wasmtime_allocator(store, instance.exports(store)),
                capabilities=self.spec.capabilities,
                app_id=self.spec.app_id,
                components=getattr(services, "components", None),
                invoker=getattr(services, "invoker", None),
                logger=self.log.add,
                namespace=self.spec.namespace,
            )
        ready.set()
        if self.spec.cpu_quota_us:
            self.throttle.period_start = time.monotonic()
            self.throttle.cpu_at_period_start = time.thread_time()
            self.engine.ticker.acquire()
        error: BaseException | None = None
        try:
            with calling(abi):
                entry(store)
        except Exception as exc:
            error = exc
        finally:
            if self.spec.cpu_quota_us:
                self.engine.ticker.release()
        status, reason = self._outcome(error)
        self._cpu_seconds = time.thread_time()
        self._finish(status, reason)
        # Drop the Store now: its linear memory and WASI descriptors go with it.
        self._memory = None
        self._store = None
        del store, instance, entry

    def _finish(self, status: int, reason: str, emit_stderr: bool = False) -> None:
        with self._exit_lock:
            if self.exit is not None:
                return
            oom = status != 0 and not self.killed and self._hit_memory_limit()
            self.exit = ExitInfo(status, time.time(), reason, oom)
            callbacks, self._exit_callbacks = self._exit_callbacks, []
        for out in self._outputs:
            out.close()
        close_preopens(self._take_preopens())  # still there if killed before configured
        if self._stdin is not None:
            self._stdin.close()
        for callback in callbacks:
            try:
                callback(self.exit)
            except Exception:
                log.exception("exit callback failed")

    def _hit_memory_limit(self) -> bool:
        """Did the module end up against its memory cap?

        wasmtime's store limits make ``memory.grow`` fail rather than trap, and expose no
        hook for the failure; a module that exits non-zero with its linear memory within
        one allocation step (the larger of 1 MiB and 1/16 of the cap) of the cap is taken
        to have failed for lack of memory.
        """
        limit = self.spec.memory_cap
        if self._memory is None or self._store is None:
            return False
        try:
            size = self._memory.data_len(self._store)
        except Exception:
            return False
        return size + max((1 << 20) + 65536, limit // 16) >= limit

    # --- introspection ---------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.started_at is not None and self.exit is None

    def memory_bytes(self) -> int:
        """Linear memory currently allocated by the module."""
        if self._memory is None or self._store is None or self.exit is not None:
            return 0
        try:
            return self._memory.data_len(self._store)
        except Exception:
            return 0

    def cpu_seconds(self) -> float:
        """CPU time the module has used (its thread's, or its fiber's slices)."""
        if self.fiber:
            return self._cpu_seconds
        if self.exit is None and self._thread_id is not None:
            try:
                return time.clock_gettime(time.pthread_getcpuclockid(self._thread_id))
            except (OSError, AttributeError):
                pass
        return self._cpu_seconds

"""A nanoprocess: one WebAssembly command module running in its own Store.

Each nanoprocess has its own Store (so its own linear memory and limits), a WASI context
built from the container's OCI process (argv, env, a preopened rootfs), and stdio routed
to the files containerd gave the task. A runner the node runtime owns runs it: a fiber
on a few scheduler threads (host/fiber_runner.py), or a thread of its own when its host
calls may block (host/thread_runner.py); the runtime picks one per module
(:func:`fits_a_fiber`). Killing it is immediate even inside a busy loop: the engine's
epoch is bumped and the store's epoch-deadline watch turns the kill into a trap at the
next loop header or call. A sleep inside WASI is interruptible too, because the host
provides its own ``poll_oneoff`` (host/wasi_poll.py).

What a nanoprocess is given and leaves (its spec, output, exit) is in host/process.py;
the names are exported from here too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

import wasmtime

from layotto.host import capi
from layotto.host.abi_host import AbiContext, WasmtimeMemory, define_imports, wasmtime_allocator
from layotto.host.capi import EpochWatch
from layotto.host.engine import CompiledModule, WasmEngine, module_facts
from layotto.host.errors import ModuleError, describe_error
from layotto.host.fastcall import INSTANCES, MEMORIES, TABLE_ELEMENTS, TABLES
from layotto.host.function import DEFAULT_MEMORY_LIMIT, FunctionLog
from layotto.host.process import (
    ExitInfo,
    Output,
    Preopen,
    ProcessSpec,
    StdinPump,
    Throttle,
    close_preopens,
    open_preopens,
)
from layotto.host.rootpath import fd_path
from layotto.host.wasi_poll import plain_sleep, poll_oneoff

__all__ = [
    "COMMAND_MEMORY_LIMIT",
    "KILL_GRACE",
    "ExitInfo",
    "Nanoprocess",
    "Output",
    "ProcessSpec",
    "Runner",
    "build_linker",
    "fits_a_fiber",
]

log = logging.getLogger(__name__)

SIGKILL = 9
SIGTERM = 15
TRAP_EXIT = 134  # 128 + SIGABRT, what the wasmtime CLI reports for a trap
KILL_GRACE = 0.25  # seconds a killed module may take to unwind before we report it gone

#: The linear-memory cap (bytes) of a command module whose container sets no memory
#: limit: the operator's default, the same as a function instance's. Read at each start.
COMMAND_MEMORY_LIMIT = DEFAULT_MEMORY_LIMIT


def build_linker(engine: WasmEngine, sleep: Callable[[float], bool] = plain_sleep) -> wasmtime.Linker:
    """WASI preview 1 (with an interruptible ``poll_oneoff`` in place of wasmtime's, whose
    waits go through ``sleep``) and the Runtime ABI's host functions."""
    linker = wasmtime.Linker(engine.engine)
    linker.define_wasi()
    define_imports(linker)
    linker.allow_shadowing = True
    i32 = wasmtime.ValType.i32()
    linker.define_func(
        "wasi_snapshot_preview1",
        "poll_oneoff",
        wasmtime.FuncType([i32, i32, i32, i32], [i32]),
        poll_oneoff(sleep),
        access_caller=True,
    )
    return linker


def fits_a_fiber(compiled: CompiledModule, spec: ProcessSpec) -> bool:
    """Whether a module can run as a fiber: not when its host calls may block for long
    (a Runtime ABI user waits on components and other functions; a stdin reader on a fifo),
    which would hold up every other fiber on its scheduler thread."""
    blocking_stdin = bool(spec.stdin) and compiled.reads_stdin
    return not module_facts(compiled.module).uses_abi and not blocking_stdin


class Run(Protocol):
    """One nanoprocess's execution, as its runner made it."""

    def kill(self) -> None:
        """The process was killed (its epoch already bumped): wake it if it waits."""
        ...

    def cpu_seconds(self) -> float | None:
        """CPU time used so far, while running (None: ask the process)."""
        ...


class Runner(Protocol):
    """A way of running nanoprocesses (host/fiber_runner.py, host/thread_runner.py)."""

    engine: WasmEngine

    def launch(self, proc: Nanoprocess, ready: threading.Event) -> Run:
        """Start ``proc``; ``ready`` is set once it is instantiated (or failed to be)."""
        ...


class _NoMemory:
    def view(self) -> memoryview:
        return memoryview(bytearray())


class Nanoprocess:
    """One running command module, run by ``runner``."""

    __slots__ = (
        "engine", "runner", "compiled", "spec", "killed", "kill_signal", "exit", "started_at",
        "start_error", "stdout", "stderr", "throttle", "log", "cpu_used", "_run", "_exit_callbacks",
        "_exit_lock", "_store", "_memory", "_outputs", "_stdin", "_watch", "_preopens", "__weakref__",
    )  # fmt: skip

    def __init__(self, runner: Runner, compiled: CompiledModule, spec: ProcessSpec) -> None:
        if spec.entry not in compiled.exports:
            raise ModuleError(
                f"{spec.args[0] if spec.args else spec.name} has no export named {spec.entry!r} "
                f"(exports: {', '.join(sorted(compiled.exports)) or 'none'})"
            )
        self.engine = runner.engine
        self.runner = runner
        self.compiled = compiled
        self.spec = spec
        self.killed = False
        self.kill_signal = 0
        self.exit: ExitInfo | None = None
        self.started_at: float | None = None
        self.start_error: BaseException | None = None
        self.cpu_used = 0.0  # CPU seconds of the finished module (or of the slices so far)
        self._run: Run | None = None
        self._exit_callbacks: list[Callable[[ExitInfo], None]] | None = []  # None: exit reported
        self._exit_lock = threading.Lock()
        self._store: wasmtime.Store | None = None
        self._memory: wasmtime.Memory | None = None
        self._outputs: list[Output] = []
        self._stdin: StdinPump | None = None
        self._watch: EpochWatch | None = None
        self.throttle = Throttle()
        self.log = FunctionLog()
        self._preopens: list[Preopen] = []  # opened by start(), handed to WASI by configure()

    # --- lifecycle -----------------------------------------------------------------

    def on_exit(self, callback: Callable[[ExitInfo], None]) -> None:
        with self._exit_lock:
            if self._exit_callbacks is not None:
                self._exit_callbacks.append(callback)
                return
        assert self.exit is not None
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
        self._run = self.runner.launch(self, ready)
        return ready

    def kill(self, signal: int) -> None:
        """Stop the module: takes effect at its next loop iteration, call or sleep."""
        if self.exit is not None:
            return
        if not self.kill_signal:
            self.kill_signal = signal
        self.killed = True
        self.engine.engine.increment_epoch()
        if self._run is not None:
            self._run.kill()
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
            self.finish(128 + self.kill_signal, "killed")

    # --- for the runners ---------------------------------------------------------------

    def throttle_pause(self, cpu: float) -> float:
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

    def configure(self, on_deadline: Callable[[], capi.Decision]) -> wasmtime.Store:
        """The module's Store: its limits, WASI context and epoch deadlines (which
        ``on_deadline`` decides)."""
        spec = self.spec
        store = wasmtime.Store(self.engine.engine)
        store.set_limits(
            memory_size=self.memory_cap,
            table_elements=TABLE_ELEMENTS,
            instances=INSTANCES,
            tables=TABLES,
            memories=MEMORIES,
        )
        store.set_epoch_deadline(1)
        # The watch outlives the store: this nanoprocess holds both, and drops the store first.
        self._watch = EpochWatch(on_deadline)
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

    def entry(self, store: wasmtime.Store, instance: wasmtime.Instance) -> wasmtime.Func:
        """The entry point of the instantiated module (its memory is kept for the stats)."""
        exports = instance.exports(store)
        entry = exports[self.spec.entry]
        memory = exports.get("memory") if hasattr(exports, "get") else None
        self._memory = memory if isinstance(memory, wasmtime.Memory) else None
        self._store = store
        if not isinstance(entry, wasmtime.Func):
            raise ModuleError(f"export {self.spec.entry!r} is not a function")
        return entry

    def abi_context(self, store: wasmtime.Store, instance: wasmtime.Instance) -> AbiContext | None:
        """The Runtime ABI's view of the instance (None when the module does not import it)."""
        if not module_facts(self.compiled.module).uses_abi:
            return None
        services = self.spec.services
        return AbiContext(
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

    def start_failed(self, exc: BaseException, ready: threading.Event) -> None:
        """Instantiation failed: report it from Start, and the exit."""
        self._store = self._memory = None
        self.start_error = ModuleError(
            f"{self.spec.name}: cannot instantiate the module: {describe_error(exc)}"
        )
        ready.set()
        self.finish(1, str(self.start_error))

    def outcome(self, exc: BaseException | None) -> tuple[int, str]:
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

    def finish(self, status: int, reason: str) -> None:
        """Record the exit (once), close what the module had open, and tell the callbacks
        once its output has reached the reader (or was given up for lack of one): a
        reader told of the exit first (ctr) may stop reading."""
        with self._exit_lock:
            if self.exit is not None:
                return
            oom = status != 0 and not self.killed and self._hit_memory_limit()
            self.exit = ExitInfo(status, time.time(), reason, oom)
        close_preopens(self._take_preopens())  # still there if killed before configured
        if self._stdin is not None:
            self._stdin.close()
        outputs = list(dict.fromkeys(self._outputs))  # stdout may be stderr too
        if not outputs:
            self._report_exit()
            return
        left = [len(outputs)]
        count = threading.Lock()

        def closed() -> None:
            with count:
                left[0] -= 1
                last = left[0] == 0
            if last:
                self._report_exit()

        for out in outputs:
            out.close(closed)

    def _report_exit(self) -> None:
        with self._exit_lock:
            callbacks, self._exit_callbacks = self._exit_callbacks or [], None
        assert self.exit is not None
        for callback in callbacks:
            try:
                callback(self.exit)
            except Exception:
                log.exception("exit callback failed")

    def drop_store(self) -> None:
        """Drop the Store now: its linear memory and WASI descriptors go with it."""
        self._memory = None
        self._store = None

    def _hit_memory_limit(self) -> bool:
        """Did the module end up against its memory cap?

        wasmtime's store limits make ``memory.grow`` fail rather than trap, and expose no
        hook for the failure; a module that exits non-zero with its linear memory within
        one allocation step (the larger of 1 MiB and 1/16 of the cap) of the cap is taken
        to have failed for lack of memory.
        """
        limit = self.memory_cap
        if self._memory is None or self._store is None:
            return False
        try:
            size = self._memory.data_len(self._store)
        except Exception:
            return False
        return size + max((1 << 20) + 65536, limit // 16) >= limit

    # --- introspection ---------------------------------------------------------------

    @property
    def memory_cap(self) -> int:
        """The memory limit in force: the container's, else COMMAND_MEMORY_LIMIT."""
        return self.spec.memory_limit or COMMAND_MEMORY_LIMIT

    @property
    def running(self) -> bool:
        return self.started_at is not None and self.exit is None

    def memory_bytes(self) -> int:
        """Linear memory currently allocated by the module."""
        kept = sum(out.buffered for out in self._outputs)  # output awaiting its reader
        if self._memory is None or self._store is None or self.exit is not None:
            return kept
        try:
            return self._memory.data_len(self._store) + kept
        except Exception:
            return kept

    def cpu_seconds(self) -> float:
        """CPU time the module has used (its thread's, or its fiber's slices)."""
        if self.exit is None and self._run is not None:
            live = self._run.cpu_seconds()
            if live is not None:
                return live
        return self.cpu_used

"""Running nanoprocesses on threads of their own.

For modules whose host calls may block for long (Runtime ABI users wait on components
and other functions; stdin readers on a fifo), or every module when the node runs
without fibers. A kill sets the process's event, which its ``poll_oneoff`` sleeps and
its CPU-quota pauses wait on; the runner owns the linker whose ``poll_oneoff`` finds that
event, through the thread each process runs on.
"""

from __future__ import annotations

import threading
import time

from layotto.host import capi
from layotto.host.abi_host import calling
from layotto.host.capi import Stop
from layotto.host.engine import WasmEngine
from layotto.host.nanoprocess import Nanoprocess, build_linker
from layotto.host.scheduler import network_wait


class ThreadRunner:
    """Runs each nanoprocess on a thread of its own, instantiated by :attr:`linker` (WASI,
    the Runtime ABI, and a ``poll_oneoff`` that a kill interrupts)."""

    def __init__(self, engine: WasmEngine) -> None:
        self.engine = engine
        self._local = threading.local()  # the ThreadRun each of our threads runs
        self.linker = build_linker(engine, self._sleep)

    def launch(self, proc: Nanoprocess, ready: threading.Event) -> ThreadRun:
        run = ThreadRun(self, proc)
        if proc.killed:
            run.kill_event.set()
        run.thread = threading.Thread(
            target=run.run, args=(ready,), name=f"nanoprocess-{proc.spec.name}", daemon=True
        )
        run.thread.start()
        return run

    def _sleep(self, seconds: float) -> bool:
        """poll_oneoff's wait: on a nanoprocess's thread, until its kill (True if killed)."""
        run: ThreadRun | None = getattr(self._local, "run", None)
        if run is None:  # a function instance (it shares the linker): its deadline interrupts it
            with network_wait("a WASI sleep"):  # never on the event loop
                time.sleep(seconds)
            return False
        return run.kill_event.wait(seconds)


class ThreadRun:
    """One nanoprocess on its own thread."""

    __slots__ = ("runner", "proc", "kill_event", "thread", "thread_id", "__weakref__")

    def __init__(self, runner: ThreadRunner, proc: Nanoprocess) -> None:
        self.runner = runner
        self.proc = proc
        self.kill_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.thread_id: int | None = None

    def kill(self) -> None:
        self.kill_event.set()

    def cpu_seconds(self) -> float | None:
        if self.thread_id is None:
            return None
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(self.thread_id))
        except (OSError, AttributeError):
            return None

    def on_deadline(self) -> capi.Decision:
        # Runs on the module's own thread whenever the engine's epoch passes this store's
        # deadline: on every kill, and every tick while CPU-limited modules run.
        proc = self.proc
        if proc.killed:
            return Stop.KILLED
        if proc.spec.cpu_quota_us:
            self._throttle()
            if proc.killed:
                return Stop.KILLED
        return capi.RESUME

    def _throttle(self) -> None:
        """Sleep out the rest of the period once this period's CPU quota is used up."""
        pause = self.proc.throttle_pause(time.thread_time())
        if pause > 0:
            t = self.proc.throttle
            self.kill_event.wait(pause)
            t.period_start, t.cpu_at_period_start = time.monotonic(), time.thread_time()
            t.periods += 1

    def run(self, ready: threading.Event) -> None:
        proc = self.proc
        self.runner._local.run = self
        self.thread_id = threading.get_ident()
        try:
            store = proc.configure(self.on_deadline)
            instance = self.runner.linker.instantiate(store, proc.compiled.module)
            entry = proc.entry(store, instance)
        except Exception as exc:  # instantiation failed: report it from Start
            proc.cpu_used = time.thread_time()
            proc.start_failed(exc, ready)
            return
        abi = proc.abi_context(store, instance)
        ready.set()
        quota = bool(proc.spec.cpu_quota_us)
        if quota:
            proc.throttle.period_start = time.monotonic()
            proc.throttle.cpu_at_period_start = time.thread_time()
            proc.engine.ticker.acquire()
        error: BaseException | None = None
        try:
            with calling(abi):
                entry(store)
        except Exception as exc:
            error = exc
        finally:
            if quota:
                proc.engine.ticker.release()
        status, reason = proc.outcome(error)
        proc.cpu_used = time.thread_time()
        proc.finish(status, reason)
        proc.drop_store()
        del store, instance, entry

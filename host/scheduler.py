"""The node's CPU scheduler for function calls: every core used, shares kept, limits honoured.

A function call runs in one of two places (host/function.py decides, per call):

- **inline**, on the event loop's thread, when it is cheap: no hand-off at all;
- **on a worker** of this scheduler otherwise. wasm runs without the GIL, so the workers
  use every core while the loop goes on parsing, routing and writing.

The workers serve the functions fairly, as the kernel's CFS serves cgroups:

- **Work-conserving**: up to ``cores`` workers run calls at once. A worker that waits
  (on the network, on its function's CPU quota, for an instance) stops counting while it
  waits, so another takes its place: a waiting call never idles a core.
- **Fair share**: each function has a queue of its own (a :class:`Share`) and a weight, its
  ``requests.cpu`` as CFS shares (1024 = one CPU; equal weights without it). A free worker
  takes the next call of the function with the least CPU used per unit of weight (its
  virtual time); a function that had nothing to do starts again from the least virtual time
  of those busy, so idling earns no credit. A saturated function cannot starve a light one.
- **CPU limits**: a function with a quota (``limits.cpu``: quota per period, as the OCI spec
  gives it) is not dispatched once its period's quota is used; a call in flight that
  passes it waits out the period from its deadline callback (:meth:`Share.throttle`),
  outside the running count. Debt carries over, so over time a function never averages
  more than ``quota / period`` of a CPU.
- Workers run at a lower scheduling priority than the event loop (``WORKER_NICE``): the
  loop, which serves every tenant's requests and containerd's Task API, gets a core when
  it needs one even while the workers saturate the node.

Every call's CPU time is charged to its function exactly (the thread's CPU clock on a
worker; wall time inline, where the loop does nothing else; a call nested in another, an
invoke, to the callee), which is what ``layotto ps``, CRI's stats and the metrics report.
The meter is in C (host/_handler.c ``run_begin``/``run_end``); it calls :meth:`Share.charge`.

A call knows where it runs through :func:`current` (a thread-local :class:`Call`): the
Runtime ABI asks it before it waits on the network (:func:`network_wait`), so an inline call
that would block the loop is stopped before it has done anything and run again on a worker
(:class:`WouldBlock`), and a worker's wait lets another worker run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

WORKER_NICE = 5  # the workers' nice value: below the event loop (0) in the kernel's eyes
MAX_WORKERS = 256  # threads in all, waiting ones included
DEFAULT_SHARES = 1024  # one CPU's worth: a function without requests.cpu
LOOP_WINDOW = 0.02  # seconds over which the event loop's load is measured
LOOP_BUSY = 0.7  # the share of a window the loop must be on CPU to count as busy


class WouldBlock(Exception):
    """An inline call reached a host call that waits (the network, a busy instance): it
    is stopped, before it changed anything, and run again on a worker."""


class Call:
    """What runs on this thread now: an inline call on the loop, or a worker's call.

    ``effects`` becomes true once the call has reached a component (something a re-run
    would repeat); until then an inline call may be stopped and run again on a worker.
    Calls into other functions in process share their caller's :class:`Call`."""

    __slots__ = (
        "inline",
        "effects",
        "effects_cpu",
        "would_block",
        "network",
        "went_blocking",
    )

    def __init__(self, inline: bool) -> None:
        self.inline = inline
        self.effects = False
        self.effects_cpu = 0.0  # the thread's CPU clock when the first change was made
        self.would_block = False  # stopped for a re-run on a worker
        self.network = False  # ... because it was about to wait on the network
        self.went_blocking = False  # waited on the network inline (it had effects already)


_local = threading.local()


def current() -> Call | None:
    """The call running on this thread (None on a thread that runs none)."""
    return getattr(_local, "call", None)


def enter(call: Call) -> None:
    """Make ``call`` this thread's current call (the event loop's inline calls: no nesting)."""
    _local.call = call


def leave() -> None:
    _local.call = None


@contextlib.contextmanager
def running(call: Call) -> Iterator[Call]:
    """Make ``call`` this thread's current call (nested calls keep the outer one)."""
    outer = getattr(_local, "call", None)
    if outer is not None:  # a nested call (an invoke): the outer call decides
        yield outer
        return
    _local.call = call
    try:
        yield call
    finally:
        _local.call = None


def touch() -> None:
    """The current call is about to change something (a re-run would repeat it)."""
    call = getattr(_local, "call", None)
    if call is not None and not call.effects:
        call.effects = True
        call.effects_cpu = time.thread_time()  # an inline call's grace is CPU from here


@contextlib.contextmanager
def network_wait(what: str) -> Iterator[None]:
    """Around host code that waits on the network (Redis, Kubernetes, another node).

    Inline on the event loop, before anything was changed: :class:`WouldBlock` (the call
    is stopped and run again on a worker). Inline with effects already made: it waits here
    this once (re-running would repeat them) and its function leaves the inline path. On a
    worker: the worker stops counting as running while it waits."""
    call = getattr(_local, "call", None)
    if call is not None and call.inline:
        if not call.effects:
            call.would_block = call.network = True
            raise WouldBlock(f"{what} waits on the network")
        call.went_blocking = True
        yield
        return
    worker = getattr(_local, "worker", None)
    if worker is None:
        yield
        return
    with worker.scheduler.waiting():
        yield


class Share:
    """One function's queue, weight, virtual time and CPU quota."""

    def __init__(
        self,
        scheduler: CallScheduler,
        name: str,
        *,
        shares: int | None = None,
        slots: int = 1,
        queue_limit: int = 1024,
        quota: float | None = None,
        period: float = 0.1,
    ) -> None:
        self.scheduler = scheduler
        self.name = name
        self.weight = (shares or DEFAULT_SHARES) / DEFAULT_SHARES
        self.slots = max(1, slots)  # calls of this function running at once, at most
        self.queue_limit = queue_limit
        self.quota = quota if quota and quota > 0 else None  # CPU seconds per period
        self.period = period if period > 0 else 0.1
        self.queue: collections.deque[Job] = collections.deque()
        self.running = 0
        self.vtime = 0.0
        self.cpu_seconds = 0.0  # every call's CPU, inline or not: exact accounting
        self.period_start = time.monotonic()
        self.period_used = 0.0
        self.throttled = 0  # periods in which the quota held it back
        self._throttled_in = -1.0
        self.throttled_seconds = 0.0
        self.stopped = False
        self.wake = threading.Condition(scheduler.lock)  # a throttled call waits here

    # --- accounting (any thread) ---------------------------------------------------------

    def charge(self, seconds: float) -> None:
        """Count ``seconds`` of CPU against this function: its total, its virtual time and
        its period's quota. (Unlocked float additions: a lost update under a rare race
        costs a few microseconds of accounting, never correctness.)"""
        if seconds <= 0:
            return
        self.cpu_seconds += seconds
        self.vtime += seconds / self.weight
        if self.quota is not None:
            self.period_used += seconds

    def _roll(self, now: float) -> None:
        """Start the periods that have passed: each pays off one quota of the debt."""
        elapsed = now - self.period_start
        if elapsed >= self.period:
            n = int(elapsed / self.period)
            self.period_start += n * self.period
            assert self.quota is not None
            self.period_used = max(0.0, self.period_used - n * self.quota)

    def throttled_until(self, now: float) -> float:
        """0 when the function may run now, else when its quota allows it again."""
        if self.quota is None:
            return 0.0
        self._roll(now)
        if self.period_used < self.quota:
            return 0.0
        # Whole periods until the debt is paid.
        over = self.period_used - self.quota
        return self.period_start + self.period * (1 + int(over / self.quota))

    def note_throttled(self) -> None:
        """Count the current period as one the quota held the function back in (as CFS's
        ``nr_throttled``)."""
        if self._throttled_in != self.period_start:
            self._throttled_in = self.period_start
            self.throttled += 1

    def throttle(self) -> bool:
        """From a call's deadline callback: wait out the quota if it is used up (outside
        the running count). Returns False if the function was stopped meanwhile."""
        if self.quota is None:
            return not self.stopped
        until = self.throttled_until(time.monotonic())
        if not until:
            return not self.stopped
        self.note_throttled()
        started = time.monotonic()
        with self.scheduler.waiting():
            with self.scheduler.lock:
                while not self.stopped:
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    self.wake.wait(left)
        self.throttled_seconds += time.monotonic() - started
        return not self.stopped

    def describe(self) -> dict[str, object]:
        """For ``layotto ps``: its CPU request and limit, and how often the limit held it."""
        return {
            "cpu_shares": round(self.weight * DEFAULT_SHARES),
            "cpu_limit": round(self.quota / self.period, 3) if self.quota is not None else None,
            "throttled": self.throttled,
            "throttled_seconds": round(self.throttled_seconds, 3),
            "queued": len(self.queue),
        }

    # --- queue -----------------------------------------------------------------------

    def submit(self, run: Callable[[], Any], deliver: Callable[[Any], None]) -> bool:
        """Queue a call (``run`` on a worker, its result to ``deliver``). False when the
        queue is full or the function stopped."""
        return self.scheduler._submit(self, Job(run, deliver))

    def stop(self) -> list[Job]:
        """Stop dispatching; wake throttled calls. Returns the calls still queued."""
        with self.scheduler.lock:
            self.stopped = True
            queued = list(self.queue)
            self.queue.clear()
            self.scheduler._active.discard(self)
            self.wake.notify_all()
        return queued


class Job:
    __slots__ = ("run", "deliver")

    def __init__(self, run: Callable[[], Any], deliver: Callable[[Any], None]) -> None:
        self.run = run
        self.deliver = deliver


class _Worker:
    __slots__ = ("scheduler", "thread")

    def __init__(self, scheduler: CallScheduler) -> None:
        self.scheduler = scheduler
        self.thread: threading.Thread | None = None


class CallScheduler:
    """The node's worker threads and the functions' queues (see the module's doc)."""

    def __init__(self, cores: int | None = None, nice: int = WORKER_NICE) -> None:
        self.cores = max(1, cores or len(os.sched_getaffinity(0)))
        self.nice = nice
        self.lock = threading.Lock()
        self._cond = threading.Condition(self.lock)
        self._active: set[Share] = set()  # shares with queued calls
        self._floor = 0.0  # the least virtual time among busy shares, never decreasing
        self._threads = 0
        self._idle = 0
        self._running = 0  # workers running a call (not waiting)
        self.dispatched = 0
        self._window_start = 0.0
        self._window_cpu = 0.0
        self._loop_busy = False
        self._answers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopAnswers] = (
            weakref.WeakKeyDictionary()
        )

    def answers(self, loop: asyncio.AbstractEventLoop) -> LoopAnswers:
        """Where results for coroutines on ``loop`` are delivered."""
        found = self._answers.get(loop)
        if found is None:
            with self.lock:
                found = self._answers.setdefault(loop, LoopAnswers(loop))
        return found

    def loop_busy(self) -> bool:
        """On the event loop's thread only: whether it has been busy more than
        :data:`LOOP_BUSY` of the time lately (measured over windows of :data:`LOOP_WINDOW`):
        then calls of middling cost go to workers, on other cores."""
        now = time.perf_counter()
        if now - self._window_start >= LOOP_WINDOW:
            cpu = time.thread_time()
            self._loop_busy = (cpu - self._window_cpu) > LOOP_BUSY * (now - self._window_start)
            self._window_start, self._window_cpu = now, cpu
        return self._loop_busy

    @property
    def loop_was_busy(self) -> bool:
        """The event loop's load as last measured (readable from any thread)."""
        return self._loop_busy

    def share(self, name: str, **kwargs: Any) -> Share:
        return Share(self, name, **kwargs)

    # --- submitting -------------------------------------------------------------------

    def _submit(self, share: Share, job: Job) -> bool:
        with self.lock:
            if share.stopped or len(share.queue) >= share.queue_limit:
                return False
            if not share.queue and not share.running:
                share.vtime = max(share.vtime, self._floor)  # no credit for idling
            share.queue.append(job)
            self._active.add(share)
            self._kick()
        return True

    def _kick(self) -> None:
        """A worker for new work (called with the lock held): wake one, or start one."""
        if self._idle:
            self._cond.notify()
        elif self._running < self.cores and self._threads < MAX_WORKERS:
            self._threads += 1
            worker = _Worker(self)
            worker.thread = threading.Thread(
                target=self._work, args=(worker,), name=f"fn-worker-{self._threads}", daemon=True
            )
            worker.thread.start()

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """A worker waits (network, quota, an instance): it does not count as running."""
        worker = getattr(_local, "worker", None)
        if worker is None or worker.scheduler is not self:
            yield
            return
        with self.lock:
            self._running -= 1
            if self._active:
                self._kick()
        try:
            yield
        finally:
            with self.lock:
                self._running += 1

    # --- the workers ------------------------------------------------------------------

    def _pick(self, now: float) -> tuple[Share | None, float]:
        """The share to serve next (least virtual time among those allowed to run), or
        None and how long until a throttled one may run (0: nothing to wait for)."""
        best: Share | None = None
        wake = 0.0
        for share in self._active:
            if share.running >= share.slots:
                continue
            until = share.throttled_until(now)
            if until:
                share.note_throttled()
                wake = until if not wake else min(wake, until)
                continue
            if best is None or share.vtime < best.vtime:
                best = share
        return best, wake

    def _work(self, worker: _Worker) -> None:
        _local.worker = worker
        if self.nice:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        lock = self.lock
        lock.acquire()
        self._running += 1
        try:
            while True:
                share, wake = self._pick(time.monotonic()) if self._running <= self.cores else (None, 0.0)
                if share is None:
                    self._running -= 1
                    self._idle += 1
                    self._cond.wait(max(0.0, wake - time.monotonic()) if wake else 30.0)
                    self._idle -= 1
                    self._running += 1
                    if not self._active and self._threads > self.cores:
                        break  # extra workers (started while others waited) end when idle
                    continue
                job = share.queue.popleft()
                if not share.queue:
                    self._active.discard(share)
                if share.vtime > self._floor:
                    self._floor = share.vtime
                share.running += 1
                self.dispatched += 1
                lock.release()
                try:
                    result = job.run()
                except BaseException as exc:  # a host bug: answer it, keep the worker
                    log.exception("function call failed in the scheduler")
                    result = exc
                try:
                    job.deliver(result)
                except Exception:
                    log.exception("delivering a function call's result failed")
                lock.acquire()
                share.running -= 1
                if share.queue:
                    self._active.add(share)
        finally:
            self._running -= 1
            self._threads -= 1
            lock.release()

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {
                "workers": self._threads,
                "running": self._running,
                "idle": self._idle,
                "queued_functions": len(self._active),
                "dispatched": self.dispatched,
            }


class LoopAnswers:
    """Results of worker calls handed to one asyncio loop in batches (one wake-up per
    batch, not per call)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._done: list[tuple[asyncio.Future[Any], Any]] = []
        self._lock = threading.Lock()

    def future(self) -> tuple[asyncio.Future[Any], Callable[[Any], None]]:
        future: asyncio.Future[Any] = self.loop.create_future()

        def deliver(result: Any) -> None:
            with self._lock:
                self._done.append((future, result))
                first = len(self._done) == 1
            if first:
                with contextlib.suppress(RuntimeError):  # the loop is closed: the host is going away
                    self.loop.call_soon_threadsafe(self._flush)

        return future, deliver

    def _flush(self) -> None:
        with self._lock:
            done, self._done = self._done, []
        for future, result in done:
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


_default: CallScheduler | None = None
_default_lock = threading.Lock()


def default_scheduler() -> CallScheduler:
    """The process's scheduler (the node runtime's; functions made without one use it)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = CallScheduler()
        return _default

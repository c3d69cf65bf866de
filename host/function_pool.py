"""A function's pool of instances: at most ``pool_size`` in use at once, whoever calls,
and what a function answers when it cannot take a call."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from layotto.host.errors import ModuleError, describe_error
from layotto.host.function_instances import BaseInstance, Response

if TYPE_CHECKING:
    from layotto.host.scheduler import CallScheduler, Share


class Unavailable(Exception):
    """No instance for this call: the function is stopped, or its pool is full and stays so."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.body.decode(errors="replace").strip())
        self.response = response


def stopped_response() -> Response:
    return Response(503, body=b"function stopped\n")


class InstancePool:
    """The instances of one function (its part of :class:`~layotto.host.function.Function`):
    idle ones kept for reuse (unless ``fresh``), at most ``pool_size`` taken at once, and
    the epoch ticker held until the last instance is gone after a stop."""

    name: str
    pool_size: int
    queue_limit: int
    fresh: bool
    stopped: bool
    engine: Any
    stats: Any
    scheduler: CallScheduler
    share: Share
    instance_class: type[BaseInstance]
    _idle: list[BaseInstance]
    _live: int
    _busy: int
    _waiting: int
    _lock: threading.Lock
    _free: threading.Condition
    _ticker_held: bool

    def _construct(self) -> BaseInstance:
        try:
            return self.instance_class(self)
        except ModuleError:
            raise
        except Exception as exc:
            raise ModuleError(f"{self.name}: cannot instantiate the function: {describe_error(exc)}") from exc

    def _new_instance(self) -> BaseInstance:
        """A new instance, counted as live (outside the pool's slots: start-up and tests)."""
        instance = self._construct()
        with self._lock:
            self._live += 1
        return instance

    def _take(self, wait: float | None = None, *, limit_waiters: bool = True) -> BaseInstance | None:
        """An instance for one call, holding one of the pool's ``pool_size`` slots until
        :meth:`_give_back`. With the pool full: None at once when ``wait`` is None (the
        inline path, which must not block), else wait up to ``wait`` seconds (among at most
        ``queue_limit`` waiters when ``limit_waiters``). Raises :class:`Unavailable` when
        the function is stopped, the waiters are too many or the wait ran out."""
        with self._lock:
            if self.stopped:
                raise Unavailable(stopped_response())
            if self._busy >= self.pool_size:
                if wait is None:
                    return None
                self._wait_for_slot(wait, limit_waiters)
            self._busy += 1
            if self._idle and not self.fresh:
                return self._idle.pop()
            self._live += 1  # counted while being made: the ticker stays until it is gone
        started = time.thread_time()
        try:
            return self._construct()
        except BaseException:
            self._release_slot()
            raise
        finally:  # making an instance (every call's, for fresh instances) is its CPU too
            self.share.charge(time.thread_time() - started)

    def _wait_for_slot(self, wait: float, limit_waiters: bool) -> None:
        # Called with self._lock held.
        if limit_waiters and self._waiting >= self.queue_limit:
            raise Unavailable(Response(503, body=b"function busy: too many calls waiting for an instance\n"))
        deadline = time.monotonic() + wait
        self._waiting += 1
        try:
            with self.scheduler.waiting():  # a worker waiting here lets another run
                while self._busy >= self.pool_size and not self.stopped:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise Unavailable(
                            Response(503, body=b"function busy: no instance came free within its timeout\n")
                        )
                    self._free.wait(left)
        finally:
            self._waiting -= 1
        if self.stopped:
            raise Unavailable(stopped_response())

    def _release_slot(self) -> None:
        """Give up the slot of an instance that could not be made."""
        with self._lock:
            self._busy -= 1
            self._live -= 1
            if self._waiting:
                self._free.notify()
            release = self._drop_ticker_locked()
        if release:
            self.engine.ticker.release()

    def _drop_ticker_locked(self) -> bool:
        """Whether to release the ticker now: stopped, and no instance left that could be
        running (called with self._lock held; the caller releases outside it)."""
        if self.stopped and self._live <= 0 and self._ticker_held:
            self._ticker_held = False
            return True
        return False

    def _give_back(self, instance: BaseInstance, healthy: bool) -> None:
        with self._lock:
            self._busy -= 1
            if self._waiting:
                self._free.notify()
            if healthy and not self.fresh and not self.stopped:
                self._idle.append(instance)
                return
            self._live -= 1
            if not healthy:
                self.stats.replaced += 1
            release = self._drop_ticker_locked()
        instance.close()
        if release:
            self.engine.ticker.release()

    @property
    def instances(self) -> int:
        return self._live

    def memory_bytes(self) -> int:
        """The linear memory of the idle instances. Read under the pool's lock: an instance
        taken from the pool meanwhile may be closed by its caller (a trap, a stop), and its
        Store freed, so its memory may only be read while it is still idle here."""
        total = 0
        with self._lock:
            for instance in self._idle:
                try:
                    total += instance.memory.size()
                except Exception:
                    pass
        return total

"""Scheduling a function's calls off the event loop: its worker threads and their queue."""

from __future__ import annotations

import asyncio
import collections
import threading
from typing import TYPE_CHECKING

from layotto.host.function_instances import Request, Response

if TYPE_CHECKING:
    from layotto.host.function import Function


class Unavailable(Exception):
    """No instance for this call: the function is stopped, or its pool is full and stays so."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.body.decode(errors="replace").strip())
        self.response = response


def stopped_response() -> Response:
    return Response(503, body=b"function stopped\n")


class WorkerPool:
    """The worker threads of one function (at most ``pool_size``), fed from a bounded queue.

    Cheaper than an executor per request: a worker takes requests until the queue is
    empty (no wake-up per request under load), and answers reach the event loop in
    batches (one ``call_soon_threadsafe`` per batch, not per request).
    """

    def __init__(self, fn: Function, loop: asyncio.AbstractEventLoop) -> None:
        self.fn = fn
        self.loop = loop
        self.queue: collections.deque[tuple[Request, int, asyncio.Future[Response]]] = collections.deque()
        self.cond = threading.Condition()
        self.threads: list[threading.Thread] = []
        self.idle = 0
        self.stopped = False
        self._done: list[tuple[asyncio.Future[Response], Response]] = []
        self._done_lock = threading.Lock()

    def submit(self, request: Request, ticks: int) -> asyncio.Future[Response]:
        future: asyncio.Future[Response] = self.loop.create_future()
        with self.cond:
            if self.stopped:
                future.set_result(Response(503, body=b"function stopped\n"))
                return future
            busy = len(self.threads) - self.idle
            if len(self.queue) >= self.fn.queue_limit and busy >= self.fn.pool_size:
                future.set_result(Response(503, body=b"function busy: request queue is full\n"))
                return future
            self.queue.append((request, ticks, future))
            if self.idle:
                self.cond.notify()
            elif len(self.threads) < self.fn.pool_size:
                thread = threading.Thread(
                    target=self._work, name=f"fn-{self.fn.id[:20]}-{len(self.threads)}", daemon=True
                )
                self.threads.append(thread)
                thread.start()
        return future

    def _work(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.stopped:
                    self.idle += 1
                    self.cond.wait()
                    self.idle -= 1
                if not self.queue:
                    return  # stopped and drained
                request, ticks, future = self.queue.popleft()
            if self.stopped:
                response = stopped_response()
            else:
                # Admitted by the queue already: waits for an instance without a limit on
                # waiters (there are at most pool_size workers), up to the timeout.
                response = self.fn._threaded_call(request, ticks, limit_waiters=False)
            self._answer(future, response)

    def _answer(self, future: asyncio.Future[Response], response: Response) -> None:
        with self._done_lock:
            self._done.append((future, response))
            first = len(self._done) == 1
        if first:
            try:
                self.loop.call_soon_threadsafe(self._flush)
            except RuntimeError:  # the event loop is closed: the host is going away
                pass

    def _flush(self) -> None:
        with self._done_lock:
            done, self._done = self._done, []
        for future, response in done:
            if not future.done():
                future.set_result(response)

    def stop(self) -> None:
        """Answer what is queued with 503 and let the workers end (the function's stop
        interrupts their calls in flight)."""
        with self.cond:
            self.stopped = True
            queued = list(self.queue)
            self.queue.clear()
            self.cond.notify_all()
        for _request, _ticks, future in queued:
            self._answer(future, Response(503, body=b"function stopped\n"))

"""What a function leaves for its operator: its log (`layotto logs`) and its counters
(`layotto ps`, the metrics endpoint)."""

from __future__ import annotations

import bisect
import collections
import threading
import time
from collections.abc import Callable
from typing import Any

LOG_LINE_LIMIT = 16 << 10  # a longer line (or output without a newline) is cut into lines this long
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

_STDOUT_STREAMS = frozenset({"stdout", "trace", "debug", "info", "warn"})


class FunctionLog:
    """The last lines a function wrote (stdout, stderr, traps), for `layotto logs`."""

    def __init__(self, limit: int = 500, line_limit: int = LOG_LINE_LIMIT) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=limit)
        self.line_limit = line_limit
        self._partial = {"stdout": b"", "stderr": b""}
        self._write_lock = threading.Lock()  # instances on several threads share a stream
        # The container's own stdout/stderr (containerd's fifos, so `kubectl logs` and
        # `ctr` see the function's output too); set by the Task service.
        self.sinks: dict[str, Callable[[bytes], None]] = {}

    def writer(self, stream: str) -> Callable[[bytes], None]:
        """A WASI output callback: complete lines go to the log; an unfinished line is kept
        until its newline, but never more than ``line_limit`` bytes of it (a longer one is
        logged in pieces of that size), so the host holds a bounded amount per stream."""

        def write(data: bytes) -> None:
            limit = self.line_limit
            with self._write_lock:
                pending = self._partial[stream]
                start, size = 0, len(data)
                while start < size:
                    newline = data.find(b"\n", start)
                    end = size if newline < 0 else newline
                    while len(pending) + (end - start) > limit:
                        take = limit - len(pending)
                        self.add(stream, (pending + data[start : start + take]).decode(errors="replace"))
                        pending, start = b"", start + take
                    if newline < 0:
                        pending += data[start:end]
                        break
                    self.add(stream, (pending + data[start:end]).decode(errors="replace"))
                    pending, start = b"", newline + 1
                self._partial[stream] = pending

        return write

    def add(self, stream: str, line: str) -> None:
        # Kept lines are cut at line_limit too (a layotto_log call may pass 64 KiB), so the
        # log holds at most limit × line_limit characters.
        kept = line if len(line) <= self.line_limit else line[: self.line_limit] + " [cut]"
        self.lines.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {stream} {kept}")
        if self.sinks:
            # The module's own output and its log calls go to stdout; what the host says
            # about it (traps, denied calls, deadlines) goes to stderr.
            sink = self.sinks.get("stdout" if stream in _STDOUT_STREAMS else "stderr")
            if sink is not None:
                sink(line.encode() + b"\n")


def _folded(name: str) -> Any:
    """A read-only counter of :class:`Stats`: its attribute ``name``, read once the
    outcomes waiting are folded in."""

    def read(stats: Stats) -> Any:
        stats._fold()
        return getattr(stats, name)

    return property(read)


class Stats:
    """Counters of one function, read by `layotto ps` and the metrics endpoint.

    A call's outcome is appended to a list (one step on the request path, from any
    thread); the counters fold the list in when they are read, or when it grows long."""

    FOLD_AT = 128  # (a few KiB per busy function at most)

    def __init__(self) -> None:
        self._invocations = 0
        self._errors = 0
        self._codes: collections.Counter[int] = collections.Counter()
        self._buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self._seen: list[tuple[int, float]] = []
        self._fold_lock = threading.Lock()
        self.replaced = 0

    def observe(self, code: int, seconds: float) -> None:
        seen = self._seen
        seen.append((code, seconds))
        if len(seen) >= self.FOLD_AT:
            self._fold()

    def _fold(self) -> None:
        # The slice and the del are one step each under the GIL: an outcome appended
        # meanwhile stays in the list for the next fold.
        with self._fold_lock:
            seen = self._seen
            n = len(seen)
            batch = seen[:n]
            del seen[:n]
            codes, buckets = self._codes, self._buckets
            for code, seconds in batch:
                codes[code] += 1
                if code >= 500:
                    self._errors += 1
                buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
                self._latency_sum += seconds
            self._invocations += n

    # The counters, each read after folding in the outcomes waiting.
    invocations = _folded("_invocations")
    errors = _folded("_errors")
    codes = _folded("_codes")
    buckets = _folded("_buckets")
    latency_sum = _folded("_latency_sum")

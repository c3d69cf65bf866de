"""The node host's own log (``host.log``): rotated by size, and rate-limited per source.

Tenants can make the host log (a trap per request, a bad subscription per message), and
``host.log`` usually sits on tmpfs (``/run``), so it must not grow without bound: records
are rate-limited per source (a logger, a message template and its first argument, which is
the function or task for the messages tenants cause), and the file is rotated by size. The
host's file descriptors 1 and 2 follow the rotation, so whatever native code writes there
(wasmtime, a Python fatal error) lands in the current file, not in a deleted one.
"""

from __future__ import annotations

import collections
import logging
import logging.handlers
import os
import time
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DEFAULT_MAX_BYTES = 8 << 20
DEFAULT_BACKUPS = 2


class RateLimit(logging.Filter):
    """Lets at most ``burst`` records of one source through per ``window`` seconds; the
    first record after a suppressed stretch says how many were dropped."""

    def __init__(self, burst: int = 20, window: float = 60.0, sources: int = 4096) -> None:
        super().__init__()
        self.burst = burst
        self.window = window
        self.sources = sources
        # source → [window start, records let through, records suppressed]
        self._seen: collections.OrderedDict[tuple[object, ...], list[float]] = collections.OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        first = record.args[0] if isinstance(record.args, tuple) and record.args else None
        key = (record.name, record.msg, first if isinstance(first, str | int) else None)
        now = time.monotonic()
        entry = self._seen.get(key)
        if entry is None or now - entry[0] >= self.window:
            suppressed = int(entry[2]) if entry is not None else 0
            self._seen[key] = [now, 1, 0]
            self._seen.move_to_end(key)
            while len(self._seen) > self.sources:
                self._seen.popitem(last=False)
            if suppressed:
                record.msg = f"{record.msg} ({suppressed} similar messages suppressed)"
            return True
        if entry[1] < self.burst:
            entry[1] += 1
            return True
        entry[2] += 1
        return False


class RotatingHostLog(logging.handlers.RotatingFileHandler):
    """A size-rotated log file that also carries the process's stdout and stderr."""

    def __init__(
        self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS
    ) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups)
        self._redirect()

    def doRollover(self) -> None:
        super().doRollover()
        self._redirect()

    def _redirect(self) -> None:
        if self.stream is not None:
            os.chmod(self.baseFilename, 0o600)
            for fd in (1, 2):
                os.dup2(self.stream.fileno(), fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def configure(level: int, log_file: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """Log to ``log_file`` with rotation when the host was started with its stderr there
    (by the shim), else to stderr (a host run in the foreground); rate-limited either way."""
    handler: logging.Handler
    if max_bytes > 0 and _same_file(2, log_file):
        handler = RotatingHostLog(log_file, max_bytes)
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RateLimit())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)

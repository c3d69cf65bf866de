"""What a nanoprocess is given and what it leaves: its spec (from the OCI bundle), the
directories it sees, its output and stdin, its CPU accounting and its exit.

The running of it is in host/nanoprocess.py (and its two runners, host/fiber_runner.py
and host/thread_runner.py).
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import posixpath
import select
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from layotto.host.errors import ModuleError
from layotto.host.rootpath import DirMount, open_host_dir, open_in_root, open_root

log = logging.getLogger(__name__)


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
    memory_limit: int | None = None  # None: nanoprocess.COMMAND_MEMORY_LIMIT
    capabilities: frozenset[str] = frozenset()
    app_id: str = ""
    services: object = None  # host.function.HostServices (components, invoker)
    cpu_quota_us: int | None = None  # CFS-style quota per period, as in the OCI spec
    cpu_period_us: int = 100_000
    namespace: str = "default"  # the tenant (Kubernetes/containerd namespace) it runs for
    readonly: bool = False  # root.readonly: the rootfs, and a cwd in it, are preopened read-only
    mounts: tuple[DirMount, ...] = ()  # host directories bind-mounted into the container


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


STDIO_BUFFER = 1 << 20  # bytes per stream kept for a reader that has not opened the fifo yet
READER_WAIT = 5.0  # seconds a reader is waited for (or a stalled one tolerated) before discarding


class Output:
    """A write end for the module's stdout or stderr (a containerd fifo or a file).

    containerd's readers (ctr, the CRI log copier) open their end of a fifo in a goroutine
    of their own, so the host may get to a fifo before its reader does: a non-blocking open
    then fails with ENXIO. What the module writes meanwhile is kept (up to STDIO_BUFFER,
    counted in the task's memory; a writer past that waits) and the host-wide
    :class:`_ReaderWait` thread retries the open and delivers it once the reader is there.
    Only a reader that does not come within READER_WAIT (``ctr run -d``, whose reader
    left) makes the host discard output, logged once; so does a reader that went away
    (EPIPE). :meth:`close` says through its callback when the output has been delivered
    or given up, so that the exit is reported after it.

    The descriptor is blocking while output goes straight to it (the module's thread waits
    for a slow reader, as with a pipe) and non-blocking while the waiting thread flushes
    what was kept.
    """

    def __init__(self, target: str, *, lazy: bool = False) -> None:
        self.fd: int | None = None
        self.lock = threading.Lock()
        self._changed = threading.Condition(self.lock)
        self._fifo = ""  # the fifo's path; "" for a file or no target
        self._lazy = lazy  # opened on the first write (an idle function holds no descriptor)
        self._kept = bytearray()  # written before the reader came, not delivered yet
        self._waiting = False  # registered with the reader-wait thread
        self._deadline = 0.0  # monotonic: give up waiting (or on a stalled reader) then
        self._unread = 0  # bytes in the fifo its reader had not read at the last look
        self._gone = False  # the reader never came or went away: drop unless one is there now
        self._closed = False
        self._then: list[Callable[[], None]] = []  # told when close() is complete
        self._file = target.removeprefix("file://") if target.startswith("file://") else ""
        self._fifo = target.removeprefix("fifo://") if target and not self._file else ""
        if lazy:
            return
        if self._file:
            self.fd = os.open(self._file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        elif self._fifo:
            self._open_fifo()  # a reader waiting in its open already gets its writer now

    @property
    def buffered(self) -> int:
        """Bytes kept for a reader that has not taken them yet."""
        return len(self._kept)

    def _open_fifo(self) -> bool:
        """Open the fifo's write end without blocking (lock held); False: no reader now."""
        try:
            fd = os.open(self._fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return False
            if exc.errno == errno.ENOENT:  # removed: nobody will read it
                self._gone = True
                return False
            raise
        os.set_blocking(fd, True)
        self.fd = fd
        self._gone = False
        return True

    def _open_lazily(self) -> None:
        self._lazy = False
        try:
            if self._file:
                self.fd = os.open(self._file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            elif self._fifo:
                self._open_fifo()
        except OSError as exc:
            log.info("cannot open %s: %s; output dropped", self._file or self._fifo, exc)
            self._gone = True

    def write(self, data: bytes) -> None:
        if not data:
            return
        with self.lock:
            if self._closed:
                return
            if self._lazy:
                self._open_lazily()
            if self.fd is None and not self._waiting and self._fifo:
                if self._gone:  # nobody read earlier output: deliver only to a reader there now
                    if not self._open_fifo():
                        return
                elif not self._open_fifo():
                    self._start_waiting()
            view = memoryview(data)
            while self._waiting and view:
                room = STDIO_BUFFER - len(self._kept)
                if room > 0:
                    self._kept += view[:room]
                    view = view[room:]
                    continue
                self._changed.wait(0.1)  # full: until the reader takes some, or is given up
                if self._closed:
                    return
            if view and self.fd is not None:
                self._write_through(view)

    def _start_waiting(self) -> None:
        self._waiting = True
        self._deadline = time.monotonic() + READER_WAIT
        _ReaderWait.instance().add(self)

    def _write_through(self, view: memoryview) -> None:
        """Write all of ``view`` to the (blocking) descriptor; lock held."""
        while view and self.fd is not None:
            try:
                written = os.write(self.fd, view)
            except InterruptedError:
                continue
            except OSError as exc:
                self._reader_gone(exc, len(view))
                return
            view = view[written:]

    def _reader_gone(self, exc: OSError, lost: int) -> None:
        if not self._gone:
            log.info(
                "reader of %s went away (%s); %d bytes of output dropped", self._fifo, exc.strerror, lost
            )
        self._gone = True
        self._kept.clear()
        self._close_fd()

    def _close_fd(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def advance(self) -> bool:
        """For the reader-wait thread: open the fifo if its reader came, deliver what can
        be delivered now; True when this output needs no more waiting."""
        with self.lock:
            if not self._waiting:
                return True
            now = time.monotonic()
            if self.fd is None:
                try:
                    opened = self._open_fifo()
                except OSError as exc:
                    self._reader_gone(exc, len(self._kept))
                    opened = False
                if not opened and not self._gone and now < self._deadline:
                    return False
                if opened:
                    os.set_blocking(self.fd, False)
                    self._deadline = now + READER_WAIT
            while self._kept and self.fd is not None:
                try:
                    written = os.write(self.fd, self._kept)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    self._reader_gone(exc, len(self._kept))
                    break
                del self._kept[:written]
                self._deadline = now + READER_WAIT
                self._changed.notify_all()
            if self._kept and now < self._deadline:
                return False
            if self._closed and not self._kept and self.fd is not None and not self._drained(now):
                return False
            if self._kept:
                what = "did not read" if self.fd is not None else "never opened"
                log.warning(
                    "the reader of %s %s it within %.0fs; %d bytes of output discarded",
                    self._fifo, what, READER_WAIT, len(self._kept),
                )  # fmt: skip
                self._kept.clear()
                self._gone = True
                self._close_fd()
            self._waiting = False
            if self.fd is not None:
                os.set_blocking(self.fd, True)
            then: list[Callable[[], None]] = []
            if self._closed:
                self._close_fd()
                then, self._then = self._then, []
            self._changed.notify_all()
        for callback in then:
            callback()
        return True

    def _drained(self, now: float) -> bool:
        """Has the reader taken all that is in the fifo (or gone, or been given up on)?
        A reader that opened its end may yet be cancelled before it reads (ctr deletes
        the task, and so gives up its fifos, when told of the exit): the exit waits for
        the reader to have read (lock held)."""
        assert self.fd is not None
        unread, gone = _in_fifo(self.fd)
        if unread and not gone and now < self._deadline:
            if unread < self._unread:
                self._deadline = now + READER_WAIT  # it reads, slowly
            self._unread = unread
            return False
        if unread and not self._gone:
            why = "went away" if gone else f"did not read it within {READER_WAIT:.0f}s"
            log.warning("the reader of %s %s; %d bytes of output discarded", self._fifo, why, unread)
        return True

    def close(self, then: Callable[[], None] | None = None) -> None:
        """No more output; ``then`` is called once what was written has been read by the
        reader or given up (at once when nothing is left)."""
        with self.lock:
            self._closed = True
            self._lazy = False
            if not self._waiting and self._fifo and self.fd is not None:
                unread, gone = _in_fifo(self.fd)
                if unread and not gone:
                    self._unread = unread
                    self._start_waiting()
            if self._waiting:
                if then is not None:
                    self._then.append(then)
                self._changed.notify_all()
                return
            self._waiting = False
            self._close_fd()
            self._changed.notify_all()
        if then is not None:
            then()


def _in_fifo(fd: int) -> tuple[int, bool]:
    """The bytes written to a fifo its reader has not read yet, and whether it has no
    reader any more."""
    count = array.array("i", [0])
    try:
        fcntl.ioctl(fd, termios.FIONREAD, count, True)
    except OSError:  # not a fifo after all
        return 0, False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    gone = any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    return count[0], gone


class _ReaderWait:
    """The one host thread that waits for fifo readers: it retries the opens of the
    outputs waiting for theirs and flushes what they kept, every few milliseconds while
    any waits (no host thread blocks on a fifo open)."""

    _lock = threading.Lock()
    _instance: _ReaderWait | None = None

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._outputs: set[Output] = set()
        self._pause = 0.001
        self._thread = threading.Thread(target=self._loop, name="stdio-reader-wait", daemon=True)
        self._thread.start()

    @classmethod
    def instance(cls) -> _ReaderWait:
        with cls._lock:
            if cls._instance is None or not cls._instance._thread.is_alive():
                cls._instance = cls()
            return cls._instance

    def add(self, out: Output) -> None:
        with self._cond:
            self._outputs.add(out)
            self._pause = 0.001  # a reader usually opens within milliseconds
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._outputs:
                    self._cond.wait()
                outputs = list(self._outputs)
                pause, self._pause = self._pause, min(self._pause * 2, 0.01)
            for out in outputs:
                try:
                    done = out.advance()
                except Exception:
                    log.exception("delivering kept output failed")
                    done = True
                if done:
                    with self._cond:
                        self._outputs.discard(out)
            time.sleep(pause)


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

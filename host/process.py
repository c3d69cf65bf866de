"""What a nanoprocess is given and what it leaves: its spec (from the OCI bundle), the
directories it sees, its output and stdin, its CPU accounting and its exit.

The running of it is in host/nanoprocess.py (and its two runners, host/fiber_runner.py
and host/thread_runner.py).
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import threading
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

"""Paths of a container image, resolved inside its rootfs and never outside it.

A path a container brings (its working directory, ``process.args[0]``, a mount's
destination) joined to the rootfs's host path and followed by the host's kernel could climb
out with ``..`` or a symlink in a layer. So it is resolved with ``openat2(2)`` and
``RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS`` from a descriptor of the rootfs. The result is
an ``O_PATH`` descriptor of the exact inode, taken in one system call, so nothing can swap a
component between the check and the use; a consumer that only takes a path (wasmtime's
``preopen_dir``, ``open()``) gets :func:`fd_path`, ``/proc/self/fd/<n>``, which resolves to
that same inode while the descriptor is open. Without openat2 resolution fails, never
falling back to an unsafe join.

See docs/security.md ("Filesystem").
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "RESOLVE_IN_ROOT",
    "RESOLVE_NO_MAGICLINKS",
    "DirMount",
    "fd_path",
    "open_beneath",
    "open_host_dir",
    "open_in_root",
    "open_root",
]

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

_SYSCALLS = {"x86_64": 437, "aarch64": 437, "arm64": 437}
_EAGAIN_RETRIES = 64  # the kernel asks to retry when a rename raced a ".." step


class DirMount(NamedTuple):
    """A host directory bind-mounted into the container (from the OCI spec's ``mounts``)."""

    destination: str  # absolute, normalised path in the container
    source: str  # host path
    readonly: bool


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    """openat2(2); raises OSError (with ``path`` as its filename) on failure."""
    number = _SYSCALLS.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"openat2 is not wired for {platform.machine()}", path)
    encoded = os.fsencode(path)
    if b"\0" in encoded:
        raise OSError(errno.EINVAL, "path contains a NUL byte", path)
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    for _ in range(_EAGAIN_RETRIES):
        fd = _syscall(
            ctypes.c_long(number),
            ctypes.c_int(dirfd),
            ctypes.c_char_p(encoded),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err in (errno.EAGAIN, errno.EINTR):
            continue
        if err == errno.ENOSYS:
            raise OSError(err, "openat2 is unavailable (Linux 5.6 or later is required)", path)
        raise OSError(err, os.strerror(err), path)
    raise OSError(errno.EAGAIN, "path resolution kept racing with renames", path)


def open_root(root: Path | str) -> int:
    """An ``O_PATH`` descriptor of the rootfs directory ``root`` (a host path the runtime
    chose, e.g. ``<bundle>/rootfs``: trusted, followed as given). Close it with os.close."""
    return os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def open_in_root(root_fd: int, path: str, *, directory: bool = False) -> int:
    """An ``O_PATH`` descriptor of ``path`` resolved inside the directory ``root_fd``.

    ``path`` is a path in the container (absolute or relative: both start at the root;
    ``""`` is the root itself). ``..`` and symlinks are clamped at the root as described
    in the module docstring. With ``directory`` the result must be a directory (``ENOTDIR``
    otherwise). Raises OSError naming ``path``: ``ENOENT`` (missing), ``ENOTDIR``,
    ``ELOOP`` (a symlink loop or a magic link), ``ENAMETOOLONG``. The caller closes the
    descriptor.
    """
    flags = os.O_PATH | (os.O_DIRECTORY if directory else 0)
    return _openat2(root_fd, path or "/", flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)


def open_beneath(dir_fd: int, path: str) -> int:
    """An ``O_PATH`` descriptor of the relative ``path`` under ``dir_fd``, following no
    symlink and no ``..`` out of it (``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS``): for a
    path already checked component by component, reopened without a race."""
    return _openat2(dir_fd, path, os.O_PATH, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)


def open_host_dir(path: str) -> int:
    """An ``O_PATH`` descriptor of the host directory ``path`` (a mount source from the
    spec). Its last component must not be a symlink, and no component may be a magic
    link; anything but a directory fails (``ENOTDIR``, or ``ELOOP`` for a symlink)."""
    if not os.path.isabs(path):
        raise OSError(errno.EINVAL, "a mount source must be an absolute path", path)
    fd = _openat2(-100, path, os.O_PATH | os.O_NOFOLLOW, RESOLVE_NO_MAGICLINKS)  # AT_FDCWD
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISDIR(mode):
        os.close(fd)
        if stat.S_ISLNK(mode):
            raise OSError(errno.ELOOP, "is a symbolic link (refused as a mount source)", path)
        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    return fd


def fd_path(fd: int) -> str:
    """``/proc/self/fd/<fd>``: a path that names exactly the inode ``fd`` refers to, for
    APIs that take a path (valid while ``fd`` is open, in this process)."""
    return f"/proc/self/fd/{fd}"

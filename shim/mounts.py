"""Unmounting a container's rootfs: shared by the host's Delete and the shim's ``delete``
action (standard library only: it runs on the shim's cold-start path)."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from layotto.shim.paths import MOUNT_MARKER

MNT_DETACH = 0x2

_libc = ctypes.CDLL(None, use_errno=True)


def unmount_rootfs(bundle: Path) -> None:
    """Unmount everything stacked on ``<bundle>/rootfs`` (lazily when busy) and drop the
    mount marker; a no-op when nothing is mounted."""
    target = os.fsencode(bundle / "rootfs")
    for _ in range(64):
        if _libc.umount2(target, 0) == 0:
            continue
        if ctypes.get_errno() == errno.EBUSY and _libc.umount2(target, MNT_DETACH) == 0:
            continue
        break
    try:
        (bundle / MOUNT_MARKER).unlink()
    except FileNotFoundError:
        pass

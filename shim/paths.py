"""Where the node host keeps its socket, pid file, log and caches.

Stdlib only: imported by the shim's start/delete paths. The host's runtime directory is
derived from the bundle path containerd gives the shim,
``<state>/io.containerd.runtime.v2.task/<namespace>/<id>``, so one containerd (one
state directory) gets one node host, and a test containerd with a private state
directory never shares a host with the system one. The shell fast path in
``containerd-shim-layotto-v1`` computes the same paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TASK_DIR = "io.containerd.runtime.v2.task"
DEFAULT_RUN_DIR = Path("/run/layotto")
DEFAULT_STATE_DIR = Path("/var/lib/layotto")


@dataclass(frozen=True)
class HostPaths:
    """The files of one node host."""

    run_dir: Path

    @property
    def socket(self) -> Path:
        return self.run_dir / "host.sock"

    @property
    def address(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "host.pid"

    @property
    def lock_file(self) -> Path:
        return self.run_dir / "host.lock"

    @property
    def log_file(self) -> Path:
        return self.run_dir / "host.log"


def run_dir_for_bundle(bundle: Path) -> Path:
    """The host runtime directory for a container bundle (``LAYOTTO_RUN_DIR`` overrides)."""
    override = os.environ.get("LAYOTTO_RUN_DIR")
    if override:
        return Path(override)
    if bundle.parent.parent.name == TASK_DIR:
        return bundle.parent.parent.parent / "layotto"
    return DEFAULT_RUN_DIR


def state_dir_for_bundle(bundle: Path) -> Path:
    """Persistent host state (the compiled-module cache) beside containerd's root.

    containerd links ``<bundle>/work`` to ``<root>/io.containerd.runtime.v2.task/<ns>/<id>``.
    """
    override = os.environ.get("LAYOTTO_STATE_DIR")
    if override:
        return Path(override)
    try:
        work = Path(os.readlink(bundle / "work"))
    except OSError:
        return DEFAULT_STATE_DIR
    if work.parent.parent.name == TASK_DIR:
        return work.parent.parent.parent / "layotto"
    return DEFAULT_STATE_DIR


def host_paths_for_bundle(bundle: Path) -> HostPaths:
    return HostPaths(run_dir_for_bundle(bundle))


MOUNT_MARKER = ".layotto-mounted"
"""Created in the bundle while the host holds the container's rootfs mounted."""

EXIT_RECORD = ".layotto-exit"
"""Written in the bundle by a node host that is going away (SIGTERM): the task's exit
status and time, which the shim's ``delete`` reports once the host is gone. Without it,
``delete`` after the host's end reports what a killed process would: 137, now."""


def write_exit_record(bundle: Path, status: int, exited_at: float) -> None:
    """Record how a task ended, for the shim's ``delete`` (atomically: it may be reading)."""
    tmp = bundle / f"{EXIT_RECORD}.tmp"
    tmp.write_text(f"{status} {exited_at!r}\n")
    tmp.replace(bundle / EXIT_RECORD)


def read_exit_record(bundle: Path) -> tuple[int, float] | None:
    """The (status, exited_at) a host recorded for the task in ``bundle``, if any."""
    try:
        status, exited_at = (bundle / EXIT_RECORD).read_text().split()
        return int(status), float(exited_at)
    except (OSError, ValueError):
        return None

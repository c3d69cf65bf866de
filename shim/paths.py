"""Where the node host keeps its socket, pid file, log and caches.

Stdlib only: imported by the shim's start/delete paths. The host's runtime directory is
derived from the bundle path containerd gives the shim,
``<state>/io.containerd.runtime.v2.task/<namespace>/<id>``, so one containerd (one
state directory) gets one node host, and a test containerd with a private state
directory never shares a host with the system one. The shell fast path in
``containerd-shim-layotto-v1`` computes the same paths.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

TASK_DIR = "io.containerd.runtime.v2.task"
DEFAULT_RUN_DIR = Path("/run/layotto")
DEFAULT_STATE_DIR = Path("/var/lib/layotto")


VERSION_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-")
CURRENT = "current"
"""``<run>/current``: a symlink naming the version directory of the host that serves new
containers (switched atomically when a host of another version starts)."""
STABLE_NAMES = (
    "host.sock",
    "host.pid",
    "host.log",
    "admin.sock",
    "runtime.sock",
    "http.port",
    "metrics.port",
    "grpc.port",
)
"""Files of the current host that keep a version-free name in the run directory
(``<run>/runtime.sock`` -> ``current/runtime.sock``): what applications and operators use."""


def check_version(version: str) -> str:
    """``version`` if it can name a host's directory, else ValueError naming the cause."""
    if not version or version in (".", "..") or not set(version) <= VERSION_CHARS:
        raise ValueError(
            f"bad layotto version {version!r}: a version names the host's run directory, "
            "so it must be letters, digits and . _ + - only"
        )
    return version


@dataclass(frozen=True)
class HostPaths:
    """The files of one node host: ``<root>/<version>/``, beside the hosts of other
    versions under the same root (one root per containerd)."""

    root: Path
    version: str

    @property
    def run_dir(self) -> Path:
        return self.root / self.version

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
        """One lock for every version: hosts start (and become current) one at a time."""
        return self.root / "host.lock"

    @property
    def log_file(self) -> Path:
        return self.run_dir / "host.log"


def make_current(paths: HostPaths) -> None:
    """Point ``<root>/current`` at this host's directory (atomically), and make sure every
    stable name (``<root>/runtime.sock`` ...) is a symlink through ``current``. A stable
    name that is something else (a file left by hand) is left alone."""
    root = paths.root
    for name in STABLE_NAMES:
        link = root / name
        if not link.is_symlink() and not link.exists():
            with contextlib.suppress(FileExistsError):
                link.symlink_to(f"{CURRENT}/{name}")
    if current_version(root) == paths.version:
        return
    tmp = root / f".{CURRENT}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(paths.version)
    tmp.replace(root / CURRENT)


def current_version(root: Path) -> str:
    """The version ``<root>/current`` names ("" when there is none)."""
    try:
        return os.readlink(root / CURRENT)
    except OSError:
        return ""


def host_dirs(root: Path) -> list[Path]:
    """The run directories of every host version under ``root`` (live or not)."""
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return []
    return [e for e in entries if not e.is_symlink() and e.is_dir() and not e.name.startswith(".")]


def run_dir_for_bundle(bundle: Path) -> Path:
    """The hosts' runtime directory for a container bundle (``LAYOTTO_RUN_DIR`` overrides)."""
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


def host_paths_for_bundle(bundle: Path, version: str) -> HostPaths:
    """The files of the ``version`` host serving the container in ``bundle``."""
    return HostPaths(run_dir_for_bundle(bundle), check_version(version))


def recorded_socket(bundle: Path) -> Path | None:
    """The host socket ``start`` recorded in ``<bundle>/address`` (the host that holds
    the task, whatever this shim's version), or None."""
    try:
        address = (bundle / "address").read_text().strip()
    except OSError:
        return None
    if address.startswith("unix://") and address.endswith("/host.sock"):
        return Path(address.removeprefix("unix://"))
    return None


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

"""The OCI bundle containerd prepares: config.json, the rootfs mounts, and the module in it."""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import posixpath
import stat
import weakref
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from layotto.host import rootpath
from layotto.host.errors import ModuleError
from layotto.host.rootpath import DirMount
from layotto.shim.mounts import unmount_rootfs
from layotto.shim.paths import MOUNT_MARKER

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000

# mount(8) option → (flags to set, flags to clear)
_FLAGS: dict[str, tuple[int, int]] = {
    "ro": (MS_RDONLY, 0),
    "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0),
    "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0),
    "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0),
    "exec": (0, MS_NOEXEC),
    "bind": (MS_BIND, 0),
    "rbind": (MS_BIND | MS_REC, 0),
    "defaults": (0, 0),
}

_libc = ctypes.CDLL(None, use_errno=True)

log = logging.getLogger(__name__)


@dataclass
class Mount:
    type: str
    source: str
    options: list[str] = field(default_factory=list)


@dataclass
class OciProcess:
    args: list[str]
    env: list[str]
    cwd: str
    terminal: bool


@dataclass
class BundleSpec:
    """The parts of config.json the host uses."""

    path: Path
    process: OciProcess
    root_path: Path
    annotations: dict[str, str]
    memory_limit: int | None
    cpu_quota_us: int | None
    cpu_period_us: int
    cpu_shares: int | None = None  # linux.resources.cpu.shares (Kubernetes: requests.cpu)
    readonly: bool = False  # root.readonly: the module may not write its rootfs
    mounts: list[DirMount] = field(default_factory=list)  # the directory bind mounts
    netns: str = ""  # the network namespace the spec joins (a pod sandbox's: CNI's), or ""

    @classmethod
    def load(cls, bundle: Path) -> BundleSpec:
        try:
            raw = json.loads((bundle / "config.json").read_text())
        except FileNotFoundError as exc:
            raise ModuleError(f"bundle {bundle} has no config.json") from exc
        except json.JSONDecodeError as exc:
            raise ModuleError(f"bundle {bundle}: config.json is not valid JSON: {exc}") from exc
        proc = raw.get("process") or {}
        root = (raw.get("root") or {}).get("path") or "rootfs"
        root_path = Path(root) if os.path.isabs(root) else bundle / root
        resources = (raw.get("linux") or {}).get("resources") or {}
        memory_limit = (resources.get("memory") or {}).get("limit")
        cpu = resources.get("cpu") or {}
        quota = cpu.get("quota")
        period = cpu.get("period") or 100_000
        shares = cpu.get("shares")
        mounts = dir_mounts(raw.get("mounts") or [])
        return cls(
            path=bundle,
            process=OciProcess(
                args=list(proc.get("args") or []),
                env=list(proc.get("env") or []),
                cwd=proc.get("cwd") or "/",
                terminal=bool(proc.get("terminal")),
            ),
            root_path=root_path,
            annotations=dict(raw.get("annotations") or {}),
            memory_limit=int(memory_limit) if memory_limit and int(memory_limit) > 0 else None,
            cpu_quota_us=int(quota) if quota and int(quota) > 0 else None,
            cpu_period_us=int(period),
            cpu_shares=_shares(shares),
            readonly=bool((raw.get("root") or {}).get("readonly")),
            mounts=mounts,
            netns=network_namespace(raw),
        )


def network_namespace(raw: dict[str, object]) -> str:
    """The path of the network namespace ``linux.namespaces`` joins, or "" (none named:
    a new one, or the node's). ModuleError when that path is not an absolute path."""
    linux = raw.get("linux")
    namespaces = linux.get("namespaces") if isinstance(linux, dict) else None
    for ns in namespaces if isinstance(namespaces, list) else ():
        if not isinstance(ns, dict) or ns.get("type") != "network":
            continue
        path = ns.get("path") or ""
        if path == "":  # a new namespace of its own: nothing CNI set up
            return ""
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path or len(path) > 4096:
            raise ModuleError(f"linux.namespaces: network namespace path {str(path)[:80]!r} is not absolute")
        if ".." in path.split("/"):
            raise ModuleError(f"linux.namespaces: network namespace path {path[:80]!r} contains '..'")
        return path
    return ""


def _shares(value: object) -> int | None:
    """CFS shares as the kernel takes them (2..262144); absent, zero or not a number: none."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return max(2, min(value, 262_144))


#: Mounts every runtime adds for a Linux process (procfs, sysfs, devices, cgroups): the
#: module has no use for them (WASI has no /proc, /sys or device files), so any mount at
#: or under these destinations is left out.
RUNTIME_MOUNT_ROOTS = ("/proc", "/sys", "/dev")


def _destination(raw: object) -> str:
    """A mount's destination, normalised; ModuleError unless absolute and free of ``..``."""
    if not isinstance(raw, str) or not raw.startswith("/") or "\0" in raw:
        raise ModuleError(f"mount destination {raw!r} is not an absolute path")
    if ".." in raw.split("/"):
        raise ModuleError(f"mount destination {raw!r} contains '..'")
    normal = posixpath.normpath(raw)
    return "/" + normal.lstrip("/")  # normpath keeps a leading "//"


def dir_mounts(mounts: list[dict[str, object]]) -> list[DirMount]:
    """The OCI spec's ``mounts`` the module sees: bind mounts of host *directories*.

    A bind mount (type ``bind``, or a ``bind``/``rbind`` option) is kept with its
    destination normalised (absolute, no ``..``: ModuleError otherwise) and read-only when
    its options say ``ro``. Left out, since WASI preopens are directories and WASI has no
    kernel filesystems: mounts of any other type (proc, sysfs, tmpfs, mqueue, ...), the
    runtime's mounts under /proc, /sys and /dev, and bind mounts of a file (the kubelet's
    /etc/hosts, /etc/resolv.conf, /etc/hostname, /dev/termination-log). A bind mount of the
    root itself is refused. The source is only looked at here (lstat); it is opened safely,
    without following a symlink, when the module starts (rootpath.open_host_dir).
    """
    found: list[DirMount] = []
    for m in mounts:
        if not isinstance(m, dict):
            continue
        options = [str(o) for o in (m.get("options") or [])]
        if m.get("type") != "bind" and "bind" not in options and "rbind" not in options:
            continue
        destination = _destination(m.get("destination"))
        if any(destination == r or destination.startswith(r + "/") for r in RUNTIME_MOUNT_ROOTS):
            continue
        if destination == "/":
            raise ModuleError("a bind mount over the container's root (destination /) is not supported")
        source = m.get("source")
        if not isinstance(source, str) or not source:
            raise ModuleError(f"bind mount at {destination} has no source")
        try:
            mode = os.lstat(source).st_mode
        except OSError:
            mode = 0  # missing: reported when the module starts
        if mode and not stat.S_ISDIR(mode) and not stat.S_ISLNK(mode):
            log.debug("bind mount of the file %s at %s left out (not a directory)", source, destination)
            continue
        access = [o for o in options if o in ("ro", "rw")]
        found.append(DirMount(destination, source, readonly=access[-1:] == ["ro"]))  # the last one wins
    return found


def parse_options(options: list[str]) -> tuple[int, str]:
    """Split mount options into mount(2) flags and the filesystem's data string."""
    flags = 0
    data = []
    for opt in options:
        if opt in _FLAGS:
            set_, clear = _FLAGS[opt]
            flags = (flags | set_) & ~clear
        else:
            data.append(opt)
    return flags, ",".join(data)


def _mount(source: str, target: Path, fstype: str, flags: int, data: str) -> None:
    if _libc.mount(source.encode(), os.fsencode(target), fstype.encode(), flags, data.encode() or None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} {source} on {target}: {os.strerror(err)}")


def mount_rootfs(bundle: Path, mounts: list[Mount]) -> Path:
    """Mount containerd's rootfs mounts on ``<bundle>/rootfs``, in order."""
    target = bundle / "rootfs"
    target.mkdir(mode=0o711, exist_ok=True)
    if not mounts:
        return target
    (bundle / MOUNT_MARKER).touch()
    try:
        for m in mounts:
            flags, data = parse_options(m.options)
            fstype = "" if flags & MS_BIND else m.type
            _mount(m.source, target, fstype or m.type, flags & ~MS_RDONLY if flags & MS_BIND else flags, data)
            if flags & MS_BIND and flags & MS_RDONLY:
                _mount("", target, "", MS_REMOUNT | MS_BIND | MS_RDONLY | (flags & MS_REC), "")
    except OSError:
        unmount_rootfs(bundle)
        raise
    return target


@dataclass
class ModuleRef:
    """Where the module is: its path inside the image and the export to call.

    ``host_path`` names the file for ``open()``. For a module found in the rootfs it is
    ``/proc/self/fd/<n>``, a descriptor of the file resolved inside the rootfs: the
    descriptor stays open as long as this object lives (close it sooner with close())."""

    image_path: str
    host_path: Path
    entry: str
    _closer: weakref.finalize | None = field(default=None, repr=False, compare=False)

    @classmethod
    def holding(cls, image_path: str, fd: int, entry: str) -> ModuleRef:
        """A ref whose host path is the open descriptor ``fd`` (now owned by the ref)."""
        ref = cls(image_path, Path(rootpath.fd_path(fd)), entry)
        ref._closer = weakref.finalize(ref, os.close, fd)
        return ref

    def close(self) -> None:
        if self._closer is not None:
            self._closer()


def open_in_rootfs(rootfs: Path, image_path: str, *, directory: bool = False) -> int:
    """An O_PATH descriptor of the image path ``image_path`` resolved inside ``rootfs``:
    ``..`` and symlinks never leave it (see host/rootpath.py). Raises OSError."""
    root_fd = rootpath.open_root(rootfs)
    try:
        return rootpath.open_in_root(root_fd, image_path, directory=directory)
    finally:
        os.close(root_fd)


def _open_regular(rootfs: Path, image_path: str) -> int | None:
    """A descriptor of the regular file ``image_path`` names inside ``rootfs``, or None."""
    try:
        fd = open_in_rootfs(rootfs, image_path)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EACCES):
            return None
        raise
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return fd
    os.close(fd)
    return None


def _module_candidates(spec: BundleSpec) -> tuple[str, str, list[str]]:
    """``process.args[0]`` (``/path.wasm`` or ``/path.wasm#export``): the path as given, the
    export, and the image paths it may name (a relative one: under cwd, then on PATH)."""
    if not spec.process.args:
        raise ModuleError("the container has no command: set CMD or ENTRYPOINT to the module's path")
    image_path, _, entry = spec.process.args[0].partition("#")
    candidates = [image_path]
    if not image_path.startswith("/"):
        cwd = spec.process.cwd or "/"
        candidates = [str(PurePosixPath(cwd) / image_path)]
        for env in spec.process.env:
            if env.startswith("PATH="):
                candidates += [str(PurePosixPath(d) / image_path) for d in env[5:].split(":") if d]
    return image_path, entry or "_start", candidates


def locate_module(spec: BundleSpec, rootfs: Path) -> ModuleRef:
    """Find the module named by ``process.args[0]`` in the (mounted) rootfs."""
    image_path, entry, candidates = _module_candidates(spec)
    for candidate in candidates:
        fd = _open_regular(rootfs, candidate)
        if fd is not None:
            return ModuleRef.holding(candidate, fd, entry)
    raise ModuleError(f"{image_path}: no such file in the container image")


# --- The module without mounting the rootfs -------------------------------------------
#
# A function module needs nothing of its container's filesystem but the module file, and a
# mount plus an unmount cost about 3 ms of kernel time per container (serialized on the
# kernel's mount lock). When the rootfs is one overlay (or bind) mount, the file can be read
# straight from the snapshot's layer directories. Only the plain case is taken: the file is
# a regular file in some layer, and nothing in the layers above shadows it or its parents
# (no whiteout, symlink, file or opaque directory on the way); anything else, or no file at
# all, is left to the mounted view, whose answer is the reference.

_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")


def layer_dirs(mounts: list[Mount]) -> list[Path] | None:
    """The directories a rootfs of one overlay or bind mount merges, top layer first
    (None for any other kind of rootfs)."""
    if len(mounts) != 1:
        return None
    m = mounts[0]
    if m.type == "bind" or "bind" in m.options or "rbind" in m.options:
        return [Path(m.source)]
    if m.type != "overlay":
        return None
    upper: list[Path] = []
    lower: list[Path] = []
    for option in m.options:
        if option.startswith("upperdir="):
            upper = [Path(option[len("upperdir=") :])]
        elif option.startswith("lowerdir="):
            lower = [Path(d) for d in option[len("lowerdir=") :].split(":") if d]
    return upper + lower if lower else None


def _opaque(directory: Path) -> bool:
    for name in _OPAQUE_XATTRS:
        try:
            if os.getxattr(directory, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def find_in_layers(layers: list[Path], image_path: str) -> Path | None:
    """The file ``image_path`` names in the merged view of ``layers``, when plainly there."""
    parts = PurePosixPath("/" + image_path.lstrip("/")).parts[1:]
    if not parts or any(part in (".", "..") for part in parts):
        return None
    for layer in layers:
        here = layer
        for depth, part in enumerate(parts):
            here = here / part
            try:
                mode = os.lstat(here).st_mode
            except FileNotFoundError:
                break  # not in this layer: look in the one below
            except OSError:
                return None
            if depth == len(parts) - 1:
                return here if stat.S_ISREG(mode) else None
            if not stat.S_ISDIR(mode) or _opaque(here):
                return None
    return None


def locate_module_in_layers(spec: BundleSpec, mounts: list[Mount]) -> ModuleRef | None:
    """The module, found in the rootfs's layers without mounting them, or None."""
    layers = layer_dirs(mounts)
    if layers is None:
        return None
    _image_path, entry, candidates = _module_candidates(spec)
    for candidate in candidates:
        host_path = find_in_layers(layers, candidate)
        if host_path is None:
            continue
        # Open what was checked without following anything, so the file read is the one
        # find_in_layers saw, even if a layer changed since.
        layer = next(layer for layer in layers if host_path.is_relative_to(layer))
        try:
            layer_fd = rootpath.open_root(layer)
            try:
                fd = rootpath.open_beneath(layer_fd, str(host_path.relative_to(layer)))
            finally:
                os.close(layer_fd)
        except OSError:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return ModuleRef.holding(candidate, fd, entry)
    return None

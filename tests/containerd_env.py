"""A private containerd for tests, benchmarks and ``make demo``.

Each :class:`Containerd` owns one base directory (``/tmp/lt-XXXXXX``) holding its
config, root, state, sockets and log, so it never touches a system containerd.
:meth:`Containerd.stop` tears down everything it started: the daemon, leftover shims
(runc's and the layotto node host), runc containers, and every mount under the base.

Standard library only. Run ``python -m tests.containerd_env --help`` for a foreground
containerd that prints its address.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import hashlib
import io
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "Containerd",
    "ContainerdError",
    "CtrError",
    "busybox_rootfs",
    "default_snapshotter",
    "make_base",
    "mounts_under",
    "pid_alive",
    "write_oci_archive",
]

#: Longest base directory accepted. Sockets live under it, and shims create their own
#: under ``<base>/state/...``: with base <= 32 bytes the state dir is <= 38 bytes,
#: leaving room below the 107-byte unix socket path limit for "/" + a 64-hex name.
MAX_BASE_LEN = 32

_RUNC_DEFAULT_ROOT = "/run/containerd/runc"
_SHIM_SOCKET_DIR = "/run/containerd/s/"
#: Debian's containernetworking-plugins (bridge, host-local, loopback, ...).
CNI_PLUGIN_DIR = Path("/usr/lib/cni")
_MNT_DETACH = 2


class ContainerdError(RuntimeError):
    """containerd failed to start, or died."""


class CtrError(subprocess.CalledProcessError):
    """A ``ctr`` command exited non-zero. ``str()`` shows the command and its output."""

    def __str__(self) -> str:
        return (
            f"command {subprocess.list2cmdline(self.cmd)} exited {self.returncode}\n"
            f"--- stdout ---\n{self.stdout or ''}\n--- stderr ---\n{self.stderr or ''}"
        )


class RedisError(RuntimeError):
    """A private redis-server did not come up (the message holds its log)."""


@contextlib.contextmanager
def redis_server(workdir: Path, binary: str = "redis-server") -> Iterator[str]:
    """A private redis-server on a free loopback port without persistence; yields its
    ``host:port`` and stops it on the way out. Raises RedisError when it does not start."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = workdir / "redis.log"
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        + ["--dir", str(workdir), "--logfile", str(log), "--daemonize", "no"],
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                text = log.read_text() if log.exists() else ""
                raise RedisError(f"redis-server did not start on port {port}:\n{text}")
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def make_base(prefix: str = "lt-") -> Path:
    """A new, short, empty base directory ``/tmp/lt-<8 hex digits>`` (mode 0700). Its
    name is also a valid containerd identifier, handy for unique container ids."""
    for _ in range(100):
        path = Path("/tmp") / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free /tmp/{prefix}XXXXXXXX name")


def _unescape_mountinfo(field: str) -> str:
    # The kernel escapes space, tab, newline and backslash as \\ooo (octal).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mountinfo() -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount in this mount namespace, in order."""
    result = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            fstype = right.split()[0] if right else ""
            result.append((_unescape_mountinfo(fields[4]), fstype))
    return result


def mounts_under(path: Path | str) -> list[str]:
    """Mount points at or below *path*, in mount order (stacked mounts repeat)."""
    top = os.path.realpath(path)
    return [mp for mp, _ in _mountinfo() if mp == top or mp.startswith(top.rstrip("/") + "/")]


def default_snapshotter(path: Path | str = "/tmp") -> str:
    """``overlayfs`` unless *path* lives on overlayfs itself (overlay-on-overlay fails
    on many kernels), then ``native``. ``LAYOTTO_SNAPSHOTTER`` overrides."""
    forced = os.environ.get("LAYOTTO_SNAPSHOTTER")
    if forced:
        return forced
    real = os.path.realpath(path)
    best, fstype = "", ""
    for mp, fs in _mountinfo():
        if (real == mp or real.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
            best, fstype = mp, fs
    return "native" if fstype == "overlay" else "overlayfs"


def _routes() -> list[tuple[int, int]]:
    """(destination, mask) of every IPv4 route of this network namespace, as numbers."""

    def number(field: str) -> int:  # /proc/net/route prints addresses in host (little) order
        return int.from_bytes(bytes.fromhex(field)[::-1], "big")

    with open("/proc/net/route") as f:
        rows = [line.split() for line in list(f)[1:]]
    return [(number(r[1]), number(r[7])) for r in rows if len(r) >= 8]


def _free_subnet(prefix: int = 24) -> str:
    """A /``prefix`` (16 to 28) in 10.200.0.0/13 that no route of this machine overlaps
    (random, so that private containerds running at the same time pick different ones)."""
    if not 16 <= prefix <= 28:
        raise ValueError(f"a pod subnet of /{prefix}: choose 16 to 28")
    ours = (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF
    routes = [(dest, mask) for dest, mask in _routes() if mask]  # (not the default route)
    for _ in range(200):
        net = ((10 << 24) | (200 << 16) | secrets.randbelow(1 << 19)) & ours
        if not any((net & mask & ours) == (dest & mask & ours) for dest, mask in routes):
            return f"{net >> 24}.{(net >> 16) & 255}.{(net >> 8) & 255}.{net & 255}/{prefix}"
    raise ContainerdError(f"no free /{prefix} in 10.200.0.0/13 for the test pods' bridge network")


def _toml(value: str | Path) -> str:
    # A JSON string is a valid TOML basic string.
    return json.dumps(str(value))


# --------------------------------------------------------------------------- processes


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _read_proc(pid: int, name: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _stat(pid: int) -> tuple[str, int]:
    """(state letter, ppid) of *pid*, or ("", 0) when it is gone."""
    data = _read_proc(pid, "stat")
    if not data:
        return "", 0
    rest = data[data.rfind(b")") + 2 :].split()
    return rest[0].decode(), int(rest[1])


def pid_alive(pid: int) -> bool:
    """True while *pid* exists and is not a zombie."""
    state, _ = _stat(pid)
    return state not in ("", "Z", "X")


def _self_and_ancestors() -> set[int]:
    result = set()
    pid = os.getpid()
    while pid > 0 and pid not in result:
        result.add(pid)
        pid = _stat(pid)[1]
    return result


class _Libc:
    _lib: Any = None

    @classmethod
    def umount2(cls, target: str, flags: int) -> int:
        """0, or the errno of a failed umount2(2)."""
        if cls._lib is None:
            cls._lib = ctypes.CDLL(None, use_errno=True)
        if cls._lib.umount2(os.fsencode(target), flags) == 0:
            return 0
        return ctypes.get_errno()


# --------------------------------------------------------------------------- containerd


class Containerd:
    """One private containerd daemon rooted at *base*.

    ``base`` must be short (see :data:`MAX_BASE_LEN`); pass ``None`` to get a fresh
    ``/tmp/lt-XXXXXXXX`` that :meth:`stop` removes again (``remove_base``).
    ``extra_toml`` is appended to the generated config.toml: it may add tables, not
    extend the ones generated here (TOML forbids defining a table twice).
    """

    def __init__(
        self,
        base: Path | str | None = None,
        *,
        path_prepend: Sequence[Path | str] = (),
        cri: bool = False,
        snapshotter: str = "overlayfs",
        sandbox_image: str = "docker.io/library/layotto-pause:latest",
        extra_toml: str = "",
        env: Mapping[str, str] | None = None,
        log_level: str = "info",
        containerd_bin: str | None = None,
        ctr_bin: str | None = None,
    ) -> None:
        self.remove_base = base is None
        self.base = (make_base() if base is None else Path(base)).resolve()
        if len(str(self.base)) > MAX_BASE_LEN:
            raise ValueError(
                f"base directory {self.base} is too long ({len(str(self.base))} > "
                f"{MAX_BASE_LEN} bytes): unix socket paths under it are limited to 107 "
                "bytes; use make_base() (/tmp/lt-XXXXXXXX)"
            )
        self.path_prepend = [Path(p).resolve() for p in path_prepend]
        self.cri = cri
        self.snapshotter = snapshotter
        self.sandbox_image = sandbox_image
        self.extra_toml = extra_toml
        self.env = dict(env or {})
        self.log_level = log_level
        self.containerd_bin = containerd_bin or shutil.which("containerd") or "containerd"
        self.ctr_bin = ctr_bin or shutil.which("ctr") or "ctr"

        self.root: Path = self.base / "root"
        self.state: Path = self.base / "state"
        self.address: Path = self.base / "c.sock"
        self.ttrpc_address: Path = Path(f"{self.address}.ttrpc")
        self.log: Path = self.base / "containerd.log"
        self.config_path: Path = self.base / "config.toml"
        # The CNI plugins are the system's (read only); the network config is private: a
        # bridge of its own (``lyt-`` + the base's 8 hex digits) on a free private /24, no
        # masquerade. The bridge exists once a pod without host network is created, and
        # stop() deletes it.
        plugins = (CNI_PLUGIN_DIR / "bridge").exists()
        self.cni_bin_dir: Path = CNI_PLUGIN_DIR if plugins else self.base / "cni" / "bin"
        self.cni_conf_dir: Path = self.base / "cni" / "conf"
        self.cni_bridge = "lyt-" + self.base.name[-8:]
        #: The pods' subnet: chosen by start() (a free /``cni_prefix``) unless set before.
        self.cni_subnet: str | None = None
        self.cni_prefix = 24
        #: Where ctr() puts stdio fifos of `ctr run` / `tasks start|exec`; None: ctr's default.
        self.fifo_dir: Path | None = self.base / "fifo"
        self.process: subprocess.Popen[bytes] | None = None
        #: Seconds the last start() took until `ctr version` answered.
        self.startup_seconds: float | None = None

    # ------------------------------------------------------------------ config

    def config_toml(self) -> str:
        """The config.toml that start() writes."""
        lines = [
            "version = 2",
            f"root = {_toml(self.root)}",
            f"state = {_toml(self.state)}",
        ]
        if not self.cri:
            lines.append('disabled_plugins = ["io.containerd.grpc.v1.cri"]')
        lines += [
            "",
            "[grpc]",
            f"  address = {_toml(self.address)}",
            "",
            "[ttrpc]",
            f"  address = {_toml(self.ttrpc_address)}",
            "",
            "[debug]",
            f"  level = {_toml(self.log_level)}",
            "",
            "# io.containerd.gc.v1.scheduler is left at its defaults.",
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {_toml(self.base / 'opt')}",
        ]
        if self.cri:
            cri = '[plugins."io.containerd.grpc.v1.cri"'
            lines += [
                "",
                f"{cri}]",
                f"  sandbox_image = {_toml(self.sandbox_image)}",
                '  stream_server_address = "127.0.0.1"',
                '  stream_server_port = "0"',
                "  netns_mounts_under_state_dir = true  # pods' namespaces under state/, not /var/run",
                f"{cri}.containerd]",
                f"  snapshotter = {_toml(self.snapshotter)}",
                '  default_runtime_name = "runc"',
                f"{cri}.containerd.runtimes.runc]",
                '  runtime_type = "io.containerd.runc.v2"',
                f"{cri}.containerd.runtimes.layotto]",
                '  runtime_type = "io.containerd.layotto.v1"',
                '  pod_annotations = ["layotto.io/*"]',
                f"{cri}.cni]",
                f"  bin_dir = {_toml(self.cni_bin_dir)}",
                f"  conf_dir = {_toml(self.cni_conf_dir)}",
            ]
        if self.extra_toml:
            lines += ["", self.extra_toml]
        return "\n".join(lines) + "\n"

    def environ(self) -> dict[str, str]:
        """containerd's environment: ours + ``env``, with ``path_prepend`` before PATH."""
        env = dict(os.environ)
        # Every private containerd gets its own node host: let each host's HTTP ingress
        # and metrics endpoint take a free port (written to <state>/layotto/*.port)
        # instead of fighting over 2045 and 34903. ``env`` may override.
        env.setdefault("LAYOTTO_HTTP_PORT", "0")
        env.setdefault("LAYOTTO_METRICS_PORT", "0")
        env.update(self.env)
        path = env.get("PATH", os.defpath)
        env["PATH"] = os.pathsep.join([*map(str, self.path_prepend), path])
        return env

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 20) -> None:
        """Write config.toml, start containerd, and wait until its gRPC API answers."""
        if self.running:
            raise ContainerdError(f"containerd at {self.address} is already running")
        for d in (self.root, self.state, self.cni_conf_dir):
            d.mkdir(parents=True, exist_ok=True)
        if self.cni_bin_dir != CNI_PLUGIN_DIR:
            self.cni_bin_dir.mkdir(parents=True, exist_ok=True)
        elif self.cri:
            self._write_cni_config()
        self.config_path.write_text(self.config_toml())
        began = time.monotonic()
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [self.containerd_bin, "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base,  # shim lookup tries containerd's cwd first: keep it ours
                env=self.environ(),
                start_new_session=True,
            )
        deadline = began + timeout
        last_error = ""
        while True:
            code = self.process.poll()
            if code is not None:
                self._fail_start(f"containerd exited with status {code} while starting")
            if self._socket_answers():
                try:
                    r = self.ctr("version", check=False, timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    last_error = "ctr version timed out"
                else:
                    if r.returncode == 0:
                        break
                    last_error = r.stderr.strip()
            if time.monotonic() > deadline:
                self._fail_start(
                    f"containerd did not answer on {self.address} within {timeout} s"
                    + (f" (last ctr error: {last_error})" if last_error else "")
                )
            time.sleep(0.02)
        self.startup_seconds = time.monotonic() - began

    def _write_cni_config(self) -> None:
        """A bridge network (bridge + host-local; containerd adds loopback) for the pods."""
        if self.cni_subnet is None:
            self.cni_subnet = _free_subnet(self.cni_prefix)
        config = {
            "cniVersion": "0.4.0",
            "name": self.cni_bridge,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.cni_bridge,
                    "isGateway": True,  # the bridge has an address: the node reaches its pods
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": self.cni_subnet}]],
                        "dataDir": str(self.base / "cni" / "ipam"),
                    },
                }
            ],
        }
        (self.cni_conf_dir / "10-layotto-test.conflist").write_text(json.dumps(config, indent=2) + "\n")

    def _remove_cni_bridge(self) -> None:
        if Path(f"/sys/class/net/{self.cni_bridge}").exists():
            subprocess.run(["ip", "link", "delete", self.cni_bridge], capture_output=True, check=False)

    def _socket_answers(self) -> bool:
        if not self.address.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.address))
            except OSError:
                return False
        return True

    def _fail_start(self, why: str) -> None:
        self.stop(graceful=False, remove_base=False)
        raise ContainerdError(f"{why}; last lines of {self.log}:\n{self.log_tail()}")

    def host_port(self, name: str = "http", timeout: float = 10.0) -> int:
        """The port the node host's ingress (``http``) or metrics endpoint bound."""
        path = self.state / "layotto" / f"{name}.port"
        deadline = time.monotonic() + timeout
        while True:
            try:
                return int(path.read_text())
            except (FileNotFoundError, ValueError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def restart(self, timeout: float = 20) -> None:
        """Stop only the daemon (shims and tasks keep running), then start it again:
        containerd reconnects to its shims from the bundles' ``address`` files."""
        self._stop_daemon()
        self.start(timeout)

    def _stop_daemon(self) -> None:
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.process = None

    def stop(self, *, graceful: bool = True, remove_base: bool | None = None) -> None:
        """Tear down everything this containerd started; safe to call more than once.

        1. ``graceful``: delete every task through containerd (``ctr tasks delete -f``),
           so shims unmount rootfs and remove cgroups themselves (bounded: ~15 s total).
        2. SIGTERM containerd, SIGKILL after 10 s.
        3. ``runc delete --force`` every runc container whose bundle is ours.
        4. SIGTERM then SIGKILL every leftover process (shims, the layotto host, their
           descendants), and remove runc shims' sockets in /run/containerd/s.
        5. Unmount everything under base, deepest first (lazily if busy).
        6. ``remove_base`` (default: only if the base was created here): delete base.
        """
        if graceful and self.running:
            self._delete_all_tasks(budget=15.0)
        self._stop_daemon()
        bundles = self._bundles()
        self._runc_force_delete(bundles)
        self._kill_leftovers()
        self._remove_shim_sockets(bundles)
        self.unmount_all()
        self._remove_cni_bridge()
        if remove_base if remove_base is not None else self.remove_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Containerd:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ ctr

    def ctr_argv(self, *args: str, namespace: str = "default") -> list[str]:
        """The ctr command line for *args*. ``run``, ``tasks start`` and ``tasks exec``
        get ``--fifo-dir <base>/fifo`` unless they name one (ctr's default,
        /run/containerd/fifo, keeps detached tasks' fifos forever)."""
        return [
            self.ctr_bin,
            "--address",
            str(self.address),
            "--namespace",
            namespace,
            *self._with_fifo_dir(args),
        ]

    def _with_fifo_dir(self, args: Sequence[str]) -> list[str]:
        a = list(args)
        if self.fifo_dir is None or any(x == "--fifo-dir" or x.startswith("--fifo-dir=") for x in a):
            return a
        if a[:1] == ["run"]:
            at = 1
        elif len(a) >= 2 and a[0] in ("tasks", "task", "t") and a[1] in ("start", "exec"):
            at = 2
        else:
            return a
        return [*a[:at], "--fifo-dir", str(self.fifo_dir), *a[at:]]

    def ctr(
        self,
        *args: str,
        namespace: str = "default",
        check: bool = True,
        timeout: float = 60,
        input: bytes | str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address <ours> --namespace <ns> *args``; stdout/stderr as text
        (undecodable bytes replaced). Raises :class:`CtrError` when ``check`` and the
        exit status is non-zero, ``subprocess.TimeoutExpired`` after ``timeout``."""
        argv = self.ctr_argv(*map(str, args), namespace=namespace)
        data = input.encode() if isinstance(input, str) else input
        r = subprocess.run(
            argv,
            input=data,
            stdin=None if data is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
        out = r.stdout.decode(errors="replace")
        err = r.stderr.decode(errors="replace")
        if check and r.returncode != 0:
            raise CtrError(r.returncode, argv, out, err)
        return subprocess.CompletedProcess(argv, r.returncode, out, err)

    def ctr_popen(self, *args: str, namespace: str = "default", **kw: Any) -> subprocess.Popen[Any]:
        """Start ``ctr ... *args`` without waiting; ``kw`` go to ``subprocess.Popen``."""
        return subprocess.Popen(self.ctr_argv(*map(str, args), namespace=namespace), **kw)

    def import_image(
        self,
        archive: Path | str,
        namespace: str = "default",
        *,
        extra_args: Sequence[str] = (),
    ) -> None:
        """``ctr images import`` an OCI or docker archive, unpacked for our snapshotter."""
        self.ctr(
            "images",
            "import",
            "--snapshotter",
            self.snapshotter,
            *extra_args,
            str(archive),
            namespace=namespace,
            timeout=120,
        )

    # ------------------------------------------------------------------ cleanup parts

    def _delete_all_tasks(self, budget: float) -> None:
        deadline = time.monotonic() + budget

        def left() -> float:
            return max(0.5, deadline - time.monotonic())

        try:
            namespaces = self.ctr("namespaces", "ls", "-q", timeout=left()).stdout.split()
            for ns in namespaces:
                for task in self.ctr("tasks", "ls", "-q", namespace=ns, timeout=left()).stdout.split():
                    if time.monotonic() > deadline:
                        return
                    self.ctr("tasks", "delete", "-f", task, namespace=ns, check=False, timeout=left())
        except (CtrError, subprocess.TimeoutExpired):
            return  # the forced cleanup that follows handles the rest

    def _bundles(self) -> list[tuple[str, str, Path]]:
        """(namespace, id, bundle dir) of every task bundle in our state dir."""
        top = self.state / "io.containerd.runtime.v2.task"
        result = []
        if top.is_dir():
            for ns_dir in sorted(top.iterdir()):
                if ns_dir.is_dir():
                    result += [(ns_dir.name, b.name, b) for b in sorted(ns_dir.iterdir()) if b.is_dir()]
        return result

    def _runc_force_delete(self, bundles: Iterable[tuple[str, str, Path]]) -> None:
        runc = shutil.which("runc")
        if not runc:
            return
        for ns, cid, bundle in bundles:
            try:
                shim = (bundle / "shim-binary-path").read_text()
            except OSError:
                shim = ""
            if "runc" not in shim:
                continue
            root = _RUNC_DEFAULT_ROOT
            try:
                root = json.loads((bundle / "options.json").read_text()).get("root") or root
            except (OSError, ValueError, AttributeError):
                pass
            runc_root = os.path.join(root, ns)
            try:
                st = subprocess.run(
                    [runc, "--root", runc_root, "state", cid], capture_output=True, timeout=10
                )
                if st.returncode != 0 or json.loads(st.stdout).get("bundle") != str(bundle):
                    continue  # not there, or someone else's container with the same id
                subprocess.run(
                    [runc, "--root", runc_root, "delete", "--force", cid],
                    capture_output=True,
                    timeout=20,
                )
            except (subprocess.TimeoutExpired, ValueError):
                continue

    def owned_pids(self) -> list[int]:
        """Live processes that belong to this containerd: the daemon, processes whose
        command line names our state dir, socket or config, whose cwd is in state, or
        whose environment has our TTRPC_ADDRESS (shims and what they spawn); plus all
        their descendants. Never this process or its ancestors."""
        needles = [os.fsencode(p) for p in (self.state, self.address, self.config_path)]
        ttrpc_env = b"TTRPC_ADDRESS=" + os.fsencode(self.ttrpc_address)
        state_dir = str(self.state) + "/"
        exclude = _self_and_ancestors()
        children: dict[int, list[int]] = {}
        matched: set[int] = set()
        for pid in _pids():
            state, ppid = _stat(pid)
            if state in ("", "Z", "X"):
                continue
            children.setdefault(ppid, []).append(pid)
            if pid in exclude:
                continue
            cmdline = _read_proc(pid, "cmdline")
            hit = any(n in cmdline for n in needles)
            if not hit:
                try:
                    hit = (os.readlink(f"/proc/{pid}/cwd") + "/").startswith(state_dir)
                except OSError:
                    pass
            if not hit:
                hit = ttrpc_env in _read_proc(pid, "environ").split(b"\0")
            if hit:
                matched.add(pid)
        if self.process is not None and self.process.poll() is None:
            matched.add(self.process.pid)
        todo = list(matched)
        while todo:
            for child in children.get(todo.pop(), ()):
                if child not in matched and child not in exclude:
                    matched.add(child)
                    todo.append(child)
        return sorted(matched)

    def _kill_leftovers(self, grace: float = 3.0) -> None:
        pids = self.owned_pids()
        if not pids:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                pids = [p for p in pids if pid_alive(p)]
                if not pids:
                    return
                time.sleep(0.05)

    def _remove_shim_sockets(self, bundles: Iterable[tuple[str, str, Path]]) -> None:
        for _, _, bundle in bundles:
            try:
                address = (bundle / "address").read_text().strip()
            except OSError:
                continue
            path = address.removeprefix("unix://")
            if path.startswith(_SHIM_SOCKET_DIR) and "/.." not in path:
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def unmount_all(self) -> None:
        """Unmount everything mounted at or under base, deepest first; a busy mount is
        detached lazily (MNT_DETACH)."""
        for _ in range(20):
            mounts = mounts_under(self.base)
            if not mounts:
                return
            # Deepest first; among equal paths, the most recent (stacked) mount first.
            order = sorted(enumerate(mounts), key=lambda im: (im[1].count("/"), im[0]), reverse=True)
            for _, mp in order:
                err = _Libc.umount2(mp, 0)
                if err in (errno.EBUSY, errno.EAGAIN):
                    _Libc.umount2(mp, _MNT_DETACH)
        left = mounts_under(self.base)
        if left:
            raise ContainerdError(f"could not unmount under {self.base}: {left}")

    def __repr__(self) -> str:
        return f"Containerd(base={str(self.base)!r}, cri={self.cri}, running={self.running})"


# --------------------------------------------------------------------------- images


_DEFAULT_APPLETS = ("sh", "echo", "cat", "sleep", "true", "false", "ls", "env", "printf")


def _is_static_elf(path: Path) -> bool:
    """True for an ELF file without a PT_INTERP program header."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF":
            return False
        is64, little = head[4] == 2, head[5] == 1
        e = "<" if little else ">"
        if is64:
            (phoff,) = struct.unpack_from(e + "Q", head, 32)
            phentsize, phnum = struct.unpack_from(e + "HH", head, 54)
        else:
            (phoff,) = struct.unpack_from(e + "I", head, 28)
            phentsize, phnum = struct.unpack_from(e + "HH", head, 42)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        (p_type,) = struct.unpack_from(e + "I", table, i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def busybox_rootfs(dest: Path | str, applets: Iterable[str] = _DEFAULT_APPLETS) -> Path:
    """A minimal rootfs at *dest*: a static busybox at /bin/busybox plus applet symlinks
    (``/bin/echo`` -> busybox, ...). Needs a static busybox (Debian: busybox-static)."""
    found = shutil.which("busybox") or ("/bin/busybox" if os.path.exists("/bin/busybox") else None)
    if not found:
        raise FileNotFoundError("busybox not found: apt-get install -y busybox-static")
    if not _is_static_elf(Path(found)):
        raise RuntimeError(f"{found} is not statically linked: apt-get install -y busybox-static")
    dest = Path(dest)
    (dest / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(found, dest / "bin" / "busybox")
    for applet in applets:
        link = dest / "bin" / applet
        if not link.is_symlink():
            link.symlink_to("busybox")
    for d in ("proc", "sys", "dev", "tmp", "etc"):
        (dest / d).mkdir(exist_ok=True)
    return dest


def _goarch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(machine, machine)


def _blob(blobs: dict[str, bytes], data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return digest


def write_oci_archive(
    out: Path | str,
    ref: str,
    rootfs: Path | str,
    *,
    cmd: Sequence[str] | None = None,
    entrypoint: Sequence[str] | None = None,
    env: Sequence[str] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",),
    workdir: str = "/",
    labels: Mapping[str, str] | None = None,
) -> Path:
    """Write an OCI image-layout tar at *out* with one uncompressed layer holding
    *rootfs*, named *ref* (a full reference such as ``docker.io/library/x:latest``) for
    ``ctr images import``. Reproducible: owners are root and mtimes zero."""
    layer_buf = io.BytesIO()

    def normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        return info

    root = Path(rootfs)
    with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(root)), recursive=False, filter=normalize)
    layer = layer_buf.getvalue()

    blobs: dict[str, bytes] = {}
    layer_digest = _blob(blobs, layer)
    image_config: dict[str, Any] = {"Env": list(env), "WorkingDir": workdir}
    if cmd is not None:
        image_config["Cmd"] = list(cmd)
    if entrypoint is not None:
        image_config["Entrypoint"] = list(entrypoint)
    if labels:
        image_config["Labels"] = dict(labels)
    config = json.dumps(
        {
            "architecture": _goarch(),
            "os": "linux",
            "config": image_config,
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        },
        sort_keys=True,
    ).encode()
    config_digest = _blob(blobs, config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest,
                    "size": len(layer),
                }
            ],
        },
        sort_keys=True,
    ).encode()
    manifest_digest = _blob(blobs, manifest)
    tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else "latest"
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": manifest_digest,
                    "size": len(manifest),
                    "platform": {"architecture": _goarch(), "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": ref,
                        "org.opencontainers.image.ref.name": tag,
                    },
                }
            ],
        },
        sort_keys=True,
    ).encode()

    out = Path(out)
    with tarfile.open(out, mode="w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", index)
        for digest, data in sorted(blobs.items()):
            add("blobs/sha256/" + digest.split(":", 1)[1], data)
    return out


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.containerd_env",
        description="Run a private containerd in the foreground; Ctrl-C or SIGTERM stops "
        "it and cleans up its shims, containers and mounts.",
    )
    parser.add_argument(
        "--base", type=Path, help="base directory (default: a new /tmp/lt-XXXXXXXX, removed at exit)"
    )
    parser.add_argument("--cri", action="store_true", help="enable the CRI plugin with the layotto runtime")
    parser.add_argument(
        "--path-prepend",
        type=Path,
        action="append",
        default=[],
        help="directory put before PATH for containerd (repeatable), e.g. the venv's bin",
    )
    parser.add_argument("--snapshotter", default=None, help="default: overlayfs, or native on overlay roots")
    parser.add_argument("--sandbox-image", default="docker.io/library/layotto-pause:latest")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)  # also when started in the background (SIG_IGN)
    c = Containerd(
        args.base,
        path_prepend=args.path_prepend,
        cri=args.cri,
        snapshotter=args.snapshotter or default_snapshotter(args.base or "/tmp"),
        sandbox_image=args.sandbox_image,
        log_level=args.log_level,
    )
    try:
        c.start()
        print(c.address, flush=True)
        print(
            f"containerd {c.address} (started in {c.startup_seconds:.2f} s)\n"
            f"  log:   {c.log}\n  state: {c.state}\n"
            f"  try:   ctr --address {c.address} version\n"
            "  Ctrl-C stops it.",
            file=sys.stderr,
            flush=True,
        )
        assert c.process is not None
        code = c.process.wait()
        print(f"containerd exited with status {code}:\n{c.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except ContainerdError as e:
        print(e, file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        c.stop()


if __name__ == "__main__":
    sys.exit(main())

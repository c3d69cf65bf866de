"""The shim binary's `start` and `delete` actions (the slow paths), standard library only.

``containerd-shim-layotto-v1`` answers `start` and `delete` itself when the node host is
already running; it runs this module when the host must be started, or when a container
must be cleaned up without the host's help. See DESIGN.md ("`start` and `delete` are tiny").

start:  make sure the node host runs (bind and listen on its socket here, under a lock,
        then start the host detached with the listening socket inherited, so containerd's
        immediate dial never races the host's start), write ``<bundle>/address`` and print
        ``unix://<socket>`` and nothing else (containerd reads stdout and stderr together).
delete: ask a live host to kill and forget the task, unmount the rootfs if it is still
        mounted, print a protobuf DeleteResponse: the exit the host recorded in the bundle
        as it stopped, else 137 and now (the host is gone: the task was killed).
        Idempotent; works while the host is down.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from layotto.shim import wire
from layotto.shim.mounts import unmount_rootfs
from layotto.shim.paths import (
    HostPaths,
    host_paths_for_bundle,
    make_current,
    read_exit_record,
    recorded_socket,
    state_dir_for_bundle,
)

VERSION = "0.1.0"
VERSION_ENV = "LAYOTTO_SHIM_VERSION"
TASK_SERVICE = "containerd.task.v2.Task"
NAMESPACE_KEY = "containerd-namespace-ttrpc"
SIGKILL = 9


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse containerd's Go-style flags (single dash, flags before the action)."""
    parser = argparse.ArgumentParser(prog="containerd-shim-layotto-v1", allow_abbrev=False, add_help=False)
    for name in ("namespace", "address", "publish-binary", "id", "bundle", "socket"):
        parser.add_argument(f"-{name}", f"--{name}", default="")
    for name in ("debug", "v", "info"):
        parser.add_argument(f"-{name}", f"--{name}", action="store_true")
    parser.add_argument("action", nargs="?", default="")
    args, _unknown = parser.parse_known_args(argv)
    return args


def shim_version() -> str:
    """The version of the shim that runs us: the shell script exports it (it is set in
    that one place); run directly, this package's."""
    return os.environ.get(VERSION_ENV) or VERSION


# --- start ---------------------------------------------------------------------------


def _can_connect(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def ensure_host(
    paths: HostPaths, *, state_dir: Path, ttrpc_address: str, grpc_address: str = "", debug: bool = False
) -> None:
    """Start the node host of ``paths.version`` unless one already serves ``paths.socket``;
    a host started here becomes the current one (``<root>/current``)."""
    paths.root.mkdir(parents=True, exist_ok=True, mode=0o711)
    paths.run_dir.mkdir(exist_ok=True, mode=0o711)
    os.umask(0o077)  # the lock, the log and everything the host writes: for root only
    with open(paths.lock_file, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _can_connect(paths.socket):
            return
        try:
            paths.socket.unlink()
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(paths.socket))
            os.chmod(paths.socket, 0o600)
            listener.listen(512)
            fd = listener.fileno()
            cmd = [
                sys.executable,
                "-m",
                "layotto.host",
                "--listen-fd",
                str(fd),
                "--run-dir",
                str(paths.root),
                "--host-version",
                paths.version,
                "--state-dir",
                str(state_dir),
            ]
            if ttrpc_address:
                cmd += ["--containerd-ttrpc", ttrpc_address]
            if grpc_address:
                cmd += ["--containerd-address", grpc_address]
            if debug:
                cmd.append("--debug")
            with open(paths.log_file, "ab") as log, open(os.devnull, "rb") as null:
                child = subprocess.Popen(
                    cmd,
                    pass_fds=(fd,),
                    stdin=null,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                    cwd="/",
                )
            tmp = paths.pid_file.with_suffix(".tmp")
            tmp.write_text(f"{child.pid}\n")
            tmp.replace(paths.pid_file)
            make_current(paths)
        finally:
            listener.close()


def start(args: argparse.Namespace) -> int:
    # Options arrive on stdin (a google.protobuf.Any, or 2.3's BootstrapParams); the host
    # needs none of them today, but the pipe must be drained, not left to EPIPE.
    if not sys.stdin.isatty():
        try:
            sys.stdin.buffer.read()
        except OSError:
            pass
    bundle = Path(args.bundle or os.getcwd())
    try:
        paths = host_paths_for_bundle(bundle, shim_version())
    except ValueError as exc:
        sys.stderr.write(f"containerd-shim-layotto-v1: {exc} ({VERSION_ENV})\n")
        return 1
    ttrpc = os.environ.get("TTRPC_ADDRESS") or (f"{args.address}.ttrpc" if args.address else "")
    ensure_host(
        paths,
        state_dir=state_dir_for_bundle(bundle),
        ttrpc_address=ttrpc.removeprefix("unix://"),
        grpc_address=args.address.removeprefix("unix://"),
        debug=args.debug,
    )
    (bundle / "address").write_text(paths.address)
    sys.stdout.write(paths.address)
    sys.stdout.flush()
    return 0


# --- delete --------------------------------------------------------------------------


def _ttrpc_call(sock: socket.socket, stream_id: int, method: str, payload: bytes, namespace: str) -> int:
    """One unary ttrpc call on an open connection; returns the status code."""
    metadata = wire.field_bytes(1, NAMESPACE_KEY) + wire.field_bytes(2, namespace)
    request = (
        wire.field_bytes(1, TASK_SERVICE)
        + wire.field_bytes(2, method)
        + wire.field_bytes(3, payload)
        + wire.field_message(5, metadata)
    )
    sock.sendall(struct.pack(">IIBB", len(request), stream_id, 1, 0) + request)
    header = _recv_exact(sock, 10)
    length, _sid, _mtype, _flags = struct.unpack(">IIBB", header)
    body = _recv_exact(sock, length)
    for number, _wt, value in wire.fields(body):
        if number == 1 and isinstance(value, bytes):
            for n2, _w2, v2 in wire.fields(value):
                if n2 == 1 and isinstance(v2, int):
                    return v2
    return 0


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("host closed the connection")
        data += chunk
    return bytes(data)


def _ask_host_to_forget(host_socket: Path, task_id: str, namespace: str) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(str(host_socket))
        kill = wire.field_bytes(1, task_id) + wire.field_varint(3, SIGKILL) + wire.field_varint(4, 1)
        _ttrpc_call(s, 1, "Kill", kill, namespace)
        stream_id = 1
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            stream_id += 2  # ttrpc stream ids must increase on a connection
            # FAILED_PRECONDITION (9) while the module is still winding down.
            if _ttrpc_call(s, stream_id, "Delete", wire.field_bytes(1, task_id), namespace) != 9:
                break
            time.sleep(0.02)
    except OSError:
        pass
    finally:
        s.close()


def delete(args: argparse.Namespace) -> int:
    bundle = Path(args.bundle or os.getcwd())
    # The host that holds the task: the one `start` recorded (after an upgrade, an older
    # version's), else this version's.
    sock = recorded_socket(bundle)
    if sock is None:
        with contextlib.suppress(ValueError):  # a bad version has no host to ask
            sock = host_paths_for_bundle(bundle, shim_version()).socket
    if sock is not None and args.id and _can_connect(sock):
        _ask_host_to_forget(sock, args.id, args.namespace or "default")
    unmount_rootfs(bundle)  # also drops the mount marker
    # The exit a host recorded as it went away (SIGTERM); else what runc answers for a
    # container whose shim is gone: killed, now (when the host was found gone).
    status, exited_at = read_exit_record(bundle) or (128 + SIGKILL, time.time())
    response = wire.field_varint(2, status) + wire.field_message(3, wire.timestamp(exited_at))
    sys.stdout.buffer.write(response)
    sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.v:
        version = shim_version()
        print(f"containerd-shim-layotto-v1:\n  Version: {version}\n  Runtime: io.containerd.layotto.v1")
        return 0
    if args.action == "start":
        return start(args)
    if args.action == "delete":
        return delete(args)
    sys.stderr.write(f"containerd-shim-layotto-v1: unknown action {args.action!r} (want start or delete)\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())

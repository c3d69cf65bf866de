"""The shim executable, run the way containerd runs it, without containerd.

Each test gets a fake containerd state directory under /tmp (short paths: unix socket
paths are limited to 108 bytes) laid out as ``<base>/state/io.containerd.runtime.v2.task/
<ns>/<id>``, with ``work`` linking to ``<base>/root/...`` as containerd does. A node host
started by a test is killed by the fixture's finalizer, even when the test fails.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from layotto.shim.paths import MOUNT_MARKER, write_exit_record
from layotto.shim.protocol import task_pb2, ttrpc_pb2

SHIM_NAME = "containerd-shim-layotto-v1"
RUN_TIMEOUT = 30.0
HOST_EXIT_TIMEOUT = 15.0
NS = "ns"


@dataclass
class FakeContainerd:
    base: Path

    @property
    def state(self) -> Path:
        return self.base / "state"

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def run_dir(self) -> Path:
        return self.state / "layotto"

    @property
    def host_dir(self) -> Path:
        """The run directory of this version's host (``<run>/<version>/``)."""
        return self.run_dir / importlib.metadata.version("layotto")

    @property
    def socket(self) -> Path:
        return self.host_dir / "host.sock"

    @property
    def address(self) -> str:
        return f"unix://{self.socket}"

    @property
    def ttrpc_address(self) -> str:
        return str(self.base / "containerd.sock.ttrpc")  # nothing listens there

    def bundle(self, task_id: str, ns: str = NS) -> Path:
        """A bundle as containerd 1.6 lays it out before running `start`."""
        bundle = self.state / "io.containerd.runtime.v2.task" / ns / task_id
        (bundle / "rootfs").mkdir(parents=True, mode=0o711)
        work = self.root / "io.containerd.runtime.v2.task" / ns / task_id
        work.mkdir(parents=True)
        (bundle / "work").symlink_to(work)
        (bundle / "config.json").write_text("{}")
        return bundle

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LAYOTTO_", "PYTHON"))}
        env.update(GOMAXPROCS="2", TTRPC_ADDRESS=self.ttrpc_address)
        return env


@pytest.fixture(scope="session")
def shim() -> Path:
    found = shutil.which(SHIM_NAME)
    path = Path(found) if found else Path(sys.executable).parent / SHIM_NAME
    if not os.access(path, os.X_OK):
        pytest.fail(f"{SHIM_NAME} is neither on PATH nor next to {sys.executable}: pip install -e .")
    return path


@pytest.fixture
def fake() -> Iterator[FakeContainerd]:
    c = FakeContainerd(Path(tempfile.mkdtemp(prefix="lshim-", dir="/tmp")))
    try:
        yield c
    finally:
        stop_hosts(c.run_dir)
        for mountpoint in reversed(mounts_under(c.base)):
            subprocess.run(["umount", "-l", mountpoint], check=False)
        shutil.rmtree(c.base, ignore_errors=True)


# --- helpers -----------------------------------------------------------------------------


def run_shim(
    shim: Path,
    fake: FakeContainerd,
    bundle: Path,
    *args: str,
    stdin: bytes = b"",
    combined: bool = False,
) -> subprocess.CompletedProcess[bytes]:
    """Run the shim with containerd's environment, cwd = bundle; a hang fails the test."""
    return subprocess.run(
        [str(shim), *args],
        cwd=bundle,
        env=fake.env(),
        input=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if combined else subprocess.PIPE,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def start_args(task_id: str) -> list[str]:
    """containerd 1.6's `start` argv (the bundle is only the cwd)."""
    return ["-namespace", NS, "-address", "/nonexistent", "-publish-binary", "/usr/bin/containerd",
            "-id", task_id, "start"]  # fmt: skip


def delete_args(task_id: str, bundle: Path) -> list[str]:
    return ["-namespace", NS, "-address", "/nonexistent", "-publish-binary", "/usr/bin/containerd",
            "-id", task_id, "-bundle", str(bundle), "delete"]  # fmt: skip


def host_processes(run_dir: Path) -> list[psutil.Process]:
    """Live (non-zombie) node hosts serving ``run_dir``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if "layotto.host" in cmdline and str(run_dir) in cmdline:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def wait_exited(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` (not our child) has terminated; zombies count as gone."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


def stop_hosts(run_dir: Path) -> None:
    pids = {p.pid for p in host_processes(run_dir)}
    try:
        pids.add(int((run_dir / "host.pid").read_text()))
    except (OSError, ValueError):
        pass
    for pid in pids:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            if wait_exited(pid, HOST_EXIT_TIMEOUT):
                break


def mounts_under(base: Path) -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == str(base) or point.startswith(f"{base}/"):
                points.append(point)
    return points


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return bytes(buf)


def ttrpc_status(sock_path: Path, service: str, method: str) -> ttrpc_pb2.Status:
    """One hand-framed unary ttrpc call; the status the server answers with."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(RUN_TIMEOUT)
    with s:
        s.connect(str(sock_path))
        data = ttrpc_pb2.Request(service=service, method=method).SerializeToString()
        s.sendall(struct.pack(">IIBB", len(data), 1, 1, 0) + data)
        length, sid, mtype, _flags = struct.unpack(">IIBB", recv_exact(s, 10))
        assert (sid, mtype) == (1, 2)
        return ttrpc_pb2.Response.FromString(recv_exact(s, length)).status


def printed_address(out: bytes) -> str:
    """The address in `start`'s combined output. containerd TrimSpaces it, so a trailing
    newline is fine, but nothing else may be there."""
    text = out.decode()
    assert text in (text.rstrip("\n"), text.rstrip("\n") + "\n"), repr(text)
    return text.rstrip("\n")


# --- -v and unknown actions --------------------------------------------------------------


def test_version(shim, fake):
    result = run_shim(shim, fake, fake.base, "-v")
    assert result.returncode == 0
    assert result.stderr == b""
    lines = result.stdout.decode().splitlines()
    assert lines[0] == f"{SHIM_NAME}:"
    assert f"  Version: {importlib.metadata.version('layotto')}" in lines
    # the Python bootstrap reports the same version as the shell fast path
    slow = subprocess.run(
        [sys.executable, "-m", "layotto.shim.bootstrap", "-v"], capture_output=True, timeout=RUN_TIMEOUT
    )
    assert slow.stdout == result.stdout


@pytest.mark.parametrize("action", ["frobnicate", ""])
def test_unknown_action_fails(shim, fake, action):
    bundle = fake.bundle("c1")
    result = run_shim(shim, fake, bundle, "-namespace", NS, "-id", "c1", *([action] if action else []))
    assert result.returncode != 0
    assert result.stdout == b""
    assert b"unknown action" in result.stderr
    assert action.encode() in result.stderr
    assert host_processes(fake.run_dir) == []


# --- delete ------------------------------------------------------------------------------


def assert_killed_now(stdout: bytes, before: float) -> None:
    resp = task_pb2.DeleteResponse.FromString(stdout)
    assert resp.exit_status == 137
    assert resp.HasField("exited_at")
    exited = resp.exited_at.seconds + resp.exited_at.nanos / 1e9
    assert before - 1 <= exited <= time.time() + 1


@pytest.mark.parametrize("leftovers", [False, True], ids=["clean", "stale-host-files"])
def test_delete_with_host_down(shim, fake, leftovers):
    bundle = fake.bundle("c1")
    if leftovers:
        # What a crashed host leaves behind: a socket nobody listens on, a dead pid.
        fake.host_dir.mkdir(parents=True)
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(str(fake.socket))
        dead.close()
        gone = subprocess.Popen(["true"])
        gone.wait()
        (fake.host_dir / "host.pid").write_text(f"{gone.pid}\n")
    for _ in range(2):  # idempotent
        before = time.time()
        result = run_shim(shim, fake, bundle, *delete_args("c1", bundle))
        assert result.returncode == 0, result.stderr
        assert result.stderr == b""
        assert_killed_now(result.stdout, before)
    assert host_processes(fake.run_dir) == []


def test_a_host_socket_without_its_pid_file_prints_nothing_on_stderr(shim, fake):
    """While a host is starting, its socket exists before its pid file. The fast path must
    not print the shell's "cannot open" then: containerd reads start's stdout and stderr
    together as the address."""
    bundle = fake.bundle("c1")
    fake.host_dir.mkdir(parents=True)
    starting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    starting.bind(str(fake.socket))
    try:
        result = run_shim(shim, fake, bundle, *delete_args("c1", bundle))
    finally:
        starting.close()
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""


@pytest.mark.parametrize("host_up", [False, True], ids=["host-gone", "host-stopping"])
def test_delete_reports_the_exit_a_stopping_host_recorded(shim, fake, host_up):
    """A host stopping on SIGTERM records each task's exit (143) in its bundle; `delete`
    reports that, not 0 (the fast path's empty answer) nor 137, even while the host is
    still up."""
    bundle = fake.bundle("c1")
    if host_up:
        started = run_shim(shim, fake, bundle, *start_args("c1"), combined=True)
        assert started.returncode == 0, started.stdout
    write_exit_record(bundle, 143, 1767225600.25)
    result = run_shim(shim, fake, bundle, *delete_args("c1", bundle))
    assert result.returncode == 0, result.stderr
    resp = task_pb2.DeleteResponse.FromString(result.stdout)
    assert resp.exit_status == 143
    assert (resp.exited_at.seconds, resp.exited_at.nanos // 1000) == (1767225600, 250000)


@pytest.mark.integration  # needs root
def test_delete_unmounts_rootfs(shim, fake):
    bundle = fake.bundle("c2")
    rootfs = bundle / "rootfs"
    lower, upper = fake.base / "lower", fake.base / "upper"
    lower.mkdir()
    upper.mkdir()
    (lower / "lower-file").write_text("x")
    (upper / "upper-file").write_text("y")
    # Two mounts stacked on rootfs: delete must take off both.
    subprocess.run(["mount", "--bind", str(lower), str(rootfs)], check=True)
    subprocess.run(["mount", "--bind", str(upper), str(rootfs)], check=True)
    assert mounts_under(rootfs) == [str(rootfs)] * 2
    assert (rootfs / "upper-file").exists()
    (bundle / MOUNT_MARKER).write_text("")

    before = time.time()
    result = run_shim(shim, fake, bundle, *delete_args("c2", bundle))
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    assert_killed_now(result.stdout, before)
    assert mounts_under(rootfs) == []
    assert list(rootfs.iterdir()) == []
    assert not (bundle / MOUNT_MARKER).exists()
    assert (lower / "lower-file").exists()  # unmounted, not emptied

    again = run_shim(shim, fake, bundle, *delete_args("c2", bundle))
    assert again.returncode == 0 and again.stderr == b""
    assert_killed_now(again.stdout, before)


# --- start -------------------------------------------------------------------------------


def test_start_launches_one_detached_host(shim, fake):
    bundle = fake.bundle("c1")
    # Runtime options on stdin: a google.protobuf.Any (type_url, value).
    options = b"\x0a\x19runtimeoptions.v1.Options\x12\x04\x12\x02/x"
    result = run_shim(shim, fake, bundle, *start_args("c1"), stdin=options, combined=True)
    # run_shim returning at all shows the host holds none of the output pipe.
    assert result.returncode == 0, result.stdout
    assert printed_address(result.stdout) == fake.address
    assert (bundle / "address").read_text() == fake.address
    assert fake.socket.is_socket()
    assert fake.socket.stat().st_mode & 0o777 == 0o600

    pid = int((fake.run_dir / "host.pid").read_text())
    hosts = host_processes(fake.run_dir)
    assert [p.pid for p in hosts] == [pid]
    host = hosts[0]
    assert host.ppid() != os.getpid()  # the start process is gone; the host is detached
    assert os.getsid(pid) == pid  # its own session: containerd's process group is not its
    # containerd's CombinedOutput waits for every writer of its pipe: the host has none.
    assert os.readlink(f"/proc/{pid}/fd/0") == os.devnull
    for fd in (1, 2):
        assert not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")

    # The host serves ttrpc on that socket.
    status = ttrpc_status(fake.socket, "layotto.test.NoSuchService", "Nothing")
    assert status.code == 12

    # A second start for another container: the shell fast path, same host. Proven by
    # running a copy of the shim with no Python reachable at all.
    bin_dir = fake.base / "bin"
    bin_dir.mkdir()
    lone = bin_dir / SHIM_NAME
    shutil.copy2(shim, lone)
    bundle2 = fake.bundle("c2")
    env = fake.env() | {"PATH": str(fake.base / "empty")}
    started = time.monotonic()
    fast = subprocess.run(
        [str(lone), *start_args("c2")],
        cwd=bundle2,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert fast.returncode == 0, fast.stdout
    assert printed_address(fast.stdout) == fake.address
    assert (bundle2 / "address").read_text() == fake.address
    assert elapsed < 2.0

    # And with the installed shim, options on stdin again.
    bundle3 = fake.bundle("c3")
    third = run_shim(shim, fake, bundle3, *start_args("c3"), stdin=options, combined=True)
    assert third.returncode == 0
    assert printed_address(third.stdout) == fake.address
    assert [p.pid for p in host_processes(fake.run_dir)] == [pid]

    # delete of a container the live host never saw: success, a valid DeleteResponse.
    gone = run_shim(shim, fake, bundle3, *delete_args("c3", bundle3))
    assert gone.returncode == 0 and gone.stderr == b""
    task_pb2.DeleteResponse.FromString(gone.stdout)
    assert [p.pid for p in host_processes(fake.run_dir)] == [pid]


def test_concurrent_starts_share_one_host(shim, fake):
    ids = [f"c{i}" for i in range(8)]
    bundles = {task_id: fake.bundle(task_id) for task_id in ids}
    results: dict[str, subprocess.CompletedProcess[bytes] | BaseException] = {}
    gate = threading.Barrier(len(ids))

    def start(task_id: str) -> None:
        try:
            gate.wait(RUN_TIMEOUT)
            results[task_id] = run_shim(
                shim, fake, bundles[task_id], *start_args(task_id), stdin=b"\x00\x01junk", combined=True
            )
        except BaseException as exc:  # reported below
            results[task_id] = exc

    threads = [threading.Thread(target=start, args=(task_id,)) for task_id in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(RUN_TIMEOUT + 5)
    assert not any(t.is_alive() for t in threads)

    for task_id in ids:
        result = results[task_id]
        assert isinstance(result, subprocess.CompletedProcess), result
        assert result.returncode == 0, result.stdout
        assert printed_address(result.stdout) == fake.address
        assert (bundles[task_id] / "address").read_text() == fake.address
    hosts = host_processes(fake.run_dir)
    assert [p.pid for p in hosts] == [int((fake.run_dir / "host.pid").read_text())]
    assert ttrpc_status(fake.socket, "layotto.test.NoSuchService", "Nothing").code == 12


def blocked_on_flock(path: Path) -> bool:
    """Whether some process waits in /proc/locks for a flock on ``path``."""
    inode = path.stat().st_ino
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 5 and parts[1] == "->" and parts[2] == "FLOCK":
                if int(parts[6].rsplit(":", 1)[1]) == inode:
                    return True
    return False


def test_start_serializes_on_the_lock_and_reuses_a_listening_host(shim, fake):
    """`start` takes the host lock before deciding, and a socket that accepts connections
    is an existing host: it is reused, never replaced by a second host."""
    fake.host_dir.mkdir(parents=True)
    bundle = fake.bundle("c1")
    with open(fake.run_dir / "host.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.Popen(
            [str(shim), *start_args("c1")],
            cwd=bundle,
            env=fake.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + RUN_TIMEOUT
            while not blocked_on_flock(fake.run_dir / "host.lock"):
                assert proc.poll() is None, "start finished without waiting for the lock"
                assert time.monotonic() < deadline, "start never waited for the lock"
                time.sleep(0.01)
            # Meanwhile "another start" brings up a host on the socket.
            other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            other.bind(str(fake.socket))
            other.listen(8)
            other_inode = fake.socket.stat().st_ino
            fcntl.flock(lock, fcntl.LOCK_UN)
            out, _ = proc.communicate(timeout=RUN_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    with other:
        assert proc.returncode == 0, out
        assert printed_address(out) == fake.address
        assert (bundle / "address").read_text() == fake.address
        assert host_processes(fake.run_dir) == []
        assert fake.socket.stat().st_ino == other_inode  # not unlinked and rebound
        other.settimeout(RUN_TIMEOUT)
        probe, _ = other.accept()  # start checked that the socket answers
        probe.close()


def test_start_after_host_stopped_starts_a_new_host(shim, fake):
    """After the host exits (SIGTERM, as the finalizer sends), the next start starts another."""
    bundle = fake.bundle("c1")
    first = run_shim(shim, fake, bundle, *start_args("c1"), combined=True)
    assert first.returncode == 0, first.stdout
    pid = int((fake.run_dir / "host.pid").read_text())
    # Serving means its SIGTERM handler is installed: it will exit cleanly.
    assert ttrpc_status(fake.socket, "layotto.test.NoSuchService", "Nothing").code == 12
    stop_hosts(fake.run_dir)
    assert host_processes(fake.run_dir) == []
    assert wait_exited(pid, 0)

    bundle2 = fake.bundle("c2")
    second = run_shim(shim, fake, bundle2, *start_args("c2"), combined=True)
    assert second.returncode == 0, second.stdout
    assert printed_address(second.stdout) == fake.address
    new_pid = int((fake.run_dir / "host.pid").read_text())
    assert new_pid != pid
    assert [p.pid for p in host_processes(fake.run_dir)] == [new_pid]
    assert ttrpc_status(fake.socket, "layotto.test.NoSuchService", "Nothing").code == 12

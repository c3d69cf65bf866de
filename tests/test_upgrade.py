"""Rolling upgrades of a node with tenants running (issue 13).

The node is laid out as the node installer lays it out: each version in a directory of its
own (``opt/layotto-<version>/``: the shim and the Python it runs), ``opt/layotto`` a
symlink to the installed one, and on containerd's PATH a wrapper that execs
``opt/layotto/containerd-shim-layotto-v1``. Version A is this checkout's shim as it is;
version B is the same shim with another version string (the one line that sets it), so
installing B is switching the symlink, as the installer does. Each test runs its own
containerd, since it starts and ends node hosts.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from layotto.images import builder
from tests.conftest import SHIM_NAME, _started, _stop
from tests.containerd_env import Containerd
from tests.support import wait_for
from tests.test_deploy import FakeNode, payload  # noqa: F401 - payload: a fixture
from tests.test_host_exit import Events, exited_year, task_status

pytestmark = pytest.mark.integration

RUNTIME = "io.containerd.layotto.v1"
IMAGE = "docker.io/library/layotto-upgrade:latest"
MODULES = ("sleeper", "fn-hello")
VERSION_B = "0.1.0-next"
EXIT_TIMEOUT = 30.0

_ids = itertools.count()


def new_id(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_ids)}"


@dataclass
class Node:
    c: Containerd
    opt: Path
    version_a: str

    @property
    def run_dir(self) -> Path:
        return self.c.state / "layotto"

    def install(self, version: str) -> None:
        """Switch ``opt/layotto`` to ``version`` atomically (as install.sh does)."""
        tmp = self.opt / ".layotto.new"
        tmp.symlink_to(f"layotto-{version}")
        tmp.replace(self.opt / "layotto")

    def host_pid(self, version: str) -> int:
        return int((self.run_dir / version / "host.pid").read_text())

    def run(self, module: str, prefix: str) -> str:
        task_id = new_id(prefix)
        self.c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, task_id, f"/{module}.wasm")
        assert task_status(self.c, task_id) == "RUNNING"
        return task_id

    def task_pid(self, task_id: str) -> int:
        for line in self.c.ctr("tasks", "ls").stdout.splitlines()[1:]:
            parts = line.split()
            if parts and parts[0] == task_id:
                return int(parts[1])
        raise AssertionError(f"no task {task_id}")

    def layotto(self, *args: str) -> subprocess.CompletedProcess[str]:
        layotto = Path(sys.executable).parent / "layotto"
        return subprocess.run(
            [str(layotto), *args, "--run-dir", str(self.run_dir)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def ps(self) -> dict[str, dict]:
        result = self.layotto("ps", "--json")
        assert result.returncode == 0, result.stderr
        return {row["id"]: row for row in json.loads(result.stdout)}

    def get(self, fid: str, conn: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.c.host_port("http"), timeout=30)
        try:
            conn.request("GET", "/", headers={"id": fid})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            if own:
                conn.close()

    def cleanup(self) -> None:
        for line in self.c.ctr("tasks", "ls", check=False).stdout.splitlines()[1:]:
            task_id = line.split()[0]
            self.c.ctr("tasks", "kill", "--signal", "SIGKILL", task_id, check=False)
        for line in self.c.ctr("containers", "ls", "-q", check=False).stdout.split():
            wait_for(lambda t=line: task_status(self.c, t) in ("STOPPED", ""), EXIT_TIMEOUT)
            self.c.ctr("tasks", "delete", line, check=False)
            self.c.ctr("containers", "delete", line, check=False)


class Client:
    """Requests for one function on a thread, each on a new connection, until stopped."""

    def __init__(self, node: Node, fid: str, port: int) -> None:
        self.node, self.fid, self.port = node, fid, port
        self.failures: list[object] = []
        self.after_switch = 0  # requests answered once the new host's pid file exists
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pid_file = self.node.run_dir / VERSION_B / "host.pid"
        while not self._stop.is_set():
            switched = pid_file.exists()
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                reply: object = self.node.get(self.fid, conn)
            except OSError as exc:
                reply = exc
            finally:
                conn.close()
            if not isinstance(reply, tuple) or reply[0] != 200:
                self.failures.append(reply)
            elif switched:
                self.after_switch += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def shim_with_version(source: str, version: str) -> str:
    text, count = re.subn(r"(?m)^LAYOTTO_SHIM_VERSION=.*$", f"LAYOTTO_SHIM_VERSION={version}", source)
    assert count == 1, "the shim sets its version on one line"
    return text


def install_version(opt: Path, shim_text: str, version: str) -> None:
    """``opt/layotto-<version>/``: the shim, and the python3 it runs (this venv's)."""
    home = opt / f"layotto-{version}"
    home.mkdir(parents=True)
    shim = home / SHIM_NAME
    shim.write_text(shim_with_version(shim_text, version))
    shim.chmod(0o755)
    python = home / "python3"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)


@pytest.fixture
def node(project_bin: Path, wasm_dir: Path) -> Iterator[Node]:
    base = Path(tempfile.mkdtemp(prefix="lupg-", dir="/tmp"))
    shim_text = (project_bin / SHIM_NAME).read_text()
    found = re.search(r"(?m)^LAYOTTO_SHIM_VERSION=(.*)$", shim_text)
    assert found is not None
    version_a = found.group(1)
    opt = base / "opt"
    for version in (version_a, VERSION_B):
        install_version(opt, shim_text, version)
    (opt / "layotto").symlink_to(f"layotto-{version_a}")
    bin_dir = base / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / SHIM_NAME
    wrapper.write_text(f'#!/bin/sh\nexec {opt}/layotto/{SHIM_NAME} "$@"\n')
    wrapper.chmod(0o755)
    c = _started(path_prepend=[bin_dir], cri=False)
    n = Node(c, opt, version_a)
    try:
        files = {f"/{m}.wasm": wasm_dir / f"{m}.wasm" for m in MODULES}
        builder.build_image(base / "img.tar", files, name=IMAGE, cmd=["/sleeper.wasm"])
        c.import_image(base / "img.tar")
        yield n
    finally:
        try:
            n.cleanup()
        finally:
            hosts = host_processes(n.run_dir)
            _stop(c)
            for proc in hosts:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
            shutil.rmtree(base, ignore_errors=True)


def host_processes(run_dir: Path) -> list[psutil.Process]:
    """Every node host of this node's containerd (whatever its version)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if "layotto.host" in cmdline and str(run_dir) in cmdline:
            found.append(proc)
    return found


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize(("grace", "status"), [("10", 143), ("0", 137)])
def test_upgrade_with_tenants_running_then_drain_the_old_host(node: Node, grace: str, status: int) -> None:
    a, b = node.version_a, VERSION_B
    events = Events(node.c)
    try:
        fn_a, cmd_a = node.run("fn-hello", "fn-a"), node.run("sleeper", "cmd-a")
        assert node.get(fn_a)[0] == 200
        # A client's keep-alive connection, opened before the upgrade (it stays with A's host).
        early = http.client.HTTPConnection("127.0.0.1", node.c.host_port("http"), timeout=30)
        assert node.get(fn_a, early)[0] == 200
        pid_a = node.host_pid(a)
        port = node.c.host_port("http")

        # A client opening a new connection per request all through the switch: the port
        # is handed from host to host, so none is refused and every answer is A's function's.
        client = Client(node, fn_a, port)
        node.install(b)
        fn_b, cmd_b = node.run("fn-hello", "fn-b"), node.run("sleeper", "cmd-b")
        pid_b = node.host_pid(b)
        wait_for(lambda: client.after_switch >= 20, what="requests after the switch")
        client.stop()
        assert client.failures == [], client.failures[:5]
        assert not gone(pid_a) and not gone(pid_b) and pid_b != pid_a
        # containerd keeps talking to each task's own host.
        assert [node.task_pid(t) for t in (fn_a, cmd_a, fn_b, cmd_b)] == [pid_a, pid_a, pid_b, pid_b]
        assert os.readlink(node.run_dir / "current") == b
        rows = node.ps()
        assert {t: rows[t]["version"] for t in (fn_a, cmd_a, fn_b, cmd_b)} == {
            fn_a: a,
            cmd_a: a,
            fn_b: b,
            cmd_b: b,
        }
        table = node.layotto("ps")
        assert table.returncode == 0, table.stderr
        lines = [line.split() for line in table.stdout.splitlines()]
        column = lines[0].index("VERSION")
        assert {row[2]: row[column] for row in lines[1:]} == {fn_a: a, cmd_a: a, fn_b: b, cmd_b: b}
        # Both versions serve on the node's one port (B took A's listening socket over).
        assert node.c.host_port("http") == port
        for fid in (fn_a, fn_b):
            reply = node.get(fid)
            assert reply[0] == 200, (fid, reply)
        assert node.get("no-such-function")[0] == 404
        # The connection opened before the upgrade reaches functions of both versions too.
        assert node.get(fn_b, early)[0] == 200
        assert node.get(fn_a, early)[0] == 200
        early.close()
        assert node.layotto("logs", fn_a).returncode == 0

        # Without --version, drain drains every host but the current one: A's.
        drained = node.layotto("drain", "--grace", grace)
        assert drained.returncode == 0, drained.stderr
        assert f"draining the layotto {a} host (pid {pid_a}): 2 task(s)" in drained.stdout
        assert gone(pid_a)
        for task_id in (fn_a, cmd_a):
            exits = wait_for(lambda t=task_id: events.of(t, "/tasks/exit"), EXIT_TIMEOUT, what="exit event")
            # The host's own report (its pid), and containerd's after the host went, if any.
            assert {e.get("exit_status", 0) for e in exits} == {status}, exits
            assert all(exited_year(e) >= 2025 for e in exits), exits
            assert exits[0].get("pid") == pid_a, exits
        # B keeps serving; A's tasks are stopped with the status they were reported with.
        assert node.get(fn_b)[0] == 200
        assert node.get(fn_a)[0] == 404
        assert not gone(pid_b)
        assert {r["version"] for r in node.ps().values()} == {b}
        for task_id in (fn_a, cmd_a):
            wait_for(lambda t=task_id: task_status(node.c, t) in ("STOPPED", ""), EXIT_TIMEOUT)
            deleted = node.c.ctr("tasks", "delete", task_id, check=False)
            assert deleted.returncode == 0 or "not found" in deleted.stderr, deleted.stderr
    finally:
        events.close()


def test_the_old_host_exits_with_its_last_task_and_the_current_one_stays(node: Node) -> None:
    a, b = node.version_a, VERSION_B
    cmd_a = node.run("sleeper", "cmd-a")
    pid_a = node.host_pid(a)
    node.install(b)
    cmd_b = node.run("sleeper", "cmd-b")
    pid_b = node.host_pid(b)
    assert not gone(pid_a), "A's host keeps running while it has a task"

    node.c.ctr("tasks", "kill", "--signal", "SIGTERM", cmd_a)
    wait_for(lambda: gone(pid_a), EXIT_TIMEOUT, what="the retired host's exit after its last task")
    wait_for(lambda: task_status(node.c, cmd_a) in ("STOPPED", ""), EXIT_TIMEOUT)
    node.c.ctr("tasks", "delete", cmd_a, check=False)
    node.c.ctr("containers", "delete", cmd_a)

    node.c.ctr("tasks", "kill", "--signal", "SIGTERM", cmd_b)
    wait_for(lambda: task_status(node.c, cmd_b) == "STOPPED", EXIT_TIMEOUT)
    node.c.ctr("tasks", "delete", cmd_b)
    node.c.ctr("containers", "delete", cmd_b)
    # The current host is idle now, and stays: it answers, and the next container uses it.
    status, info = admin_host(node.run_dir / b)
    assert (status, info["current"], info["tasks"]) == (200, True, 0)
    assert node.layotto("drain").stdout.startswith("layotto drain: nothing to drain")
    unknown = node.layotto("drain", "--version", "7.7.7")
    assert unknown.returncode == 1
    assert f"no live host of version 7.7.7 (live: {b})" in unknown.stderr
    negative = node.layotto("drain", "--grace", "-1")
    assert negative.returncode == 2 and "-1 seconds: must be 0 or more" in negative.stderr
    again = node.run("sleeper", "cmd-b2")
    assert node.task_pid(again) == pid_b and not gone(pid_b)


def admin_host(run_dir: Path) -> tuple[int, dict]:
    from layotto.host.cli import admin_get

    return admin_get(run_dir, "/host")


def test_a_bad_version_is_refused_with_its_cause(node: Node) -> None:
    bad = node.opt / "layotto-bad"
    shutil.copytree(node.opt / f"layotto-{node.version_a}", bad)
    shim = bad / SHIM_NAME
    shim.write_text(shim_with_version(shim.read_text(), "../x"))
    node.install("bad")
    result = node.c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, new_id("bad"), "/sleeper.wasm", check=False)
    assert result.returncode != 0
    assert "bad layotto version '../x'" in result.stderr


def test_roll_back_to_an_old_host_still_running(node: Node) -> None:
    """Installing the old version again while its host still runs: the next container goes
    to that host, which becomes the current one again (the port comes back to it) and
    retires the newer host, which exits with its last task."""
    a, b = node.version_a, VERSION_B
    cmd_a = node.run("sleeper", "cmd-a")
    pid_a = node.host_pid(a)
    node.install(b)
    fn_b = node.run("fn-hello", "fn-b")
    pid_b = node.host_pid(b)
    reply = node.get(fn_b)
    assert reply[0] == 200, reply

    node.install(a)
    fn_a = node.run("fn-hello", "fn-a")
    assert node.task_pid(fn_a) == pid_a and node.task_pid(cmd_a) == pid_a
    assert os.readlink(node.run_dir / "current") == a
    assert admin_host(node.run_dir / a)[1]["current"] is True
    assert admin_host(node.run_dir / b)[1]["retired"] is True
    for fid in (fn_a, fn_b):  # both answer on the node's port, now A's again
        assert node.get(fid)[0] == 200, fid

    node.c.ctr("tasks", "kill", "--signal", "SIGKILL", fn_b)
    wait_for(lambda: gone(pid_b), EXIT_TIMEOUT, what="the newer host's exit after its last task")
    assert node.get(fn_a)[0] == 200
    assert not gone(pid_a)


# --------------------------------------------------------------------------- the installer's upgrade path


@pytest.fixture
def fake_node(tmp_path: Path, payload: Path) -> FakeNode:  # noqa: F811 - test_deploy's fixture
    return FakeNode(tmp_path, payload)


def test_the_installer_upgrades_beside_and_rolls_back(fake_node: FakeNode) -> None:
    """install.sh puts a new version beside the old one and switches the symlink (the
    switch is the upgrade: the next container starts a host of the new version); the old
    directory stays, so installing the old version again points the symlink back."""
    fake_node.run()
    old = fake_node.path("/etc/layotto/installed").read_text().split("\n")[0].removeprefix("version=")
    upgraded = fake_node.run(LAYOTTO_VERSION="9.0.0")
    assert os.readlink(fake_node.path("/opt/layotto")) == "layotto-9.0.0"
    assert fake_node.path(f"/opt/layotto-{old}/bin/{SHIM_NAME}").is_file()
    assert (
        f"switched from layotto {old}: containers running now stay in the {old} node host" in upgraded.stdout
    )
    assert "/opt/layotto/bin/layotto drain --grace 30" in upgraded.stdout
    assert fake_node.restarts() == []  # the config did not change: containerd is not restarted

    back = fake_node.run(LAYOTTO_VERSION=old)
    assert f"/opt/layotto-{old} is already installed" in back.stdout
    assert os.readlink(fake_node.path("/opt/layotto")) == f"layotto-{old}"
    assert "switched from layotto 9.0.0" in back.stdout
    assert fake_node.run(LAYOTTO_VERSION=old).stdout.count("switched") == 0  # again: no change

"""Function (reactor) modules behind the node host's HTTP ingress, against a real containerd.

Every test starts its functions with `ctr run -d --runtime io.containerd.layotto.v1` from one
image holding every function module (fn-hello, fn_echo, fn_misbehave, fn_badresp; see
abi/http.md and tests/modules/fn_*.c), talks to the host's ingress over plain HTTP
(http.client) and reads `layotto ps`, `layotto logs` and the Prometheus endpoint. Each
private containerd's host binds free ports, found with Containerd.host_port().
"""

from __future__ import annotations

import collections
import http.client
import itertools
import json
import os
import re
import select
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from layotto.host.cli import admin_get
from layotto.images import builder
from tests.conftest import find_host_process
from tests.containerd_env import Containerd, mounts_under
from tests.support import wait_for

pytestmark = pytest.mark.integration

RUNTIME = "io.containerd.layotto.v1"
IMAGE = "docker.io/library/layotto-fnmods:latest"
MODULES = ("fn-hello", "fn_echo", "fn_misbehave", "fn_badresp", "fn_work", "sleeper")  # sleeper: a command
BODY_LIMIT = 4 << 20  # the host's default request body limit (host/ingress.py)

_ids = itertools.count()


def new_id(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_ids)}"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fn_images(containerd: Containerd, wasm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Containerd:
    """The private containerd with one image holding every function module."""
    missing = [m for m in MODULES if not (wasm_dir / f"{m}.wasm").is_file()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing in {wasm_dir}: run `make modules` first", pytrace=False)
    out = tmp_path_factory.mktemp("fn-images")
    files = {f"/{m}.wasm": wasm_dir / f"{m}.wasm" for m in MODULES}
    builder.build_image(out / "fn.tar", files, name=IMAGE, cmd=["/fn-hello.wasm"])
    containerd.import_image(out / "fn.tar")
    return containerd


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float


@dataclass
class Node:
    """The containerd under test, its node host's ports and the tasks a test started."""

    c: Containerd
    tasks: list[str] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return self.c.state / "layotto"

    @property
    def port(self) -> int:
        return self.c.host_port("http")

    @property
    def metrics_port(self) -> int:
        return self.c.host_port("metrics")

    # ---- containers

    def start(self, module: str, *opts: str, fid: str | None = None, task_id: str | None = None) -> str:
        """`ctr run -d` a function module; returns the task id (also its function id
        unless ``fid`` names one through the layotto.io/function-id annotation)."""
        task_id = task_id or new_id(module.replace("_", "-"))
        if fid is not None:
            opts = ("--annotation", f"layotto.io/function-id={fid}", *opts)
        self.tasks.append(task_id)
        self.c.ctr("run", "-d", "--runtime", RUNTIME, *opts, IMAGE, task_id, f"/{module}.wasm")
        assert self.task_status(task_id) == "RUNNING"
        return task_id

    def task_status(self, task_id: str) -> str:
        for line in self.c.ctr("tasks", "ls").stdout.splitlines()[1:]:
            parts = line.split()
            if parts and parts[0] == task_id:
                return parts[-1]
        return ""

    def cleanup(self) -> None:
        for task_id in self.tasks:
            self.c.ctr("tasks", "kill", "--signal", "SIGKILL", task_id, check=False)
        for task_id in self.tasks:
            wait_for(lambda t=task_id: self.task_status(t) in ("STOPPED", ""))
            self.c.ctr("tasks", "delete", task_id, check=False)
            self.c.ctr("containers", "delete", task_id, check=False)

    # ---- HTTP

    def get(
        self,
        path: str,
        *,
        fid: str | None = None,
        method: str = "GET",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        conn: http.client.HTTPConnection | None = None,
        timeout: float = 30,
    ) -> Reply:
        """One request to the ingress (``fid``: sent as the ``id`` header)."""
        own = conn is None
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        hdrs = dict(headers or {})
        if fid is not None:
            hdrs["id"] = fid
        try:
            began = time.perf_counter()
            conn.request(method, path, body=body, headers=hdrs)
            response = conn.getresponse()
            data = response.read()
            seconds = time.perf_counter() - began
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data, seconds)
        finally:
            if own:
                conn.close()

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    # ---- observability

    def tasks_info(self) -> dict[str, dict]:
        """`layotto ps --json` rows by task id (straight from the admin socket)."""
        status, rows = admin_get(self.run_dir, "/tasks")
        assert status == 200
        return {row["id"]: row for row in rows}

    def layotto(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [layotto_cli(), *args, "--run-dir", str(self.run_dir)],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Every sample of /metrics, keyed by (sample name, labels)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            text = response.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, frozenset(s.labels.items()))] = s.value
        return samples

    def host_log(self) -> str:
        return (self.run_dir / "host.log").read_text(errors="replace")


def layotto_cli() -> str:
    beside = Path(sys.executable).parent / "layotto"
    found = str(beside) if beside.exists() else shutil.which("layotto")
    if not found:
        pytest.fail(f"the `layotto` command is neither next to {sys.executable} nor on PATH", pytrace=False)
    return found


def sample(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
def node(fn_images: Containerd) -> Iterator[Node]:
    n = Node(fn_images)
    try:
        yield n
    finally:
        n.cleanup()


def latencies(node: Node, fid: str, count: int) -> list[float]:
    """Latencies of ``count`` fn-hello requests on one keep-alive connection, each checked."""
    conn = node.connection()
    try:
        result = []
        for i in range(count):
            r = node.get(f"/?name=n{i}", fid=fid, conn=conn)
            assert (r.status, r.body) == (200, f"Hello, n{i}!\n".encode())
            result.append(r.seconds)
        return result
    finally:
        conn.close()


# --------------------------------------------------------------------------- routing and lifecycle


def test_function_serves_by_id_header_and_path_until_killed(node: Node) -> None:
    fid = new_id("hello")
    task = node.start("fn-hello", fid=fid)
    # Registered by the time `ctr run -d` returns: no waiting.
    r = node.get("/?name=Ada", fid=fid)
    assert (r.status, r.body) == (200, b"Hello, Ada!\n")
    assert r.headers["content-type"] == "text/plain"
    assert node.get("/anything/else?name=Bob", fid=fid).body == b"Hello, Bob!\n"
    assert node.get(f"/fn/{fid}/x/y?name=Cy").body == b"Hello, Cy!\n"
    assert node.get(f"/fn/{fid}?name=Di").body == b"Hello, Di!\n"
    assert node.get(f"/fn/{fid}/").body == b"Hello, world!\n"
    # The function id is the annotation's, not the task id.
    assert node.get("/", fid=task).status == 404
    # Unknown ids, and requests that name no function at all.
    for reply in (
        node.get("/", fid="no-such-function"),
        node.get("/fn/no-such-function/"),
        node.get("/fn/"),
        node.get(f"/{fid}/?name=x"),
        node.get("/"),
    ):
        assert reply.status == 404, reply
        assert b"Hello" not in reply.body
    assert node.task_status(task) == "RUNNING"
    row = node.tasks_info()[task]
    assert (row["kind"], row["state"], row["function_id"], row["exit_status"]) == (
        "function",
        "running",
        fid,
        None,
    )

    node.c.ctr("tasks", "kill", task)  # SIGTERM
    wait_for(lambda: node.task_status(task) == "STOPPED")
    assert node.get("/", fid=fid).status == 404
    assert node.get(f"/fn/{fid}/").status == 404
    row = node.tasks_info()[task]
    assert (row["state"], row["exit_status"]) == ("stopped", 143)
    # containerd recorded the exit status too (ctr 1.6 warns about a non-zero one).
    deleted = node.c.ctr("tasks", "delete", task)
    assert "exit code 143" in deleted.stderr, deleted.stderr
    node.c.ctr("containers", "delete", task)
    assert node.task_status(task) == ""
    assert task not in node.tasks_info()


def test_a_function_is_served_without_its_rootfs_mounted(node: Node) -> None:
    # The module is read from the snapshot's layers; a command module (hello, in the same
    # image) still gets its rootfs mounted, since its WASI preopens it.
    task = node.start("fn-hello")
    assert node.get("/?name=M", fid=task).body == b"Hello, M!\n"
    bundle = node.c.state / "io.containerd.runtime.v2.task" / "default" / task
    assert mounts_under(bundle) == []
    assert not (bundle / ".layotto-mounted").exists()
    command = new_id("cmd")
    node.c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, command, "/sleeper.wasm")
    try:
        assert mounts_under(node.c.state / "io.containerd.runtime.v2.task" / "default" / command)
    finally:
        node.c.ctr("tasks", "kill", "-s", "SIGKILL", command)
        wait_for(lambda: node.task_status(command) == "STOPPED")
        node.c.ctr("tasks", "delete", command)
        node.c.ctr("containers", "delete", command)


def test_task_without_function_id_annotation_serves_under_its_task_id(node: Node) -> None:
    task = node.start("fn-hello")
    assert node.get("/?name=T", fid=task).body == b"Hello, T!\n"
    assert node.get(f"/fn/{task}/?name=U").body == b"Hello, U!\n"


def test_echo_sees_the_whole_request(node: Node) -> None:
    fid = new_id("echo")
    node.start("fn_echo", fid=fid)
    body = b"first line\nsecond\x00NUL\xff\xfe binary\r\n"
    r = node.get(
        f"/fn/{fid}/some/path?a=1&b=x%20y",
        method="POST",
        body=body,
        headers={"X-Custom-Header": "Mixed Value", "Content-Type": "application/octet-stream"},
    )
    assert r.status == 200
    assert r.headers["x-echo"] == "1"
    expected = b"method=POST\npath=/some/path\nquery=a=1&b=x%20y\nbody=" + body + b"\n"
    assert r.body.startswith(expected), r.body
    header_lines = r.body[len(expected) :].decode().splitlines()
    assert "h:x-custom-header=Mixed Value" in header_lines
    assert "h:content-type=application/octet-stream" in header_lines
    assert f"h:content-length={len(body)}" in header_lines
    assert all(
        line.startswith("h:") and line.split("=")[0] == line.split("=")[0].lower() for line in header_lines
    )

    # Routed by the id header, the function sees the whole path, /fn/... included.
    r = node.get("/fn/someone-else/p?q", fid=fid, method="PUT", body=b"")
    assert r.status == 200
    lines = r.body.decode().splitlines()
    assert lines[:4] == ["method=PUT", "path=/fn/someone-else/p", "query=q", "body="]
    assert f"h:id={fid}" in lines
    # /fn/<id> with nothing after it: the function sees "/".
    assert node.get(f"/fn/{fid}").body.decode().splitlines()[:3] == ["method=GET", "path=/", "query="]
    assert node.get(f"/fn/{fid}?k=v").body.decode().splitlines()[1:3] == ["path=/", "query=k=v"]

    # The function picks the status; its headers reach the client.
    for status in (201, 404, 418, 503):
        r = node.get(f"/fn/{fid}/s?status={status}")
        assert r.status == status
        assert r.headers["x-echo"] == "1"
        assert b"query=status=" in r.body
    # A large response body arrives whole.
    r = node.get(f"/fn/{fid}/?big=3000000")
    assert r.status == 200
    assert len(r.body) == 3_000_000 and r.body.count(b"x") == 3_000_000
    assert int(r.headers["content-length"]) == 3_000_000


def test_request_body_limit(node: Node) -> None:
    fid = new_id("echo")
    node.start("fn_echo", fid=fid)
    # Exactly at the limit: served (and echoed).
    body = bytes(range(256)) * (BODY_LIMIT // 256)
    r = node.get(f"/fn/{fid}/up", method="POST", body=body)
    assert r.status == 200
    assert body in r.body
    # Over the limit: 413 before the function runs.
    before = node.tasks_info()
    r = node.get(f"/fn/{fid}/up", method="POST", body=b"z" * (5 << 20))
    assert r.status == 413, r
    assert b"zzz" not in r.body
    after = node.tasks_info()
    task = next(t for t, row in after.items() if row.get("function_id") == fid)
    assert after[task]["invocations"] == before[task]["invocations"]
    # The function and the ingress go on serving.
    r = node.get(f"/fn/{fid}/again", method="POST", body=b"small")
    assert r.status == 200 and b"body=small\n" in r.body


# --------------------------------------------------------------------------- failures


def test_trap_answers_500_logs_it_and_replaces_the_instance(node: Node) -> None:
    fid = new_id("misbehave")
    task = node.start("fn_misbehave", "--annotation", "layotto.io/instances=1", fid=fid)
    assert [node.get("/count", fid=fid).body for _ in range(3)] == [b"1\n", b"2\n", b"3\n"]
    r = node.get("/trap", fid=fid)
    assert r.status == 500
    assert b"trap" in r.body and b"unreachable" in r.body, r.body
    # The host log names the function and the trap.
    wait_for(lambda: any(fid in line and "unreachable" in line for line in node.host_log().splitlines()))
    # The next request is served by a new instance: its counter starts again.
    assert node.get("/count", fid=fid).body == b"1\n"
    assert node.get("/count", fid=fid).body == b"2\n"
    assert node.task_status(task) == "RUNNING"
    # `layotto logs` shows the trap, by function id and by task id.
    for name in (fid, task):
        out = node.layotto("logs", name)
        assert out.returncode == 0, out.stderr
        assert any("trap" in line and "unreachable" in line for line in out.stdout.splitlines()), out.stdout


def test_handler_failure_status_answers_500(node: Node) -> None:
    fid = new_id("misbehave")
    node.start("fn_misbehave", "--annotation", "layotto.io/instances=1", fid=fid)
    r = node.get("/fail", fid=fid)
    assert r.status == 500
    assert b"status 1" in r.body
    assert node.get("/", fid=fid).body == b"ok\n"


def test_loop_times_out_with_504_and_the_function_stays_usable(node: Node) -> None:
    fid = new_id("loop")
    task = node.start("fn_misbehave", "--annotation", "layotto.io/timeout=1", fid=fid)
    r = node.get("/loop", fid=fid, timeout=30)
    assert r.status == 504, r
    assert 0.9 <= r.seconds < 5, r.seconds
    assert node.get("/", fid=fid).body == b"ok\n"
    # Again, now that the function runs on worker threads.
    r = node.get("/loop", fid=fid, timeout=30)
    assert r.status == 504 and 0.9 <= r.seconds < 5, r
    assert node.get("/count", fid=fid).status == 200
    row = node.tasks_info()[task]
    assert row["state"] == "running"
    assert row["errors"] == 2
    assert row["invocations"] == 4


def _in_flight(
    node: Node, fid: str, path: str, result: list[Reply], stop: threading.Event
) -> threading.Thread:
    """Sends ``path`` to ``fid`` over and over (one at a time) until ``stop`` is set."""

    def run() -> None:
        conn = node.connection()
        try:
            while not stop.is_set():
                result.append(node.get(path, fid=fid, conn=conn))
                if result[-1].headers.get("connection") == "close":
                    conn.close()
                    conn = node.connection()
        finally:
            conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_looping_function_does_not_slow_another_function(node: Node) -> None:
    hello = new_id("hello")
    loop = new_id("loop")
    node.start("fn-hello", fid=hello)
    loop_task = node.start("fn_misbehave", "--annotation", "layotto.io/timeout=1", fid=loop)
    latencies(node, hello, 20)  # warm up
    before = latencies(node, hello, 50)

    replies: list[Reply] = []
    looping = threading.Thread(target=lambda: replies.append(node.get("/loop", fid=loop)), daemon=True)
    looping.start()
    # The first /loop call runs inline for at most its budget, then moves to a worker thread.
    wait_for(lambda: node.tasks_info()[loop_task]["mode"] == "workers", timeout=5, interval=0.005)
    during = latencies(node, hello, 50)
    assert looping.is_alive(), "the /loop request ended before the measurement did"
    looping.join(timeout=10)
    assert [r.status for r in replies] == [504]
    # One outlier on this shared 2-core machine (scheduling, a garbage collection) is
    # noise; a neighbour that holds the event loop shows in the second-worst latency too.
    assert sorted(during)[-2] < 0.1 and max(during) < 0.5, (
        f"fn-hello latency while another function loops: max {max(during) * 1000:.1f} ms, "
        f"median {statistics.median(during) * 1000:.2f} ms (before: max {max(before) * 1000:.1f} ms, "
        f"median {statistics.median(before) * 1000:.2f} ms)"
    )
    assert statistics.median(during) < max(0.01, 5 * statistics.median(before))


@pytest.mark.parametrize(
    ("path", "opts", "status"),
    [
        ("/trap", (), 500),
        ("/oom", ("--annotation", "layotto.io/instance-mode=fresh"), 507),
        ("/loop", ("--annotation", "layotto.io/timeout=0.2"), 504),
    ],
)
def test_misbehaving_neighbour_does_not_move_latency(
    node: Node, path: str, opts: tuple[str, ...], status: int
) -> None:
    hello = new_id("hello")
    bad = new_id("bad")
    node.start("fn-hello", fid=hello)
    node.start("fn_misbehave", *opts, fid=bad)
    latencies(node, hello, 20)
    before = latencies(node, hello, 50)
    replies: list[Reply] = []
    stop = threading.Event()
    thread = _in_flight(node, bad, path, replies, stop)
    try:
        wait_for(lambda: len(replies) >= 2, timeout=15)
        done_before = len(replies)
        during = latencies(node, hello, 50)
        done_during = len(replies) - done_before
    finally:
        stop.set()
        thread.join(timeout=15)
    assert {r.status for r in replies} == {status}, collections.Counter(r.status for r in replies)
    if path != "/loop":  # a /loop request outlasts the 50 requests: then none ends meanwhile
        assert done_during >= 1, "no misbehaving request ran during the measurement"
    # One outlier on this shared 2-core machine (scheduling, a garbage collection) is
    # noise; a neighbour that holds the event loop shows in the second-worst latency too.
    assert sorted(during)[-2] < 0.1 and max(during) < 0.5, (
        f"fn-hello latency during {path}: max {max(during) * 1000:.1f} ms, median "
        f"{statistics.median(during) * 1000:.2f} ms (before: max {max(before) * 1000:.1f} ms)"
    )
    # The misbehaving function itself still serves.
    assert node.get("/", fid=bad).body == b"ok\n"


def test_kill_answers_queued_requests_503(node: Node) -> None:
    """Killing a function whose requests wait in its queue answers them 503 ("function
    stopped"), not a host error; the request already running ends normally or with 503."""
    fid = new_id("killq")
    hello = new_id("hello")
    task = node.start("fn_misbehave", "--annotation", "layotto.io/instances=1", fid=fid)
    node.start("fn-hello", fid=hello)
    assert node.get("/sleep?ms=50", fid=fid).status == 200
    wait_for(lambda: node.tasks_info()[task]["mode"] == "workers")
    log_size = len(node.host_log())
    request = f"GET /fn/{fid}/sleep?ms=2000 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode()
    socks = [socket.create_connection(("127.0.0.1", node.port), timeout=30) for _ in range(4)]
    try:
        for s in socks:
            s.sendall(request)
        # Answered after the four were read (the event loop reads in arrival order):
        # one of them now runs, three wait.
        assert node.get("/?name=sentinel", fid=hello).status == 200
        node.c.ctr("tasks", "kill", task)
        wait_for(lambda: node.task_status(task) == "STOPPED")
        replies = []
        for s in socks:
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            replies.append(data)
    finally:
        for s in socks:
            s.close()
    statuses = sorted(int(r.split(b" ", 2)[1]) for r in replies)
    assert statuses in ([200, 503, 503, 503], [503, 503, 503, 503]), replies
    assert all(r.endswith(b"function stopped\n") for r in replies if r.startswith(b"HTTP/1.1 503 ")), replies
    assert "Traceback" not in node.host_log()[log_size:]


def _oom_mib(reply: Reply) -> int:
    assert reply.status == 507, reply
    m = re.fullmatch(rb"oom after (\d+) MiB\n", reply.body)
    assert m, reply.body
    return int(m.group(1))


def test_memory_cap_from_the_pod_limit(node: Node) -> None:
    fid = new_id("oom")
    node.start("fn_misbehave", "--memory-limit", str(32 << 20), fid=fid)
    mib = _oom_mib(node.get("/oom", fid=fid))
    assert 16 <= mib < 32
    assert node.get("/count", fid=fid).status == 200


def test_default_memory_cap_is_128_mib(node: Node) -> None:
    fid = new_id("oom")
    node.start("fn_misbehave", fid=fid)
    mib = _oom_mib(node.get("/oom", fid=fid))
    assert 64 <= mib < 128
    assert node.get("/count", fid=fid).status == 200


def test_response_outside_linear_memory_answers_500(node: Node, fn_images: Containerd) -> None:
    host = find_host_process(fn_images)
    fid = new_id("badresp")
    hello = new_id("hello")
    node.start("fn_badresp", fid=fid)
    node.start("fn-hello", fid=hello)
    for _ in range(3):
        r = node.get("/", fid=fid)
        assert r.status == 500
        assert b"outside linear memory" in r.body, r.body
    assert node.get("/?name=still", fid=hello).body == b"Hello, still!\n"
    assert find_host_process(fn_images).pid == host.pid


# --------------------------------------------------------------------------- instances and queueing


def test_instances_are_reused_by_default(node: Node) -> None:
    fid = new_id("reuse")
    node.start("fn_misbehave", "--annotation", "layotto.io/instances=1", fid=fid)
    assert [node.get("/count", fid=fid).body for _ in range(5)] == [b"%d\n" % i for i in range(1, 6)]


def test_fresh_instance_per_request(node: Node) -> None:
    fid = new_id("fresh")
    node.start("fn_misbehave", "--annotation", "layotto.io/instance-mode=fresh", fid=fid)
    assert [node.get("/count", fid=fid).body for _ in range(5)] == [b"1\n"] * 5


def _flood(node: Node, path: str, count: int) -> tuple[list[tuple[int, float]], float]:
    """``count`` concurrent requests, one connection each, all sent before any reply is
    read. Returns (status, seconds from the first send to the reply) per request, in the
    order sent, and the seconds the sending took."""
    request = f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode()
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    replies: dict[socket.socket, tuple[int, float]] = {}
    began = time.monotonic()
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", node.port), timeout=30)
            socks.append(s)
            s.sendall(request)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, bytearray())
        sent = time.monotonic() - began
        while len(replies) < count:
            assert time.monotonic() - began < 120, f"{count - len(replies)} requests still unanswered"
            for key, _ in sel.select(timeout=1):
                s = key.fileobj
                try:
                    chunk = s.recv(65536)
                except ConnectionError:
                    chunk = b""
                if chunk:
                    key.data.extend(chunk)
                    continue
                sel.unregister(s)
                head = bytes(key.data).split(b" ", 2)
                replies[s] = (int(head[1]) if len(head) > 1 else 0, time.monotonic() - began)
        return [replies[s] for s in socks], sent
    finally:
        sel.close()
        for s in socks:
            s.close()


def test_busy_function_queue_is_bounded(node: Node) -> None:
    """One instance and the default queue of 1024: of 1300 concurrent slow requests, one
    runs, 1024 wait, and the rest get 503 at once (not after waiting)."""
    queue_limit = 1024  # Function.queue_limit's default; no annotation changes it
    service = 0.005
    count = 1300
    fid = new_id("queue")
    task = node.start("fn_misbehave", "--annotation", "layotto.io/instances=1", fid=fid)
    # Move it to its worker thread first (a call longer than the inline budget).
    assert node.get("/sleep?ms=50", fid=fid).status == 200
    wait_for(lambda: node.tasks_info()[task]["mode"] == "workers")
    host = find_host_process(node.c)
    assert host is not None
    rss = host.memory_info().rss
    replies, sent = _flood(node, f"/fn/{fid}/sleep?ms={int(service * 1000)}", count)
    statuses = collections.Counter(status for status, _ in replies)
    assert set(statuses) == {200, 503}, statuses
    ok = statuses[200]
    # All that were queued when it was full ran; beyond them, only those that found a
    # place freed by a request finishing while the burst was still arriving.
    assert queue_limit + 1 <= ok <= queue_limit + 1 + (sent + 0.5) / service + 2, (statuses, sent)
    rejected = [seconds for status, seconds in replies if status == 503]
    served = [seconds for status, seconds in replies if status == 200]
    assert max(rejected) < sent + 2, "503s must not wait for the queue"
    assert max(served) >= queue_limit * service  # really one at a time
    assert host.memory_info().rss - rss < 64 << 20
    assert node.get("/count", fid=fid).status == 200
    row = node.tasks_info()[task]
    assert row["invocations"] == 1 + count + 1
    assert row["errors"] == statuses[503]


def test_pipelined_flood_on_one_connection_does_not_grow_memory(node: Node) -> None:
    """Requests pipelined on one keep-alive connection to a busy function must not pile
    up in the host: 60 bodies of 4 MiB (240 MiB) are refused, answered 503 or left unread
    (TCP back-pressure), never all buffered."""
    fid = new_id("pipeline")
    task = node.start("fn_misbehave", "--annotation", "layotto.io/instances=1", fid=fid)
    assert node.get("/sleep?ms=50", fid=fid).status == 200
    wait_for(lambda: node.tasks_info()[task]["mode"] == "workers")
    host = find_host_process(node.c)
    assert host is not None
    rss = host.memory_info().rss
    body = b"b" * (BODY_LIMIT - 1024)
    data = f"GET /fn/{fid}/sleep?ms=5000 HTTP/1.1\r\nhost: x\r\n\r\n".encode() + 60 * (
        f"POST /fn/{fid}/x HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body
    )
    view = memoryview(data)
    with socket.create_connection(("127.0.0.1", node.port), timeout=30) as s:
        s.setblocking(False)
        began = time.monotonic()
        sent = 0
        # Send until everything is out, or until the host stops reading for a second.
        while sent < len(data) and select.select([], [s], [], 1.0)[1]:
            try:
                sent += s.send(view[sent : sent + (1 << 20)])
            except BlockingIOError:
                continue
        growth = host.memory_info().rss - rss
        still_sleeping = time.monotonic() - began < 4.5
    assert still_sleeping, "the sending outlasted the busy request: nothing was measured"
    assert growth < 64 << 20, (
        f"the host buffered {growth >> 20} MiB of pipelined requests "
        f"({sent >> 20} of {len(data) >> 20} MiB sent)"
    )


# --------------------------------------------------------------------------- observability


def test_ps_logs_and_metrics(node: Node) -> None:
    hello = new_id("hello")
    bad = new_id("bad")
    hello_task = node.start("fn-hello", fid=hello)
    bad_task = node.start("fn_misbehave", "--annotation", "layotto.io/instances=1", fid=bad)
    for i in range(3):
        assert node.get(f"/?name={i}", fid=hello).status == 200
    assert node.get("/count", fid=bad).status == 200
    assert node.get("/trap", fid=bad).status == 500
    assert node.get("/fail", fid=bad).status == 500
    assert node.get("/count", fid=bad).status == 200
    assert node.get("/?status=x", fid=bad).status == 200

    out = node.layotto("ps", "--json")
    assert out.returncode == 0, out.stderr
    rows = {row["id"]: row for row in json.loads(out.stdout)}
    for task, fid, calls, errors in ((hello_task, hello, 3, 0), (bad_task, bad, 5, 2)):
        row = rows[task]
        assert row["kind"] == "function"
        assert row["state"] == "running"
        assert row["function_id"] == fid
        assert (row["invocations"], row["errors"]) == (calls, errors), row
        assert row["module"] == ("/fn-hello.wasm" if task == hello_task else "/fn_misbehave.wasm")
        assert row["memory"] > 0
        assert row["exit_status"] is None

    table = node.layotto("ps")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    # a container outside a pod (ctr): no pod, named by its id
    assert lines[0].split()[:5] == ["NAMESPACE", "POD", "CONTAINER", "KIND", "STATE"]
    assert "CALLS" in lines[0] and "ERRORS" in lines[0]
    hello_row = next(line.split() for line in lines if hello_task in line.split())
    bad_row = next(line.split() for line in lines if bad_task in line.split())
    assert hello_row[1:6] == ["-", hello_task, "function", "running", hello]
    assert bad_row[1:6] == ["-", bad_task, "function", "running", bad]
    assert hello_row[-2:] == ["3", "0"]
    assert bad_row[-2:] == ["5", "2"]

    logs = node.layotto("logs", bad)
    assert logs.returncode == 0, logs.stderr
    assert any("trap" in line for line in logs.stdout.splitlines()), logs.stdout
    missing = node.layotto("logs", "no-such-function-or-task")
    assert missing.returncode == 1
    assert "no task or function named" in missing.stderr

    m = node.metrics()
    inv = "layotto_function_invocations_total"
    assert sample(m, inv, function=hello, code="200") == 3
    assert sample(m, inv, function=bad, code="200") == 3
    assert sample(m, inv, function=bad, code="500") == 2
    assert sample(m, inv, function=hello, code="500") is None
    for fid, calls in ((hello, 3), (bad, 5)):
        assert sample(m, "layotto_function_latency_seconds_count", function=fid) == calls
        assert sample(m, "layotto_function_latency_seconds_sum", function=fid) > 0
        buckets = sorted(
            (float(dict(labels)["le"]), value)
            for (name, labels), value in m.items()
            if name == "layotto_function_latency_seconds_bucket" and dict(labels)["function"] == fid
        )
        assert len(buckets) >= 10
        assert buckets[-1] == (float("inf"), calls)
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
        assert sample(m, "layotto_function_instances", function=fid) == 1
    # The trap replaced an instance (a failure status may too).
    assert 1 <= sample(m, "layotto_function_instances_replaced_total", function=bad) <= 2
    assert sample(m, "layotto_function_instances_replaced_total", function=hello) == 0
    # CPU per function, as the scheduler charged it; no limit, so never throttled
    assert sample(m, "layotto_function_cpu_seconds_total", function=bad) > 0
    assert sample(m, "layotto_function_cpu_throttled_periods_total", function=hello) == 0
    assert sample(m, "layotto_function_queued", function=hello) == 0
    assert sample(m, "layotto_functions") >= 2

    # A second container of an already loaded module is a memory cache hit.
    cache = "layotto_module_cache_total"
    before = {r: sample(m, cache, result=r) for r in ("hit_memory", "hit_disk", "miss")}
    assert None not in before.values(), m.keys()
    node.start("fn-hello", fid=new_id("hello"))
    after = {r: sample(node.metrics(), cache, result=r) for r in ("hit_memory", "hit_disk", "miss")}
    assert after["hit_memory"] == before["hit_memory"] + 1
    assert (after["hit_disk"], after["miss"]) == (before["hit_disk"], before["miss"])


def test_two_containers_with_one_function_id_share_the_requests(node: Node) -> None:
    fid = new_id("shared")
    one = node.start("fn_misbehave", "--annotation", "layotto.io/instances=1", fid=fid)
    two = node.start("fn_misbehave", "--annotation", "layotto.io/instances=1", fid=fid)
    counts = [int(node.get("/count", fid=fid).body) for _ in range(10)]
    rows = node.tasks_info()
    a, b = rows[one]["invocations"], rows[two]["invocations"]
    assert a + b == 10
    assert a >= 3 and b >= 3, (a, b)  # round robin, not all to one
    # Each container's instance counted its own requests.
    assert sorted(counts) == sorted([*range(1, a + 1), *range(1, b + 1)])
    # Killing one leaves the other serving every request.
    node.c.ctr("tasks", "kill", one)
    wait_for(lambda: node.task_status(one) == "STOPPED")
    assert [int(node.get(f"/fn/{fid}/count").body) for _ in range(3)] == [b + 1, b + 2, b + 3]

"""Issue 9: the node host's HTTP ingress against hostile network clients.

One test per attack, each asserting the safe outcome. Attacks on the parser and the
connection bookkeeping run against an :class:`~layotto.host.ingress.Ingress` in this
process (on an event loop of its own thread, with small :class:`IngressLimits` so that
timeouts take a fraction of a second) serving real fn-hello / fn_echo / fn_misbehave /
fn_headers :class:`~layotto.host.function.Function`\\ s; the endless header, the descriptor
flood and the response-splitting function run against a real node host started by a private
containerd (``ctr run``). Two hypothesis tests throw arbitrary bytes at the parser (fed
straight into :class:`HttpProtocol` with a recording transport) and arbitrary headers at
:func:`render`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import resource
import select
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import httptools
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layotto.host.function import Function, Response
from layotto.host.function_registry import FunctionRegistry
from layotto.host.ingress import HttpProtocol, Ingress, IngressLimits, render
from layotto.host.runtime import NodeRuntime
from layotto.images import builder
from tests.conftest import find_host_process
from tests.containerd_env import Containerd
from tests.support import Recorder, wait_for

RUNTIME = "io.containerd.layotto.v1"
IMAGE = "docker.io/library/layotto-fnsec:latest"
MODULES = {"hello": "fn-hello", "echo": "fn_echo", "misbehave": "fn_misbehave", "headers": "fn_headers"}
FAST = IngressLimits(header_timeout=0.3, body_timeout=0.3, idle_timeout=0.3)


# --------------------------------------------------------------------------- raw HTTP


class Conn:
    """A raw client connection that reads responses off the byte stream itself, so that
    whatever the server writes is seen as written (a forged response included)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(1 << 16)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def response(self, head: bool = False) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        """The next response (status, headers, body), or None at EOF."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                assert not self.buf, f"the connection ended inside a response head: {self.buf[:200]!r}"
                return None
        head_bytes, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line, *lines = head_bytes.split(b"\r\n")
        version, status, _ = (status_line + b" ").split(b" ", 2)
        assert version == b"HTTP/1.1", status_line
        headers = []
        for line in lines:
            name, sep, value = line.partition(b":")
            assert sep and name and name == name.strip(), f"not a header line: {line!r}"
            headers.append((name.lower(), value.strip()))
        length = int(dict(headers).get(b"content-length", b"0"))
        if head or int(status) in (204, 304):
            length = 0
        while len(self.buf) < length:
            assert self._fill(), "the connection ended inside a response body"
        body, self.buf = self.buf[:length], self.buf[length:]
        return int(status), headers, body

    def until_eof(self, timeout: float = 10.0) -> bytes:
        """Everything left on the connection until the server closes it."""
        self.sock.settimeout(timeout)
        while self._fill():
            pass
        data, self.buf = self.buf, b""
        return data

    def close(self) -> None:
        self.sock.close()


def get(fid: str, path: str = "/", extra: bytes = b"", method: bytes = b"GET") -> bytes:
    return (
        method
        + b" "
        + path.encode()
        + b" HTTP/1.1\r\nhost: x\r\nid: "
        + fid.encode()
        + b"\r\n"
        + extra
        + b"\r\n"
    )


# --------------------------------------------------------------------------- an ingress in this process


@pytest.fixture(scope="module")
def functions(wasm_dir: Path) -> Iterator[dict[str, Function]]:
    """Real functions on fn-hello, fn_echo, fn_misbehave and fn_headers, built as the task
    service builds them (by id: hello, echo, misbehave, headers)."""
    missing = [m for m in MODULES.values() if not (wasm_dir / f"{m}.wasm").is_file()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing in {wasm_dir}: run `make modules` first", pytrace=False)
    runtime = NodeRuntime(None)
    built = {}
    for fid, module in MODULES.items():
        compiled = runtime.load(wasm_dir / f"{module}.wasm", name=module)
        built[fid] = Function(
            name=f"security/{fid}",
            function_id=fid,
            engine=runtime.engine,
            linker=runtime.linker,
            compiled=compiled,
            argv=[f"/{module}.wasm"],
            env=[],
            memory_limit=None,
            pool_size=2,
        )
    yield built
    for fn in built.values():
        fn.stop()


@pytest.fixture(scope="module")
def event_loop_thread() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop (uvloop, as in the node host) running on a thread of its own; the
    functions' worker pools bind to the first loop they serve, so every test's ingress
    shares this one."""
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="ingress", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


class Live:
    """An Ingress listening on loopback, on the event loop's thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        functions: dict[str, Function],
        limits: IngressLimits,
        body_limit: int = 4 << 20,
    ) -> None:
        self.loop = loop
        registry = FunctionRegistry()
        for fn in functions.values():
            registry.add(fn)
        self.ingress = Ingress(registry, body_limit=body_limit, limits=limits)
        self.port: int = self.run(self.ingress.listen("127.0.0.1", 0))

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def call(self, fn: Callable[[], Any]) -> Any:
        """fn() on the event loop's thread (the ingress's state belongs to it)."""
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:  # pragma: no cover - reported to the caller
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return done.result(10)

    @property
    def connections(self) -> int:
        return self.call(lambda: self.ingress.connections)

    @property
    def body_bytes(self) -> int:
        return self.call(lambda: self.ingress.body_bytes)

    def close(self) -> None:
        def drop_all() -> None:
            for conn in list(self.ingress._connections):
                if conn._raw is not None:
                    conn._raw.abort()

        self.call(drop_all)
        self.run(self.ingress.close())
        self.run(asyncio.sleep(0.05))


@pytest.fixture
def live(
    functions: dict[str, Function], event_loop_thread: asyncio.AbstractEventLoop
) -> Iterator[Callable[..., Live]]:
    """live(limits, body_limit=...) starts an in-process ingress, stopped after the test."""
    started: list[Live] = []

    def start(limits: IngressLimits = FAST, body_limit: int = 4 << 20) -> Live:
        server = Live(event_loop_thread, functions, limits, body_limit)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


# --------------------------------------------------------------------------- a real node host


@pytest.fixture(scope="module")
def node(containerd: Containerd, wasm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    missing = [m for m in MODULES.values() if not (wasm_dir / f"{m}.wasm").is_file()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing in {wasm_dir}: run `make modules` first", pytrace=False)
    out = tmp_path_factory.mktemp("fnsec-image")
    files = {f"/{m}.wasm": wasm_dir / f"{m}.wasm" for m in MODULES.values()}
    builder.build_image(out / "fnsec.tar", files, name=IMAGE, cmd=["/fn-hello.wasm"])
    containerd.import_image(out / "fnsec.tar")
    n = Node(containerd)
    try:
        yield n
    finally:
        n.cleanup()


class Node:
    """The private containerd's node host: its ingress port, its process, functions run with ctr."""

    def __init__(self, c: Containerd) -> None:
        self.c = c
        self.tasks: list[str] = []

    @property
    def port(self) -> int:
        return self.c.host_port("http")

    def host(self) -> psutil.Process:
        proc = find_host_process(self.c)
        assert proc is not None, "no node host runs for the private containerd"
        return proc

    def start(self, module: str) -> str:
        """`ctr run -d` a function module; its task id is its function id."""
        task = (
            f"sec-{module.replace('_', '-')}-{os.getpid()}-{len(self.tasks)}-{time.monotonic_ns() % 100000}"
        )
        self.tasks.append(task)
        self.c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, task, f"/{module}.wasm")
        return task

    def cleanup(self) -> None:
        for task in self.tasks:
            self.c.ctr("tasks", "kill", "--signal", "SIGKILL", task, check=False)
        for task in self.tasks:
            with contextlib.suppress(AssertionError):
                wait_for(lambda t=task: t not in self.c.ctr("tasks", "ls").stdout or self._stopped(t), 10)
            self.c.ctr("tasks", "delete", task, check=False)
            self.c.ctr("containers", "delete", task, check=False)

    def _stopped(self, task: str) -> bool:
        for line in self.c.ctr("tasks", "ls").stdout.splitlines()[1:]:
            parts = line.split()
            if parts and parts[0] == task:
                return parts[-1] == "STOPPED"
        return True


def hello(conn: Conn, fid: str, name: str = "t") -> float:
    """One fn-hello request on *conn*; checks the answer, returns its latency."""
    began = time.perf_counter()
    conn.send(get(fid, f"/?name={name}"))
    reply = conn.response()
    assert reply is not None and reply[0] == 200 and reply[2] == f"Hello, {name}!\n".encode(), reply
    return time.perf_counter() - began


# --------------------------------------------------------------------------- attacks on a real node host


@pytest.mark.integration
def test_endless_header_gets_431_while_other_tenants_are_answered_promptly(node: Node) -> None:
    fid = node.start("fn-hello")
    tenant = Conn(node.port)
    hello(tenant, fid)  # warm
    host = node.host()
    rss_before = host.memory_info().rss
    stop = threading.Event()
    outcomes: list[bytes] = []
    sent: list[int] = []

    def attack() -> None:
        # One endless header value after another, each sent as fast as the host takes it.
        chunk = b"a" * (64 << 10)
        while not stop.is_set():
            sock = socket.create_connection(("127.0.0.1", node.port), timeout=10)
            total = 0
            try:
                sock.sendall(get(fid)[:-2] + b"x-endless: ")
                while not select.select([sock], [], [], 0)[0]:
                    sock.sendall(chunk)
                    total += len(chunk)
                    assert total < 64 << 20, "the host took 64 MiB of one header without answering"
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                sock.settimeout(5)
                try:
                    outcomes.append(sock.recv(4096))
                except OSError as exc:  # the reset may come before the answer is read
                    outcomes.append(repr(exc).encode())
                sent.append(total)
                sock.close()

    attackers = [threading.Thread(target=attack, daemon=True) for _ in range(4)]
    for t in attackers:
        t.start()
    try:
        latencies = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            latencies.append(hello(tenant, fid, f"n{len(latencies)}"))
    finally:
        stop.set()
        for t in attackers:
            t.join(30)
    answered = [o for o in outcomes if o.startswith(b"HTTP/1.1 ")]
    assert answered and all(o.startswith(b"HTTP/1.1 431 ") for o in answered), outcomes[:5]
    assert len(answered) >= len(outcomes) // 2, outcomes[:5]
    assert max(sent) < 32 << 20, f"the host read {max(sent)} bytes of one head before refusing it"
    assert len(latencies) > 50 and max(latencies) < 1.0, (len(latencies), max(latencies))
    grown = host.memory_info().rss - rss_before
    assert grown < 64 << 20, f"the host grew by {grown >> 20} MiB"
    hello(tenant, fid)
    tenant.close()


@pytest.mark.integration
def test_a_function_cannot_forge_a_response_with_its_headers(node: Node) -> None:
    fid = node.start("fn_headers")
    conn = Conn(node.port)
    for path in ("/crlf", "/lf", "/cr", "/nul", "/ctl", "/colon", "/space", "/empty"):
        conn.send(get(fid, path))
        reply = conn.response()
        assert reply is not None
        status, headers, body = reply
        assert status == 500, (path, reply)
        assert body.startswith(b"function returned an invalid response header"), (path, body)
        assert {name for name, _ in headers} <= {b"content-length"}, (path, headers)
        # The connection is still in step: the next answer is the next request's own.
        conn.send(get(fid, "/ok"))
        assert conn.response() == (200, [(b"x-note", b"fine"), (b"content-length", b"5")], b"fine\n"), path
    # A status whose body the client would not read (or read as an interim response).
    conn.send(get(fid, "/s204"))
    assert conn.response() == (204, [], b"")
    conn.send(get(fid, "/s100"))
    status, _, body = conn.response()
    assert status == 500 and b"invalid response status 100" in body
    conn.send(get(fid, "/ok", b"connection: close\r\n"))
    assert conn.response() == (
        200,
        [(b"x-note", b"fine"), (b"content-length", b"5"), (b"connection", b"close")],
        b"fine\n",
    )
    assert conn.until_eof() == b"", "bytes after the last response"
    conn.close()


@pytest.mark.integration
def test_an_idle_connection_flood_leaves_the_host_its_descriptor_reserve(node: Node) -> None:
    fid = node.start("fn-hello")
    host = node.host()
    nofile = host.rlimit(psutil.RLIMIT_NOFILE)[0]
    cap = IngressLimits().connection_cap(nofile)
    reserve = nofile - cap
    flood = cap + 200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < flood + 500 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < flood + 500:
        pytest.skip(f"the host's cap ({cap} of {nofile}) is more connections than this process can open")
    tenant = Conn(node.port)
    hello(tenant, fid)
    fds_before = host.num_fds()
    clients: list[socket.socket] = []
    refused = 0
    try:
        request = get(fid, "/?name=f")
        for _ in range(flood):
            sock = socket.create_connection(("127.0.0.1", node.port), timeout=10)
            clients.append(sock)
            try:
                sock.sendall(request)
                answer = sock.recv(4096)
            except ConnectionResetError:  # refused before it read the request
                answer = b"HTTP/1.1 503 too many connections"
            if answer.startswith(b"HTTP/1.1 503 "):
                assert b"too many connections" in answer
                refused += 1
            else:
                assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert refused >= 200 - 10, refused  # (the tenant and the host's own take a few)
        fds_during = host.num_fds()
        assert fds_during - fds_before <= cap, (fds_before, fds_during, cap)
        assert nofile - fds_during >= reserve - fds_before, (nofile, fds_during, reserve)
        # containerd can still start a container on the host, and every tenant is served.
        other = node.start("fn-hello")
        hello(tenant, fid)
        hello(tenant, other)
    finally:
        for sock in clients:
            sock.close()
    # Once the flood is gone, new connections are served again.
    wait_for(lambda: host.num_fds() <= fds_before + 50, 30)
    fresh = Conn(node.port)
    hello(fresh, fid)
    fresh.close()
    tenant.close()


# ------------------------------------------------------------------- attacks on an in-process ingress


def test_too_many_header_fields_or_bytes_get_431_and_a_long_url_414(live: Callable[..., Live]) -> None:
    server = live(IngressLimits(max_headers=10, max_header_bytes=2048, max_url_bytes=512))
    # Within the limits: served.
    conn = Conn(server.port)
    conn.send(get("echo", "/" + "p" * 400, b"".join(b"x-%d: v\r\n" % i for i in range(8))))
    assert conn.response()[0] == 200
    conn.close()
    cases = [
        (get("echo", "/", b"".join(b"x-%d: v\r\n" % i for i in range(11))), 431),
        (get("echo", "/", b"x-big: " + b"v" * 4000 + b"\r\n"), 431),
        (get("echo", "/" + "p" * 600), 414),
    ]
    for request, status in cases:
        conn = Conn(server.port)
        conn.send(request)
        reply = conn.response()
        assert reply is not None and reply[0] == status, reply
        assert conn.until_eof() == b""
        conn.close()
    # An endless header trickled in small pieces: cut off near the limit, not buffered.
    conn = Conn(server.port)
    conn.send(get("echo")[:-2] + b"x-endless: ")
    sent = 0
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        while not select.select([conn.sock], [], [], 0)[0] and sent < 1 << 20:
            conn.send(b"a" * 100)
            sent += 100
            if sent % 1000 == 0:
                time.sleep(0.001)  # let the ingress read: pieces, not one big read
    assert conn.response()[0] == 431
    assert sent < 64 << 10, sent
    conn.close()
    wait_for(lambda: server.connections == 0)


def test_slow_headers_get_408_after_the_header_timeout(live: Callable[..., Live]) -> None:
    server = live(FAST)
    conn = Conn(server.port)
    began = time.monotonic()
    conn.send(b"GET / HTTP/1.1\r\nhost: x\r\n")
    # Trickle a header line every 50 ms: data keeps coming, but the head never ends.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        while not select.select([conn.sock], [], [], 0.05)[0]:
            conn.send(b"x-slow: 1\r\n")
            assert time.monotonic() - began < 5, "never timed out"
    reply = conn.response()
    elapsed = time.monotonic() - began
    assert reply is not None and reply[0] == 408, reply
    assert conn.until_eof() == b""
    assert 0.25 <= elapsed < 1.5, elapsed
    conn.close()
    # A connection that sends nothing at all is closed too.
    silent = Conn(server.port)
    began = time.monotonic()
    assert silent.until_eof() == b""
    assert time.monotonic() - began < 1.5
    silent.close()
    wait_for(lambda: server.connections == 0)


def test_slow_body_gets_408_and_its_bytes_are_let_go(live: Callable[..., Live]) -> None:
    server = live(FAST)
    conn = Conn(server.port)
    conn.send(b"POST / HTTP/1.1\r\nhost: x\r\nid: echo\r\ncontent-length: 1000\r\n\r\n" + b"b" * 100)
    wait_for(lambda: server.body_bytes == 100)
    reply = conn.response()
    assert reply is not None and reply[0] == 408, reply
    assert conn.until_eof() == b""
    conn.close()
    wait_for(lambda: server.body_bytes == 0 and server.connections == 0)


def test_an_idle_keep_alive_connection_is_closed_but_a_busy_one_is_not(live: Callable[..., Live]) -> None:
    server = live(FAST)
    idle, busy = Conn(server.port), Conn(server.port)
    hello(idle, "hello")
    began = time.monotonic()
    # The busy one sends a request every 100 ms, for three idle timeouts.
    while time.monotonic() - began < 0.9:
        hello(busy, "hello")
        time.sleep(0.1)
    assert idle.until_eof() == b"", "the idle connection got bytes instead of a close"
    hello(busy, "hello")
    idle.close()
    busy.close()


def test_no_timeout_while_a_function_computes(live: Callable[..., Live]) -> None:
    server = live(IngressLimits(header_timeout=0.2, body_timeout=0.2, idle_timeout=0.2))
    conn = Conn(server.port)
    conn.send(get("misbehave", "/sleep?ms=900"))  # past the inline budget: on worker threads
    reply = conn.response()
    assert reply == (200, [(b"content-length", b"13")], b"slept 900 ms\n"), reply
    hello(conn, "hello")
    conn.close()


def test_a_host_bug_in_a_call_is_a_500_and_the_connection_goes_on(
    live: Callable[..., Live], functions: dict[str, Function]
) -> None:
    """A failure inside the host while it runs a call (not the guest's: a trap is 500 too,
    from the function) answers 500 naming the host, never 400 "malformed request", and
    leaks no internal detail; the next request on the same connection is served."""
    server = live()
    fn = functions["echo"]

    def broken(request: object) -> None:
        raise RuntimeError("secret internal state /var/lib/x")

    fn.call_inline = broken
    try:
        conn = Conn(server.port)
        conn.send(get("echo"))
        status, _headers, body = conn.response()
        assert status == 500 and b"host error" in body and b"secret" not in body, body
        hello(conn, "hello")
        conn.close()
    finally:
        del fn.call_inline


def test_connection_cap_refuses_new_connections_and_recovers(live: Callable[..., Live]) -> None:
    server = live(IngressLimits(max_connections=20, idle_timeout=60))
    conns = [Conn(server.port) for _ in range(20)]
    for conn in conns:
        hello(conn, "hello")
    assert server.connections == 20
    for _ in range(5):
        extra = Conn(server.port)
        data = extra.until_eof()
        assert data.startswith(b"HTTP/1.1 503 ") and data.endswith(b"too many connections\n"), data
        extra.close()
    for conn in conns:  # the established ones are served as before
        hello(conn, "hello")
    for conn in conns[:5]:
        conn.close()
    wait_for(lambda: server.connections == 15)
    fresh = [Conn(server.port) for _ in range(5)]
    for conn in fresh:
        hello(conn, "hello")
    for conn in conns[5:] + fresh:
        conn.close()
    wait_for(lambda: server.connections == 0)


def test_per_address_connection_cap(live: Callable[..., Live]) -> None:
    server = live(IngressLimits(max_connections_per_ip=3, idle_timeout=60))
    conns = [Conn(server.port) for _ in range(3)]
    for conn in conns:
        hello(conn, "hello")
    extra = Conn(server.port)
    assert b"too many connections from this address" in extra.until_eof()
    extra.close()
    conns.pop().close()
    wait_for(lambda: server.connections == 2)
    again = Conn(server.port)
    hello(again, "hello")
    for conn in [*conns, again]:
        conn.close()


def test_half_sent_bodies_stay_within_the_budget_and_are_released(live: Callable[..., Live]) -> None:
    budget = 8 << 20
    server = live(IngressLimits(body_budget=budget, body_timeout=60, header_timeout=60), body_limit=4 << 20)
    head = b"POST / HTTP/1.1\r\nhost: x\r\nid: echo\r\ncontent-length: %d\r\n\r\n" % (4 << 20)
    half = b"h" * (2 << 20)
    conns: list[Conn] = []
    refused = 0
    for _ in range(40):  # 80 MiB offered, 10 times the budget
        conn = Conn(server.port, timeout=10)
        conns.append(conn)
        try:
            conn.send(head + half)
        except (BrokenPipeError, ConnectionResetError):
            pass
        if select.select([conn.sock], [], [], 0.5)[0]:
            data = conn.until_eof()
            if data:
                assert data.startswith(b"HTTP/1.1 503 "), data[:100]
            refused += 1
        assert server.body_bytes <= budget
    assert refused >= 40 - budget // len(half), refused
    assert 0 < server.body_bytes <= budget
    for conn in conns:
        conn.close()
    wait_for(lambda: server.body_bytes == 0 and server.connections == 0)
    # The budget is whole again: a full-size body goes through.
    conn = Conn(server.port)
    conn.send(head + half + half)
    status, _, body = conn.response()
    assert status == 200 and len(body) > 4 << 20
    conn.close()
    wait_for(lambda: server.body_bytes == 0)


def test_a_lost_connection_releases_its_pending_requests(live: Callable[..., Live]) -> None:
    server = live(IngressLimits(idle_timeout=60))
    conn = Conn(server.port)
    body = b"p" * (1 << 20)
    # A slow request (on worker threads) and two pipelined behind it, then the client leaves.
    for path in ("/sleep?ms=600", "/count", "/count"):
        conn.send(
            b"POST %s HTTP/1.1\r\nhost: x\r\nid: misbehave\r\ncontent-length: %d\r\n\r\n"
            % (path.encode(), len(body))
            + body
        )
    wait_for(lambda: server.body_bytes == 3 * len(body))
    conn.close()
    wait_for(lambda: server.body_bytes == 0 and server.connections == 0)
    time.sleep(0.8)  # the slow call ends meanwhile: its answer must not count anything down again
    assert server.body_bytes == 0
    check = Conn(server.port)
    hello(check, "hello")
    check.close()


# --------------------------------------------------------------- the parser and render() under hypothesis


class ResponseParts:
    def __init__(self) -> None:
        self.parser: httptools.HttpResponseParser | None = None
        self.begun = 0
        self.complete = 0
        self.statuses: list[int] = []
        self.headers: list[list[tuple[bytes, bytes]]] = []
        self.bodies: list[bytes] = []

    def on_message_begin(self) -> None:
        self.begun += 1
        self.headers.append([])
        self.bodies.append(b"")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[-1].append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.statuses.append(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        self.bodies[-1] += body

    def on_message_complete(self) -> None:
        self.complete += 1


def parse_responses(data: bytes) -> ResponseParts:
    parts = ResponseParts()
    parser = parts.parser = httptools.HttpResponseParser(parts)
    parser.feed_data(data)
    return parts


_methods = st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"G\x00T", b"CONNECT"])
_token = st.binary(min_size=1, max_size=12).map(lambda b: bytes(c % 26 + 97 for c in b))
_header = st.tuples(
    st.one_of(
        _token,
        st.sampled_from([b"id", b"content-length", b"transfer-encoding", b"connection"]),
        st.binary(max_size=8),
    ),
    st.one_of(
        st.sampled_from([b"echo", b"hello", b"chunked", b"5", b"close", b"keep-alive", b"-1"]),
        st.binary(max_size=16),
    ),
)


@st.composite
def _request(draw: st.DrawFn) -> bytes:
    method = draw(_methods)
    target = draw(
        st.one_of(
            st.sampled_from([b"/", b"/fn/echo/x?a=1", b"/fn/hello?name=z", b"*"]), st.binary(max_size=20)
        )
    )
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTX"]))
    headers = draw(st.lists(_header, max_size=6))
    sep = draw(st.sampled_from([b"\r\n", b"\n", b"\r"]))
    head = method + b" " + target + b" " + version + sep
    head += b"".join(n + b": " + v + sep for n, v in headers) + sep
    return head + draw(st.binary(max_size=40))


@st.composite
def _stream(draw: st.DrawFn) -> list[bytes]:
    pieces = draw(st.lists(st.one_of(_request(), st.binary(max_size=64)), min_size=1, max_size=5))
    data = b"".join(pieces)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    chunks, last = [], 0
    for cut in [*cuts, len(data)]:
        chunks.append(data[last:cut])
        last = cut
    return [c for c in chunks if c]


@pytest.fixture(scope="module")
def feeder(functions: dict[str, Function]) -> Iterator[Callable[[list[bytes]], None]]:
    """feed(chunks): one connection of an Ingress (real echo and hello functions, tiny
    limits) fed *chunks*, then lost; checks what came out."""
    loop = asyncio.new_event_loop()
    registry = FunctionRegistry()
    registry.add(functions["echo"])
    registry.add(functions["hello"])
    tiny = IngressLimits(max_url_bytes=24, max_header_bytes=96, max_headers=4, body_budget=100)
    ingresses = [  # past the body limit before the budget, and the other way round
        Ingress(registry, body_limit=20, limits=tiny),
        Ingress(registry, body_limit=200, limits=tiny),
    ]

    async def one(ingress: Ingress, chunks: list[bytes]) -> Recorder:
        transport = Recorder()
        protocol = HttpProtocol(ingress)
        protocol.connection_made(transport)
        for chunk in chunks:
            if transport.closed:
                break
            protocol.data_received(chunk)
            await asyncio.sleep(0)  # the ingress writes at the end of the turn
        await asyncio.sleep(0)
        protocol.connection_lost(None)
        await asyncio.sleep(0)
        return transport

    def feed(chunks: list[bytes]) -> None:
        for ingress in ingresses:
            transport = loop.run_until_complete(one(ingress, chunks))
            assert transport.after_close == b""
            assert ingress.body_bytes == 0 and ingress.connections == 0
            out = bytes(transport.data)
            parts = parse_responses(out)  # raises on anything that is not HTTP responses
            assert parts.begun == parts.complete, f"a partial response: {out!r}"
            assert parts.complete <= b"".join(chunks).count(b"HTTP/1.") + 1, out
            assert all(200 <= status <= 599 for status in parts.statuses), parts.statuses

    yield feed
    loop.close()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=_stream())
def test_arbitrary_bytes_give_well_formed_responses_or_nothing(
    feeder: Callable[[list[bytes]], None], chunks: list[bytes]
) -> None:
    feeder(chunks)


_any_header = st.tuples(
    st.one_of(
        _token,
        st.binary(max_size=10),
        st.sampled_from([b"content-length", b"Connection", b"x-a: b", b"x\r\ny"]),
    ),
    st.one_of(
        st.binary(max_size=20),
        st.sampled_from([b"a\r\nx-injected: 1", b"\r\n\r\nHTTP/1.1 200 OK", b"v\tw", b"\xff\xfe"]),
    ),
)


@settings(max_examples=500, deadline=None)
@given(
    status=st.one_of(st.integers(0, 1200), st.sampled_from([200, 204, 304, 404])),
    headers=st.lists(_any_header, max_size=6),
    body=st.binary(max_size=50),
    keep_alive=st.booleans(),
)
def test_render_never_writes_a_header_line_the_function_did_not_name(
    status: int, headers: list[tuple[bytes, bytes]], body: bytes, keep_alive: bool
) -> None:
    out = render(Response(status, headers, body), keep_alive)
    parts = parse_responses(out)
    assert parts.begun == parts.complete == 1, out
    got = parts.headers[0]
    named = {n.lower() for n, _ in headers}
    allowed = named | {b"content-length", b"connection"}
    assert {n for n, _ in got} <= allowed, out
    valid = 200 <= status <= 999 and all(
        n
        and all(c in b"!#$%&'*+-.^_`|~0123456789" or chr(c).isalpha() and c < 128 for c in n)
        and not any(c < 32 and c != 9 or c == 127 for c in v)
        for n, v in headers
    )
    if not valid:
        assert out.startswith(b"HTTP/1.1 500 "), out
        assert parts.bodies[0].startswith(b"function returned an invalid response")
        assert [n for n, _ in got] == [b"content-length"] + ([] if keep_alive else [b"connection"])
        return
    assert out.startswith(b"HTTP/1.1 %d " % status)
    kept = [
        (n.lower(), v.strip(b" \t"))
        for n, v in headers
        if n.lower() not in (b"content-length", b"connection", b"transfer-encoding")
    ]
    assert [(n, v.strip(b" \t")) for n, v in got if n not in (b"content-length", b"connection")] == kept
    assert parts.bodies[0] == (b"" if status in (204, 304) else body)
    assert (b"connection", b"close") in got if not keep_alive else True


def test_large_or_ever_new_response_headers_are_not_kept_by_the_host() -> None:
    """The renderer caches checked header lines and heads, small ones only: a function
    answering with ever-new large headers must not make the host keep them (a few hundred
    responses of 8 KiB heads would otherwise stay in memory for good)."""
    from layotto.host import ingress_render

    def cached_bytes() -> int:
        heads, lines = ingress_render._HEADS.values(), ingress_render._LINES.values()
        return sum(map(len, heads)) + sum(map(len, lines))

    before = cached_bytes()
    for i in range(300):
        out = render(Response(200, [(b"x-big", b"%d" % i + b"v" * 8192)], b"ok"), True)
        assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"\r\n\r\nok")
    assert cached_bytes() - before < 64 << 10
    small = Response(201, [(b"x-small", b"1")], b"hi")
    assert render(small, True) == render(small, True)
    assert (201, ((b"x-small", b"1"),)) in ingress_render._HEADS  # small heads still are

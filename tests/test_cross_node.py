"""Calls across nodes (issue 12): ``layotto_invoke`` / InvokeService of an id that does not
run on this node goes over HTTP to that function's Service, found through the operator's
static resolver file or cluster DNS (host/remote_invoke.py, docs/abi.md).

The first part drives :class:`RemoteInvoker` and :class:`HostInvoker` against real servers
on loopback: an HTTP server that records what it is sent, and Debian's ``dnsmasq`` serving
``<id>.<namespace>.svc.cluster.local``. The second part is two nodes on one machine: two
network namespaces joined by a bridge this test creates (a private subnet, removed at
teardown), each running its own private containerd with its own node host; a function on
node A (``faas_fn1``, which invokes ``id_2``) reaches ``fn_echo`` serving ``id_2`` on node B
through the resolver file, then through dnsmasq, and shows what node B was sent.
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from layotto.host.abi_invoker import HostInvoker
from layotto.host.errors import AbiStatus, Status
from layotto.host.remote_invoke import (
    DnsResolver,
    RemoteError,
    RemoteInvoker,
    StaticResolver,
    Target,
    check_target,
    parse_static_map,
)
from tests.conftest import require
from tests.support import wait_for

# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A port free on 127.0.0.1 for both UDP and TCP (dnsmasq takes both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise OSError("no port free for both UDP and TCP")


class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every POST with ``status`` and a body naming the path; keeps each request
    (path, headers, body) and the client port it came from."""

    protocol_version = "HTTP/1.1"
    status = 200

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        server = self.server
        server.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        server.peers.add(self.client_address[1])
        if self.path.startswith("/slow"):
            server.release.wait(10)
        answer = b"answer to " + body
        self.send_response(server.status)
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    server.daemon_threads = True
    server.seen, server.peers, server.status = [], set(), 200
    server.release = threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()


def static_file(tmp_path: Path, entries: dict) -> Path:
    path = tmp_path / "functions.yaml"
    path.write_text(yaml.safe_dump(entries))
    return path


@dataclass
class FakeRegistry:
    """The only stand-in here: the function registry of a node with no functions (the real
    one needs a running engine; the two-node test below uses the real one)."""

    owners: dict = field(default_factory=dict)

    def owner(self, function_id: str) -> str | None:
        return self.owners.get(function_id)

    def get(self, function_id: str, namespace: str | None = None) -> None:
        return None


# --------------------------------------------------------------------------- names and files


def test_a_target_is_a_dns_label_or_refused():
    assert check_target("id_2", "default").label == "id-2"
    assert check_target("Inventory", "shop").label == "inventory"
    for bad in ("", "-a", "a-", "a.b", "a/b", "a\r\nx: 1", "é", "a" * 64, "a b", "_a"):
        with pytest.raises(RemoteError) as info:
            check_target(bad, "default")
        assert info.value.http_status == 404 and repr(bad) in str(info.value)
    for bad in ("Default", "a.b", "x" * 64, "", "a_b"):
        with pytest.raises(RemoteError, match="is not a DNS label"):
            check_target("id", bad)


def test_the_static_file_is_checked_entry_by_entry(tmp_path):
    ok = parse_static_map("default:\n  id_2: 10.0.0.3\n  id_3: '[fd00::1]:8080'\n", "f.yaml", 2045)
    assert ok == {("default", "id_2"): ("10.0.0.3", 2045), ("default", "id_3"): ("fd00::1", 8080)}
    cases = {
        "- a\n": "expected a map of namespace",
        "Default:\n  a: h\n": "namespace 'Default' is not a DNS label",
        "default: h:1\n": "default: expected a map of id",
        "default:\n  a.b: h\n": "default.a.b: not a function id",
        "default:\n  a: 7\n": "default.a: expected host[:port]",
        "default:\n  a: h:99999\n": "default.a: 'h:99999' has no valid port",
        "default:\n  a: 'h/x:1'\n": "is not host[:port]",
        "default: [\n": "not YAML",
    }
    for text, message in cases.items():
        with pytest.raises(ValueError, match="f.yaml") as info:
            parse_static_map(text, "f.yaml", 2045)
        assert message in str(info.value), (text, str(info.value))
    with pytest.raises(ValueError, match="No such file"):
        StaticResolver(tmp_path / "missing.yaml")


def test_the_static_file_is_read_again_when_it_changes(tmp_path):
    path = static_file(tmp_path, {"default": {"id_2": "10.0.0.3"}})
    resolver = StaticResolver(path)
    far = time.monotonic() + 5
    assert resolver.resolve(Target("id_2", "default"), far) == ("10.0.0.3", 2045)
    path.write_text(yaml.safe_dump({"default": {"id_2": "10.0.0.4:81", "x": "h"}}))
    os.utime(path, ns=(1, 1))  # a new modification time however fast the rewrite was
    assert resolver.resolve(Target("id_2", "default"), far) == ("10.0.0.4", 81)
    path.write_text("default: [\n")  # broken: the last good map stays
    os.utime(path, ns=(2, 2))
    assert resolver.resolve(Target("x", "default"), far) == ("h", 2045)
    assert resolver.resolve(Target("x", "other"), far) is None


# --------------------------------------------------------------------------- the HTTP call


def test_send_carries_id_caller_and_deadline_and_reuses_its_connection(recorder, tmp_path):
    port = recorder.server_address[1]
    remote = RemoteInvoker([StaticResolver(static_file(tmp_path, {"shop": {"cart": f"127.0.0.1:{port}"}}))])
    who = {"layotto-caller": "shop.web", "layotto-caller-namespace": "shop"}
    for n in range(3):
        answer = remote.invoke(Target("cart", "shop"), "add item", b"book%d" % n, who, time.monotonic() + 5)
        assert answer == b"answer to book%d" % n
    path, headers, body = recorder.seen[0]
    assert path == "/add%20item" and body == b"book0"
    assert headers["id"] == "cart"
    assert headers["layotto-caller"] == "shop.web" and headers["layotto-caller-namespace"] == "shop"
    assert 0 < int(headers["layotto-deadline-ms"]) <= 5000
    assert len(recorder.peers) == 1, f"three calls took {len(recorder.peers)} connections"
    remote.close()


def test_send_errors_name_the_address(recorder, tmp_path):
    port = recorder.server_address[1]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    entries = {"default": {"up": f"127.0.0.1:{port}", "down": f"127.0.0.1:{closed}"}}
    remote = RemoteInvoker([StaticResolver(static_file(tmp_path, entries))])
    soon = time.monotonic() + 5
    with pytest.raises(RemoteError) as info:
        remote.invoke(Target("down", "default"), "", b"", {}, soon)
    assert info.value.http_status == 503 and f"127.0.0.1:{closed}" in str(info.value)
    assert "refused" in str(info.value)
    with pytest.raises(RemoteError) as info:
        remote.invoke(Target("nobody", "default"), "", b"", {}, soon)
    assert info.value.http_status == 404 and info.value.status is Status.NOT_FOUND
    assert "default.nobody in" in str(info.value) and "functions.yaml" in str(info.value)
    recorder.status = 500
    with pytest.raises(RemoteError) as info:
        remote.invoke(Target("up", "default"), "", b"x", {}, soon)
    assert info.value.http_status == 502 and "answered 500: answer to x" in str(info.value)
    recorder.status = 404
    with pytest.raises(RemoteError) as info:
        remote.invoke(Target("up", "default"), "", b"x", {}, soon)
    assert info.value.status is Status.NOT_FOUND
    # A callee that does not answer: 504 when the caller's deadline passes, not later.
    with pytest.raises(RemoteError) as info:
        remote.invoke(Target("up", "default"), "slow", b"", {}, time.monotonic() + 0.3)
    assert info.value.http_status == 504 and f"127.0.0.1:{port}" in str(info.value)
    with pytest.raises(RemoteError, match="deadline passed before calling"):
        remote.invoke(Target("up", "default"), "", b"", {}, time.monotonic() - 1)


# --------------------------------------------------------------------------- the invoker


@dataclass
class FakeCaller:
    namespace: str | None
    app_id: str


def test_host_invoker_without_a_resolver_stays_local():
    invoker = HostInvoker(FakeRegistry())
    with pytest.raises(AbiStatus, match="no function or application with id 'id_2'"):
        invoker.invoke(FakeCaller("default", "default.fn1"), "id_2", "", b"")


def test_host_invoker_sends_with_the_caller_and_applies_the_policy_first(recorder, tmp_path):
    port = recorder.server_address[1]
    entries = {"default": {"id_2": f"127.0.0.1:{port}"}, "shop": {"cart": f"127.0.0.1:{port}"}}
    remote = RemoteInvoker([StaticResolver(static_file(tmp_path, entries))])
    allowed: set[tuple[str, str]] = set()
    # A local id owned by another namespace stays refused, and is never sent anywhere.
    invoker = HostInvoker(
        FakeRegistry({"local": "other"}), may_invoke=lambda a, b: (a, b) in allowed, remote=remote
    )
    caller = FakeCaller("default", "default.fn1")
    assert invoker.invoke(caller, "id_2", "m", b"q") == b"answer to q"
    _, headers, _ = recorder.seen[-1]
    assert headers["layotto-caller"] == "default.fn1" and headers["layotto-caller-namespace"] == "default"
    with pytest.raises(AbiStatus, match="may not invoke functions of namespace 'shop'"):
        invoker.invoke(caller, "cart.shop", "", b"")
    with pytest.raises(AbiStatus, match="no function or application with id 'local'"):
        invoker.invoke(caller, "local", "", b"")
    assert len(recorder.seen) == 1
    allowed.add(("default", "shop"))
    assert invoker.invoke(caller, "cart.shop", "", b"r") == b"answer to r"
    assert recorder.seen[-1][1]["id"] == "cart"
    # The deadline a caller carries (the gRPC API's) is the one sent along.
    invoker.invoke(caller, "id_2", "", b"", deadline=time.monotonic() + 0.5)
    assert int(recorder.seen[-1][1]["layotto-deadline-ms"]) <= 500
    # Without a namespace (the host itself) an id names none to look in.
    with pytest.raises(AbiStatus, match="names no namespace"):
        invoker.invoke(None, "id_2", "", b"")


# --------------------------------------------------------------------------- DNS


class Dnsmasq:
    """Debian's dnsmasq answering for ``cluster.local`` on one address, nothing forwarded
    (an unknown name there is NXDOMAIN). Started with :meth:`start`, stopped by :meth:`stop`."""

    def __init__(self, address: str, port: int, records: dict[str, str], workdir: Path) -> None:
        self.address, self.port, self.records, self.workdir = address, port, records, workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [require("dnsmasq"), "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv"]
        args += ["--no-hosts", "--no-poll", "--bind-interfaces", f"--listen-address={self.address}"]
        args += [f"--port={self.port}", "--local=/cluster.local/", f"--pid-file={self.workdir / 'dns.pid'}"]
        args += [f"--host-record={name},{ip}" for name, ip in self.records.items()]
        log = open(self.workdir / "dnsmasq.log", "ab")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        name, ip = next(iter(self.records.items()))
        resolver = DnsResolver(f"{self.address}:{self.port}")

        def answers() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            try:
                return resolver.resolver.resolve(name + ".", "A", lifetime=0.5)[0].address == ip
            except Exception:
                return False

        wait_for(answers, what=f"dnsmasq answering on {self.address}:{self.port}")

    def log(self) -> str:
        path = self.workdir / "dnsmasq.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def dnsmasq(tmp_path) -> Iterator[Dnsmasq]:
    server = Dnsmasq("127.0.0.1", free_port(), {"id-2.default.svc.cluster.local": "127.0.0.1"}, tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_cluster_dns_names_the_service_and_unknown_names_are_not_found(dnsmasq, recorder):
    port = recorder.server_address[1]
    resolver = DnsResolver(f"127.0.0.1:{dnsmasq.port}", "cluster.local.", port)
    assert resolver.name(Target("id_2", "default")) == "id-2.default.svc.cluster.local."
    remote = RemoteInvoker([resolver])
    assert remote.invoke(Target("id_2", "default"), "", b"hi", {}, time.monotonic() + 5) == b"answer to hi"
    assert recorder.seen[-1][1]["id"] == "id_2"  # the id as the caller named it, for the ingress
    with pytest.raises(RemoteError) as info:
        remote.invoke(Target("id_9", "default"), "", b"", {}, time.monotonic() + 5)
    assert info.value.http_status == 404
    assert f"DNS name id-9.default.svc.cluster.local. on 127.0.0.1:{dnsmasq.port}" in str(info.value)


def test_a_dns_server_that_does_not_answer_is_504_naming_it():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # takes queries, never answers
        silent.bind(("127.0.0.1", 0))
        server = f"127.0.0.1:{silent.getsockname()[1]}"
        remote = RemoteInvoker([DnsResolver(server)])
        with pytest.raises(RemoteError) as info:
            remote.invoke(Target("id_2", "default"), "", b"", {}, time.monotonic() + 0.3)
    assert info.value.http_status == 504 and server in str(info.value)


def test_bad_dns_settings_are_refused():
    with pytest.raises(ValueError, match="give an IP address"):
        DnsResolver("dns.example:53")
    with pytest.raises(ValueError, match="is not a DNS name"):
        DnsResolver("10.0.0.10", "bad domain")
    with pytest.raises(ValueError, match="no valid port"):
        DnsResolver("10.0.0.10:0")

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

import contextlib
import http.client
import http.server
import ipaddress
import os
import secrets
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf import any_pb2

from layotto.host import scheduler
from layotto.host.abi_invoker import HostInvoker
from layotto.host.errors import AbiStatus, Status
from layotto.host.protocol import runtime_api_pb2 as pb
from layotto.host.remote_invoke import (
    DnsResolver,
    RemoteError,
    RemoteInvoker,
    StaticResolver,
    Target,
    build_remote,
    check_target,
    parse_static_map,
)
from layotto.images import builder
from tests.conftest import require
from tests.containerd_env import Containerd, default_snapshotter
from tests.cri_client import CONTAINER_RUNNING, CriClient, Pod
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
    # A method is a path: whatever the guest puts in it cannot add a header or a line.
    remote.invoke(Target("cart", "shop"), "a\r\nx-forged: 1 #", b"", who, time.monotonic() + 5)
    path, headers, _ = recorder.seen[-1]
    assert path == "/a%0D%0Ax-forged:%201%20%23" and "x-forged" not in headers
    remote.close()


def test_no_resolver_setting_means_no_remote_calls(tmp_path):
    assert build_remote() is None
    both = build_remote("127.0.0.1:5353", "example.org", static_file(tmp_path, {}), 8080)
    assert both is not None
    assert [type(r).__name__ for r in both.resolvers] == ["StaticResolver", "DnsResolver"]
    looked_up = both.describe(Target("a", "b"))
    assert (
        looked_up
        == f"b.a in {tmp_path / 'functions.yaml'} nor DNS name a.b.svc.example.org. on 127.0.0.1:5353"
    )


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
    # Inline on the event loop, a call that has changed nothing yet is stopped before it sends
    # (the scheduler runs it again on a worker); one that has is let through, and is marked.
    sent = len(recorder.seen)
    with scheduler.running(scheduler.Call(inline=True)) as call:
        with pytest.raises(scheduler.WouldBlock, match="'id_2' on another node"):
            invoker.invoke(caller, "id_2", "", b"")
        assert call.network and len(recorder.seen) == sent
    with scheduler.running(scheduler.Call(inline=False)) as call:
        assert invoker.invoke(caller, "id_2", "", b"w") == b"answer to w" and call.effects
    # Without a namespace (the host itself) an id names none to look in.
    with pytest.raises(AbiStatus, match="names no namespace"):
        invoker.invoke(None, "id_2", "", b"")


# --------------------------------------------------------------------------- DNS


class Dnsmasq:
    """Debian's dnsmasq answering for ``cluster.local`` on one address, nothing forwarded
    (an unknown name there is NXDOMAIN). Started with :meth:`start`, stopped by :meth:`stop`."""

    def __init__(
        self,
        address: str,
        port: int,
        records: dict[str, str],
        workdir: Path,
        aliases: dict[str, str] | None = None,
    ) -> None:
        self.address, self.port, self.records, self.workdir = address, port, records, workdir
        self.aliases = aliases or {}  # name -> target (a CNAME, as an ExternalName Service is)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [require("dnsmasq"), "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv"]
        args += ["--no-hosts", "--no-poll", "--bind-interfaces", f"--listen-address={self.address}"]
        args += [f"--port={self.port}", "--local=/cluster.local/", f"--pid-file={self.workdir / 'dns.pid'}"]
        args += ["--local-ttl=5"]  # CoreDNS's default TTL for cluster names
        args += [f"--host-record={name},{ip}" for name, ip in self.records.items()]
        args += [f"--cname={name},{target}" for name, target in self.aliases.items()]
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
    records = {
        "id-2.default.svc.cluster.local": "127.0.0.1",
        "metadata.example": "127.0.0.1",
        "metadata.default.svc.cluster.local": "169.254.169.254",
    }
    aliases = {"outside.default.svc.cluster.local": "metadata.example"}
    server = Dnsmasq("127.0.0.1", free_port(), records, tmp_path, aliases)
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
    # An ExternalName Service (a CNAME out of the cluster) is never called.
    with pytest.raises(RemoteError) as info:
        remote.invoke(Target("outside", "default"), "", b"", {}, time.monotonic() + 5)
    assert info.value.http_status == 404 and "alias of metadata.example." in str(info.value)
    with pytest.raises(RemoteError, match="resolves to 169.254.169.254, which a Service never has"):
        remote.invoke(Target("metadata", "default"), "", b"", {}, time.monotonic() + 5)
    assert len(recorder.seen) == 1


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


# --------------------------------------------------------------------------- two nodes

CRI_NAMESPACE = "k8s.io"
CALLER_MODULE, CALLEE_MODULE = "faas_fn1", "fn_echo"  # faas_fn1 invokes id_2


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([require("ip"), *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {r.returncode}: {r.stderr.strip()}")
    return r


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 of 10.216.0.0/13 (the CNI tests take 10.200.0.0/13) that no route or address of
    this machine overlaps."""
    taken = []
    for line in ip("-4", "-o", "route", "show", "table", "all").stdout.splitlines():
        first = line.split()[0] if line.split() else ""
        if first[:1].isdigit():
            taken.append(ipaddress.ip_network(first if "/" in first else first + "/32", strict=False))
    for line in ip("-4", "-o", "addr").stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            taken.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{216 + secrets.randbelow(8)}.{secrets.randbelow(256)}.0/24")
        if not any(net.overlaps(t) for t in taken if t.prefixlen > 0):
            return net
    raise AssertionError("no free /24 in 10.216.0.0/13")


@dataclass
class Network:
    """A bridge on this machine (its first address is ours: dnsmasq listens there) and one
    network namespace per node on it, through a veth pair each."""

    tag: str
    subnet: ipaddress.IPv4Network
    namespaces: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"ltx{self.tag}"

    def address(self, n: int) -> str:
        return str(self.subnet.network_address + n)

    def create(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        # Bridged frames skip iptables (br_netfilter may be loaded, with a FORWARD policy of DROP).
        ip("link", "set", self.bridge, "type", "bridge", "nf_call_iptables", "0", check=False)
        ip("addr", "add", f"{self.address(1)}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def add_node(self, name: str, *hosts: int) -> str:
        netns = f"ltx{self.tag}{name}"
        ip("netns", "add", netns)
        self.namespaces.append(netns)
        outside, inside = f"{netns}h", f"{netns}n"
        ip("link", "add", outside, "type", "veth", "peer", "name", inside, "netns", netns)
        ip("link", "set", outside, "master", self.bridge, "up")
        ip("-n", netns, "link", "set", "lo", "up")
        for n in hosts:
            ip("-n", netns, "addr", "add", f"{self.address(n)}/24", "dev", inside)
        ip("-n", netns, "link", "set", inside, "up")
        return netns

    def remove(self) -> None:
        for netns in self.namespaces:  # the veth pairs go with their namespace
            ip("netns", "del", netns, check=False)
        ip("link", "del", self.bridge, check=False)


@dataclass
class RemoteNode:
    """A private CRI containerd started inside a network namespace (so is its node host,
    which the shim starts), its ingress on Layotto's port 2045 of the node's address."""

    c: Containerd
    client: CriClient
    address: str
    log_root: Path
    pods: list[Pod] = field(default_factory=list)

    def run(self, name: str, module: str, function_id: str, capabilities: str) -> Pod:
        annotations = {"layotto.io/function-id": function_id, "layotto.io/capabilities": capabilities}
        uid = str(uuid.uuid4())
        pod = self.client.run_pod(name, "default", uid, self.log_root / uid, annotations, handler="layotto")
        self.pods.append(pod)
        cid = self.client.create_container(pod.id, pod.config, name, f"docker.io/library/{module}:latest")
        self.client.start_container(cid)
        self.client.wait_container_state(cid, CONTAINER_RUNNING)
        return pod

    def get(self, function_id: str, target: str = "/?name=book1") -> tuple[int, str]:
        conn = http.client.HTTPConnection(self.address, 2045, timeout=20)
        try:
            conn.request("GET", target, headers={"id": function_id})
            r = conn.getresponse()
            return r.status, r.read().decode(errors="replace")
        finally:
            conn.close()

    def diagnostics(self) -> str:
        host_log = self.c.state / "layotto" / "host.log"
        tail = host_log.read_text(errors="replace").splitlines()[-30:] if host_log.exists() else []
        return f"--- containerd log ---\n{self.c.log_tail(20)}\n--- {host_log} ---\n" + "\n".join(tail)


def start_node(
    netns: str, address: str, env: dict[str, str], images: dict[str, Path], work: Path, shim_dir: Path
) -> RemoteNode:
    wrapper = work / f"containerd-{netns}"
    wrapper.write_text(
        f'#!/bin/sh\nexec {require("nsenter")} --net=/run/netns/{netns} {require("containerd")} "$@"\n'
    )
    wrapper.chmod(0o755)
    c = Containerd(
        path_prepend=[shim_dir],
        cri=True,
        snapshotter=default_snapshotter(),
        containerd_bin=str(wrapper),
        env={"LAYOTTO_HTTP_PORT": "2045", "LAYOTTO_GRPC_ADDRESS": "", **env},
    )
    c.start()
    client = CriClient(c.address)
    node = RemoteNode(c, client, address, work / f"pods-{netns}")
    for tar in images.values():
        c.import_image(tar, namespace=CRI_NAMESPACE)
    for name in images:
        client.wait_image(name)
    return node


@dataclass
class TwoNodes:
    a: RemoteNode
    b: RemoteNode
    net: Network
    resolver_file: Path
    token: str
    dns: Dnsmasq

    def resolve_by_file(self, entries: dict) -> None:
        """The operator's resolver file, rewritten (node A reads it again when it changes)."""
        self.resolver_file.write_text(yaml.safe_dump(entries))
        stamp = time.time_ns() + secrets.randbelow(10**6)
        os.utime(self.resolver_file, ns=(stamp, stamp))


@contextlib.contextmanager
def two_node_cluster(project_bin: Path, wasm_dir: Path, work: Path) -> Iterator[TwoNodes]:
    """Two nodes on one machine (needs root): node A runs faas_fn1 as ``id_1`` and resolves
    through ``work/functions.yaml`` then dnsmasq; node B runs fn_echo as ``id_2``. Everything
    is removed on the way out. Also used by ad hoc measurements."""
    for tool in ("containerd", "ctr", "runc", "nsenter", "dnsmasq"):
        require(tool)
    out = work / "images"
    out.mkdir()
    images: dict[str, Path] = {}
    builder.build_image(
        out / "pause.tar",
        {"/pause": b"layotto pause placeholder\n"},
        name="docker.io/library/layotto-pause:latest",
        cmd=["/pause"],
    )
    images["docker.io/library/layotto-pause:latest"] = out / "pause.tar"
    for module in (CALLER_MODULE, CALLEE_MODULE):
        tar = out / f"{module}.tar"
        name = f"docker.io/library/{module}:latest"
        builder.build_image(
            tar, {f"/{module}.wasm": wasm_dir / f"{module}.wasm"}, name=name, cmd=[f"/{module}.wasm"]
        )
        images[name] = tar
    # Node A's Runtime API serves one app, to call InvokeService as a sidecar would.
    token = secrets.token_urlsafe(32)
    policy = work / "policy.yaml"
    policy.write_text(
        yaml.safe_dump({"runtimeApi": {"apps": [{"namespace": "default", "app": "sidecar", "token": token}]}})
    )
    resolver_file = work / "functions.yaml"
    resolver_file.write_text("{}\n")
    net = Network(secrets.token_hex(3), free_subnet())
    nodes: list[RemoteNode] = []
    dns: Dnsmasq | None = None
    try:
        net.create()
        netns_a = net.add_node("a", 2)
        netns_b = net.add_node("b", 3, 4)  # node B's second address is the one DNS gives
        dns = Dnsmasq(net.address(1), 53, {"id-2.default.svc.cluster.local": net.address(4)}, work)
        dns.start()
        env_a = {
            "LAYOTTO_POLICY": str(policy),
            "LAYOTTO_INVOKE_RESOLVER_FILE": str(resolver_file),
            "LAYOTTO_INVOKE_DNS_SERVER": net.address(1),
        }
        nodes.append(start_node(netns_a, net.address(2), env_a, images, work, project_bin))
        nodes.append(start_node(netns_b, net.address(3), {}, images, work, project_bin))
        a, b = nodes
        b.run("echo", CALLEE_MODULE, "id_2", "log")
        a.run("caller", CALLER_MODULE, "id_1", "invoke")
        yield TwoNodes(a, b, net, resolver_file, token, dns)
    finally:
        for node in nodes:
            node.client.close()
            node.c.stop(remove_base=os.environ.get("LAYOTTO_KEEP_BASE") != "1")
        if dns is not None:
            dns.stop()
        net.remove()


@pytest.fixture(scope="module")
def two_nodes(
    project_bin: Path, wasm_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TwoNodes]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    with two_node_cluster(project_bin, wasm_dir, tmp_path_factory.mktemp("two-nodes")) as nodes:
        yield nodes


def echoed(body: str) -> dict[str, str]:
    """fn_echo's ``key=value`` lines (inside faas_fn1's sentence) as a dict."""
    return dict(line.split("=", 1) for line in body.splitlines() if "=" in line)


@pytest.mark.integration
def test_a_function_on_node_a_invokes_one_on_node_b_by_id(two_nodes: TwoNodes):
    a, b, net = two_nodes.a, two_nodes.b, two_nodes.net
    # Through the operator's resolver file: node B's first address.
    two_nodes.resolve_by_file({"default": {"id_2": f"{net.address(3)}:2045"}})
    status, body = a.get("id_1")
    assert status == 200, f"{status} {body}\n{a.diagnostics()}"
    assert body.startswith("There are method=POST") and body.endswith("inventories for book1.")
    seen = echoed(body)
    assert seen["h:id"] == "id_2" and seen["body"] == "book1"
    assert seen["h:host"] == f"{net.address(3)}:2045"
    assert seen["h:layotto-caller-namespace"] == "default"
    assert seen["h:layotto-caller"].startswith("default.")
    assert 0 < int(seen["h:layotto-deadline-ms"]) <= 10_000
    # Through cluster DNS (dnsmasq on the bridge): id-2.default.svc.cluster.local is node B's
    # second address.
    two_nodes.resolve_by_file({})
    status, body = a.get("id_1")
    assert status == 200, f"{status} {body}\n{a.diagnostics()}"
    assert echoed(body)["h:host"] == f"{net.address(4)}:2045"
    # Node B itself answers id_2 on its own ingress as well (the same function).
    assert b.get("id_2", "/direct")[0] == 200


@pytest.mark.integration
def test_the_runtime_api_invokes_across_nodes_with_precise_errors(two_nodes: TwoNodes):
    from tests.test_faas import RuntimeApi

    a, net = two_nodes.a, two_nodes.net
    two_nodes.resolve_by_file({"default": {"down": f"{net.address(3)}:1"}})
    sock = a.c.state / "layotto" / "runtime.sock"
    wait_for(sock.exists, what=f"the Runtime API socket {sock}")
    api = RuntimeApi(sock, two_nodes.token)
    try:

        def invoke(target: str) -> pb.InvokeResponse:
            message = pb.CommonInvokeRequest(method="hello", data=any_pb2.Any(value=b"from the sidecar"))
            rpc = api.channel.unary_unary(
                "/spec.proto.runtime.v1.Runtime/InvokeService",
                request_serializer=pb.InvokeServiceRequest.SerializeToString,
                response_deserializer=pb.InvokeResponse.FromString,
            )
            request = pb.InvokeServiceRequest(id=target, message=message)
            return rpc(request, timeout=30, metadata=api.metadata)

        seen = echoed(invoke("id_2").data.value.decode())
        assert seen["path"] == "/hello" and seen["body"] == "from the sidecar"
        assert seen["h:layotto-caller"] == "default.sidecar"
        # The client's 30 s deadline, not the invoker's own 10 s (gRPC may round it up a little).
        assert 10_000 < int(seen["h:layotto-deadline-ms"]) <= 31_000
        with pytest.raises(grpc.RpcError) as info:
            invoke("nobody")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        details = info.value.details()
        assert f"nobody.default.svc.cluster.local. on {net.address(1)}:53" in details
        assert str(two_nodes.resolver_file) in details
        with pytest.raises(grpc.RpcError) as info:
            invoke("down")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"{net.address(3)}:1" in info.value.details()
    finally:
        api.close()


@pytest.mark.integration
def test_a_local_id_stays_in_process(two_nodes: TwoNodes):
    a = two_nodes.a
    two_nodes.resolve_by_file({})  # DNS would send id_2 to node B
    pod = a.run("local-echo", CALLEE_MODULE, "id_2", "log")
    try:
        status, body = a.get("id_1")
        assert status == 200, f"{status} {body}\n{a.diagnostics()}"
        seen = echoed(body)
        # In process: no HTTP request was made, so none of the cross-node headers exist.
        assert seen["body"] == "book1" and "h:host" not in seen and "h:layotto-caller" not in seen
    finally:
        a.client.remove_pod(pod.id)
        a.pods.remove(pod)

"""Calls across nodes: ``layotto_invoke`` of a function id that does not run on this node
goes over HTTP to that function's Service (docs/abi.md, "Calls across nodes").

- **Where**: a :class:`Resolver` turns (id, namespace) into ``host:port``. Two exist: the
  operator's static file (:class:`StaticResolver`, a YAML map namespace → id → address) and
  cluster DNS (:class:`DnsResolver`, the A record of ``<id>.<namespace>.svc.<domain>`` on
  the DNS server the operator names, at the Service port, 2045 by default).
- **What travels**: the request carries the ``id`` header (the target node's ingress
  routes by it), the caller's identity (``layotto-caller``, ``layotto-caller-namespace``)
  and its deadline (``layotto-deadline-ms``: milliseconds left when the request is sent).
- **Errors** name their cause: an id no resolver knows is NOT_FOUND naming the name looked
  up (HTTP 404); a refused connection or a failing resolver is 503 and a call past the
  caller's deadline 504, each naming the address (:class:`RemoteError`).

The network call itself is :meth:`RemoteInvoker.send`: one blocking function, bounded by the
deadline, over a pool of keep-alive connections (urllib3).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import urllib3
import yaml

from layotto.host.errors import AbiStatus, Status

log = logging.getLogger(__name__)

DEFAULT_PORT = 2045  # Layotto's ingress port, the function Service's port
DEFAULT_CLUSTER_DOMAIN = "cluster.local"
MAX_RESPONSE = 4 << 20  # the ABI's largest value (abi/layotto_abi.yaml max_value)

# The headers a cross-node call carries (docs/abi.md).
CALLER_HEADER = "layotto-caller"
CALLER_NAMESPACE_HEADER = "layotto-caller-namespace"
DEADLINE_HEADER = "layotto-deadline-ms"

# A function id that may leave the node: letters, digits, '-' and '_' (Layotto's ids are
# ``id_1``), starting and ending with a letter or digit, at most 63 characters. Its DNS
# label is the id in lower case with '_' as '-'. A namespace is a Kubernetes namespace: an
# RFC 1123 label.
_ID = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?")
_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
_DOMAIN = re.compile(r"(?:[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")


class RemoteError(AbiStatus):
    """A cross-node call that failed, with the HTTP status that says how: 404 (nobody
    serves the id), 503 (the address or the resolver is unreachable), 504 (the caller's
    deadline passed), 502 (the callee answered an error)."""

    def __init__(self, http_status: int, why: str) -> None:
        super().__init__(Status.NOT_FOUND if http_status == 404 else Status.INTERNAL_FAILURE, why)
        self.http_status = http_status


@dataclass(frozen=True)
class Target:
    """Who a cross-node call is for: a function id in a namespace."""

    id: str
    namespace: str

    @property
    def label(self) -> str:
        """The id as a DNS label (the name of its Service)."""
        return self.id.lower().replace("_", "-")


def check_target(function_id: str, namespace: str) -> Target:
    """``Target(function_id, namespace)`` once both are safe to put in a DNS name and a
    header; RemoteError 404 naming what is wrong otherwise."""
    if not _ID.fullmatch(function_id):
        raise RemoteError(
            404,
            f"function id {function_id!r} cannot be called on another node: an id that leaves the "
            "node has 1-63 letters, digits, '-' or '_', starting and ending with a letter or digit",
        )
    if not _LABEL.fullmatch(namespace):
        raise RemoteError(404, f"namespace {namespace!r} is not a DNS label (RFC 1123)")
    return Target(function_id, namespace)


def parse_address(text: str, default_port: int, what: str) -> tuple[str, int]:
    """``host[:port]`` (an IPv6 address in brackets) → (host, port); ValueError naming
    ``what`` when it is malformed."""
    text = text.strip()
    host, port = text, default_port
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{what}: {text!r} is not host[:port]")
        if rest:
            port = _port(rest[1:], what, text)
    elif text.count(":") == 1:
        host, _, rest = text.partition(":")
        port = _port(rest, what, text)
    if not host or any(c.isspace() or c in "/?#@" for c in host):
        raise ValueError(f"{what}: {text!r} is not host[:port]")
    return host, port


def _port(text: str, what: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{what}: {whole!r} has no valid port (1-65535)")
    return int(text)


class Resolver(Protocol):
    def resolve(self, target: Target, deadline: float) -> tuple[str, int] | None:
        """(host, port) of ``target``'s Service, or None when this resolver does not know
        it. Raises RemoteError when it cannot tell (503/504)."""
        ...


class StaticResolver:
    """The operator's map of functions on other nodes, a YAML file::

        default:                     # namespace
          id_2: 10.0.0.12:2045       # function id: host[:port] of its Service
          inventory: inventory.shop.example:8080

    The file is read again when it changes (its modification time)."""

    def __init__(self, path: Path, default_port: int = DEFAULT_PORT) -> None:
        self.path = Path(path)
        self.default_port = default_port
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._map: dict[tuple[str, str], tuple[str, int]] = {}
        self._load()  # a bad file fails the host's start, naming the entry

    def _load(self) -> None:
        try:
            stat = os.stat(self.path)
        except OSError as exc:
            raise ValueError(f"invoke resolver file {self.path}: {exc.strerror or exc}") from exc
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        self._map = parse_static_map(self.path.read_text(), str(self.path), self.default_port)
        self._stamp = stamp

    def resolve(self, target: Target, deadline: float) -> tuple[str, int] | None:
        with self._lock:
            try:
                self._load()
            except (ValueError, OSError) as exc:  # keep the last good map; say why
                log.warning("%s; keeping the previous map", exc)
            return self._map.get((target.namespace, target.id))


def parse_static_map(text: str, source: str, default_port: int) -> dict[tuple[str, str], tuple[str, int]]:
    """The entries of a static resolver file: (namespace, id) → (host, port). ValueError
    naming the file and the entry when one is malformed."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"invoke resolver file {source}: not YAML: {exc}") from exc
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ValueError(f"invoke resolver file {source}: expected a map of namespace to (id: host:port)")
    entries: dict[tuple[str, str], tuple[str, int]] = {}
    for namespace, ids in doc.items():
        if not isinstance(namespace, str) or not _LABEL.fullmatch(namespace):
            raise ValueError(f"invoke resolver file {source}: namespace {namespace!r} is not a DNS label")
        if not isinstance(ids, dict):
            raise ValueError(f"invoke resolver file {source}: {namespace}: expected a map of id to host:port")
        for function_id, address in ids.items():
            where = f"invoke resolver file {source}: {namespace}.{function_id}"
            if not isinstance(function_id, str) or not _ID.fullmatch(function_id):
                raise ValueError(f"{where}: not a function id that may leave the node")
            if not isinstance(address, str):
                raise ValueError(f"{where}: expected host[:port], got {address!r}")
            entries[(namespace, function_id)] = parse_address(address, default_port, where)
    return entries


class DnsResolver:
    """Cluster DNS: the A (else AAAA) record of ``<label>.<namespace>.svc.<domain>.`` on
    ``server`` (``ip[:port]``; ``system``: the host's /etc/resolv.conf), at ``port``.
    Answers are cached for their TTL; an alias out of ``svc.<domain>`` is refused."""

    def __init__(self, server: str, domain: str = DEFAULT_CLUSTER_DOMAIN, port: int = DEFAULT_PORT) -> None:
        import dns.resolver

        domain = domain.strip().strip(".").lower()
        if not _DOMAIN.fullmatch(domain):
            raise ValueError(f"cluster domain {domain!r} is not a DNS name")
        self.domain = domain
        self.port = port
        if server.strip() == "system":
            self.resolver = dns.resolver.Resolver()
            self.server = ",".join(self.resolver.nameservers)
        else:
            host, dns_port = parse_address(server, 53, "invoke DNS server")
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"invoke DNS server {server!r}: give an IP address, not a name") from None
            self.resolver = dns.resolver.Resolver(configure=False)
            self.resolver.nameservers = [host]
            self.resolver.port = dns_port
            self.server = f"{host}:{dns_port}"
        self.resolver.cache = dns.resolver.LRUCache()

    def name(self, target: Target) -> str:
        return f"{target.label}.{target.namespace}.svc.{self.domain}."

    def resolve(self, target: Target, deadline: float) -> tuple[str, int] | None:
        import dns.exception
        import dns.resolver

        name = self.name(target)
        for rdtype in ("A", "AAAA"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise RemoteError(
                    504, f"the caller's deadline passed while resolving {name} on {self.server}"
                )
            try:
                answer = self.resolver.resolve(name, rdtype, lifetime=left, search=False)
            except dns.resolver.NXDOMAIN:
                return None
            except dns.resolver.NoAnswer:
                continue
            except dns.resolver.LifetimeTimeout as exc:
                raise RemoteError(504, f"DNS server {self.server} did not answer for {name} in time") from exc
            except (dns.resolver.NoNameservers, dns.exception.DNSException) as exc:
                raise RemoteError(503, f"DNS server {self.server} failed for {name}: {exc}") from exc
            # An ExternalName Service is a CNAME out of the cluster: a tenant could point it
            # anywhere, and the node host's requests leave from the node, outside every
            # NetworkPolicy. Only names inside the cluster's Services are followed.
            canonical = answer.canonical_name.to_text().lower()
            if not canonical.endswith(f".svc.{self.domain}."):
                raise RemoteError(
                    404,
                    f"{name} is an alias of {canonical}, outside the cluster's Services "
                    "(an ExternalName Service): not called",
                )
            address = ipaddress.ip_address(str(answer[0].address))
            # Manual Endpoints of a headless Service are the tenant's too: never a link-local
            # address (cloud metadata) or a non-unicast one. (Loopback, which Kubernetes
            # refuses in Endpoints, would reach only this node's own ingress.)
            if address.is_link_local or address.is_multicast or address.is_unspecified:
                raise RemoteError(404, f"{name} resolves to {address}, which a Service never has: not called")
            return str(address), self.port
        return None


class RemoteInvoker:
    """Calls functions on other nodes: resolves the target through ``resolvers`` (the first
    that knows it wins) and POSTs the call there over a shared connection pool."""

    def __init__(self, resolvers: Sequence[Resolver], pool_size: int = 32) -> None:
        if not resolvers:
            raise ValueError("RemoteInvoker needs at least one resolver")
        self.resolvers = list(resolvers)
        self.pool = urllib3.PoolManager(num_pools=64, maxsize=pool_size, block=False, retries=False)

    def describe(self, target: Target) -> str:
        """What was looked up for ``target``, for a not-found error."""
        names = []
        for resolver in self.resolvers:
            if isinstance(resolver, DnsResolver):
                names.append(f"DNS name {resolver.name(target)} on {resolver.server}")
            elif isinstance(resolver, StaticResolver):
                names.append(f"{target.namespace}.{target.id} in {resolver.path}")
        return " nor ".join(names) or f"{target.namespace}.{target.id}"

    def resolve(self, target: Target, deadline: float) -> tuple[str, int]:
        for resolver in self.resolvers:
            found = resolver.resolve(target, deadline)
            if found is not None:
                return found
        raise RemoteError(
            404,
            f"no function {target.id!r} in namespace {target.namespace!r} on this node, and "
            f"no Service found for it (looked up {self.describe(target)})",
        )

    def invoke(
        self, target: Target, method: str, data: bytes, caller: Mapping[str, str], deadline: float
    ) -> bytes:
        """Resolve ``target`` and :meth:`send` the call; RemoteError on any failure."""
        host, port = self.resolve(target, deadline)
        return self.send(host, port, target, method, data, caller, deadline)

    def send(
        self,
        host: str,
        port: int,
        target: Target,
        method: str,
        data: bytes,
        caller: Mapping[str, str],
        deadline: float,
    ) -> bytes:
        """POST ``data`` to ``/<method>`` at host:port with the ``id`` header, the caller's
        identity (``caller``: header → value) and its deadline. Blocks at most until
        ``deadline`` (time.monotonic()); returns the body of a 2xx answer."""
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        left = deadline - time.monotonic()
        if left <= 0:
            raise RemoteError(504, f"the caller's deadline passed before calling {target.id} at {address}")
        path = "/" + urllib.parse.quote(method.lstrip("/"), safe="/?=&-._~!$'()*+,;:@%")
        headers = {
            "id": target.id,
            "content-type": "application/octet-stream",
            DEADLINE_HEADER: str(max(1, int(left * 1000))),
            **caller,
        }
        url = f"http://{address}{path}"
        try:
            response = self.pool.request(
                "POST",
                url,
                body=data,
                headers=headers,
                timeout=urllib3.Timeout(connect=left, read=left),
                preload_content=False,
                redirect=False,
            )
        # NewConnectionError (refused, unreachable) is a kind of urllib3's TimeoutError.
        except urllib3.exceptions.NewConnectionError as exc:
            raise RemoteError(503, f"{target.id} at {address}: cannot connect: {_reason(exc)}") from exc
        except urllib3.exceptions.TimeoutError as exc:
            raise RemoteError(
                504, f"{target.id} at {address} did not answer within the caller's deadline"
            ) from exc
        except urllib3.exceptions.HTTPError as exc:
            raise RemoteError(503, f"{target.id} at {address}: {_reason(exc)}") from exc
        whole = False
        try:
            body = _read(response, deadline, f"{target.id} at {address}")
            whole = True
        finally:
            if not whole:
                response.close()  # a half-read connection never goes back to the pool
            response.release_conn()
        if response.status == 404:
            raise RemoteError(404, f"{target.id} at {address} answered 404: {_text(body)}")
        if response.status >= 300:
            status = response.status if response.status in (503, 504) else 502
            raise RemoteError(status, f"{target.id} at {address} answered {response.status}: {_text(body)}")
        return body

    def close(self) -> None:
        self.pool.clear()


def _read(response: urllib3.BaseHTTPResponse, deadline: float, who: str) -> bytes:
    """The body, at most MAX_RESPONSE bytes, read before ``deadline``: each read waits at
    most for the time left."""
    chunks: list[bytes] = []
    size = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RemoteError(504, f"{who} did not finish its answer within the caller's deadline")
        sock = getattr(getattr(response, "connection", None), "sock", None)
        if sock is not None:
            sock.settimeout(left)
        try:
            chunk = response.read(65536)
        except urllib3.exceptions.TimeoutError as exc:
            raise RemoteError(504, f"{who} did not finish its answer within the caller's deadline") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise RemoteError(503, f"{who}: the answer broke off: {_reason(exc)}") from exc
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_RESPONSE:
            raise RemoteError(502, f"{who} answered more than {MAX_RESPONSE} bytes")
        chunks.append(chunk)


def _reason(exc: BaseException) -> str:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower()
        cause = cause.__cause__ or cause.__context__
    text = str(exc)
    return text.split(": ", 1)[-1] if "Failed to establish" in text else text


def _text(body: bytes) -> str:
    return body[:200].decode(errors="replace").strip()


def build_remote(
    dns_server: str = "",
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
    resolver_file: str | Path = "",
    port: int = DEFAULT_PORT,
) -> RemoteInvoker | None:
    """The RemoteInvoker the operator's settings describe (the static file first, then
    DNS), or None when neither is set: calls stay on this node."""
    resolvers: list[Resolver] = []
    if str(resolver_file):
        resolvers.append(StaticResolver(Path(resolver_file), port))
    if dns_server:
        resolvers.append(DnsResolver(dns_server, cluster_domain, port))
    return RemoteInvoker(resolvers) if resolvers else None

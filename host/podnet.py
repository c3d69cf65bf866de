"""Function pods served on their pod IPs: a listening socket inside each pod's network namespace.

The node host is one process in the node's network namespace, but Kubernetes reaches a pod
at its pod IP, inside the namespace CNI gave the pod's sandbox. A socket keeps the network
namespace it was created in, so the host creates each pod's listening socket on a
short-lived thread that has entered the pod's namespace (``setns``), and serves it from the
same event loop as the node-wide ingress (:meth:`~layotto.host.ingress.Ingress.serve_pod`).

- Only the sandbox's OCI spec names the CNI namespace (its ``linux.namespaces`` entry of
  type ``network``); a function container finds its pod by the sandbox id CRI puts in its
  annotations (:attr:`~layotto.host.workload.ContainerSpec.sandbox_id`), in the same
  containerd namespace and Kubernetes namespace.
- One listener per pod and port (``layotto.io/port``, default 2045), opened before the
  function's container reports running, closed when its last function container stops and
  when the sandbox stops, with every connection accepted on it. No descriptor of the
  namespace is kept open.
- Routing on a pod's listener: no ``id`` header goes to the pod's first function container
  that is serving; an ``id`` header picks among the pod's own functions (another id: 404).
  ``GET /healthz`` that the function answers 404 is answered by the host (200).

Users' view: docs/networking.md.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import re
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from layotto.host.function_instances import Request, Response

if TYPE_CHECKING:
    from layotto.host.function import Function

__all__ = [
    "DEFAULT_POD_PORT",
    "HEALTH_PATH",
    "PORT_ANNOTATION",
    "PodListener",
    "PodNetworks",
    "PodServer",
    "open_listener",
    "pod_port",
]

log = logging.getLogger(__name__)

DEFAULT_POD_PORT = 2045
PORT_ANNOTATION = "layotto.io/port"
HEALTH_PATH = b"/healthz"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_PORT = re.compile(r"[0-9]{1,5}")


def pod_port(annotations: Mapping[str, str]) -> int:
    """The port a pod's functions listen on: ``layotto.io/port``, else 2045.
    ValueError (naming the annotation and the value) when it is not a TCP port."""
    raw = annotations.get(PORT_ANNOTATION)
    if raw is None:
        return DEFAULT_POD_PORT
    text = raw.strip()
    if not _PORT.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise ValueError(f"annotation {PORT_ANNOTATION}={raw[:40]!r} is not a TCP port (1-65535)")
    return int(text)


def _same_netns_as_host(path: str) -> bool:
    """True when ``path`` is this process's own network namespace (a host-network pod)."""
    try:
        theirs = os.stat(path)
        ours = os.stat("/proc/self/ns/net")
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        why = "not a network namespace" if err == errno.EINVAL else os.strerror(err)
        raise OSError(err, f"entering the network namespace {what}: {why}")


def _bind(port: int) -> socket.socket:
    """A listening TCP socket on every address of the calling thread's namespace: dual
    stack when the namespace has IPv6, else IPv4 only."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        sock = None
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::", port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise
            sock = None
    if sock is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", port))
        except OSError:
            sock.close()
            raise
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _bind_in_netns(path: str, port: int) -> socket.socket:
    """Enter the namespace at ``path`` (this thread only), bind, and come back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            _setns(target, path)
        finally:
            os.close(target)
        try:
            return _bind(port)
        finally:
            # (The thread ends right after; coming back matters only if that changes.)
            try:
                _setns(own, "of the node host")
            except OSError as exc:  # pragma: no cover - the kernel let us in, not out
                log.error("podnet: %s", exc)
    finally:
        os.close(own)


async def open_listener(path: str, port: int) -> socket.socket:
    """A non-blocking listening socket on ``port`` inside the network namespace at
    ``path``, made on a thread of its own (``setns`` changes only the calling thread).
    OSError names the namespace or the port."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[socket.socket] = loop.create_future()

    def deliver(sock: socket.socket | None, exc: BaseException | None) -> None:
        if done.cancelled():
            if sock is not None:
                sock.close()
        elif exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(sock)

    def run() -> None:
        try:
            sock = _bind_in_netns(path, port)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                exc = OSError(exc.errno, f"port {port} is already in use in the pod's network namespace")
            loop.call_soon_threadsafe(deliver, None, exc)
        except BaseException as exc:  # pragma: no cover - reported to the awaiting start
            loop.call_soon_threadsafe(deliver, None, exc)
        else:
            loop.call_soon_threadsafe(deliver, sock, None)

    threading.Thread(target=run, name="layotto-podnet", daemon=True).start()
    return await done


class PodServer(Protocol):
    """What :class:`PodNetworks` needs of the ingress (``layotto.host.ingress.Ingress``)."""

    async def serve_pod(self, sock: socket.socket, pod: PodListener) -> None: ...

    def close_pod(self, pod: PodListener) -> None: ...


class _Fixed:
    """A route that answers one response itself (shaped like a Function for the ingress)."""

    __slots__ = ("response",)

    def __init__(self, response: Response) -> None:
        self.response = response

    def call_inline(self, request: Request) -> Response:
        return Response(self.response.status, list(self.response.headers), self.response.body)

    async def call_threaded(self, request: Request) -> Response:  # pragma: no cover - inline only
        return self.call_inline(request)


_TEXT = [(b"content-type", b"text/plain")]
_HEALTHY = Response(200, _TEXT, b"ok\n")
_STARTING = _Fixed(Response(503, _TEXT, b"function not started yet\n"))


def _health(response: Response) -> Response:
    return Response(200, list(_HEALTHY.headers), _HEALTHY.body) if response.status == 404 else response


class _HealthFallback:
    """``GET /healthz`` to a function: its own answer, unless that is 404 (it defines no
    such path): then the host's 200, since the function is serving."""

    __slots__ = ("fn",)

    def __init__(self, fn: Function) -> None:
        self.fn = fn

    def call_inline(self, request: Request) -> Response | None:
        response = self.fn.call_inline(request)
        return None if response is None else _health(response)

    async def call_threaded(self, request: Request) -> Response:
        return _health(await self.fn.call_threaded(request))


@dataclass(eq=False)
class PodListener:
    """One pod's listening socket on one port, and the functions of the pod behind it."""

    sandbox: str
    port: int
    functions: list[Function] = field(default_factory=list)  # serving, in start order
    members: int = 0  # function containers attached (started or starting)
    ready: asyncio.Future[None] | None = None  # done once the socket is served (or failed)
    closed: bool = False

    def route(self, request: Request, function_id: bytes | None) -> object | None:
        """What answers ``request``: one of the pod's functions (by ``id`` header, else the
        first), the host itself (503 while none is serving), or None (404)."""
        functions = self.functions
        if function_id is not None:
            wanted = function_id.decode(errors="replace")
            fn = next((f for f in functions if f.id == wanted), None)
            if fn is None:
                return _STARTING if not functions and self.members else None
        elif functions:
            fn = functions[0]
        else:
            return _STARTING
        if request.path == HEALTH_PATH and request.method in (b"GET", b"HEAD"):
            return _HealthFallback(fn)
        return fn


@dataclass(eq=False)
class _Sandbox:
    netns: str
    tenant: str
    listeners: dict[int, PodListener] = field(default_factory=dict)


class PodNetworks:
    """The pods of this node that have a network namespace, and their listeners."""

    def __init__(self, server: PodServer | None = None) -> None:
        self.server = server
        self._sandboxes: dict[tuple[str, str], _Sandbox] = {}

    def attach_server(self, server: PodServer) -> None:
        """The ingress that serves the pods' sockets (the composition root sets it)."""
        self.server = server

    def add_sandbox(self, namespace: str, sandbox_id: str, netns: str, tenant: str) -> bool:
        """A sandbox started with its network namespace at ``netns``. False (and nothing
        remembered) when that is the node's own namespace: host network."""
        if _same_netns_as_host(netns):
            return False
        self._sandboxes[(namespace, sandbox_id)] = _Sandbox(netns, tenant)
        return True

    def remove_sandbox(self, namespace: str, sandbox_id: str) -> None:
        """The sandbox stopped: close every listener it still has."""
        sandbox = self._sandboxes.pop((namespace, sandbox_id), None)
        if sandbox is None:
            return
        for listener in sandbox.listeners.values():
            self._close(listener)
        sandbox.listeners.clear()

    @property
    def listeners(self) -> list[PodListener]:
        """Every open pod listener."""
        return [lis for sb in self._sandboxes.values() for lis in sb.listeners.values()]

    async def attach(self, namespace: str, sandbox_id: str, tenant: str, port: int) -> PodListener | None:
        """A function container of the sandbox is starting: its pod's listener on ``port``
        (opened now if the pod has none there yet). None when the sandbox is not known
        here with a namespace (host network, or no pod), or belongs to another tenant.
        OSError when the socket cannot be opened."""
        sandbox = self._sandboxes.get((namespace, sandbox_id))
        if sandbox is None or self.server is None:
            return None
        if sandbox.tenant != tenant:
            log.warning(
                "podnet: a container of namespace %r named sandbox %s of %r",
                tenant,
                sandbox_id,
                sandbox.tenant,
            )
            return None
        listener = sandbox.listeners.get(port)
        if listener is None:
            listener = PodListener(sandbox_id, port)
            listener.ready = asyncio.get_running_loop().create_future()
            sandbox.listeners[port] = listener
            listener.members += 1
            try:
                sock = await open_listener(sandbox.netns, port)
                if listener.closed:  # the sandbox went meanwhile
                    sock.close()
                    raise OSError(errno.ESHUTDOWN, "the pod sandbox stopped while its listener opened")
                await self.server.serve_pod(sock, listener)
            except BaseException as exc:
                listener.members -= 1
                if sandbox.listeners.get(port) is listener:
                    del sandbox.listeners[port]
                listener.closed = True
                listener.ready.set_exception(exc if isinstance(exc, Exception) else OSError("cancelled"))
                listener.ready.exception()  # (retrieved: those waiting re-raise it themselves)
                raise
            listener.ready.set_result(None)
            return listener
        listener.members += 1
        try:
            await asyncio.shield(listener.ready)
        except BaseException:
            listener.members -= 1
            raise
        return listener

    def serve(self, listener: PodListener, fn: Function) -> None:
        """The function is ready: route the listener's requests to it too."""
        if not listener.closed and fn not in listener.functions:
            listener.functions.append(fn)

    def detach(self, listener: PodListener, fn: Function | None) -> None:
        """A function container stopped (or failed to start): the listener closes with
        the last of the pod's function containers on it."""
        if fn is not None and fn in listener.functions:
            listener.functions.remove(fn)
        listener.members -= 1
        if listener.members > 0 or listener.closed:
            return
        for sandbox in self._sandboxes.values():
            if sandbox.listeners.get(listener.port) is listener:
                del sandbox.listeners[listener.port]
                break
        self._close(listener)

    def _close(self, listener: PodListener) -> None:
        if listener.closed:
            return
        listener.closed = True
        listener.functions.clear()
        if self.server is not None:
            self.server.close_pod(listener)

    def close(self) -> None:
        """The host stops: close every pod listener."""
        for key in list(self._sandboxes):
            self.remove_sandbox(*key)

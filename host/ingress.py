"""The host's HTTP ingress: requests to functions, routed by id, over one asyncio.Protocol.

The parser is httptools (llhttp) and the server a plain ``asyncio.Protocol``, so that a
function that answers inline has its response ready in the same event-loop turn that parsed
the request. Responses are not written one by one: those of one turn are written together
at its end, because each write to a peer sleeping in epoll wakes it (a busy client is woken
once per burst; measured with wrk -c32 on 2 cores: 33k -> 48k requests/s for fn-hello).
A request head is counted as its bytes arrive and fed to httptools in slices, so the parser
never holds more of it than its limit and one slice. The limits and the connection
bookkeeping are in ``ingress_limits``, the response writer in ``ingress_render``.
Routing, status codes and limits as users see them: see docs/functions.md and
docs/security.md.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httptools

from layotto.host.function import Function, Request, Response
from layotto.host.function_registry import FunctionRegistry
from layotto.host.ingress_limits import BODY, CLOSING, FIRST, HEAD, IDLE, ConnectionBook, IngressLimits
from layotto.host.ingress_render import NOT_FOUND, render

if TYPE_CHECKING:
    from layotto.host.podnet import PodListener

__all__ = [
    "DEFAULT_BODY_LIMIT",
    "DEFAULT_PORT",
    "MAX_PIPELINED",
    "NOT_FOUND",
    "HttpProtocol",
    "Ingress",
    "IngressLimits",
    "render",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 2045
DEFAULT_BODY_LIMIT = 4 << 20
MAX_PIPELINED = 4  # requests read ahead on one connection while its function is busy


HOST_ERROR = Response(500, body=b"host error: the node host failed to run the call (see its log)\n")


def _field_bytes(headers: list[tuple[bytes, bytes]]) -> int:
    """The bytes of a request's header fields (names and values, as counted by the limit)."""
    return sum(len(name) + len(value) for name, value in headers)


class _Stop(Exception):
    """Raised from a parser callback after the connection was answered: parse no further."""


class HttpProtocol(asyncio.Protocol):
    """One client connection; requests are answered in order."""

    __slots__ = (
        "server",
        "parser",
        "transport",
        "_url",
        "_headers",
        "_body",
        "_body_size",
        "_too_large",
        "_fid",
        "_paused",
        "_write_paused",
        "_busy",
        "_halted",
        "_pending",
        "_phase",
        "_since",
        "_head_bytes",
        "_frame",
        "_held",
        "_peer",
        "_open",
        "_raw",
        "_unsent",
        "_pod",
        "_slice",
        "_slice_over",
        "_max_url",
        "_max_headers",
        "_fed_phase",
        "_fed_body",
    )

    def __init__(self, server: Ingress, pod: PodListener | None = None) -> None:
        self.server = server
        self._pod = pod  # accepted on a pod's own listener: routed among that pod's functions
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        # None once the connection's last response is queued (or it is lost): write no more.
        self.transport: asyncio.Transport | None = None
        self._raw: asyncio.Transport | None = None  # the transport until the connection is lost
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._body_size = 0
        self._too_large = False
        self._fid: bytes | None = None
        self._paused = False  # reading paused: too many pipelined requests
        self._write_paused = False  # reading paused: the client does not read its responses
        self._busy = False
        self._halted = False  # parse nothing more: answered with an error, or closing
        self._pending: collections.deque[tuple[Function | Response | None, Request | None, bool]] = (
            collections.deque()
        )
        self._phase = IDLE
        self._since = 0.0  # when the connection entered its phase (the server's coarse clock)
        self._head_bytes = 0  # bytes of the current head so far (-1: it began in this feed)
        self._fed_phase = IDLE  # the phase and body bytes of a request still arriving after
        self._fed_body = 0  # the last feed (_count's: where the next feed begins)
        # Bytes of the current body that were not body (chunk framing, trailers), less 32 per
        # chunk (what a chunk's framing may take beyond max_header_bytes).
        self._frame = 0
        self._held = 0  # request-body bytes of this connection counted in the server's budget
        self._peer: str | None = None
        self._open = False  # counted among the server's connections
        self._unsent = -1  # closing: bytes the client had not taken at the last check
        # (the server's, read on every request: copied here, one attribute lookup apiece)
        self._slice = server._slice
        self._slice_over = server._slice_over
        self._max_url = server.limits.max_url_bytes
        self._max_headers = server.limits.max_headers

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = self._raw = transport
        refusal = self.server._admit(self, transport)
        if refusal is not None:
            self._halted = True
            self.transport = None
            transport.write(refusal)
            transport.close()

    def data_received(self, data: bytes | memoryview) -> None:
        if self._halted:
            return
        if len(data) > self._slice:
            size = self._slice
            # Fed in slices: a head that begins inside a slice is counted exactly from the
            # next one, so httptools never holds more of a head than its limit and a slice.
            view = memoryview(data)
            for start in range(0, len(data), size):
                self.data_received(view[start : start + size])
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if not self._halted:
                self._error(400, b"upgrades are not supported\n")
            return
        except httptools.HttpParserError as exc:
            if not self._halted:  # (otherwise a callback answered and stopped the parser)
                self._error(400, f"malformed request: {exc}\n".encode())
            return
        if self._phase and not self._halted:  # a request is still arriving (IDLE is 0)
            self._count(len(data))

    def _count(self, size: int) -> None:
        """Bound what httptools holds of a request that is still arriving (after a feed of
        *size* bytes), and stamp the phase it entered in that feed.

        The stamps of a head and a body are taken here, not by on_message_begin and
        on_headers_complete: only the sweep reads them, between callbacks, and the server's
        clock does not move within one. (A request that arrives in one feed never gets
        here: on_message_complete stamps its end.)"""
        phase = self._phase
        if phase == HEAD:
            if self._head_bytes < 0:  # the head began in this feed: what the callbacks saw of it
                self._since = self.server.now
                self._head_bytes = len(self._url) + _field_bytes(self._headers)
            else:
                self._head_bytes += size
            if self._head_bytes > self.server.limits.max_header_bytes:
                self._error(431, b"request header fields too large\n")
                return
        elif phase == BODY:
            if self._head_bytes < 0:  # the message began in this feed: count from the next one
                self._since = self.server.now
                self._head_bytes = 0
            elif self._fed_phase == BODY:  # (the same message's body all along) its framing and trailers
                self._frame += size - (self._body_size - self._fed_body)
                if self._frame > self.server.limits.max_header_bytes:
                    self._error(431, b"request chunk framing or trailers too large\n")
                    return
            else:  # its head ended in this feed
                self._since = self.server.now
        # (A later feed that does not begin a message goes on with this one from here.)
        self._fed_phase = phase
        self._fed_body = self._body_size

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = self._raw = None
        self._halted = True
        self._body = []
        self._pending.clear()
        self._release(self._held)
        self.server._forget(self)
        self.parser = None  # (it refers back to this protocol: free both now, not at a GC pass)

    def pause_writing(self) -> None:
        # The client does not read its responses: read no more requests from it until it does.
        self._write_paused = True
        if self._raw is not None:
            self._raw.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._phase == IDLE:
            self._since = self.server.now
        self._resume()

    def _resume(self) -> None:
        if not (self._paused or self._write_paused or self._halted) and self.transport is not None:
            self.transport.resume_reading()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._fid = None
        self._url = b""
        self._headers = []
        self._body_size = 0
        self._too_large = False
        self._phase = HEAD
        self._head_bytes = -1
        self._frame = 0
        # (its stamp: see _count)

    def on_url(self, url: bytes) -> None:
        if self._url:  # (the URL came in pieces)
            url = self._url + url
        self._url = url
        if len(url) > self._max_url:
            self._error(414, b"request URL too long\n")
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        # (Checked at the end of the head: until then what a head can hold is bounded by
        # the bytes counted as they arrive.)
        name = name.lower()
        if name == b"id":
            self._fid = value
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._phase = BODY  # (its stamp: see _count)
        # The bytes of the header fields are only added up for a head that came in several
        # feeds (or when a slice may be larger than the limit): one that began in this feed
        # holds fewer than the slice's bytes, at most max_header_bytes.
        if len(self._headers) > self._max_headers or (
            (self._head_bytes >= 0 or self._slice_over)
            and _field_bytes(self._headers) > self.server.limits.max_header_bytes
        ):
            self._error(431, b"request header fields too large\n")
            raise _Stop

    def on_chunk_header(self) -> None:
        self._frame -= 32  # (the framing a chunk may take, see __init__)

    def on_body(self, body: bytes) -> None:
        size = len(body)
        self._body_size += size
        srv = self.server
        if self._body_size > srv.body_limit:
            if not self._too_large:  # read the rest, keep none of it
                self._too_large = True
                self._body = []
                self._release(self._body_size - size)
            return
        if srv.body_bytes + size > srv.limits.body_budget:
            self._error(503, b"ingress busy: too many request bodies in flight\n")
            raise _Stop
        srv.body_bytes += size
        self._held += size
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._phase = IDLE
        srv = self.server
        self._since = srv.now
        if self._too_large:
            self._error(413, b"request body too large\n")
            raise _Stop
        parser: httptools.HttpRequestParser = self.parser
        keep_alive = parser.should_keep_alive()
        path, _, query = self._url.partition(b"?")
        parts = self._body
        if parts:
            body = parts[0] if len(parts) == 1 else b"".join(parts)
            self._body = []
        else:
            body = b""
        request = Request(parser.get_method(), path, query, self._headers, body)
        fid = self._fid
        if self._pod is None:
            # (the id of a header that is one function's id: found without decoding it)
            fn = srv.registry.sole.get(fid) or srv.route(request, fid)
        else:
            fn = self._pod.route(request, fid)
        if not keep_alive:  # its response is the connection's last: parse nothing after it
            self._halted = True
        if self._busy or self._pending:
            self._pending.append((fn, request, keep_alive))
            if len(self._pending) >= MAX_PIPELINED and self.transport is not None and not self._paused:
                # A client pipelining requests to a busy function: stop reading its socket
                # until they are answered (TCP back-pressure), never buffer without bound.
                self._paused = True
                self.transport.pause_reading()
        else:
            self._serve(fn, request, keep_alive)
        if not keep_alive:
            raise _Stop

    # serving
    def _serve(self, fn: Function | None, request: Request, keep_alive: bool) -> None:
        if fn is None:
            self._respond(NOT_FOUND, keep_alive, request)
            return
        try:
            response = fn.call_inline(request)
        except Exception:  # a host bug: 500 (not a parser error, 400), and the host goes on
            log.exception("ingress: function %s: inline call failed", fn.id)
            response = HOST_ERROR
        if response is not None:  # answered inline, in this event-loop turn
            transport = self.transport
            if keep_alive and transport is not None and not request.body:
                # _respond and Ingress.send in their common case, inline (nothing to release)
                data = render(response, True, request.method == b"HEAD")
                srv = self.server
                outbox = srv._outbox
                if not outbox:
                    asyncio.get_running_loop().call_soon(srv._flush)
                outbox.append((transport, data, 0))
            else:
                self._respond(response, keep_alive, request)
            return
        # The function runs on worker threads: finish as a task, keep the order.
        self._busy = True
        task = asyncio.ensure_future(fn.call_threaded(request))
        task.add_done_callback(lambda t, ka=keep_alive, r=request: self._finished(t, ka, r))

    def _drain(self) -> None:
        while self._pending and not self._busy and self.transport is not None:
            fn, request, keep_alive = self._pending.popleft()
            if request is None:  # an error, answered in its turn
                self._respond(fn, keep_alive, linger=True)
            else:
                self._serve(fn, request, keep_alive)
        if self._paused and len(self._pending) < MAX_PIPELINED // 2 and self.transport is not None:
            self._paused = False
            self._resume()

    def _finished(self, task: asyncio.Future[Response], keep_alive: bool, request: Request) -> None:
        self._busy = False
        try:
            response = task.result()
        except Exception:  # a host bug: its details go to the host's log, not to the client
            log.exception("ingress: function call failed")
            response = HOST_ERROR
        if self._phase == IDLE:  # idle from now on
            self._since = self.server.now
        self._respond(response, keep_alive, request)
        self._drain()

    def _respond(
        self, response: Response, keep_alive: bool, request: Request | None = None, *, linger: bool = False
    ) -> None:
        head = False
        if request is not None:
            if request.body:
                self._release(len(request.body))
            head = request.method == b"HEAD"
        if self.transport is None:
            return
        data = render(response, keep_alive, head)
        if keep_alive:
            self.server.send(self.transport, data)
        else:
            self.server.send(self.transport, data, close=True, linger=linger)
            self._closing()

    def _closing(self) -> None:
        """The connection's last bytes are queued, and its close after them. It gets a
        little time to take them (again as long as it keeps taking them); what it still
        sends meanwhile is read and dropped."""
        self.transport = None
        self._halted = True
        self._unsent = -1
        self._phase = CLOSING
        self._since = self.server.now

    def _release(self, size: int) -> None:
        if 0 < size <= self._held:  # (nothing is held any more once the connection is lost)
            self._held -= size
            self.server.body_bytes -= size

    def _error(self, status: int, body: bytes) -> None:
        """Answer *status* in its turn (after the responses of requests before it), then
        close: nothing more is parsed, and the request's partial body is let go."""
        self._halted = True
        self._phase = IDLE
        if self._body:
            self._release(sum(map(len, self._body)))
            self._body = []
        response = Response(status, body=body)
        if self._busy or self._pending:
            self._pending.append((response, None, False))
            if self._raw is not None:
                self._raw.pause_reading()
        else:
            self._respond(response, keep_alive=False, linger=True)

    def _expire(self) -> None:
        """The connection's deadline passed (the server's sweep found it)."""
        if self._phase == CLOSING:  # its last response not yet taken by the client
            raw = self._raw
            if raw is None:
                return
            unsent = raw.get_write_buffer_size()
            if unsent and (self._unsent < 0 or unsent < self._unsent):  # it still reads: wait
                self._unsent = unsent
                self._since = self.server.now
            else:
                raw.abort()
            return
        if self.transport is None:  # (lost)
            return
        if self._phase in (IDLE, FIRST):  # between requests: just close
            self.server.send(self.transport, b"", close=True)
            self._closing()
            return
        self._error(408, b"request timed out\n")


class Ingress(ConnectionBook):
    """The HTTP listener in front of every function on the node (its connection accounting
    and deadlines: :class:`~layotto.host.ingress_limits.ConnectionBook`)."""

    def __init__(
        self,
        registry: FunctionRegistry,
        *,
        body_limit: int = DEFAULT_BODY_LIMIT,
        limits: IngressLimits | None = None,
    ) -> None:
        super().__init__(limits or IngressLimits())
        self.registry = registry
        self.body_limit = body_limit
        self._slice = max(1024, min(self.limits.max_header_bytes, 64 << 10))
        self._slice_over = self._slice > self.limits.max_header_bytes  # (a head in one slice may pass it)
        self._servers: list[asyncio.base_events.Server] = []
        self._pod_servers: dict[PodListener, asyncio.base_events.Server] = {}
        self._outbox: list[tuple[asyncio.Transport, bytes, int]] = []
        # Ids this host does not serve: a stand-in that forwards the request to the host of
        # another layotto version that does (layotto.host.upgrade), or None.
        self.forward: Callable[[str], Any] | None = None

    def send(
        self, transport: asyncio.Transport, data: bytes, *, close: bool = False, linger: bool = False
    ) -> None:
        """Queue a response; the queue is written at the end of this event-loop turn, in
        order (so a connection's responses keep their order, a close comes after its data).
        ``linger``: close only the sending side, so that a client still sending (its
        request was refused) reads the response instead of a reset; the connection is
        cut after ``linger`` seconds."""
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append((transport, data, (2 if linger else 1) if close else 0))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        for transport, data, close in outbox:
            if transport.is_closing():  # the client went away meanwhile
                continue
            if not close:  # (a response, kept alive: the common case first)
                transport.write(data)
                continue
            if data:
                transport.write(data)
            if close == 2 and transport.can_write_eof():
                transport.write_eof()
                transport.resume_reading()  # (read and drop what it still sends)
            else:
                transport.close()

    def route(self, request: Request, function_id: bytes | None = None) -> Function | None:
        """The function a request is for: its ``id`` header, else ``/fn/<id>/...``
        (whose prefix is then cut from the path the function sees)."""
        if function_id is not None:
            fid = function_id.decode(errors="replace")
            return self.registry.get(fid) or self._elsewhere(fid)
        path = request.path
        if path.startswith(b"/fn/"):
            raw, slash, tail = path[4:].partition(b"/")
            request.path = b"/" + tail if slash else b"/"
            fid = raw.decode(errors="replace")
            return self.registry.get(fid) or self._elsewhere(fid)
        return None

    def _elsewhere(self, fid: str) -> Any:
        return None if self.forward is None else self.forward(fid)

    async def listen(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
        server = await loop.create_server(lambda: HttpProtocol(self), sock=sock, backlog=1024)
        self._servers.append(server)
        return sock.getsockname()[1]

    async def serve_pod(self, sock: socket.socket, pod: PodListener) -> None:
        """Serve ``sock``, a pod's listening socket (layotto.host.podnet), routed by ``pod``."""
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(lambda: HttpProtocol(self, pod), sock=sock, backlog=1024)
        except BaseException:
            sock.close()
            raise
        self._pod_servers[pod] = server
        if pod.closed:  # closed while the server was being set up
            self.close_pod(pod)

    def close_pod(self, pod: PodListener) -> None:
        """Close a pod's listening socket and every connection accepted on it."""
        server = self._pod_servers.pop(pod, None)
        if server is not None:
            server.close()
        for conn in [c for c in self._connections if c._pod is pod]:
            if conn._raw is not None:
                conn._raw.abort()

    async def adopt(self, sock: socket.socket) -> int:
        """Serve an already listening socket: the node's port handed over by the host of an
        older layotto version (the same socket: no connection is refused meanwhile), or a
        unix socket for requests other hosts forward. Returns its port (0 for unix)."""
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        server = await loop.create_server(lambda: HttpProtocol(self), sock=sock, backlog=1024)
        self._servers.append(server)
        name = sock.getsockname()
        return name[1] if isinstance(name, tuple) else 0

    def release(self) -> socket.socket | None:
        """Stop accepting on the node's port (open connections are still served) and
        return a duplicate of its listening socket, for a newer host to adopt."""
        handed = None
        for server in [s for s in self._servers if s.sockets and s.sockets[0].family != socket.AF_UNIX]:
            if handed is None:
                handed = socket.socket(fileno=os.dup(server.sockets[0].fileno()))
            server.close()
            self._servers.remove(server)
        return handed

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()
        for pod in list(self._pod_servers):
            self.close_pod(pod)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

"""The host's HTTP ingress: requests to functions, routed by id.

A request names its function with the ``id`` header (Layotto's convention) or with the
path ``/fn/<id>/...``. The parser is httptools (llhttp); the server is a plain
``asyncio.Protocol`` so that a function that answers inline has its response ready in the
same event-loop turn that parsed the request.

Responses are not written one by one as they are ready: the ingress collects those of one
event-loop turn and writes them together at its end. Every write to a loopback or LAN peer
that sleeps in epoll costs the writer a wake-up of that peer; a burst of writes wakes a busy
client once per burst instead of once per response (measured with wrk -c32 on 2 cores:
33k → 48k requests/s for fn-hello, at the same CPU per turn).

The ingress faces any network client, so everything a client can make it hold is bounded
(:class:`IngressLimits`):

- a request head (request line and header fields) is counted as its bytes arrive and
  refused past its limits (414 for the URL, 431 for the header fields), before httptools
  has buffered more than the limit and one read slice of it;
- a head must arrive within ``header_timeout`` of its first byte, a body within
  ``body_timeout`` of the end of its head, and a keep-alive connection is closed after
  ``idle_timeout`` without a request (408 when a request was under way). No deadline runs
  while a function computes the connection's response. One periodic sweep checks every
  connection's deadline stamp: the request path only stores a number;
- at most ``max_connections`` connections are open (by default what RLIMIT_NOFILE leaves
  after a reserve for containerd's ttrpc connections, mounts and module files); one more is
  answered 503 and closed at once;
- request bodies buffered across all connections stay within ``body_budget`` (503 and the
  connection closed past it), counted from their first byte until their response is
  written, and released when a connection is lost;
- a function's response headers are checked before they are written: a name that is not
  an RFC 7230 token or a value with CR, LF, NUL or another control character turns the
  response into a 500, so a function cannot forge a second response on the connection.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import resource
import socket
import time
from dataclasses import dataclass
from http import HTTPStatus

import httptools

from layotto.host.function import Function, Request, Response
from layotto.host.function_registry import FunctionRegistry

log = logging.getLogger(__name__)

DEFAULT_PORT = 2045
DEFAULT_BODY_LIMIT = 4 << 20
MAX_PIPELINED = 4  # requests read ahead on one connection while its function is busy


@dataclass(frozen=True, slots=True)
class IngressLimits:
    """What one client, and all of them together, can make the ingress hold.

    Sizes are bytes, timeouts seconds. A count of 0 for ``max_connections`` means "from
    RLIMIT_NOFILE" (see :meth:`connection_cap`); 0 for ``max_connections_per_ip`` means no
    per-address cap.
    """

    max_url_bytes: int = 8 << 10
    """The request target (path and query); longer: 414, connection closed."""
    max_header_bytes: int = 16 << 10
    """One request's head (request line and header fields; also its chunked framing and
    trailers beyond that of its body); larger: 431, connection closed."""
    max_headers: int = 100
    """Header fields (and trailers) of one request; more: 431, connection closed."""
    header_timeout: float = 10.0
    """From a request's first byte (or from the connection's start, for its first request)
    until the end of its head; later: 408, connection closed."""
    body_timeout: float = 30.0
    """From the end of a request's head until the end of its body; later: 408, closed."""
    idle_timeout: float = 60.0
    """A keep-alive connection without a request (after its last response) is closed."""
    max_connections: int = 0
    """Open ingress connections; one more is answered 503 and closed. 0: from RLIMIT_NOFILE."""
    fd_reserve_fraction: float = 0.25
    """The share of RLIMIT_NOFILE kept for everything but ingress connections (when
    ``max_connections`` is 0) ..."""
    fd_reserve_min: int = 1024
    """... and at least this many descriptors."""
    max_connections_per_ip: int = 0
    """Open connections from one client address; one more: 503, closed. 0: no cap."""
    body_budget: int = 64 << 20
    """Request-body bytes buffered across all connections (from their first byte until the
    response is written); a body that would go past it: 503, connection closed."""

    def __post_init__(self) -> None:
        for name in ("max_url_bytes", "max_header_bytes", "max_headers", "body_budget"):
            if getattr(self, name) <= 0:
                raise ValueError(f"IngressLimits.{name} must be positive")
        for name in ("header_timeout", "body_timeout", "idle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"IngressLimits.{name} must be positive")
        if self.max_connections < 0 or self.max_connections_per_ip < 0 or self.fd_reserve_min < 0:
            raise ValueError("IngressLimits: connection caps and the reserve cannot be negative")
        if not 0 <= self.fd_reserve_fraction < 1:
            raise ValueError("IngressLimits.fd_reserve_fraction must be in [0, 1)")

    def connection_cap(self, nofile: int | None = None) -> int:
        """``max_connections``, or when it is 0 what the descriptor limit *nofile* (default:
        this process's soft RLIMIT_NOFILE) leaves after the reserve: the larger of
        ``fd_reserve_fraction`` of it and ``fd_reserve_min``, but never less than a quarter
        of the limit for the ingress."""
        if self.max_connections:
            return self.max_connections
        if nofile is None:
            nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if nofile == resource.RLIM_INFINITY or nofile <= 0:
            nofile = 1 << 20
        reserve = max(self.fd_reserve_min, int(nofile * self.fd_reserve_fraction))
        return max(nofile - reserve, nofile // 4, 1)


# --------------------------------------------------------------------------- responses

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
NOT_FOUND = Response(404, body=b"no function with this id\n")
# The status line of every status a response may carry (a final response's three digits;
# 1xx would be read as an interim response, and the body then as the next response).
_STATUS_LINES = {s: b"HTTP/1.1 %d %s\r\n" % (s, _REASONS.get(s, b"Unknown")) for s in range(200, 1000)}
_NO_BODY = frozenset({204, 304})  # a client reads no body after these: never send one
_END, _END_CLOSE = b"\r\n", b"connection: close\r\n\r\n"
_MANAGED = frozenset({b"content-length", b"connection", b"transfer-encoding"})
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+").fullmatch
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]").search  # control characters but HTAB
# Header lines already checked, by (name, value): most functions answer the same few.
_LINES: dict[tuple[bytes, bytes], bytes] = {}
_LINES_MAX = 4096


def _header_problem(name: object, value: object) -> str | None:
    """Why a response header cannot be written, or None when it can."""
    if type(name) is not bytes or not _TOKEN(name):
        return f"name {_short(name)} is not an HTTP token"
    if type(value) is not bytes:
        return f"{_short(name)}: the value is not bytes"
    if _BAD_VALUE(value):
        return f"{_short(name)}: the value holds a control character (CR, LF, NUL, ...)"
    return None


def _header_line(pair: tuple[bytes, bytes]) -> bytes:
    """The line of a response header (empty for the ones the ingress writes itself)."""
    name, value = pair
    problem = _header_problem(name, value)
    if problem is not None:
        raise _Invalid(f"response header {problem}")
    return b"" if name.lower() in _MANAGED else b"%s: %s\r\n" % (name, value)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _invalid(cause: str) -> Response:
    return Response(500, body=f"function returned an invalid {cause}\n".encode())


def render(response: Response, keep_alive: bool, head: bool = False) -> bytes:
    """The response on the wire. A status outside 200-999, a header name that is not a
    token, a value with a control character, or a response that is not bytes is replaced
    by a 500 naming the cause: nothing a function returns is written unchecked. ``head``:
    the answer to a HEAD request (its content-length, no body)."""
    try:
        return _render(response, keep_alive, head)
    except _Invalid as exc:
        return _render(_invalid(str(exc)), keep_alive, head)


class _Invalid(Exception):
    pass


def _render(response: Response, keep_alive: bool, head: bool) -> bytes:
    status = response.status
    line = _STATUS_LINES.get(status) if type(status) is int else None
    if line is None:
        raise _Invalid(f"response status {_short(status)}")
    body = response.body
    if type(body) is not bytes:
        if not isinstance(body, (bytearray, memoryview)):
            raise _Invalid(f"response body of type {type(body).__name__}")
        body = bytes(body)
    parts = [line]
    lines = _LINES
    try:
        for pair in response.headers:
            try:
                text = lines.get(pair)
            except TypeError:  # (not a tuple)
                text = None
            if text is None:
                text = _header_line(pair)
                if len(lines) < _LINES_MAX and type(pair) is tuple:
                    lines[pair] = text
            if text:
                parts.append(text)
    except (TypeError, ValueError) as exc:  # not a list of pairs, ...
        raise _Invalid(f"response headers ({exc})") from None
    if status in _NO_BODY:
        parts.append(_END if keep_alive else _END_CLOSE)
        return b"".join(parts)
    parts.append(b"content-length: %d\r\n%s" % (len(body), _END if keep_alive else _END_CLOSE))
    if not head:
        parts.append(body)
    return b"".join(parts)


_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
    b"connection: close\r\n\r\n%s"
)


def _refusal(why: bytes) -> bytes:
    return _REFUSED % (len(why), why)


# --------------------------------------------------------------------------- connections

# Where a connection is: between requests, in a request's head, in its body, before its first
# request, or closing (its last response written or being written). Each has its timeout
# (Ingress._timeouts), counted from the connection's ``_since``.
_IDLE, _HEAD, _BODY, _FIRST, _CLOSING = 0, 1, 2, 3, 4


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
        "_hdr_bytes",
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
        "_chunks",
        "_held",
        "_peer",
        "_open",
        "_raw",
        "_unsent",
    )

    def __init__(self, server: Ingress) -> None:
        self.server = server
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        # None once the connection's last response is queued (or it is lost): write no more.
        self.transport: asyncio.Transport | None = None
        self._raw: asyncio.Transport | None = None  # the transport until the connection is lost
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._hdr_bytes = 0
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
        self._phase = _IDLE
        self._since = 0.0  # when the connection entered its phase (the server's coarse clock)
        self._head_bytes = 0  # bytes of the current head so far (-1: it began in this feed)
        self._frame = 0  # bytes of the current body that were not body (chunk framing, trailers)
        self._chunks = 0
        self._held = 0  # request-body bytes of this connection counted in the server's budget
        self._peer: str | None = None
        self._open = False  # counted among the server's connections
        self._unsent = -1  # closing: bytes the client had not taken at the last check

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = self._raw = transport  # type: ignore[assignment]
        refusal = self.server._admit(self, transport)  # type: ignore[arg-type]
        if refusal is not None:
            self._halted = True
            self.transport = None
            transport.write(refusal)  # type: ignore[attr-defined]
            transport.close()

    def data_received(self, data: bytes | memoryview) -> None:
        if self._halted:
            return
        size = self.server._slice
        if len(data) > size:
            # Fed in slices: a head that begins inside a slice is counted exactly from the
            # next one, so httptools never holds more of a head than its limit and a slice.
            view = memoryview(data)
            for start in range(0, len(data), size):
                self.data_received(view[start : start + size])
            return
        phase = self._phase
        body_before = self._body_size
        try:
            self.parser.feed_data(data)  # type: ignore[union-attr]
        except httptools.HttpParserUpgrade:
            if not self._halted:
                self._error(400, b"upgrades are not supported\n")
            return
        except httptools.HttpParserError as exc:
            if not self._halted:  # (otherwise a callback answered and stopped the parser)
                self._error(400, f"malformed request: {exc}\n".encode())
            return
        if self._phase != _IDLE and not self._halted:  # a request is still arriving
            self._count(phase, body_before, len(data))

    def _count(self, phase: int, body_before: int, size: int) -> None:
        """Bound what httptools holds of a request that is still arriving (after a feed of
        *size* bytes that began in *phase*)."""
        limits = self.server.limits
        if self._phase == _HEAD:
            if self._head_bytes < 0:  # the head began in this feed: what the callbacks saw of it
                self._head_bytes = len(self._url) + self._hdr_bytes
            else:
                self._head_bytes += size
            if self._head_bytes > limits.max_header_bytes:
                self._error(431, b"request header fields too large\n")
        elif self._head_bytes < 0:  # the message began in this feed: count from the next one
            self._head_bytes = 0
        elif phase == _BODY:  # (the same message's body all along) its framing and trailers
            self._frame += size - (self._body_size - body_before)
            if self._frame > limits.max_header_bytes + 32 * self._chunks:
                self._error(431, b"request chunk framing or trailers too large\n")

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
        if self._phase == _IDLE:
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
        self._hdr_bytes = 0
        self._body_size = 0
        self._too_large = False
        self._phase = _HEAD
        self._head_bytes = -1
        self._frame = 0
        self._chunks = 0
        self._since = self.server.now

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.server.limits.max_url_bytes:
            self._error(414, b"request URL too long\n")
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        # (Checked at the end of the head: until then what a head can hold is bounded by
        # the bytes counted as they arrive.)
        self._hdr_bytes += len(name) + len(value)
        name = name.lower()
        if name == b"id":
            self._fid = value
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._phase = _BODY
        srv = self.server
        self._since = srv.now
        limits = srv.limits
        if len(self._headers) > limits.max_headers or self._hdr_bytes > limits.max_header_bytes:
            self._error(431, b"request header fields too large\n")
            raise _Stop

    def on_chunk_header(self) -> None:
        self._chunks += 1

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
        self._phase = _IDLE
        srv = self.server
        self._since = srv.now
        if self._too_large:
            self._error(413, b"request body too large\n")
            raise _Stop
        parser: httptools.HttpRequestParser = self.parser  # type: ignore[assignment]
        keep_alive = parser.should_keep_alive()
        path, _, query = self._url.partition(b"?")
        parts = self._body
        if parts:
            body = parts[0] if len(parts) == 1 else b"".join(parts)
            self._body = []
        else:
            body = b""
        request = Request(parser.get_method(), path, query, self._headers, body)
        fn = srv.route(request, self._fid)
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
        response = fn.call_inline(request)
        if response is not None:  # answered inline, in this event-loop turn
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
                self._respond(fn, keep_alive, linger=True)  # type: ignore[arg-type]
            else:
                self._serve(fn, request, keep_alive)  # type: ignore[arg-type]
        if self._paused and len(self._pending) < MAX_PIPELINED // 2 and self.transport is not None:
            self._paused = False
            self._resume()

    def _finished(self, task: asyncio.Future[Response], keep_alive: bool, request: Request) -> None:
        self._busy = False
        try:
            response = task.result()
        except Exception as exc:  # pragma: no cover - a host bug
            log.exception("ingress: function call failed")
            response = Response(500, body=f"host error: {exc}\n".encode())
        if self._phase == _IDLE:  # idle from now on
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
        self._phase = _CLOSING
        self._since = self.server.now

    def _release(self, size: int) -> None:
        if 0 < size <= self._held:  # (nothing is held any more once the connection is lost)
            self._held -= size
            self.server.body_bytes -= size

    def _error(self, status: int, body: bytes) -> None:
        """Answer *status* in its turn (after the responses of requests before it), then
        close: nothing more is parsed, and the request's partial body is let go."""
        self._halted = True
        self._phase = _IDLE
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
        if self._phase == _CLOSING:  # its last response not yet taken by the client
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
        if self._phase in (_IDLE, _FIRST):  # between requests: just close
            self.server.send(self.transport, b"", close=True)
            self._closing()
            return
        self._error(408, b"request timed out\n")


# --------------------------------------------------------------------------- the server


class Ingress:
    """The HTTP listener in front of every function on the node."""

    def __init__(
        self,
        registry: FunctionRegistry,
        *,
        body_limit: int = DEFAULT_BODY_LIMIT,
        limits: IngressLimits | None = None,
    ) -> None:
        self.registry = registry
        self.body_limit = body_limit
        self.limits = limits or IngressLimits()
        self.max_connections = self.limits.connection_cap()
        self.body_bytes = 0  # request-body bytes buffered now, across all connections
        self.now = 0.0  # the event loop's time as of the last sweep (deadline stamps use it)
        self._slice = max(1024, min(self.limits.max_header_bytes, 64 << 10))
        self._servers: list[asyncio.base_events.Server] = []
        self._outbox: list[tuple[asyncio.Transport, bytes, int]] = []
        # How long a closing connection may take to read its last response (and to stop
        # sending) before it is cut, unless it is still reading.
        self.linger = min(2.0, self.limits.header_timeout)
        lim = self.limits
        self._timeouts = (
            lim.idle_timeout,
            lim.header_timeout,
            lim.body_timeout,
            lim.header_timeout,
            self.linger,
        )
        self._connections: set[HttpProtocol] = set()
        self._per_ip: dict[str, int] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        shortest = min(self.limits.header_timeout, self.limits.body_timeout, self.limits.idle_timeout)
        self._tick = min(1.0, max(0.01, shortest / 4))
        self._refused_logged = 0.0

    @property
    def connections(self) -> int:
        """Ingress connections open now."""
        return len(self._connections)

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
            if data:
                transport.write(data)
            if close == 2 and transport.can_write_eof():
                transport.write_eof()
                transport.resume_reading()  # (read and drop what it still sends)
            elif close:
                transport.close()

    def route(self, request: Request, function_id: bytes | None = None) -> Function | None:
        """The function a request is for: its ``id`` header, else ``/fn/<id>/...``
        (whose prefix is then cut from the path the function sees)."""
        if function_id is not None:
            return self.registry.get(function_id.decode(errors="replace"))
        path = request.path
        if path.startswith(b"/fn/"):
            fid, slash, tail = path[4:].partition(b"/")
            request.path = b"/" + tail if slash else b"/"
            return self.registry.get(fid.decode(errors="replace"))
        return None

    # connections and their deadlines
    def _admit(self, conn: HttpProtocol, transport: asyncio.Transport) -> bytes | None:
        """Count a new connection in, or say why it is refused (a 503 to write)."""
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self.now = loop.time()
            self._sweeper = loop.call_later(self._tick, self._sweep)
        if len(self._connections) >= self.max_connections:
            self._log_refusal(f"{self.max_connections} connections are open")
            return _refusal(b"ingress busy: too many connections\n")
        cap = self.limits.max_connections_per_ip
        if cap:
            peer = transport.get_extra_info("peername")
            ip = peer[0] if isinstance(peer, tuple) and peer else str(peer)
            count = self._per_ip.get(ip, 0)
            if count >= cap:
                self._log_refusal(f"{cap} connections are open from {ip}")
                return _refusal(b"ingress busy: too many connections from this address\n")
            self._per_ip[ip] = count + 1
            conn._peer = ip
        conn._open = True
        conn._phase = _FIRST  # its first request's head is due within header_timeout
        conn._since = self.now
        self._connections.add(conn)
        return None

    def _forget(self, conn: HttpProtocol) -> None:
        if not conn._open:
            return
        conn._open = False
        self._connections.discard(conn)
        if conn._peer is not None:
            left = self._per_ip.get(conn._peer, 1) - 1
            if left > 0:
                self._per_ip[conn._peer] = left
            else:
                self._per_ip.pop(conn._peer, None)

    def _log_refusal(self, why: str) -> None:
        now = time.monotonic()
        if now - self._refused_logged >= 60:
            self._refused_logged = now
            log.warning("ingress: refusing new connections: %s (logged once a minute)", why)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = self.now = loop.time()
        timeouts = self._timeouts
        expired = [c for c in self._connections if c._since + timeouts[c._phase] <= now and not c._busy]
        for conn in expired:
            conn._expire()
        if self._connections:
            self._sweeper = loop.call_later(self._tick, self._sweep)
        else:
            self._sweeper = None

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

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

"""What network clients can make the HTTP ingress hold, and the bookkeeping that bounds it.

:class:`IngressLimits` is the set of limits; :class:`ConnectionBook` is the part of the
:class:`~layotto.host.ingress.Ingress` that counts connections in and out (per server and
per client address) and expires them. Deadlines are not timers: each connection keeps a
stamp of when it entered its phase (:data:`IDLE`, :data:`HEAD`, ...), the request path only
stores a number, and one periodic sweep closes the connections whose phase's timeout has
passed. No deadline runs while a function computes a connection's response. The limits,
their defaults and what a client sees past them: docs/security.md ("The ingress and other
listeners").
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from layotto.host.ingress_render import refusal

if TYPE_CHECKING:
    from layotto.host.ingress import HttpProtocol

log = logging.getLogger("layotto.host.ingress")

# Where a connection is: between requests, in a request's head, in its body, before its first
# request, or closing (its last response written or being written). Each has its timeout
# (ConnectionBook._timeouts), counted from the connection's ``_since``.
IDLE, HEAD, BODY, FIRST, CLOSING = 0, 1, 2, 3, 4


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


class ConnectionBook:
    """The ingress's open connections, the body bytes they hold, and their deadlines (a base
    class of :class:`~layotto.host.ingress.Ingress`: its connections reach this state as
    plain attributes of their server, with no indirection on the request path)."""

    def __init__(self, limits: IngressLimits) -> None:
        self.limits = limits
        self.max_connections = limits.connection_cap()
        self.body_bytes = 0  # request-body bytes buffered now, across all connections
        self.now = 0.0  # the event loop's time as of the last sweep (deadline stamps use it)
        # How long a closing connection may take to read its last response (and to stop
        # sending) before it is cut, unless it is still reading.
        self.linger = min(2.0, limits.header_timeout)
        self._timeouts = (  # by phase: IDLE, HEAD, BODY, FIRST, CLOSING
            limits.idle_timeout,
            limits.header_timeout,
            limits.body_timeout,
            limits.header_timeout,
            self.linger,
        )
        self._connections: set[HttpProtocol] = set()
        self._per_ip: dict[str, int] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        shortest = min(limits.header_timeout, limits.body_timeout, limits.idle_timeout)
        self._tick = min(1.0, max(0.01, shortest / 4))
        self._refused_logged = 0.0

    @property
    def connections(self) -> int:
        """Ingress connections open now."""
        return len(self._connections)

    def _admit(self, conn: HttpProtocol, transport: asyncio.Transport) -> bytes | None:
        """Count a new connection in, or say why it is refused (a 503 to write)."""
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self.now = loop.time()
            self._sweeper = loop.call_later(self._tick, self._sweep)
        if len(self._connections) >= self.max_connections:
            self._log_refusal(f"{self.max_connections} connections are open")
            return refusal(b"ingress busy: too many connections\n")
        cap = self.limits.max_connections_per_ip
        if cap:
            peer = transport.get_extra_info("peername")
            ip = peer[0] if isinstance(peer, tuple) and peer else str(peer)
            count = self._per_ip.get(ip, 0)
            if count >= cap:
                self._log_refusal(f"{cap} connections are open from {ip}")
                return refusal(b"ingress busy: too many connections from this address\n")
            self._per_ip[ip] = count + 1
            conn._peer = ip
        conn._open = True
        conn._phase = FIRST  # its first request's head is due within header_timeout
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

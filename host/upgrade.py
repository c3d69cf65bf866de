"""Node hosts of several layotto versions side by side: rolling upgrades.

Each version's node host has a run directory of its own (``<run>/<version>/``; the shim
starts and reuses only the host of its own version). A host that starts, or that is given
a container while it is retired (a roll back), becomes the *current* host: it asks every
other host of its containerd to retire, over their admin sockets. A host that retires

- hands its listening socket of the node's HTTP port to the new host (passed with the
  answer, SCM_RIGHTS): the new host accepts on the very same socket, so no connection is
  refused or dropped during the switch, and no two hosts ever share the port;
- stops serving /metrics (the new host binds that port after it);
- keeps serving its tasks: the current host forwards requests for function ids it does not
  serve to the retired hosts' private ingress sockets (``<run>/<version>/ingress.sock``),
  and a retired host forwards the ids it does not serve (a connection opened before the
  switch, asking for a function started after it) to the current host; a forwarded request
  is never forwarded again;
- exits by itself once none of its tasks is running any more. The current host never exits
  because it is idle.

``drain`` stops a host's tasks the way Kubernetes stops a pod (SIGTERM, a grace period,
then SIGKILL), through the Task API's Kill, so each exit is published to containerd with
its status (143 or 137) and time; then the host exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httptools

from layotto.host.function import Request, Response
from layotto.host.ingress import Ingress
from layotto.host.ingress_render import NOT_FOUND

log = logging.getLogger(__name__)

INGRESS_SOCKET = "ingress.sock"
FORWARDED = b"layotto-forwarded"
"""Marks a request one host forwarded to another (it is never forwarded again)."""
HOP_BY_HOP = frozenset(
    (b"connection", b"keep-alive", b"content-length", b"transfer-encoding", b"te", b"trailer", b"upgrade")
)
MAX_FORWARDED_RESPONSE = 64 << 20
ADMIN_TIMEOUT = 10.0
KILL_TIMEOUT = 10.0  # after SIGKILL, how long the host waits for the exits before it goes


@dataclass
class HostHooks:
    """What the role needs of the rest of the host (wired by the daemon)."""

    active: Callable[[], list[tuple[str, str, asyncio.Future[None]]]]
    """Tasks that have not ended: (containerd namespace, task id, a future done at its exit)."""
    signal: Callable[[str, str, int], Awaitable[None]]
    """Send a task a signal through the Task API (as ``ctr task kill`` does)."""
    make_current: Callable[[], None]
    """Point the run directory's ``current`` at this host."""
    others: Callable[[], list[Path]]
    """The run directories of the other versions' hosts (live or not)."""
    metrics_on: Callable[[], None]
    metrics_off: Callable[[], None]
    release: Callable[[], None]
    """Let go of what only one host may hold (the embedded pub/sub), for the new host."""


class HostRole:
    """This host's place among its containerd's hosts: current or retired."""

    def __init__(
        self,
        version: str,
        run_dir: Path,
        ingress: Ingress,
        stop: asyncio.Event,
        hooks: HostHooks,
        *,
        http_host: str,
        http_port: int,
    ) -> None:
        self.version = version
        self.run_dir = run_dir
        self.ingress = ingress
        self.stop = stop
        self.hooks = hooks
        self.http_host = http_host
        self.http_port = http_port
        self.retired = False
        self.draining = False
        self.forward_to: list[Path] = []  # the hosts ids this one does not serve may be on
        self._routes: dict[str, Path] = {}
        self._watch: asyncio.Task[None] | None = None
        self._resuming = asyncio.Lock()
        ingress.forward = self.forward

    # --- current ----------------------------------------------------------------------

    async def take_over(self) -> socket.socket | None:
        """Become the current host: retire every other one. Returns the node's listening
        socket one of them handed over, if any."""
        self.hooks.make_current()
        handed, retired = await asyncio.to_thread(retire_hosts, self.hooks.others(), self.version)
        self.took_over(retired)
        return handed

    def took_over(self, retired: list[Path]) -> None:
        """This host is the current one; ``retired``: the hosts it retired."""
        self.retired = False
        self.forward_to = retired
        self._routes.clear()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if retired:
            log.info("took over from the hosts of %s", ", ".join(d.name for d in retired))

    async def listen(self, handed: socket.socket | None) -> int | None:
        """Serve the node's HTTP port: the handed-over socket when it is the port this host
        is configured for (or any port, for port 0), else a socket of its own. None: off."""
        if self.http_port < 0:
            if handed is not None:
                handed.close()
            return None
        if handed is not None:
            host, port = handed.getsockname()[:2]
            if self.http_port in (0, port) and host == self.http_host:
                return await self.ingress.adopt(handed)
            handed.close()
        return await self.ingress.listen(self.http_host, self.http_port)

    async def resume(self) -> None:
        """A retired host given a new container (its version was installed again): it is
        the current host again."""
        async with self._resuming:  # (containers created at once: one takes over)
            if self.retired:
                await self._resume()

    async def _resume(self) -> None:
        log.info("a new container for this retired host: it becomes the current host again")
        handed = await self.take_over()
        try:
            port = await self.listen(handed)
        except OSError as exc:
            log.error(
                "HTTP ingress disabled: cannot listen on %s:%d: %s", self.http_host, self.http_port, exc
            )
        else:
            if port:
                (self.run_dir / "http.port").write_text(f"{port}\n")
        with contextlib.suppress(OSError):
            self.hooks.metrics_on()

    # --- retired ------------------------------------------------------------------------

    async def retire(self, query: dict[str, str]) -> tuple[int, Any, socket.socket | None]:
        """Admin ``POST /retire?by=<version>``: a newer host took the node over."""
        handed = self.ingress.release()
        for let_go in (self.hooks.metrics_off, self.hooks.release):
            try:
                let_go()
            except Exception:  # the port must still reach the new host
                log.exception("retiring")
        self.retired = True
        by = query.get("by", "")
        named = by not in ("", ".", "..") and "/" not in by
        self.forward_to = [self.run_dir.parent / by] if named else []
        self._routes.clear()
        active = len(self.hooks.active())
        log.info("retired by the host of %s: %d task(s) left; exiting when they end", by or "?", active)
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._exit_when_idle())
        return 200, {"version": self.version, "pid": os.getpid(), "tasks": active}, handed

    async def _exit_when_idle(self) -> None:
        while True:
            pending = [exited for _ns, _id, exited in self.hooks.active()]
            if not pending:
                break
            # (re-checked every second: a task deleted before it started has no exit)
            await asyncio.wait(pending, timeout=1.0)
        log.info("retired and no task left: exiting")
        self.stop.set()

    # --- drain ------------------------------------------------------------------------

    async def drain(self, query: dict[str, str]) -> tuple[int, Any, socket.socket | None]:
        """Admin ``POST /drain?grace=<seconds>``: stop every task as Kubernetes would, then
        exit. Answers at once with the tasks it stops."""
        try:
            grace = float(query.get("grace", "30"))
        except ValueError:
            return 400, {"error": f"grace {query.get('grace')!r} is not a number of seconds"}, None
        if not grace >= 0:
            return 400, {"error": f"grace {grace} must be 0 or more seconds"}, None
        tasks = [f"{ns}/{tid}" for ns, tid, _ in self.hooks.active()]
        if not self.draining:
            self.draining = True
            handed = self.ingress.release()  # no new connections: this host is going
            if handed is not None:
                handed.close()
            asyncio.ensure_future(self._drain(grace))
        body = {"version": self.version, "pid": os.getpid(), "tasks": tasks, "grace": grace}
        return 202, body, None

    async def _drain(self, grace: float) -> None:
        first = signal.SIGTERM if grace > 0 else signal.SIGKILL
        log.info("draining %d task(s): signal %d, grace %.1fs", len(self.hooks.active()), first, grace)
        await self._signal_all(first)
        if first == signal.SIGTERM:
            await self._wait_ended(grace)
            await self._signal_all(signal.SIGKILL)
        await self._wait_ended(KILL_TIMEOUT)
        log.info("drained: exiting")
        self.stop.set()

    async def _signal_all(self, sig: int) -> None:
        for ns, task_id, _exited in self.hooks.active():
            try:
                await self.hooks.signal(ns, task_id, sig)
            except Exception as exc:  # (it ended meanwhile)
                log.debug("drain: signal %d to %s/%s: %s", sig, ns, task_id, exc)

    async def _wait_ended(self, timeout: float) -> None:
        pending = [exited for _ns, _id, exited in self.hooks.active()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    def describe(self) -> dict[str, Any]:
        """Admin ``GET /host``."""
        return {
            "version": self.version,
            "pid": os.getpid(),
            "current": not self.retired,
            "retired": self.retired,
            "draining": self.draining,
            "tasks": len(self.hooks.active()),
        }

    # --- forwarding -----------------------------------------------------------------------

    def forward(self, fid: str) -> _Forwarded | None:
        """The ingress's stand-in for an id this host does not serve."""
        return _Forwarded(self, fid) if self.forward_to else None

    async def relay(self, fid: str, request: Request) -> Response:
        """Answer ``request`` through the host that serves ``fid``, if any."""
        if any(name.lower() == FORWARDED for name, _ in request.headers):
            return _not_found()
        for _attempt in range(2):
            where = self._routes.get(fid) or await self._find(fid)
            if where is None:
                return _not_found()
            try:
                return await _relay(where / INGRESS_SOCKET, fid, request)
            except (OSError, ValueError) as exc:
                log.info("forwarding %s to the host of %s: %s", fid, where.name, exc)
                self._routes.pop(fid, None)
        return Response(
            502, [(b"content-type", b"text/plain")], b"the host serving this function went away\n"
        )

    async def _find(self, fid: str) -> Path | None:
        for where in list(self.forward_to):
            try:
                rows = await _admin_json(where / "admin.sock", "/tasks")
            except (OSError, ValueError):
                continue
            if any(row.get("function_id") == fid and row.get("state") == "running" for row in rows):
                self._routes[fid] = where
                return where
        return None


class _Forwarded:
    """Shaped like a Function for the ingress: answered by another host."""

    __slots__ = ("fid", "role")

    def __init__(self, role: HostRole, fid: str) -> None:
        self.role = role
        self.fid = fid

    def call_inline(self, request: Request) -> Response | None:
        return None

    async def call_threaded(self, request: Request) -> Response:
        return await self.role.relay(self.fid, request)


def _not_found() -> Response:
    return NOT_FOUND


# --- talking to the other hosts ---------------------------------------------------------


def retire_hosts(dirs: list[Path], version: str) -> tuple[socket.socket | None, list[Path]]:
    """Ask every live host in ``dirs`` to retire (blocking). Returns the listening socket
    one of them handed over and the directories of those that answered."""
    handed: socket.socket | None = None
    retired: list[Path] = []
    for where in dirs:
        try:
            _body, fds = admin_call(where / "admin.sock", f"POST /retire?by={version} HTTP/1.0\r\n\r\n")
        except OSError:
            continue  # no host runs there (any more)
        retired.append(where)
        for fd in fds:
            if handed is None:
                handed = socket.socket(fileno=fd)
            else:
                os.close(fd)
    return handed, retired


def admin_call(path: Path, request: str) -> tuple[bytes, list[int]]:
    """One request to a host's admin socket (blocking): the answer's body and the
    descriptors passed with it."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(ADMIN_TIMEOUT)
    data, fds = bytearray(), []
    try:
        s.connect(str(path))
        s.sendall(request.encode())
        while True:
            chunk, more, _flags, _addr = socket.recv_fds(s, 65536, 4)
            fds += more
            if not chunk:
                break
            data += chunk
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        s.close()
    _head, _, body = bytes(data).partition(b"\r\n\r\n")
    return body, fds


async def _admin_json(path: Path, target: str) -> Any:
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), ADMIN_TIMEOUT)
    try:
        writer.write(f"GET {target} HTTP/1.0\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), ADMIN_TIMEOUT)
    finally:
        writer.close()
    return json.loads(data.partition(b"\r\n\r\n")[2] or b"null")


async def _relay(path: Path, fid: str, request: Request) -> Response:
    """``request`` through another host's private ingress socket; its whole answer."""
    target = request.path + (b"?" + request.query if request.query else b"")
    head = [b"%s %s HTTP/1.1\r\n" % (request.method, target)]
    for name, value in request.headers:
        if name.lower() not in HOP_BY_HOP and name.lower() != b"id":
            head.append(b"%s: %s\r\n" % (name, value))
    head.append(b"id: %s\r\n%s: 1\r\n" % (fid.encode(), FORWARDED))
    head.append(b"content-length: %d\r\nconnection: close\r\n\r\n" % len(request.body))
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(b"".join(head) + request.body)
        data = await reader.read(MAX_FORWARDED_RESPONSE)
    finally:
        writer.close()
    return _parse_response(data, head_only=request.method == b"HEAD")


class _ResponseReader:
    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in HOP_BY_HOP:
            self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)


def _parse_response(data: bytes, *, head_only: bool) -> Response:
    reader = _ResponseReader()
    parser = httptools.HttpResponseParser(reader)
    try:
        parser.feed_data(data)
    except httptools.HttpParserError as exc:
        raise ValueError(f"a malformed answer ({exc})") from exc
    status = parser.get_status_code()
    if not status:
        raise ValueError("no answer")
    return Response(status, reader.headers, b"" if head_only else b"".join(reader.body))

"""ttrpc, containerd's lightweight RPC protocol, over asyncio unix-socket streams.

No Python package implements ttrpc, so this is our own. A frame is a 10-byte header
(data length u32 BE, stream id u32 BE, type u8, flags u8) followed by at most 4 MiB of
data. A Request (type 1) carries a ``ttrpc.Request`` message naming the service and
method; the server answers on the same stream with a Response (type 2) carrying a
``ttrpc.Response`` with a gRPC status code. Clients use odd, increasing stream ids and
may have many calls in flight on one connection: the server runs each request as its own
task, so a blocking ``Wait`` never holds up ``Start``, ``State`` or ``Kill``.

Every RPC containerd makes to a shim (and the shim's event Forward call) is unary, so
streaming Data frames are answered with an error, never crash the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError, Message

from layotto.shim.protocol import ttrpc_pb2

log = logging.getLogger(__name__)

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size
MAX_MESSAGE = 4 << 20

TYPE_REQUEST = 0x01
TYPE_RESPONSE = 0x02
TYPE_DATA = 0x03


class Code:
    """gRPC status codes, as ttrpc carries them."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class TtrpcError(Exception):
    """An RPC failure carrying a gRPC status code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass
class Context:
    """Per-request information handed to a method."""

    service: str
    method: str
    metadata: dict[str, list[str]] = field(default_factory=dict)
    timeout: float | None = None
    connection: dict[str, Any] = field(default_factory=dict)
    """State that lives as long as the client's connection (handlers may keep notes)."""

    def get(self, key: str, default: str = "") -> str:
        values = self.metadata.get(key.lower())
        return values[0] if values else default


Handler = Callable[[Any, Context], Awaitable[Message]]


@dataclass
class Method:
    request_type: type[Message]
    handler: Handler


def frame(stream_id: int, mtype: int, data: bytes, flags: int = 0) -> bytes:
    """A whole ttrpc frame."""
    if len(data) > MAX_MESSAGE:
        raise TtrpcError(
            Code.RESOURCE_EXHAUSTED,
            f"message length {len(data)} exceeds maximum message size of {MAX_MESSAGE}",
        )
    return HEADER.pack(len(data), stream_id, mtype, flags) + data


def _status_response(code: int, message: str) -> bytes:
    return ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=code, message=message)).SerializeToString()


class Server:
    """A ttrpc server: register services, then ``await serve(listening_socket)``."""

    def __init__(self) -> None:
        self._services: dict[str, dict[str, Method]] = {}
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[_ServerConnection] = set()

    def register(self, service: str, methods: dict[str, Method]) -> None:
        """Serve ``methods`` under the full service name ``service``."""
        self._services[service] = dict(methods)

    @property
    def services(self) -> Iterable[str]:
        return self._services.keys()

    def lookup(self, service: str, method: str) -> Method:
        methods = self._services.get(service)
        if methods is None:
            raise TtrpcError(Code.UNIMPLEMENTED, f"service {service}")
        found = methods.get(method)
        if found is None:
            raise TtrpcError(Code.UNIMPLEMENTED, f"method {method}")
        return found

    async def start(self, sock: socket.socket) -> None:
        """Start accepting connections on an already listening unix socket."""
        sock.setblocking(False)
        self._server = await asyncio.start_unix_server(self._on_connection, sock=sock, limit=MAX_MESSAGE * 2)

    async def close(self, grace: float = 0.0) -> None:
        """Stop accepting connections and close every one. With ``grace`` (seconds), the
        requests in flight are given that long to be answered, and the answers are flushed
        to the peers before this returns."""
        if self._server is not None:
            self._server.close()
        connections = list(self._connections)
        in_flight = {task for conn in connections for task in conn.tasks}
        if grace > 0 and in_flight:
            await asyncio.wait(in_flight, timeout=grace)
        for conn in connections:
            conn.close()
        if grace > 0 and connections:
            await asyncio.wait([asyncio.ensure_future(conn.closed()) for conn in connections], timeout=grace)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _ServerConnection(self, reader, writer)
        self._connections.add(conn)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)


class _ServerConnection:
    def __init__(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.tasks: set[asyncio.Task[None]] = set()
        self.state: dict[str, Any] = {}

    def close(self) -> None:
        self.writer.close()

    async def closed(self) -> None:
        """Wait until what was written is flushed and the connection is closed."""
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    async def run(self) -> None:
        try:
            while True:
                try:
                    header = await self.reader.readexactly(HEADER_SIZE)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length, stream_id, mtype, _flags = HEADER.unpack(header)
                if length > MAX_MESSAGE:
                    # Discard exactly the announced data, then answer on that stream.
                    if not await self._discard(length):
                        return
                    if mtype == TYPE_REQUEST:
                        self._send(
                            stream_id,
                            _status_response(
                                Code.RESOURCE_EXHAUSTED,
                                f"message length {length} exceed maximum message size of {MAX_MESSAGE}",
                            ),
                        )
                    continue
                try:
                    data = await self.reader.readexactly(length)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # truncated frame: the peer is gone or broken
                if mtype != TYPE_REQUEST:
                    if mtype == TYPE_DATA:
                        self._send(
                            stream_id, _status_response(Code.INVALID_ARGUMENT, "data on unknown stream")
                        )
                    continue  # responses and unknown types: ignored for compatibility
                if stream_id % 2 != 1:
                    self._send(
                        stream_id,
                        _status_response(
                            Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"
                        ),
                    )
                    continue
                task = asyncio.create_task(self._dispatch(stream_id, data))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        finally:
            for task in list(self.tasks):
                task.cancel()
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    async def _discard(self, length: int) -> bool:
        remaining = length
        try:
            while remaining:
                chunk = await self.reader.read(min(remaining, 1 << 16))
                if not chunk:
                    return False
                remaining -= len(chunk)
        except ConnectionError:
            return False
        return True

    def _send(self, stream_id: int, payload: bytes) -> None:
        if self.writer.is_closing():
            return
        try:
            data = frame(stream_id, TYPE_RESPONSE, payload)
        except TtrpcError as exc:
            data = frame(stream_id, TYPE_RESPONSE, _status_response(exc.code, exc.message))
        # One write per frame, from the event loop thread: frames never interleave.
        self.writer.write(data)

    async def _dispatch(self, stream_id: int, data: bytes) -> None:
        try:
            request = ttrpc_pb2.Request()
            try:
                request.ParseFromString(data)
            except DecodeError as exc:
                raise TtrpcError(Code.INVALID_ARGUMENT, "unmarshal request error") from exc
            method = self.server.lookup(request.service, request.method)
            message = method.request_type()
            try:
                message.ParseFromString(request.payload)
            except DecodeError as exc:
                raise TtrpcError(Code.INVALID_ARGUMENT, "unmarshal request error") from exc
            metadata: dict[str, list[str]] = {}
            for kv in request.metadata:
                metadata.setdefault(kv.key.lower(), []).append(kv.value)
            timeout = request.timeout_nano / 1e9 if request.timeout_nano > 0 else None
            ctx = Context(request.service, request.method, metadata, timeout, self.state)
            try:
                if timeout is not None:
                    result = await asyncio.wait_for(method.handler(message, ctx), timeout)
                else:
                    result = await method.handler(message, ctx)
            except TimeoutError as exc:
                raise TtrpcError(Code.DEADLINE_EXCEEDED, "deadline exceeded") from exc
            payload = ttrpc_pb2.Response(
                status=ttrpc_pb2.Status(code=Code.OK), payload=result.SerializeToString()
            ).SerializeToString()
        except asyncio.CancelledError:
            raise
        except TtrpcError as exc:
            payload = _status_response(exc.code, exc.message)
        except Exception as exc:  # a bug in a handler must not take the connection down
            log.exception("ttrpc %s: unexpected error", stream_id)
            payload = _status_response(Code.UNKNOWN, f"{type(exc).__name__}: {exc}")
        self._send(stream_id, payload)


class Client:
    """A ttrpc client on one unix-socket connection, with many calls in flight."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1, 2)
        self._pending: dict[int, asyncio.Future[ttrpc_pb2.Response]] = {}
        self._reader_task = asyncio.create_task(self._read_loop())
        self.closed = False

    @classmethod
    async def connect(cls, path: str) -> Client:
        reader, writer = await asyncio.open_unix_connection(
            path.removeprefix("unix://"), limit=MAX_MESSAGE * 2
        )
        return cls(reader, writer)

    async def _read_loop(self) -> None:
        error: BaseException = ConnectionError("ttrpc connection closed")
        try:
            while True:
                header = await self._reader.readexactly(HEADER_SIZE)
                length, stream_id, mtype, _flags = HEADER.unpack(header)
                if length > MAX_MESSAGE:
                    raise ConnectionError(f"response of {length} bytes exceeds {MAX_MESSAGE}")
                data = await self._reader.readexactly(length)
                if mtype != TYPE_RESPONSE:
                    continue  # only a Response ends a unary call
                future = self._pending.pop(stream_id, None)
                if future is None or future.done():
                    continue  # a late answer to a call that timed out
                response = ttrpc_pb2.Response()
                try:
                    response.ParseFromString(data)
                except DecodeError as exc:
                    future.set_exception(TtrpcError(Code.INTERNAL, f"bad response: {exc}"))
                    continue
                future.set_result(response)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            error = exc
        except asyncio.CancelledError:
            pass
        finally:
            self.closed = True
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionError(f"ttrpc connection closed: {error}"))
            self._pending.clear()

    async def call(
        self,
        service: str,
        method: str,
        request: Message | bytes,
        response_type: type[Message] | None = None,
        *,
        metadata: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Call ``service/method``; returns the parsed response (or raw bytes)."""
        if self.closed:
            raise ConnectionError("ttrpc connection closed")
        payload = request if isinstance(request, bytes) else request.SerializeToString()
        req = ttrpc_pb2.Request(service=service, method=method, payload=payload)
        if timeout:
            req.timeout_nano = int(timeout * 1e9)
        for key, value in (metadata or {}).items():
            req.metadata.add(key=key, value=value)
        stream_id = next(self._ids)
        data = frame(stream_id, TYPE_REQUEST, req.SerializeToString())  # refuses > 4 MiB
        future: asyncio.Future[ttrpc_pb2.Response] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = future
        self._writer.write(data)
        try:
            response = await asyncio.wait_for(future, timeout) if timeout else await future
        except TimeoutError as exc:
            self._pending.pop(stream_id, None)
            raise TtrpcError(Code.DEADLINE_EXCEEDED, f"{service}/{method}: deadline exceeded") from exc
        if response.HasField("status") and response.status.code != Code.OK:
            raise TtrpcError(response.status.code, response.status.message)
        if response_type is None:
            return response.payload
        result = response_type()
        result.ParseFromString(response.payload)
        return result

    async def close(self) -> None:
        self._reader_task.cancel()
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

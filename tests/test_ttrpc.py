"""ttrpc framing, server and client, exercised with hand-built frames on raw sockets.

The server runs in its own event loop on a background thread; tests talk to it with
blocking sockets (every read has a timeout, so a server that never answers fails the
test instead of hanging it) or with ``Client`` in a second event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from layotto.shim import wire
from layotto.shim.protocol import task_pb2, ttrpc_pb2
from layotto.shim.ttrpc import MAX_MESSAGE, Client, Code, Context, Method, Server, TtrpcError, frame

HDR = struct.Struct(">IIBB")
IO_TIMEOUT = 10.0
ECHO = "test.v1.Echo"
TASK = "containerd.task.v2.Task"
NS_KEY = "containerd-namespace-ttrpc"

# The Connect exchange of shim-protocol.md §1.3, byte for byte.
DOC_REQUEST = (
    bytes.fromhex("00000050 00000001 01 00")
    + bytes.fromhex("0a17")
    + b"containerd.task.v2.Task"
    + bytes.fromhex("1207")
    + b"Connect"
    + bytes.fromhex("1a05 0a03")
    + b"abc"
    + bytes.fromhex("2a25 0a1a")
    + b"containerd-namespace-ttrpc"
    + bytes.fromhex("1207")
    + b"default"
)
DOC_RESPONSE = bytes.fromhex("0000000a 00000001 02 00 0a00 1206 08d209 10ae2c")
DOC_ERROR = bytes.fromhex("00000026 00000003 02 00 0a24 0805 1220") + b"container not created: not found"


# --- the server under test -----------------------------------------------------------


class EchoService:
    """Handlers for the test service; they run on the server's event loop."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.connect_ids: list[tuple[str, str]] = []

    def methods(self) -> dict[str, Method]:
        req = task_pb2.StateRequest
        return {
            "Echo": Method(req, self.echo),
            "Block": Method(req, self.block),
            "Release": Method(req, self.release_blocked),
            "Boom": Method(req, self.boom),
            "Missing": Method(req, self.missing),
            "Big": Method(req, self.big),
        }

    async def echo(self, request: task_pb2.StateRequest, ctx: Context) -> task_pb2.StateResponse:
        # `bundle` carries the namespace metadata back, `stdin` the method name.
        return task_pb2.StateResponse(id=request.id, bundle=ctx.get(NS_KEY), stdin=ctx.method)

    async def block(self, request: task_pb2.StateRequest, ctx: Context) -> task_pb2.StateResponse:
        await self.release.wait()
        return task_pb2.StateResponse(id=request.id, stdin="released")

    async def release_blocked(self, request: task_pb2.StateRequest, ctx: Context) -> task_pb2.StateResponse:
        self.release.set()
        return task_pb2.StateResponse(id=request.id)

    async def boom(self, request: task_pb2.StateRequest, ctx: Context) -> task_pb2.StateResponse:
        raise RuntimeError(f"kaboom {request.id}")

    async def missing(self, request: task_pb2.StateRequest, ctx: Context) -> task_pb2.StateResponse:
        raise TtrpcError(Code.NOT_FOUND, f"{request.id}: not found")

    async def big(self, request: task_pb2.StateRequest, ctx: Context) -> task_pb2.StateResponse:
        return task_pb2.StateResponse(id="x" * (MAX_MESSAGE + 1))

    async def connect(self, request: task_pb2.ConnectRequest, ctx: Context) -> task_pb2.ConnectResponse:
        self.connect_ids.append((request.id, ctx.get(NS_KEY)))
        return task_pb2.ConnectResponse(shim_pid=1234, task_pid=5678)

    async def delete(self, request: task_pb2.DeleteRequest, ctx: Context) -> task_pb2.DeleteResponse:
        raise TtrpcError(Code.NOT_FOUND, "container not created: not found")


class ServerThread:
    def __init__(self, path: str) -> None:
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="ttrpc-server", daemon=True)
        self.server = Server()
        self.service = EchoService()

    def run(self, coro: object, timeout: float = IO_TIMEOUT) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self.server.register(ECHO, self.service.methods())
        self.server.register(
            TASK,
            {
                "Connect": Method(task_pb2.ConnectRequest, self.service.connect),
                "Delete": Method(task_pb2.DeleteRequest, self.service.delete),
            },
        )
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(128)
        self.thread.start()
        self.run(self.server.start(listener))

    async def _shutdown(self) -> None:
        await self.server.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self._shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(IO_TIMEOUT)
        if not self.thread.is_alive():
            self.loop.close()


@pytest.fixture
def server() -> Iterator[ServerThread]:
    tmp = tempfile.mkdtemp(prefix="ttrpc-", dir="/tmp")
    srv = ServerThread(str(Path(tmp) / "s.sock"))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    tmp = tempfile.mkdtemp(prefix="ttrpc-", dir="/tmp")
    yield Path(tmp)
    shutil.rmtree(tmp, ignore_errors=True)


# --- raw socket helpers --------------------------------------------------------------


def connect(srv: ServerThread) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(IO_TIMEOUT)
    s.connect(srv.path)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_frame(s: socket.socket) -> tuple[int, int, int, bytes]:
    """(stream id, type, flags, data) of the next frame."""
    length, sid, mtype, flags = HDR.unpack(recv_exact(s, HDR.size))
    return sid, mtype, flags, recv_exact(s, length)


def request_bytes(
    service: str,
    method: str,
    payload: bytes = b"",
    *,
    timeout_nano: int = 0,
    metadata: tuple[tuple[str, str], ...] = (),
) -> bytes:
    req = ttrpc_pb2.Request(service=service, method=method, payload=payload, timeout_nano=timeout_nano)
    for key, value in metadata:
        req.metadata.add(key=key, value=value)
    return req.SerializeToString()


def send_request(s: socket.socket, sid: int, service: str, method: str, payload: bytes = b"", **kw) -> None:
    data = request_bytes(service, method, payload, **kw)
    s.sendall(HDR.pack(len(data), sid, 1, 0) + data)


def state(id_: str) -> bytes:
    return task_pb2.StateRequest(id=id_).SerializeToString()


def response(s: socket.socket, sid: int) -> ttrpc_pb2.Response:
    """Read the next frame, check it is the Response for ``sid``, and parse it."""
    got_sid, mtype, flags, data = recv_frame(s)
    assert (got_sid, mtype, flags) == (sid, 2, 0)
    resp = ttrpc_pb2.Response()
    resp.ParseFromString(data)
    return resp


def ok_state(resp: ttrpc_pb2.Response) -> task_pb2.StateResponse:
    assert resp.status.code == Code.OK, resp.status.message
    out = task_pb2.StateResponse()
    out.ParseFromString(resp.payload)
    return out


def assert_echo_works(s: socket.socket, sid: int, text: str = "still-alive") -> None:
    send_request(s, sid, ECHO, "Echo", state(text))
    assert ok_state(response(s, sid)).id == text


# --- frames and unary calls ----------------------------------------------------------


def test_frame_matches_documented_bytes():
    body = DOC_REQUEST[10:]
    assert frame(1, 1, body) == DOC_REQUEST
    req = ttrpc_pb2.Request()
    req.ParseFromString(body)
    assert (req.service, req.method) == (TASK, "Connect")
    assert task_pb2.ConnectRequest.FromString(req.payload).id == "abc"
    assert [(kv.key, kv.value) for kv in req.metadata] == [(NS_KEY, "default")]
    assert frame(7, 3, b"", flags=5) == bytes.fromhex("00000000 00000007 03 05")


def test_frame_refuses_oversized_data():
    frame(1, 1, b"\0" * MAX_MESSAGE)  # exactly the limit is allowed
    with pytest.raises(TtrpcError) as err:
        frame(1, 1, b"\0" * (MAX_MESSAGE + 1))
    assert err.value.code == Code.RESOURCE_EXHAUSTED


def test_documented_connect_exchange_byte_for_byte(server):
    with connect(server) as s:
        s.sendall(DOC_REQUEST)
        assert recv_exact(s, len(DOC_RESPONSE)) == DOC_RESPONSE
        # The documented error answer, on stream 3.
        data = request_bytes(TASK, "Delete", task_pb2.DeleteRequest(id="c1").SerializeToString())
        s.sendall(frame(3, 1, data))
        assert recv_exact(s, len(DOC_ERROR)) == DOC_ERROR
    assert server.service.connect_ids == [("abc", "default")]


def test_hand_built_unary_call(server):
    with connect(server) as s:
        data = request_bytes(
            ECHO, "Echo", state("hello"), metadata=(("Containerd-Namespace-TTRPC", "k8s.io"),)
        )
        s.sendall(struct.pack(">IIBB", len(data), 1, 1, 0) + data)
        sid, mtype, flags, body = recv_frame(s)
        assert (sid, mtype, flags) == (1, 2, 0)
        resp = ttrpc_pb2.Response.FromString(body)
        assert resp.HasField("status") and resp.status.code == 0 and resp.status.message == ""
        out = task_pb2.StateResponse.FromString(resp.payload)
        # metadata keys are matched case-insensitively
        assert (out.id, out.bundle, out.stdin) == ("hello", "k8s.io", "Echo")


def test_empty_payload_is_an_empty_message(server):
    with connect(server) as s:
        send_request(s, 1, ECHO, "Echo", b"")
        assert ok_state(response(s, 1)).id == ""


def test_concurrent_requests_on_one_connection(server):
    with connect(server) as s:
        send_request(s, 1, ECHO, "Block", state("blocked"))
        send_request(s, 3, ECHO, "Echo", state("quick"))
        # Echo answers while Block is still waiting.
        assert ok_state(response(s, 3)).id == "quick"
        assert not server.service.release.is_set()
        send_request(s, 5, ECHO, "Release", state("rel"))
        answers = {}
        for _ in range(2):
            sid, mtype, flags, data = recv_frame(s)
            assert (mtype, flags) == (2, 0)
            answers[sid] = ok_state(ttrpc_pb2.Response.FromString(data))
        assert set(answers) == {1, 5}
        assert (answers[1].id, answers[1].stdin) == ("blocked", "released")
        assert answers[5].id == "rel"


def test_many_connections_at_once(server):
    socks = [connect(server) for _ in range(20)]
    try:
        for i, s in enumerate(socks):
            send_request(s, 1, ECHO, "Echo", state(f"conn-{i}"))
        for i, s in enumerate(reversed(socks)):
            assert ok_state(response(s, 1)).id == f"conn-{len(socks) - 1 - i}"
    finally:
        for s in socks:
            s.close()


# --- errors ----------------------------------------------------------------------------


def test_unknown_service_and_method(server):
    with connect(server) as s:
        send_request(s, 1, "no.such.Service", "Echo", state("a"))
        resp = response(s, 1)
        assert (resp.status.code, resp.status.message) == (Code.UNIMPLEMENTED, "service no.such.Service")
        assert resp.payload == b""
        send_request(s, 3, ECHO, "Nope", state("a"))
        resp = response(s, 3)
        assert (resp.status.code, resp.status.message) == (Code.UNIMPLEMENTED, "method Nope")
        assert_echo_works(s, 5)


def test_unparseable_payload(server):
    with connect(server) as s:
        send_request(s, 1, ECHO, "Echo", b"\x0a\x10short")  # string field runs past the end
        resp = response(s, 1)
        assert (resp.status.code, resp.status.message) == (Code.INVALID_ARGUMENT, "unmarshal request error")
        assert_echo_works(s, 3)


@pytest.mark.parametrize("body", [b"\x0a\x05ab", b"\xff\xff\xff", b"\x0f", b"\x22\x01"])
def test_garbage_request_body(server, body):
    with connect(server) as s:
        s.sendall(frame(1, 1, body))
        resp = response(s, 1)
        assert (resp.status.code, resp.status.message) == (Code.INVALID_ARGUMENT, "unmarshal request error")
        assert_echo_works(s, 3)


def test_even_stream_id_is_rejected(server):
    with connect(server) as s:
        send_request(s, 2, ECHO, "Release", state("even"))
        resp = response(s, 2)
        assert resp.status.code == Code.INVALID_ARGUMENT
        assert "odd" in resp.status.message
        assert not server.service.release.is_set()  # the handler never ran
        assert_echo_works(s, 3)


def test_oversized_frame_is_discarded_and_answered(server):
    with connect(server) as s:
        length = MAX_MESSAGE + 1
        # 0xff filler: if the server discarded too little, the leftover would read as a
        # header announcing a 4 GiB frame and the follow-up call would never be answered.
        follow = request_bytes(ECHO, "Echo", state("after"))
        s.sendall(HDR.pack(length, 1, 1, 0) + b"\xff" * length + frame(3, 1, follow))
        resp = response(s, 1)
        assert resp.status.code == Code.RESOURCE_EXHAUSTED
        assert str(length) in resp.status.message
        assert ok_state(response(s, 3)).id == "after"


def test_truncated_frame_drops_only_that_connection(server):
    with connect(server) as broken:
        broken.sendall(HDR.pack(100, 1, 1, 0) + b"0123456789")
        broken.shutdown(socket.SHUT_WR)
        assert broken.recv(1) == b""  # no answer: the server just closes
    with connect(server) as s:
        assert_echo_works(s, 1)


def test_data_frame_on_unknown_stream_and_unknown_type(server):
    with connect(server) as s:
        s.sendall(frame(7, 3, b"\x0a\x01x", flags=1))
        resp = response(s, 7)
        assert resp.status.code == Code.INVALID_ARGUMENT
        s.sendall(frame(9, 9, b"whatever"))  # unknown type: ignored, no answer
        s.sendall(frame(11, 2, b""))  # a Response sent to the server: ignored too
        assert_echo_works(s, 13)  # the next frame back is for stream 13


def test_handler_exception_becomes_unknown(server):
    with connect(server) as s:
        send_request(s, 1, ECHO, "Boom", state("x1"))
        resp = response(s, 1)
        assert resp.status.code == Code.UNKNOWN
        assert "kaboom x1" in resp.status.message
        assert_echo_works(s, 3)
    with connect(server) as s:
        assert_echo_works(s, 1)


def test_ttrpc_error_code_propagates(server):
    with connect(server) as s:
        send_request(s, 1, ECHO, "Missing", state("c9"))
        resp = response(s, 1)
        assert (resp.status.code, resp.status.message) == (Code.NOT_FOUND, "c9: not found")


def test_request_timeout_gives_deadline_exceeded(server):
    with connect(server) as s:
        started = time.monotonic()
        send_request(s, 1, ECHO, "Block", state("slow"), timeout_nano=50_000_000)
        resp = response(s, 1)
        assert resp.status.code == Code.DEADLINE_EXCEEDED
        assert time.monotonic() - started < IO_TIMEOUT / 2
        assert not server.service.release.is_set()
        assert_echo_works(s, 3)


def test_oversized_response_is_refused(server):
    with connect(server) as s:
        send_request(s, 1, ECHO, "Big", state("b"))
        sid, mtype, _flags, data = recv_frame(s)
        assert (sid, mtype) == (1, 2)
        assert len(data) < 1024
        assert ttrpc_pb2.Response.FromString(data).status.code == Code.RESOURCE_EXHAUSTED
        assert_echo_works(s, 3)


# --- Client --------------------------------------------------------------------------


def run(coro: object) -> object:
    return asyncio.run(asyncio.wait_for(coro, IO_TIMEOUT))


def test_client_calls(server):
    async def main() -> None:
        client = await Client.connect("unix://" + server.path)
        try:
            out = await client.call(
                ECHO, "Echo", task_pb2.StateRequest(id="c1"), task_pb2.StateResponse, metadata={NS_KEY: "ns1"}
            )
            assert (out.id, out.bundle) == ("c1", "ns1")
            raw = await client.call(ECHO, "Echo", state("c2"))
            assert task_pb2.StateResponse.FromString(raw).id == "c2"
            with pytest.raises(TtrpcError) as err:
                await client.call(ECHO, "Missing", task_pb2.StateRequest(id="m"), task_pb2.StateResponse)
            assert (err.value.code, err.value.message) == (Code.NOT_FOUND, "m: not found")
            with pytest.raises(TtrpcError) as err:
                await client.call(ECHO, "Boom", task_pb2.StateRequest(id="b"))
            assert err.value.code == Code.UNKNOWN
            with pytest.raises(TtrpcError) as err:
                await client.call("x.Y", "Z", b"")
            assert err.value.code == Code.UNIMPLEMENTED
            with pytest.raises(TtrpcError) as err:
                await client.call(ECHO, "Block", task_pb2.StateRequest(id="t"), timeout=0.05)
            assert err.value.code == Code.DEADLINE_EXCEEDED
            # the connection still works after errors
            assert (await client.call(ECHO, "Echo", state("c3"), task_pb2.StateResponse)).id == "c3"
        finally:
            await client.close()

    run(main())


def test_client_concurrent_calls(server):
    async def main() -> None:
        client = await Client.connect(server.path)
        try:
            blocked = asyncio.ensure_future(
                client.call(ECHO, "Block", state("first"), task_pb2.StateResponse)
            )
            calls = [client.call(ECHO, "Echo", state(f"id-{i}"), task_pb2.StateResponse) for i in range(50)]
            results = await asyncio.gather(*calls)
            assert [r.id for r in results] == [f"id-{i}" for i in range(50)]
            assert not blocked.done()
            await client.call(ECHO, "Release", state("r"))
            assert (await blocked).stdin == "released"
        finally:
            await client.close()

    run(main())


def test_client_refuses_oversized_request(server):
    async def main() -> None:
        client = await Client.connect(server.path)
        try:
            with pytest.raises(TtrpcError) as err:
                await client.call(ECHO, "Echo", b"\0" * (MAX_MESSAGE + 1))
            assert err.value.code == Code.RESOURCE_EXHAUSTED
            assert (await client.call(ECHO, "Echo", state("ok"), task_pb2.StateResponse)).id == "ok"
        finally:
            await client.close()

    run(main())


class FakeServer:
    """A raw unix-socket peer for the Client: one connection, scripted in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.listener.settimeout(IO_TIMEOUT)
        self.headers: list[tuple[int, int, int, int]] = []
        self.requests: list[ttrpc_pb2.Request] = []
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def serve(self, script: object) -> None:
        def body() -> None:
            try:
                conn, _ = self.listener.accept()
                with conn:
                    conn.settimeout(IO_TIMEOUT)
                    script(conn)
            except BaseException as exc:  # reported by join()
                self.error = exc

        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()

    def read_request(self, conn: socket.socket) -> int:
        header = recv_exact(conn, HDR.size)
        length, sid, mtype, flags = HDR.unpack(header)
        self.headers.append((length, sid, mtype, flags))
        self.requests.append(ttrpc_pb2.Request.FromString(recv_exact(conn, length)))
        return sid

    def join(self) -> None:
        assert self.thread is not None
        self.thread.join(IO_TIMEOUT)
        assert not self.thread.is_alive()
        self.listener.close()
        if self.error is not None:
            raise self.error


def ok_response(id_: str) -> bytes:
    payload = task_pb2.StateResponse(id=id_).SerializeToString()
    return ttrpc_pb2.Response(status=ttrpc_pb2.Status(), payload=payload).SerializeToString()


def test_client_stream_ids_and_out_of_order_answers(sockdir):
    fake = FakeServer(sockdir / "fake.sock")

    def script(conn: socket.socket) -> None:
        sids = [fake.read_request(conn) for _ in range(3)]
        # A Data frame on a pending stream must not complete (or lose) the call.
        conn.sendall(frame(sids[0], 3, b"junk"))
        for sid, req in reversed(list(zip(sids, fake.requests, strict=True))):
            conn.sendall(frame(sid, 2, ok_response(task_pb2.StateRequest.FromString(req.payload).id)))
        fake.read_request(conn)  # a fourth call, after the first three finished
        conn.sendall(frame(fake.headers[-1][1], 2, ok_response("four")))

    fake.serve(script)

    async def main() -> None:
        client = await Client.connect(fake.path)
        try:
            results = await asyncio.gather(
                *(
                    client.call(ECHO, "Echo", state(name), task_pb2.StateResponse, timeout=5)
                    for name in ("one", "two", "three")
                )
            )
            assert [r.id for r in results] == ["one", "two", "three"]
            assert (await client.call(ECHO, "Echo", state("four"), task_pb2.StateResponse)).id == "four"
        finally:
            await client.close()

    run(main())
    fake.join()
    assert [(sid, mtype, flags) for _len, sid, mtype, flags in fake.headers] == [
        (1, 1, 0),
        (3, 1, 0),
        (5, 1, 0),
        (7, 1, 0),
    ]
    assert [r.timeout_nano for r in fake.requests] == [5_000_000_000] * 3 + [0]
    assert all((r.service, r.method) == (ECHO, "Echo") for r in fake.requests)


def test_client_connection_close_fails_pending_calls(sockdir):
    fake = FakeServer(sockdir / "fake.sock")
    fake.serve(lambda conn: fake.read_request(conn))  # read one request, then hang up

    async def main() -> None:
        client = await Client.connect(fake.path)
        try:
            with pytest.raises(ConnectionError):
                await client.call(ECHO, "Echo", state("lost"))
            with pytest.raises(ConnectionError):
                await client.call(ECHO, "Echo", state("after"))
        finally:
            await client.close()

    run(main())
    fake.join()


def test_client_close_fails_pending_calls(server):
    async def main() -> None:
        client = await Client.connect(server.path)
        pending = asyncio.ensure_future(client.call(ECHO, "Block", state("never")))
        await client.call(ECHO, "Echo", state("sync"))  # Block has been sent by now
        await client.close()
        with pytest.raises(ConnectionError):
            await pending

    run(main())


# --- wire.py -------------------------------------------------------------------------


def test_wire_delete_response_parses_with_protobuf():
    encoded = (
        wire.field_varint(1, 4242)
        + wire.field_varint(2, 137)
        + wire.field_message(3, wire.timestamp(1_700_000_000.25))
    )
    msg = task_pb2.DeleteResponse.FromString(encoded)
    assert (msg.pid, msg.exit_status) == (4242, 137)
    assert (msg.exited_at.seconds, msg.exited_at.nanos) == (1_700_000_000, 250_000_000)
    assert encoded == msg.SerializeToString()


def test_wire_zero_and_empty_fields():
    assert wire.field_varint(1, 0) == b""
    assert wire.field_bytes(1, "") == b""
    assert wire.field_message(3, b"") == b"\x1a\x00"
    msg = task_pb2.DeleteResponse.FromString(wire.field_message(3, b""))
    assert msg.HasField("exited_at") and msg.exited_at.seconds == 0
    before = time.time()
    ts = task_pb2.DeleteResponse.FromString(wire.field_message(3, wire.timestamp())).exited_at
    assert before - 1 <= ts.seconds + ts.nanos / 1e9 <= time.time() + 1


def test_wire_ttrpc_request_matches_documented_bytes():
    metadata = wire.field_bytes(1, NS_KEY) + wire.field_bytes(2, "default")
    encoded = (
        wire.field_bytes(1, TASK)
        + wire.field_bytes(2, "Connect")
        + wire.field_bytes(3, wire.field_bytes(1, "abc"))
        + wire.field_message(5, metadata)
    )
    assert frame(1, 1, encoded) == DOC_REQUEST
    req = ttrpc_pb2.Request.FromString(encoded + wire.field_varint(4, -1))
    assert (req.service, req.method, req.timeout_nano) == (TASK, "Connect", -1)
    assert [(kv.key, kv.value) for kv in req.metadata] == [(NS_KEY, "default")]


def test_wire_fields_parses_protobuf_output():
    resp = ttrpc_pb2.Response(
        status=ttrpc_pb2.Status(code=Code.NOT_FOUND, message="gone"), payload=b"\x01\x02"
    ).SerializeToString()
    parsed = wire.fields(resp)
    assert [(n, t) for n, t, _ in parsed] == [(1, 2), (2, 2)]
    assert parsed[1][2] == b"\x01\x02"
    assert wire.fields(parsed[0][2]) == [(1, 0, Code.NOT_FOUND), (2, 2, b"gone")]
    req = ttrpc_pb2.Request(timeout_nano=-5).SerializeToString()
    assert wire.fields(req) == [(4, 0, (1 << 64) - 5)]
    # fixed64 and fixed32 fields
    assert wire.fields(b"\x09" + (7).to_bytes(8, "little") + b"\x15" + (9).to_bytes(4, "little")) == [
        (1, 1, 7),
        (2, 5, 9),
    ]


@pytest.mark.parametrize(
    "data",
    [b"\x08", b"\x08\x80", b"\x0a\x05abc", b"\x0a", b"\x09\x01\x02", b"\x15\x01", b"\x0b", b"\x80" * 11],
)
def test_wire_fields_rejects_truncated_input(data):
    with pytest.raises(ValueError):
        wire.fields(data)


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_varint_round_trip(value):
    encoded = wire.varint(value)
    assert wire.read_varint(encoded + b"tail", 0) == (value, len(encoded))
    assert len(encoded) == max(1, (value.bit_length() + 6) // 7)


@given(st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1).filter(bool))
def test_int64_field_matches_protobuf(value):
    assert wire.field_varint(4, value) == ttrpc_pb2.Request(timeout_nano=value).SerializeToString()


@given(st.binary(max_size=64))
def test_fields_only_raises_value_error(data):
    try:
        parsed = wire.fields(data)
    except ValueError:
        return
    for number, wtype, value in parsed:
        assert wtype in (0, 1, 2, 5)
        assert number >= 0
        assert isinstance(value, bytes if wtype == 2 else int)

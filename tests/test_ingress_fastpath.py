"""The ingress's shortcuts on its request path, each against the long way it stands for:
FunctionRegistry.sole (an ``id`` header routed without decoding it), the header bytes added
up only for a head that came in several feeds, the stamps of a head and a body taken once
per feed (by ``_count``), the chunk framing allowance kept in one number, and render()'s
inline finish of a cached head. Plain Python functions stand in for wasm ones: no engine,
no containerd."""

from __future__ import annotations

import asyncio
import random

import pytest

from layotto.host import ingress_render
from layotto.host.function import Request, Response
from layotto.host.function_registry import FunctionRegistry
from layotto.host.ingress import HttpProtocol, Ingress, IngressLimits, render
from layotto.host.ingress_limits import BODY, HEAD, IDLE
from tests.support import Recorder


class Fn:
    """A function answering inline with its id and what it saw of the request."""

    def __init__(self, fid: str, namespace: str = "ns", tag: str = "") -> None:
        self.id = fid
        self.namespace = namespace
        self.tag = (tag or fid).encode("utf-8", "replace")

    def call_inline(self, request: Request) -> Response:
        return Response(200, [(b"x-fn", self.tag)], b"%s %s %s" % (self.tag, request.path, request.body))

    async def call_threaded(self, request: Request) -> Response:  # pragma: no cover - inline only
        return self.call_inline(request)


def exchange(ingress: Ingress, feeds: list[bytes]) -> bytes:
    """What one connection of ``ingress`` answers to ``feeds`` (each its own data_received)."""

    async def run() -> bytes:
        wire = Recorder()
        protocol = HttpProtocol(ingress)
        protocol.connection_made(wire)
        for feed in feeds:
            protocol.data_received(feed)
        await asyncio.sleep(0)  # (written at the end of the turn)
        protocol.connection_lost(None)
        if ingress._sweeper is not None:
            ingress._sweeper.cancel()
            ingress._sweeper = None
        return bytes(wire.data)

    return asyncio.run(run())


# ------------------------------------------------------------------ FunctionRegistry.sole


def test_sole_holds_exactly_the_ids_served_by_one_function() -> None:
    rng = random.Random(7)
    registry = FunctionRegistry()
    pool = [Fn(fid, tag=f"{fid}{n}") for fid in ("a", "é", "\ufffd", "x\udc80", "b") for n in range(3)]
    added: list[Fn] = []
    for _ in range(2000):
        fn = rng.choice(pool)
        if fn in added and rng.random() < 0.6:
            registry.remove(fn)
            added.remove(fn)
        elif fn not in added:
            registry.add(fn)
            added.append(fn)
        groups: dict[str, list[Fn]] = {}
        for f in added:
            groups.setdefault(f.id, []).append(f)
        expected = {fid.encode(): g[0] for fid, g in groups.items() if len(g) == 1 and fid != "x\udc80"}
        assert registry.sole == expected
        for fid in ("a", "é", "\ufffd", "x\udc80", "b", "nope"):
            group = groups.get(fid, [])
            got = registry.get(fid)
            assert (got in group) if group else got is None
            assert registry.get(fid, "ns") is got or len(group) > 1
            assert registry.get(fid, "other") is None


def test_an_id_header_is_routed_as_its_decoded_value_is() -> None:
    registry = FunctionRegistry()
    for fn in (Fn("a"), Fn("\ufffd", tag="replacement"), Fn("é"), Fn("rr", tag="rr1"), Fn("rr", tag="rr2")):
        registry.add(fn)
    ingress = Ingress(registry)
    ingress.forward = lambda fid: Fn("elsewhere") if fid == "fwd" else None

    def answer(fid: bytes, path: bytes = b"/p") -> bytes:
        out = exchange(ingress, [b"GET %s HTTP/1.1\r\nid: %s\r\n\r\n" % (path, fid)])
        return out.split(b"\r\n\r\n", 1)[1] if b" 200 " in out else out.split(b"\r\n", 1)[0]

    assert answer(b"a") == b"a /p "
    assert answer("é".encode()) == "é /p ".encode()
    assert answer(b"\xff") == b"replacement /p "  # (invalid UTF-8: decoded with U+FFFD)
    assert answer(b"\xef\xbf\xbd") == b"replacement /p "
    assert sorted(answer(b"rr") for _ in range(4)) == [b"rr1 /p "] * 2 + [b"rr2 /p "] * 2
    assert answer(b"fwd") == b"elsewhere /p "
    assert answer(b"A") == b"HTTP/1.1 404 Not Found"
    assert answer(b"", b"/fn/a/x") == b"HTTP/1.1 404 Not Found"  # (an empty id header wins)
    assert exchange(ingress, [b"GET /fn/a/x HTTP/1.1\r\n\r\n"]).endswith(b"a /x ")


# ------------------------------------------------------------------ the head's limits


@pytest.mark.parametrize("max_header_bytes", [200, 3000])
def test_header_bytes_are_limited_whether_a_head_comes_in_one_feed_or_several(max_header_bytes: int) -> None:
    """A head of at most max_header_bytes field bytes passes, one byte more is 431, whether
    its fields are added up (a head in two feeds, or a slice larger than the limit: 1 KiB
    for a limit of 200) or known to fit in the slice they came in."""
    registry = FunctionRegistry()
    registry.add(Fn("a"))
    ingress = Ingress(registry, limits=IngressLimits(max_header_bytes=max_header_bytes))
    slice_size = ingress._slice
    checked = 0
    for fields in (max_header_bytes - 10, max_header_bytes, max_header_bytes + 1, 2 * max_header_bytes):
        # fields: the bytes of names and values ("id" + "a" + "x-pad" + the pad)
        head = b"GET / HTTP/1.1\r\nid: a\r\nx-pad: %s\r\n\r\n" % (b"v" * (fields - 8))
        for cut in (len(head), 20, len(head) - 3, len(head) // 2):
            feeds = [head[:cut], head[cut:]] if cut < len(head) else [head]
            if max(map(len, feeds)) > slice_size:  # (then its bytes as they arrive count too)
                continue
            status = exchange(ingress, feeds).split(b" ", 2)[1]
            assert status == (b"431" if fields > max_header_bytes else b"200"), (fields, cut)
            checked += 1
    assert checked >= 4


def test_the_stamps_of_a_head_and_a_body_are_those_of_the_feeds_they_began_in() -> None:
    registry = FunctionRegistry()
    registry.add(Fn("a"))
    ingress = Ingress(registry)

    async def run() -> None:
        wire = Recorder()
        protocol = HttpProtocol(ingress)
        protocol.connection_made(wire)
        ingress._sweeper.cancel()
        ingress._sweeper = None

        def feed(now: float, data: bytes) -> tuple[int, float]:
            ingress.now = now
            protocol.data_received(data)
            return protocol._phase, protocol._since

        assert feed(1.0, b"GET / HTTP/1.1\r\nid: a\r\n\r\n") == (IDLE, 1.0)
        assert feed(2.0, b"POST / HTTP/1.1\r\nid: a\r\n") == (HEAD, 2.0)  # a head began
        assert feed(3.0, b"x-more: 1\r\n") == (HEAD, 2.0)  # (it goes on: its stamp stays)
        assert feed(4.0, b"content-length: 4\r\n\r\nab") == (BODY, 4.0)  # it ended
        assert feed(5.0, b"c") == (BODY, 4.0)
        assert feed(6.0, b"dGET / HTTP/1.1\r\nid: a\r\ncontent-length: 2\r\n\r\n") == (BODY, 6.0)
        assert feed(7.0, b"zz") == (IDLE, 7.0)
        assert feed(8.0, b"\r\n") == (IDLE, 7.0)  # (no message: nothing stamped)
        assert feed(9.0, b"GET / HTTP/1.1\r\nid: a\r\n\r\nGET / HT") == (HEAD, 9.0)
        await asyncio.sleep(0)
        protocol.connection_lost(None)
        assert wire.data.count(b" 200 OK") == 4

    asyncio.run(run())


def test_chunk_framing_past_its_allowance_is_refused() -> None:
    """A chunked body's framing and trailers may take max_header_bytes, and 32 bytes more
    per chunk (its size line): one byte more is 431."""
    registry = FunctionRegistry()
    registry.add(Fn("a"))
    limit = 2000
    ingress = Ingress(registry, limits=IngressLimits(max_header_bytes=limit))
    head = b"POST / HTTP/1.1\r\nid: a\r\ntransfer-encoding: chunked\r\n\r\n"
    for extra in (0, 1):
        # the last chunk's size line (3 bytes), a trailer of 2 + 3 + n bytes; 32 allowed
        n = limit + 24 + extra
        out = exchange(ingress, [head, b"0\r\nT: %s\r\n" % (b"t" * n), b"\r\n"])
        assert out.split(b" ", 2)[1] == (b"431" if extra else b"200")
    for extension, refused in ((28, False), (60, True)):  # (many chunks, fed in pieces)
        body = b"".join(b"1;e=%s\r\nC\r\n" % (b"x" * extension) for _ in range(60)) + b"0\r\n\r\n"
        out = exchange(ingress, [head] + [body[i : i + 17] for i in range(0, len(body), 17)])
        assert (b" 431 " in out) == refused, extension


# ------------------------------------------------------------------ render()


@pytest.mark.parametrize("status", [200, 201, 204, 304, 404, 599])
@pytest.mark.parametrize("keep_alive", [True, False])
@pytest.mark.parametrize("head", [True, False])
def test_a_cached_head_renders_as_the_first_rendering_did(status: int, keep_alive: bool, head: bool) -> None:
    headers = [(b"content-type", b"text/plain"), (b"x-s", b"%d" % status)]
    body = b"body of %d" % status
    key = (status, tuple(headers))
    first = ingress_render._render(Response(status, list(headers), body), keep_alive, head, key)
    assert (status, tuple(headers)) in ingress_render._HEADS
    assert render(Response(status, list(headers), body), keep_alive, head) == first
    # what the cache must not take for the status it equals
    assert b" 500 " in render(Response(float(status), list(headers), body), keep_alive, head)
    assert b" 500 " in render(Response(status, list(headers), body.decode()), keep_alive, head)

"""Responses on the wire for the HTTP ingress: the status lines, the header checks, render().

Nothing a function returns is written unchecked: a status outside 200-999, a header name
that is not an RFC 7230 token, a value with a control character or a body that is not
bytes turns the response into a 500 naming the cause, so a function cannot forge a second
response on a keep-alive connection. Checked header lines and whole heads are cached (most
functions answer with the same few), small ones only: a function answering with large or
ever-new headers must not make the host keep them. See docs/security.md ("The ingress and other
listeners") and docs/functions.md ("Status codes").
"""

from __future__ import annotations

import re
from http import HTTPStatus

from layotto.host.function import Response

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
# Whole heads already checked (the status line and the header lines), by (status, headers):
# most functions answer with one or two.
_HEADS: dict[tuple[int, tuple[tuple[bytes, bytes], ...]], bytes] = {}
_HEADS_MAX = 4096
# Only a line or head this short is cached (so the caches hold a few MiB at most, whatever
# functions answer with).
_CACHED_BYTES = 512


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
    status = response.status
    body = response.body
    if type(status) is int and type(body) is bytes:  # (so 200.0 or a str body miss the cache)
        try:
            key: tuple | None = (status, tuple(response.headers))
            start = _HEADS.get(key)
        except TypeError:  # (headers that are not a list of tuples: checked by _render)
            key = None
        else:
            if start is not None:  # a head already checked: the common case, inline
                if keep_alive and not head and status not in _NO_BODY:
                    return b"%scontent-length: %d\r\n\r\n%s" % (start, len(body), body)
                return _finish(start, status, body, keep_alive, head)
    else:
        key = None
    try:
        return _render(response, keep_alive, head, key)
    except _Invalid as exc:
        return _render(_invalid(str(exc)), keep_alive, head, None)


class _Invalid(Exception):
    pass


def _render(response: Response, keep_alive: bool, head: bool, key: tuple | None) -> bytes:
    """Check and render a response whose head is not cached; ``key``: the head cache's key
    for it (render's), under which its checked head is kept, or None."""
    status = response.status
    body = response.body
    line = _STATUS_LINES.get(status) if type(status) is int else None
    if line is None:
        raise _Invalid(f"response status {_short(status)}")
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
                if len(lines) < _LINES_MAX and type(pair) is tuple and len(text) <= _CACHED_BYTES:
                    lines[pair] = text
            if text:
                parts.append(text)
    except (TypeError, ValueError) as exc:  # not a list of pairs, ...
        raise _Invalid(f"response headers ({exc})") from None
    start = b"".join(parts)
    if key is not None and len(_HEADS) < _HEADS_MAX and len(start) <= _CACHED_BYTES:
        _HEADS[key] = start
    return _finish(start, status, body, keep_alive, head)


def _finish(start: bytes, status: int, body: bytes, keep_alive: bool, head: bool) -> bytes:
    """The response from its checked head: the framing headers, the end of the head, the body."""
    if status in _NO_BODY:
        return start + (_END if keep_alive else _END_CLOSE)
    framing = b"content-length: %d\r\n%s" % (len(body), _END if keep_alive else _END_CLOSE)
    return start + framing if head else b"".join((start, framing, body))


_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
    b"connection: close\r\n\r\n%s"
)


def refusal(why: bytes) -> bytes:
    """A 503 that closes the connection, written before any request was read."""
    return _REFUSED % (len(why), why)

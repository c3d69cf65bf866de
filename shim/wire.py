"""Just enough protobuf wire encoding for the shim's start/delete paths.

`start` and `delete` run on every container's cold start, so they must not import
google.protobuf (about 40 ms). The few messages they write (a DeleteResponse, a ttrpc
Request) are encoded here by hand; the field numbers are those of shim/protocol/*.proto.
"""

from __future__ import annotations

import time

VARINT = 0
LEN = 2


def varint(value: int) -> bytes:
    """Encode a non-negative integer (or a two's-complement negative int64) as a varint."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_varint(number: int, value: int) -> bytes:
    """A varint field; zero values are omitted, as proto3 does."""
    return varint(number << 3 | VARINT) + varint(value) if value else b""


def field_bytes(number: int, value: bytes | str) -> bytes:
    """A length-delimited field (string, bytes or embedded message); empty values are omitted."""
    if isinstance(value, str):
        value = value.encode()
    return varint(number << 3 | LEN) + varint(len(value)) + value if value else b""


def field_message(number: int, encoded: bytes) -> bytes:
    """An embedded message field that is present even when empty."""
    return varint(number << 3 | LEN) + varint(len(encoded)) + encoded


def timestamp(seconds_since_epoch: float | None = None) -> bytes:
    """An encoded google.protobuf.Timestamp."""
    now = time.time() if seconds_since_epoch is None else seconds_since_epoch
    seconds = int(now)
    nanos = int((now - seconds) * 1e9)
    return field_varint(1, seconds) + field_varint(2, nanos)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode a varint at ``pos``; returns (value, next position)."""
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def fields(data: bytes) -> list[tuple[int, int, int | bytes]]:
    """Split an encoded message into (field number, wire type, value) triples."""
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        number, wtype = key >> 3, key & 7
        if wtype == VARINT:
            value, pos = read_varint(data, pos)
            out.append((number, wtype, value))
        elif wtype == LEN:
            size, pos = read_varint(data, pos)
            if pos + size > len(data):
                raise ValueError("truncated field")
            out.append((number, wtype, data[pos : pos + size]))
            pos += size
        elif wtype in (1, 5):
            size = 8 if wtype == 1 else 4
            if pos + size > len(data):
                raise ValueError("truncated field")
            out.append((number, wtype, int.from_bytes(data[pos : pos + size], "little")))
            pos += size
        else:
            raise ValueError(f"unsupported wire type {wtype}")
    return out

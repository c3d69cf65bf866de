"""proxy-wasm's map serialization, as the Runtime ABI uses it for headers, key lists,
bulk results and secrets: u32 count, count × (u32 key_len, u32 value_len), then each key
and each value followed by a NUL byte, all little-endian. An empty map may also be empty
bytes or a single NUL. Standard library only."""

from __future__ import annotations

import struct

_COUNT = struct.Struct("<I")
_SIZES = struct.Struct("<II")


def encode_map(pairs: list[tuple[bytes, bytes]]) -> bytes:
    sizes = b"".join(_SIZES.pack(len(k), len(v)) for k, v in pairs)
    return _COUNT.pack(len(pairs)) + sizes + b"".join(k + b"\0" + v + b"\0" for k, v in pairs)


def decode_map(data: bytes) -> list[tuple[bytes, bytes]]:
    """The pairs of an encoded map; ValueError when it is malformed."""
    if not data or data == b"\0":
        return []
    if len(data) < 4:
        raise ValueError("map shorter than its count")
    (count,) = _COUNT.unpack_from(data)
    if count > (len(data) - 4) // 10:  # each entry: 8 bytes of sizes and 2 NULs at least
        raise ValueError("map count exceeds its size")
    pos = 4 + 8 * count
    pairs = []
    for i in range(count):
        klen, vlen = _SIZES.unpack_from(data, 4 + 8 * i)
        if pos + klen + vlen + 2 > len(data):
            raise ValueError("map entry out of range")
        key = data[pos : pos + klen]
        pos += klen + 1
        value = data[pos : pos + vlen]
        pos += vlen + 1
        pairs.append((key, value))
    return pairs

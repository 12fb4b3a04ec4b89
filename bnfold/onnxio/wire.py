"""Protobuf wire-format primitives shared by the streaming reader and writer."""

from __future__ import annotations

LEN = 2  # wire type of length-delimited fields (messages, bytes, strings)


def encode_varint(n: int) -> bytes:
    """``n`` (>= 0) as a protobuf base-128 varint."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)

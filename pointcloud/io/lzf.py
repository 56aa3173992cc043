"""LZF, the byte-oriented LZ77 variant PCD ``binary_compressed`` files use (written here, not bound).

Stream format: a control byte ``c``. ``c < 32``: ``c + 1`` literal bytes follow. Otherwise a
back-reference: length ``(c >> 5) + 2`` (when ``c >> 5 == 7`` a further byte adds to it), distance
``((c & 31) << 8) + next byte + 1`` back from the end of the output; source and target may overlap.
"""

from __future__ import annotations

_MAX_LITERAL = 32
_MAX_MATCH = 264  # (7 + 255) + 2
_MAX_DISTANCE = 8192


class LZFError(ValueError):
    """The compressed stream is truncated or refers outside what was decoded so far."""


def lzf_decompress(data: bytes, expected_size: int) -> bytes:
    """Decode an LZF stream that must expand to exactly ``expected_size`` bytes."""
    src = memoryview(data)
    out = bytearray()
    i, n = 0, len(src)
    while i < n:
        ctrl = src[i]
        i += 1
        if ctrl < 32:
            run = ctrl + 1
            if i + run > n:
                raise LZFError(f"literal run of {run} bytes at offset {i - 1} passes the end of the stream")
            out += src[i : i + run]
            i += run
            continue
        length = ctrl >> 5
        if length == 7:
            if i >= n:
                raise LZFError("stream ends inside a back-reference")
            length += src[i]
            i += 1
        if i >= n:
            raise LZFError("stream ends inside a back-reference")
        distance = ((ctrl & 31) << 8) + src[i] + 1
        i += 1
        length += 2
        if distance > len(out):
            raise LZFError(f"back-reference {distance} bytes back at output size {len(out)}")
        start = len(out) - distance
        if distance >= length:
            out += out[start : start + length]
        else:  # overlapping copy repeats the last `distance` bytes
            pattern = out[start:]
            out += (pattern * (length // distance + 1))[:length]
        if len(out) > expected_size:
            break
    if len(out) != expected_size:
        raise LZFError(f"stream decodes to {len(out)} bytes, expected {expected_size}")
    return bytes(out)


def lzf_compress(data: bytes) -> bytes:
    """Encode ``data`` as an LZF stream (greedy matches found through a 3-byte hash; pure Python,
    about a second per megabyte)."""
    data = bytes(data)
    n = len(data)
    out = bytearray()
    literal_start = 0
    last: dict[bytes, int] = {}

    def flush(end: int) -> None:
        s = literal_start
        while s < end:
            run = min(_MAX_LITERAL, end - s)
            out.append(run - 1)
            out.extend(data[s : s + run])
            s += run

    i = 0
    while i + 2 < n:
        key = data[i : i + 3]
        ref = last.get(key)
        last[key] = i
        if ref is None or i - ref > _MAX_DISTANCE:
            i += 1
            continue
        length = 3
        limit = min(_MAX_MATCH, n - i)
        while length < limit and data[ref + length] == data[i + length]:
            length += 1
        flush(i)
        distance = i - ref - 1
        code = length - 2
        if code < 7:
            out.append((code << 5) | (distance >> 8))
        else:
            out.append((7 << 5) | (distance >> 8))
            out.append(code - 7)
        out.append(distance & 255)
        i += length
        literal_start = i
    flush(n)
    return bytes(out)

"""HTTP/1.1 on the wire, as much as the S3 fault proxy (``tests/s3_fault_proxy.py``) needs to pass requests through
byte for byte: read a request head, split and join header lines, relay a body with its framing (length or chunked,
trailers included), and close a connection with a reset."""

from __future__ import annotations

import socket
import struct

MAX_HEAD = 64 * 1024


def read_head(rfile) -> bytes | None:
    lines = []
    size = 0
    while True:
        line = rfile.readline(MAX_HEAD)
        if not line:
            return None if not lines else b"".join(lines)
        if line in (b"\r\n", b"\n"):
            if not lines:
                continue  # stray blank line between requests
            return b"".join(lines)
        lines.append(line)
        size += len(line)
        if size > MAX_HEAD:
            raise ValueError("request head too large")


def split_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    lines = head.split(b"\r\n") if b"\r\n" in head else head.split(b"\n")
    first, headers = lines[0].strip(), []
    for line in lines[1:]:
        if not line.strip():
            continue
        name, _, value = line.partition(b":")
        headers.append((name.strip(), value.strip()))
    return first, headers


def join_head(first: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    return first + b"\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n"


def header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes:
    for k, v in headers:
        if k.lower() == name:
            return v
    return b""


def relay_body(rfile, sink: socket.socket | None, headers: list[tuple[bytes, bytes]]) -> None:
    """Copy one request body as it came (framing included) to ``sink``, or read and drop it (None)."""

    def emit(data: bytes) -> None:
        if sink is not None and data:
            sink.sendall(data)

    def copy(n: int) -> None:
        while n > 0:
            chunk = rfile.read(min(n, 65536))
            if not chunk:
                raise OSError("the client closed the connection inside a request body")
            emit(chunk)
            n -= len(chunk)

    if b"chunked" in header(headers, b"transfer-encoding").lower():
        while True:
            line = rfile.readline(MAX_HEAD)
            if not line:
                raise OSError("the client closed the connection inside a chunked body")
            emit(line)
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers (botocore sends its checksums here), then a blank line
                    trailer = rfile.readline(MAX_HEAD)
                    emit(trailer)
                    if trailer in (b"\r\n", b"\n", b""):
                        return
            copy(size + 2)  # the chunk and its CRLF
    length = header(headers, b"content-length")
    if length:
        copy(int(length))


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN, as a dropped connection does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()

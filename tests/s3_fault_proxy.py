"""A small HTTP fault proxy in front of the local S3-compatible server, for the fault suite.

``S3FaultProxy(upstream)`` listens on 127.0.0.1 (a port the OS picks) and forwards every request to
``upstream`` (which must be on 127.0.0.1 too), except a chosen share of them, which it breaks:

- ``reset``: the connection is closed with SO_LINGER 0, so the client gets a real TCP RST. With
  ``reset_at="request"`` (default) the server never sees the request; with ``"response"`` the server
  has done it and only the answer is lost (a retried PUT or multipart step then meets its own result);
- ``slowdown``: an S3 ``503 SlowDown`` error with its XML body, as S3 sends when it throttles;
- ``blackhole``: the connection is accepted and never answered (until the proxy stops);
- ``latency``: seconds added before each forwarded request (makes a transfer slow enough to kill).

Shares are fractions of requests in [0, 1] (their sum at most 1), settable at any time with ``set()``;
``match`` (a regular expression searched in ``"METHOD /bucket/key?query"``) limits the faults to the
requests it finds, e.g. ``r"^GET .*/img/"`` for the image reads of a drop.
Which request is broken is deterministic for a seed: the decision is a hash of the seed, the request
(method, path and query without upload ids) and how many times that same request was seen, so it does not
depend on the order in which threads arrive, and a retry of a request gets a fresh decision. Where the keys
themselves are random (MLflow's run ids are in its artifact paths), ``draw="sequence"`` hashes the seed and
the request's arrival number instead, which is deterministic for a client that sends one request at a time. ``counts``
says what was injected (``requests``, ``forwarded``, ``reset``, ``slowdown``, ``blackhole``, ``delayed``).

Bodies are relayed byte for byte in both directions, whatever their framing (Content-Length, HTTP chunked,
botocore's aws-chunked with trailing checksums, streamed GET bodies). One request per connection: the proxy
asks both sides for ``Connection: close``, so a fault never leaks into a later request on a reused socket;
``Expect: 100-continue`` is answered by the proxy itself. Bounded: it talks to 127.0.0.1 only, and stops by
itself after ``max_lifetime`` seconds if a test forgets to (use it as a context manager).

Not a fake of S3: every request that is not broken reaches the real server unchanged.
"""

from __future__ import annotations

import collections
import hashlib
import re
import socket
import socketserver
import struct
import threading
import time
from urllib.parse import parse_qsl, urlencode, urlsplit

from tests import http_wire as wire

HOP_HEADERS = {b"connection", b"keep-alive", b"proxy-connection", b"expect"}
LOCAL_HOSTS = {"127.0.0.1", "localhost"}


def slowdown_body(request_id: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
        "<Message>Please reduce your request rate.</Message>"
        f"<RequestId>{request_id}</RequestId><HostId>s3-fault-proxy</HostId></Error>"
    ).encode()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, proxy: S3FaultProxy):
        self.proxy = proxy
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.server.proxy._serve(self.request)


class S3FaultProxy:
    def __init__(
        self,
        upstream: str,
        *,
        seed: int = 0,
        reset: float = 0.0,
        slowdown: float = 0.0,
        blackhole: float = 0.0,
        latency: float = 0.0,
        reset_at: str = "request",
        match: str | None = None,
        draw: str = "request",
        limit: int | None = None,
        max_lifetime: float = 300.0,
    ):
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname not in LOCAL_HOSTS or not parts.port:
            raise ValueError(f"the fault proxy only forwards to http://127.0.0.1:PORT, not {upstream!r}")
        self.upstream = ("127.0.0.1", parts.port)
        self.seed = seed
        self.max_lifetime = max_lifetime
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._seen: collections.Counter[str] = collections.Counter()
        self.counts: collections.Counter[str] = collections.Counter()
        self.log: list[tuple[str, str]] = []  # (request, action), in decision order
        self.shares = {"blackhole": 0.0, "reset": 0.0, "slowdown": 0.0}
        self.latency = 0.0
        self.reset_at = "request"
        self.match: re.Pattern | None = None
        self.draw = "request"
        self.limit: int | None = None
        self._sequence = 0
        self.set(
            reset=reset,
            slowdown=slowdown,
            blackhole=blackhole,
            latency=latency,
            reset_at=reset_at,
            match=match,
            draw=draw,
            limit=limit,
        )
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []

    # ---- control ---------------------------------------------------------------------------------

    def set(
        self,
        *,
        reset: float | None = None,
        slowdown: float | None = None,
        blackhole: float | None = None,
        latency: float | None = None,
        reset_at: str | None = None,
        match: str | None = None,
        draw: str | None = None,
        limit: int | None = None,
    ) -> S3FaultProxy:
        """Change the fault shares (fractions of requests) or the latency; None keeps the current value
        (``match=""`` removes the filter). ``limit``: at most that many faults in all, then every request is
        forwarded (``limit=1`` with a share of 1: exactly the first matching request is broken)."""
        with self._lock:
            shares = dict(self.shares)
            for name, value in (("reset", reset), ("slowdown", slowdown), ("blackhole", blackhole)):
                if value is not None:
                    if not 0.0 <= value <= 1.0:
                        raise ValueError(f"{name} share {value} is not in [0, 1]")
                    shares[name] = float(value)
            if sum(shares.values()) > 1.0 + 1e-9:
                raise ValueError(f"fault shares add up to more than 1: {shares}")
            if reset_at is not None and reset_at not in ("request", "response"):
                raise ValueError(f"reset_at is 'request' or 'response', not {reset_at!r}")
            self.shares = shares
            self.latency = self.latency if latency is None else max(0.0, float(latency))
            self.reset_at = reset_at or self.reset_at
            if match is not None:
                self.match = re.compile(match) if match else None
            if draw is not None:
                if draw not in ("request", "sequence"):
                    raise ValueError(f"draw is 'request' or 'sequence', not {draw!r}")
                self.draw = draw
            if limit is not None:
                self.limit = int(limit)
        return self

    def clear(self) -> S3FaultProxy:
        """No faults, no latency, no filter, counts at zero: as new (for a proxy shared between tests)."""
        with self._lock:
            self._seen.clear()
            self._sequence = 0
            self.counts.clear()
            self.log.clear()
            self.limit = None
        return self.set(
            reset=0.0, slowdown=0.0, blackhole=0.0, latency=0.0, reset_at="request", match="", draw="request"
        )

    def faults(self, rate: float) -> S3FaultProxy:
        """A fault rate split evenly between connection resets and 503 SlowDown answers."""
        return self.set(reset=rate / 2, slowdown=rate / 2, blackhole=0.0, match="")

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def injected(self) -> int:
        with self._lock:
            return self.counts["reset"] + self.counts["slowdown"] + self.counts["blackhole"]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def start(self) -> S3FaultProxy:
        self._server = _Server(self)
        serving = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="s3-fault-proxy", daemon=True
        )
        serving.start()
        watchdog = threading.Thread(target=self._watchdog, name="s3-fault-proxy-watchdog", daemon=True)
        watchdog.start()
        self._threads = [serving, watchdog]
        return self

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()  # releases black-holed connections too
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _watchdog(self) -> None:
        if not self._stop.wait(self.max_lifetime):
            self.stop()

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- decisions -------------------------------------------------------------------------------

    def _decide(self, method: str, target: str) -> tuple[str, str]:
        parts = urlsplit(target)
        query = urlencode(
            sorted((k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k.lower() != "uploadid")
        )
        key = f"{method} {parts.path}?{query}"
        with self._lock:
            basis = f"{key}|{self._seen[key]}" if self.draw == "request" else f"#{self._sequence}"
            self._seen[key] += 1
            self._sequence += 1
            self.counts["requests"] += 1
            shares = dict(self.shares)
            injected = sum(self.counts[name] for name in ("reset", "slowdown", "blackhole"))
            if (self.match is not None and not self.match.search(key)) or (
                self.limit is not None and injected >= self.limit
            ):
                shares = {name: 0.0 for name in shares}
        digest = hashlib.sha256(f"{self.seed}|{basis}".encode()).digest()
        u = struct.unpack(">Q", digest[:8])[0] / 2.0**64
        action, edge = "forward", 0.0
        for name in ("blackhole", "reset", "slowdown"):
            edge += shares[name]
            if u < edge:
                action = name
                break
        with self._lock:
            self.counts[action if action != "forward" else "forwarded"] += 1
            self.log.append((key, action))
        return action, key

    # ---- one connection, one request -------------------------------------------------------------

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(60)
        rfile = client.makefile("rb")
        try:
            head = wire.read_head(rfile)
            if head is None:
                return
            request_line, headers = wire.split_head(head)
            method, target = request_line.split(b" ")[:2]
            action, key = self._decide(method.decode("latin-1"), target.decode("latin-1"))
            if action == "blackhole":
                self._stop.wait()
                return
            if action == "reset" and self.reset_at == "request":
                wire.reset(client)
                return
            expects = wire.header(headers, b"expect").lower() == b"100-continue"
            if action == "slowdown":
                if not expects:
                    wire.relay_body(rfile, None, headers)
                _send_slowdown(client, method, key)
                return
            if self.latency:
                with self._lock:
                    self.counts["delayed"] += 1
                if self._stop.wait(self.latency):
                    return
            self._forward(client, rfile, request_line, headers, expects, reset_after=(action == "reset"))
        except (OSError, ValueError):
            pass  # the client went away or spoke nonsense: nothing to answer
        finally:
            rfile.close()

    def _forward(
        self,
        client: socket.socket,
        rfile,
        request_line: bytes,
        headers: list[tuple[bytes, bytes]],
        expects: bool,
        reset_after: bool,
    ) -> None:
        with socket.create_connection(self.upstream, timeout=60) as upstream:
            kept = [(k, v) for k, v in headers if k.lower() not in HOP_HEADERS]
            upstream.sendall(wire.join_head(request_line, kept + [(b"Connection", b"close")]))
            if expects:
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            wire.relay_body(rfile, upstream, headers)
            ufile = upstream.makefile("rb")
            try:
                head = wire.read_head(ufile)
                if head is None:
                    raise OSError("the S3 server closed the connection without an answer")
                if reset_after:  # the server did it; the client never hears
                    wire.reset(client)
                    return
                status_line, resp_headers = wire.split_head(head)
                kept = [(k, v) for k, v in resp_headers if k.lower() not in HOP_HEADERS]
                client.sendall(wire.join_head(status_line, kept + [(b"Connection", b"close")]))
                # The server closes after this one answer (we asked it to): relay until it does.
                while chunk := ufile.read1(65536):
                    client.sendall(chunk)
            finally:
                ufile.close()


def _send_slowdown(client: socket.socket, method: bytes, key: str) -> None:
    request_id = hashlib.sha256(f"{key}|{time.monotonic_ns()}".encode()).hexdigest()[:16].upper()
    body = slowdown_body(request_id)
    headers = [
        (b"Content-Type", b"application/xml"),
        (b"Content-Length", str(len(body)).encode()),
        (b"x-amz-request-id", request_id.encode()),
        (b"Connection", b"close"),
    ]
    client.sendall(wire.join_head(b"HTTP/1.1 503 Slow Down", headers) + (b"" if method == b"HEAD" else body))

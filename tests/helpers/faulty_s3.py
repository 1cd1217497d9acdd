"""An HTTP proxy in front of an S3 server (moto) that injects storage faults into chosen requests.

    proxy = FaultyS3(upstream="http://127.0.0.1:5000"); proxy.start()
    proxy.faults = [Fault("503", rate=0.2), Fault("reset", rate=0.05, method="PUT")]
    ... point AWS_ENDPOINT_URL at proxy.endpoint ...

Faults, as a real store or network gives them:
- "503": an S3 `SlowDown` error response (what a throttled bucket answers);
- "reset": the connection is reset (RST) before any response;
- "timeout": the request is held without an answer for `stall_s`, then the connection is closed (a client
  whose read timeout is shorter sees a read timeout).
Requests not chosen for a fault are forwarded unchanged. Decisions come from a seeded generator, so a run's
fault sequence depends only on the order of requests. `stop()`/`start()` take the endpoint down and up on the
same port (an outage).
"""
from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b'<Message>Please reduce your request rate.</Message><RequestId>faulty-s3</RequestId></Error>')


@dataclass
class Fault:
    kind: str                    # "503" | "reset" | "timeout"
    rate: float = 1.0            # fraction of the matching requests that get it
    method: str | None = None    # only this HTTP method
    path: str | None = None      # only paths matching this regex (bucket/key, no query)
    after: int = 0               # let this many matching requests through first
    for_s: float | None = None   # active for this long after its first injection (None: until removed)

    def __post_init__(self) -> None:
        if self.kind not in ("503", "reset", "timeout"):
            raise ValueError(f"unknown fault kind {self.kind!r}")
        self._seen = 0
        self._first: float | None = None

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or method == self.method) and (self.path is None or bool(re.search(self.path, path)))


class FaultyS3:
    def __init__(self, upstream: str, *, seed: int = 0, stall_s: float = 3.0) -> None:
        u = urlparse(upstream)
        self.upstream = (u.hostname, u.port)
        self.faults: list[Fault] = []
        self.stall_s = stall_s
        self.injected: Counter = Counter()      # kind -> count
        self.injected_on: Counter = Counter()   # (kind, method) -> count
        self.requests = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server: ThreadingHTTPServer | None = None
        self._conns: set[socket.socket] = set()   # open client connections (kept alive between requests)

    # ---- control ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        proxy = self

        class Handler(_Handler):
            owner = proxy
        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        server.allow_reuse_address = True
        server.handle_error = lambda request, client_address: None   # resets are the point, not errors
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._server = server

    def stop(self) -> None:
        """Down: no new connections, and the kept-alive ones are cut (clients see the endpoint go away)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass

    def decide(self, method: str, path: str) -> str | None:
        with self._lock:
            self.requests += 1
            now = time.monotonic()
            for f in self.faults:
                if not f.matches(method, path):
                    continue
                f._seen += 1
                if f._seen <= f.after:
                    continue
                if f.for_s is not None and f._first is not None and now - f._first > f.for_s:
                    continue
                if self._rng.random() < f.rate:
                    f._first = f._first if f._first is not None else now
                    self.injected[f.kind] += 1
                    self.injected_on[f.kind, method] += 1
                    return f.kind
            return None


class _Handler(BaseHTTPRequestHandler):
    owner: FaultyS3
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.owner._lock:
            self.owner._conns.add(self.connection)

    def finish(self) -> None:
        with self.owner._lock:
            self.owner._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass   # trailers
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self) -> None:
        body = self._body()
        fault = self.owner.decide(self.command, self.path.split("?", 1)[0])
        if fault == "503":
            self.send_response_only(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOW_DOWN)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(SLOW_DOWN)
            return
        if fault in ("reset", "timeout"):
            if fault == "timeout":
                time.sleep(self.owner.stall_s)
            # SO_LINGER 0: close() sends RST, as a broken connection does
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        conn = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response_only(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            conn.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the local S3 server (tests only, loopback only).

Every request is forwarded to the upstream endpoint; object GETs (no query string) first take a fault, either from
a bounded plan, in order, or at random with probability `rate` from `kinds` (seeded, so a run is reproducible):
"truncate" (the real status and headers, then half the body, then the connection closes), "503" (an S3 SlowDown
error), "500" (an S3 InternalError; botocore retries both), "reset" (the connection closes before any answer),
"delay" (the answer comes `delay_s` late: a read timeout when delay_s exceeds the client's). What was injected is
counted, and so is every request by method (`requests`), so a test can assert that each fault happened, that nothing
was lost, and when traffic stopped.
"""

from __future__ import annotations

import collections
import http.client
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class FaultProxy:
    KINDS = ("truncate", "503", "500", "reset", "delay")

    def __init__(self, upstream: str, faults: list[str] | None = None, every: int = 1, *, rate: float = 0.0,
                 kinds: tuple[str, ...] = KINDS, seed: int = 0, delay_s: float = 1.0, match: str = ""):
        unknown = sorted((set(faults or []) | set(kinds if rate else ())) - set(self.KINDS))
        if unknown:
            raise ValueError(f"FaultProxy: unknown fault kinds {unknown} (known: {self.KINDS})")
        self.upstream = urlsplit(upstream)
        self.plan = collections.deque(faults or [])
        self.every = max(1, every)  # inject on every n-th object GET while the plan lasts
        self.rate, self.kinds, self.rng = float(rate), tuple(kinds), random.Random(seed)
        self.delay_s = float(delay_s)
        self.match = match  # only object GETs whose path contains this take faults ("": all)
        self.injected: collections.Counter = collections.Counter()
        self.requests: collections.Counter = collections.Counter()  # every request, by method
        self.object_gets = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._next_fault(self.command, self.path)
                if fault == "delay":
                    time.sleep(proxy.delay_s)
                if fault == "reset":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                if fault in ("503", "500"):
                    code = "SlowDown" if fault == "503" else "InternalError"
                    msg = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_HEADERS and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault == "truncate" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                else:
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _next_fault(self, method: str, path: str) -> str | None:
        with self.lock:
            self.requests[method] += 1
            if method != "GET" or "?" in path or self.match not in path:
                return None
            self.object_gets += 1
            if self.plan and not self.object_gets % self.every:
                fault = self.plan.popleft()
            elif self.rate and self.rng.random() < self.rate:
                fault = self.rng.choice(self.kinds)
            else:
                return None
            self.injected[fault] += 1
            return fault

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

"""A fault-injecting HTTP proxy on 127.0.0.1 in front of a real server (standard library only).

Chosen requests are forwarded and processed by the server, and their answers are lost: the proxy
closes the connection instead of answering, at once (a connection dropped after the server did the
work) or after ``delay_s`` (a slow server, answering past the client's timeout).
"""
from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "te", "upgrade"}


class FaultProxy:
    """``lose``: {path suffix: {n: delay_s}}: the n-th request (from 1) whose path ends so is
    forwarded and its answer lost after ``delay_s``. ``lost``: (path, n) of each answer lost."""

    def __init__(self, upstream: str, lose: dict[str, dict[int, float]]):
        self.upstream = urlsplit(upstream)
        self.lose = lose
        self.seen: Counter = Counter()
        self.lost: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FaultProxy":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _fault(self, path: str) -> float | None:
        """The delay before this request's answer is lost, or None: it is answered."""
        with self.lock:
            for suffix, which in self.lose.items():
                if path.split("?")[0].endswith(suffix):
                    self.seen[suffix] += 1
                    if self.seen[suffix] in which:
                        self.lost.append((suffix, self.seen[suffix]))
                        return which[self.seen[suffix]]
        return None

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                delay = proxy._fault(self.path)
                if delay is not None:  # processed by the server; the answer never reaches the client
                    time.sleep(delay)
                    self.close_connection = True
                    return
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

        return Handler

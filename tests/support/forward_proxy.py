"""An HTTP forward proxy on loopback, as a company's egress proxy would sit between the appliance and a provider.

It takes absolute-form requests (``POST http://host:port/path HTTP/1.1``), one per connection, forwards each to
its origin and pipes the answer back as it arrives (streams included), then closes both connections. Every
request target is recorded, so a test can tell which provider calls went through it.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import urllib.parse
from types import TracebackType

__all__ = ["ForwardProxy"]

_HOP_BY_HOP = {"connection", "proxy-connection", "keep-alive", "proxy-authorization", "te", "upgrade"}


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        request_line = self.rfile.readline(65536).decode("latin-1").rstrip("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers: list[str] = []
        length = 0
        while (line := self.rfile.readline(65536).decode("latin-1").rstrip("\r\n")) != "":
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
            if name.strip().lower() not in _HOP_BY_HOP:
                headers.append(line)
        body = self.rfile.read(length) if length else b""
        with self.server.lock:
            self.server.targets.append(target)
        url = urllib.parse.urlsplit(target)
        origin_form = (url.path or "/") + (f"?{url.query}" if url.query else "")
        with socket.create_connection((url.hostname or "127.0.0.1", url.port or 80), timeout=30) as upstream:
            head = "\r\n".join([f"{method} {origin_form} HTTP/1.1", *headers, "Connection: close", "", ""])
            upstream.sendall(head.encode("latin-1") + body)
            # One request per client connection: say so, or the client would reuse a connection we close.
            first = True
            while data := upstream.recv(65536):
                if first:
                    data = data.replace(b"\r\n", b"\r\nConnection: close\r\n", 1)
                    first = False
                self.wfile.write(data)
                self.wfile.flush()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.targets: list[str] = []


class ForwardProxy:
    def __init__(self) -> None:
        self._server = _Server()
        self._thread = threading.Thread(target=self._server.serve_forever, name="forward-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def targets(self) -> list[str]:
        with self._server.lock:
            return list(self._server.targets)

    def __enter__(self) -> ForwardProxy:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

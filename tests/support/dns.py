"""A tiny authoritative DNS server on a loopback address, for containers on the host network.

Prometheus' ``dns_sd_configs`` ask the nameservers of ``/etc/resolv.conf`` directly (they never read
``/etc/hosts``, so ``extra_hosts`` cannot name a target for them). Where Docker's own DNS is missing (the
private engine of the deployment tests has no bridge network), a container given a ``resolv.conf`` naming this
server resolves the names it serves: A records from a fixed table, NXDOMAIN for every other name, as Docker's
DNS answers for a compose service that is not running. Queries are recorded.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType

__all__ = ["StaticDNS"]

_TYPE_A = 1
_CLASS_IN = 1
_NXDOMAIN = 3
_FORMERR = 1


def _question(message: bytes) -> tuple[str, int, int, int]:
    """(name without the trailing dot, lowercased; qtype; qclass; offset just after the question)."""
    labels: list[str] = []
    offset = 12
    while True:
        length = message[offset]
        offset += 1
        if length == 0:
            break
        if length & 0xC0:
            raise ValueError("compressed name in a question")
        labels.append(message[offset:offset + length].decode("ascii").lower())
        offset += length
    qtype, qclass = struct.unpack_from("!HH", message, offset)
    return ".".join(labels), qtype, qclass, offset + 4


def answer(query: bytes, records: dict[str, str]) -> bytes:
    """The response to one query: A records from ``records``, NOERROR/no data for other types of a known name,
    NXDOMAIN for unknown names."""
    (ident, flags, qdcount) = struct.unpack_from("!HHH", query)
    recursion_desired = flags & 0x0100
    try:
        if qdcount != 1:
            raise ValueError("one question per query")
        name, qtype, qclass, end = _question(query)
    except (ValueError, IndexError, struct.error, UnicodeDecodeError):
        # QR, the query's RD, FORMERR; no question echoed.
        return struct.pack("!HHHHHH", ident, 0x8000 | recursion_desired | _FORMERR, 0, 0, 0, 0)
    question = query[12:end]
    address = records.get(name)
    # QR, AA (we are the authority for these names), the query's RD, RA.
    response_flags = 0x8400 | recursion_desired | 0x0080
    if address is None:
        return struct.pack("!HHHHHH", ident, response_flags | _NXDOMAIN, 1, 0, 0, 0) + question
    if qtype != _TYPE_A or qclass != _CLASS_IN:
        return struct.pack("!HHHHHH", ident, response_flags, 1, 0, 0, 0) + question
    # The answer's name points at the question's (offset 12); TTL 5 s, like Docker's short-lived answers.
    record = struct.pack("!HHHIH", 0xC00C, _TYPE_A, _CLASS_IN, 5, 4) + socket.inet_aton(address)
    return struct.pack("!HHHHHH", ident, response_flags, 1, 1, 0, 0) + question + record


class StaticDNS:
    """UDP DNS on ``address``:53 (needs root: port 53), answering from ``records`` in a thread."""

    def __init__(self, address: str, records: dict[str, str]) -> None:
        self.address = address
        self.records = {name.rstrip(".").lower(): ip for name, ip in records.items()}
        self.queries: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind((address, 53))
        self._socket.settimeout(0.2)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"dns-{address}", daemon=True)

    def resolv_conf(self) -> str:
        """A resolv.conf naming this server only."""
        return f"nameserver {self.address}\n"

    def asked(self) -> set[str]:
        """Names asked for so far."""
        with self._lock:
            return {name for name, _ in self.queries}

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                query, peer = self._socket.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            if len(query) < 12:
                continue
            with contextlib.suppress(ValueError, IndexError, struct.error, UnicodeDecodeError):
                name, qtype, _, _ = _question(query)
                with self._lock:
                    self.queries.append((name, qtype))
            with contextlib.suppress(OSError):
                self._socket.sendto(answer(query, self.records), peer)

    def start(self) -> StaticDNS:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._socket.close()

    def __enter__(self) -> StaticDNS:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

"""Network constants and helpers both sides use: message sizes, loopback rules, free ports."""
from __future__ import annotations

import socket

CHUNK_BYTES = 1 << 20  # upload payload per gRPC message
MAX_MESSAGE_BYTES = CHUNK_BYTES + (64 << 10)  # a chunk plus its header; servers refuse anything larger
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")  # where plaintext is allowed


def split_listen(address: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); raises ValueError naming the address when it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host, int(port)


def is_loopback_host(host: str) -> bool:
    return host in LOOPBACK_HOSTS


def is_loopback(address: str) -> bool:
    """True when ``HOST:PORT`` names this machine's loopback interface."""
    return is_loopback_host(address.rpartition(":")[0])


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for tests, the demo and a SuperNode's local API)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]

"""Refuse a port that another process listens on, before anything slow starts.

gRPC listens with ``SO_REUSEPORT``, so a second server on a busy port would *share* it
(the kernel then splits connections between two unrelated servers) rather than fail;
Prometheus's HTTP port fails later with a raw traceback. A plain probe bind without
``SO_REUSEPORT`` fails on any listener, so ``crossfield serve`` can say which port is
taken in one line. (A port taken between the probe and the real bind is still possible,
and then fails as before.)
"""

from __future__ import annotations

import socket


def port_in_use(host: str, port: int) -> bool:
    """Whether ``host:port`` (``[::]``, ``0.0.0.0``, a name or an address) has a listener;
    port 0 (any free port) never does."""
    if port == 0:
        return False
    host = host.strip("[]") or "::"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False  # an unresolvable host fails in the server with its own message
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is free
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                probe.bind(address)
            except OSError:
                return True
    return False

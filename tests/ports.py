"""Ports for the servers the tests start (the operator's liveness and metrics, moto, Prometheus,
the controller's metrics).

Binding port 0 and handing the number to a server races: the kernel gives the same range
(ip_local_port_range) to every outgoing connection, and the suite makes thousands of them
(kubectl, the clients, the kubelet), so the port can be some connection's source port by the time
the server binds it ("address already in use"; the operator then dies and a test times out).
Ports here come from below that range, where no outgoing connection is ever given one, and
`start_listening` picks another port if a server still finds its port taken (the other pytest
worker chose the same one)."""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port nobody listens on now, below the range outgoing connections take theirs from."""
    high = min(_ephemeral_low(), 65536)
    low = 10000 if high > 12000 else 1024
    for _ in range(200):
        port = random.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a machine with almost nothing free below the range: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortTaken(Exception):
    """A server exited because its port was taken between choosing it and binding it."""


def address_in_use(log: str) -> bool:
    return "address already in use" in log.lower()


def start_listening(start: Callable[[], T], attempts: int = 4) -> T:
    """Call `start` (which chooses its own port) until it does not raise PortTaken; the last try's
    PortTaken goes to the caller."""
    for _ in range(attempts - 1):
        try:
            return start()
        except PortTaken:
            pass
    return start()

"""Host ports for published guest ports (DESIGN.md §8): is one free to take?"""

from __future__ import annotations

import socket


def tcp_port_free(host: str, port: int) -> bool:
    """True if nothing on this host holds ``host:port`` for TCP (we could bind it ourselves now).

    Used by the store's allocator to skip ports another program already listens on; the VMM binds
    the port moments later, so a race is possible and shows as a VMM start error, never as two VMs
    sharing a port (the store's UNIQUE constraint rules that out)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True

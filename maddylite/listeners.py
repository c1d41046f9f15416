"""ListenerPool: reference-counted listening sockets shared across reloads.

A runtime acquires the socket for each address it listens on; a reloaded runtime that
listens on the same address gets the same socket, so the port never closes (E-6). The
socket is closed when the last user releases it. Each user gets its own ``dup()`` of the
socket, so a server that closes its copy on stop does not close the shared one.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from maddylite.config.directives import Address


@dataclass
class _Entry:
    sock: socket.socket
    refs: int


class ListenerPool:
    """ListenerPool hands out listening sockets keyed by address."""

    def __init__(self, backlog: int = 1024) -> None:
        self.backlog = backlog
        self._entries: dict[str, _Entry] = {}

    def acquire(self, addr: Address, runtime_dir: str = ".") -> socket.socket:
        """acquire returns a dup of the listening socket for ``addr``, creating it if needed."""
        key = str(addr)
        entry = self._entries.get(key)
        if entry is None:
            entry = _Entry(self._open(addr, runtime_dir), 0)
            self._entries[key] = entry
        entry.refs += 1
        return entry.sock.dup()

    def release(self, addr: Address) -> None:
        """release drops one reference; the last one closes the socket."""
        key = str(addr)
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.refs -= 1
        if entry.refs <= 0:
            entry.sock.close()
            del self._entries[key]

    def addresses(self) -> list[str]:
        """addresses lists the addresses currently listening."""
        return sorted(self._entries)

    def _open(self, addr: Address, runtime_dir: str) -> socket.socket:
        if addr.scheme == "unix":
            path = addr.path if os.path.isabs(addr.path) else os.path.join(runtime_dir, addr.path)
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)  # /run is empty after boot
            if os.path.exists(path):
                os.unlink(path)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(path)
        else:
            family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind((addr.host, addr.port))
            except OSError:
                s.close()
                raise
        s.listen(self.backlog)
        s.setblocking(False)
        return s

"""Starting a server process and waiting for it: a free port, and readiness polling.

Shared by the demo (``gpl demo`` serves one request), the serve benchmark and the tests, which
all start ``gpl serve`` (or ``feast ui``) as a subprocess and must wait until it answers.
"""

from __future__ import annotations

import socket
import subprocess
import time
from typing import Any

import httpx


class ServerStartError(RuntimeError):
    """The server process exited, or did not answer in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(
    proc: subprocess.Popen[Any], url: str, timeout: float, what: str = "the service"
) -> None:
    """Poll ``url`` until it answers 200.

    Raises:
        ServerStartError: when ``proc`` exits first or ``timeout`` seconds pass.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ServerStartError(f"{what} exited with code {proc.returncode} at start-up")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise ServerStartError(f"{what} was not ready within {timeout:.0f} s")
        time.sleep(0.25)

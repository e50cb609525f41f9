"""``kubemtls-sidecar --wait-ready``: block until this pod's sidecar answers ``/readyz`` 200.

Clusters without native sidecars (< 1.29) get the sidecar as a regular container with
this as its ``postStart`` hook: kubelet starts the next container (the app) only when the
hook exits, so the app never starts before its proxy. The hook is a fresh process per pod
start, so it stays cheap: a blocking socket and a hand-written HTTP/1.0 request (the
admin server closes after each answer), no asyncio, no TLS, no cryptography, no metrics
library. Exit 0 when ready; exit 1 with one line when the deadline passes (kubelet then
kills the container and restarts it per the pod's policy).
"""

from __future__ import annotations

import socket
import sys
import time

from kubemtls_sidecar import config

__all__ = ["POLL_INTERVAL", "probe", "run"]

POLL_INTERVAL = 0.25  # seconds between attempts


def probe(host: str, port: int, *, timeout: float) -> str | None:
    """One ``GET /readyz``: None when it answered 200, else why not (for the last line)."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    request = f"GET /readyz HTTP/1.0\r\nHost: {authority}\r\n\r\n".encode("ascii")
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(request)
            data = b""
            while len(data) < 4096:  # the answer is small and the server closes after it
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError as e:
        return f"{authority}: {e.strerror or e}"
    status_line = data.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) >= 2 and parts[1] == "200":
        return None
    body = data.partition(b"\r\n\r\n")[2].decode("utf-8", "replace").strip()
    return f"/readyz answered {status_line!r}" + (f": {body}" if body else "")


def run(w: config.WaitReady) -> int:
    """Poll until ready (0) or ``w.timeout`` seconds passed (1, one line on stderr)."""
    deadline = time.monotonic() + w.timeout
    while True:
        left = deadline - time.monotonic()
        why = probe(w.host, w.port, timeout=max(0.1, min(2.0, left)))
        if why is None:
            return 0
        if time.monotonic() + POLL_INTERVAL >= deadline:
            print(
                f"kubemtls-sidecar: --wait-ready: not ready after {w.timeout:g}s ({why})",
                file=sys.stderr,
            )
            return 1
        time.sleep(POLL_INTERVAL)

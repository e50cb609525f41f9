"""Fixtures for the sidecar data-plane tests (helpers live in ``dataplane.py``).

The sidecar runs in-process on the test's loop (``app.serve`` with a stop event) where it
can, and as a subprocess for signals and exit codes. Certificates that ``pki`` refuses to
make (expired, RSA-1024, self-signed) are minted with ``cryptography`` directly.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from dataplane import echo_port, files, now, sidecar_args

__all__ = ["echo_port", "files", "now", "sidecar_args"]

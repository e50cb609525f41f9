"""Fixtures for the sidecar data-plane tests (helpers live in ``dataplane.py``).

The sidecar runs in-process on the test's loop (``app.serve`` with a stop event) where it
can, and as a subprocess for signals and exit codes. Certificates that ``pki`` refuses to
make (expired, RSA-1024, self-signed) are minted with ``cryptography`` directly.
"""

from __future__ import annotations

import asyncio
import pathlib
import sys
from collections.abc import Callable

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from dataplane import echo_port, files, now, sidecar_args

__all__ = ["echo_port", "files", "now", "sidecar_args"]


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """A test module naming ``LOOP_FACTORIES`` runs each async test on those loops; the
    others on asyncio's own (one factory: test names unchanged)."""
    names = getattr(getattr(item, "module", None), "LOOP_FACTORIES", None) or ("asyncio",)
    import uvloop

    known = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {n: known[n] for n in names}

"""The sidecar raises its descriptor limit at start (each connection holds three)."""

from __future__ import annotations

import resource
import subprocess
import sys

PROBE = (
    "import logging, resource, sys; logging.basicConfig(stream=sys.stdout, format='%(message)s'); "
    "from kubemtls_sidecar import conns; "
    "print('limit', conns.raise_fd_limit(int(sys.argv[1]))); "
    "print('now', resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
)


def run_with_limits(soft: int, hard: int, max_connections: int) -> str:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(max_connections)],
        preexec_fn=limit,  # only setrlimit, before exec
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout


def test_soft_limit_raised_to_hard():
    out = run_with_limits(256, 8192, 100)
    assert "limit 8192" in out, out
    assert "now 8192" in out, out
    assert "file descriptors" not in out  # enough for 100 connections: no warning


def test_warns_when_the_hard_limit_cannot_hold_max_connections():
    out = run_with_limits(1024, 1024, 4096)
    assert "now 1024" in out, out
    assert "--max-connections 4096 needs about 12352 file descriptors; the limit is 1024" in out

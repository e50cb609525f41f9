"""Network namespaces for tests that need real iptables redirection (root only).

``Pair`` makes two namespaces joined by a veth pair, with names unique per test run, and
always deletes them (and kills the processes started in them) on exit, even on failure.
``sidecar_python()`` finds an interpreter the sidecar's UID (1337) may execute: the
test's own if it can, else the system's python3 of the same version with our
site-packages on PYTHONPATH (pyenv interpreters under /root are not reachable by 1337).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from kubemtls_sidecar import contract

SIDECAR_SRC = pathlib.Path(__file__).resolve().parent.parent / "sidecar"


def skip_reason() -> str | None:
    """Why netns tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables, setpriv)"
    for tool in ("ip", "iptables-restore", "setpriv", "tcpdump"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if sidecar_python() is None:
        return f"no python that UID {contract.SIDECAR_UID} may run with our dependencies"
    return None


def _as_sidecar(argv: Sequence[str]) -> list[str]:
    uid, gid = contract.SIDECAR_UID, contract.SIDECAR_GID
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *argv]


def sidecar_python() -> tuple[str, dict[str, str]] | None:
    """(interpreter, extra env) that can run ``-m kubemtls_sidecar`` as UID 1337."""
    site = next((p for p in sys.path if p.endswith("site-packages")), None)
    candidates = [(sys.executable, {})]
    system = shutil.which("python3", path="/usr/bin:/usr/local/bin")
    if system and site:
        candidates.append((system, {"PYTHONPATH": f"{site}:{SIDECAR_SRC}"}))
    probe = "import cryptography, h11, prometheus_client, kubemtls_sidecar.app"
    for exe, env in candidates:
        try:
            done = subprocess.run(
                _as_sidecar([exe, "-c", probe]),
                env={**os.environ, **env},
                capture_output=True,
                timeout=30,
                check=False,
                cwd="/",
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return exe, env
    return None


def wait_for(pred: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@dataclasses.dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: pathlib.Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclasses.dataclass
class Pair:
    """Namespaces ``a`` and ``b``, veth ``a_if`` (10.x.y.1) ↔ ``b_if`` (10.x.y.2)."""

    a: str
    b: str
    a_if: str
    b_if: str
    a_ip: str
    b_ip: str
    workdir: pathlib.Path
    procs: list[Proc] = dataclasses.field(default_factory=list)

    def run(self, ns: str, argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
        """Run a command in ``ns`` to completion (text output)."""
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=False, **kw
        )

    def start(
        self,
        ns: str,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        as_sidecar: bool = False,
    ) -> Proc:
        """Start a background process in ``ns`` (stdout+stderr to a log file)."""
        log = self.workdir / f"{name}.log"
        cmd = _as_sidecar(argv) if as_sidecar else list(argv)
        fh = log.open("wb")
        popen = subprocess.Popen(
            ["ip", "netns", "exec", ns, *cmd],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            cwd="/",
        )
        fh.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, sig: int = signal.SIGTERM) -> None:
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, sig)
            try:
                proc.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(timeout=5)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.contextmanager
def pair(workdir: pathlib.Path) -> Iterator[Pair]:
    """Two namespaces joined by a veth pair; everything is removed on exit."""
    tag = f"kmt-{os.getpid() % 100000}"
    net = 10 + os.getpid() % 200
    p = Pair(
        a=f"{tag}-a",
        b=f"{tag}-b",
        a_if=f"{tag}a",
        b_if=f"{tag}b",
        a_ip=f"10.231.{net}.1",
        b_ip=f"10.231.{net}.2",
        workdir=workdir,
    )
    try:
        _ip("netns", "add", p.a)
        _ip("netns", "add", p.b)
        _ip("link", "add", p.a_if, "type", "veth", "peer", "name", p.b_if)
        _ip("link", "set", p.a_if, "netns", p.a)
        _ip("link", "set", p.b_if, "netns", p.b)
        for ns, ifname, addr in ((p.a, p.a_if, p.a_ip), (p.b, p.b_if, p.b_ip)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
            _ip("-n", ns, "link", "set", ifname, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield p
    finally:
        for proc in reversed(p.procs):
            p.stop(proc)
        for ns in (p.a, p.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)

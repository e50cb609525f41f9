"""Ask the vetting child (``vet``) about new material; hold its answers as plain data.

The resident sidecar never imports ``cryptography`` (~10 MiB of resident memory in a
process that runs once per pod). The rare control-plane work that needs it (validate a
new certificate, key, trust bundle or CRL set; make a key and a CSR) runs in a short-lived
``python -m kubemtls_sidecar.vet`` child of the same interpreter, started with
``asyncio.create_subprocess_exec`` only when the inputs changed. Requests go in on stdin,
JSON answers come back on stdout (one line each); a private key travels only through
those pipes (never an argument, a file or a log line). A child that fails, answers
garbage or outlives ``TIMEOUT`` is a failed reload: the caller keeps the old material.

``CrlState`` is what the resident keeps of the CRLs the child picked (newest number per
trusted CA, signature checked): their PEM for OpenSSL, their dates for freshness and
metrics, and their revoked serials for the software check after a handshake.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import os
import sys
from typing import Any

from kubemtls_sidecar import der

__all__ = ["TIMEOUT", "CrlInfo", "CrlState", "MaterialError", "Session", "call", "check"]

#: Seconds a vetting child may take (a cold interpreter loading cryptography on a busy node).
TIMEOUT = 30.0
SKEW = datetime.timedelta(minutes=5)


class MaterialError(ValueError):
    """New material that must not be served (the old stays).

    ``kind`` is the name of the error as the child saw it (``MaterialError``,
    ``ValueError``…): the ``reason`` label of ``reload_failures_total``.
    """

    def __init__(self, message: str, kind: str = "MaterialError") -> None:
        super().__init__(message)
        self.kind = kind


def _child_argv() -> tuple[list[str], dict[str, str] | None]:
    """How to start the child: this interpreter, by path, or by ``/proc/self/exe``.

    The second is for an interpreter whose path this UID cannot reach (a sidecar started
    by a privileged launcher from under a 0700 directory): the same binary, with our
    ``sys.path`` handed over because it cannot find its own prefix either.
    """
    tail = ["-P", "-m", "kubemtls_sidecar.vet", "session"]  # -P: never import from cwd
    if sys.executable and os.access(sys.executable, os.X_OK):
        return [sys.executable, *tail], None
    path = os.pathsep.join(p for p in sys.path if p)
    return ["/proc/self/exe", *tail], {**os.environ, "PYTHONPATH": path}


class Session:
    """One vetting child for a few related questions (``async with``), started lazily.

    A renewal asks for a key, waits for the signer, then asks about the certificate: the
    same child answers both, so the certificate is vetted without a second interpreter
    start between its issue and its use. Each question is one JSON line each way.
    """

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def ask(self, command: str, request: dict[str, Any]) -> dict[str, Any]:
        """The child's answer to ``command`` (``material``, ``keygen``).

        Byte strings travel as latin-1 text (lossless for any PEM file).

        Raises:
            MaterialError: the child could not be run, failed, timed out or answered garbage.
        """
        try:
            async with asyncio.timeout(TIMEOUT):
                proc = await self._start()
                assert proc.stdin is not None
                assert proc.stdout is not None
                proc.stdin.write(json.dumps({"command": command, **request}).encode() + b"\n")
                await proc.stdin.drain()
                line = await proc.stdout.readline()
        except TimeoutError:
            await self.close()
            raise MaterialError(f"vetting took longer than {TIMEOUT:g}s", "VetTimeout") from None
        except OSError as e:
            await self.close()
            raise MaterialError(f"cannot run the vetting process: {e}", "VetUnavailable") from None
        try:
            answer = json.loads(line)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            err = await self.close()
            tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
            raise MaterialError(f"the vetting process failed: {tail[0]}", "VetFailed")
        return answer

    async def _start(self) -> asyncio.subprocess.Process:
        if self._proc is None:
            argv, env = _child_argv()
            self._proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
            )
        return self._proc

    async def close(self) -> bytes:
        """End the child (EOF, then a kill if it lingers); its stderr."""
        proc, self._proc = self._proc, None
        if proc is None:
            return b""
        assert proc.stdin is not None
        assert proc.stderr is not None
        err = b""
        try:
            proc.stdin.close()
            async with asyncio.timeout(5):
                err = await proc.stderr.read()
                await proc.wait()
        except (TimeoutError, OSError):
            pass
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        return err


async def call(
    command: str, request: dict[str, Any], session: Session | None = None
) -> dict[str, Any]:
    """``session.ask``, or a one-question child when no session is given."""
    if session is not None:
        return await session.ask(command, request)
    async with Session() as one:
        return await one.ask(command, request)


def check(part: dict[str, Any] | None) -> dict[str, Any]:
    """A part of the child's answer, or its refusal raised.

    Raises:
        MaterialError: the child refused this part.
    """
    if part is None:
        raise MaterialError("the vetting process did not answer", "VetFailed")
    if "error" in part:
        raise MaterialError(str(part["error"]), str(part.get("type", "MaterialError")))
    return part


def _time(text: str | None) -> datetime.datetime | None:
    return datetime.datetime.fromisoformat(text) if text else None


@dataclasses.dataclass(frozen=True)
class CrlInfo:
    """One CRL kept for a trusted CA."""

    issuer: str  # RFC 4514, as der.Cert.issuer
    last_update: datetime.datetime
    next_update: datetime.datetime | None
    revoked: frozenset[int]
    pem: bytes

    def current(self, now: datetime.datetime) -> bool:
        nu = self.next_update
        return self.last_update <= now + SKEW and (nu is None or now < nu)


@dataclasses.dataclass(frozen=True)
class CrlState:
    """The newest CRL per trusted CA (``entries``) and the CAs without one (``missing``)."""

    entries: tuple[CrlInfo, ...]
    missing: tuple[str, ...]  # RFC 4514 subjects of CAs that sign leaves, with no CRL

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> CrlState:
        entries = []
        for e in doc["entries"]:
            last = _time(e["last_update"])
            assert last is not None
            entries.append(
                CrlInfo(
                    e["issuer"],
                    last,
                    _time(e["next_update"]),
                    frozenset(int(s) for s in e["revoked"]),
                    e["pem"].encode("ascii"),
                )
            )
        return cls(tuple(entries), tuple(doc["missing"]))

    def fresh(self, now: datetime.datetime) -> bool:
        """True when every CA that signs leaves has a current CRL: OpenSSL may enforce them."""
        return not self.missing and all(e.current(now) for e in self.entries)

    def fresh_until(self) -> datetime.datetime | None:
        """When the first CRL goes stale (None: no CRL)."""
        ends = [e.next_update for e in self.entries if e.next_update]
        return min(ends) if ends else None

    def pem(self) -> bytes:
        return b"".join(e.pem for e in self.entries)

    def revoked(self, leaf: der.Cert) -> bool:
        """True when a CRL of the leaf's issuer lists its serial (stale CRLs still count)."""
        return any(
            e.issuer == leaf.issuer and leaf.serial_number in e.revoked for e in self.entries
        )

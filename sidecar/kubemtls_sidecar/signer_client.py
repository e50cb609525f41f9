"""HTTPS client for the operator's signing API (DESIGN.md "Signing API").

Two calls: ``POST /v1/certificates`` with a CSR, and ``GET /v1/trust`` with an ETag. The
client is a few dozen lines over asyncio streams, ``ssl`` and h11 (already a dependency)
rather than aiohttp's client, which would add ~17 MiB to a sidecar that aims at 30 MiB.
One connection per call (``Connection: close``): calls are minutes apart.

Every call re-reads the token file (kubelet rotates it with a ``..data`` symlink swap)
and the trust directory's ``ca.crt``, and also trusts the newest bundle the signer itself
published (so a CA rollover seen through ``/v1/trust`` is trusted before kubelet updates
the file). The signer's hostname (or IP) from the URL is verified.

It never sees a private key: it sends a CSR and receives certificates.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import pathlib
import ssl
import urllib.parse
from typing import Any

import h11

from kubemtls_sidecar import contract, errors

__all__ = ["Issued", "SignerClient", "SignerError", "Trust"]

_MAX_BODY = 4 * 1024 * 1024  # a chain + bundle + CRLs is a few KiB; refuse nonsense
_USER_AGENT = "kubemtls-sidecar"


class SignerError(errors.KubemtlsError):
    """A call to the signing API failed; ``status`` is None when no HTTP answer came.

    ``reason`` is the signer's CamelCase reason, or ours (``SignerUnreachable``,
    ``SignerNotTrusted``, ``TokenUnavailable``, ``TrustUnavailable``, ``BadResponse``).
    """

    def __init__(self, status: int | None, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}" + (f" (HTTP {status})" if status else ""))
        self.status = status
        self.reason = reason
        self.message = message


@dataclasses.dataclass(frozen=True)
class Issued:
    """A ``POST /v1/certificates`` answer."""

    chain_pem: bytes  # leaf first
    trust_pem: bytes
    crl_pem: bytes
    not_after: datetime.datetime
    renew_at: datetime.datetime


@dataclasses.dataclass(frozen=True)
class Trust:
    """A ``GET /v1/trust`` answer (``None`` from :meth:`SignerClient.trust` means 304)."""

    trust_pem: bytes
    crl_pem: bytes
    renew_at: datetime.datetime | None
    rekey: bool
    etag: str | None


def _timestamp(value: object, field: str) -> datetime.datetime:
    if not isinstance(value, str):
        raise SignerError(200, "BadResponse", f"{field} is missing or not a string")
    try:
        ts = datetime.datetime.fromisoformat(value)
    except ValueError as e:
        raise SignerError(200, "BadResponse", f"{field} {value!r} is not RFC 3339") from e
    return ts if ts.tzinfo else ts.replace(tzinfo=datetime.UTC)


def _pem(body: dict[str, Any], field: str, *, required: bool = True) -> bytes:
    value = body.get(field)
    if value is None and not required:
        return b""
    if not isinstance(value, str) or (required and "-----BEGIN" not in value):
        raise SignerError(200, "BadResponse", f"{field} is missing or not PEM")
    return value.encode("ascii")


class SignerClient:
    """Calls the signing API at ``url`` as the pod whose token is in ``token_file``."""

    def __init__(
        self,
        url: str,
        token_file: pathlib.Path,
        trust_dir: pathlib.Path,
        *,
        timeout: float = 10.0,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise errors.ConfigError(f"--signer {url!r} must be an https:// URL with a host")
        self.url = url
        self._host = parts.hostname
        self._port = parts.port or 443
        self._netloc = parts.netloc
        self._base = parts.path.rstrip("/")
        self._token_file = token_file
        self._ca_file = trust_dir / contract.TRUST_CA_FILE
        self._timeout = timeout
        self._learned_trust = b""

    def learn_trust(self, trust_pem: bytes) -> None:
        """Also trust the signer through this bundle (the newest one it published)."""
        self._learned_trust = trust_pem

    async def issue(self, csr_pem: bytes) -> Issued:
        """``POST /v1/certificates``.

        Raises:
            SignerError: no answer, an untrusted signer, or an error answer.
        """
        payload = json.dumps({"csr": csr_pem.decode("ascii")}).encode()
        status, _, body = await self._call("POST", "/v1/certificates", payload, {})
        doc = self._json(status, body)
        return Issued(
            chain_pem=_pem(doc, "certificateChain"),
            trust_pem=_pem(doc, "trustBundle"),
            crl_pem=_pem(doc, "crl", required=False),
            not_after=_timestamp(doc.get("notAfter"), "notAfter"),
            renew_at=_timestamp(doc.get("renewAt"), "renewAt"),
        )

    async def trust(self, etag: str | None) -> Trust | None:
        """``GET /v1/trust``; ``None`` when unchanged since ``etag`` (304).

        Raises:
            SignerError: no answer, an untrusted signer, or an error answer.
        """
        extra = {"If-None-Match": etag} if etag else {}
        status, headers, body = await self._call("GET", "/v1/trust", None, extra)
        if status == 304:
            return None
        doc = self._json(status, body)
        renew_at = doc.get("renewAt")
        return Trust(
            trust_pem=_pem(doc, "trustBundle"),
            crl_pem=_pem(doc, "crl", required=False),
            renew_at=_timestamp(renew_at, "renewAt") if renew_at else None,
            rekey=doc.get("rekey") is True,
            etag=headers.get("etag"),
        )

    # --- plumbing -------------------------------------------------------------------

    def _token(self) -> str:
        try:
            token = self._token_file.read_text().strip()
        except OSError as e:
            msg = f"cannot read {self._token_file}: {e.strerror or e}"
            raise SignerError(None, "TokenUnavailable", msg) from None
        if not token:
            raise SignerError(None, "TokenUnavailable", f"{self._token_file} is empty")
        return token

    def _ssl_context(self) -> ssl.SSLContext:
        try:
            cafile = self._ca_file.read_bytes()
        except OSError:
            cafile = b""
        cadata = (cafile + b"\n" + self._learned_trust).decode("ascii", "replace").strip()
        if "-----BEGIN CERTIFICATE" not in cadata:
            msg = f"no CA certificate in {self._ca_file} to trust the signer"
            raise SignerError(None, "TrustUnavailable", msg)
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=cadata)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    @staticmethod
    def _json(status: int, body: bytes) -> dict[str, Any]:
        try:
            doc = json.loads(body) if body else {}
        except ValueError:
            doc = None
        if status != 200:
            reason = doc.get("reason") if isinstance(doc, dict) else None
            message = doc.get("message") if isinstance(doc, dict) else None
            raise SignerError(
                status,
                str(reason or "HTTPError"),
                str(message or body[:200].decode("utf-8", "replace") or "no body"),
            )
        if not isinstance(doc, dict):
            raise SignerError(status, "BadResponse", "the answer is not a JSON object")
        return doc

    async def _call(
        self, method: str, path: str, payload: bytes | None, extra: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        headers = [
            ("Host", self._netloc),
            ("Authorization", f"Bearer {self._token()}"),
            ("Accept", "application/json"),
            ("User-Agent", _USER_AGENT),
            ("Connection", "close"),
            *extra.items(),
        ]
        if payload is not None:
            headers += [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
        ctx = self._ssl_context()
        try:
            async with asyncio.timeout(self._timeout):
                reader, writer = await asyncio.open_connection(
                    self._host, self._port, ssl=ctx, server_hostname=self._host
                )
                try:
                    return await self._exchange(reader, writer, method, path, headers, payload)
                finally:
                    writer.close()
                    with contextlib.suppress(OSError, ssl.SSLError):
                        await writer.wait_closed()
        except ssl.SSLCertVerificationError as e:
            msg = f"{self.url}: the signer's certificate is not trusted: {e.verify_message}"
            raise SignerError(None, "SignerNotTrusted", msg) from e
        except (OSError, ssl.SSLError, TimeoutError, h11.ProtocolError) as e:
            detail = str(e) or type(e).__name__
            raise SignerError(None, "SignerUnreachable", f"{self.url}: {detail}") from e

    async def _exchange(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        payload: bytes | None,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = h11.Connection(our_role=h11.CLIENT)
        out = conn.send(h11.Request(method=method, target=self._base + path, headers=headers))
        if payload is not None:
            out += conn.send(h11.Data(data=payload))
        out += conn.send(h11.EndOfMessage())
        writer.write(out)
        await writer.drain()
        status = 0
        resp_headers: dict[str, str] = {}
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                resp_headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > _MAX_BODY:
                    raise SignerError(status, "BadResponse", "the answer is too large")
            elif isinstance(event, h11.EndOfMessage):
                return status, resp_headers, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise SignerError(None, "SignerUnreachable", f"{self.url}: closed mid-answer")

"""The demo's mock EHR: a FHIR R4 endpoint that admits only clients with a cluster certificate.

It stands in for an Epic or Cerner endpoint: HTTPS that requires a client certificate issued
by the cluster CA, enforces the cluster's CRL (refreshed while it runs), answers
``GET /fhir/metadata`` (the CapabilityStatement fhirclient reads first) and
``GET /fhir/Patient/123``, and echoes the identity it verified in ``X-Client-Identity`` /
``X-Client-Serial`` and in its log.

It uses the blocking ``ssl`` module with one thread per connection on purpose: a refused
blocking handshake flushes the TLS alert to the client (``certificate_required``,
``unknown_ca``, ``certificate_revoked``), which asyncio's SSL transport does not reliably do
(CPython issue 98078). The resources are validated with ``fhir.resources`` (R4B models:
fhir.resources 8 ships R5 by default plus R4B and STU3, and R4B is the R4 line's compatible
update; Patient and CapabilityStatement are unchanged from R4).
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import logging
import pathlib
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["CAPABILITY", "PATIENT", "Event", "MockEHR", "alert_for", "validate_resources"]

logger = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"

PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "123",
    "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "12345"}],
    "active": True,
    "name": [{"use": "official", "family": "Chalmers", "given": ["Peter", "James"]}],
    "telecom": [{"system": "phone", "value": "(03) 5555 6473", "use": "work"}],
    "gender": "male",
    "birthDate": "1974-12-25",
}

CAPABILITY: dict[str, Any] = {
    "resourceType": "CapabilityStatement",
    "status": "active",
    "date": "2026-01-01",
    "publisher": "kubemtls demo",
    "kind": "instance",
    "software": {"name": "kubemtls mock EHR", "version": "0.1.0"},
    "implementation": {"description": "Mock EHR behind mutual TLS"},
    "fhirVersion": "4.0.1",
    "format": ["json"],
    "rest": [
        {
            "mode": "server",
            "resource": [{"type": "Patient", "interaction": [{"code": "read"}]}],
        }
    ],
}


def validate_resources() -> None:
    """Check every served resource against the FHIR models (raises if one is invalid)."""
    from fhir.resources.R4B import capabilitystatement, patient

    patient.Patient.model_validate(PATIENT)
    capabilitystatement.CapabilityStatement.model_validate(CAPABILITY)


# OpenSSL's ssl_verify_alarm_type(): the alert a server sends for a verification error.
_VERIFY_ALERTS = {
    2: "unknown_ca",  # unable to get issuer certificate
    3: "unknown_ca",  # unable to get CRL
    9: "bad_certificate",  # not yet valid
    10: "certificate_expired",
    12: "certificate_expired",  # CRL has expired
    18: "unknown_ca",  # self-signed leaf
    19: "unknown_ca",  # self-signed certificate in chain
    20: "unknown_ca",  # unable to get local issuer certificate
    21: "unknown_ca",  # unable to verify the first certificate
    23: "certificate_revoked",
    26: "unsupported_certificate",  # invalid purpose (no clientAuth EKU)
    27: "unknown_ca",
    28: "unknown_ca",
}


def alert_for(error: ssl.SSLError, tls13: bool = True) -> str:
    """The TLS alert name a server sends for this handshake error."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return _VERIFY_ALERTS.get(error.verify_code, "certificate_unknown")
    if error.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "certificate_required" if tls13 else "handshake_failure"
    if error.reason and error.reason.startswith(("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT")):
        return "(received) " + error.reason.split("ALERT_", 1)[1].lower()
    return (error.reason or "handshake_failure").lower()


@dataclasses.dataclass(frozen=True)
class Event:
    """One connection as the EHR saw it: admitted (identity, serial) or refused (alert)."""

    at: float
    peer: str
    ok: bool
    identity: str = ""
    serial: str = ""
    alert: str = ""
    detail: str = ""
    path: str = ""


TrustSource = Callable[[], tuple[bytes, bytes] | None]


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    ehr: MockEHR


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:
        assert isinstance(self.connection, ssl.SSLSocket)
        cert = self.connection.getpeercert() or {}
        sans: Any = cert.get("subjectAltName", ())
        uris = [str(v) for k, v in sans if k == "URI"]
        identity = uris[0] if uris else str(cert.get("subject", ""))
        serial = format(int(str(cert.get("serialNumber", "0")), 16), "x")
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/fhir/metadata":
            status, body = 200, CAPABILITY
        elif path == "/fhir/Patient/123":
            status, body = 200, PATIENT
        else:
            status, body = 404, _outcome(f"no resource at {path}")
        self.server.ehr.record(
            Event(time.monotonic(), self.client_address[0], True, identity, serial, path=path)
        )
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", FHIR_JSON)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Client-Identity", identity)
        self.send_header("X-Client-Serial", serial)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.client_address[0], *args)


def _linger(tls: ssl.SSLSocket, seconds: float = 2.0) -> None:
    """Close after a refusal without losing the alert we just sent.

    A TLS 1.3 client sends its request right after its Finished; closing a socket with that
    request unread makes the kernel send RST, and an RST can discard the alert before the
    client reads it ("EOF occurred in violation of protocol" instead of the alert). So: FIN
    after the alert, read and drop what the client still sends, then close (a lingering
    close, as HTTP servers do).
    """
    raw = socket.socket(fileno=tls.detach())
    try:
        raw.shutdown(socket.SHUT_WR)
        raw.settimeout(seconds)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and raw.recv(4096):
            pass
    except OSError:
        pass
    finally:
        raw.close()


def _outcome(text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "not-found", "diagnostics": text}],
    }


class MockEHR:
    """The EHR server: ``start()``, ``stop()``, ``events``; trust comes from ``trust()``.

    ``trust`` returns ``(ca_bundle_pem, crl_pem)`` (the cluster's trust ConfigMap) or None
    while it is not published yet. It is polled every ``refresh`` seconds: a new CA bundle
    applies at once, a new CRL when the EHR next fetches its CRL — every ``crl_refresh``
    seconds (0: at every poll), like a relying party downloading a CRL distribution point
    on its own schedule, or at once on ``refresh_crl()`` (an EHR admin acting on a
    revocation notice). A change rebuilds the TLS context used for new handshakes.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        cert_file: pathlib.Path,
        key_file: pathlib.Path,
        trust: TrustSource,
        refresh: float = 1.0,
        crl_refresh: float = 0.0,
    ) -> None:
        self.host, self.cert_file, self.key_file = host, cert_file, key_file
        self._trust, self._refresh, self.crl_refresh = trust, refresh, crl_refresh
        self._crl_fetched = 0.0  # monotonic time of the last CRL fetch
        self._reload_lock = threading.Lock()
        self._trust_pem: tuple[bytes, bytes] | None = None
        self._ctx: ssl.SSLContext | None = None
        self._events: list[Event] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = _Server((host, port), _Handler, bind_and_activate=False)
        self._server.ehr = self
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def record(self, event: Event) -> None:
        with self._lock:
            self._events.append(event)
        if event.ok:
            logger.info(
                "EHR: %s %s as %s (serial %s)", event.peer, event.path, event.identity, event.serial
            )
        else:
            logger.info(
                "EHR: refused %s: sent alert %s (%s)", event.peer, event.alert, event.detail
            )

    def ready(self) -> bool:
        """True once a trust bundle is loaded (the EHR admits nobody before that)."""
        return self._ctx is not None

    def start(self) -> None:
        self._server.allow_reuse_address = True
        self._server.server_bind()
        self._server.server_activate()
        self.reload()
        self._server.get_request = self._accept  # type: ignore[method-assign]
        self._server.finish_request = self._finish  # type: ignore[method-assign]
        for target in (self._server.serve_forever, self._poll_trust):
            thread = threading.Thread(target=target, daemon=True, name=f"ehr-{target.__name__}")
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    @property
    def crl_pem(self) -> bytes:
        """The CRL the EHR enforces now."""
        return self._trust_pem[1] if self._trust_pem else b""

    def next_crl_fetch(self) -> float:
        """Seconds until the EHR fetches the CRL on its own."""
        return max(0.0, self._crl_fetched + self.crl_refresh - time.monotonic())

    def refresh_crl(self) -> bool:
        """Fetch the CRL now; True if it changed."""
        return self.reload(crl=True)

    def reload(self, *, crl: bool = True) -> bool:
        """Fetch the trust bundle (and the CRL if ``crl``); rebuild the context on a change."""
        with self._reload_lock:
            return self._reload(crl)

    def _reload(self, crl: bool) -> bool:
        try:
            pem = self._trust()
        except Exception as e:  # keep serving with the old trust, as a real server would
            logger.warning("EHR: cannot refresh trust: %s", e)
            return False
        if pem is None:
            return False
        if crl or self._trust_pem is None:
            self._crl_fetched = time.monotonic()
        else:
            pem = (pem[0], self._trust_pem[1])  # not the CRL's turn: keep the one we have
        if pem == self._trust_pem:
            return False
        try:
            ctx = self._context(pem)
        except (ssl.SSLError, OSError, ValueError) as e:
            logger.warning("EHR: refused the new trust bundle or CRL, keeping the old: %s", e)
            return False
        what = "trust bundle and CRL" if self._trust_pem is None else "new trust bundle or CRL"
        self._ctx, self._trust_pem = ctx, pem
        logger.info("EHR: %s loaded", what)
        return True

    def _context(self, pem: tuple[bytes, bytes]) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_file, self.key_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
        # Certificates and CRLs in one file: load_verify_locations(cadata=) takes no CRLs.
        with tempfile.NamedTemporaryFile(suffix=".pem") as f:
            f.write(pem[0] + b"\n" + pem[1])
            f.flush()
            ctx.load_verify_locations(cafile=f.name)
        if pem[1].strip():
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        return ctx

    def _poll_trust(self) -> None:
        while not self._stop.wait(self._refresh):
            self.reload(crl=time.monotonic() - self._crl_fetched >= self.crl_refresh)

    def _accept(self) -> tuple[socket.socket, Any]:
        return self._server.socket.accept()

    def _finish(self, request: Any, client_address: Any) -> None:
        """Handshake in the connection's own thread, with the newest context."""
        ctx = self._ctx
        peer = str(client_address[0])
        if ctx is None:
            self.record(Event(time.monotonic(), peer, False, detail="no trust bundle yet"))
            request.close()
            return
        request.settimeout(10.0)
        tls = ctx.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        try:
            tls.do_handshake()
        except ssl.SSLError as e:
            self.record(Event(time.monotonic(), peer, False, alert=alert_for(e), detail=str(e)))
            _linger(tls)
            return
        except OSError as e:
            self.record(Event(time.monotonic(), peer, False, alert="", detail=str(e)))
            tls.close()
            return
        try:
            self._server.RequestHandlerClass(tls, client_address, self._server)
        finally:
            tls.close()

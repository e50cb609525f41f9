"""The operator's own serving certificate (webhook and signing API), issued from the CA.

Issued by ``pki.issue_serving_cert`` for ``<service>.<namespace>.svc``,
``<service>.<namespace>.svc.<cluster-domain>`` and SERVING_EXTRA_SANS (plus BIND_ADDRESS
when it is a specific IP), so sidecars trust it through their namespace's ``ca.crt``.
kopf's own self-signed certificate generation does not work here (TESTING.md §3).

The files live in a private temporary directory (0700, files 0600): kopf's WebhookServer
takes paths, and re-reads them when they change (kopf ``_kits/webhooks.py``). The signing
API's ``ssl.SSLContext`` is reloaded in place, so new handshakes get the new certificate.
While no CA is usable, a throwaway self-signed CA issues a stand-in so the servers still
start (and signing answers 503). The key is never logged.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib
import shutil
import ssl
import tempfile

from cryptography import x509

from kubemtls_operator import config, pki

__all__ = ["ServingCert"]

LIFETIME = datetime.timedelta(days=90)
RENEW_BEFORE = datetime.timedelta(days=30)


def _write_private(path: pathlib.Path, data: bytes) -> None:
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(path.with_suffix(".tmp"), path)


@dataclasses.dataclass
class ServingCert:
    cfg: config.Config
    directory: pathlib.Path = dataclasses.field(
        default_factory=lambda: pathlib.Path(tempfile.mkdtemp(prefix="kubemtls-serving-"))
    )
    cert: x509.Certificate | None = None
    context: ssl.SSLContext = dataclasses.field(
        default_factory=lambda: ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    )

    def __post_init__(self) -> None:
        self.directory.chmod(0o700)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2

    @property
    def certfile(self) -> pathlib.Path:
        return self.directory / "tls.crt"

    @property
    def keyfile(self) -> pathlib.Path:
        return self.directory / "tls.key"

    @property
    def cafile(self) -> pathlib.Path:
        return self.directory / "ca.crt"

    @property
    def host(self) -> str:
        """The name kopf puts in a managed webhook's URL: BIND_ADDRESS if specific.

        Bound to every address, the first IP of SERVING_EXTRA_SANS (off-cluster managed
        mode: the demo lists 127.0.0.1 first, where its API server calls webhooks), else
        the Service's DNS name.
        """
        ips = self.cfg.serving_ip_addresses
        if self.cfg.bind_address in ips:
            return self.cfg.bind_address
        if ips:
            return ips[0]
        return self.cfg.serving_dns_names[0]

    def needs_renewal(self, signing: pki.CA | None, now: datetime.datetime) -> bool:
        if self.cert is None:
            return True
        if signing is None:
            return False
        return (
            self.cert.issuer != signing.cert.subject
            or self.cert.not_valid_after_utc - now < RENEW_BEFORE
        )

    def issue(self, signing: pki.CA | None, bundle: bytes, now: datetime.datetime) -> None:
        """(Re)issue from ``signing`` (or a throwaway CA when None) and reload."""
        issuer = signing or pki.bootstrap_ca(now=now, common_name="kubemtls stand-in (no CA yet)")
        if signing is None:
            bundle = pki.cert_pem(issuer.cert)
        cert, key = pki.issue_serving_cert(
            issuer,
            dns_names=self.cfg.serving_dns_names,
            ip_addresses=self.cfg.serving_ip_addresses,
            now=now,
            lifetime=LIFETIME,
        )
        _write_private(self.keyfile, pki.key_pem(key))
        _write_private(self.certfile, pki.chain_pem(cert, issuer))
        _write_private(self.cafile, bundle)
        self.context.load_cert_chain(self.certfile, self.keyfile)
        self.cert = cert

    def cleanup(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

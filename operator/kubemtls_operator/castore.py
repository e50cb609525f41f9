"""Where the CA lives in the API: the CA Secret, the state ConfigMap, events on the Secret.

Split from ``ca.py`` so that the lifecycle there reads as decisions and steps, and the
conflict-safe I/O they rest on is here: every write is a create with a deterministic name
(409 → someone else won, re-read) or a merge patch with a ``resourceVersion`` precondition
(409, :class:`errors.Conflict` → re-read and decide again). Nothing is kept in memory.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import logging
from typing import Any

from kubemtls_sidecar import contract

from kubemtls_operator import config, errors, kube, naming, pki, revocation, rollover, status

__all__ = ["Store", "now"]

logger = logging.getLogger(__name__)


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _decode(secret: dict[str, Any]) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}


def _encode(data: dict[str, bytes | None]) -> dict[str, str | None]:
    return {k: (base64.b64encode(v).decode() if v is not None else None) for k, v in data.items()}


@dataclasses.dataclass
class Store:
    """Reads and writes of the CA Secret and the ``kubemtls-state`` ConfigMap."""

    client: kube.Client
    cfg: config.Config

    @property
    def _secret_path(self) -> str:
        return kube.secret_path(self.cfg.namespace, self.cfg.ca_secret)

    @property
    def _state_path(self) -> str:
        return kube.configmap_path(self.cfg.namespace, contract.STATE_CONFIGMAP)

    async def load(self) -> tuple[rollover.Authority, str, str]:
        """(authority, secret resourceVersion, state resourceVersion).

        Raises:
            errors.CAUnavailable: no Secret (and no bootstrap), or an unusable CA in it.
        """
        secret = await self._read_secret()
        state, state_rv = await self._read_state()
        try:
            auth = rollover.from_secret(_decode(secret), state, now=now())
        except pki.PKIError as e:
            raise errors.CAUnavailable(
                f"the CA in {self.cfg.namespace}/{self.cfg.ca_secret} cannot be used: {e}",
                reason=naming.Reason.CA_INVALID,
            ) from e
        return auth, secret["metadata"]["resourceVersion"], state_rv

    async def _read_secret(self) -> dict[str, Any]:
        secret = await self.client.get_or_none(self._secret_path)
        if secret is not None:
            return secret
        if not self.cfg.ca_bootstrap:
            raise errors.CAUnavailable(
                f"the CA Secret {self.cfg.namespace}/{self.cfg.ca_secret} does not exist and "
                "KUBEMTLS_OPERATOR_CA_BOOTSTRAP is false; create it with tls.crt and tls.key",
                reason=naming.Reason.CA_SECRET_MISSING,
            )
        return await self._bootstrap()

    async def _bootstrap(self) -> dict[str, Any]:
        at = now()
        ca = pki.bootstrap_ca(now=at, common_name=f"kubemtls root CA {at:%Y%m%d%H%M%S}")
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": self.cfg.ca_secret,
                "namespace": self.cfg.namespace,
                "labels": {"app.kubernetes.io/managed-by": naming.MANAGED_BY},
            },
            "data": _encode(
                {
                    naming.KEY_CERT: pki.cert_pem(ca.cert),
                    naming.KEY_KEY: pki.key_pem(ca.key),
                    naming.KEY_BUNDLE: pki.cert_pem(ca.cert),
                }
            ),
        }
        # A deterministic name: of two replicas bootstrapping at once, one create wins and
        # the other gets 409 and reads the winner's CA.
        secret, created = await self.client.create_or_get(
            kube.secret_path(self.cfg.namespace), body
        )
        if created:
            logger.warning(
                "bootstrapped a self-signed root CA into %s/%s (serial %x): fine for trying "
                "kubemtls, but production should bring its own CA (an intermediate of your PKI)",
                self.cfg.namespace,
                self.cfg.ca_secret,
                ca.cert.serial_number,
            )
            await self.event(
                "Warning",
                naming.Reason.CA_BOOTSTRAPPED,
                "bootstrapped a root CA; production should bring its own CA",
            )
        return secret

    async def _read_state(self) -> tuple[revocation.State, str]:
        body = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": contract.STATE_CONFIGMAP,
                "namespace": self.cfg.namespace,
                "labels": {"app.kubernetes.io/managed-by": naming.MANAGED_BY},
            },
            "data": {naming.KEY_STATE: revocation.State().to_json()},
        }
        cm = await self.client.get_or_none(self._state_path)
        if cm is None:
            cm, _ = await self.client.create_or_get(kube.configmap_path(self.cfg.namespace), body)
        text = (cm.get("data") or {}).get(naming.KEY_STATE)
        return revocation.State.from_json(text), cm["metadata"]["resourceVersion"]

    async def write_state(self, state: revocation.State, rv: str) -> None:
        """Raises: errors.Conflict when the state changed since ``rv`` was read."""
        patch = {"metadata": {"resourceVersion": rv}, "data": {naming.KEY_STATE: state.to_json()}}
        await self.client.merge_patch(self._state_path, patch)

    async def patch_secret(self, rv: str, data: dict[str, bytes | None]) -> None:
        """Set (or, for None, delete) keys of the CA Secret.

        Raises: errors.Conflict when the Secret changed since ``rv`` was read.
        """
        patch = {"metadata": {"resourceVersion": rv}, "data": _encode(data)}
        await self.client.merge_patch(self._secret_path, patch)

    async def live_issuers(self) -> frozenset[str]:
        """Issuer DNs of unexpired certificates, from a LIST of every MTLSCert.

        Asked only before retiring a CA (rare): right after a start, the MTLSCert cache may not
        hold every MTLSCert yet, and retiring a CA whose leaves live is an outage.
        """
        group, version = naming.CRD_API_VERSION.split("/")
        body = await self.client.get_or_none(f"/apis/{group}/{version}/{contract.CRD_PLURAL}")
        at = now()
        views = [
            status.CertView.from_status(i.get("status")) for i in (body or {}).get("items", [])
        ]
        return frozenset(v.issuer for v in views if v.issuer and v.not_after and v.not_after > at)

    async def event(self, type_: str, reason: str, message: str) -> None:
        """An Event on the CA Secret."""
        ref = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": self.cfg.ca_secret, "namespace": self.cfg.namespace},
        }
        await self.client.post_event(ref, type_=type_, reason=reason, message=message)

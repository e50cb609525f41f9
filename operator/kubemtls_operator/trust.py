"""The per-namespace trust ConfigMap ``kubemtls-trust`` (``ca.crt``, ``crl.pem``).

Every namespace with opted-in pods gets one; the sidecar mounts it. The publisher
remembers what it last wrote per namespace (a digest, not the content) and writes only
when the bundle or the CRLs changed, so a fleet of pods costs one write per namespace.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging

from kubemtls_sidecar import contract

from kubemtls_operator import errors, kube, naming, rollover

__all__ = ["Publisher", "configmap_body"]

logger = logging.getLogger(__name__)


def configmap_body(namespace: str, bundle: bytes, crl: bytes) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": contract.TRUST_CONFIGMAP,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": naming.MANAGED_BY},
        },
        "data": {contract.TRUST_CA_FILE: bundle.decode(), contract.TRUST_CRL_FILE: crl.decode()},
    }


@dataclasses.dataclass
class Publisher:
    """Keeps ``kubemtls-trust`` current in every namespace it has been asked to serve."""

    client: kube.Client
    namespaces: set[str] = dataclasses.field(default_factory=set)
    _written: dict[str, str] = dataclasses.field(default_factory=dict)
    _current: tuple[bytes, bytes] | None = None
    _locks: dict[str, asyncio.Lock] = dataclasses.field(default_factory=dict)

    async def ensure(self, namespace: str) -> None:
        """Serve ``namespace`` from now on, and write its ConfigMap if it is not current."""
        self.namespaces.add(namespace)
        if self._current is not None:
            await self._write(namespace, *self._current)

    async def publish(self, auth: rollover.Authority) -> None:
        """Write the new bundle and CRLs to every namespace served."""
        self._current = (auth.bundle_pem, auth.crl_pem)
        results = await asyncio.gather(
            *(self._write(ns, *self._current) for ns in sorted(self.namespaces)),
            return_exceptions=True,
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise errors.APIError(f"could not update {len(failed)} trust ConfigMap(s): {failed[0]}")

    async def _write(self, namespace: str, bundle: bytes, crl: bytes) -> None:
        digest = hashlib.sha256(bundle + b"\0" + crl).hexdigest()
        if self._written.get(namespace) == digest:
            return
        lock = self._locks.setdefault(namespace, asyncio.Lock())
        async with lock:
            if self._written.get(namespace) == digest:
                return
            body = configmap_body(namespace, bundle, crl)
            path = kube.configmap_path(namespace)
            obj, created = await self.client.create_or_get(path, body)
            if not created and obj.get("data") != body["data"]:
                await self.client.merge_patch(
                    kube.configmap_path(namespace, contract.TRUST_CONFIGMAP), {"data": body["data"]}
                )
            self._written[namespace] = digest
            logger.debug("trust ConfigMap in %s is current (%s)", namespace, digest[:12])

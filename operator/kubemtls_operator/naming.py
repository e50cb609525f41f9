"""Every name the operator builds: object names, Secret/ConfigMap keys, event reasons.

Pure (no I/O). Public names users type live in ``kubemtls_sidecar.contract``; this module
holds the operator's own, so no other module spells one.
"""

from __future__ import annotations

from kubemtls_sidecar import contract

__all__ = [
    "CA_KEYS",
    "CRD_API_VERSION",
    "EXTRA_POD_NAME",
    "EXTRA_POD_UID",
    "KEY_BUNDLE",
    "KEY_CERT",
    "KEY_KEY",
    "KEY_NEXT_CERT",
    "KEY_NEXT_KEY",
    "KEY_PREV_CERT",
    "KEY_PREV_KEY",
    "KEY_STATE",
    "MANAGED_BY",
    "SA_USER_PREFIX",
    "Reason",
    "mtlscert_name",
    "mtlscerts_path",
]

CRD_API_VERSION = f"{contract.CRD_GROUP}/{contract.CRD_VERSION}"
MANAGED_BY = "kubemtls-operator"

# The CA Secret (DESIGN.md §Rules): current, next (rollover), every trusted CA. prev.* is
# ours: the retired CA's key, kept only to keep signing its CRL while leaves it issued live.
KEY_CERT, KEY_KEY = "tls.crt", "tls.key"
KEY_NEXT_CERT, KEY_NEXT_KEY = "next.crt", "next.key"
KEY_PREV_CERT, KEY_PREV_KEY = "prev.crt", "prev.key"
KEY_BUNDLE = "ca.crt"
CA_KEYS = (KEY_CERT, KEY_KEY, KEY_NEXT_CERT, KEY_NEXT_KEY, KEY_PREV_CERT, KEY_PREV_KEY)

# The state ConfigMap holds one JSON document under this key.
KEY_STATE = "state.json"

# TokenReview: what a bound, pod-projected token's review carries.
EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
EXTRA_POD_UID = "authentication.kubernetes.io/pod-uid"
SA_USER_PREFIX = "system:serviceaccount:"


class Reason:
    """Event and condition reasons (CamelCase, after cert-manager)."""

    CA_BOOTSTRAPPED = "CABootstrapped"
    CA_SECRET_MISSING = "CASecretMissing"  # noqa: S105 - an event reason
    CA_INVALID = "CASecretInvalid"
    CA_LOADED = "CALoaded"
    CA_EXPIRING = "CAExpiring"
    CA_NEXT_PUBLISHED = "CANextPublished"
    CA_ACTIVATED = "CAActivated"
    CA_RETIRED = "CARetired"
    CA_REPLACED = "CAReplaced"  # tls.crt/tls.key rewritten in place (cert-manager)
    CA_RENEWED = "CARenewed"  # same key, new certificate
    CA_PREVIOUS_KEY_UNAVAILABLE = "CAPreviousKeyUnavailable"
    CRL_SIGNED = "CRLSigned"
    NOT_INJECTED = "NotInjected"
    INJECTED = "Injected"
    ISSUED = "Issued"
    PENDING = "Pending"
    EXPIRED = "Expired"
    RENEWAL_OVERDUE = "RenewalOverdue"
    EXPIRES_SOON = "ExpiresSoon"
    NOT_EXPIRING = "NotExpiring"
    REVOKED = "Revoked"
    NOT_REVOKED = "NotRevoked"
    REVOCATION_INVALID = "InvalidRevocationReason"
    NOTHING_TO_REVOKE = "NothingToRevoke"


def mtlscert_name(pod_name: str) -> str:
    """An MTLSCert is named after its pod (DESIGN.md §Custom resource)."""
    return pod_name


def mtlscerts_path(namespace: str, name: str | None = None) -> str:
    base = (
        f"/apis/{contract.CRD_GROUP}/{contract.CRD_VERSION}/namespaces/{namespace}/"
        f"{contract.CRD_PLURAL}"
    )
    return f"{base}/{name}" if name else base

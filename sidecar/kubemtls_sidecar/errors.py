"""The one base class of kubemtls errors, and the sidecar's own.

The operator's errors (``kubemtls_operator.errors``) derive from :class:`KubemtlsError`
too; it lives here because the sidecar package is the lower layer and must not import
the operator.
"""

from __future__ import annotations

__all__ = ["ConfigError", "IdentityError", "KubemtlsError"]


class KubemtlsError(Exception):
    """Base of every error kubemtls raises on purpose."""


class IdentityError(KubemtlsError, ValueError):
    """A namespace, service account, trust domain or SPIFFE ID that is not valid."""


class ConfigError(KubemtlsError):
    """A sidecar flag or file that is wrong: the sidecar exits 2 with this one line."""

"""The operator's errors, each one carrying kopf's retry meaning.

All derive from ``kubemtls_sidecar.errors.KubemtlsError`` (the one base). An error whose
cause can go away by itself (the API server is down, the CA Secret is not there yet) is a
``kopf.TemporaryError`` so kopf retries it; one that cannot (a bad setting) is permanent.
The retry decision is made where the cause is known (cert-manager's ``ca.go``), and the
original exception stays attached as ``__cause__``.
"""

from __future__ import annotations

import kopf
from kubemtls_sidecar import errors

# Defined beside the signing front, whose worker processes do not import kopf (this module).
from kubemtls_operator.signfront import Refused as SigningRefused

__all__ = [
    "APIError",
    "CAUnavailable",
    "ConfigInvalid",
    "Conflict",
    "NotFound",
    "SigningRefused",
]


class ConfigInvalid(errors.KubemtlsError):
    """A ``KUBEMTLS_OPERATOR_*`` setting is wrong: the operator exits 2 with this one line."""


class APIError(errors.KubemtlsError, kopf.TemporaryError):
    """The Kubernetes API answered with an error (or not at all); kopf retries."""

    def __init__(self, message: str, *, status: int = 0, delay: float = 5.0) -> None:
        super().__init__(message, delay=delay)
        self.status = status


class NotFound(APIError):
    """404: the object is not there."""


class Conflict(APIError):
    """409: the object exists already, or a resourceVersion precondition failed."""


class CAUnavailable(errors.KubemtlsError, kopf.TemporaryError):
    """No usable CA (Secret missing or invalid): signing answers 503 until it is fixed."""

    def __init__(self, message: str, *, reason: str = "CAUnavailable", delay: float = 10.0):
        super().__init__(message, delay=delay)
        self.reason = reason

"""Name the TLS alert behind a failed handshake, and say why in words.

Pure. Three sources, most reliable first: (1) a plaintext alert record we just flushed to
the peer (TLS 1.2 and earlier send handshake alerts unencrypted), (2) OpenSSL's mapping
of a certificate verification error to an alert (``ssl_x509err2alert`` in
``ssl/statem/statem_lib.c``, OpenSSL 3.0), (3) OpenSSL's error reason (``..._ALERT_X``
when the peer sent alert X, or a handshake reason such as ``NO_SHARED_CIPHER``).
"""

from __future__ import annotations

import dataclasses
import ssl

__all__ = ["ALERT_NAMES", "Failure", "classify", "plaintext_alert"]

ALERT_NAMES = {
    0: "close_notify",
    10: "unexpected_message",
    20: "bad_record_mac",
    22: "record_overflow",
    40: "handshake_failure",
    42: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    45: "certificate_expired",
    46: "certificate_unknown",
    47: "illegal_parameter",
    48: "unknown_ca",
    49: "access_denied",
    50: "decode_error",
    51: "decrypt_error",
    70: "protocol_version",
    71: "insufficient_security",
    80: "internal_error",
    86: "inappropriate_fallback",
    90: "user_canceled",
    109: "missing_extension",
    110: "unsupported_extension",
    112: "unrecognized_name",
    116: "certificate_required",
    120: "no_application_protocol",
}

# X509_V_ERR_* code → alert (OpenSSL 3.0 ssl_x509err2alert); others: certificate_unknown.
_VERIFY_ALERTS = {
    50: "handshake_failure",
    67: "bad_certificate",
    68: "bad_certificate",
    22: "unknown_ca",
    10: "certificate_expired",
    9: "bad_certificate",
    28: "bad_certificate",
    23: "certificate_revoked",
    7: "decrypt_error",
    27: "bad_certificate",
    12: "certificate_expired",
    11: "bad_certificate",
    8: "decrypt_error",
    18: "unknown_ca",
    66: "bad_certificate",
    63: "bad_certificate",
    13: "bad_certificate",
    14: "bad_certificate",
    15: "bad_certificate",
    16: "bad_certificate",
    62: "bad_certificate",
    24: "unknown_ca",
    69: "internal_error",
    26: "unsupported_certificate",
    64: "bad_certificate",
    17: "internal_error",
    25: "unknown_ca",
    19: "unknown_ca",
    70: "internal_error",
    6: "bad_certificate",
    4: "bad_certificate",
    5: "bad_certificate",
    3: "unknown_ca",
    33: "unknown_ca",
    2: "unknown_ca",
    20: "unknown_ca",
    21: "unknown_ca",
    1: "internal_error",
}

_REASON_ALERTS = {
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "WRONG_VERSION_NUMBER": "protocol_version",
    "NO_SHARED_CIPHER": "handshake_failure",
    "NO_SUITABLE_SIGNATURE_ALGORITHM": "handshake_failure",
    "NO_SHARED_GROUPS": "handshake_failure",
    "EE_KEY_TOO_SMALL": "bad_certificate",
    "CA_KEY_TOO_SMALL": "bad_certificate",
    "CA_MD_TOO_WEAK": "bad_certificate",
}


@dataclasses.dataclass(frozen=True)
class Failure:
    """A handshake failure: the alert, who sent it, and a sentence for people."""

    alert: str | None
    sent_by: str  # "us" (we refused the peer) or "peer" (the peer refused us) or "none"
    code: str  # OpenSSL's reason, lower case (a metric label of bounded cardinality)
    reason: str


def plaintext_alert(data: bytes) -> str | None:
    """The alert in a plaintext TLS alert record within ``data`` (last one wins)."""
    found = None
    i = 0
    while i + 5 <= len(data):
        ctype, length = data[i], int.from_bytes(data[i + 3 : i + 5], "big")
        body = data[i + 5 : i + 5 + length]
        if ctype == 21 and length == 2 and len(body) == 2:
            found = ALERT_NAMES.get(body[1], f"alert_{body[1]}")
        i += 5 + length
    return found


def classify(exc: BaseException, *, flushed: bytes = b"", no_cert_tls13: bool = True) -> Failure:
    """Describe a handshake error; ``flushed`` is what we wrote to the peer after it."""
    if not isinstance(exc, ssl.SSLError):
        text = str(exc) or type(exc).__name__
        return Failure(None, "none", type(exc).__name__.lower(), text)
    reason = (exc.reason or "unknown").upper()
    code = reason.lower()
    wire = plaintext_alert(flushed)
    if isinstance(exc, ssl.SSLCertVerificationError):
        msg = exc.verify_message or "certificate verification failed"
        alert = wire or _VERIFY_ALERTS.get(exc.verify_code or 0, "certificate_unknown")
        return Failure(alert, "us", _verify_code_name(exc), msg)
    for prefix in ("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_", "TLSV1_"):
        if reason.startswith(prefix) and "ALERT" in reason:
            name = reason[len(prefix) :].lower()
            return Failure(name, "peer", code, f"the peer refused us with alert {name}")
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        alert = wire or ("certificate_required" if no_cert_tls13 else "handshake_failure")
        return Failure(alert, "us", code, "the peer presented no client certificate")
    other = wire or _REASON_ALERTS.get(reason)
    return Failure(other, "us" if other else "none", code, _sentence(exc))


def _verify_code_name(exc: ssl.SSLCertVerificationError) -> str:
    msg = (exc.verify_message or "verify_failed").lower()
    return "".join(ch if ch.isalnum() else "_" for ch in msg).strip("_")


def _sentence(exc: ssl.SSLError) -> str:
    text = str(exc)
    return text[text.find("]") + 1 :].strip() if text.startswith("[") else text

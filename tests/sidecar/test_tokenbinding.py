"""RFC 8705 certificate-bound tokens: the pure verdicts of ``tokenbinding.check``."""

from __future__ import annotations

import base64
import json

import pytest
from kubemtls_sidecar import certs, tokenbinding
from testkit import TestPKI


def _b64(obj: object) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwt(payload: object, header: object | None = None) -> str:
    """An unsigned-looking JWS compact token (the sidecar never checks signatures)."""
    return f"{_b64(header or {'alg': 'RS256', 'typ': 'JWT'})}.{_b64(payload)}.c2ln"


def bearer(token: str) -> list[bytes]:
    return [f"Bearer {token}".encode()]


@pytest.fixture(scope="module")
def thumb(test_pki: TestPKI) -> str:
    return certs.x5t_s256(test_pki.leaf("ehr", "client").cert)


def test_matching_binding_passes(thumb: str) -> None:
    token = jwt({"sub": "x", "cnf": {"x5t#S256": thumb}})
    assert tokenbinding.check(bearer(token), thumb) is None
    assert tokenbinding.check(bearer(token), thumb, require_bound=True) is None


def test_padded_thumbprint_is_tolerated(thumb: str) -> None:
    token = jwt({"cnf": {"x5t#S256": thumb + "="}})
    assert tokenbinding.check(bearer(token), thumb) is None


def test_binding_to_another_certificate_is_refused(thumb: str, test_pki: TestPKI) -> None:
    other = certs.x5t_s256(test_pki.leaf("ehr", "someone-else").cert)
    refusal = tokenbinding.check(bearer(jwt({"cnf": {"x5t#S256": other}})), thumb)
    assert refusal is not None
    assert "another certificate" in refusal.description


@pytest.mark.parametrize(
    ("token", "words"),
    [
        (jwt({"cnf": "x5t"}), "cnf is not a JSON object"),
        (jwt({"cnf": {"x5t#S256": 42}}), "not a string"),
        (jwt({"cnf": {"x5t#S256": ""}}), "not a string"),
        (f"{_b64({'alg': 'RS256'})}.!!!notbase64.sig", "malformed"),
        (f"{_b64({'alg': 'RS256'})}.{_b64(b'[1, 2]')}.sig", "not a JSON object"),
    ],
)
def test_malformed_tokens_are_refused(thumb: str, token: str, words: str) -> None:
    refusal = tokenbinding.check(bearer(token), thumb)
    assert refusal is not None
    assert words in refusal.description


def test_unbound_and_opaque_tokens_pass_unless_required(thumb: str) -> None:
    for token in (jwt({"sub": "x"}), "opaque-token-abc", jwt({"cnf": {"jkt": "dpop"}})):
        assert tokenbinding.check(bearer(token), thumb) is None
        refusal = tokenbinding.check(bearer(token), thumb, require_bound=True)
        assert refusal is not None, token


def test_non_bearer_schemes_pass_untouched(thumb: str) -> None:
    basic = [b"Basic dXNlcjpwYXNz"]
    assert tokenbinding.check(basic, thumb, require_bound=True) is None
    assert tokenbinding.check([], thumb, require_bound=True) is None
    assert (
        tokenbinding.check([b"bearer " + jwt({"cnf": {"x5t#S256": thumb}}).encode()], thumb) is None
    )


def test_two_authorization_headers_with_a_bearer_are_refused(thumb: str) -> None:
    good = f"Bearer {jwt({'cnf': {'x5t#S256': thumb}})}".encode()
    assert tokenbinding.check([good, b"Bearer other"], thumb) is not None
    assert tokenbinding.check([b"Bearer "], thumb) is not None


def test_www_authenticate_is_rfc6750() -> None:
    value = tokenbinding.www_authenticate(tokenbinding.Refusal('bad "quoted" thing'))
    assert value == b'Bearer error="invalid_token", error_description="bad \'quoted\' thing"'

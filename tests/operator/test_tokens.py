"""The TokenReview cache: one review per token, and never past the token's own expiry."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import time
from typing import Any

import kopf
import pytest
from kubemtls_operator import errors, kube, tokens


def _jwt(claims: dict[str, Any]) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "RS256"}).encode())
    return f"{head}.{b64(json.dumps(claims).encode())}.{b64(b'not-verified-here')}"


async def test_a_cached_review_never_outlives_its_token(k8s: Any) -> None:
    exp = int(time.time()) + 2
    token = _jwt({"exp": exp, "sub": "system:serviceaccount:default:app"})
    k8s.emulator.tokens[token] = {
        "namespace": "default",
        "serviceAccount": "app",
        "podName": "p",
        "podUID": "uid-p",
        "audiences": ["kubemtls"],
        "expirationTimestamp": datetime.datetime.fromtimestamp(exp, datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        ),
    }
    client = kube.Client(kopf.ConnectionInfo(server=k8s.url))
    try:
        reviewer = tokens.Reviewer(client)
        first = await reviewer.identify(token)
        assert (first.namespace, first.pod_name, first.pod_uid) == ("default", "p", "uid-p")
        assert await reviewer.identify(token) == first
        assert reviewer.reviews == 1  # the second answer came from the cache
        while time.time() < exp - 0.2:  # the clock is the condition here
            await reviewer.identify(token)  # still cached: no API call until the expiry
            await asyncio.sleep(0.1)
        while time.time() < exp:
            await asyncio.sleep(0.05)
        assert reviewer.reviews == 1
        with pytest.raises(errors.SigningRefused) as refused:
            await reviewer.identify(token)  # expired: asked again, and the API says no
        assert (refused.value.status, refused.value.reason) == (401, "TokenInvalid")
        assert reviewer.reviews == 2
    finally:
        await client.close()


async def test_a_refusal_is_not_cached_for_long(k8s: Any) -> None:
    client = kube.Client(kopf.ConnectionInfo(server=k8s.url))
    try:
        reviewer = tokens.Reviewer(client)
        for _ in range(3):
            with pytest.raises(errors.SigningRefused):
                await reviewer.identify("not-a-token")
        assert reviewer.reviews == 1  # a misbehaving client cannot turn each request into a call
        entry = reviewer._cache[next(iter(reviewer._cache))]
        assert entry[0] <= time.time() + tokens.NEGATIVE_TTL
    finally:
        await client.close()

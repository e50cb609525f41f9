"""Who a bearer token belongs to: TokenReview (audience ``kubemtls``), cached.

The signing API must not call the API server more than once per request on its hot path
(DESIGN.md §Signing API): a review's answer is cached until the token expires. A review
does not return the expiry, so it is read from the JWT's ``exp`` claim *without*
verifying it (the review did the verifying), capped at :data:`MAX_TTL` (projected tokens
live an hour). A deleted pod's cached token still fails: the pod index no longer has it.
Refusals are cached briefly so a misbehaving client cannot turn every request into an API
call. Tokens are kept as their SHA-256 only.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import time

from kubemtls_sidecar import contract

from kubemtls_operator import errors, kube, naming

__all__ = ["Identity", "Reviewer", "jwt_expiry"]

MAX_TTL = 3600.0
NEGATIVE_TTL = 5.0
MAX_ENTRIES = 50_000


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    """What a valid token says: the pod (when bound to one), its namespace and SA."""

    namespace: str
    service_account: str
    pod_name: str
    pod_uid: str


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, unverified (only to bound a cache entry)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
        exp = claims.get("exp")
    except (ValueError, AttributeError):
        return None
    return float(exp) if isinstance(exp, int | float) else None


def _identity(status: dict[str, object]) -> Identity:
    """Raises SigningRefused(401) unless the review says: a pod-bound service account."""
    if not status.get("authenticated"):
        err = status.get("error") or "the token was not accepted"
        raise errors.SigningRefused(
            401,
            "TokenInvalid",
            f"the token is not valid for audience {contract.TOKEN_AUDIENCE}: {err}",
        )
    user = status.get("user") or {}
    assert isinstance(user, dict)
    username = str(user.get("username", ""))
    extra = user.get("extra") or {}
    parts = username.removeprefix(naming.SA_USER_PREFIX).split(":")
    if not username.startswith(naming.SA_USER_PREFIX) or len(parts) != 2:
        raise errors.SigningRefused(
            401, "NotAServiceAccount", f"{username!r} is not a service account token"
        )
    pod_name = (extra.get(naming.EXTRA_POD_NAME) or [""])[0]
    pod_uid = (extra.get(naming.EXTRA_POD_UID) or [""])[0]
    if not pod_name or not pod_uid:
        raise errors.SigningRefused(
            401,
            "TokenNotBound",
            "the token is not bound to a pod; mount a projected service-account token "
            f"with audience {contract.TOKEN_AUDIENCE}",
        )
    return Identity(parts[0], parts[1], pod_name, pod_uid)


@dataclasses.dataclass
class Reviewer:
    """Token → :class:`Identity`, or ``SigningRefused(401)``, with a cache."""

    client: kube.Client
    audience: str = contract.TOKEN_AUDIENCE
    _cache: dict[str, tuple[float, Identity | errors.SigningRefused]] = dataclasses.field(
        default_factory=dict
    )
    _inflight: dict[str, asyncio.Future[Identity | errors.SigningRefused]] = dataclasses.field(
        default_factory=dict
    )
    reviews: int = 0  # API calls made (the bench and tests read it)

    async def identify(self, token: str) -> Identity:
        """Raises SigningRefused (401) for a token that is not valid."""
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.time()
        hit = self._cache.get(key)
        if hit is None or hit[0] <= now:
            fut = self._inflight.get(key)
            if fut is None:
                fut = asyncio.get_running_loop().create_future()
                self._inflight[key] = fut
                try:
                    result = await self._review(token, now)
                    fut.set_result(result)
                except BaseException as e:
                    fut.set_exception(e)
                    fut.exception()  # mark retrieved: waiters re-raise it themselves
                    raise
                finally:
                    del self._inflight[key]
                hit = (self._expiry(token, result, now), result)
                self._store(key, hit)
            else:
                hit = (0.0, await fut)
        value = hit[1]
        if isinstance(value, errors.SigningRefused):
            raise value
        return value

    async def _review(self, token: str, now: float) -> Identity | errors.SigningRefused:
        self.reviews += 1
        try:
            status = await self.client.token_review(token, [self.audience])
        except errors.APIError as e:
            raise errors.SigningRefused(
                503, "TokenReviewFailed", f"the token could not be reviewed: {e}"
            ) from e
        try:
            return _identity(status)
        except errors.SigningRefused as refusal:
            return refusal

    @staticmethod
    def _expiry(token: str, result: object, now: float) -> float:
        if isinstance(result, errors.SigningRefused):
            return now + NEGATIVE_TTL
        exp = jwt_expiry(token)
        return min(exp, now + MAX_TTL) if exp is not None else now + MAX_TTL

    def _store(self, key: str, entry: tuple[float, Identity | errors.SigningRefused]) -> None:
        if len(self._cache) >= MAX_ENTRIES:
            now = time.time()
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            while len(self._cache) >= MAX_ENTRIES:
                self._cache.pop(next(iter(self._cache)))
        self._cache[key] = entry

    def forget_pod(self, namespace: str, name: str) -> None:
        """Drop cached identities of a pod that is gone (its tokens stop being valid)."""
        self._cache = {
            k: v
            for k, v in self._cache.items()
            if not (
                isinstance(v[1], Identity) and v[1].namespace == namespace and v[1].pod_name == name
            )
        }

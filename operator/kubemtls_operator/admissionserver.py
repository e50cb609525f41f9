"""kopf's webhook server: malformed reviews get a 400, and handlers can give the patch as built.

kopf 1.45's ``WebhookServer._serve`` turns only invalid JSON and its own ``WebhookError``
into 400s. Anything else that is not an AdmissionReview — a JSON list, a review without
``request`` or ``userInfo``, an ``object`` that is a string — raises deep inside kopf's
engine (``AttributeError``/``KeyError``) and aiohttp answers "500 Internal Server Error",
which reads like a bug in the webhook rather than in the request. A wrong ``kind`` is even
answered as if it were right. This subclass checks the envelope first and answers 400 with
a JSON body saying what is wrong; a well-formed review goes to kopf unchanged, and the
server keeps serving either way. The check itself, :func:`envelope_problem`, is pure.

Answering is kopf's documented job for a custom server (``kopf.WebhookFn``: "accept the
function, invoke it [...], wait for the admission response, serialise it and send it
back"), so this server decodes the body once (orjson: the stdlib's json was a tenth of
the webhook's CPU), calls kopf's function — kopf finds the handler, runs it, builds the
response — and serialises the answer itself. One addition: kopf turns a handler's
``patch`` into a JSON Patch by deep-copying the object and diffing it with ``jsonpatch``,
which cost the injection webhook more than its own work. A handler that already has the
JSON Patch calls :func:`offer_json_patch` instead, and this server puts those operations
into kopf's response as they are (only if kopf allowed the review). Outside this server
the call returns False, and the handler falls back to ``patch.fns``.
"""

from __future__ import annotations

import base64
import contextvars
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp.web
import kopf
import orjson
from kopf._core.engines import admission as kopf_admission

__all__ = ["WebhookServer", "envelope_problem", "offer_json_patch"]

_API_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")
_OPERATIONS = ("CREATE", "UPDATE", "DELETE", "CONNECT")


def envelope_problem(data: object) -> str | None:
    """Why ``data`` is not an AdmissionReview request kopf can serve, or None if it is."""
    if not isinstance(data, Mapping):
        return f"the body is a JSON {type(data).__name__}, not an AdmissionReview object"
    if data.get("kind") != "AdmissionReview":
        return f"kind must be AdmissionReview, not {data.get('kind')!r}"
    if data.get("apiVersion") not in _API_VERSIONS:
        return f"apiVersion must be admission.k8s.io/v1, not {data.get('apiVersion')!r}"
    request = data.get("request")
    if not isinstance(request, Mapping):
        return "request is missing or not an object"
    if not isinstance(request.get("uid"), str) or not request["uid"]:
        return "request.uid is missing"
    resource = request.get("resource")
    if not isinstance(resource, Mapping) or not all(
        isinstance(resource.get(k), str) for k in ("group", "version", "resource")
    ):
        return "request.resource must have group, version and resource"
    if request.get("operation") not in _OPERATIONS:
        return f"request.operation must be one of {', '.join(_OPERATIONS)}"
    if not isinstance(request.get("userInfo"), Mapping):
        return "request.userInfo is missing"
    new, old = request.get("object"), request.get("oldObject")
    if new is None and old is None:
        return "request.object and request.oldObject are both missing"
    for name, value in (("object", new), ("oldObject", old)):
        if value is not None and not isinstance(value, Mapping):
            return f"request.{name} is a JSON {type(value).__name__}, not an object"
    return None


class _Offer:
    """The JSON Patch a handler offered for the review being served."""

    __slots__ = ("ops",)

    def __init__(self) -> None:
        self.ops: list[Mapping[str, Any]] = []


# Set by WebhookServer._serve around kopf's call; kopf runs the handler within it (or in a
# task that copies the context, which still shares this _Offer object).
_offer: contextvars.ContextVar[_Offer | None] = contextvars.ContextVar(
    "kubemtls_admission_offer", default=None
)


def offer_json_patch(ops: Sequence[Mapping[str, Any]]) -> bool:
    """Answer the review being served with ``ops`` (RFC 6902) as its patch, undiffed.

    Returns False when no :class:`WebhookServer` of ours is serving the current review (kopf's
    own server, a test calling a handler directly): the caller must then use ``patch.fns``.
    """
    offer = _offer.get()
    if offer is None:
        return False
    offer.ops.extend(ops)
    return True


class WebhookServer(kopf.WebhookServer):
    """``kopf.WebhookServer`` with the envelope checked first and offered patches sent as built."""

    @staticmethod
    async def _serve(fn: kopf.WebhookFn, request: aiohttp.web.Request) -> aiohttp.web.Response:
        try:
            data = orjson.loads(await request.read())
        except orjson.JSONDecodeError as e:
            return _bad_request(f"the body is not JSON: {e}")
        problem = envelope_problem(data)
        if problem:
            return _bad_request(problem)
        # As kopf's _serve: the identity of the API server (not of the user), for handlers.
        headers = dict(request.headers)
        sslpeer = request.transport.get_extra_info("peercert") if request.transport else None
        offer = _Offer()
        token = _offer.set(offer)
        try:
            response = await fn(
                data, webhook=request.match_info.get("id"), sslpeer=sslpeer, headers=headers
            )
        except kopf_admission.AmbiguousResourceError as e:
            raise aiohttp.web.HTTPConflict(reason=str(e) or None) from e
        except kopf_admission.UnknownResourceError as e:
            raise aiohttp.web.HTTPNotFound(reason=str(e) or None) from e
        except kopf_admission.WebhookError as e:
            raise aiohttp.web.HTTPBadRequest(reason=str(e) or None) from e
        finally:
            _offer.reset(token)
        payload: dict[str, Any] = dict(response["response"])
        if offer.ops and payload.get("allowed"):
            if "patch" in payload:  # a handler used kopf's patch too: two bases, no merge
                raise RuntimeError("a review got both kopf's patch and an offered JSON Patch")
            payload["patch"] = base64.b64encode(orjson.dumps(offer.ops)).decode("ascii")
            payload["patchType"] = "JSONPatch"
        body = orjson.dumps({**response, "response": payload})
        return aiohttp.web.Response(body=body, content_type="application/json")


def _bad_request(message: str) -> aiohttp.web.Response:
    body = {"reason": "BadRequest", "message": f"not an AdmissionReview: {message}"}
    return aiohttp.web.json_response(body, status=400)

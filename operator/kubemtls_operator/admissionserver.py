"""kopf's webhook server, refusing malformed AdmissionReviews with a 400 instead of a 500.

kopf 1.45's ``WebhookServer._serve`` turns only invalid JSON and its own ``WebhookError``
into 400s. Anything else that is not an AdmissionReview — a JSON list, a review without
``request`` or ``userInfo``, an ``object`` that is a string — raises deep inside kopf's
engine (``AttributeError``/``KeyError``) and aiohttp answers "500 Internal Server Error",
which reads like a bug in the webhook rather than in the request. A wrong ``kind`` is even
answered as if it were right. This subclass checks the envelope first and answers 400 with
a JSON body saying what is wrong; a well-formed review goes to kopf unchanged, and the
server keeps serving either way. The check itself, :func:`envelope_problem`, is pure.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import aiohttp.web
import kopf

__all__ = ["WebhookServer", "envelope_problem"]

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


class WebhookServer(kopf.WebhookServer):
    """``kopf.WebhookServer`` with the AdmissionReview envelope checked before kopf sees it."""

    @staticmethod
    async def _serve(fn: kopf.WebhookFn, request: aiohttp.web.Request) -> aiohttp.web.Response:
        try:
            data = json.loads(await request.text())
        except ValueError as e:
            return _bad_request(f"the body is not JSON: {e}")
        problem = envelope_problem(data)
        if problem:
            return _bad_request(problem)
        response: aiohttp.web.Response = await kopf.WebhookServer._serve(fn, request)
        return response


def _bad_request(message: str) -> aiohttp.web.Response:
    body = {"reason": "BadRequest", "message": f"not an AdmissionReview: {message}"}
    return aiohttp.web.json_response(body, status=400)

"""A tiny synchronous JSON client for the demo's API server (the emulator, plain HTTP).

The demo plays kubectl and kubelet: it creates objects, reads them back, annotates them and
asks for service-account tokens. It needs a handful of verbs, not a Kubernetes client, and
it must not share an event loop with anything, so it uses the standard library only.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from kubemtls_sidecar import contract

__all__ = ["APIError", "KubeAPI", "configmap_path", "mtlscert_path", "pod_path", "secret_path"]

JSON = dict[str, Any]


class APIError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class KubeAPI:
    """GET/POST/PATCH/DELETE on one API server URL, JSON in and out."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        query: dict[str, str] | None = None,
    ) -> JSON:
        """Send one request; return the decoded JSON answer.

        Raises:
            APIError: the server answered 4xx/5xx (message from its Status object).
        """
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)  # noqa: S310 (our own URL)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as rsp:  # noqa: S310
                raw = rsp.read()
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                message = str(json.loads(text).get("message", text))
            except ValueError:
                message = text
            raise APIError(e.code, message) from None
        return json.loads(raw) if raw else {}

    def get(self, path: str, **query: str) -> JSON:
        return self.request("GET", path, query=query or None)

    def get_or_none(self, path: str) -> JSON | None:
        """The object at ``path``, or None if it does not exist."""
        try:
            return self.get(path)
        except APIError as e:
            if e.status == 404:
                return None
            raise

    def create(self, path: str, obj: JSON) -> JSON:
        return self.request("POST", path, obj)

    def merge_patch(self, path: str, patch: JSON) -> JSON:
        return self.request("PATCH", path, patch, content_type="application/merge-patch+json")

    def delete(self, path: str) -> JSON:
        return self.request("DELETE", path)


def pod_path(namespace: str, name: str = "") -> str:
    """The API path of a pod (or of the namespace's pod collection)."""
    return f"/api/v1/namespaces/{namespace}/pods" + (f"/{name}" if name else "")


def configmap_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/configmaps/{name}"


def secret_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/secrets/{name}"


def mtlscert_path(namespace: str, name: str = "") -> str:
    base = f"/apis/{contract.CRD_GROUP}/{contract.CRD_VERSION}/namespaces/{namespace}"
    return f"{base}/{contract.CRD_PLURAL}" + (f"/{name}" if name else "")

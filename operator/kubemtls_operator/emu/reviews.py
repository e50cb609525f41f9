"""TokenReview, TokenRequest and the other *Review endpoints (answered, never stored)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import uuid
from typing import Any

import aiohttp.web

from kubemtls_operator.emu import kmockfix  # noqa: F401  (patches kmock first)
from kubemtls_operator.emu.base import (
    R_NODES,
    R_PODS,
    R_SA,
    _err,
    bad_request,
    gv,
    invalid,
    not_found,
    parse_time,
)


class ReviewsMixin:
    # ----- TokenReview, TokenRequest and the other reviews ------------------------------------
    def review(self, request, res, data) -> aiohttp.web.Response:
        """*reviews are never stored (kmock would store them and answer 409 on the second one)."""
        body = data if isinstance(data, dict) else None
        if body is None:
            raise bad_request(
                "the body of the request was in an unknown format; the emulator accepts JSON only"
            )
        if request.namespace and res.plural != "localsubjectaccessreviews":
            raise bad_request(f"namespace is not allowed on this type: {request.namespace}")
        out = {
            "kind": body.get("kind") or (self.info(res).kind if self.info(res) else ""),
            "apiVersion": body.get("apiVersion") or gv(res),
            "metadata": {**(body.get("metadata") or {}), "creationTimestamp": None},
            "spec": body.get("spec") or {},
        }
        if res.group == "authentication.k8s.io" and res.plural == "tokenreviews":
            out["status"] = self.token_review(out["spec"])
        elif res.group == "authentication.k8s.io" and res.plural == "selfsubjectreviews":
            out["status"] = {
                "userInfo": {
                    "username": "k8semu-admin",
                    "groups": ["system:masters", "system:authenticated"],
                }
            }
        elif res.group == "authorization.k8s.io" and res.plural == "selfsubjectrulesreviews":
            out["status"] = {
                "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}],
                "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
                "incomplete": False,
            }
        elif res.group == "authorization.k8s.io":  # (self/local)subjectaccessreviews: no RBAC here
            out["status"] = {"allowed": True, "reason": "k8semu allows everything"}
        else:
            raise _err(405, "MethodNotAllowed", f"{res.plural} are not emulated")
        return self.respond(out, 201)

    def token_review(self, spec: dict) -> dict:
        """As kube-apiserver answers for a bound service-account token (incl. omitting authenticated=false)."""
        token = spec.get("token")
        if not token:
            raise bad_request("token is required for TokenReview in authentication")
        auds = list(spec.get("audiences") or self.api_audiences)
        entry = self.tokens.get(token)
        if entry is None:
            return {"user": {}, "error": "[invalid bearer token, token lookup failed]"}
        token_auds = list(entry.get("audiences") or self.api_audiences)
        selected = [a for a in auds if a in token_auds]
        if not selected:
            return {
                "user": {},
                "error": f"[invalid bearer token, token audiences {self._goq(token_auds)} is invalid "
                f"for the target audiences {self._goq(auds)}]",
            }
        exp = parse_time(entry.get("expirationTimestamp"))
        if exp is not None and exp <= datetime.datetime.now(datetime.UTC):
            return {
                "user": {},
                "error": "[invalid bearer token, service account token has expired]",
            }
        if entry.get("username"):  # a non-serviceaccount user, for completeness
            return {
                "authenticated": True,
                "user": {
                    "username": entry["username"],
                    "uid": entry.get("uid", ""),
                    "groups": entry.get("groups") or ["system:authenticated"],
                    "extra": entry.get("extra") or {},
                },
                "audiences": selected,
            }
        ns, sa = entry.get("namespace"), entry.get("serviceAccount")
        if not (ns and sa):
            return {"user": {}, "error": "[invalid bearer token, token lookup failed]"}
        extra: dict[str, list[str]] = {}
        jti = entry.get("jti") or str(uuid.uuid5(uuid.NAMESPACE_URL, "k8semu-jti:" + token))
        extra["authentication.kubernetes.io/credential-id"] = [f"JTI={jti}"]
        if entry.get("podName"):
            if entry.get("checkPod", self.check_pods):
                pod = self.live(R_PODS, ns, entry["podName"])
                if pod is None or pod.get("metadata", {}).get("deletionTimestamp"):
                    return {
                        "user": {},
                        "error": "[invalid bearer token, service account token has been invalidated]",
                    }
                if entry.get("podUID") and pod.get("metadata", {}).get("uid") != entry["podUID"]:
                    return {
                        "user": {},
                        "error": f"[invalid bearer token, pod UID ({pod['metadata'].get('uid')}) does "
                        f"not match service account pod ref claim ({entry['podUID']})]",
                    }
            if entry.get("nodeName"):
                extra["authentication.kubernetes.io/node-name"] = [entry["nodeName"]]
            if entry.get("nodeUID"):
                extra["authentication.kubernetes.io/node-uid"] = [entry["nodeUID"]]
            extra["authentication.kubernetes.io/pod-name"] = [entry["podName"]]
            extra["authentication.kubernetes.io/pod-uid"] = [entry.get("podUID") or ""]
        sa_obj = self.live(R_SA, ns, sa)
        sa_uid = (
            entry.get("serviceAccountUID")
            or (sa_obj or {}).get("metadata", {}).get("uid")
            or str(uuid.uuid5(uuid.NAMESPACE_URL, f"k8semu-sa:{ns}/{sa}"))
        )
        return {
            "authenticated": True,
            "user": {
                "username": f"system:serviceaccount:{ns}:{sa}",
                "uid": sa_uid,
                "groups": [
                    "system:serviceaccounts",
                    f"system:serviceaccounts:{ns}",
                    "system:authenticated",
                ],
                "extra": dict(sorted(extra.items())),
            },
            "audiences": selected,
        }

    @staticmethod
    def _goq(items: list[str]) -> str:
        return "[" + " ".join(json.dumps(i) for i in items) + "]"

    def token_request(self, ns: str, sa: str, body: Any) -> dict:
        """POST serviceaccounts/NAME/token: mint a JWT-shaped token and register it for TokenReview."""
        if not isinstance(body, dict):
            raise bad_request(
                "the body of the request was in an unknown format; the emulator accepts JSON only"
            )
        spec = dict(body.get("spec") or {})
        auds = list(spec.get("audiences") or self.api_audiences)
        seconds = int(spec.get("expirationSeconds") or 3600)
        if seconds < 600:
            raise invalid(
                R_SA,
                sa,
                "spec.expirationSeconds: Invalid value: may not specify a duration less than "
                "10 minutes",
                "TokenRequest",
            )
        sa_obj = self.live(R_SA, ns, sa)
        sa_uid = (sa_obj or {}).get("metadata", {}).get("uid") or str(
            uuid.uuid5(uuid.NAMESPACE_URL, f"k8semu-sa:{ns}/{sa}")
        )
        ref = spec.get("boundObjectRef") or None
        claims_k8s: dict[str, Any] = {
            "namespace": ns,
            "serviceaccount": {"name": sa, "uid": sa_uid},
        }
        entry: dict[str, Any] = {
            "namespace": ns,
            "serviceAccount": sa,
            "serviceAccountUID": sa_uid,
            "audiences": auds,
        }
        if ref and ref.get("kind") == "Pod":
            pod = self.live(R_PODS, ns, ref.get("name"))
            if pod is None:
                raise not_found(R_PODS, ref.get("name"))
            pod_uid = pod["metadata"]["uid"]
            if ref.get("uid") and ref["uid"] != pod_uid:
                raise _err(
                    409,
                    "Conflict",
                    f"the UID in the bound object reference ({ref['uid']}) does not match the "
                    f"UID in record. The object might have been deleted and then recreated",
                )
            ref["uid"] = pod_uid
            claims_k8s["pod"] = {"name": ref["name"], "uid": pod_uid}
            entry.update(podName=ref["name"], podUID=pod_uid, checkPod=True)
            node = pod.get("spec", {}).get("nodeName")
            if node:
                node_obj = self.live(R_NODES, None, node)
                claims_k8s["node"] = {
                    "name": node,
                    "uid": (node_obj or {}).get("metadata", {}).get("uid", ""),
                }
                entry["nodeName"] = node
                if node_obj:
                    entry["nodeUID"] = node_obj["metadata"]["uid"]
        now = datetime.datetime.now(datetime.UTC)
        exp = now + datetime.timedelta(seconds=seconds)
        jti = str(uuid.uuid4())
        claims = {
            "aud": auds,
            "exp": int(exp.timestamp()),
            "iat": int(now.timestamp()),
            "iss": self.api_audiences[0],
            "jti": jti,
            "kubernetes.io": claims_k8s,
            "nbf": int(now.timestamp()),
            "sub": f"system:serviceaccount:{ns}:{sa}",
        }
        b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
        signing_input = (
            b64(json.dumps({"alg": "RS256", "kid": "k8semu"}).encode())
            + "."
            + b64(json.dumps(claims).encode())
        )
        token = (
            signing_input
            + "."
            + b64(hmac.new(self.signing_key, signing_input.encode(), hashlib.sha256).digest())
        )
        entry.update(jti=jti, expirationTimestamp=exp.strftime("%Y-%m-%dT%H:%M:%SZ"))
        self.tokens[token] = entry
        spec.update(audiences=auds, expirationSeconds=seconds, boundObjectRef=ref)
        return {
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": sa, "namespace": ns, "creationTimestamp": None},
            "spec": spec,
            "status": {"token": token, "expirationTimestamp": entry["expirationTimestamp"]},
        }

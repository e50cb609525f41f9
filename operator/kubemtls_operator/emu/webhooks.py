"""Admission webhooks: Mutating then Validating, called on loopback as kube-apiserver calls them."""

from __future__ import annotations

import base64
import ipaddress
import json
import ssl
import uuid

import aiohttp.web
import jsonpatch
import kmock
import yarl

from kubemtls_operator.emu import kmockfix  # noqa: F401  (patches kmock first)
from kubemtls_operator.emu.base import R_MWC, R_NS, R_VWC, _err
from kubemtls_operator.emu.selectors import label_selector_reqs, match_labels


def rule_matches(
    rule: dict, res: kmock.resource, op: str, sub: str | None, namespaced: bool
) -> bool:
    ops, groups, versions = (
        rule.get("operations") or [],
        rule.get("apiGroups") or [],
        rule.get("apiVersions") or [],
    )
    if not ("*" in ops or op in ops) or not ("*" in groups or res.group in groups):
        return False
    if not ("*" in versions or res.version in versions):
        return False
    target = f"{res.plural}/{sub}" if sub else res.plural
    names = rule.get("resources") or []
    if not any(
        n in (target, "*/*")
        or (n == "*" and not sub)
        or (sub and n in (f"{res.plural}/*", f"*/{sub}"))
        for n in names
    ):
        return False
    scope = rule.get("scope", "*")
    return scope == "*" or (scope == "Namespaced") == namespaced


async def call_webhook(wh: dict, review: dict) -> dict:
    cc = wh.get("clientConfig") or {}
    url = cc.get("url")
    if not url:
        raise RuntimeError(
            "clientConfig.service cannot be reached from the emulator; use clientConfig.url"
        )
    host = (yarl.URL(url).host or "").strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise RuntimeError(f"the emulator calls webhooks on loopback addresses only, not {host!r}")
    ctx = (
        ssl.create_default_context(cadata=base64.b64decode(cc["caBundle"]).decode())
        if cc.get("caBundle")
        else ssl.create_default_context()
    )
    timeout = aiohttp.ClientTimeout(total=float(wh.get("timeoutSeconds") or 10))
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(
            url, json=review, ssl=ctx if url.startswith("https") else None
        ) as r:
            if r.status != 200:
                raise RuntimeError(f"expected response code 200, got {r.status}")
            body = await r.json(content_type=None)
    rsp = (body or {}).get("response") or {}
    if rsp.get("uid") != review["request"]["uid"]:
        raise RuntimeError(
            f"expected response.uid={review['request']['uid']!r}, got {rsp.get('uid')!r}"
        )
    return rsp


class AdmissionMixin:
    # ----- admission webhooks (--admission): Mutating then Validating, URL clientConfig on loopback only --
    def webhooks_for(
        self, res: kmock.resource, op: str, sub: str | None
    ) -> list[tuple[str, dict, bool]]:
        if not self.admission:
            return []
        info = self.info(res)
        namespaced = bool(info is not None and info.namespaced)
        found = []
        for cfg_res, mutating in ((R_MWC, True), (R_VWC, False)):
            for (r, _, cfg_name), o in sorted(self.store.items(), key=lambda kv: kv[0][2]):
                if r != cfg_res or o.deleted:
                    continue
                for wh in o.raw.get("webhooks") or []:
                    if any(
                        rule_matches(rule, res, op, sub, namespaced)
                        for rule in wh.get("rules") or []
                    ):
                        found.append((cfg_name, wh, mutating))
        return found

    async def admit(
        self,
        res: kmock.resource,
        op: str,
        obj: dict | None,
        old: dict | None,
        sub: str | None,
        dry_run: bool,
    ) -> dict | None:
        async with self._lock:
            hooks = self.webhooks_for(res, op, sub)
            ref = obj if obj is not None else old or {}
            ns = ref.get("metadata", {}).get("namespace")
            ns_obj = self.live(R_NS, None, ns) if ns else (ref if res == R_NS else None)
        info = self.info(res)
        kind = {"group": res.group, "version": res.version, "kind": self.kind_of(res)}
        resource = {"group": res.group, "version": res.version, "resource": res.plural}
        for mutating_pass in (True, False):
            for cfg_name, wh, mutating in hooks:
                if mutating != mutating_pass:
                    continue
                ns_labels = (ns_obj or {}).get("metadata", {}).get("labels") or {}
                if (info is not None and info.namespaced or res == R_NS) and not match_labels(
                    label_selector_reqs(wh.get("namespaceSelector")), ns_labels
                ):
                    continue
                obj_sel = label_selector_reqs(wh.get("objectSelector"))
                if not any(
                    match_labels(obj_sel, (o or {}).get("metadata", {}).get("labels"))
                    for o in (obj, old)
                    if o is not None
                ):
                    continue
                review = {
                    "apiVersion": "admission.k8s.io/v1",
                    "kind": "AdmissionReview",
                    "request": {
                        "uid": str(uuid.uuid4()),
                        "kind": kind,
                        "resource": resource,
                        "requestKind": kind,
                        "requestResource": resource,
                        **({"subResource": sub, "requestSubResource": sub} if sub else {}),
                        "name": ref.get("metadata", {}).get("name"),
                        "namespace": ns,
                        "operation": op,
                        "userInfo": {
                            "username": "k8semu-admin",
                            "groups": ["system:masters", "system:authenticated"],
                        },
                        "object": obj,
                        "oldObject": old,
                        "dryRun": dry_run,
                        "options": {
                            "apiVersion": "meta.k8s.io/v1",
                            "kind": {"CREATE": "CreateOptions", "UPDATE": "UpdateOptions"}.get(
                                op, "DeleteOptions"
                            ),
                        },
                    },
                }
                try:
                    rsp = await call_webhook(wh, review)
                except Exception as e:
                    if wh.get("failurePolicy", "Fail") == "Ignore":
                        continue
                    raise _err(
                        500,
                        "InternalError",
                        f'Internal error occurred: failed calling webhook "{wh.get("name")}": {e}',
                    )
                if not rsp.get("allowed"):
                    st = rsp.get("status") or {}
                    why = st.get("message") or st.get("reason")
                    msg = f'admission webhook "{wh.get("name")}" denied the request' + (
                        f": {why}" if why else " without explanation"
                    )
                    raise _err(
                        max(int(st.get("code") or 400), 400),
                        st.get("reason") or "",
                        msg,
                        st.get("details"),
                    )
                if mutating and rsp.get("patch") and obj is not None:
                    try:
                        obj = jsonpatch.apply_patch(obj, json.loads(base64.b64decode(rsp["patch"])))
                    except Exception as e:
                        raise _err(
                            500,
                            "InternalError",
                            f'Internal error occurred: webhook "{wh.get("name")}" '
                            f"returned an unusable patch: {e}",
                        )
        return obj

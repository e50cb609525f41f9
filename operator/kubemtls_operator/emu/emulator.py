"""The Emulator: kmock's KubernetesEmulator with the verbs, store, watch and discovery reimplemented."""

from __future__ import annotations

import asyncio
import base64
import collections
import copy
import os
import random
import re
import string
import sys
import traceback
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp.web
import jsonpatch
import kmock
import yaml
from kmock import KubernetesError
from kmock._internal import k8s_dicts

from kubemtls_operator.emu import kmockfix  # (patches kmock first)
from kubemtls_operator.emu.base import (
    ALL_VERBS,
    DEFAULT_NAMESPACES,
    EVENT_LOG_SIZE,
    R_CRD,
    R_NS,
    R_PODS,
    R_SA,
    R_SECRETS,
    _err,
    bad_request,
    conflict,
    dumps,
    gv,
    header,
    invalid,
    method_of,
    not_found,
    now_rfc3339,
    qual,
    version_key,
)
from kubemtls_operator.emu import patching
from kubemtls_operator.emu.fastpath import FastPathMixin
from kubemtls_operator.emu.patching import merge_patch, strategic_merge_patch
from kubemtls_operator.emu.protobuf import PB_KINDS, decode_k8s_protobuf
from kubemtls_operator.emu.reviews import ReviewsMixin
from kubemtls_operator.emu.selectors import match_fields, match_labels, parse_label_selector
from kubemtls_operator.emu.sidechannel import SideChannelMixin
from kubemtls_operator.emu.tables import TablesMixin
from kubemtls_operator.emu.webhooks import AdmissionMixin


_dumps = dumps  # (base.dumps: the fast path writes the same JSON)


# ---------------------------------------------------------------------------------------------
class Emulator(
    FastPathMixin,
    TablesMixin,
    AdmissionMixin,
    ReviewsMixin,
    SideChannelMixin,
    kmock.KubernetesEmulator,
):
    """kmock's KubernetesEmulator with the verbs reimplemented closer to a real kube-apiserver."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.rv = 100
        self.tokens: dict[str, dict] = {}
        self.initial_tokens: dict[str, dict] = {}
        self.api_audiences: list[str] = ["https://kubernetes.default.svc.cluster.local"]
        self.server_version = "1.36.0"
        self.check_pods = False
        self.latency: list[tuple[re.Pattern, float]] = []  # POST /_emu/latency: slow requests
        self.admission = False
        self.verbose = False
        self.columns: dict[kmock.resource, list[dict]] = {}  # CRD printer columns per resource
        self.crd_status_resources: set[kmock.resource] = set()
        self._known: dict[kmock.resource, kmock.ResourceInfo] = {}  # info()'s memory
        self.watchers: dict[kmock.resource, set[asyncio.Queue]] = collections.defaultdict(set)
        self.events: dict[kmock.resource, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=EVENT_LOG_SIZE)
        )
        self.events_dropped: dict[kmock.resource, int] = collections.defaultdict(int)
        self.request_log: collections.deque = collections.deque(maxlen=2000)
        self.signing_key = os.urandom(32)
        self._encoded: dict[int, tuple[dict, bytes]] = {}  # FastPathMixin.encoded()

    # ----- the store ------------------------------------------------------------------------
    @property
    def store(self) -> dict:
        return (
            self._objects._objects
        )  # (resource, namespace|None, name) -> kmock Object (with history)

    def next_rv(self) -> str:
        # rv is no attrs field: kmock's attrs __setattr__ (a Python call per write) would only
        # pass it on to object.__setattr__.
        rv = self.rv + 1
        object.__setattr__(self, "rv", rv)
        return str(rv)

    def info(self, res: kmock.resource) -> kmock.ResourceInfo | None:
        # kmock's own lookup parses the key on every call: known resources are remembered
        # (register_crd / unregister_crd drop the memory).
        try:
            return self._known[res]
        except KeyError:
            pass
        info = self._resources[res] if res in self._resources else None
        if info is not None:
            self._known[res] = info
        return info

    def kind_of(self, res: kmock.resource) -> str:
        info = self.info(res)
        return info.kind if info is not None and info.kind else str(res.plural)

    def live(self, res: kmock.resource, ns: str | None, name: str) -> dict | None:
        obj = self.store.get((res, ns, name))
        if obj is None:
            return None
        # What ``None if obj.deleted else obj.raw`` gives, in 3 of kmock's Python calls, not ~12:
        # deleted means an empty history or a soft-deletion marker (None) last; else the last
        # version is the latest state.
        try:
            last = obj.history[-1]
        except IndexError:
            return None
        return None if last is None else last.raw

    def emit(self, res: kmock.resource, etype: str, obj: dict) -> None:
        rv = int(obj.get("metadata", {}).get("resourceVersion") or self.rv)
        event = {"type": etype, "object": obj}
        log = self.events[res]
        if len(log) == log.maxlen:
            self.events_dropped[res] = log[0][0]
        log.append((rv, event))
        for q in list(self.watchers[res]):
            q.put_nowait(event)

    def put(self, res: kmock.resource, ns: str | None, name: str, obj: dict) -> None:
        """Store a new version (ADDED or MODIFIED follows from the previous state) and notify watchers.

        The event carries ``obj`` itself, not a copy: a stored version is never changed in place
        (every write builds a new object: ``merge_patch``, ``jcopy``, ``copy.deepcopy``, or, for
        a status write, old's unchanged parts with a new metadata dict and status), and nothing
        changes ``obj`` after it is stored, so the event, the store and older versions may share
        parts of it.
        """
        key = (res, ns, name)
        cur = self.store.get(key)
        etype = "ADDED" if cur is None or cur.deleted else "MODIFIED"
        if cur is None:
            self.store[key] = k8s_dicts.Object(obj)
        else:
            # What cur.create(obj) stores, in one ObjectVersion (kmock's create wraps obj in one,
            # then its history wraps that in another: two copies of the top-level dict).
            versions = getattr(cur.history, "_ObjectHistory__items", None)
            if type(versions) is list:
                versions.append(k8s_dicts.ObjectVersion(obj))
                if len(versions) > 20:
                    del versions[:-10]
            else:  # another kmock than 0.8
                cur.create(obj)
                if len(cur.history) > 20:
                    del cur.history[:-10]
        self.emit(res, etype, obj)

    def remove(self, res: kmock.resource, ns: str | None, name: str) -> dict:
        """Final deletion: a DELETED event, then GC of dependents and of a CRD's resources."""
        cur = self.store[(res, ns, name)]
        obj = patching.jcopy(cur.raw)
        obj.setdefault("metadata", {})["resourceVersion"] = self.next_rv()
        cur.delete()
        self.emit(res, "DELETED", obj)
        self.collect_garbage(obj.get("metadata", {}).get("uid"))
        if res == R_CRD:
            self.unregister_crd(obj)
        elif res == R_NS:
            for (r, n, nm), o in list(self.store.items()):
                if n == name and not o.deleted:
                    self.delete_obj(r, n, nm)
        return obj

    def delete_obj(
        self,
        res: kmock.resource,
        ns: str | None,
        name: str,
        preconditions: dict | None = None,
        dry_run: bool = False,
    ) -> dict:
        obj = self.live(res, ns, name)
        if obj is None:
            raise not_found(res, name)
        meta = obj.get("metadata", {})
        for field in ("uid", "resourceVersion"):
            if (preconditions or {}).get(field) and preconditions[field] != meta.get(field):
                raise conflict(res, name)
        if dry_run:
            return obj
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                obj = copy.deepcopy(obj)
                obj["metadata"].update(
                    deletionTimestamp=now_rfc3339(),
                    deletionGracePeriodSeconds=0,
                    resourceVersion=self.next_rv(),
                )
                self.put(res, ns, name, obj)
            return obj
        return self.remove(res, ns, name)

    def collect_garbage(self, gone_uid: str | None) -> None:
        """ownerReferences GC (background propagation): dependents of a removed owner go once all owners are gone."""
        if not gone_uid:
            return
        dependents = [
            key
            for key, o in self.store.items()
            if not o.deleted
            and any(
                ref.get("uid") == gone_uid
                for ref in o.raw.get("metadata", {}).get("ownerReferences") or []
            )
        ]
        if not dependents:
            return
        uids = {o.raw.get("metadata", {}).get("uid") for o in self.store.values() if not o.deleted}
        for key in dependents:
            obj = self.live(*key)
            if obj is not None and not any(
                ref.get("uid") in uids for ref in obj["metadata"].get("ownerReferences") or []
            ):
                self.delete_obj(*key)

    # ----- resources & CRDs -------------------------------------------------------------------
    def register_crd(self, crd: dict, dry_run: bool = False) -> list[kmock.resource]:
        spec = crd.get("spec", {})
        names = spec.get("names", {})
        group, plural, kind = spec.get("group"), names.get("plural"), names.get("kind")
        if not (group and plural and kind and spec.get("versions")):
            raise invalid(
                R_CRD,
                crd.get("metadata", {}).get("name"),
                "spec.group, spec.names.plural, spec.names.kind and spec.versions are required",
                "CustomResourceDefinition",
            )
        result = []
        for v in spec.get("versions") or []:
            if not v.get("served", True):
                continue
            res = kmockfix.intern(kmock.resource(group, v["name"], plural))
            result.append(res)
            if dry_run:
                continue
            subs = {
                s
                for s in ("status", "scale")
                if s in (v.get("subresources") or spec.get("subresources") or {})
            }
            self._known.clear()
            self._resources[res] = kmock.ResourceInfo(
                kind=kind,
                singular=names.get("singular") or kind.lower(),
                namespaced=spec.get("scope") != "Cluster",
                shortnames=set(names.get("shortNames") or []),
                categories=set(names.get("categories") or []),
                subresources=subs,
                verbs=set(ALL_VERBS),
            )
            cols = (
                v.get("additionalPrinterColumns")
                or spec.get("additionalPrinterColumns")
                or [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
            )
            self.columns[res] = cols
            if "status" in subs:
                self.crd_status_resources.add(res)
            else:
                self.crd_status_resources.discard(res)
        return result

    def unregister_crd(self, crd: dict) -> None:
        spec = crd.get("spec", {})
        for v in spec.get("versions") or []:
            res = kmock.resource(
                spec.get("group"), v.get("name"), spec.get("names", {}).get("plural")
            )
            for (r, n, nm), o in list(self.store.items()):
                if r == res and not o.deleted:
                    self.remove(r, n, nm)
            self._known.clear()
            if res in self._resources:
                del self._resources[res]
            self.columns.pop(res, None)
            self.crd_status_resources.discard(res)

    def crd_with_status(self, crd: dict) -> dict:
        crd = copy.deepcopy(crd)
        names = crd.get("spec", {}).get("names", {})
        crd["status"] = {
            "acceptedNames": names,
            "storedVersions": [
                v["name"] for v in crd.get("spec", {}).get("versions", []) if v.get("storage")
            ],
            "conditions": [
                {
                    "type": "NamesAccepted",
                    "status": "True",
                    "reason": "NoConflicts",
                    "message": "no conflicts found",
                    "lastTransitionTime": now_rfc3339(),
                },
                {
                    "type": "Established",
                    "status": "True",
                    "reason": "InitialNamesAccepted",
                    "message": "the initial names have been accepted",
                    "lastTransitionTime": now_rfc3339(),
                },
            ],
        }
        return crd

    def seed(self, crds: list[dict]) -> None:
        for name in DEFAULT_NAMESPACES:
            self.create_obj(
                R_NS, None, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
            )
        for crd in crds:
            self.create_obj(R_CRD, None, crd)

    # ----- verbs ------------------------------------------------------------------------------
    def create_obj(
        self, res: kmock.resource, ns: str | None, body: Any, dry_run: bool = False
    ) -> dict:
        return self.commit_create(res, self.prepare_create(res, ns, body), dry_run)

    def commit_create(self, res: kmock.resource, obj: dict, dry_run: bool = False) -> dict:
        meta = obj["metadata"]
        ns, name = meta.get("namespace"), meta["name"]
        if self.live(res, ns, name) is not None:
            raise _err(
                409,
                "AlreadyExists",
                f'{qual(res)} "{name}" already exists',
                {"name": name, "group": res.group, "kind": res.plural},
            )
        if dry_run:
            return obj
        if res == R_CRD:
            self.register_crd(obj)
        meta["resourceVersion"] = self.next_rv()
        self.put(res, ns, name, obj)
        return obj

    def prepare_create(self, res: kmock.resource, ns: str | None, body: Any) -> dict:
        info = self.info(res)
        if not isinstance(body, dict):
            raise bad_request(
                "the body of the request was in an unknown format; the emulator accepts JSON only"
            )
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(
                random.choices(string.ascii_lowercase + string.digits, k=5)
            )
        name = meta.get("name")
        if not name:
            raise invalid(
                res,
                None,
                "metadata.name: Required value: name or generateName is required",
                info.kind if info else None,
            )
        if info is not None and info.namespaced:
            if ns and meta.get("namespace") and meta["namespace"] != ns:
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            ns = ns or meta.get("namespace") or "default"
            meta["namespace"] = ns
        else:
            ns = None
            meta.pop("namespace", None)
        if self.live(res, ns, name) is not None:
            raise _err(
                409,
                "AlreadyExists",
                f'{qual(res)} "{name}" already exists',
                {"name": name, "group": res.group, "kind": res.plural},
            )
        obj.setdefault("apiVersion", gv(res))
        if info is not None and info.kind:
            obj.setdefault("kind", info.kind)
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"):
            meta.pop(field, None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(), generation=1)
        if res in self.crd_status_resources:
            obj.pop("status", None)
        self.normalize(res, obj)
        if res == R_CRD:
            obj = self.crd_with_status(obj)
            self.register_crd(
                obj, dry_run=True
            )  # raises on a malformed CRD before anything is stored
        elif res == R_NS:
            obj.setdefault("status", {}).setdefault("phase", "Active")
        elif res == R_PODS:
            obj.setdefault("status", {}).setdefault("phase", "Pending")
        return obj

    def normalize(self, res: kmock.resource, obj: dict) -> None:
        if res == R_NS and obj.get("metadata", {}).get("name"):
            labels = obj["metadata"].get("labels") or {}
            obj["metadata"]["labels"] = {
                **labels,
                "kubernetes.io/metadata.name": obj["metadata"]["name"],
            }
        if res == R_SECRETS and isinstance(obj.get("stringData"), dict):  # as the apiserver does
            data = obj.setdefault("data", {})
            for k, v in obj.pop("stringData").items():
                data[k] = base64.b64encode(str(v).encode()).decode()

    def update_obj(
        self,
        res: kmock.resource,
        ns: str | None,
        name: str,
        new: dict,
        old: dict,
        subresource: str | None,
        dry_run: bool = False,
    ) -> dict:
        """Apply the apiserver's rules to a computed new state (PATCH and PUT end here)."""
        info = self.info(res)
        has_status = info is not None and "status" in info.subresources
        if subresource == "status" and not has_status:
            raise _err(404, "NotFound", "the server could not find the requested resource")
        settled = False
        if subresource == "status":  # old's everything but .status from new
            # Shared with old, not copied (see put()); metadata is changed below: a shallow copy.
            status = new.get("status")
            new = {k: status if k == "status" else v for k, v in old.items()}
            new.setdefault("status", status)
            if isinstance(new.get("metadata"), dict):
                new["metadata"] = dict(new["metadata"])
                # The rules below (up to the resourceVersion) would leave this new as it is:
                # its metadata and every field but .status are old's, so no field to restore
                # and no generation bump; only a Namespace's normalize() rebuilds a dict.
                settled = res != R_NS
            if new["status"] is None:
                del new["status"]
        elif subresource not in (None, ""):
            raise _err(
                404, "NotFound", f"the server could not find the requested resource ({subresource})"
            )
        elif has_status:  # the main resource ignores .status when a status subresource exists
            if "status" in old:
                new["status"] = patching.jcopy(old["status"])
            else:
                new.pop("status", None)
        if settled:
            meta = new["metadata"]
        else:
            meta = self.apply_update_rules(res, name, new, old, has_status)
        if dry_run:
            return new
        meta["resourceVersion"] = self.next_rv()
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self.store[(res, ns, name)].create(new)
            return self.remove(res, ns, name)
        self.put(res, ns, name, new)
        if res == R_CRD:
            self.register_crd(new)
        return new

    def apply_update_rules(
        self, res: kmock.resource, name: str, new: dict, old: dict, has_status: bool
    ) -> dict:
        """update_obj's rules for new's metadata and generation (changes new); its metadata."""
        meta, old_meta = new.setdefault("metadata", {}), old.get("metadata", {})
        if not isinstance(meta, dict):
            raise invalid(res, name, "metadata: Invalid value", self.kind_of(res))
        for field in (
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ):
            if field in old_meta:
                meta[field] = old_meta[field]
            else:
                meta.pop(field, None)
        for field in ("apiVersion", "kind"):
            if field in old and not new.get(field):
                new[field] = old[field]
        self.normalize(res, new)
        skip = {"metadata", "status"} if has_status else {"metadata"}
        if {k: v for k, v in new.items() if k not in skip} != {
            k: v for k, v in old.items() if k not in skip
        }:
            meta["generation"] = int(old_meta.get("generation") or 1) + 1
        return meta

    def check_rv(self, res: kmock.resource, name: str, body: Any, old: dict) -> None:
        want = (
            body.get("metadata", {}).get("resourceVersion")
            if isinstance(body, dict) and isinstance(body.get("metadata"), dict)
            else None
        )
        if want and str(want) != str(old.get("metadata", {}).get("resourceVersion")):
            raise conflict(res, name)

    # ----- HTTP dispatch ----------------------------------------------------------------------
    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # kmock keeps every request; keep memory bounded, a few at a time: dropping 2,500 at once
        # stalled the loop for 30-50 ms every 5 s at 500 writes/s (bench/signing_bench.py).
        if len(self._requests) > 256:
            del self._requests[:128]
        return await self.logged(
            method_of(request),
            request.url.path_qs,
            request.url.path,
            lambda: self._dispatch(request),
        )

    async def logged(
        self,
        method: str,
        path_qs: str,
        path: str,
        serve: Callable[[], Awaitable[aiohttp.web.StreamResponse]],
    ) -> aiohttp.web.StreamResponse:
        """``serve()`` inside what every request gets: its ``request_log`` entry, ``latency``
        injection, the ``--verbose`` line (kmock's path and the fast path alike)."""
        if self._errors and len(self._errors[-1]) > 1000:
            del self._errors[-1][:500]
        entry = {"method": method, "path": path_qs, "status": None}
        self.request_log.append(entry)
        try:
            for pattern, seconds in self.latency:
                if pattern.search(f"{method} {path}"):
                    await asyncio.sleep(seconds)
                    break
            response = await serve()
            entry["status"] = response.status
            return response
        except KubernetesError as e:
            entry["status"] = e.status
            raise
        except Exception:
            entry["status"] = 500
            traceback.print_exc(file=sys.stderr)
            raise
        finally:
            if self.verbose:
                print(
                    f"k8semu: {entry['method']} {entry['path']} -> {entry['status']}",
                    file=sys.stderr,
                    flush=True,
                )

    async def _dispatch(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        path, method = request.url.path, method_of(request)
        if path.startswith("/_emu/"):
            return await self.side_channel(request, path, method)
        if path in ("/healthz", "/livez", "/readyz"):
            return aiohttp.web.Response(text="ok")
        if path == "/openapi/v2" and method == "GET":
            # An empty schema: kubectl's client-side validation then skips every kind (no --validate=false needed).
            if "protobuf" in header(request, "Accept"):
                return aiohttp.web.Response(
                    body=b"",
                    content_type="application/com.github.proto-openapi.spec.v2.v1.0+protobuf",
                )
            return self.respond(
                {
                    "swagger": "2.0",
                    "info": {"title": "k8semu", "version": "v1"},
                    "paths": {},
                    "definitions": {},
                }
            )
        if path.startswith("/openapi/"):
            raise _err(404, "NotFound", "the emulator serves no OpenAPI v3 schema")
        res = request.resource
        if res is None or res.plural is None or res.version is None:
            return await super()._handle(request)  # discovery: /api, /apis, /version, ...
        info = self.info(res)
        if info is None and res not in self._get_resources():
            raise _err(404, "NotFound", "the server could not find the requested resource")
        ctype = header(request, "Content-Type").split(";")[0].strip().lower()
        data = request.data
        if method in ("POST", "PUT", "PATCH") and "protobuf" in ctype:
            try:
                data = decode_k8s_protobuf(request.body)
            except (KeyError, ValueError, IndexError, UnicodeDecodeError) as e:
                raise _err(
                    415,
                    "UnsupportedMediaType",
                    f"the emulator decodes protobuf only for {', '.join(PB_KINDS)} (got {e!s}); send JSON, "
                    "e.g. `kubectl create ... --dry-run=client -o yaml | kubectl apply -f -`",
                )
        dry_run = request.params.get("dryRun") == "All"
        ns, name, sub = request.namespace, request.name, request.subresource

        if method == "POST" and name is None and res.plural.endswith("reviews"):
            return self.review(request, res, data)
        if method == "GET" and request.params.get("watch") in ("true", "1"):
            return await self.watch(request, res, ns, name)
        if method == "GET" and name is None:
            return self.respond(await self.list_(request, res, ns))
        if method == "GET":
            async with self._lock:
                obj = self.live(res, ns, name)
            if obj is None or sub not in (None, "status", "scale"):
                raise not_found(res, name)
            return self.respond(
                self.table(request, res, [obj]) if self.wants_table(request) else obj
            )
        if method == "POST" and name is None:
            async with self._lock:
                obj = self.prepare_create(res, ns, data)
                if not self.webhooks_for(res, "CREATE", None):
                    return self.respond(self.commit_create(res, obj, dry_run), 201)
            obj = await self.admit(res, "CREATE", obj, None, None, dry_run)
            async with self._lock:
                return self.respond(self.commit_create(res, obj, dry_run), 201)
        if method == "POST" and res == R_SA and sub == "token":
            async with self._lock:
                return self.respond(self.token_request(ns, name, data), 201)
        if method == "POST" and res == R_PODS and sub == "eviction":
            async with self._lock:
                self.delete_obj(res, ns, name)
            return self.respond(
                {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}, 201
            )
        if method == "PUT" and name is not None:
            body = data
            if not isinstance(body, dict):
                raise bad_request(
                    "the body of the request was in an unknown format; the emulator accepts JSON only"
                )

            def replace(old: dict) -> dict:
                self.check_rv(res, name, body, old)
                return copy.deepcopy(body)

            return self.respond(await self.update_via(res, ns, name, sub, replace, dry_run))
        if method == "PATCH" and name is not None:
            return self.respond(
                *await self.patch(request, data, res, ns, name, sub, ctype, dry_run)
            )
        if method == "DELETE" and name is not None:
            body = request.data if isinstance(request.data, dict) else {}
            async with self._lock:
                old = self.live(res, ns, name)
                if old is None:
                    raise not_found(res, name)
                hooked = bool(self.webhooks_for(res, "DELETE", None))
                if not hooked:
                    return self.respond(
                        self.delete_obj(res, ns, name, body.get("preconditions"), dry_run)
                    )
            await self.admit(res, "DELETE", None, old, None, dry_run)
            async with self._lock:
                return self.respond(
                    self.delete_obj(res, ns, name, body.get("preconditions"), dry_run)
                )
        if method == "DELETE":  # deletecollection
            objs = await self.list_(request, res, ns, raw=True)
            async with self._lock:
                for o in objs:
                    m = o.get("metadata", {})
                    if self.live(res, m.get("namespace"), m.get("name")) is not None:
                        self.delete_obj(res, m.get("namespace"), m["name"], dry_run=dry_run)
            return self.respond(
                {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
            )
        raise _err(
            405, "MethodNotAllowed", f"{method} is not supported on this resource by the emulator"
        )

    def respond(self, payload: Any, status: int = 200) -> aiohttp.web.Response:
        return aiohttp.web.Response(
            body=_dumps(payload), status=status, content_type="application/json"
        )

    async def patch(
        self, request, body, res, ns, name, sub, ctype, dry_run, owned: bool = False
    ) -> tuple[dict, int]:
        """``owned``: ``body`` was parsed for this call alone (the fast path): a status merge
        keeps its values instead of copying them."""
        if ctype == "application/apply-patch+yaml" and body is None:
            try:
                body = yaml.safe_load(request.text)
            except yaml.YAMLError as e:
                raise bad_request(f"invalid YAML: {e}")
        if ctype == "application/apply-patch+yaml" and sub is None:
            async with self._lock:
                exists = self.live(res, ns, name) is not None
            if not exists:  # server-side apply creates
                async with self._lock:
                    obj = self.prepare_create(res, ns, body)
                obj = await self.admit(res, "CREATE", obj, None, None, dry_run)
                async with self._lock:
                    return self.commit_create(res, obj, dry_run), 201

        def compute(old: dict) -> dict:
            try:
                if ctype == "application/json-patch+json":
                    if not isinstance(body, list):
                        raise bad_request("a JSON patch must be a list of operations")
                    new = jsonpatch.apply_patch(patching.jcopy(old), body)
                elif ctype in (
                    "application/merge-patch+json",
                    "application/strategic-merge-patch+json",
                    "application/apply-patch+yaml",
                    "application/json",
                    "",
                ):
                    if not isinstance(body, dict):
                        raise bad_request("the patch body must be a JSON object")
                    self.check_rv(res, name, body, old)
                    if ctype == "application/strategic-merge-patch+json":
                        new = strategic_merge_patch(old, body)
                    elif sub == "status":
                        # update_obj keeps only .status of a status write: merge just that
                        # (what merge_patch(old, body)["status"] is, without copying the rest;
                        # old's untouched parts are shared: a stored version never changes).
                        new = {
                            "status": patching.merge_patch_shared(
                                old.get("status"), body["status"], owned
                            )
                            if "status" in body
                            else old.get("status")
                        }
                    else:
                        new = merge_patch(old, body)
                else:
                    raise _err(
                        415,
                        "UnsupportedMediaType",
                        f"the patch content type {ctype!r} is not supported",
                    )
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                raise invalid(
                    res, name, f"the JSON patch could not be applied: {e}", self.kind_of(res)
                )
            if not isinstance(new, dict):
                raise invalid(res, name, "the patched object is not an object", self.kind_of(res))
            return new

        return await self.update_via(res, ns, name, sub, compute, dry_run), 200

    async def update_via(self, res, ns, name, sub, compute, dry_run) -> dict:
        """PATCH/PUT: atomic when no webhook applies; else admit outside the lock and re-apply on a race."""
        async with self._lock:
            old = self.live(res, ns, name)
            if old is None:
                raise not_found(res, name)
            new = compute(old)
            if not self.webhooks_for(res, "UPDATE", sub):
                return self.update_obj(res, ns, name, new, old, sub, dry_run)
        for _ in range(10):
            prepared = self.update_obj(res, ns, name, new, old, sub, dry_run=True)
            admitted = await self.admit(res, "UPDATE", prepared, old, sub, dry_run)
            async with self._lock:
                cur = self.live(res, ns, name)
                if cur is None:
                    raise not_found(res, name)
                if cur.get("metadata", {}).get("resourceVersion") == old.get("metadata", {}).get(
                    "resourceVersion"
                ):
                    return self.update_obj(res, ns, name, admitted, old, sub, dry_run)
                old, new = (
                    cur,
                    compute(cur),
                )  # someone else won the race: redo the patch on the fresh state
        raise conflict(res, name)

    async def list_(self, request, res, ns, raw: bool = False) -> Any:
        sel = parse_label_selector(request.params.get("labelSelector", ""))
        fsel = request.params.get("fieldSelector", "")
        async with self._lock:
            objs = [
                o.raw
                for (r, n, _), o in self.store.items()
                if r == res and not o.deleted and (ns is None or n == ns)
            ]
            rv = str(self.rv)
        objs = [
            o
            for o in objs
            if match_labels(sel, o.get("metadata", {}).get("labels")) and match_fields(fsel, o)
        ]
        objs.sort(
            key=lambda o: (
                o.get("metadata", {}).get("namespace") or "",
                o.get("metadata", {}).get("name"),
            )
        )
        if raw:
            return objs
        if self.wants_table(request):
            return self.table(request, res, objs, rv)
        info = self.info(res)
        kind = info.kind if info is not None and info.kind else res.plural.capitalize()
        return {
            "kind": f"{kind}List",
            "apiVersion": gv(res),
            "metadata": {"resourceVersion": rv},
            "items": objs,
        }

    # ----- watch ------------------------------------------------------------------------------
    async def watch(self, request, res, ns, name) -> aiohttp.web.StreamResponse:
        params = request.params
        sel = parse_label_selector(params.get("labelSelector", ""))
        fsel = params.get("fieldSelector", "")
        as_table = self.wants_table(request)
        since = params.get("resourceVersion") or ""
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None

        def wanted(event: dict) -> bool:
            o = event.get("object", {})
            m = o.get("metadata", {})
            return (
                (ns is None or m.get("namespace") == ns)
                and (name is None or m.get("name") == name)
                and match_labels(sel, m.get("labels"))
                and match_fields(fsel, o)
            )

        queue: asyncio.Queue = asyncio.Queue()
        async with self._lock:  # snapshot and subscribe atomically: no event is lost or doubled
            if since in ("", "0"):
                initial = [
                    {"type": "ADDED", "object": patching.jcopy(o.raw)}
                    for (r, _, _), o in self.store.items()
                    if r == res and not o.deleted
                ]
            elif since.isdigit() and int(since) >= self.events_dropped[res]:
                initial = [e for rv, e in self.events[res] if rv > int(since)]
            else:
                initial = None
            current_rv = str(self.rv)
            self.watchers[res].add(queue)
        response = aiohttp.web.StreamResponse(
            status=200, headers={"Content-Type": "application/json"}
        )

        def line(event: dict) -> bytes:
            if as_table and event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                event = {
                    "type": event["type"],
                    "object": self.table(request, res, [event["object"]]),
                }
            elif len(event) == 2 and (obj := self.encoded(event.get("object"))) is not None:
                # The object a status patch just answered with: its JSON, not serialised again
                # (what _dumps(event) gives: {"type":...,"object":...}, compact).
                return b'{"type":"%s","object":%s}\n' % (event["type"].encode(), obj)
            return _dumps(event) + b"\n"

        async def send(event: dict) -> None:
            await response.write(line(event))

        try:
            await response.prepare(request._raw_request)
            if (
                initial is None
            ):  # the client's resourceVersion is older than the event log: 410 Gone
                await send(
                    {
                        "type": "ERROR",
                        "object": {
                            "kind": "Status",
                            "apiVersion": "v1",
                            "metadata": {},
                            "status": "Failure",
                            "code": 410,
                            "reason": "Expired",
                            "message": f"too old resource version: {since} ({self.events_dropped[res]})",
                        },
                    }
                )
            else:
                lines: list[bytes] = []
                for event in initial:  # in writes of up to 100 events
                    if wanted(event):
                        lines.append(line(event))
                        if len(lines) >= 100:
                            await response.write(b"".join(lines))
                            lines = []
                if lines:
                    await response.write(b"".join(lines))
                if params.get("sendInitialEvents") == "true":
                    info = self.info(res)
                    await send(
                        {
                            "type": "BOOKMARK",
                            "object": {
                                "kind": info.kind if info is not None else "",
                                "apiVersion": gv(res),
                                "metadata": {
                                    "resourceVersion": current_rv,
                                    "annotations": {"k8s.io/initial-events-end": "true"},
                                },
                            },
                        }
                    )
                try:
                    async with asyncio.timeout(
                        timeout
                    ):  # ?timeoutSeconds= ends the stream, as a real server does
                        while (
                            event := await queue.get()
                        ) is not None:  # None: the server is stopping
                            # What is queued already goes out in one write (one send(), not
                            # one per event: under load, several writes land per loop turn).
                            batch = [event]
                            while batch[-1] is not None and not queue.empty():
                                batch.append(queue.get_nowait())
                            lines = [line(e) for e in batch if e is not None and wanted(e)]
                            if lines:
                                await response.write(b"".join(lines))
                            if batch[-1] is None:
                                break
                except TimeoutError:
                    pass
            await response.write_eof()
        except ConnectionError:
            pass
        finally:
            self.watchers[res].discard(queue)
        return response

    def close_watches(self) -> None:
        for queues in self.watchers.values():
            for q in queues:
                q.put_nowait(None)

    # ----- discovery fixes (kubectl needs them; kopf does not care) ---------------------------
    async def _serve_version(self, request):
        result = await super()._serve_version(request)
        result["groupVersion"] = result["groupVersion"].lstrip("/")
        for r in result["resources"]:
            if "/" in r["name"]:
                r.update(
                    singularName="",
                    shortNames=[],
                    categories=[],
                    verbs=["get", "patch", "update"]
                    if r["name"].split("/")[1] in ("status", "scale")
                    else ["create"],
                )
            if r.get("namespaced") is None:
                r["namespaced"] = False
        result["resources"].sort(key=lambda r: r["name"])
        return result

    async def _serve_apis(self, request):
        result = await super()._serve_apis(request)
        for g in result["groups"]:
            g["versions"].sort(key=lambda v: version_key(v["version"]), reverse=True)
            g["preferredVersion"] = g["versions"][0]
        result["groups"].sort(key=lambda g: g["name"])
        return result

    async def _serve_group(self, request):
        result = await super()._serve_group(request)
        result["versions"].sort(key=lambda v: version_key(v["version"]), reverse=True)
        result["preferredVersion"] = result["versions"][0]
        return result

    async def _serve_server_version(self, request):
        result = await super()._serve_server_version(request)
        major, minor, *_ = (self.server_version.lstrip("v") + ".0.0").split(".")
        result.update(
            major=major,
            minor=minor,
            gitVersion=f"v{self.server_version.lstrip('v')}",
            gitCommit="0000000000000000000000000000000000000000",
            buildDate="2025-01-01T00:00:00Z",
            goVersion="go1.24.0",
        )
        return result

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if isinstance(exc, KubernetesError):
            return aiohttp.web.json_response(
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Failure",
                    "message": exc.message or "",
                    "reason": exc.reason or "",
                    "details": exc.details or {},
                    "code": exc.status,
                },
                status=exc.status,
            )
        return await super()._render_error(exc)

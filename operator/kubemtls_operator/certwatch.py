"""The operator's own cache of MTLSCerts (list + watch), and revocation requests from it.

Every certificate the signing API issues is one status write on an MTLSCert, and each write
comes back as a watch event. kopf processed each of them in full (its index, per-object
state, handler filters: ~14 % of the operator's CPU per certificate), so MTLSCerts are not
kopf's any more: here an event costs one JSON parse and one :class:`sweeper.CertRecord`.

The cache follows kube-apiserver's list/watch contract (client-go's reflector): list, then
watch from the list's resourceVersion with bookmarks; a stream that ends is resumed from the
last resourceVersion seen; 410 Gone (or any ERROR event) means relist; failures back off.
:attr:`Cache.synced` is set after the first list (as kopf filled its indexes before
handlers ran). Records serve the sweeper, ``GET /v1/trust`` and CA retirement.

An object carrying ``kubemtls.io/revoke`` (on any ADDED/MODIFIED event, the initial list
included) starts ``act`` (``handlers.certs.revoke_requested``) for it: one run per object
at a time, on the object read afresh (a stale event finds the annotation gone and does
nothing), retried with backoff until it succeeds (``act`` raises :class:`Later` when another
replica is the one to do it). A restart mid-way lists the annotated object again and
converges: every step of ``act`` is idempotent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from kubemtls_sidecar import contract

from kubemtls_operator import errors, kube, memory, naming, sweeper

__all__ = ["Cache", "Later"]

logger = logging.getLogger(__name__)

Key = tuple[str, str]
Obj = dict[str, Any]

#: Every MTLSCert in the cluster (the operator watches all namespaces, as kopf did with -A).
PATH = f"/apis/{naming.CRD_API_VERSION}/{contract.CRD_PLURAL}"
#: Server-side length of one watch stream (kopf's ``settings.watching.server_timeout``).
WATCH_SECONDS = 300
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0


class _Relist(Exception):
    """The watch cannot resume (410 Gone, an ERROR event): list again."""


class Later(Exception):
    """Raised by ``act``: not now, nothing failed (another replica does it); ask again."""

    def __init__(self, message: str, *, delay: float = 5.0) -> None:
        super().__init__(message)
        self.delay = delay


class Cache:
    """MTLSCerts by (namespace, name), kept current by one list + watch loop (:meth:`run`)."""

    def __init__(
        self,
        client: kube.Client,
        act: Callable[[Obj], Awaitable[None]] | None = None,
        *,
        path: str = PATH,
        watch_seconds: int = WATCH_SECONDS,
    ) -> None:
        self.client = client
        #: What to do with an object that asks for revocation (its fresh body).
        self.act = act
        self.path = path
        self.watch_seconds = watch_seconds
        self.records: dict[Key, sweeper.CertRecord] = {}
        self.synced = asyncio.Event()
        self._rv = ""
        self._running: dict[Key, asyncio.Task[None]] = {}
        self._again: set[Key] = set()

    def get(self, namespace: str, name: str) -> sweeper.CertRecord | None:
        return self.records.get((namespace, name))

    def values(self) -> list[sweeper.CertRecord]:
        return list(self.records.values())

    # --- list + watch ----------------------------------------------------------------------
    async def run(self) -> None:
        """List, then watch, forever (cancel to stop; revocations in flight stop too)."""
        delay = BACKOFF_MIN
        try:
            while True:
                try:
                    if not self._rv:
                        await self._list()
                    await self.client.watch(
                        self.path,
                        self._on_event,
                        resource_version=self._rv,
                        timeout_seconds=self.watch_seconds,
                    )
                    delay = BACKOFF_MIN  # the stream ended normally: resume from self._rv
                    continue
                except _Relist as e:
                    logger.info("MTLSCert watch: %s; listing again", e)
                    self._rv = ""
                except errors.APIError as e:
                    if e.status == 410:
                        self._rv = ""
                    logger.warning("MTLSCert list/watch failed (%s); again in %.1fs", e, delay)
                except Exception:  # a surprise (a malformed object?): start over from a list
                    logger.exception("MTLSCert list/watch crashed; listing again in %.1fs", delay)
                    self._rv = ""
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        finally:
            tasks = list(self._running.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _list(self) -> None:
        data = await self.client.request("GET", self.path)
        records: dict[Key, sweeper.CertRecord] = {}
        items = data.get("items") or []
        for obj in items:
            records[_key(obj)] = sweeper.CertRecord.from_body(obj)
        self.records = records
        self._rv = str((data.get("metadata") or {}).get("resourceVersion") or "")
        first = not self.synced.is_set()
        self.synced.set()
        for obj in items:
            self._maybe_act(obj)
        del data, items
        if first and records:
            memory.trim()  # the list's JSON is garbage now: give its heap back

    def _on_event(self, event: Obj) -> None:
        type_, obj = event.get("type"), event.get("object") or {}
        if type_ == "ERROR":
            raise _Relist(f"{obj.get('code', '')} {obj.get('reason', '')} {obj.get('message', '')}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if type_ == "BOOKMARK":
            if rv:
                self._rv = rv
            return
        key = _key(obj)
        if type_ == "DELETED":
            self.records.pop(key, None)
        elif type_ in ("ADDED", "MODIFIED"):
            self.records[key] = sweeper.CertRecord.from_body(obj)
            self._maybe_act(obj)
        if rv:
            self._rv = rv

    # --- revocation requests ---------------------------------------------------------------
    def _maybe_act(self, obj: Obj) -> None:
        if self.act is None or contract.ANN_REVOKE not in (
            obj["metadata"].get("annotations") or {}
        ):
            return
        key = _key(obj)
        if key in self._running:
            self._again.add(key)  # the run looks again once it is done
            return
        self._running[key] = asyncio.create_task(self._act(key), name=f"revoke {key[0]}/{key[1]}")

    async def _act(self, key: Key) -> None:
        """Run ``act`` on the object as it is now, until it succeeds (one run per object)."""
        assert self.act is not None
        delay = BACKOFF_MIN
        try:
            while True:
                self._again.discard(key)
                try:
                    obj = await self.client.get_mtlscert(*key)
                    if obj is not None and contract.ANN_REVOKE in (
                        obj["metadata"].get("annotations") or {}
                    ):
                        await self.act(obj)
                except Exception as e:  # retried, as kopf retried a failed handler
                    wait = max(delay, float(getattr(e, "delay", None) or 0))
                    logger.log(
                        logging.DEBUG if isinstance(e, Later) else logging.WARNING,
                        "revocation of MTLSCert %s/%s: %s; again in %.1fs",
                        *key,
                        e or type(e).__name__,
                        wait,
                    )
                    await asyncio.sleep(wait)
                    delay = min(delay * 2, BACKOFF_MAX)
                    continue
                if key not in self._again:
                    return
        finally:
            self._running.pop(key, None)


def _key(obj: Obj) -> Key:
    meta = obj["metadata"]
    return meta.get("namespace") or "", meta["name"]

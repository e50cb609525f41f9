"""The MTLSCert cache (``certwatch``): list + watch against the emulated API server, relist
on 410 Gone, revocation requests run once per object and retried; kopf watches no MTLSCert."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from typing import Any

import kmock
import kopf
import pytest
from kubemtls_operator import certwatch, errors, kube, naming
from kubemtls_sidecar import contract
from operatorkit import Api, OperatorHandle, _issued, _until, make_csr, ready_pod, sign
from testkit import eventually

MTLSCERTS = kmock.resource(contract.CRD_GROUP, contract.CRD_VERSION, contract.CRD_PLURAL)


def _body(name: str, ns: str = "default", **annotations: str) -> dict[str, Any]:
    return {
        "apiVersion": naming.CRD_API_VERSION,
        "kind": "MTLSCert",
        "metadata": {"name": name, "namespace": ns, "annotations": annotations},
        "spec": {"podName": name, "podUID": f"uid-{name}", "serviceAccount": "app"},
    }


@pytest.fixture
async def client(k8s: Any) -> AsyncIterator[kube.Client]:
    c = kube.Client(kopf.ConnectionInfo(server=k8s.url))
    yield c
    await c.close()


async def _running(cache: certwatch.Cache) -> asyncio.Task[None]:
    task = asyncio.create_task(cache.run())
    await asyncio.wait_for(cache.synced.wait(), 10)
    return task


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_the_cache_lists_then_follows_every_change(client: kube.Client) -> None:
    await client.create(naming.mtlscerts_path("default"), _body("a"))
    await client.create(naming.mtlscerts_path("ehr"), _body("b", "ehr"))
    await client.patch_mtlscert_status("ehr", "b", {"serial": "1f", "phase": "Issued"})
    cache = certwatch.Cache(client)
    assert cache.get("ehr", "b") is None
    task = await _running(cache)
    try:
        b = cache.get("ehr", "b")
        assert b is not None
        assert (b.view.serial, b.phase) == ("1f", "Issued")
        assert {(r.namespace, r.name) for r in cache.values()} == {("default", "a"), ("ehr", "b")}

        await client.create(naming.mtlscerts_path("default"), _body("c"))
        await client.patch_mtlscert_status("default", "a", {"serial": "2a", "phase": "Issued"})
        await client.delete(naming.mtlscerts_path("ehr", "b"))

        def followed() -> bool:
            a = cache.get("default", "a")
            names = {(r.namespace, r.name) for r in cache.values()}
            return (
                a is not None
                and a.view.serial == "2a"
                and names
                == {
                    ("default", "a"),
                    ("default", "c"),
                }
            )

        await eventually(followed)
    finally:
        await _stop(task)


async def test_a_resource_version_too_old_means_a_relist(client: kube.Client, k8s: Any) -> None:
    for name in ("keep", "gone"):
        await client.create(naming.mtlscerts_path("default"), _body(name))
    cache = certwatch.Cache(client)
    await _stop(await _running(cache))  # the cache now holds a resourceVersion to resume from
    stale = cache._rv
    # More writes than the server keeps events for, and a deletion among them.
    for start in range(0, 2050, 50):
        await asyncio.gather(
            *(
                client.patch_mtlscert_status("default", "keep", {"serial": f"{i:x}"})
                for i in range(start, start + 50)
            )
        )
    await client.delete(naming.mtlscerts_path("default", "gone"))
    assert int(stale) < k8s.emulator.events_dropped[MTLSCERTS]

    task = asyncio.create_task(cache.run())
    try:

        def relisted() -> bool:
            keep = cache.get("default", "keep")
            return (
                keep is not None
                and cache.get("default", "gone") is None
                and int(keep.view.serial, 16) >= 2000
            )

        await eventually(relisted)
        assert int(cache._rv) > int(stale)
    finally:
        await _stop(task)


async def test_a_revocation_request_runs_once_at_a_time_and_is_retried(
    client: kube.Client,
) -> None:
    calls: list[dict[str, Any]] = []
    active: list[int] = []
    path = naming.mtlscerts_path("default", "r")

    async def act(obj: dict[str, Any]) -> None:
        calls.append(obj)
        active.append(1)
        try:
            assert len(active) == 1  # never two runs for one object at a time
            # Our own write while running (a status write, the annotation still there).
            await client.patch_mtlscert_status("default", "r", {"phase": f"run{len(calls)}"})
            if len(calls) == 1:
                raise errors.APIError("the API failed", delay=0.1)
            await client.merge_patch(
                path, {"metadata": {"annotations": {contract.ANN_REVOKE: None}}}
            )
        finally:
            active.pop()

    cache = certwatch.Cache(client, act)
    task = await _running(cache)
    try:
        await client.create(naming.mtlscerts_path("default"), _body("r"))
        await client.merge_patch(
            path, {"metadata": {"annotations": {contract.ANN_REVOKE: "keyCompromise"}}}
        )

        async def removed() -> bool:
            obj = await client.get(path)
            return contract.ANN_REVOKE not in (obj["metadata"].get("annotations") or {})

        await eventually(removed)
        await eventually(lambda: not cache._running)
        # The failed run was retried; the events of its own writes found the annotation
        # gone and ran nothing more.
        assert len(calls) == 2
        assert all(c["metadata"]["annotations"][contract.ANN_REVOKE] for c in calls)
        assert calls[1]["status"]["phase"] == "run1"  # read afresh, not the event's body
    finally:
        await _stop(task)


async def test_an_annotated_mtlscert_found_at_start_is_revoked(
    api: Api, start_operator: Any
) -> None:
    first: OperatorHandle = await start_operator()
    token, ca_pem = await ready_pod(api, "late-0")
    code, _ = await sign(first, ca_pem, token, {"csr": make_csr()[1]})
    assert code == 200
    await _until(lambda: _issued(api, "late-0"))
    await first.stop()
    # Annotated while no operator runs (or one stopped mid-way): the next one's list sees it.
    path = "/apis/kubemtls.io/v1alpha1/namespaces/default/mtlscerts/late-0"
    await api.patch(path, {"metadata": {"annotations": {contract.ANN_REVOKE: "superseded"}}})
    await start_operator()

    async def revoked() -> Any:
        cert = await api.mtlscert("late-0")
        anns = cert["metadata"].get("annotations") or {}
        st = cert.get("status") or {}
        return st.get("phase") == "Revoked" and contract.ANN_REVOKE not in anns

    await _until(revoked)


async def test_kopf_does_not_watch_mtlscerts(operator: OperatorHandle, k8s: Any) -> None:
    from kubemtls_operator import handlers  # noqa: F401 - registers them

    registry = kopf.get_default_registry()
    resource = kopf.Resource(
        contract.CRD_GROUP, contract.CRD_VERSION, contract.CRD_PLURAL, namespaced=True
    )
    for kind in (registry._indexing, registry._watching, registry._changing, registry._spawning):
        assert not [h for h in kind.get_all_handlers() if h.selector and h.selector.check(resource)]
    # One watcher of MTLSCerts on the server: the operator's cache (kopf's would be a second).
    pods = kmock.resource("", "v1", "pods")
    await eventually(lambda: len(k8s.emulator.watchers[pods]) >= 1)  # kopf is watching
    await eventually(lambda: len(k8s.emulator.watchers[MTLSCERTS]) == 1)
    await asyncio.sleep(0)
    assert len(k8s.emulator.watchers[MTLSCERTS]) == 1


def test_with_peering_only_the_top_live_replica_revokes() -> None:
    from kubemtls_operator.handlers import certs

    now = datetime.datetime(2026, 11, 26, 4, 0, tzinfo=datetime.UTC)
    fresh, stale = now.isoformat(), (now - datetime.timedelta(seconds=61)).isoformat()
    peers = {
        "a@host/1": {"priority": 100, "lifetime": 60, "lastseen": fresh},
        "b@host/2": {"priority": 200, "lifetime": 60, "lastseen": fresh},
    }
    assert certs.active_replica(peers, 200, now)
    assert not certs.active_replica(peers, 100, now)
    peers["b@host/2"]["lastseen"] = stale  # the top one stopped: the next one takes over
    assert certs.active_replica(peers, 100, now)
    assert certs.active_replica({}, 100, now)


async def test_a_stream_that_ends_is_resumed_without_a_relist(
    client: kube.Client, k8s: Any
) -> None:
    await client.create(naming.mtlscerts_path("default"), _body("w"))
    cache = certwatch.Cache(client, watch_seconds=1)
    task = await _running(cache)
    path = certwatch.PATH

    def requests() -> tuple[list[str], list[str]]:
        log = [r["path"] for r in k8s.emulator.request_log if r["path"].startswith(path)]
        return [p for p in log if "watch=true" not in p], [p for p in log if "watch=true" in p]

    try:
        await eventually(lambda: len(requests()[1]) >= 3, timeout=10)  # two streams ended
        await client.patch_mtlscert_status("default", "w", {"serial": "ab"})

        def seen() -> bool:
            w = cache.get("default", "w")
            return w is not None and w.view.serial == "ab"

        await eventually(seen)
        lists, watches = requests()
        assert len(lists) == 1
        assert all("resourceVersion=" in w and "allowWatchBookmarks=true" in w for w in watches)
        assert "resourceVersion=&" not in "".join(watches)
    finally:
        await _stop(task)

"""The emulated API server's cheaper request paths answer as the plain ones did.

The emulator (``kubemtls_operator.emu``) is the backbone of the operator and chart tests; its
per-request cost was cut for the signing benchmark (``bench/emulator_bench.py``): uvloop in the
process, kmock's request parse replaced (orjson, remembered path parses), a status write that
merges only ``.status`` and shares the unchanged parts of the old version, watch events without
copies and sent in batches. These tests pin what must not change: the loop flag, numbers JSON
keeps exactly, status writes that ignore everything but ``.status``, and a watch that sees each
write once, in order, with stored versions and logged events never changed afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import subprocess
import sys
from typing import Any

import aiohttp
import kmock
import pytest
from kubemtls_operator import naming
from kubemtls_sidecar import contract
from testkit import CRD_FILE, eventually

MTLSCERTS = kmock.resource(contract.CRD_GROUP, contract.CRD_VERSION, contract.CRD_PLURAL)


def json_of(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _cert(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": naming.CRD_API_VERSION,
        "kind": contract.CRD_KIND,
        "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
        "spec": {"podName": name, "podUID": f"uid-{name}", "serviceAccount": "app", **spec},
    }


async def _call(
    s: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    ctype: str = "application/json",
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": ctype} if body is not None else {}
    async with s.request(method, url, data=data, headers=headers) as r:
        raw = await r.read()
        answers.append(raw)
        return r.status, json.loads(raw)  # stdlib json: exact integers


answers: list[bytes] = []  # every answer's body, for byte-level comparisons


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_the_emulator_process_runs_on_the_loop_asked_for(
    tmp_path: pathlib.Path, loop: str
) -> None:
    ready, log = tmp_path / "url", tmp_path / "emu.log"
    argv = [sys.executable, "-m", "kubemtls_operator.emu", "--port", "0", "--crd", str(CRD_FILE)]
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [*argv, "--ready-file", str(ready), "--loop", loop],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        await eventually(lambda: ready.exists() and ready.read_text().strip(), timeout=30)
        assert f"loop {loop}" in log.read_text()
        base = ready.read_text().split()[0]
        async with aiohttp.ClientSession() as s:
            path = base + naming.mtlscerts_path("default")
            status, made = await _call(s, "POST", path, _cert("p1"))
            assert status == 201
            rv = made["metadata"]["resourceVersion"]
            patch = {"metadata": {"resourceVersion": rv}, "status": {"serial": "01"}}
            url = f"{path}/p1/status"
            status, done = await _call(s, "PATCH", url, patch, "application/merge-patch+json")
            assert status == 200
            assert done["status"] == {"serial": "01"}
            status, stale = await _call(s, "PATCH", url, patch, "application/merge-patch+json")
            assert status == 409
            assert stale["reason"] == "Conflict"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


async def test_numbers_keep_what_json_gives(k8s: Any) -> None:
    """orjson turns integers beyond 64 bits into floats: such bodies take the json path."""
    spec = {
        "big": 123456789012345678901234567890,
        "u64": 18446744073709551615,
        "beyond": 18446744073709551616,
        "negative": -9223372036854775809,
        "float": 1.5,
        "text": "ünïcode 1234567890123456789012 in a string",
    }
    async with aiohttp.ClientSession() as s:
        path = k8s.url + naming.mtlscerts_path("default")
        status, made = await _call(s, "POST", path, _cert("n1", **spec))
        assert status == 201
        status, got = await _call(s, "GET", f"{path}/n1")
        assert status == 200
    for obj in (made, got):
        assert {k: obj["spec"][k] for k in spec} == spec
        assert type(obj["spec"]["beyond"]) is int


async def test_kmock_request_list_stays_short(k8s: Any) -> None:
    """kmock keeps every request it served; the emulator drops the oldest a few at a time
    (dropping thousands at once stalled its loop for 30-50 ms), and its own log stays whole."""
    async with aiohttp.ClientSession() as s:
        path = k8s.url + naming.mtlscerts_path("default")
        assert (await _call(s, "POST", path, _cert("kept")))[0] == 201
        lengths = []
        for _ in range(700):
            assert (await _call(s, "GET", f"{path}/kept"))[0] == 200
            lengths.append(len(k8s.emulator._requests))
    assert max(lengths) <= 257
    assert min(lengths[-300:]) >= 128  # trimmed by halves, not emptied
    gets = [r for r in k8s.emulator.request_log if r["path"].endswith("/kept")]
    assert len(gets) >= 700
    assert all(r["status"] == 200 for r in gets)


async def test_status_writes_and_the_watch_under_concurrent_writers(k8s: Any) -> None:
    names, rounds = ["w0", "w1", "w2"], 12
    answers.clear()
    seen: list[dict[str, Any]] = []
    lines: list[bytes] = []
    async with aiohttp.ClientSession() as s:
        path = k8s.url + naming.mtlscerts_path("default")
        rvs = {}
        for name in names:
            status, made = await _call(s, "POST", path, _cert(name, dnsNames=[f"{name}.svc"]))
            assert status == 201
            rvs[name] = made["metadata"]["resourceVersion"]
        originals = {n: (await _call(s, "GET", f"{path}/{n}"))[1] for n in names}

        async def watch() -> None:
            params = {"watch": "true", "resourceVersion": max(rvs.values(), key=int)}
            async with s.get(path, params=params) as r:
                async for line in r.content:
                    lines.append(line)
                    seen.append(json.loads(line))

        watcher = asyncio.create_task(watch())
        await eventually(lambda: len(k8s.emulator.watchers[MTLSCERTS]) == 1)

        async def writer(name: str) -> None:
            for i in range(rounds):
                patch = {
                    "metadata": {"resourceVersion": rvs[name], "labels": {"app": "changed"}},
                    "spec": {"podName": "changed"},
                    "status": {"serial": f"{name}-{i}", "conditions": [{"type": "Ready"}]},
                }
                if i == rounds - 1:
                    patch["status"] = {"serial": None, "phase": "Done"}
                status, obj = await _call(
                    s, "PATCH", f"{path}/{name}/status", patch, "application/merge-patch+json"
                )
                assert status == 200, obj
                rvs[name] = obj["metadata"]["resourceVersion"]

        await asyncio.gather(*(writer(n) for n in names))
        await eventually(lambda: len(seen) == len(names) * rounds)
        watcher.cancel()
        finals = {n: (await _call(s, "GET", f"{path}/{n}"))[1] for n in names}

    # Each write once, in resourceVersion order; each event line is the write's answer, as
    # kube-apiserver frames it (compact JSON, one line per event).
    for line, event in zip(lines, seen, strict=True):
        assert b'{"type":"MODIFIED","object":' + json_of(event["object"]) + b"}\n" == line
        assert json_of(event["object"]) in answers
    event_rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in seen]
    assert event_rvs == sorted(set(event_rvs))
    assert {e["type"] for e in seen} == {"MODIFIED"}
    for name in names:
        mine = [e["object"] for e in seen if e["object"]["metadata"]["name"] == name]
        assert [o["status"].get("serial") for o in mine] == [
            *(f"{name}-{i}" for i in range(rounds - 1)),
            None,
        ]
        assert mine[-1]["status"] == {"phase": "Done", "conditions": [{"type": "Ready"}]}
        assert mine[-1] == finals[name]
        for obj in mine:  # only .status changes through /status
            assert obj["spec"] == originals[name]["spec"]
            assert obj["metadata"]["labels"] == {"app": name}
            assert obj["metadata"]["generation"] == originals[name]["metadata"]["generation"]
    # The logged events (kept for watches that resume) and the stored versions still hold
    # what each write made: later writes share their unchanged parts but change none of them.
    logged = [e for rv, e in k8s.emulator.events[MTLSCERTS] if rv >= event_rvs[0]]
    assert [e["object"] for e in logged] == [e["object"] for e in seen]
    for name in names:
        history = k8s.emulator.store[(MTLSCERTS, "default", name)].history
        stored = [dict(v.raw) for v in history if v is not None]
        assert stored[-1] == finals[name]
        assert (
            stored[0]["metadata"]["resourceVersion"]
            == originals[name]["metadata"]["resourceVersion"]
        )
        assert "status" not in stored[0]


def _same_but_names(a: Any, b: Any, names: tuple[str, str]) -> bool:
    """Equal once b's object name (and the podUID named after it) is a's."""
    text_a, text_b = json.dumps(a, sort_keys=True), json.dumps(b, sort_keys=True)
    return text_a == text_b.replace(names[1], names[0])


async def test_the_direct_status_patch_answers_as_the_general_path(k8s: Any) -> None:
    """A plain status merge patch (Content-Type exactly application/merge-patch+json, no query)
    skips kmock's request parse (emu/fastpath.py); with a charset parameter the same request
    takes kmock's path. Both give the same answers, 409s and 404s, log lines and watch lines,
    and a null in the patch removes the field in both."""
    fast, general = "application/merge-patch+json", "application/merge-patch+json; charset=utf-8"
    emu = k8s.emulator
    lines: list[bytes] = []
    async with aiohttp.ClientSession() as s:
        path = k8s.url + naming.mtlscerts_path("default")
        made = {}
        for name in ("fp-a", "fp-b"):
            status, made[name] = await _call(s, "POST", path, _cert(name))
            assert status == 201

        async def watch() -> None:
            params = {
                "watch": "true",
                "resourceVersion": made["fp-b"]["metadata"]["resourceVersion"],
            }
            async with s.get(path, params=params) as r:
                async for line in r.content:
                    lines.append(line)

        watcher = asyncio.create_task(watch())
        await eventually(lambda: len(emu.watchers[MTLSCERTS]) == 1)
        rvs = {n: o["metadata"]["resourceVersion"] for n, o in made.items()}
        results: dict[str, list[tuple[int, Any]]] = {"fp-a": [], "fp-b": []}
        steps = [
            {"status": {"serial": "01", "conditions": [{"type": "Ready"}], "x": {"a": 1, "b": 2}}},
            {"status": {"serial": None, "x": {"a": None, "c": [1, None]}}},
            {"status": {"phase": "Done"}, "spec": {"podName": "ignored"}},
        ]
        for step in steps:
            for name, ctype in (("fp-a", fast), ("fp-b", general)):
                body = {"metadata": {"resourceVersion": rvs[name]}, **step}
                out = await _call(s, "PATCH", f"{path}/{name}/status", body, ctype)
                assert out[0] == 200, out
                rvs[name] = out[1]["metadata"]["resourceVersion"]
                results[name].append(out)
        for name, ctype in (("fp-a", fast), ("fp-b", general)):
            stale = {"metadata": {"resourceVersion": made[name]["metadata"]["resourceVersion"]}}
            results[name].append(
                await _call(s, "PATCH", f"{path}/{name}/status", {**stale, "status": {}}, ctype)
            )
            results[name].append(
                await _call(s, "PATCH", f"{path}/{name}-gone/status", {"status": {}}, ctype)
            )
        await eventually(lambda: len(lines) == 2 * len(steps))
        watcher.cancel()

    for (sa, a), (sb, b) in zip(results["fp-a"], results["fp-b"], strict=True):
        assert sa == sb
        for obj in (a, b):
            obj.get("metadata", {}).pop("resourceVersion", None)
            obj.get("metadata", {}).pop("creationTimestamp", None)
            obj.get("metadata", {}).pop("uid", None)
        assert _same_but_names(a, b, ("fp-a", "fp-b")), (a, b)
    codes = [code for code, _ in results["fp-a"]]
    assert codes == [200, 200, 200, 409, 404]
    final = results["fp-a"][2][1]
    assert final["status"] == {
        "conditions": [{"type": "Ready"}],
        "x": {"b": 2, "c": [1, None]},
        "phase": "Done",
    }
    assert final["spec"]["podName"] == "fp-a"
    for name in ("fp-a", "fp-b"):  # one log line each, with the status code
        logged = [r["status"] for r in emu.request_log if f"/{name}/" in r["path"]]
        assert logged == [200, 200, 200, 409]
        assert [r["status"] for r in emu.request_log if f"/{name}-gone/" in r["path"]] == [404]
    # Only the general path's requests went through kmock (its request list).
    through_kmock = [str(r.url.path) for r in emu._requests]
    assert not [p for p in through_kmock if "/fp-a" in p]
    assert len([p for p in through_kmock if "/fp-b" in p and p.endswith("/status")]) == 5
    # Watch lines: compact JSON of each answer, for both paths alike.
    for line in lines:
        event = json.loads(line)
        assert line == b'{"type":"MODIFIED","object":' + json_of(event["object"]) + b"}\n"


async def test_the_direct_status_patch_keeps_latency_injection(k8s: Any) -> None:
    async with aiohttp.ClientSession() as s:
        path = k8s.url + naming.mtlscerts_path("default")
        status, made = await _call(s, "POST", path, _cert("slow"))
        assert status == 201
        slow = {"pattern": "^PATCH .*/slow/status$", "seconds": 0.3}
        assert (await _call(s, "POST", k8s.url + "/_emu/latency", slow))[0] == 200
        body = {"metadata": {"resourceVersion": made["metadata"]["resourceVersion"]}}
        loop = asyncio.get_running_loop()
        started = loop.time()
        status, done = await _call(
            s,
            "PATCH",
            f"{path}/slow/status",
            {**body, "status": {"serial": "02"}},
            "application/merge-patch+json",
        )
        assert status == 200
        assert done["status"] == {"serial": "02"}
        assert loop.time() - started >= 0.3

"""MTLSCert status writes through the real client against the emulated API server."""

from __future__ import annotations

from typing import Any

import kopf
from kubemtls_operator import kube, naming


def _body(name: str) -> dict[str, Any]:
    return {
        "apiVersion": naming.CRD_API_VERSION,
        "kind": "MTLSCert",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"podName": name, "podUID": f"uid-{name}", "serviceAccount": "app"},
    }


async def test_the_create_body_is_built_only_when_the_object_is_missing(k8s: Any) -> None:
    client = kube.Client(kopf.ConnectionInfo(server=k8s.url))
    built: list[str] = []

    def body() -> dict[str, Any]:
        built.append("x")
        return _body("c1")

    try:
        first = await client.update_mtlscert_status(
            "default", "c1", lambda obj: {"serial": "1"}, create=body
        )
        assert first is not None
        assert first["status"]["serial"] == "1"
        assert built == ["x"]
        again = await client.update_mtlscert_status(
            "default", "c1", lambda obj: {"serial": "2"}, create=body
        )
        assert again is not None
        assert again["status"]["serial"] == "2"
        assert built == ["x"]
    finally:
        await client.close()


async def test_a_remembered_write_is_a_starting_point_never_an_answer(k8s: Any) -> None:
    client = kube.Client(kopf.ConnectionInfo(server=k8s.url))
    try:
        await client.create(naming.mtlscerts_path("default"), _body("c2"))
        written = await client.update_mtlscert_status(
            "default", "c2", lambda obj: {"serial": "1", "rotations": 1}
        )
        assert written is not None
        seen: list[dict[str, Any]] = []

        def increment(obj: dict[str, Any]) -> dict[str, Any]:
            seen.append(obj)
            return {"rotations": int(obj["status"]["rotations"]) + 1}

        # The next write starts from what was written (no GET), and computes on its status.
        after = await client.update_mtlscert_status("default", "c2", increment)
        assert after is not None
        assert after["status"]["rotations"] == 2
        assert seen[0]["metadata"]["resourceVersion"] == written["metadata"]["resourceVersion"]
        # "Nothing to change" on a remembered (slim) copy: the caller still gets the object.
        same = await client.update_mtlscert_status("default", "c2", lambda obj: None)
        assert same is not None
        assert same["spec"]["podName"] == "c2"
        assert same["metadata"]["resourceVersion"] == after["metadata"]["resourceVersion"]
    finally:
        await client.close()

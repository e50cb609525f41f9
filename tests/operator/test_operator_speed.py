"""What keeps the operator's event loop cheap: kopf's diff base is skipped only when no
handler could read it; the start-up heap is out of the garbage collector's sight."""

from __future__ import annotations

import datetime
import gc
from typing import Any

import kopf
from kubemtls_operator import kopfsettings, recorder, status, workload
from operatorkit import OperatorHandle


def _body() -> kopf.Body:
    return kopf.Body(
        {
            "apiVersion": "kubemtls.io/v1alpha1",
            "kind": "MTLSCert",
            "metadata": {
                "name": "p",
                "namespace": "ehr",
                "annotations": {"kubemtls.io/revoke": "keyCompromise"},
            },
            "spec": {"podName": "p"},
            "status": {"serial": "1f", "phase": "Issued"},
        }
    )


def _only_indexes_and_events() -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.index("kubemtls.io", "v1alpha1", "mtlscerts", registry=registry)
    def idx(name: str, **_: Any) -> dict[str, str]:
        return {name: name}

    @kopf.on.event("kubemtls.io", "v1alpha1", "mtlscerts", registry=registry)
    def ev(**_: Any) -> None:
        pass

    return registry


def test_without_change_handlers_no_essence_is_built() -> None:
    registry = _only_indexes_and_events()
    assert not kopfsettings.diffs_needed(registry)
    storage = kopfsettings.StatuslessDiffBase(registry)
    assert storage.build(body=_body()) is None
    assert storage.fetch(body=_body()) is None


def test_the_operators_own_handlers_need_no_diff_base() -> None:
    from kubemtls_operator import handlers  # noqa: F401 - registers them

    assert not kopfsettings.diffs_needed(kopf.get_default_registry())


def test_a_change_handler_or_a_timer_brings_the_diff_base_back() -> None:
    kopfs = kopf.AnnotationsDiffBaseStorage()
    for decorate in (
        lambda r: kopf.on.update("kubemtls.io", "v1alpha1", "mtlscerts", registry=r),
        lambda r: kopf.on.field(
            "kubemtls.io", "v1alpha1", "mtlscerts", field="spec.podName", registry=r
        ),
        lambda r: kopf.timer("kubemtls.io", "v1alpha1", "mtlscerts", interval=60, registry=r),
    ):
        registry = _only_indexes_and_events()
        decorate(registry)(lambda **_: None)
        assert kopfsettings.diffs_needed(registry)
        storage = kopfsettings.StatuslessDiffBase(registry)
        assert storage.build(body=_body()) == kopfs.build(body=_body())
        assert storage.fetch(body=_body()) == kopfs.fetch(body=_body())


def test_apply_installs_it() -> None:
    settings = kopf.OperatorSettings()
    kopfsettings.apply(settings, _only_indexes_and_events())
    storage = settings.persistence.diffbase_storage
    assert isinstance(storage, kopfsettings.StatuslessDiffBase)
    assert storage.build(body=_body()) is None


async def test_the_start_up_heap_is_frozen_once_the_operator_runs(operator: OperatorHandle) -> None:
    assert gc.get_freeze_count() > 10_000


def test_the_recorder_evaluates_what_the_status_will_say() -> None:
    now = datetime.datetime(2026, 11, 26, 1, 2, 3, 456789, tzinfo=datetime.UTC)
    pod = workload.facts({"metadata": {"namespace": "ehr", "name": "p", "uid": "u1"}})
    issued = recorder.Issuance(
        pod,
        "1f",
        "CN=kubemtls",
        "AB:CD",
        now,
        now + datetime.timedelta(hours=24, microseconds=7),
        now + datetime.timedelta(hours=16),
    )
    assert issued.view() == status.CertView.from_status(issued.status_fields())

"""Startup and cleanup: settings, the API client, the CA, the servers → ``memo``.

The config object goes to ``memo.config`` (the webhook handler reads it), every
long-lived part to ``memo.runtime`` (``wiring.Runtime``). Peering: standalone unless
PEERING names a peering object; each replica takes a random priority, since kopf freezes
replicas of equal priority and has no leader election.
"""

from __future__ import annotations

import gc
import logging
import random
from typing import Any

import kopf

from kubemtls_operator import admissionserver, config, kopfsettings, kube, wiring
from kubemtls_operator.handlers import certs

__all__ = ["operator_cleanup", "operator_login", "operator_startup"]


@kopf.on.login()
def operator_login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo | None:
    """In-cluster, else KUBECONFIG (see ``kube.login``)."""
    return kube.login(settings)


@kopf.on.startup(backoff=2.0)
async def operator_startup(
    settings: kopf.OperatorSettings,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **kwargs: Any,
) -> None:
    """Config → memo; the CA, servers and loops → memo.runtime; kopf's webhook server."""
    cfg = memo.get("config") or config.from_environ()  # __main__ passes flags in memo
    memo.config = cfg
    settings.peering.name = cfg.peering or settings.peering.name
    settings.peering.standalone = not cfg.peering
    settings.peering.priority = random.randint(1, 2**31)  # noqa: S311 - not a secret
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    # Bursts of pods: bound the per-object workers kopf keeps (memory), and let idle ones go.
    settings.queueing.worker_limit = 256
    settings.queueing.idle_timeout = 1.0
    kopfsettings.apply(settings)  # cheaper per-event processing (see the module)
    client = kube.Client.from_login(settings)
    rt = await wiring.start(
        cfg,
        pods=kwargs["pod_index"],
        client=client,
        revoke=certs.revoke_requested,
        peering_priority=settings.peering.priority if cfg.peering else None,
    )
    memo.runtime = rt
    settings.admission.server = admissionserver.WebhookServer(
        addr=cfg.bind_address,
        port=cfg.webhook_port,
        host=rt.serving.host,
        certfile=str(rt.serving.certfile),
        pkeyfile=str(rt.serving.keyfile),
        cafile=str(rt.serving.cafile),
    )
    if cfg.webhook_managed:
        settings.admission.managed = cfg.webhook_config
    peering = (
        f"peering {cfg.peering!r} with priority {settings.peering.priority}"
        if cfg.peering
        else "standalone"
    )
    _settle_heap()
    logger.info(
        f"kubemtls operator started (signer on :{cfg.signer_port}, webhook on "
        f":{cfg.webhook_port}, {peering})"
    )


def _settle_heap() -> None:
    """Move everything built at start-up (modules, kopf, the CA, the servers: ~90k objects)
    out of the garbage collector's sight: a full collection otherwise walks all of it, a
    stall of the event loop (every signing request waits) of 50-90 ms of CPU each time,
    against 15-30 ms for what is left (bench/signing_bench.py, 2026-11-26). Once per process
    (an operator started again in the same process, as in tests, finds it done; a freeze
    made earlier elsewhere, before start-up, does not count).
    Thresholds stay CPython's: a 10x larger young generation saved ~25 % of the collector's
    CPU but made each young collection a 20-25 ms stall."""
    if _heap_settled:
        return
    gc.collect()
    gc.freeze()
    _heap_settled.append(True)


_heap_settled: list[bool] = []  # a module-level flag without ``global``


@kopf.on.cleanup()
async def operator_cleanup(memo: kopf.Memo, **_: Any) -> None:
    rt = memo.get("runtime")
    if rt is not None:
        await rt.stop()

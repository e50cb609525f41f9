"""The operator's long-lived parts, built and started together in kopf's event loop.

``handlers/lifecycle.py`` calls :func:`start` on kopf's startup and :meth:`Runtime.stop`
on cleanup; the handlers reach the parts through ``memo.runtime``. Here: the API client,
the CA manager and its loop, the trust publisher, the signing API (HTTPS), metrics and
health endpoints, the recorder, the MTLSCert cache (``certwatch``: our own list + watch,
not kopf's) and sweeper, and the serving certificate that the signing API and kopf's
webhook server share.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web

from kubemtls_operator import (
    ca,
    certwatch,
    config,
    errors,
    kube,
    memory,
    metrics,
    recorder,
    rollover,
    serving,
    signing,
    signworkers,
    status,
    sweeper,
    tokens,
    trust,
    workload,
)

__all__ = ["Runtime", "start"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Runtime:
    cfg: config.Config
    client: kube.Client
    cas: ca.Manager
    publisher: trust.Publisher
    recorder: recorder.Recorder
    reviewer: tokens.Reviewer
    checker: sweeper.Sweeper
    serving: serving.ServingCert
    pods: Any  # the kopf index: (ns, name) → [PodFacts]
    certs: certwatch.Cache  # (ns, name) → CertRecord, and revocation requests
    #: This replica's kopf peering priority (None: standalone); revocation runs on the top one.
    peering_priority: int | None = None
    runners: list[web.AppRunner] = dataclasses.field(default_factory=list)
    #: The signing worker processes (SIGNING_WORKERS > 0), else None: signing in process.
    pool: signworkers.Pool | None = None
    tasks: list[asyncio.Task[None]] = dataclasses.field(default_factory=list)
    #: pod UIDs whose MTLSCert is known to exist and be current (saves API calls).
    seen: set[str] = dataclasses.field(default_factory=set)
    #: Opted-in pods running without the sidecar, as (namespace, name): the metric's count.
    not_injected: set[tuple[str, str]] = dataclasses.field(default_factory=set)

    def forget(self, pod: workload.PodFacts) -> None:
        """A pod is gone: drop what this replica remembers about it."""
        self.seen.discard(pod.uid)
        self.note_injected(pod)
        self.recorder.latest.pop((pod.namespace, pod.name), None)
        metrics.forget_cert(pod.namespace, pod.name)

    def note_injected(self, pod: workload.PodFacts, injected: bool = True) -> None:
        """Track an opted-in pod that runs without the sidecar (``injected=False``)."""
        key = (pod.namespace, pod.name)
        if injected:
            self.not_injected.discard(key)
        else:
            self.not_injected.add(key)
        metrics.PODS_NOT_INJECTED.set(len(self.not_injected))

    async def lookup_pod(self, namespace: str, name: str) -> workload.PodFacts | None:
        """From the kopf index; on a miss (the watch may lag a fresh pod), from the API."""
        for facts in self.pods.get((namespace, name), ()):
            return facts  # type: ignore[no-any-return]
        body = await self.client.get_pod(namespace, name)
        return workload.facts(body) if body is not None else None

    def cert_status(self, namespace: str, name: str) -> status.CertView | None:
        rec = self.certs.get(namespace, name)
        return rec.view if rec is not None else None

    def cert_records(self) -> Iterable[sweeper.CertRecord]:
        return self.certs.values()

    def live_issuers(self) -> frozenset[str]:
        now = datetime.datetime.now(datetime.UTC)
        views = [r.view for r in self.cert_records()] + [
            status.CertView(i.serial, i.issuer, i.not_before, i.not_after)
            for i in self.recorder.latest.values()
        ]
        return frozenset(v.issuer for v in views if v.issuer and v.not_after and v.not_after > now)

    async def on_ca_change(self, auth: rollover.Authority) -> None:
        """Publish the bundle and CRLs; re-issue the serving cert if the signing CA changed."""
        now = datetime.datetime.now(datetime.UTC)
        if self.serving.needs_renewal(auth.signing, now):
            self.serving.issue(auth.signing, auth.bundle_pem, now)
            if self.pool is not None:
                self.pool.reload_serving()
            logger.info(
                "serving certificate issued by %s", auth.signing.cert.subject.rfc4514_string()
            )
        await self.publisher.publish(auth)
        if self.pool is not None:
            self.pool.publish()

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.pool is not None:
            await self.pool.stop()
        await self.recorder.stop()
        for r in self.runners:
            await r.cleanup()
        await self.client.close()
        self.serving.cleanup()


async def _site(
    app: web.Application, host: str, port: int, ssl_context: Any = None
) -> web.AppRunner:
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=ssl_context, shutdown_timeout=1.0).start()
    return runner


def _ops_app(rt: Runtime) -> web.Application:
    async def metrics_view(_: web.Request) -> web.Response:
        body, ctype = metrics.render()
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def healthz(_: web.Request) -> web.Response:
        ok = rt.cas.authority is not None
        body: dict[str, Any] = {"ca": "ok" if ok else str(rt.cas.error or "loading")}
        if rt.pool is not None:
            body["signingWorkers"] = f"{rt.pool.listening}/{rt.pool.size}"
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", healthz)
    return app


#: How long start-up waits for the first list of MTLSCerts (CA retirement and /v1/trust read
#: it) before it goes on without (the watch keeps trying; the sweeper only sees fewer).
SYNC_TIMEOUT = 10.0

Revoke = Callable[[Runtime, dict[str, Any]], Awaitable[None]]


async def start(
    cfg: config.Config,
    *,
    pods: Any,
    client: kube.Client,
    revoke: Revoke | None = None,
    peering_priority: int | None = None,
) -> Runtime:
    """Build every part, load (or bootstrap) the CA, and start the servers and loops.

    ``revoke(rt, mtlscert)``: what an MTLSCert annotated ``kubemtls.io/revoke`` gets
    (``handlers.certs.revoke_requested``); None: the annotation is ignored.
    ``peering_priority``: this replica's (kopf peering; None when standalone).
    """
    publisher = trust.Publisher(client)
    manager = ca.Manager(client, cfg)
    rec = recorder.Recorder(client, cfg)
    rt = Runtime(
        cfg=cfg,
        client=client,
        cas=manager,
        publisher=publisher,
        recorder=rec,
        reviewer=tokens.Reviewer(client),
        serving=serving.ServingCert(cfg),
        checker=None,  # type: ignore[arg-type]
        pods=pods,
        certs=certwatch.Cache(client),
        peering_priority=peering_priority,
    )
    if revoke is not None:
        rt.certs.act = functools.partial(revoke, rt)
    rt.checker = sweeper.Sweeper(client, cfg, manager, rec, rt.cert_records)
    rec.context = lambda issued: rt.checker.context(
        status.CertView(issued.serial, issued.issuer, issued.not_before, issued.not_after)
    )
    manager.live_issuers = rt.live_issuers
    manager.on_change = rt.on_ca_change
    rt.tasks.append(asyncio.create_task(rt.certs.run(), name="kubemtls MTLSCert watch"))
    try:
        async with asyncio.timeout(SYNC_TIMEOUT):
            await rt.certs.synced.wait()
    except TimeoutError:
        logger.warning("MTLSCerts not listed within %.0fs; starting without them", SYNC_TIMEOUT)
    now = datetime.datetime.now(datetime.UTC)
    with contextlib.suppress(errors.CAUnavailable, errors.APIError):
        await manager.reconcile()
    if rt.serving.cert is None:  # no CA yet: a stand-in, so the servers start anyway
        rt.serving.issue(None, b"", now)
    signer = signing.Signer(cfg, manager, rt.reviewer, rec, rt.lookup_pod, rt.cert_status)
    rec.start()
    host = cfg.bind_address
    if cfg.signing_workers:
        rt.pool = signworkers.Pool(signer, rt.serving, cfg, log_level=logging.root.level)
        await rt.pool.start()
    else:
        rt.runners.append(await _site(signer.app(), host, cfg.signer_port, rt.serving.context))
    ops = _ops_app(rt)
    rt.runners.append(await _site(ops, host, cfg.metrics_port))
    if cfg.health_port != cfg.metrics_port:
        rt.runners.append(await _site(ops, host, cfg.health_port))
    interval = cfg.check_interval.total_seconds()
    rt.tasks.append(asyncio.create_task(manager.run(interval), name="kubemtls CA"))
    rt.tasks.append(asyncio.create_task(rt.checker.run(interval), name="kubemtls sweep"))
    rt.tasks.append(asyncio.create_task(memory.keep_trimmed(), name="kubemtls heap trim"))
    return rt

"""The mutating admission webhook: kopf glue around :mod:`kubemtls_operator.injection`.

kopf serves this handler at ``/inject`` (its id). It decides, then either refuses the pod
with a message saying how to fix its annotations, or answers with the JSON Patch that
:mod:`kubemtls_operator.podpatch` builds from the injection. Served by our
:class:`admissionserver.WebhookServer` (the operator's), the patch goes out as built; any
other server gets the pure, idempotent :func:`injection.inject_sidecar` in ``patch.fns``,
which kopf diffs into the same change. It makes no API call (``sideEffects: None``): at
CREATE the pod does not exist yet, so nothing can be posted about it; the reason is logged
(debug), and the operator's pod handlers post the Event once the pod exists.
"""

from __future__ import annotations

import functools
from typing import Any

import kopf
from kubemtls_sidecar import contract

from kubemtls_operator import admissionserver, injection, podpatch

__all__ = ["pod_inject"]


@kopf.on.mutate(
    "v1",
    "pods",
    id=contract.WEBHOOK_HANDLER_ID,
    operations={"CREATE"},
    side_effects=False,
    ignore_failures=True,  # DESIGN.md: failurePolicy Ignore; the operator catches misses
)
# ``async`` although it awaits nothing: kopf runs a sync handler in a thread pool, and that
# hop halved the webhook's throughput (bench/admission_bench.py).
async def pod_inject(
    body: kopf.Body,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: kopf.Logger,
    warnings: list[str],
    **_: Any,
) -> None:
    """Inject the sidecar into an opted-in pod, or refuse it with every problem listed."""
    settings = injection.InjectionSettings.of(memo.config)
    # The raw pod: every lookup through kopf's Body view resolves its path again.
    pod = dict(body)
    decision = injection.decide(pod, settings)
    if decision.action == "deny":
        logger.warning(f"Refused ({decision.reason}): {decision.message}")
        raise kopf.AdmissionError(decision.message, code=decision.status_code)
    if decision.action == "skip" or decision.spec is None:
        logger.debug(f"Not injecting ({decision.reason}): {decision.message}")
        return
    warnings.extend(decision.warnings)
    # debug, not info: kopf logs "Handler 'inject' succeeded." for every review already, and
    # a second line per pod cost ~5 % of the webhook's CPU (bench/admission_bench.py).
    logger.debug(f"Injecting {contract.SIDECAR_CONTAINER_NAME} ({decision.reason}).")
    ops = podpatch.operations(pod, decision.spec, settings)
    if not admissionserver.offer_json_patch(ops):
        patch.fns.append(
            functools.partial(injection.inject_sidecar, spec=decision.spec, settings=settings)
        )

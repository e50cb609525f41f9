"""kopf settings for a fleet of pods and MTLSCerts: what kopf does on every watch event.

Every MTLSCert status write (one per certificate issued) comes back as a watch event, and
kopf processes each event in full, even for objects whose handlers only index or filter.
One step of that is the *diff base*: kopf deep-copies the whole body (status included),
then throws the status away, to detect changes for ``on.create/update/field`` handlers
(and to reset daemons' idle time). :class:`StatuslessDiffBase` hands kopf the body without
its status instead, so the result is the same essence, without copying a status that is
discarded anyway (unless a handler asks for status fields, which then go through kopf's
own path unchanged). When no such handler is registered at all (this operator has only
indexes, ``on.event`` and webhook handlers), the essence is never used: the storage then
builds none (``None`` on both sides is kopf's "no change"), which saves a deep copy of every
pod and MTLSCert on every event.
"""

from __future__ import annotations

from collections.abc import Iterable

import kopf

__all__ = ["StatuslessDiffBase", "apply", "diffs_needed"]


def diffs_needed(registry: kopf.OperatorRegistry) -> bool:
    """Whether any handler in ``registry`` detects changes (create/update/field/resume/delete,
    timers, daemons): only those read kopf's diff base."""
    return bool(registry._changing.get_all_handlers() or registry._spawning.get_all_handlers())


class StatuslessDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf's default diff-base storage, without deep-copying a status it drops.

    ``registry``: where to look (once, at the first event) whether any handler needs the
    diff base at all; without one, it is always built.
    """

    def __init__(self, registry: kopf.OperatorRegistry | None = None) -> None:
        super().__init__()
        self._registry = registry
        self._needed: bool | None = None if registry is not None else True

    def _is_needed(self) -> bool:
        if self._needed is None:
            assert self._registry is not None
            self._needed = diffs_needed(self._registry)
        return self._needed

    def build(
        self,
        *,
        body: kopf.Body,
        extra_fields: Iterable[kopf.FieldSpec] | None = None,
    ) -> kopf.BodyEssence:
        if not self._is_needed():
            return None  # type: ignore[return-value]  # kopf: diff(None, None) is no change
        fields = list(extra_fields or ())
        if not fields and "status" in body:
            body = kopf.Body({k: v for k, v in body.items() if k != "status"})  # type: ignore[arg-type]
        return super().build(body=body, extra_fields=fields)

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        if not self._is_needed():
            return None
        return super().fetch(body=body)


def apply(settings: kopf.OperatorSettings, registry: kopf.OperatorRegistry | None = None) -> None:
    """Set what this module tunes on kopf's ``settings`` (at startup).

    ``registry``: the operator's (kopf's default registry when None).
    """
    settings.persistence.diffbase_storage = StatuslessDiffBase(
        registry if registry is not None else kopf.get_default_registry()
    )

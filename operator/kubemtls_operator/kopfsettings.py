"""kopf settings for a fleet of pods and MTLSCerts: what kopf does on every watch event.

Every MTLSCert status write (one per certificate issued) comes back as a watch event, and
kopf processes each event in full, even for objects whose handlers only index or filter.
One step of that is the *diff base*: kopf deep-copies the whole body (status included),
then throws the status away, to detect changes for ``on.create/update/field`` handlers.
:class:`StatuslessDiffBase` hands kopf the body without its status instead, so the
result is the same essence, without copying a status that is discarded anyway (unless a
handler asks for status fields, which then go through kopf's own path unchanged).
"""

from __future__ import annotations

from collections.abc import Iterable

import kopf

__all__ = ["StatuslessDiffBase", "apply"]


class StatuslessDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf's default diff-base storage, without deep-copying a status it drops."""

    def build(
        self,
        *,
        body: kopf.Body,
        extra_fields: Iterable[kopf.FieldSpec] | None = None,
    ) -> kopf.BodyEssence:
        fields = list(extra_fields or ())
        if not fields and "status" in body:
            body = kopf.Body({k: v for k, v in body.items() if k != "status"})  # type: ignore[arg-type]
        return super().build(body=body, extra_fields=fields)


def apply(settings: kopf.OperatorSettings) -> None:
    """Set what this module tunes on kopf's ``settings`` (at startup)."""
    settings.persistence.diffbase_storage = StatuslessDiffBase()

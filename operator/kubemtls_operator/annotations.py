"""Parse and validate the ``kubemtls.io/*`` annotations a user writes on a pod.

The webhook refuses a pod whose annotations are wrong, so this module's messages are what
a user reads in ``kubectl``'s "denied the request" line: each names the annotation, says
what is wrong, and shows a correct value. Every problem is collected, so one denial lists
them all. Pure: no Kubernetes, no I/O; the limits come in as a :class:`Limits` value.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import fnmatch
import re
from collections.abc import Mapping
from typing import Literal

from kubemtls_sidecar import contract, errors

from kubemtls_operator import portspecs

__all__ = [
    "AnnotationError",
    "AnnotationSpec",
    "InboundPort",
    "Limits",
    "OutboundRoute",
    "Problem",
    "format_duration",
    "parse",
    "parse_duration",
]

Mode = Literal["explicit", "transparent"]
Protocol = Literal["tcp", "http"]
InboundPort = portspecs.InboundPort
OutboundRoute = portspecs.OutboundRoute
Problem = portspecs.Problem

_BOOLS = ("true", "false")
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)(d|h|m|s))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(d|h|m|s)")
_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_PEER = re.compile(r"spiffe://(?P<td>[^/]*)/ns/(?P<ns>[^/]*)/sa/(?P<sa>[^/]*)")
_GLOB_SEGMENT = re.compile(r"[a-z0-9._*?\[\]!-]+")
_PEER_EXAMPLE = '"spiffe://{td}/ns/ehr/sa/*" (spiffe://<trust-domain>/ns/<namespace>/sa/<sa>)'


class AnnotationError(errors.KubemtlsError, ValueError):
    """One or more ``kubemtls.io/*`` annotations are wrong; ``problems`` lists every one."""

    def __init__(self, problems: tuple[Problem, ...]) -> None:
        self.problems = problems
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """The denial a user reads: a summary line, then one line per problem."""
        count = len(self.problems)
        head = "kubemtls.io annotations are not valid" + (
            f" ({count} problems):" if count > 1 else ":"
        )
        return "\n".join([head, *(f"- {p.text}" for p in self.problems)])


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the cluster allows: from the operator's settings."""

    trust_domain: str = "cluster.local"
    cluster_domain: str = "cluster.local"
    cert_duration_min: datetime.timedelta = datetime.timedelta(minutes=10)
    cert_duration_max: datetime.timedelta = datetime.timedelta(hours=720)
    dns_allow_list: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class AnnotationSpec:
    """A pod's validated kubemtls settings; ``None``/empty where the user wrote nothing."""

    mode: Mode = "explicit"
    inbound: tuple[InboundPort, ...] = ()
    outbound: tuple[OutboundRoute, ...] = ()
    allowed_peers: tuple[str, ...] = ()
    protocol: Protocol = "tcp"
    cert_duration: datetime.timedelta | None = None
    dns_names: tuple[str, ...] = ()
    key_type: str = contract.KEY_TYPES[0]
    upstream_ca: str | None = None
    require_bound_token: bool = False
    #: Not errors, but likely mistakes: returned to ``kubectl`` as admission warnings.
    warnings: tuple[str, ...] = ()


def parse_duration(text: str) -> datetime.timedelta:
    """Parse a duration as the operator's settings write it (``24h``, ``90m``, ``1h30m``, ``7d``).

    Raises:
        ValueError: the text is not such a duration.
    """
    text = text.strip()
    if not _DURATION.fullmatch(text):
        raise ValueError(f"not a duration: {text!r}")
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))
    return datetime.timedelta(seconds=seconds)


def format_duration(value: datetime.timedelta) -> str:
    """The shortest Go-style spelling: ``720h``, ``10m``, ``1h30m``, ``45s``."""
    total = int(value.total_seconds())
    hours, rest = divmod(total, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{n}{u}" for n, u in ((hours, "h"), (minutes, "m"), (seconds, "s")) if n]
    return "".join(parts) or "0s"


def parse(
    annotations: Mapping[str, object], *, namespace: str | None, limits: Limits
) -> AnnotationSpec:
    """Validate every ``kubemtls.io/*`` annotation of a pod into an :class:`AnnotationSpec`.

    Raises:
        AnnotationError: listing every problem found (not only the first).
    """
    namespace = namespace or None
    problems: list[Problem] = []
    warnings: list[str] = []
    values: dict[str, str] = {}
    for key, raw in annotations.items():
        if not key.startswith(contract.ANNOTATION_PREFIX) or key == contract.ANN_INJECTED:
            continue
        if key not in contract.USER_ANNOTATIONS:
            problems.append(_unknown_key(key, raw))
        elif not isinstance(raw, str):
            problems.append(Problem(key, str(raw), "the value must be a string", '"..."'))
        else:
            values[key] = raw.strip()

    def text(key: str, default: str = "") -> str:
        return values.get(key, default)

    mode = _choice(
        problems, contract.ANN_MODE, text(contract.ANN_MODE), ("explicit", "transparent")
    )
    protocol = _choice(
        problems, contract.ANN_PROTOCOL, text(contract.ANN_PROTOCOL), ("tcp", "http")
    )
    key_type = _choice(
        problems, contract.ANN_KEY_TYPE, text(contract.ANN_KEY_TYPE), contract.KEY_TYPES
    )
    inject = text(contract.ANN_INJECT, "true")
    if inject not in _BOOLS:
        problems.append(Problem(contract.ANN_INJECT, inject, 'must be "true" or "false"', '"true"'))
    bound = text(contract.ANN_REQUIRE_BOUND_TOKEN, "false")
    if bound not in _BOOLS:
        problems.append(
            Problem(contract.ANN_REQUIRE_BOUND_TOKEN, bound, 'must be "true" or "false"', '"true"')
        )
    transparent = mode == "transparent"
    # With an unknown mode the shape of inbound ports is unknown too: no guessing errors.
    mode_known = (text(contract.ANN_MODE) or "explicit").lower() in ("explicit", "transparent")
    inbound = (
        portspecs.parse_inbound(problems, text(contract.ANN_INBOUND), transparent)
        if mode_known
        else ()
    )
    outbound = portspecs.parse_outbound(problems, text(contract.ANN_OUTBOUND), transparent)
    portspecs.check_port_conflicts(
        problems,
        inbound,
        outbound,
        transparent,
        inbound_text=text(contract.ANN_INBOUND),
        outbound_text=text(contract.ANN_OUTBOUND),
    )
    peers = _parse_peers(problems, warnings, text(contract.ANN_ALLOWED_PEERS), limits)
    duration = _parse_cert_duration(problems, text(contract.ANN_CERT_DURATION), limits)
    dns_names = _parse_dns_names(problems, text(contract.ANN_DNS_NAMES), namespace, limits)
    upstream_ca = text(contract.ANN_UPSTREAM_CA) or None
    if upstream_ca is not None and not _is_subdomain(upstream_ca):
        problems.append(
            Problem(
                contract.ANN_UPSTREAM_CA,
                upstream_ca,
                "is not a valid ConfigMap name (lowercase letters, digits, '-' and '.')",
                '"ehr-public-ca" (a ConfigMap in the pod\'s namespace with key ca.crt)',
            )
        )
    if (
        bound == "true"
        and protocol == "tcp"
        and contract.ANN_PROTOCOL not in _problem_keys(problems)
    ):
        problems.append(
            Problem(
                contract.ANN_REQUIRE_BOUND_TOKEN,
                bound,
                'checks HTTP bearer tokens, so it needs kubemtls.io/protocol: "http" '
                "(this pod speaks tcp, where no token can be checked)",
                '"true" together with kubemtls.io/protocol: "http"',
            )
        )
    if problems:
        raise AnnotationError(tuple(problems))
    warnings.extend(portspecs.port_warnings(inbound, outbound, transparent))
    if not inbound and (peers or protocol == "http"):
        warnings.append(
            "kubemtls.io/allowed-peers and kubemtls.io/protocol apply to inbound traffic, "
            "but kubemtls.io/inbound lists no port"
        )
    if upstream_ca and not outbound:
        warnings.append(
            "kubemtls.io/upstream-ca applies to outbound traffic, but "
            "kubemtls.io/outbound lists no route"
        )
    return AnnotationSpec(
        mode="transparent" if transparent else "explicit",
        inbound=inbound,
        outbound=outbound,
        allowed_peers=peers,
        protocol="http" if protocol == "http" else "tcp",
        cert_duration=duration,
        dns_names=dns_names,
        key_type=key_type or contract.KEY_TYPES[0],
        upstream_ca=upstream_ca,
        require_bound_token=bound == "true",
        warnings=tuple(warnings),
    )


def _problem_keys(problems: list[Problem]) -> set[str]:
    return {p.key for p in problems}


def _unknown_key(key: str, raw: object) -> Problem:
    prefix = contract.ANNOTATION_PREFIX
    names = sorted(k.removeprefix(prefix) for k in contract.USER_ANNOTATIONS)
    close = difflib.get_close_matches(key.removeprefix(prefix).lower(), names, n=1, cutoff=0.6)
    hint = (
        f"did you mean {prefix}{close[0]}?"
        if close
        else "the known keys are " + ", ".join(sorted(contract.USER_ANNOTATIONS))
    )
    return Problem(key, str(raw), "is not a kubemtls annotation", None, hint=hint)


def _choice(problems: list[Problem], key: str, value: str, allowed: tuple[str, ...]) -> str:
    """The value if allowed; a case slip is reported but read as meant (for later checks)."""
    if not value:
        return allowed[0]
    if value in allowed:
        return value
    lower = value.lower()
    what = "values are lowercase" if lower in allowed else "unknown value"
    example = lower if lower in allowed else allowed[0]
    problems.append(
        Problem(key, value, f"{what}; use one of: {', '.join(allowed)}", f'"{example}"')
    )
    return example


def _items(value: str) -> list[str]:
    """A comma list; an empty value means none. Empty items are kept (they are errors)."""
    return [item.strip() for item in value.split(",")] if value else []


def _parse_peers(
    problems: list[Problem], warnings: list[str], value: str, limits: Limits
) -> tuple[str, ...]:
    key = contract.ANN_ALLOWED_PEERS
    example = _PEER_EXAMPLE.format(td=limits.trust_domain)
    peers: list[str] = []
    for item in _items(value):
        reason = _peer_problem(item)
        if reason:
            problems.append(Problem(key, value, f'"{item}" {reason}', example))
            continue
        match = _PEER.fullmatch(item)
        if match and not fnmatch.fnmatchcase(limits.trust_domain, match["td"]):
            warnings.append(
                f'kubemtls.io/allowed-peers: "{item}" names trust domain "{match["td"]}", '
                f'but this cluster\'s is "{limits.trust_domain}": no mesh peer will match it'
            )
        peers.append(item)
    return tuple(peers)


def _peer_problem(item: str) -> str | None:
    if not item:
        return "is empty (a stray comma?)"
    if any(c.isspace() for c in item) or " " in item:
        return "contains a space"
    match = _PEER.fullmatch(item)
    if not match:
        return "is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    for part in ("td", "ns", "sa"):
        segment = match[part]
        if not segment:
            return f"has an empty {_PART_NAMES[part]}"
        if not _GLOB_SEGMENT.fullmatch(segment):
            return (
                f'has {_PART_NAMES[part]} "{segment}" with characters other than lowercase '
                "letters, digits, '.', '-' and the globs * ? [...]"
            )
        if not _brackets_balanced(segment):
            return f'has an unbalanced "[" or "]" in {_PART_NAMES[part]} "{segment}"'
    return None


_PART_NAMES = {"td": "trust domain", "ns": "namespace", "sa": "service account"}


def _brackets_balanced(segment: str) -> bool:
    """fnmatch classes: each ``[`` closes with a ``]`` after at least one character."""
    inside = False
    start = 0
    for i, c in enumerate(segment):
        if c == "[":
            if inside:
                return False
            inside, start = True, i
        elif c == "]":
            if not inside or i == start + 1 or (i == start + 2 and segment[start + 1] == "!"):
                return False
            inside = False
    return not inside


def _parse_cert_duration(
    problems: list[Problem], value: str, limits: Limits
) -> datetime.timedelta | None:
    if not value:
        return None
    key = contract.ANN_CERT_DURATION
    lo, hi = format_duration(limits.cert_duration_min), format_duration(limits.cert_duration_max)
    example = f'a duration between {lo} and {hi}, e.g. "24h"'
    try:
        duration = parse_duration(value)
    except ValueError:
        problems.append(
            Problem(
                key,
                value,
                "is not a duration (a number with d, h, m or s, like 24h or 1h30m)",
                example,
            )
        )
        return None
    if duration > limits.cert_duration_max:
        problems.append(Problem(key, value, f"is longer than the cluster's maximum {hi}", example))
    elif duration < limits.cert_duration_min:
        problems.append(Problem(key, value, f"is shorter than the cluster's minimum {lo}", example))
    return duration


def _parse_dns_names(
    problems: list[Problem], value: str, namespace: str | None, limits: Limits
) -> tuple[str, ...]:
    key = contract.ANN_DNS_NAMES
    own = namespace or "<namespace>"
    example = f'"api.{own}.svc" (a Service of the pod\'s own namespace, {own})'
    names: list[str] = []
    for name in _items(value):
        reason = _dns_name_problem(name, namespace, limits)
        if reason:
            problems.append(Problem(key, value, f'"{name}" {reason}', example))
        else:
            names.append(name)
    return tuple(dict.fromkeys(names))


def _dns_name_problem(name: str, namespace: str | None, limits: Limits) -> str | None:
    if not name:
        return "is empty (a stray comma?)"
    if name in limits.dns_allow_list:
        return None
    if name.lower() != name:
        return "has uppercase letters (DNS names are written in lowercase)"
    if len(name) > 253 or not all(_DNS1123_LABEL.fullmatch(label) for label in name.split(".")):
        return "is not a valid DNS name (wildcards are allowed only if on the DNS allow list)"
    if any(fnmatch.fnmatchcase(name, glob) for glob in limits.dns_allow_list):
        return None
    labels = name.split(".")
    suffix = labels[3:]
    if len(labels) >= 3 and labels[2] == "svc" and suffix in ([], limits.cluster_domain.split(".")):
        if namespace is None:
            return "cannot be checked: the pod has no namespace"
        if labels[1] == namespace:
            return None
        return (
            f'is a name of namespace "{labels[1]}", but this pod is in namespace "{namespace}"; '
            "a pod may claim only its own namespace's Service names"
        )
    allowed = ", ".join(limits.dns_allow_list) or "empty"
    return (
        f"is neither a Service name of the pod's namespace (<svc>.<ns>.svc or "
        f"<svc>.<ns>.svc.{limits.cluster_domain}) nor on the operator's DNS allow list "
        f"(KUBEMTLS_OPERATOR_DNS_ALLOW_LIST: {allowed})"
    )


def _is_subdomain(name: str) -> bool:
    return len(name) <= 253 and bool(_DNS1123_SUBDOMAIN.fullmatch(name))

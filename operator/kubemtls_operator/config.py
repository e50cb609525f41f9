"""The operator's settings: ``KUBEMTLS_OPERATOR_*`` environment → one frozen ``Config``.

The only reader of ``os.environ`` in the operator. Every setting of COMMON.md's table is
here under the same name (``KUBEMTLS_OPERATOR_<NAME>``, also ``kubemtls-operator --<name>``).
A bad value raises :class:`errors.ConfigInvalid` with one line; ``__main__`` prints it and
exits 2. Durations read like ``24h``, ``90m``, ``30d``, ``1h30m`` or plain seconds.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import os
import re
from collections.abc import Mapping
from typing import Any

from kubemtls_sidecar import contract

from kubemtls_operator import errors

__all__ = ["SETTINGS", "Config", "from_environ", "load", "parse_duration"]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> datetime.timedelta:
    """``24h`` / ``90m`` / ``30d`` / ``1h30m`` / ``600`` (seconds) → timedelta.

    Raises:
        ValueError: anything else, or a duration that is not positive.
    """
    s = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        seconds = float(s)
    else:
        parts = _DURATION.findall(s)
        if not parts or "".join(n + u for n, u in parts) != s:
            raise ValueError(f"{text!r} is not a duration; write e.g. 24h, 90m, 30d or 1h30m")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return datetime.timedelta(seconds=seconds)


@dataclasses.dataclass(frozen=True)
class Config:
    """Every operator setting, typed. Attribute names are part of the webhook's contract."""

    namespace: str = "kubemtls"
    service: str = "kubemtls"
    signer_url: str = ""  # filled from service/namespace when empty
    serving_extra_sans: tuple[str, ...] = ()
    bind_address: str = "0.0.0.0"  # noqa: S104 - a pod listens on its IP; the chart decides
    webhook_port: int = contract.WEBHOOK_PORT
    signer_port: int = contract.SIGNER_PORT
    metrics_port: int = contract.OPERATOR_METRICS_PORT
    health_port: int = contract.OPERATOR_HEALTH_PORT
    webhook_config: str = "kubemtls-injector"
    webhook_managed: bool = False
    ca_secret: str = "kubemtls-ca"  # noqa: S105 - a Secret's name
    ca_bootstrap: bool = True
    ca_rollover_grace: datetime.timedelta = datetime.timedelta(hours=1)
    trust_domain: str = "cluster.local"
    cluster_domain: str = "cluster.local"
    cert_duration: datetime.timedelta = datetime.timedelta(hours=24)
    cert_duration_min: datetime.timedelta = datetime.timedelta(minutes=10)
    cert_duration_max: datetime.timedelta = datetime.timedelta(hours=720)
    renew_fraction: float = 0.6667
    alert_window: datetime.timedelta = datetime.timedelta(hours=720)
    dns_allow_list: tuple[str, ...] = ()
    sidecar_image: str = "ghcr.io/kubemtls/kubemtls:0.1.0"
    sidecar_image_pull_policy: str = "IfNotPresent"
    sidecar_resources: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: {
            "requests": {"cpu": "20m", "memory": "32Mi"},
            "limits": {"memory": "128Mi"},
        }
    )
    native_sidecar: bool = True
    token_expiration: int = 3600
    log_format: str = "text"
    peering: str = ""
    #: Worker processes serving the signing API (0: in the operator's process). See signworkers.
    signing_workers: int = 0
    # Not in the chart's table: how often certificates, CRLs and the CA are re-checked.
    check_interval: datetime.timedelta = datetime.timedelta(seconds=60)

    @property
    def serving_dns_names(self) -> tuple[str, ...]:
        """The operator Service's names plus the extra DNS names (not IPs) configured."""
        base = (
            f"{self.service}.{self.namespace}.svc",
            f"{self.service}.{self.namespace}.svc.{self.cluster_domain}",
        )
        return base + tuple(s for s in self.serving_extra_sans if not _is_ip(s))

    @property
    def serving_ip_addresses(self) -> tuple[str, ...]:
        ips = [s for s in self.serving_extra_sans if _is_ip(s)]
        if _is_ip(self.bind_address) and not ipaddress.ip_address(self.bind_address).is_unspecified:
            ips.append(self.bind_address)
        return tuple(dict.fromkeys(ips))


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
    except ValueError:
        return False
    return True


def _bool(v: str) -> bool:
    low = v.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off", ""):
        return False
    raise ValueError(f"{v!r} is not a boolean; use true or false")


def _port(v: str) -> int:
    p = int(v)
    if not 0 <= p <= 65535:
        raise ValueError(f"{v!r} is not a port number")
    return p


def _list(v: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in v.split(",") if x.strip())


def _resources(v: str) -> Mapping[str, Any]:
    data = json.loads(v)
    if not isinstance(data, dict) or not set(data) <= {"requests", "limits"}:
        raise ValueError("expected a JSON object with 'requests' and/or 'limits'")
    return data


def _one_of(*allowed: str) -> Any:
    def parse(v: str) -> str:
        if v not in allowed:
            raise ValueError(f"{v!r} is not one of {', '.join(allowed)}")
        return v

    return parse


def _fraction(v: str) -> float:
    f = float(v)
    if not 0 < f < 1:
        raise ValueError(f"{v!r} must be between 0 and 1")
    return f


def _workers(v: str) -> int:
    n = int(v)
    if not 0 <= n <= 64:
        raise ValueError(f"{v} is not between 0 (sign in the operator's process) and 64")
    return n


def _token_expiration(v: str) -> int:
    n = int(v)
    if n < 600:
        raise ValueError(f"{v} is below 600 seconds (the API server refuses shorter tokens)")
    return n


#: NAME (env suffix / flag) → (attribute, parser).
SETTINGS: dict[str, tuple[str, Any]] = {
    "NAMESPACE": ("namespace", str),
    "SERVICE": ("service", str),
    "SIGNER_URL": ("signer_url", str),
    "SERVING_EXTRA_SANS": ("serving_extra_sans", _list),
    "BIND_ADDRESS": ("bind_address", str),
    "WEBHOOK_PORT": ("webhook_port", _port),
    "SIGNER_PORT": ("signer_port", _port),
    "METRICS_PORT": ("metrics_port", _port),
    "HEALTH_PORT": ("health_port", _port),
    "WEBHOOK_CONFIG": ("webhook_config", str),
    "WEBHOOK_MANAGED": ("webhook_managed", _bool),
    "CA_SECRET": ("ca_secret", str),
    "CA_BOOTSTRAP": ("ca_bootstrap", _bool),
    "CA_ROLLOVER_GRACE": ("ca_rollover_grace", parse_duration),
    "TRUST_DOMAIN": ("trust_domain", str),
    "CLUSTER_DOMAIN": ("cluster_domain", str),
    "CERT_DURATION": ("cert_duration", parse_duration),
    "CERT_DURATION_MIN": ("cert_duration_min", parse_duration),
    "CERT_DURATION_MAX": ("cert_duration_max", parse_duration),
    "RENEW_FRACTION": ("renew_fraction", _fraction),
    "ALERT_WINDOW": ("alert_window", parse_duration),
    "DNS_ALLOW_LIST": ("dns_allow_list", _list),
    "SIDECAR_IMAGE": ("sidecar_image", str),
    "SIDECAR_IMAGE_PULL_POLICY": (
        "sidecar_image_pull_policy",
        _one_of("Always", "IfNotPresent", "Never"),
    ),
    "SIDECAR_RESOURCES": ("sidecar_resources", _resources),
    "NATIVE_SIDECAR": ("native_sidecar", _bool),
    "TOKEN_EXPIRATION": ("token_expiration", _token_expiration),
    "LOG_FORMAT": ("log_format", _one_of("json", "text")),
    "PEERING": ("peering", str),
    "SIGNING_WORKERS": ("signing_workers", _workers),
    "CHECK_INTERVAL": ("check_interval", parse_duration),
}


def load(env: Mapping[str, str], overrides: Mapping[str, str] | None = None) -> Config:
    """Build the config from ``env`` (``KUBEMTLS_OPERATOR_*``) and flag ``overrides`` (by NAME).

    Raises:
        errors.ConfigInvalid: one line naming the setting and what is wrong.
    """
    values: dict[str, Any] = {}
    for name, (attr, parse) in SETTINGS.items():
        raw = (overrides or {}).get(name)
        if raw is None:
            raw = env.get(contract.OPERATOR_ENV_PREFIX + name)
        if raw is None:
            continue
        try:
            values[attr] = parse(raw)
        except (ValueError, TypeError) as e:
            var = contract.OPERATOR_ENV_PREFIX + name
            raise errors.ConfigInvalid(f"{var}={raw!r}: {e}") from e
    cfg = Config(**values)
    if not cfg.signer_url:
        cfg = dataclasses.replace(
            cfg, signer_url=f"https://{cfg.service}.{cfg.namespace}.svc:{contract.SIGNER_PORT}"
        )
    _check(cfg)
    return cfg


def _check(cfg: Config) -> None:
    p = contract.OPERATOR_ENV_PREFIX
    if not cfg.cert_duration_min <= cfg.cert_duration <= cfg.cert_duration_max:
        raise errors.ConfigInvalid(
            f"{p}CERT_DURATION must lie between {p}CERT_DURATION_MIN and {p}CERT_DURATION_MAX"
        )
    if not cfg.signer_url.startswith("https://"):
        raise errors.ConfigInvalid(f"{p}SIGNER_URL={cfg.signer_url!r}: must be an https:// URL")
    for name in ("namespace", "service", "ca_secret", "webhook_config", "trust_domain"):
        if not getattr(cfg, name):
            raise errors.ConfigInvalid(f"{p}{name.upper()} must not be empty")


def from_environ(overrides: Mapping[str, str] | None = None) -> Config:
    """:func:`load` from this process's environment (the only reader of ``os.environ``)."""
    return load(os.environ, overrides)

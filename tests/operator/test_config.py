"""Operator settings: every KUBEMTLS_OPERATOR_* name, durations, and one-line failures."""

from __future__ import annotations

import datetime
import subprocess
import sys

import pytest
from kubemtls_operator import config, errors

P = "KUBEMTLS_OPERATOR_"


def test_defaults_match_the_table() -> None:
    cfg = config.load({})
    assert (cfg.namespace, cfg.service, cfg.signer_url) == (
        "kubemtls",
        "kubemtls",
        "https://kubemtls.kubemtls.svc:9444",
    )
    assert (cfg.webhook_port, cfg.signer_port, cfg.metrics_port, cfg.health_port) == (
        9443,
        9444,
        9090,
        8080,
    )
    assert cfg.webhook_config == "kubemtls-injector"
    assert cfg.webhook_managed is False
    assert cfg.ca_secret == "kubemtls-ca"
    assert cfg.ca_bootstrap is True
    assert cfg.ca_rollover_grace == datetime.timedelta(hours=1)
    assert cfg.cert_duration == datetime.timedelta(hours=24)
    assert cfg.cert_duration_min == datetime.timedelta(minutes=10)
    assert cfg.cert_duration_max == datetime.timedelta(hours=720)
    assert cfg.alert_window == datetime.timedelta(days=30)
    assert cfg.renew_fraction == pytest.approx(0.6667)
    assert cfg.sidecar_resources == {
        "requests": {"cpu": "20m", "memory": "32Mi"},
        "limits": {"memory": "128Mi"},
    }
    assert cfg.native_sidecar is True
    assert cfg.token_expiration == 3600
    assert cfg.peering == ""
    assert cfg.serving_dns_names == ("kubemtls.kubemtls.svc", "kubemtls.kubemtls.svc.cluster.local")


def test_every_setting_is_read_from_its_variable() -> None:
    env = {
        P + "NAMESPACE": "sec",
        P + "SERVICE": "mtls",
        P + "SERVING_EXTRA_SANS": "10.0.0.1, demo.local",
        P + "BIND_ADDRESS": "127.0.0.1",
        P + "WEBHOOK_MANAGED": "true",
        P + "CA_BOOTSTRAP": "false",
        P + "CA_ROLLOVER_GRACE": "90m",
        P + "CERT_DURATION": "1h30m",
        P + "DNS_ALLOW_LIST": "*.ehr.example.org",
        P + "SIDECAR_RESOURCES": '{"limits": {"memory": "64Mi"}}',
        P + "NATIVE_SIDECAR": "false",
        P + "TOKEN_EXPIRATION": "600",
        P + "LOG_FORMAT": "json",
        P + "PEERING": "kubemtls",
        P + "SIDECAR_IMAGE_PULL_POLICY": "Always",
        P + "ALERT_WINDOW": "30d",
    }
    cfg = config.load(env)
    assert cfg.signer_url == "https://mtls.sec.svc:9444"
    assert cfg.serving_dns_names[-1] == "demo.local"
    assert cfg.serving_ip_addresses == ("10.0.0.1", "127.0.0.1")
    assert cfg.ca_rollover_grace == datetime.timedelta(minutes=90)
    assert cfg.cert_duration == datetime.timedelta(minutes=90)
    assert cfg.dns_allow_list == ("*.ehr.example.org",)
    assert cfg.sidecar_resources == {"limits": {"memory": "64Mi"}}
    assert (cfg.webhook_managed, cfg.ca_bootstrap, cfg.native_sidecar) == (True, False, False)
    assert (cfg.token_expiration, cfg.log_format, cfg.peering) == (600, "json", "kubemtls")
    assert cfg.alert_window == datetime.timedelta(days=30)


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        ("CERT_DURATION", "a day", "not a duration"),
        ("WEBHOOK_PORT", "70000", "port"),
        ("WEBHOOK_MANAGED", "maybe", "boolean"),
        ("TOKEN_EXPIRATION", "60", "600"),
        ("SIDECAR_RESOURCES", "[1]", "requests"),
        ("LOG_FORMAT", "xml", "json"),
        ("RENEW_FRACTION", "1.5", "between 0 and 1"),
        ("CERT_DURATION", "2000h", "CERT_DURATION_MAX"),
        ("SIGNER_URL", "http://x:9444", "https"),
        ("SIGNING_WORKERS", "-1", "SIGNING_WORKERS='-1': -1 is not between 0"),
        ("SIGNING_WORKERS", "65", "SIGNING_WORKERS='65': 65 is not between 0"),
        ("SIGNING_WORKERS", "x", "SIGNING_WORKERS='x'"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(name: str, value: str, needle: str) -> None:
    with pytest.raises(errors.ConfigInvalid) as e:
        config.load({P + name: value})
    assert "\n" not in str(e.value)
    assert needle in str(e.value)
    assert P in str(e.value)


def test_flags_override_the_environment() -> None:
    assert config.load({P + "NAMESPACE": "a"}, {"NAMESPACE": "b"}).namespace == "b"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("24h", 86400), ("90m", 5400), ("30d", 2592000), ("1h30m", 5400), ("600", 600), ("0.5s", 0.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert config.parse_duration(text).total_seconds() == seconds


def test_operator_exits_2_with_one_line_on_a_bad_setting() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kubemtls_operator", "--cert-duration", "soon"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "KUBEMTLS_OPERATOR_CERT_DURATION" in done.stderr

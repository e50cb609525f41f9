"""kubemtls.io/* pod annotations: what parses, and what a user reads when it does not."""

import datetime

import pytest
from kubemtls_operator import annotations

LIMITS = annotations.Limits(dns_allow_list=("*.partner.example.org", "fhir.ehr.example.org"))
H = datetime.timedelta(hours=1)


def parse(ann: dict[str, object], namespace: str = "billing") -> annotations.AnnotationSpec:
    return annotations.parse(
        {"kubemtls.io/inject": "true", **ann}, namespace=namespace, limits=LIMITS
    )


def problems(ann: dict[str, object], namespace: str = "billing") -> str:
    with pytest.raises(annotations.AnnotationError) as info:
        parse(ann, namespace)
    return info.value.message


def test_defaults_when_only_opted_in() -> None:
    spec = parse({})
    assert spec.mode == "explicit"
    assert spec.protocol == "tcp"
    assert spec.key_type == "ecdsa-p256"
    assert (spec.inbound, spec.outbound, spec.allowed_peers, spec.dns_names) == ((), (), (), ())
    assert spec.cert_duration is None
    assert spec.upstream_ca is None
    assert spec.require_bound_token is False
    assert any("carries no traffic" in w for w in spec.warnings)


def test_full_explicit_spec_parses() -> None:
    spec = parse(
        {
            "kubemtls.io/inbound": "8443:8080, 9443:9090",
            "kubemtls.io/outbound": "15001=fhir.ehr.example.org:443,15002=[fd00::1]:8443",
            "kubemtls.io/allowed-peers": "spiffe://cluster.local/ns/ehr/sa/*,"
            "spiffe://cluster.local/ns/billing-[ab]/sa/api-?",
            "kubemtls.io/protocol": "http",
            "kubemtls.io/require-bound-token": "true",
            "kubemtls.io/cert-duration": "1h30m",
            "kubemtls.io/dns-names": "api.billing.svc,api.billing.svc.cluster.local,"
            "x.partner.example.org,fhir.ehr.example.org",
            "kubemtls.io/key-type": "rsa-3072",
            "kubemtls.io/upstream-ca": "ehr-public-ca",
        }
    )
    assert [e.env for e in spec.inbound] == ["8443:127.0.0.1:8080", "9443:127.0.0.1:9090"]
    assert [r.env for r in spec.outbound] == [
        "15001=fhir.ehr.example.org:443",
        "15002=[fd00::1]:8443",
    ]
    assert len(spec.allowed_peers) == 2
    assert spec.cert_duration == 1.5 * H
    assert spec.require_bound_token is True
    assert spec.key_type == "rsa-3072"
    assert spec.upstream_ca == "ehr-public-ca"
    assert spec.dns_names[-1] == "fhir.ehr.example.org"
    assert spec.warnings == ()


def test_transparent_spec_allows_one_port_for_several_ehr_hosts() -> None:
    spec = parse(
        {
            "kubemtls.io/mode": "transparent",
            "kubemtls.io/inbound": "8080,9090",
            "kubemtls.io/outbound": "80=fhir.a.example.org:443,80=fhir.b.example.org:443",
        }
    )
    assert [e.env for e in spec.inbound] == ["8080", "9090"]
    assert [r.local_port for r in spec.outbound] == [80, 80]


@pytest.mark.parametrize(
    ("ann", "expected"),
    [
        pytest.param(
            {"kubemtls.io/inbound": "8443:80800"},
            'kubemtls.io/inbound: "8443:80800" — app port 80800 is out of range (1-65535); '
            'write it as "8443:8080" (TLS listen port : app port)',
            id="port-out-of-range",
        ),
        pytest.param(
            {"kubemtls.io/inbound": "8443:http"},
            'app port "http" is not a number',
            id="port-not-a-number",
        ),
        pytest.param({"kubemtls.io/inbound": "0:8080"}, "port 0 is out of range", id="port-zero"),
        pytest.param(
            {"kubemtls.io/inbound": "8080"}, '"8080" has no TLS listen port', id="explicit-bare"
        ),
        pytest.param(
            {"kubemtls.io/inbound": "8080:8080"},
            "the TLS listen port equals the app port 8080",
            id="listen-equals-app",
        ),
        pytest.param(
            {"kubemtls.io/inbound": "8443:8080,8443:9090"},
            "port 8443 is used twice (as an inbound TLS listen port and as an inbound TLS",
            id="listen-twice",
        ),
        pytest.param(
            {
                "kubemtls.io/inbound": "8443:8080",
                "kubemtls.io/outbound": "8443=fhir.ehr.example.org:443",
            },
            "port 8443 is used twice (as an inbound TLS listen port and as an outbound local port)",
            id="inbound-outbound-clash",
        ),
        pytest.param(
            {"kubemtls.io/inbound": "15020:8080"},
            "port 15020 is reserved for the sidecar's admin port",
            id="admin-port-reserved",
        ),
        pytest.param(
            {"kubemtls.io/inbound": "8443:15020"},
            "app port 15020 is also the sidecar's admin port",
            id="app-on-admin-port",
        ),
        pytest.param(
            {"kubemtls.io/inbound": "8443:8080", "kubemtls.io/outbound": "8080=x.example.org:443"},
            "app port 8080 is also an outbound local port",
            id="app-on-outbound-port",
        ),
        pytest.param(
            {"kubemtls.io/mode": "transparent", "kubemtls.io/inbound": "8080,15006"},
            "port 15006 is reserved for the sidecar's inbound capture port",
            id="transparent-capture-reserved",
        ),
        pytest.param(
            {"kubemtls.io/mode": "transparent", "kubemtls.io/outbound": "15001=a.example.org:443"},
            "port 15001 is reserved for the sidecar's outbound capture port",
            id="transparent-outbound-reserved",
        ),
        pytest.param(
            {"kubemtls.io/mode": "transparent", "kubemtls.io/inbound": "8443:8080"},
            "in transparent mode list only the app ports",
            id="transparent-listen-app",
        ),
        pytest.param(
            {"kubemtls.io/mode": "transparent", "kubemtls.io/inbound": "8080,8080"},
            "port 8080 is used twice",
            id="transparent-inbound-twice",
        ),
        pytest.param(
            {"kubemtls.io/outbound": "15001=fhir.ehr.example.org"},
            'the upstream "fhir.ehr.example.org" has no port; write it as '
            '"15001=fhir.ehr.example.org:443"',
            id="outbound-no-port",
        ),
        pytest.param(
            {"kubemtls.io/outbound": "15001:fhir.ehr.example.org:443"},
            'has no "=" (LOCAL_PORT=HOST:PORT)',
            id="outbound-no-equals",
        ),
        pytest.param(
            {"kubemtls.io/outbound": "15001=fhir_ehr!:443"},
            '"fhir_ehr!" is not a valid host name',
            id="outbound-bad-host",
        ),
        pytest.param(
            {"kubemtls.io/outbound": "15001=a.example.org:443,"},
            "has an empty entry (a stray comma?)",
            id="outbound-trailing-comma",
        ),
        pytest.param(
            {"kubemtls.io/mode": "sidecar"},
            'kubemtls.io/mode: "sidecar" — unknown value; use one of: explicit, transparent',
            id="unknown-mode",
        ),
        pytest.param(
            {"kubemtls.io/mode": "Transparent"},
            'values are lowercase; use one of: explicit, transparent; write it as "transparent"',
            id="mode-case",
        ),
        pytest.param(
            {"kubemtls.io/protocol": "grpc"},
            'kubemtls.io/protocol: "grpc" — unknown value; use one of: tcp, http',
            id="unknown-protocol",
        ),
        pytest.param(
            {"kubemtls.io/key-type": "rsa-1024"},
            "use one of: ecdsa-p256, rsa-2048, rsa-3072",
            id="bad-key-type",
        ),
        pytest.param(
            {"kubemtls.io/cert-duration": "one day"},
            'kubemtls.io/cert-duration: "one day" — is not a duration',
            id="duration-unparsable",
        ),
        pytest.param(
            {"kubemtls.io/cert-duration": "2000h"},
            "is longer than the cluster's maximum 720h; write it as a duration between 10m and "
            '720h, e.g. "24h"',
            id="duration-too-long",
        ),
        pytest.param(
            {"kubemtls.io/cert-duration": "5m"},
            "is shorter than the cluster's minimum 10m",
            id="duration-too-short",
        ),
        pytest.param(
            {"kubemtls.io/allowed-peers": "spiffe://cluster.local/ns/ehr"},
            "is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>",
            id="peer-missing-sa",
        ),
        pytest.param(
            {"kubemtls.io/allowed-peers": "spiffe://cluster.local/ns/ehr/sa/"},
            "has an empty service account",
            id="peer-empty-sa",
        ),
        pytest.param(
            {"kubemtls.io/allowed-peers": "spiffe://cluster.local/ns/e hr/sa/*"},
            "contains a space",
            id="peer-space",
        ),
        pytest.param(
            {"kubemtls.io/allowed-peers": "spiffe://cluster.local/ns/[ehr/sa/*"},
            'has an unbalanced "[" or "]" in namespace "[ehr"',
            id="peer-unbalanced",
        ),
        pytest.param(
            {"kubemtls.io/allowed-peers": "spiffe://cluster.local/ns/EHR/sa/*"},
            "with characters other than lowercase letters",
            id="peer-uppercase",
        ),
        pytest.param(
            {"kubemtls.io/allowed-peers": "spiffe://cluster.local/ns/ehr/sa/*,"},
            '"" is empty (a stray comma?)',
            id="peer-empty-item",
        ),
        pytest.param(
            {"kubemtls.io/inbund": "8443:8080"},
            'kubemtls.io/inbund: "8443:8080" — is not a kubemtls annotation; '
            "did you mean kubemtls.io/inbound?",
            id="unknown-key-typo",
        ),
        pytest.param(
            {"kubemtls.io/allowed-peer": "spiffe://cluster.local/ns/a/sa/b"},
            "did you mean kubemtls.io/allowed-peers?",
            id="unknown-key-singular",
        ),
        pytest.param(
            {"kubemtls.io/zzz": "1"},
            "is not a kubemtls annotation; the known keys are kubemtls.io/allowed-peers",
            id="unknown-key-far",
        ),
        pytest.param(
            {"kubemtls.io/inbound": 8443},
            'kubemtls.io/inbound: "8443" — the value must be a string',
            id="value-not-a-string",
        ),
        pytest.param(
            {"kubemtls.io/dns-names": "api.payments.svc"},
            '"api.payments.svc" is a name of namespace "payments", but this pod is in '
            'namespace "billing"',
            id="dns-other-namespace",
        ),
        pytest.param(
            {"kubemtls.io/dns-names": "api.payments.svc.cluster.local"},
            'is a name of namespace "payments"',
            id="dns-other-namespace-fqdn",
        ),
        pytest.param(
            {"kubemtls.io/dns-names": "www.google.com"},
            "is neither a Service name of the pod's namespace",
            id="dns-not-allowed",
        ),
        pytest.param(
            {"kubemtls.io/dns-names": "*.billing.svc"},
            "is not a valid DNS name (wildcards are allowed only if on the DNS allow list)",
            id="dns-wildcard",
        ),
        pytest.param(
            {"kubemtls.io/dns-names": "API.billing.svc"},
            "has uppercase letters",
            id="dns-uppercase",
        ),
        pytest.param(
            {"kubemtls.io/upstream-ca": "EHR_CA"},
            'kubemtls.io/upstream-ca: "EHR_CA" — is not a valid ConfigMap name',
            id="bad-configmap-name",
        ),
        pytest.param(
            {"kubemtls.io/require-bound-token": "yes"},
            'kubemtls.io/require-bound-token: "yes" — must be "true" or "false"',
            id="bound-token-not-bool",
        ),
        pytest.param(
            {"kubemtls.io/require-bound-token": "true"},
            'needs kubemtls.io/protocol: "http"',
            id="bound-token-with-tcp",
        ),
        pytest.param(
            {"kubemtls.io/inject": "yes"},
            'kubemtls.io/inject: "yes" — must be "true" or "false"',
            id="inject-not-bool",
        ),
    ],
)
def test_bad_annotation_is_refused_with_a_fix(ann: dict[str, object], expected: str) -> None:
    message = problems(ann)
    assert expected in message
    assert message.startswith("kubemtls.io annotations are not valid")


def test_every_problem_is_reported_at_once() -> None:
    message = problems(
        {
            "kubemtls.io/inbound": "8443:80800",
            "kubemtls.io/outbound": "15001=fhir.ehr.example.org",
            "kubemtls.io/mode": "Explicit",
            "kubemtls.io/cert-duration": "2000h",
            "kubemtls.io/inbund": "x",
        }
    )
    assert message.startswith("kubemtls.io annotations are not valid (5 problems):")
    lines = message.splitlines()[1:]
    assert len(lines) == 5
    assert all(line.startswith("- kubemtls.io/") for line in lines)


def test_dns_name_without_namespace_cannot_be_checked() -> None:
    assert "cannot be checked" in problems({"kubemtls.io/dns-names": "a.b.svc"}, namespace="")


def test_dns_names_of_another_cluster_domain_are_not_own_namespace() -> None:
    assert "is neither" in problems({"kubemtls.io/dns-names": "api.billing.svc.other.local"})


def test_foreign_trust_domain_is_a_warning_not_an_error() -> None:
    spec = parse({"kubemtls.io/allowed-peers": "spiffe://partner.org/ns/a/sa/b"})
    assert any('trust domain "partner.org"' in w for w in spec.warnings)


def test_low_ports_and_inbound_only_settings_warn() -> None:
    spec = parse({"kubemtls.io/inbound": "443:8080"})
    assert any("ip_unprivileged_port_start" in w for w in spec.warnings)
    spec = parse(
        {"kubemtls.io/outbound": "15001=a.example.org:443", "kubemtls.io/protocol": "http"}
    )
    assert any("apply to inbound traffic" in w for w in spec.warnings)
    spec = parse({"kubemtls.io/inbound": "8443:8080", "kubemtls.io/upstream-ca": "ca"})
    assert any("applies to outbound traffic" in w for w in spec.warnings)


def test_injected_and_foreign_annotations_are_ignored() -> None:
    spec = annotations.parse(
        {"kubemtls.io/injected": "true", "example.org/kubemtls.io": "x", "other": "1"},
        namespace="a",
        limits=LIMITS,
    )
    assert spec.mode == "explicit"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("24h", 86400), ("90m", 5400), ("1h30m", 5400), ("45s", 45), ("7d", 604800), ("1.5h", 5400)],
)
def test_durations(text: str, seconds: int) -> None:
    assert annotations.parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "24", "h", "1x", "-1h", "1h 30m", "PT1H"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        annotations.parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"), [(720 * 3600, "720h"), (600, "10m"), (5400, "1h30m"), (45, "45s")]
)
def test_format_duration(seconds: int, text: str) -> None:
    assert annotations.format_duration(datetime.timedelta(seconds=seconds)) == text


def test_a_mode_written_in_capitals_is_read_as_meant_for_the_other_checks() -> None:
    message = problems({"kubemtls.io/mode": "Transparent", "kubemtls.io/inbound": "8080"})
    assert message.startswith("kubemtls.io annotations are not valid:\n")  # one problem only
    assert "values are lowercase" in message


def test_an_unknown_mode_does_not_add_guesses_about_ports() -> None:
    message = problems({"kubemtls.io/mode": "sidecar", "kubemtls.io/inbound": "8080"})
    assert message.startswith("kubemtls.io annotations are not valid:\n")
    assert "inbound" not in message


def test_empty_values_mean_the_defaults() -> None:
    spec = parse({"kubemtls.io/mode": "", "kubemtls.io/inbound": " ", "kubemtls.io/protocol": ""})
    assert (spec.mode, spec.inbound, spec.protocol) == ("explicit", (), "tcp")

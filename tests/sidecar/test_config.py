"""Flags and KUBEMTLS_* environment → Config."""

from __future__ import annotations

import pytest
from dataplane import Files
from kubemtls_sidecar import config, contract, errors, flags


def test_environment_configures_the_sidecar_like_the_webhook_does(files: Files):
    env = {
        "KUBEMTLS_CERT_DIR": str(files.cert_dir),
        "KUBEMTLS_TRUST_DIR": str(files.trust_dir),
        "KUBEMTLS_INBOUND": "8443:127.0.0.1:8080,9443:127.0.0.1:9090",
        "KUBEMTLS_OUTBOUND": "15001=fhir.ehr.example.org:443",
        "KUBEMTLS_ALLOWED_PEER": "spiffe://cluster.local/ns/ehr/sa/*,spiffe://cluster.local/ns/a/sa/b",
        "KUBEMTLS_PROTOCOL": "http",
        "KUBEMTLS_LOG_FORMAT": "json",
        "KUBEMTLS_REQUIRE_BOUND_TOKEN": "true",
    }
    cfg = config.parse([], env=env)
    assert cfg.inbound == (
        config.Inbound(8443, "127.0.0.1", 8080),
        config.Inbound(9443, "127.0.0.1", 9090),
    )
    assert cfg.outbound == (config.Outbound(15001, "fhir.ehr.example.org", 443),)
    assert len(cfg.allowed_peers) == 2
    assert cfg.protocol == "http"
    assert cfg.log_format == "json"
    assert cfg.require_bound_token
    assert cfg.admin_port == contract.ADMIN_PORT
    assert cfg.admin_address == "0.0.0.0"  # noqa: S104 - the default in a pod


def test_flags_win_over_environment(files: Files):
    env = {
        "KUBEMTLS_CERT_DIR": str(files.cert_dir),
        "KUBEMTLS_TRUST_DIR": str(files.trust_dir),
        "KUBEMTLS_ADMIN_PORT": "15020",
    }
    assert config.parse(["--admin-port", "16000"], env=env).admin_port == 16000


def test_transparent_mode_takes_bare_app_ports(files: Files):
    cfg = config.parse(
        [
            "--cert-dir",
            str(files.cert_dir),
            "--trust-dir",
            str(files.trust_dir),
            "--mode",
            "transparent",
            "--inbound",
            "8080,9090",
        ],
        env={},
    )
    assert [i.app_port for i in cfg.inbound] == [8080, 9090]
    assert all(i.listen_port is None for i in cfg.inbound)


def test_every_flag_has_help_with_default_and_env():
    text = " ".join(flags.build_parser().format_help().split())
    for flag in (
        "--signer",
        "--token-file",
        "--cert-dir",
        "--trust-dir",
        "--inbound",
        "--outbound",
        "--upstream-ca",
        "--allowed-peer",
        "--protocol",
        "--mode",
        "--admin-port",
        "--log-format",
        "--key-type",
        "--require-bound-token",
        "--install-redirects",
        "--handshake-timeout",
        "--idle-timeout",
        "--drain-timeout",
        "--max-connections",
        "--wait-ready",
        "--wait-ready-timeout",
    ):
        assert flag in text
    for f in flags.FLAGS:
        assert f.help, f.name
        shown = f.default if f.default is not None else "none"
        assert f"{' '.join(f.help.split())} [default: {shown}]" in text, f.name
        assert contract.env_name(f.name) in text, f.name


def test_wait_ready_reads_only_its_own_settings():
    env = {"KUBEMTLS_ADMIN_PORT": "15999", "KUBEMTLS_PROTOCOL": "bogus", "KUBEMTLS_INBOUND": "x"}
    assert config.wait_ready([], env=env) is None
    w = config.wait_ready(["--wait-ready"], env=env)
    assert w == config.WaitReady("127.0.0.1", 15999, 120.0)
    env["KUBEMTLS_ADMIN_ADDRESS"] = "::"
    env["KUBEMTLS_WAIT_READY_TIMEOUT"] = "5"
    assert config.wait_ready(["--wait-ready"], env=env) == config.WaitReady("::1", 15999, 5.0)
    with pytest.raises(errors.ConfigError, match="--admin-port"):
        config.wait_ready(["--wait-ready", "--admin-port", "0"], env={})


def test_port_clash_is_a_config_error(files: Files):
    with pytest.raises(errors.ConfigError, match="already used"):
        config.parse(
            [
                "--cert-dir",
                str(files.cert_dir),
                "--trust-dir",
                str(files.trust_dir),
                "--inbound",
                "15020:127.0.0.1:80",
            ],
            env={},
        )

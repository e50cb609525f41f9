"""``promtext``: prometheus-client's metric classes without its HTTP stack, same text out.

The sidecar renders ``/metrics`` itself (issue 5: the library's ``exposition`` module
brings the stdlib HTTP/WSGI/email stack, ~4 MiB per pod). Here, in the test process where
importing the library whole is fine, our bytes are compared with the library's own
``generate_latest`` for every kind of metric and sample it produces, and a fresh
interpreter shows what importing the sidecar's metrics loads and that a later plain
``import prometheus_client`` still gets the whole package.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import prometheus_client
from kubemtls_sidecar import metrics, promtext
from prometheus_client import exposition, metrics_core, registry, samples
from testkit import REPO


class _Odd(registry.Collector):
    """Families the metric classes never make: gauge histogram, unknown, timestamps, odd names."""

    def collect(self) -> list[metrics_core.Metric]:
        gh = metrics_core.GaugeHistogramMetricFamily(
            "queue_wait", "Waiting\\now\nsecond line", labels=["q"]
        )
        gh.add_metric(["a"], [("1.0", 3), ("+Inf", 5)], gsum_value=7.5)
        unknown = metrics_core.UnknownMetricFamily("legacy_thing", "untyped", labels=["x"])
        unknown.add_metric(["y"], 1e-7, timestamp=1700000000.123)
        timed = metrics_core.GaugeMetricFamily("timed", "with a Timestamp")
        timed.samples.append(samples.Sample("timed", {}, 2.0, samples.Timestamp(1700000000, 5e8)))
        try:  # UTF-8 names: newer prometheus-client versions accept them, older ones refuse
            weird = metrics_core.CounterMetricFamily("my.app:9requests", "dots and colons")
        except ValueError:
            return [gh, unknown, timed]
        weird.add_metric([], 12345678.0)
        weird.samples.append(samples.Sample("my.app:9requests", {"la-bel": "v", "9x": "w"}, 1))
        return [gh, unknown, timed, weird]


def _everything() -> registry.CollectorRegistry:
    reg = registry.CollectorRegistry(auto_describe=True)
    c = prometheus_client.Counter("jobs", "Jobs done", ["kind", "result"], registry=reg)
    c.labels("a", "ok").inc()
    c.labels('quote " back \\ slash', "new\nline").inc(2.5)
    c.labels("ünï©ødé", "").inc(0)
    prometheus_client.Counter("plain", "No labels", registry=reg).inc(10**12)
    g = prometheus_client.Gauge("temp", "Has a \\ backslash\nand a newline", ["room"], registry=reg)
    g.labels("x").set(float("nan"))
    g.labels("y").set(float("-inf"))
    g.labels("z").set(-0.000001)
    prometheus_client.Gauge("untouched", "Never set", registry=reg)
    h = prometheus_client.Histogram(
        "lat_seconds", "Latency", ["dir"], buckets=(0.001, 0.5, 10.0), registry=reg
    )
    for v in (0.0005, 0.2, 3.0, 99.0):
        h.labels("in").observe(v)
    prometheus_client.Summary("size_bytes", "Sizes", registry=reg).observe(1234)
    prometheus_client.Info("build", "Build facts", registry=reg).info({"version": "1.0"})
    prometheus_client.Enum("state", "State", states=["up", "down"], registry=reg).state("down")
    reg.register(_Odd())
    return reg


def test_render_is_byte_for_byte_generate_latest() -> None:
    reg = _everything()
    ours = promtext.render(reg)
    assert ours == exposition.generate_latest(reg)
    for needle in (b"_created", b"+Inf", b"NaN", b"-Inf", b'\\"', b"\\n", b"_gsum", b"untyped"):
        assert needle in ours, needle  # the cases above are really exercised


def test_the_sidecar_metrics_render_as_the_library_does() -> None:
    m = metrics.Metrics()
    m.connections.labels("inbound", "ok").inc()
    m.handshake_seconds.labels("outbound").observe(0.004)
    m.cert_serial_info.labels("1f", "spiffe://cluster.local/ns/a/sa/b").set(1)
    m.cert_not_after.set(time.time() + 3600)
    m.crl_stale.labels("CN=root").set(0)
    m.renewal_failures.inc()
    with m.flow("inbound", _Side()) as flow:
        flow.flush()
        body = m.exposition()
    assert body == exposition.generate_latest(m.registry)
    assert b'kubemtls_sidecar_bytes_total{direction="inbound",flow="rx"} 3.0' in body
    # the classes are the library's own, and the content type is what its handlers send
    assert promtext.Counter is prometheus_client.Counter
    assert promtext.CollectorRegistry is prometheus_client.CollectorRegistry
    plain = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)
    assert plain == promtext.CONTENT_TYPE  # older versions: CONTENT_TYPE_LATEST was 0.0.4


class _Side:
    bytes_in = 3
    bytes_out = 4


_FRESH = """
import json, sys
from kubemtls_sidecar import metrics, promtext
m = metrics.Metrics()
m.reloads.labels("cert").inc()
body = m.exposition()
before = sorted(n for n in %r if n in sys.modules)
import prometheus_client                               # a later importer gets the package:
from prometheus_client import generate_latest, Counter  # names only __init__ defines
import prometheus_client.exposition as e
print(json.dumps({
    "before": before,
    "same": generate_latest(m.registry) == body,
    "classes": Counter is promtext.Counter and prometheus_client.Gauge is promtext.Gauge,
    "registry": prometheus_client.REGISTRY is prometheus_client.registry.REGISTRY,
    "module": e.generate_latest is generate_latest,
}))
"""


def test_a_fresh_sidecar_loads_no_http_stack_and_the_package_still_works() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _FRESH % (promtext.HTTP_STACK,)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert json.loads(done.stdout) == {
        "before": [],
        "same": True,
        "classes": True,
        "registry": True,
        "module": True,
    }, done.stderr

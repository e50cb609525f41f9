"""prometheus-client's metric classes without its HTTP stack, and the text format they render.

Why this exists: ``import prometheus_client`` runs the package ``__init__``, which imports
``exposition`` and with it the stdlib's HTTP server, WSGI, urllib.request, email, gzip, bz2
and lzma: ~4 MiB of resident memory in a process that runs once per pod and serves
``/metrics`` itself (``admin``). The sidecar needs only ``metrics`` and ``registry``, which
import nothing heavy. So, when nothing in the process has imported ``prometheus_client``
yet, its package module is created from its spec *without running* ``__init__``, the two
submodules are imported under it, and the package is left in ``sys.modules`` with a
module ``__getattr__`` that runs the real ``__init__`` the first time anyone asks it for a
name a submodule did not provide (``import prometheus_client; prometheus_client.REGISTRY``
and ``from prometheus_client import generate_latest`` keep working in any later importer).
If the package is already imported (the tests, another library), it is used as it is.

``render`` is ``prometheus_client.exposition.generate_latest`` (default escaping) written
again over ``registry.collect()``: the same bytes for every sample the library produces
(counters with ``_total``/``_created``, gauges, histograms, info, state sets, timestamps,
escaped label values and help), which ``tests/sidecar/test_promtext.py`` checks against
the library's own function. ``CONTENT_TYPE`` is what the library's own handlers send with
that body (``CONTENT_TYPE_PLAIN_0_0_4``).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from typing import TYPE_CHECKING, SupportsFloat

__all__ = [
    "CONTENT_TYPE",
    "HTTP_STACK",
    "CollectorRegistry",
    "Counter",
    "Gauge",
    "Histogram",
    "render",
]

_PKG = "prometheus_client"

#: Modules the package ``__init__`` (its ``exposition``) would load and a process using only
#: this module does without (the sidecar's tests check that none of them is ever loaded).
HTTP_STACK = (
    "prometheus_client.exposition",
    "http.server",
    "http.client",
    "urllib.request",
    "wsgiref.simple_server",
    "email.message",
    "gzip",
)

#: Sent with ``render``'s body (prometheus-client's ``CONTENT_TYPE_PLAIN_0_0_4``).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _defer_package_init() -> None:
    """Unless imported already, put ``prometheus_client`` in ``sys.modules`` with its
    ``__init__`` deferred, and import ``registry``, ``metrics`` and ``utils`` under it."""
    if _PKG in sys.modules:
        return
    spec = importlib.util.find_spec(_PKG)
    if spec is None or spec.loader is None:
        raise ImportError(f"No module named {_PKG!r}")
    loader = spec.loader
    new = importlib.util.module_from_spec(spec)
    loading = True

    def complete(name: str) -> object:
        # The first name no loaded submodule provides: run the real __init__ now (once).
        if loading or new.__dict__.pop("__getattr__", None) is None:
            raise AttributeError(f"module {_PKG!r} has no attribute {name!r}")
        loader.exec_module(new)
        return getattr(new, name)

    new.__getattr__ = complete  # type: ignore[method-assign]
    sys.modules[_PKG] = new
    try:
        for sub in ("registry", "metrics", "utils"):
            importlib.import_module(f"{_PKG}.{sub}")
    except BaseException:
        if sys.modules.get(_PKG) is new:
            del sys.modules[_PKG]
        raise
    finally:
        loading = False


if TYPE_CHECKING:
    from prometheus_client.metrics import Counter, Gauge, Histogram
    from prometheus_client.registry import CollectorRegistry

    def _number(value: float) -> str:  # prometheus_client.utils.floatToGoString (untyped)
        ...
else:
    _defer_package_init()
    _metrics, _registry, _utils = (
        importlib.import_module(f"{_PKG}.{sub}") for sub in ("metrics", "registry", "utils")
    )
    Counter, Gauge, Histogram = _metrics.Counter, _metrics.Gauge, _metrics.Histogram
    CollectorRegistry = _registry.CollectorRegistry
    _number = _utils.floatToGoString

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_TYPES = {"counter": "counter", "info": "gauge", "stateset": "gauge"}
_TYPES |= {"gaugehistogram": "histogram", "unknown": "untyped"}
_SUFFIX = {"counter": "_total", "info": "_info"}
_OM_ONLY = ("_created", "_gsum", "_gcount")  # OpenMetrics samples: a gauge of their own


def _underscores(name: str, colon: bool) -> str:
    """A name with every character outside the legacy set made ``_`` (the default escaping)."""
    if (_METRIC_NAME if colon else _LABEL_NAME).match(name) or not name:
        return name
    return "".join(
        c
        if c.isascii() and (c.isalpha() or c == "_" or (colon and c == ":") or (i and c.isdigit()))
        else "_"
        for i, c in enumerate(name)
    )


def _help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _value(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _line(name: str, labels: dict[str, str], value: float, timestamp: SupportsFloat | None) -> str:
    out = _underscores(name, True)
    if labels:
        pairs = (f'{_underscores(k, False)}="{_value(v)}"' for k, v in sorted(labels.items()))
        out += "{" + ",".join(pairs) + "}"
    out += " " + _number(value)
    if timestamp is not None:
        out += f" {int(float(timestamp) * 1000):d}"
    return out + "\n"


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text format of everything ``registry`` collects."""
    out: list[str] = []
    for metric in registry.collect():
        name = metric.name + _SUFFIX.get(metric.type, "")
        kind = _TYPES.get(metric.type, metric.type)
        doc = _help(metric.documentation)
        out.append(f"# HELP {_underscores(name, True)} {doc}\n")
        out.append(f"# TYPE {_underscores(name, True)} {kind}\n")
        extra: dict[str, list[str]] = {}
        for s in metric.samples:
            line = _line(s.name, s.labels, s.value, s.timestamp)
            suffix = next((x for x in _OM_ONLY if s.name == metric.name + x), None)
            if suffix is None:
                out.append(line)
            else:
                extra.setdefault(suffix, []).append(line)
        for suffix, lines in sorted(extra.items()):
            own = _underscores(metric.name + suffix, True)
            out.append(f"# HELP {own} {doc}\n# TYPE {own} gauge\n")
            out.extend(lines)
    return "".join(out).encode("utf-8")

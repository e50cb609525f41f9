"""What the benchmarks that drive load with ``wrk`` share: its summary line and its parse.

``wrk`` (Debian package; one thread, kept-alive connections, a Lua script) is the load
generator of ``admission_bench.py`` and ``signing_bench.py``: compiled, it costs a fraction
of a Python client's CPU per request on a 2-core machine that also runs what it measures.
Each script's Lua ends with :data:`DONE_LUA`, which prints one line that :func:`result` reads.
"""

from __future__ import annotations

import dataclasses

__all__ = ["DONE_LUA", "WrkResult", "result"]

#: Lua ``done()``: one ``WRK_RESULT`` line (requests, µs, socket errors, non-2xx, p50/p99/max
#: µs). Written for a Python ``%`` template: ``%%`` stands for Lua's ``%``.
DONE_LUA = r"""
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK_RESULT %%d %%d %%d %%d %%d %%d %%d\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


@dataclasses.dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    socket_errors: int
    non_2xx: int
    p50: float  # seconds
    p99: float
    max: float


def result(stdout: str) -> WrkResult:
    """The ``WRK_RESULT`` line of a run whose script ends with :data:`DONE_LUA`."""
    line = next(x for x in stdout.splitlines() if x.startswith("WRK_RESULT"))
    n, duration_us, errors, non2xx, p50, p99, top = (int(x) for x in line.split()[1:])
    return WrkResult(n, duration_us / 1e6, errors, non2xx, p50 / 1e6, p99 / 1e6, top / 1e6)

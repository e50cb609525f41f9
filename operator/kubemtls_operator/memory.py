"""The operator process's memory hygiene: what it never imports, shares, and gives back.

Issue 3 bounds the operator's RSS with 10,000 MTLSCerts (10,000 pods and their MTLSCerts,
the pods watched by kopf, the MTLSCerts by ``certwatch``). Measured with
``bench/operator_heap.py`` (tracemalloc) and
``bench/signing_bench.py --seconds 0 --pods 0 --rss-certs 10000``:

- kopf imports the ``kubernetes`` client when it is installed (it is a dependency of ours),
  only to recognise that library's model objects if a handler hands it one. This operator
  never does, and never uses that library: it talks to the API with aiohttp (``kube``) and
  logs in with kopf's own parsers. The import alone (pydantic, dateutil, google-auth, urllib3,
  multiprocessing...) is ~20 MiB of RSS. :func:`prepare_process` keeps it out, before kopf
  is first imported; anything that did import it afterwards fails loudly (ImportError).
- kopf copies the operator's memo for every object it sees (~210 bytes each, 20,000
  objects here). The handlers only read ``memo.config`` and ``memo.runtime``, set once at
  start-up: :func:`shared_memo` is handed to kopf instead, and every object shares it.
- glibc keeps freed heap after a burst: :func:`trim` gives it back. :func:`keep_trimmed`
  (a task of the operator) trims whenever RSS has grown by 1 MiB since the last trim, checked
  every 5 s (~0.3 ms of CPU per trim with 10,000 MTLSCerts; none while RSS stands still),
  and the MTLSCert sweep trims after each pass. No-ops without glibc.
- glibc gives each thread that allocates its own arena (up to 8 per core); the operator's
  threads (libuv's resolver pool, kopf's executor) do little: :func:`limit_arenas` caps them
  at 2 (2.5 MiB less with 10,000 MTLSCerts), before any thread exists.

:func:`prepare_process` and :func:`shared_memo` are for the operator's own process only
(``kubemtls-operator`` / ``python -m kubemtls_operator``): a test process, or anything else
embedding kopf, keeps kopf's defaults. The trim task runs wherever the operator's runtime
does (``wiring.start``).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # not at run time: this module is imported before kopf (prepare_process)
    import kopf

__all__ = [
    "ARENA_MAX",
    "UNUSED_MODULES",
    "keep_trimmed",
    "limit_arenas",
    "prepare_process",
    "rss_bytes",
    "shared_memo",
    "trim",
]

#: Top-level packages kopf imports when installed, and this operator never uses.
UNUSED_MODULES = ("kubernetes",)
#: glibc malloc arenas (the main one included).
ARENA_MAX = 2
_M_ARENA_MAX = -8  # mallopt parameter, <malloc.h>
TRIM_INTERVAL, TRIM_GROWTH = 5.0, 1 << 20


def prepare_process() -> list[str]:
    """At the start of the operator's process, before kopf is imported and threads exist:
    keep :data:`UNUSED_MODULES` from ever being imported, and :func:`limit_arenas`.

    Returns the modules it blocked: one imported already (by something else in the same
    process) is left as it is.
    """
    blocked = []
    for name in UNUSED_MODULES:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # import → ImportError
            blocked.append(name)
    limit_arenas()
    return blocked


def limit_arenas(arenas: int = ARENA_MAX) -> bool:
    """``mallopt(M_ARENA_MAX, arenas)``: True if set (glibc only; threads started later)."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_ARENA_MAX, arenas))


def shared_memo(**values: Any) -> kopf.Memo:
    """A kopf memo that every object shares instead of getting a copy (``copy`` → itself).

    Only for memos that handlers read and never write per object: here ``config`` and
    ``runtime``, set by the startup handler on the memo kopf passes to it (this one).
    """
    return _shared_memo_class()(**values)


@functools.cache
def _shared_memo_class() -> type[kopf.Memo]:
    import kopf

    class SharedMemo(kopf.Memo):
        def __copy__(self) -> SharedMemo:
            return self

        def __deepcopy__(self, _: dict[int, Any]) -> SharedMemo:
            return self

    return SharedMemo


@functools.cache
def _libc() -> Any:
    """glibc, or None (musl, macOS...): only glibc has ``malloc_trim``."""
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def trim() -> bool:
    """Return the free heap at glibc's disposal to the OS; True if any was released.

    ~0.3 ms of CPU with 10,000 MTLSCerts. No-op (False) without glibc.
    """
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))


def rss_bytes() -> int:
    """This process's resident set size (0 where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


async def keep_trimmed(interval: float = TRIM_INTERVAL, growth: int = TRIM_GROWTH) -> None:
    """Every ``interval`` seconds: :func:`trim` if RSS grew by ``growth`` since the last trim
    (a burst of pods or signing requests), else nothing. Runs until cancelled."""
    if _libc() is None:
        return
    floor = rss_bytes()
    while True:
        await asyncio.sleep(interval)
        rss = rss_bytes()
        if rss - floor >= growth:
            trim()
            floor = rss_bytes()
        else:
            floor = min(floor, rss)

"""``kubemtls-operator``: the kopf operator, its webhook server and the signing API.

Reads the settings (``KUBEMTLS_OPERATOR_*`` or ``--<name>`` flags; a bad value → one line
and exit 2), then runs kopf cluster-wide with the handlers of ``kubemtls_operator.handlers``
in one event loop with the signing API, metrics and health endpoints (started by the
startup handler). The standard KUBECONFIG / in-cluster configuration decides the cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
from collections.abc import Sequence

from kubemtls_operator import memory

memory.prepare_process()  # before kopf is imported: it would load what we never use

import kopf  # noqa: E402
import uvloop  # noqa: E402

from kubemtls_operator import config, errors  # noqa: E402

__all__ = ["main", "parse_args"]


def parse_args(argv: Sequence[str] | None = None) -> tuple[dict[str, str], bool]:
    """Flags → ({NAME: value}, verbose)."""
    ap = argparse.ArgumentParser(
        prog="kubemtls-operator",
        description="kubemtls operator: per-pod certificates, signing API, CA, webhook. "
        "Every flag is also the environment variable KUBEMTLS_OPERATOR_<NAME>.",
    )
    for name in config.SETTINGS:
        ap.add_argument("--" + name.lower().replace("_", "-"), dest=name, metavar="VALUE")
    ap.add_argument("--verbose", action="store_true", help="debug logging")
    ns = vars(ap.parse_args(argv))
    verbose = bool(ns.pop("verbose"))
    return {k: v for k, v in ns.items() if v is not None}, verbose


def main(argv: Sequence[str] | None = None) -> int:
    overrides, verbose = parse_args(argv)
    try:
        cfg = config.from_environ(overrides)
    except errors.ConfigInvalid as e:
        print(f"kubemtls-operator: {e}", file=sys.stderr)
        return 2
    from kubemtls_operator import handlers  # noqa: F401 - registers the handlers

    fmt = kopf.LogFormat.JSON if cfg.log_format == "json" else kopf.LogFormat.FULL
    kopf.configure(verbose=verbose, log_format=fmt)
    # One line per webhook review and signing request is noise at this rate (~8 % of a
    # review's CPU); refusals are logged by the handlers themselves, with pod and reason.
    logging.getLogger("aiohttp.access").setLevel(logging.DEBUG if verbose else logging.WARNING)
    # uvloop, as ``kopf run`` itself picks when installed: ~5 % less CPU per review/cert.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        kopf.run(
            loop=runner.get_loop(),
            clusterwide=True,
            standalone=not cfg.peering,
            peering_name=cfg.peering or None,
            priority=random.randint(1, 2**31),  # noqa: S311 - distinct, not secret
            memo=memory.shared_memo(config=cfg),  # one for all objects (memory.py)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``kubemtls-sidecar``: parse the configuration, then run the proxy (or install redirects).

A wrong flag or certificate file ends here with exit 2 and one line on stderr that says
which and why (``ConfigError``); everything else is in ``app``. ``--wait-ready`` (the
postStart hook) is answered before anything heavy is imported: ``app`` (and with it
prometheus_client, h11) loads only when the proxy runs. ``cryptography`` never loads in
this process: the ``vet`` child does that work (``vetted``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kubemtls_sidecar import config, errors

__all__ = ["main"]

if TYPE_CHECKING:
    import asyncio


def _loop_factory() -> asyncio.AbstractEventLoop:
    import asyncio

    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def main(argv: Sequence[str] | None = None) -> int:
    try:
        wait = config.wait_ready(argv)
        if wait is not None:
            from kubemtls_sidecar import waitready

            return waitready.run(wait)
        cfg = config.parse(argv)
        from kubemtls_sidecar import app, logs

        logs.setup(cfg.log_format, cfg.log_level)
        if cfg.install_redirects:
            from kubemtls_sidecar import transparent

            try:
                transparent.install_redirects(cfg)
            except errors.ConfigError:
                raise
            except errors.KubemtlsError as e:  # iptables refused: not a config error
                print(f"kubemtls-sidecar: {e}", file=sys.stderr)
                return 1
            return 0
        import asyncio

        from kubemtls_sidecar import pipe

        pipe.steady_allocator()  # bulk chunks reuse heap pages instead of faulting (pipe.py)
        with asyncio.Runner(loop_factory=_loop_factory) as runner:
            return runner.run(app.run(cfg))
    except errors.ConfigError as e:
        print(f"kubemtls-sidecar: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

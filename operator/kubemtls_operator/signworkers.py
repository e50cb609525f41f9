"""Signing worker processes: the signing API's front on every core (``SIGNING_WORKERS=N``).

Most of a certificate's CPU is the front's (TLS, HTTP, the CSR's signature check, building
and signing the leaf: ``signfront``). With one event loop for all of it, the operator's
loop is the bottleneck long before the machine is (bench/RESULTS.md). The :class:`Pool`
starts N ``python -m kubemtls_operator.signworker`` processes that each listen on the
signing port (SO_REUSEPORT: the kernel spreads connections over them); each reaches the
:class:`signing.Signer` in this process over its own socket pair (``signwire``):

- every decision stays here: the token review, the pod, the identity and lifetime, and
  which CA signs. A worker signs only with the CA of the grant it was given, and receives
  that CA before the grant (an unpublished CA never reaches a worker);
- every serial is recorded here (the recorder) before the worker answers, as in process;
- metrics are counted here (workers send their refusals and latencies in batches), so
  ``/metrics`` is one endpoint.

A worker that exits is started again (backoff 1 s → 30 s); its in-flight requests fail
(the sidecars retry). Workers exit when their socket pair closes: with the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import sys
from typing import Any

from kubemtls_operator import (
    config,
    errors,
    metrics,
    serving,
    signfront,
    signing,
    signwire,
    signworker,
)

__all__ = ["Pool"]

logger = logging.getLogger(__name__)

#: A worker that lived this long before it exited is restarted at once (no backoff).
_STABLE = 60.0
_BACKOFF_MAX = 30.0


@dataclasses.dataclass
class _Link:
    """One worker's socket pair, seen from the operator."""

    pool: Pool
    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    sent_gens: set[int] = dataclasses.field(default_factory=set)
    ready: bool = False
    tasks: set[asyncio.Task[None]] = dataclasses.field(default_factory=set)

    def send(self, msg: signwire.Message) -> None:
        if not self.writer.is_closing():
            self.writer.write(signwire.encode(msg))

    async def serve(self) -> None:
        """Answer the worker until it closes its end."""
        while line := await self.reader.readline():
            try:
                msg = signwire.decode(line)
            except ValueError:
                logger.error("signing worker %d sent a malformed message; closing", self.index)
                break
            kind = msg["t"]
            if kind == "auth":
                self._spawn(self._auth(msg))
            elif kind == "rec":
                self._spawn(self._record(msg))
            elif kind == "trust":
                self._spawn(self._trust(msg))
            elif kind == "stats":
                _count(msg)
            elif kind == "ready" and not self.ready:
                self.ready = True
                metrics.SIGNING_WORKERS.inc()
                logger.info("signing worker %d listens", self.index)

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        self.writer.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _answer_error(self, msg: signwire.Message, e: Exception) -> None:
        if not isinstance(e, signfront.Refused):
            logger.error("signing worker %d: %s failed", self.index, msg["t"], exc_info=e)
            e = signfront.Refused(500, "InternalError", "the signer failed; retry")
        self.send({"t": "r", "id": msg["id"], "err": signwire.err(e)})

    async def _auth(self, msg: signwire.Message) -> None:
        try:
            grant = await self.pool.signer.authorize(str(msg["token"]))
        except Exception as e:
            self._answer_error(msg, e)
            return
        self.send({"t": "r", "id": msg["id"], "ok": self._grant_fields(grant)})

    def _grant_fields(self, grant: signfront.Grant) -> signwire.Message:
        """``grant`` as a worker gets it, its CA sent first when this worker lacks it."""
        return signwire.grant_fields(grant, self.send_ca(grant.published))

    def send_ca(self, pub: signfront.Published) -> int:
        """The generation of ``pub``, sent to this worker first if it does not have it."""
        gen = self.pool.generation(pub)
        if gen not in self.sent_gens:
            self.send(signwire.ca_message(gen, pub))
            self.sent_gens.add(gen)
        return gen

    async def _record(self, msg: signwire.Message) -> None:
        """Check the token again (the worker may have signed on a cached grant), then record."""
        try:
            grant = await self.pool.signer.authorize(str(msg["token"]))
            if not signwire.same_grant(self._grant_fields(grant), msg["grant"]):
                raise signfront.Refused(
                    503,
                    "GrantChanged",
                    "the pod's identity or the signing CA changed while signing; retry",
                    grant.pod,
                )
            async with asyncio.timeout(signfront.RECORD_TIMEOUT):
                await self.pool.signer.record(grant, signwire.to_issued(msg))
        except TimeoutError:
            self._answer_error(
                msg,
                signfront.Refused(
                    503,
                    "StatusNotRecorded",
                    "the certificate could not be recorded in its MTLSCert in time; retry",
                ),
            )
        except Exception as e:
            self._answer_error(msg, e)
        else:
            self.send({"t": "r", "id": msg["id"]})

    async def _trust(self, msg: signwire.Message) -> None:
        try:
            pod, body = await self.pool.signer.trust(str(msg["token"]))
        except Exception as e:
            self._answer_error(msg, e)
        else:
            self.send({"t": "r", "id": msg["id"], "pod": pod, "body": body.decode()})


def _same_content(a: signfront.Published, b: signfront.Published) -> bool:
    return (
        a.signing.cert == b.signing.cert
        and a.signing.chain == b.signing.chain
        and a.bundle == b.bundle
        and a.crl == b.crl
    )


def _count(msg: signwire.Message) -> None:
    for seconds in msg.get("lat", ()):
        metrics.SIGNING_LATENCY.observe(float(seconds))
    for reason, n in (msg.get("refused") or {}).items():
        metrics.REFUSED.labels(str(reason)).inc(int(n))


@dataclasses.dataclass
class Pool:
    signer: signing.Signer
    serving: serving.ServingCert
    cfg: config.Config
    log_level: int = logging.INFO
    links: dict[int, _Link] = dataclasses.field(default_factory=dict)
    _tasks: list[asyncio.Task[None]] = dataclasses.field(default_factory=list)
    _gen: int = 0
    _gen_of: signfront.Published | None = None

    @property
    def size(self) -> int:
        return self.cfg.signing_workers

    @property
    def listening(self) -> int:
        """How many workers accept connections now."""
        return sum(link.ready for link in self.links.values())

    def generation(self, pub: signfront.Published) -> int:
        """A number for what ``pub`` says: the signing CA, the bundle and the CRL.

        The signer makes a new object for every new Authority, and the CA manager loads one
        on every check (CHECK_INTERVAL) even when nothing changed: a new number then would
        send every worker the CA again and drop the grants it cached, for nothing.
        """
        prev = self._gen_of
        if pub is not prev:
            if prev is None or not _same_content(pub, prev):
                self._gen += 1
            self._gen_of = pub
        return self._gen

    async def start(self) -> None:
        """Check that the signing port can be bound (else this raises), and start N workers."""
        try:
            signworker.listening_socket(self.cfg.bind_address, self.cfg.signer_port).close()
        except OSError as e:
            raise errors.ConfigInvalid(
                f"cannot listen on {self.cfg.bind_address}:{self.cfg.signer_port}: {e}"
            ) from e
        for i in range(self.size):
            self._tasks.append(asyncio.create_task(self._keep(i), name=f"signing worker {i}"))
        metrics.SIGNING_WORKERS.set(0)

    def publish(self) -> None:
        """A new CA or CRL: every worker gets it now (and drops the grants it cached)."""
        try:
            pub = self.signer.published()
        except signfront.Refused:
            return  # no CA can sign: workers learn of the next one with their next grant
        for link in self.links.values():
            link.send_ca(pub)

    def reload_serving(self) -> None:
        """The serving certificate's files changed: every worker loads them again."""
        for link in self.links.values():
            link.send({"t": "serving"})

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _keep(self, index: int) -> None:
        delay = 1.0
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                code = await self._run(index)
            except OSError as e:
                code = None
                logger.error("signing worker %d could not start: %s", index, e)
            if loop.time() - started > _STABLE:
                delay = 1.0
            logger.error(
                "signing worker %d exited (code %s); starting it again in %.0fs",
                index,
                code,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX)

    def _command(self, ipc_fd: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "kubemtls_operator.signworker",
            *("--host", self.cfg.bind_address, "--port", str(self.cfg.signer_port)),
            *("--ipc-fd", str(ipc_fd)),
            *("--certfile", str(self.serving.certfile), "--keyfile", str(self.serving.keyfile)),
            *("--renew-fraction", repr(self.cfg.renew_fraction)),
            *("--log-format", self.cfg.log_format, "--log-level", str(self.log_level)),
        ]

    async def _run(self, index: int) -> int | None:
        """One worker's life: start it, answer it, and return its exit code."""
        ours, theirs = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._command(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        link = self.links[index] = _Link(self, index, reader, writer)
        logger.info("signing worker %d started (pid %d)", index, proc.pid)
        serving_ = asyncio.create_task(link.serve())
        exited = asyncio.create_task(proc.wait())
        try:
            await asyncio.wait({serving_, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if link.ready:
                metrics.SIGNING_WORKERS.dec()
            self.links.pop(index, None)
            link.close()
            serving_.cancel()
            if proc.returncode is None:  # the link ended first, or the operator stops
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                await asyncio.wait({exited}, timeout=5.0)  # (wait_for would cancel it)
                if not exited.done():
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await exited
        return proc.returncode

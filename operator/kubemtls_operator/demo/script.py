"""``kubemtls demo``: the narrated scenario, one readable line per step, and its results.

``run(Options(...), out)`` brings the stage up (API server, operator, EHR, pods), plays the
scenes, prints each outcome as it happens and returns a ``Result`` with one ``Scene`` per
outcome (the end-to-end test asserts on those, not on the text). A scene that cannot run —
because a part it needs failed earlier — says so (``skip``) instead of pretending; nothing
prints PASS that was not observed. Everything is cleaned up in all cases.
"""

from __future__ import annotations

import dataclasses
import pathlib
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from kubemtls_sidecar import contract

from kubemtls_operator.demo import netns, report, scenes, stage

__all__ = ["Options", "run"]


@dataclasses.dataclass(frozen=True)
class Options:
    use_netns: bool = True  # network namespaces when root; loopback otherwise
    keep_running: bool = False
    workdir: pathlib.Path | None = None


Step = Callable[[], str]


def _step(n: report.Narrator, name: str, label: str, fn: Step) -> bool:
    """Run one bring-up step; record it as a scene; False if it failed."""
    try:
        text = fn()
    except Exception as e:
        n.scene(report.Scene(name, "fail", f"{type(e).__name__}: {e}"))
        return False
    n.say(label, text)
    return True


def run(options: Options, out: TextIO = sys.stdout) -> report.Result:
    """Play the whole demo; always clean up. Ctrl-C stops it (and cleans up)."""
    why_not = netns.available() if options.use_netns else "--no-netns"
    mode = "network namespaces" if why_not is None else f"loopback ({why_not})"
    result = report.Result(mode=mode)
    n = report.Narrator(out, result)
    st = stage.Stage(use_netns=why_not is None, workdir=options.workdir)
    result.workdir, result.run_id = str(st.workdir), st.run_id
    n.say("demo", f"kubemtls: per-pod mTLS to an EHR, on this machine ({mode})")
    try:
        if _bring_up(n, st):
            scenes.play(n, st)
        else:
            scenes.skip_all(n, "the stage did not come up (see the FAIL line above)")
        if options.keep_running:
            try:
                _wait_for_ctrl_c(n, st)
            except KeyboardInterrupt:
                n.say("demo", "Ctrl-C: cleaning up")  # the expected way to end it
    except KeyboardInterrupt:
        n.say("demo", "interrupted: cleaning up")
        result.scenes.append(report.Scene("interrupted", "fail", "stopped by Ctrl-C"))
    finally:
        result.pids = st.pids()
        kept = st.save_logs() if st.own_workdir and not result.ok else None
        result.leftovers = st.close(keep_workdir=options.workdir is not None)
        result.leftovers += [x for x in netns.leftovers(st.run_id) if why_not is None]
        result.leftovers += [f"process {p}" for p in stage.live_processes(result.pids)]
        result.seconds = n.elapsed()
        passed = sum(s.status == "pass" for s in result.scenes)
        verdict = "all passed" if result.ok else f"{passed}/{len(result.scenes)} passed"
        left = f"; LEFT BEHIND: {', '.join(result.leftovers)}" if result.leftovers else ""
        logs = f"; the logs are kept in {kept}" if kept else ""
        n.say("done", f"{verdict} in {result.seconds:.1f}s; cleaned up{left}{logs}")
    return result


def _bring_up(n: report.Narrator, st: stage.Stage) -> bool:
    def network() -> str:
        st.up_network()
        if st.net is None:
            return "loopback: every pod port is remapped to a free 127.0.0.1 port"
        return f"bridge {st.net.bridge} {st.net.subnet}: host {st.host_ip}, one netns per pod"

    def control_plane() -> str:
        st.up_control_plane()
        c = st.cluster
        return (
            f"emulated API server {c.url} (admission on); kubemtls-operator up: webhook "
            f"registered at {c.webhook_url}, signing API {c.signer_url}"
        )

    def ehr() -> str:
        st.up_ehr()
        assert st.ehr is not None
        where = (
            f"https://{stage.EHR_HOST} ({st.host_ip}:{st.ehr.port})"
            if st.net
            else f"https://127.0.0.1:{st.ehr.port} (standing in for {stage.EHR_HOST})"
        )
        return (
            f"mock EHR, FHIR R4, at {where}: serving cert from its own partner CA; "
            "client certificates from the cluster CA required, CRL enforced"
        )

    def apply() -> str:
        st.apply("namespace")
        st.apply_partner_ca()
        made = []
        for name in ("peer-api", "ehr-client", "batch-export"):
            pod = st.apply(name)[0]
            st.applied[name] = pod
            names = [c["name"] for c in _all_containers(pod)]
            made.append(f"pod/{name} [{', '.join(names)}]")
            if contract.SIDECAR_CONTAINER_NAME not in names:
                raise RuntimeError(f"the webhook did not inject a sidecar into pod/{name}")
        return "created (webhook-patched): " + "; ".join(made)

    def run_pods() -> str:
        text = []
        for name in ("peer-api", "ehr-client"):
            runner = st.run_pod(st.applied[name])
            where = runner.net.netns if runner.net else "loopback"
            text.append(f"{name} ({runner.ip}, {where})")
        return "running, sidecars ready: " + ", ".join(text)

    steps: list[tuple[str, str, Step]] = [
        ("network", "network", network),
        ("control plane", "cluster", control_plane),
        ("EHR", "ehr", ehr),
        ("kubectl apply", "apply", apply),
        ("pods", "pods", run_pods),
    ]
    return all(_step(n, name, label, fn) for name, label, fn in steps)


def _all_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod.get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _wait_for_ctrl_c(n: report.Narrator, st: stage.Stage) -> None:
    kubectl = "kubectl"
    n.say("running", "left up until Ctrl-C. Try:")
    lines = [
        f"export KUBECONFIG={st.cluster.kubeconfig}",
        f"{kubectl} get pods,mtlscerts -n {stage.NAMESPACE}",
        f"{kubectl} annotate mtlscert ehr-client -n {stage.NAMESPACE} "
        f"{contract.ANN_REVOKE}=keyCompromise",
        f"tail -f {st.pods['ehr-client'].log_of('app') if 'ehr-client' in st.pods else '...'}",
        f"logs (every container, the API server, the operator, the EHR): {st.workdir / 'logs'}",
    ]
    if st.net is not None and "ehr-client" in st.net.pods:
        lines.append(
            f"ip netns exec {st.net.pods['ehr-client'].netns} "
            "curl -s http://127.0.0.1:15001/fhir/Patient/123"
        )
    n.block("\n".join(lines))
    signal.signal(signal.SIGTERM, _raise_interrupt)
    while True:
        time.sleep(3600)


def _raise_interrupt(*_: Any) -> None:
    raise KeyboardInterrupt

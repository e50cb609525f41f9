"""An emulated Kubernetes API server for the demo and the tests (adopted from shared/k8semu).

kmock 0.8's ``KubernetesEmulator`` plus what kopf and kubectl need: resourceVersions,
uids, namespaces, owner GC, selectors, TokenReview/TokenRequest, and admission webhooks
called the way kube-apiserver calls them. It listens on 127.0.0.1 only and keeps its
state in memory. It is untyped code kept close to its origin, so it is excluded from
``mypy --strict`` (see pyproject.toml); it needs the ``kubemtls[demo]`` extra.

Run it as ``python -m kubemtls_operator.emu --port 0 --crd ... --ready-file ...``.
"""

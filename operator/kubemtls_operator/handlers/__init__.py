"""kopf's entry point: importing this package registers every handler.

``kopf run -m kubemtls_operator.handlers`` (or ``kubemtls-operator``) loads it. The modules
are glue only: parse → pure core → ``kube`` → status.
"""

from kubemtls_operator.handlers import admission, certs, lifecycle, pods

__all__ = ["admission", "certs", "lifecycle", "pods"]

# syntax=docker/dockerfile:1
# kubemtls images: one Dockerfile, two targets (DESIGN.md "Images").
#   docker build --target operator -t ghcr.io/kubemtls/kubemtls-operator:0.1.0 .
#   docker build --target sidecar  -t ghcr.io/kubemtls/kubemtls:0.1.0 .
# The builder makes the wheels; the final stages install them from a bind mount, so no
# compiler, build tool or wheel file ends up in a shipped image. Both run as non-root;
# the webhook always sets the sidecar's command, and runs kubemtls-init (the same image)
# as UID 0 with NET_ADMIN/NET_RAW only in transparent mode.

# The base image is pinned by tag on each FROM (update all three together).

# --- builder: our wheel, plus wheels of every dependency (same versions for both targets)
FROM python:3.11.14-slim-bookworm AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY sidecar/ sidecar/
COPY charts/kubemtls/crds/mtlscerts.yaml charts/kubemtls/crds/mtlscerts.yaml
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Then pin the sidecar's own dependencies to the versions just resolved for the operator
# (uvloop too: the sidecar runs without it, but its data path is measured on it).
RUN pip wheel --wheel-dir /wheels . \
 && find /wheels \( -name 'cryptography-*.whl' -o -name 'h11-*.whl' \
      -o -name 'prometheus_client-*.whl' -o -name 'uvloop-*.whl' \) -printf '%f\n' \
    | cut -d- -f1,2 | sed 's/-/==/' > /wheels/sidecar-requirements.txt \
 && test "$(wc -l < /wheels/sidecar-requirements.txt)" -eq 4

# --- operator: kopf, kubernetes, aiohttp, cryptography and the kubemtls wheel
FROM python:3.11.14-slim-bookworm AS operator
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN groupadd --system --gid 65532 kubemtls \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin kubemtls
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels /wheels/kubemtls-*.whl
USER 65532:65532
EXPOSE 9443 9444 9090 8080
# Kubernetes probes /healthz on 8080 (the chart); a Docker HEALTHCHECK would be ignored.
HEALTHCHECK NONE
ENTRYPOINT ["kubemtls-operator"]

# --- sidecar: only what kubemtls_sidecar imports (and uvloop), and iptables for kubemtls-init
FROM python:3.11.14-slim-bookworm AS sidecar
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# Debian package versions are not pinned: the base image tag pins the release, and a pin
# would break the build as soon as Debian ships a security update of iptables.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 1337 kubemtls-proxy \
 && useradd --system --uid 1337 --gid 1337 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin kubemtls-proxy
# The kubemtls wheel without its operator dependencies (kopf, kubernetes, aiohttp),
# plus the sidecar's own, at the versions the builder resolved (--no-index).
# (Dependencies first: pip then has nothing to complain about when --no-deps skips the rest.)
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels --requirement /wheels/sidecar-requirements.txt \
 && pip install --no-index --find-links /wheels --no-deps /wheels/kubemtls-*.whl
# UID 1337: the transparent-mode iptables rules exclude this UID's own traffic.
USER 1337:1337
EXPOSE 15020
HEALTHCHECK NONE
ENTRYPOINT ["kubemtls-sidecar"]

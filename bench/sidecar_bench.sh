#!/bin/sh
# The sidecar's data plane against HAProxy, nginx and stunnel (../shared/bench/peers.py).
#
#   sh bench/sidecar_bench.sh            # full run (3 rounds, several minutes)
#   sh bench/sidecar_bench.sh --quick    # smoke run (~1-2 min)
#   REF_TREE=/tmp/ref/sidecar PEERS=haproxy sh bench/sidecar_bench.sh --no-direct \
#       --workloads rr_c32,conn_c1,conn_c16 --rounds 3    # CPU per op, before vs after
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

# REF_TREE=DIR adds a second pair, "kubemtls-ref", running the sidecar package found in DIR
# (PYTHONPATH=DIR; e.g. `git archive REV sidecar | tar -x -C /tmp/ref` → REF_TREE=/tmp/ref/sidecar):
# before/after figures from the same run, interleaved with the other peers.
if [ -n "${REF_TREE:-}" ]; then
    REFPP="PYTHONPATH=$REF_TREE OPENSSL_CONF="
    set -- --plugin kubemtls-ref "$(echo "$CLIENT" | sed "s|OPENSSL_CONF=|$REFPP|")" \
        "$(echo "$SERVER" | sed "s|OPENSSL_CONF=|$REFPP|")" "$@"
fi

# ALT_SIDECAR=PATH adds a pair "kubemtls-alt" running another installation's
# kubemtls-sidecar (e.g. a venv built on a PGO+LTO Python, as the image's is): same code,
# another interpreter, in the same run.
if [ -n "${ALT_SIDECAR:-}" ]; then
    set -- --plugin kubemtls-alt "$(echo "$CLIENT" | sed "s|exec $SIDECAR|exec $ALT_SIDECAR|")" \
        "$(echo "$SERVER" | sed "s|exec $SIDECAR|exec $ALT_SIDECAR|")" "$@"
fi

exec python3 "$HARNESS" --peers "${PEERS:-haproxy,nginx,stunnel}" \
    --plugin kubemtls "$CLIENT" "$SERVER" \
    --out "bench/out/sidecar-$STAMP.json" --md "bench/out/sidecar-$STAMP.md" "$@"

#!/usr/bin/env bash
# TLS vs plain, side by side (issue 13): fan-out 1,000 subscribers x 100/s, 128 B, rounds alternating
# ws:// and wss:// (`ringcast bench fanout --compare`), and idle memory per connection at 10,000, each
# on a fresh server. Run it under the shared lock, with a copied binary:
#   flock /tmp/ringcast-cargo.lock scripts/bench-tls.sh /tmp/tls-ringcast
set -euo pipefail
bin=${1:?usage: bench-tls.sh RINGCAST_BINARY}
rounds=${ROUNDS:-3}
out=${OUT:-target/bench-tls}
mkdir -p "$out"
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
# A test CA and a leaf for 127.0.0.1 (the bench uses --insecure anyway).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench-ca \
    -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
    -keyout "$dir/key.pem" -out "$dir/leaf.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$dir/ext"
openssl x509 -req -in "$dir/leaf.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial -days 2 \
    -extfile "$dir/ext" -out "$dir/cert.pem" 2>/dev/null

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; return 1; }

echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r)"
echo "binary: $bin ($(git rev-parse --short HEAD))"

# Fan-out, interleaved.
pa=$(free_port); pb=$(free_port)
"$bin" serve --dev --tcp-listen off --listen 127.0.0.1:$pa --log-level warn & a=$!
"$bin" serve --dev --tcp-listen off --listen 127.0.0.1:$pb --log-level warn --tls-cert "$dir/cert.pem" --tls-key "$dir/key.pem" & b=$!
wait_up $pa; wait_up $pb
cmd=("$bin" bench fanout --url ws://127.0.0.1:$pa/connection/websocket --protocol centrifuge --subscribers 1000
     --publishers 1 --rate 100 --size 128 --duration 10 --warmup 1 --server-pid $a
     --compare wss://127.0.0.1:$pb/connection/websocket --compare-pid $b --rounds $rounds --insecure
     --json "$out/fanout.json" --quiet)
echo "+ ${cmd[*]}"
"${cmd[@]}" | tee "$out/fanout.txt"
kill $a $b; wait $a $b 2>/dev/null || true

# Idle memory per connection, a fresh server per run, plain and TLS alternating.
for round in $(seq 2); do
    for mode in plain tls; do
        p=$(free_port)
        tls=(); scheme=ws
        if [ $mode = tls ]; then tls=(--tls-cert "$dir/cert.pem" --tls-key "$dir/key.pem"); scheme=wss; fi
        "$bin" serve --dev --tcp-listen off --listen 127.0.0.1:$p --log-level warn "${tls[@]}" & s=$!
        wait_up $p
        icmd=("$bin" bench idle --url $scheme://127.0.0.1:$p/echo --connections 10000 --duration 3 --server-pid $s --insecure --quiet)
        echo "+ ${icmd[*]}"
        "${icmd[@]}" | tee "$out/idle-$mode-$round.txt"
        kill $s; wait $s 2>/dev/null || true
    done
done

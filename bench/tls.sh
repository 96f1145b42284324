#!/usr/bin/env bash
# HTTPS side by side: nginx and nx-router terminating TLS with the same
# certificate (ECDSA P-256) in front of the same backend (goweb), in one run.
# Two loads, both with wrk over HTTPS (HTTP/1.1, TLS 1.3):
#   handshakes: every request on a new connection (`Connection: close`), so
#               each is a full TLS handshake; requests/s = handshakes/s;
#   keep-alive: requests/s over kept connections.
# Each round runs nginx and the router back to back, in turn first; the
# ratio router/nginx is taken round by round and the median printed.
#
#   bench/tls.sh [seconds per run] [connections] [rounds, made even]
#
# Needs: nginx, wrk, golang-go, openssl (bench/run.sh installs them) and a
# release build of nx-router (built here if missing).
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=bench/common.sh
. bench/common.sh tls "$@"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=app.localhost \
    -addext subjectAltName=DNS:app.localhost -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null

nginx_port=$(free_port)
nginx_tls="$work/cert.pem $work/key.pem" nginx_proxy_conf "$nginx_port" "worker_processes auto;" >"$work/nginx.conf"
nginx -c "$work/nginx.conf" -p "$work"

router_port=$(free_port)
router_tls_port=$(free_port)
cat >"$work/routes.json" <<EOF
{"generation": 1, "routes": {"app.localhost": {"app": "app", "deployment": "benchmrk", "target": {"kind": "live", "addr": "127.0.0.1:$backend"}}}}
EOF
RUST_LOG=warn target/release/nx-router --listen "127.0.0.1:$router_port" --tls-listen "127.0.0.1:$router_tls_port" \
    --tls-cert "$work/cert.pem" --tls-key "$work/key.pem" --control "$work/control.sock" --state "$work/routes.json" \
    >"$work/router.log" 2>&1 &
router_pid=$!
pids+=($router_pid)

for port in "$nginx_port" "$router_tls_port"; do
    for _ in $(seq 1 100); do
        curl -fsS --cacert "$work/cert.pem" --resolve "app.localhost:$port:127.0.0.1" "https://app.localhost:$port/" \
            >/dev/null 2>&1 && break
        sleep 0.1
    done
    curl -fsS --cacert "$work/cert.pem" --resolve "app.localhost:$port:127.0.0.1" "https://app.localhost:$port/" \
        >/dev/null || { echo "nothing answers HTTPS on $port" >&2; cat "$work/router.log" >&2; exit 1; }
done

# One wrk run: mode (handshakes | keepalive), port, then the proxy's
# processes; prints "rps cpu_us_per_request errors".
load() {
    local mode=$1 port=$2 out before after close=()
    shift 2
    [ "$mode" = handshakes ] && close=(-H 'Connection: close')
    before=$(cpu_ticks "$@")
    out=$(wrk -t2 -c"$conns" -d"${secs}s" -H 'Host: app.localhost' "${close[@]}" "https://127.0.0.1:$port/")
    after=$(cpu_ticks "$@")
    local rps requests cpu errors
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    cpu=$(awk -v t=$((after - before)) -v hz="$(getconf CLK_TCK)" -v n="$requests" 'BEGIN {printf "%.1f", t * 1e6 / hz / n}')
    errors=$(awk '/Socket errors|Non-2xx/ {s=s $0 "; "} END {print (s=="" ? "none" : s)}' <<<"$out")
    echo "$rps $cpu $errors"
}

median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR % 2 ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2)}'; }
minmax() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk 'NR==1 {min=$1} {max=$1} END {printf "%s..%s", min, max}'; }

echo "machine: $(nproc) cores, $(uname -r); $(nginx -v 2>&1); $(openssl version)"
echo "load: wrk -t2 -c$conns -d${secs}s over HTTPS, $rounds rounds per mode; nginx and router back to back, in turn first"
declare -A rps cpu last
for mode in handshakes keepalive; do
    for name in nginx router; do rps[$mode.$name]=""; cpu[$mode.$name]=""; done
    ratios=""
    for round in $(seq 1 "$rounds"); do
        if [ $((round % 2)) -eq 1 ]; then order="nginx router"; else order="router nginx"; fi
        for name in $order; do
            sleep 2
            case $name in
                # shellcheck disable=SC2046 # one argument per worker pid
                nginx) read -r r c e <<<"$(load "$mode" "$nginx_port" $(pgrep -P "$(cat "$work/nginx.pid")"))" ;;
                router) read -r r c e <<<"$(load "$mode" "$router_tls_port" "$router_pid")" ;;
            esac
            rps[$mode.$name]+="$r "; cpu[$mode.$name]+="$c "; last[$name]=$r
            printf '  %-10s round %d %-6s %10s req/s  proxy CPU %6s us/request  errors: %s\n' \
                "$mode" "$round" "$name" "$r" "$c" "$e"
        done
        ratios+="$(awk -v r="${last[router]}" -v n="${last[nginx]}" 'BEGIN {printf "%.3f", r/n}') "
    done
    for name in nginx router; do
        printf '%-10s %-6s req/s median %10s (%s)  CPU us/request %s\n' "$mode" "$name" \
            "$(median "${rps[$mode.$name]}")" "$(minmax "${rps[$mode.$name]}")" "$(median "${cpu[$mode.$name]}")"
    done
    printf '%-10s router/nginx, round by round: %s-> median %s\n\n' "$mode" "$ratios" "$(median "$ratios")"
done

#!/usr/bin/env bash
# What the router's metrics and access log cost, counted rather than timed:
# nx-router as the receiver runs it (access log on, into a pipe another
# process reads; traffic counters on) and "bare" (`--access-log false
# --traffic-counters false`), each run under valgrind's callgrind and
# loaded by the same wrk against the same Go backend. After a warm-up the
# counters are zeroed, the load runs, and the instructions the router
# executed (every thread, the access log's writer included) are divided by
# the requests wrk completed. Instruction counts do not drift with the
# VM's speed as CPU time does (bench/router.sh needs 20 side-by-side pairs
# and still resolves only a few percent); they leave out the kernel's side,
# which both run the same system calls for (the access log adds one
# `write` per 64 KiB of lines).
#
# nginx, configured as in bench/router.sh (one worker here, in the
# foreground so that valgrind follows it), is counted the same way in every
# round: the peer's user-space instructions per request, beside the
# router's. The kernel's side differs between the two (the router makes
# fewer system calls per request; bench/router.sh measures their CPU).
#
#   bench/router-cost.sh [seconds of load per run] [connections] [rounds, made even]
#
# Needs: valgrind, wrk, nginx, golang-go, and a release build of nx-router (built
# here if missing).
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=bench/common.sh
. bench/common.sh router-cost "${1:-10}" "${2:-8}" "${3:-2}"

command -v valgrind >/dev/null || { echo "valgrind is missing: apt-get install valgrind" >&2; exit 1; }
command -v nginx >/dev/null || { echo "nginx is missing: apt-get install nginx" >&2; exit 1; }

# Valgrind does not know seccomp(2), and the router will not run without
# its filter: this library answers that one call as done, for the router
# under valgrind in this script only. Every other system call goes through.
cat >"$work/noseccomp.c" <<'C'
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdarg.h>
#include <sys/syscall.h>
long syscall(long n, ...) {
    static long (*real)(long, ...);
    va_list ap;
    long a[6];
    va_start(ap, n);
    for (int i = 0; i < 6; i++) a[i] = va_arg(ap, long);
    va_end(ap);
    if (n == SYS_seccomp) return 0;
    if (!real) real = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
    return real(n, a[0], a[1], a[2], a[3], a[4], a[5]);
}
C
gcc -O2 -shared -fPIC -o "$work/noseccomp.so" "$work/noseccomp.c" -ldl

cat >"$work/routes.json" <<EOF
{"generation": 1, "routes": {"app.localhost": {"app": "app", "deployment": "benchmrk", "target": {"kind": "live", "addr": "127.0.0.1:$backend"}}}}
EOF

# One run of a configuration ("router", "bare" or "nginx"): prints
# "instructions requests".
measure() {
    local name=$1 port pid out
    port=$(free_port)
    rm -f "$work/cg.$name".*
    if [ "$name" = nginx ]; then
        nginx_proxy_conf "$port" "daemon off;" "master_process off;" "worker_processes 1;" >"$work/nginx.conf"
        valgrind --tool=callgrind --callgrind-out-file="$work/cg.$name" nginx -c "$work/nginx.conf" -p "$work" \
            2>"$work/valgrind-nginx.log" &
    else
        local flags=()
        [ "$name" = bare ] && flags=(--access-log false --traffic-counters false)
        cp "$work/routes.json" "$work/routes-$name.json"
        rm -f "$work/access.pipe"
        mkfifo "$work/access.pipe"
        cat "$work/access.pipe" >"$work/access-$name.log" &
        pids+=($!)
        LD_PRELOAD="$work/noseccomp.so" valgrind --tool=callgrind --callgrind-out-file="$work/cg.$name" \
            target/release/nx-router --listen "127.0.0.1:$port" --control "$work/control-$name.sock" \
            --upgrade-socket "$work/upgrade-$name.sock" --state "$work/routes-$name.json" "${flags[@]}" \
            >"$work/access.pipe" 2>"$work/router-$name.log" &
    fi
    pid=$!
    pids+=($pid)
    for _ in $(seq 1 300); do
        curl -fsS -H 'Host: app.localhost' "http://127.0.0.1:$port/" >/dev/null 2>&1 && break
        sleep 0.1
    done
    wrk -t1 -c"$conns" -d2s -H 'Host: app.localhost' "http://127.0.0.1:$port/" >/dev/null
    callgrind_control -z "$pid" >/dev/null
    out=$(wrk -t1 -c"$conns" -d"${secs}s" -H 'Host: app.localhost' "http://127.0.0.1:$port/")
    callgrind_control -d "$pid" >/dev/null
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    local requests instructions
    requests=$(echo "$out" | awk '/requests in/ {print $1}')
    # The dump after zeroing is the file with the highest part number.
    instructions=$(ls "$work"/cg."$name".* | sort -t. -k3 -n | tail -1 | xargs awk '/^summary:|^totals:/ {print $2; exit}')
    echo "$instructions $requests"
}

echo "machine: $(nproc) cores, $(uname -r); valgrind $(valgrind --version)"
echo "load: wrk -t1 -c$conns -d${secs}s after a 2 s warm-up, $rounds rounds, each configuration first in half of them"
declare -A per
for r in $(seq 1 "$rounds"); do
    order=(router bare nginx)
    [ $((r % 2)) -eq 0 ] && order=(nginx bare router)
    for name in "${order[@]}"; do
        read -r ins req < <(measure "$name")
        per[$name.$r]=$(awk -v i="$ins" -v q="$req" 'BEGIN {printf "%.0f", i / q}')
        printf "  round %d %-6s %12d requests  %8d instructions per request\n" "$r" "$name" "$req" "${per[$name.$r]}"
    done
done
ratios=()
for r in $(seq 1 "$rounds"); do
    ratios+=("$(awk -v a="${per[router.$r]}" -v b="${per[bare.$r]}" 'BEGIN {printf "%.4f", a / b}')")
done
echo "router/bare instructions per request, round by round: ${ratios[*]}"
peer=()
for r in $(seq 1 "$rounds"); do
    peer+=("$(awk -v a="${per[router.$r]}" -v b="${per[nginx.$r]}" 'BEGIN {printf "%.3f", a / b}')")
done
echo "router/nginx user-space instructions per request, round by round: ${peer[*]}"
printf '%s\n' "${ratios[@]}" | sort -n | awk '{v[NR] = $1} END {
    m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    printf "metrics and logs cost: %.1f%% of the instructions per request (median of rounds)\n", (m - 1) * 100
    printf "target (metrics and logs cost < 3%%, by instructions): %s\n", (m < 1.03) ? "MET" : "NOT MET"
}'

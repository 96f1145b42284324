#!/usr/bin/env bash
# Router throughput and latency, side by side: the same small backend (goweb,
# a Go net/http server) loaded with wrk directly, behind nginx (proxy_pass with
# upstream keep-alive, its access log buffered: `buffer=64k`) and behind
# nx-router as the receiver runs it (access log on, into a pipe read by
# another process; traffic counters on), behind nx-router with its access
# log off (`--access-log false`, "quiet"), and behind nx-router with both its
# access log and its traffic counters off (`--traffic-counters false`, a bench
# setting; "bare"), in one run. Prints requests/s, p50 and p99 for each, the
# proxy's CPU time per request, and the ratios router/nginx (compared round
# by round, the median taken), router/direct, the access log's cost (router
# against quiet) and what metrics and logs cost together (router against
# bare, in requests/s and in CPU per request, round by round).
#
# CPU per request is then measured side by side: the router and nginx (and
# the router and bare) loaded at the same time, each by a wrk of its own with
# half the connections, for `pairs` rounds. This VM's speed drifts by ±15%
# within seconds, more than the few percent the targets ask about; two
# proxies loaded at once see the same drift, so their ratio keeps only the
# difference between them (each proxy's CPU read in nanoseconds from
# /proc/PID/task/*/schedstat). The verdicts on CPU take the mean ratio of
# the pairs and its 95% interval (two standard errors): met only when the
# whole interval is within the target.
#
# Loaded side by side, each proxy is saturated and its CPU per request
# depends on how many requests each wake finds, which the scheduler decides
# differently from run to run. So CPU per request is last measured at equal
# load: nginx and the router pinned to the second CPU, the backend and wrk
# to the first, one proxy loaded at a time (in turns, each first in every
# other round). The first CPU, running wrk and the backend, sets the rate,
# so both proxies serve about the same requests per second, and each one's
# CPU time (user and system, read per process from /proc) is what serving
# that load costs it.
#
#   bench/router.sh [seconds per run] [connections] [rounds, made even] [pairs]
#
# Needs: nginx, wrk, golang-go (bench/run.sh installs them), and a release
# build of nx-router (built here if missing).
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=bench/common.sh
. bench/common.sh router "$@"

nginx_port=$(free_port)
nginx_proxy_conf "$nginx_port" "worker_processes auto;" >"$work/nginx.conf"
nginx -c "$work/nginx.conf" -p "$work"

router_port=$(free_port)
cat >"$work/routes.json" <<EOF
{"generation": 1, "routes": {"app.localhost": {"app": "app", "deployment": "benchmrk", "target": {"kind": "live", "addr": "127.0.0.1:$backend"}}}}
EOF
# As the receiver runs it: its own log at info on stderr, the access log (one
# JSON line per request, batched off the request's thread) into a pipe that
# another process reads (the receiver; here cat into a file).
mkfifo "$work/access.pipe"
cat "$work/access.pipe" >"$work/router-access.log" &
pids+=($!)
target/release/nx-router --listen "127.0.0.1:$router_port" --control "$work/control.sock" --state "$work/routes.json" \
    >"$work/access.pipe" 2>"$work/router.log" &
router_pid=$!
pids+=($router_pid)
quiet_port=$(free_port)
cp "$work/routes.json" "$work/routes-quiet.json"
target/release/nx-router --listen "127.0.0.1:$quiet_port" --control "$work/control-quiet.sock" \
    --upgrade-socket "$work/upgrade-quiet.sock" --state "$work/routes-quiet.json" --access-log false \
    >/dev/null 2>"$work/router-quiet.log" &
quiet_pid=$!
pids+=($quiet_pid)
bare_port=$(free_port)
cp "$work/routes.json" "$work/routes-bare.json"
target/release/nx-router --listen "127.0.0.1:$bare_port" --control "$work/control-bare.sock" \
    --upgrade-socket "$work/upgrade-bare.sock" --state "$work/routes-bare.json" --access-log false \
    --traffic-counters false >/dev/null 2>"$work/router-bare.log" &
bare_pid=$!
pids+=($bare_pid)

for port in "$backend" "$nginx_port" "$router_port" "$quiet_port" "$bare_port"; do
    for _ in $(seq 1 100); do
        curl -fsS -H 'Host: app.localhost' "http://127.0.0.1:$port/" >/dev/null 2>&1 && break
        sleep 0.1
    done
done

# CPU time (user + system, in clock ticks) used so far by the given processes.
# One wrk run against a port, the proxy's processes given after it (none for
# direct): prints "rps p50_ms p99_ms cpu_us_per_request errors".
load() {
    local port=$1 out before after
    shift
    before=$(cpu_ticks "$@")
    out=$(wrk -t2 -c"$conns" -d"${secs}s" --latency -H 'Host: app.localhost' "http://127.0.0.1:$port/")
    after=$(cpu_ticks "$@")
    local rps p50 p99 requests cpu errors
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p50=$(awk '$1=="50%" {print $2}' <<<"$out")
    p99=$(awk '$1=="99%" {print $2}' <<<"$out")
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    cpu=$(awk -v t=$((after - before)) -v hz="$(getconf CLK_TCK)" -v n="$requests" 'BEGIN {printf "%.1f", t * 1e6 / hz / n}')
    [ $# -gt 0 ] || cpu=-
    errors=$(awk '/Socket errors|Non-2xx/ {s=s $0 "; "} END {print (s=="" ? "none" : s)}' <<<"$out")
    echo "$rps $(to_ms "$p50") $(to_ms "$p99") $cpu $errors"
}
to_ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) { sub(/us$/, "", v); print v/1000 } else if (v ~ /ms$/) { sub(/ms$/, "", v); print v } else if (v ~ /s$/) { sub(/s$/, "", v); print v*1000 } else print v }'; }

declare -A rps p50 p99 cpu last_rps last_p99 last_cpu
for name in direct nginx router quiet bare; do rps[$name]=""; p50[$name]=""; p99[$name]=""; cpu[$name]=""; done
ratios=""
p99_ratios=""
log_costs=""
observe_costs=""
observe_cpu=""
cpu_ratios=""
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
echo "load: wrk -t2 -c$conns -d${secs}s, $rounds rounds; nginx and router run back to back, in turn first"
for round in $(seq 1 "$rounds"); do
    # The machine's speed drifts over seconds (a VM's neighbours, the CPU's
    # clock): nginx and the router run next to each other, each first in every
    # other round, and are compared round by round. The router as the receiver
    # runs it sits next to both nginx and the bare router in every round.
    if [ $((round % 2)) -eq 1 ]; then order="direct nginx router bare quiet"; else order="direct quiet bare router nginx"; fi
    for name in $order; do
        # A pause between runs, so the backend settles (the direct run before
        # the pair leaves it busier than the proxied ones do).
        sleep 2
        case $name in
            direct) read -r r a b c e <<<"$(load "$backend")" ;;
            # shellcheck disable=SC2046 # one argument per worker pid
            nginx) read -r r a b c e <<<"$(load "$nginx_port" $(pgrep -P "$(cat "$work/nginx.pid")"))" ;;
            router) read -r r a b c e <<<"$(load "$router_port" "$router_pid")" ;;
            quiet) read -r r a b c e <<<"$(load "$quiet_port" "$quiet_pid")" ;;
            bare) read -r r a b c e <<<"$(load "$bare_port" "$bare_pid")" ;;
        esac
        rps[$name]+="$r "; p50[$name]+="$a "; p99[$name]+="$b "; cpu[$name]+="$c "
        last_rps[$name]=$r; last_p99[$name]=$b; last_cpu[$name]=$c
        printf '  round %d %-6s %10s req/s  p50 %7s ms  p99 %7s ms  proxy CPU %5s us/request  errors: %s\n' \
            "$round" "$name" "$r" "$a" "$b" "$c" "$e"
    done
    ratios+="$(awk -v r="${last_rps[router]}" -v n="${last_rps[nginx]}" 'BEGIN {printf "%.3f", r/n}') "
    p99_ratios+="$(awk -v r="${last_p99[router]}" -v n="${last_p99[nginx]}" 'BEGIN {printf "%.3f", r/n}') "
    log_costs+="$(awk -v r="${last_rps[router]}" -v q="${last_rps[quiet]}" 'BEGIN {printf "%.3f", 1 - r/q}') "
    observe_costs+="$(awk -v r="${last_rps[router]}" -v b="${last_rps[bare]}" 'BEGIN {printf "%.3f", 1 - r/b}') "
    observe_cpu+="$(awk -v r="${last_cpu[router]}" -v b="${last_cpu[bare]}" 'BEGIN {printf "%.3f", r/b - 1}') "
    cpu_ratios+="$(awk -v r="${last_cpu[router]}" -v n="${last_cpu[nginx]}" 'BEGIN {printf "%.3f", r/n}') "
done

median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR % 2 ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2)}'; }
minmax() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk 'NR==1 {min=$1} {max=$1} END {printf "%s..%s", min, max}'; }
echo
printf '%-8s %12s %18s %10s %10s %16s\n' "" "req/s (med)" "req/s (min..max)" "p50 ms" "p99 ms" "CPU us/request"
for name in direct nginx router quiet bare; do
    printf '%-8s %12s %18s %10s %10s %16s\n' "$name" "$(median "${rps[$name]}")" "$(minmax "${rps[$name]}")" \
        "$(median "${p50[$name]}")" "$(median "${p99[$name]}")" "$([ "$name" = direct ] && echo - || median "${cpu[$name]}")"
done
r=$(median "${rps[router]}"); d=$(median "${rps[direct]}")
ratio=$(median "$ratios"); p99_ratio=$(median "$p99_ratios")
echo
echo "router/nginx req/s, round by round: $ratios"
echo "router/nginx CPU per request, round by round: $cpu_ratios (median $(median "$cpu_ratios"))"
echo "access log cost (1 - router/quiet req/s), round by round: $log_costs (median $(median "$log_costs"))"
echo "metrics and logs cost (1 - router/bare req/s), round by round: $observe_costs (median $(median "$observe_costs"))"
echo "metrics and logs CPU per request (router/bare - 1), round by round: $observe_cpu (median $(median "$observe_cpu"))"
dropped=$(curl -fsS --unix-socket "$work/control.sock" http://nx-router/traffic |
    python3 -c 'import json, sys; print(json.load(sys.stdin).get("access_lines_dropped", "?"))')
echo "access lines written: router $(wc -l <"$work/router-access.log") (dropped by its queue: $dropped), nginx $(wc -l <"$work/nginx-access.log")"
awk -v ratio="$ratio" -v range="$(minmax "$ratios")" -v p99="$p99_ratio" -v r="$r" -v d="$d" 'BEGIN {
    printf "router/nginx req/s: %.2f (median of rounds, %s)   router/nginx p99: %.2f   router/direct req/s: %.2f\n", ratio, range, p99, r/d
    printf "target (router >= nginx req/s, p99 no worse): %s\n", (ratio >= 1 && p99 <= 1) ? "MET" : "NOT MET"
}'

# CPU time (nanoseconds on the CPU) used so far by the given processes, all
# their threads.
cpu_ns() {
    local t=0 p f
    for p in "$@"; do
        for f in /proc/"$p"/task/*/schedstat; do t=$((t + $(cut -d' ' -f1 "$f"))); done
    done
    echo "$t"
}
# One side-by-side round: two proxies loaded at once, each by its own wrk
# with half the connections. Arguments: port A, pids of A (quoted), port B,
# pids of B. Prints A's CPU per request over B's.
side_by_side() {
    local before_a before_b after_a after_b n_a n_b wrk_a
    # shellcheck disable=SC2086 # one argument per pid
    before_a=$(cpu_ns $2)
    # shellcheck disable=SC2086
    before_b=$(cpu_ns $4)
    wrk -t1 -c$((conns / 2)) -d"${pair_secs}s" -H 'Host: app.localhost' "http://127.0.0.1:$1/" >"$work/wrk-a" &
    wrk_a=$!
    wrk -t1 -c$((conns / 2)) -d"${pair_secs}s" -H 'Host: app.localhost' "http://127.0.0.1:$3/" >"$work/wrk-b"
    wait "$wrk_a"
    # shellcheck disable=SC2086
    after_a=$(cpu_ns $2)
    # shellcheck disable=SC2086
    after_b=$(cpu_ns $4)
    n_a=$(awk '/requests in/ {print $1}' "$work/wrk-a")
    n_b=$(awk '/requests in/ {print $1}' "$work/wrk-b")
    awk -v a=$((after_a - before_a)) -v b=$((after_b - before_b)) -v na="$n_a" -v nb="$n_b" \
        'BEGIN {printf "%.4f", (a / na) / (b / nb)}'
}
# Mean of the ratios and its 95% interval: "mean low high".
interval() {
    tr ' ' '\n' <<<"$1" | grep -v '^$' | awk '{s += $1; ss += $1 * $1; n++} END {
        m = s / n; sd = sqrt((ss - n * m * m) / (n - 1)); e = 2 * sd / sqrt(n)
        printf "%.4f %.4f %.4f", m, m - e, m + e}'
}
# The fourth argument (the first three went to bench/common.sh).
pairs=${4:-20}
pair_secs=$((secs / 2 > 3 ? secs / 2 : 3))
nginx_workers=$(pgrep -P "$(cat "$work/nginx.pid")" | tr '\n' ' ')
echo
echo "CPU per request side by side: $pairs pairs of ${pair_secs}s, wrk -t1 -c$((conns / 2)) each"
vs_nginx=""
vs_bare=""
for pair in $(seq 1 "$pairs"); do
    sleep 1
    # Each proxy is the first wrk in every other pair.
    if [ $((pair % 2)) -eq 1 ]; then
        vs_nginx+="$(side_by_side "$router_port" "$router_pid" "$nginx_port" "$nginx_workers") "
    else
        vs_nginx+="$(awk -v r="$(side_by_side "$nginx_port" "$nginx_workers" "$router_port" "$router_pid")" 'BEGIN {printf "%.4f", 1 / r}') "
    fi
    sleep 1
    if [ $((pair % 2)) -eq 1 ]; then
        vs_bare+="$(side_by_side "$router_port" "$router_pid" "$bare_port" "$bare_pid") "
    else
        vs_bare+="$(awk -v r="$(side_by_side "$bare_port" "$bare_pid" "$router_port" "$router_pid")" 'BEGIN {printf "%.4f", 1 / r}') "
    fi
done
echo "router/nginx CPU per request, pair by pair: $vs_nginx"
echo "router/bare CPU per request, pair by pair: $vs_bare"
read -r n_mean n_low n_high <<<"$(interval "$vs_nginx")"
read -r b_mean b_low b_high <<<"$(interval "$vs_bare")"
echo "router/nginx CPU per request: mean $n_mean (95% interval $n_low..$n_high)"
echo "metrics and logs, router/bare CPU per request: mean $b_mean (95% interval $b_low..$b_high)"
awk -v high="$b_high" 'BEGIN {
    printf "target (metrics and logs cost < 3%% of CPU per request, side by side): %s\n", (high < 1.03) ? "MET" : "NOT MET"
}'
awk -v high="$n_high" -v mean="$n_mean" 'BEGIN {
    printf "target (router CPU per request <= nginx, side by side): %s\n", (high <= 1) ? "MET" : (mean <= 1 ? "NOT SHOWN (mean at or below, interval above)" : "NOT MET")
}'

# Equal load: see the top of this file. taskset moves every thread of each
# process; the proxies keep the worker counts they started with (one per
# CPU of the machine each: nginx `auto`, the router by default).
command -v taskset >/dev/null || { echo "taskset is missing: apt-get install util-linux" >&2; exit 1; }
# shellcheck disable=SC2086 # one argument per worker pid
for p in $nginx_workers "$router_pid"; do taskset -a -p -c 1 "$p" >/dev/null; done
taskset -a -p -c 0 "$backend_pid" >/dev/null
# User and system CPU (clock ticks) of the given processes: "user system".
user_system() {
    local p u=0 s=0 a b
    for p in "$@"; do
        read -r a b < <(awk '{print $14, $15}' "/proc/$p/stat")
        u=$((u + a))
        s=$((s + b))
    done
    echo "$u $s"
}
# One proxy alone under the load, its port then its pids: prints "requests
# cpu_us_per_request user_us_per_request system_us_per_request".
alone() {
    local port=$1 before after n u0 s0 u1 s1
    shift
    before=$(cpu_ns "$@")
    read -r u0 s0 < <(user_system "$@")
    taskset -c 0 wrk -t1 -c$((conns / 2)) -d"${pair_secs}s" -H 'Host: app.localhost' "http://127.0.0.1:$port/" >"$work/wrk-alone"
    after=$(cpu_ns "$@")
    read -r u1 s1 < <(user_system "$@")
    n=$(awk '/requests in/ {print $1}' "$work/wrk-alone")
    awk -v c=$((after - before)) -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v n="$n" -v hz="$(getconf CLK_TCK)" \
        'BEGIN {printf "%d %.2f %.2f %.2f\n", n, c / n / 1000, u * 1e6 / hz / n, s * 1e6 / hz / n}'
}
echo
echo "CPU per request at equal load: $pairs rounds of ${pair_secs}s, wrk -t1 -c$((conns / 2)); proxies on CPU 1, wrk and the backend on CPU 0"
equal=""
for round in $(seq 1 "$pairs"); do
    sleep 1
    # shellcheck disable=SC2086 # one argument per worker pid
    if [ $((round % 2)) -eq 1 ]; then
        read -r rn rc ru rs < <(alone "$router_port" "$router_pid")
        read -r nn nc nu ns < <(alone "$nginx_port" $nginx_workers)
    else
        read -r nn nc nu ns < <(alone "$nginx_port" $nginx_workers)
        read -r rn rc ru rs < <(alone "$router_port" "$router_pid")
    fi
    printf '  round %d  router %8d requests %6s us/request (user %s, system %s)   nginx %8d requests %6s us/request (user %s, system %s)\n' \
        "$round" "$rn" "$rc" "$ru" "$rs" "$nn" "$nc" "$nu" "$ns"
    equal+="$(awk -v r="$rc" -v n="$nc" 'BEGIN {printf "%.4f", r / n}') "
done
echo "router/nginx CPU per request at equal load, round by round: $equal"
read -r e_mean e_low e_high <<<"$(interval "$equal")"
echo "router/nginx CPU per request at equal load: mean $e_mean (95% interval $e_low..$e_high)"
awk -v high="$e_high" -v mean="$e_mean" 'BEGIN {
    printf "target (router CPU per request <= nginx, at equal load): %s\n", (high <= 1) ? "MET" : (mean <= 1 ? "NOT SHOWN (mean at or below, interval above)" : "NOT MET")
}'

# Sourced by bench/router.sh and bench/tls.sh, from the repository's root:
#
#   . bench/common.sh NAME [seconds per run] [connections] [rounds, made even]
#
# Sets secs, conns and rounds (even: each of nginx and the router runs first
# in half of them), a work directory removed on exit together with every
# process whose pid is added to `pids`, and starts the Go backend on
# $backend; builds the release nx-router if missing. Defines free_port and
# cpu_ticks.

secs=${2:-10}
conns=${3:-64}
rounds=${4:-4}
rounds=$(((rounds + 1) / 2 * 2))
work=$(mktemp -d "/tmp/nx-bench-$1.XXXXXX")
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# CPU time (user + system, in clock ticks) used so far by the given processes.
cpu_ticks() {
    local t=0 p
    for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
    echo "$t"
}

[ -x target/release/nx-router ] || cargo build --release --locked -p nx-router
(cd tests/fixtures/goweb && CGO_ENABLED=0 GOFLAGS=-mod=mod GOPROXY=off GOCACHE="$work/go-cache" go build -o "$work/goweb" .)

backend=$(free_port)
PORT=$backend "$work/goweb" >/dev/null 2>&1 &
pids+=($!)

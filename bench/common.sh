# Sourced by bench/router.sh and bench/tls.sh, from the repository's root:
#
#   . bench/common.sh NAME [seconds per run] [connections] [rounds, made even]
#
# Sets secs, conns and rounds (even: each of nginx and the router runs first
# in half of them), a work directory removed on exit together with every
# process whose pid is added to `pids`, and starts the Go backend on
# $backend; builds the release nx-router if missing. Defines free_port and
# cpu_ticks and nginx_proxy_conf; the backend's pid is $backend_pid.

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
backend_pid=$!
pids+=($backend_pid)

# The nginx the router is compared with: a reverse proxy to the backend with
# upstream keep-alive and its access log buffered. Arguments: the port it
# listens on, then the lines that say how it runs (workers, foreground).
# With nginx_tls set to "CERT KEY" it listens with TLS instead, says so in
# X-Forwarded-Proto and keeps no access log (bench/tls.sh). Prints the
# configuration.
nginx_proxy_conf() {
    local port=$1 listen access cert key forwarded=""
    shift
    listen="127.0.0.1:$port"
    access="$work/nginx-access.log combined buffer=64k"
    if [ -n "${nginx_tls:-}" ]; then
        read -r cert key <<<"$nginx_tls"
        listen="$listen ssl;
        ssl_certificate $cert;
        ssl_certificate_key $key;
        ssl_protocols TLSv1.2 TLSv1.3"
        access=off
        forwarded="
            proxy_set_header X-Forwarded-Proto https;"
    fi
    printf '%s\n' "$@"
    cat <<EOF
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 4096; }
http {
    access_log $access;
    upstream app { server 127.0.0.1:$backend; keepalive 128; }
    server {
        listen $listen;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$remote_addr;$forwarded
        }
    }
}
EOF
}

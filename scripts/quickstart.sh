#!/usr/bin/env bash
# One command from a fresh Debian 12 machine, as root: install what NX Sandbox
# needs, build it, start the platform with its embedded defaults (embedded
# PostgreSQL, local object storage, *.localhost URLs), deploy the example app
# and print its preview and production URLs. The platform then runs in the
# foreground until Ctrl-C; pass --detach to leave it running in the background.
#
# Settings (environment): NX_DATA_DIR (default /var/lib/nx-sandbox),
# NX_LISTEN (127.0.0.1:8070), NX_ROUTER_LISTEN (127.0.0.1:8080).
set -euo pipefail
cd "$(dirname "$0")/.."

detach=false
for arg in "$@"; do
    case "$arg" in
        --detach) detach=true ;;
        *) echo "usage: $0 [--detach]" >&2; exit 2 ;;
    esac
done
. scripts/common.sh
require_root_and_cargo

export NX_DATA_DIR="${NX_DATA_DIR:-/var/lib/nx-sandbox}"
export NX_LISTEN="${NX_LISTEN:-127.0.0.1:8070}"
export NX_ROUTER_LISTEN="${NX_ROUTER_LISTEN:-127.0.0.1:8080}"
api="http://$NX_LISTEN"

echo "==> installing system packages (bubblewrap, postgresql, nftables, cmake)"
install_packages bubblewrap postgresql nftables e2fsprogs cmake gcc libc6-dev pkg-config curl ca-certificates

echo "==> building (release)"
add_musl_target
cargo build --release --locked -p nx-receiver -p nx-router -p nx-runtime -p nx-action -p hello
bin="$PWD/target/release"
nx="$bin/nx"

if curl -fsS "$api/v1/health" >/dev/null 2>&1; then
    echo "a receiver already answers on $api; stop it first (or set NX_LISTEN)" >&2
    exit 1
fi

# The admin token: chosen here on the first start and stored by `nx login` in
# ~/.config/nx/config.toml (mode 0600); later runs reuse it from there.
mkdir -p "$NX_DATA_DIR"
log="$NX_DATA_DIR/receiver.log"
first_start=false
if [ ! -e "$NX_DATA_DIR/secrets/master.key" ]; then
    first_start=true
    NX_ADMIN_TOKEN="nxa_$(head -c 64 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 40)"
    export NX_ADMIN_TOKEN
fi

echo "==> starting nx-receiver (data in $NX_DATA_DIR, log in $log)"
"$bin/nx-receiver" serve >>"$log" 2>&1 &
receiver=$!
# Apps, PostgreSQL and nx-router outlive the receiver; stop-all stops them too.
stop() {
    kill -INT "$receiver" 2>/dev/null || true
    wait "$receiver" 2>/dev/null || true
    "$bin/nx-receiver" stop-all >>"$log" 2>&1 || true
}
trap 'echo; echo "==> stopping"; stop; exit 130' INT TERM
for _ in $(seq 1 300); do
    curl -fsS "$api/v1/health" >/dev/null 2>&1 && break
    if ! kill -0 "$receiver" 2>/dev/null; then
        echo "nx-receiver exited during startup; the end of its log:" >&2
        tail -n 20 "$log" >&2
        exit 1
    fi
    sleep 0.2
done

if $first_start; then
    "$nx" login --server "$api" --key "$NX_ADMIN_TOKEN"
    unset NX_ADMIN_TOKEN
else
    "$nx" login --server "$api"
fi

echo "==> deploying the example app"
"$nx" apps ls --json | grep -q '"name": "hello"' || "$nx" apps create hello >/dev/null
# Its health checks go to /healthz: / counts a visit per request.
"$nx" apps set hello --health-path /healthz >/dev/null
out=$("$nx" push "$bin/hello" --app hello --promote --json)
preview=$(printf '%s' "$out" | sed -n 's/.*"preview_url": "\([^"]*\)".*/\1/p' | head -n1)
production=$(printf '%s' "$out" | sed -n 's/.*"production_url": "\([^"]*\)".*/\1/p' | head -n1)

cat <<EOF

NX Sandbox is running.
  preview:     $preview
  production:  $production
  API:         $api      (nx is logged in: try \`$nx ls\`)
  try:         curl $production

EOF
if $detach; then
    trap - INT TERM
    echo "running in the background (pid $receiver); stop it with: kill -INT $receiver; then stop its apps, database and router with: NX_DATA_DIR=$NX_DATA_DIR $bin/nx-receiver stop-all"
    exit 0
fi
echo "Ctrl-C stops the platform and every app it runs."
wait "$receiver"

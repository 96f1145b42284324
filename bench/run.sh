#!/usr/bin/env bash
# Every benchmark, one command. Installs what the benchmarks need (nginx, wrk, openssl,
# bubblewrap, PostgreSQL, musl-gcc for the static C app), builds release
# binaries, and prints each figure with its peer. Results are recorded by hand
# in bench/RESULTS.md with the machine they came from.
#
#   bench/run.sh                  # all benchmarks
#   bench/run.sh router density   # only the named ones
#
# Names: router router-cost tls start wake density provision push concurrent promote replicas restart.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
require_root_and_cargo
install_packages nginx wrk golang-go curl openssl python3 bubblewrap postgresql musl-tools gcc openssh-client valgrind
add_musl_target
cargo build --release --locked --workspace --bins
# A thousand sandboxes hold a few descriptors each in this process.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
# The distribution's nginx service is not a peer; it only needs the binary.
systemctl disable --now nginx >/dev/null 2>&1 || true

all=(router router-cost tls start wake density provision push concurrent promote replicas restart)
selected=("$@")
[ ${#selected[@]} -gt 0 ] || selected=("${all[@]}")
for name in "${selected[@]}"; do
    echo "== $name"
    if [ -x "bench/$name.sh" ]; then
        "bench/$name.sh"
    else
        target/release/nx-bench "$name"
    fi
    echo
done

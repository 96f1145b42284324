#!/usr/bin/env bash
# Every benchmark, one command. Installs what the peers need (nginx, wrk), builds
# release binaries, and prints each figure with its peer. Results are recorded by
# hand in bench/RESULTS.md with the machine they came from.
#
#   bench/run.sh            # all benchmarks
#   bench/run.sh router     # only the named ones
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
require_root_and_cargo
install_packages nginx wrk golang-go curl python3
cargo build --release --locked -p nx-router
# The distribution's nginx service is not a peer; it only needs the binary.
systemctl disable --now nginx >/dev/null 2>&1 || true

all=(router)
selected=("$@")
[ ${#selected[@]} -gt 0 ] || selected=("${all[@]}")
for name in "${selected[@]}"; do
    echo "== $name"
    "bench/$name.sh"
    echo
done

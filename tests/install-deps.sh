#!/usr/bin/env bash
# Installs what building and testing Ridge needs on Debian. Safe to re-run.
#   tests/install-deps.sh          build dependencies only
#   tests/install-deps.sh --test   also what the test suite uses (Chromium, PostgreSQL)
set -euo pipefail

# clang, libbpf-dev and linux-libc-dev build ridge-ebpf's BPF programs.
packages=(build-essential pkg-config ca-certificates curl clang libbpf-dev linux-libc-dev)
if [[ "${1:-}" == "--test" ]]; then
  # iproute2 and ethtool: ridge-ebpf's network-namespace tests;
  # postgresql: the scheduler's HA tests.
  packages+=(chromium iproute2 ethtool postgresql)
fi

sudo_cmd=()
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then sudo_cmd=(sudo); else
    echo "install-deps: not root and no sudo; install these yourself: ${packages[*]}" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
# `apt-get install` of already-installed packages is a quick no-op; refresh
# the package lists first only when an install needs them.
if ! "${sudo_cmd[@]}" apt-get install -y --no-install-recommends "${packages[@]}" >/tmp/ridge-apt.log 2>&1; then
  "${sudo_cmd[@]}" apt-get update >/tmp/ridge-apt-update.log 2>&1 || { cat /tmp/ridge-apt-update.log >&2; exit 1; }
  "${sudo_cmd[@]}" apt-get install -y --no-install-recommends "${packages[@]}" || exit 1
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    echo "install-deps: cargo is in ~/.cargo/bin; add it to PATH" >&2
  else
    echo "install-deps: Rust is missing. Install the stable toolchain with rustup (https://rustup.rs) and re-run." >&2
  fi
  exit 1
fi
echo "install-deps: ok (${packages[*]})"

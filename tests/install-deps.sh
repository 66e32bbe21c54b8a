#!/usr/bin/env bash
# Installs what building and testing Ridge needs on Debian. Safe to re-run.
#   tests/install-deps.sh               build dependencies only
#   tests/install-deps.sh --test        also what the test suite uses (Chromium, PostgreSQL)
#   tests/install-deps.sh --local-mesh  also what dataplane/run-local.sh's mesh uses
set -euo pipefail

# clang, libbpf-dev and linux-libc-dev build ridge-ebpf's BPF programs.
packages=(build-essential pkg-config ca-certificates curl clang libbpf-dev linux-libc-dev)
for arg in "$@"; do
  case "$arg" in
    # iproute2 and ethtool: the network-namespace tests (ridge-ebpf, the mesh
    # lab); postgresql: the scheduler's HA tests; ffmpeg: a real H.264 RTP encoder.
    --test) packages+=(chromium iproute2 ethtool postgresql ffmpeg) ;;
    # openssl: the scheduler's certificate; iproute2: the nodes' namespaces;
    # socat: their HTTP APIs forwarded to 127.0.0.1.
    --local-mesh) packages+=(openssl iproute2 socat) ;;
    *) echo "install-deps: unknown option $arg" >&2; exit 64 ;;
  esac
done

# Nothing to install (and no root needed) when every package is there.
missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
else
  missing=("${packages[@]}")
fi

sudo_cmd=()
if [[ ${#missing[@]} -eq 0 ]]; then
  :
elif [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then sudo_cmd=(sudo); else
    echo "install-deps: not root and no sudo; install these yourself: ${missing[*]}" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists first only when an install needs them.
if [[ ${#missing[@]} -gt 0 ]] &&
  ! "${sudo_cmd[@]}" apt-get install -y --no-install-recommends "${missing[@]}" >/tmp/ridge-apt.log 2>&1; then
  "${sudo_cmd[@]}" apt-get update >/tmp/ridge-apt-update.log 2>&1 || { cat /tmp/ridge-apt-update.log >&2; exit 1; }
  "${sudo_cmd[@]}" apt-get install -y --no-install-recommends "${missing[@]}" || exit 1
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

#!/bin/sh
# Installs the Chromium used by ridge-tests' browser tests (Debian package,
# /usr/bin/chromium). Idempotent: `apt-get install` is a no-op when the package
# is already installed; `apt-get update` runs only when the package lists are
# empty or the install fails.
set -eu

export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

lists_empty() {
    ! ls /var/lib/apt/lists/ 2>/dev/null | grep -q '_Packages'
}

if lists_empty || ! $SUDO apt-get install -y chromium; then
    $SUDO apt-get update
    $SUDO apt-get install -y chromium
fi

chromium --version

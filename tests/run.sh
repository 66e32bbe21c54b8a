#!/usr/bin/env bash
# The whole Ridge test suite: installs what it needs, then runs every test,
# including the real-browser tests. A test that would skip for a missing
# prerequisite fails instead (RIDGE_REQUIRE_ALL=1).
set -euo pipefail
cd "$(dirname "$0")/.."

bash tests/install-deps.sh --test

# Reuse a build cache outside the clone when one is allowed (CI runs as root).
if [[ -z "${CARGO_TARGET_DIR:-}" ]] && [[ -w /var/cache ]]; then
  export CARGO_TARGET_DIR=/var/cache/ridge/target
  mkdir -p "$CARGO_TARGET_DIR"
fi
export RIDGE_REQUIRE_ALL="${RIDGE_REQUIRE_ALL:-1}"
export RUST_BACKTRACE=1

echo "== unit, fuzz-smoke and integration tests"
cargo test --workspace --all-targets --exclude ridge-tests
# The mesh lab (tests/tests/mesh_netns.rs) runs these binaries; it builds
# them itself too, but a failure reads better here.
echo "== binaries for the mesh lab"
cargo build --bins -p ridge-scheduler -p ridge-agent -p ridge-dataplane
echo "== real-browser and end-to-end tests (serial: each starts Chromium), io_uring backend"
RIDGE_TEST_IO_BACKEND=uring cargo test -p ridge-tests --all-targets -- --test-threads=1
echo "== the same end-to-end tests on the recvmmsg/sendmmsg backend"
RIDGE_TEST_IO_BACKEND=mmsg cargo test -p ridge-tests --all-targets -- --test-threads=1

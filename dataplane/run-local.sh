#!/usr/bin/env bash
# Builds ridge-dataplane and runs a local node on its defaults
# (HTTP 127.0.0.1:8080, media UDP 127.0.0.1:5004), printing the demo URL.
# Safe to re-run; stop it with Ctrl-C (SIGINT drains, like SIGTERM).
set -euo pipefail
cd "$(dirname "$0")/.."

bash tests/install-deps.sh
cargo build --release -p ridge-dataplane

state="${XDG_STATE_HOME:-$HOME/.local/state}/ridge"
mkdir -p "$state"
if [[ -z "${RIDGE_JWT_SECRET:-}" ]]; then
  if [[ ! -s "$state/jwt-secret" ]]; then
    (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$state/jwt-secret")
  fi
  RIDGE_JWT_SECRET=$(cat "$state/jwt-secret")
  export RIDGE_JWT_SECRET
fi

bin=target/release/ridge-dataplane
http="${RIDGE_HTTP:-127.0.0.1:8080}"
udp="${RIDGE_UDP:-127.0.0.1:5004}"
token=$("$bin" token --room demo --identity "guest-$RANDOM" --publish --subscribe --ttl 12h)
admin=$("$bin" token --room '*' --identity operator --admin --ttl 12h)

cat <<MSG

  Ridge node starting.
  Demo page (open it in two browser tabs): http://$http/?token=$token
  Metrics:  curl -H 'Authorization: Bearer $admin' http://$http/metrics
  More tokens: RIDGE_JWT_SECRET=\$(cat $state/jwt-secret) $bin token --room demo --identity NAME --publish --subscribe

MSG
exec "$bin" --http "$http" --udp "$udp"

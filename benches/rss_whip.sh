#!/usr/bin/env bash
# RSS per unfinished WHIP session (docs/benchmarks.md): starts the node
# binary BIN on loopback, posts 4 tokens x N WHIP offers that never do ICE
# (one room per token), and prints the node's VmRSS before and after.
# usage: benches/rss_whip.sh BIN LABEL [N]   (WAIT_REAP=1: also 17 s later)
set -u
BIN=$1; LABEL=$2; N=${3:-200}
export RIDGE_JWT_SECRET=rss-measure-secret-0123456789abcdef
PORT=18$((RANDOM % 900 + 100)); UDP=$((PORT + 1000))
OFFER="$(cd "$(dirname "$0")/.." && pwd)/dataplane/tests/data/whip_offer_no_candidates.sdp"
$BIN --http 127.0.0.1:$PORT --udp 127.0.0.1:$UDP --max-sessions 1000 > /tmp/rss-$LABEL.log 2>&1 &
PID=$!
sleep 1.5
rss() { awk '/VmRSS/ {print $2}' /proc/$PID/status; }
R0=$(rss)
ok=0; refused=0
for id in a b c d; do
  TOK=$($BIN token --room '*' --identity $id --publish --subscribe)
  codes=$(seq $N | xargs -P 8 -I{} curl -s -o /dev/null -w '%{http_code}\n' -X POST \
    -H "Authorization: Bearer $TOK" -H 'Content-Type: application/sdp' --data-binary @$OFFER \
    http://127.0.0.1:$PORT/whip/rss-$id)
  ok=$((ok + $(grep -c '^201' <<<"$codes")))
  refused=$((refused + $(grep -vc '^201' <<<"$codes")))
done
sleep 1
R1=$(rss)
echo "$LABEL: sessions created $ok (refused $refused), RSS ${R0} kB -> ${R1} kB, $(( (R1 - R0) * 1024 / (ok > 0 ? ok : 1) )) B per session"
if [[ "${WAIT_REAP:-0}" == 1 ]]; then
  sleep 17
  ADMIN=$($BIN token --room '*' --identity admin --admin)
  echo "$LABEL: after 17 s: RSS $(rss) kB; $(curl -s -H "Authorization: Bearer $ADMIN" http://127.0.0.1:$PORT/metrics | grep -E '^ridge_sessions(_reaped_total)?[ {]' | tr '\n' ' ')"
fi
kill -TERM $PID; wait $PID 2>/dev/null

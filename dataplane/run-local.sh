#!/usr/bin/env bash
# Builds Ridge and runs a local mesh: a ridge-scheduler and two nodes, each a
# ridge-dataplane enrolled through a real bootstrap token (minted with
# ridgectl) by its own ridge-agent. Prints the scheduler URL with a ridgectl
# hint, and demo-page URLs for a publisher on node 1 and a viewer on node 2 in
# the same room (access tokens from the scheduler's dispatch).
#
#   bash dataplane/run-local.sh            the mesh
#   bash dataplane/run-local.sh --single   one node, no scheduler (HTTP 127.0.0.1:8080, UDP 5004)
#
# As root the nodes run in network namespaces (ridge-n1, ridge-n2): node i at
# 10.213.i.2 behind a veth from this host, the two joined by their own mesh
# veth (10.213.12.0/30), the scheduler on 10.213.0.1:8443 (an address on this
# host's lo), and the nodes' HTTP APIs forwarded to 127.0.0.1:8080 and :8081 so
# that browsers here get a secure context. Otherwise everything shares
# loopback: scheduler 127.0.0.1:8443, node 1 HTTP 127.0.0.1:8080 UDP 5004,
# node 2 HTTP 127.0.0.1:8081 UDP 5014.
#
# Environment: RIDGE_LOCAL_MODE=netns|loopback forces a mode; RIDGE_ROOM
# (default demo); RIDGE_LOCAL_PROFILE=release|dev (default release);
# RIDGE_BIN_DIR=DIR runs the binaries in DIR instead of building (then
# nothing is installed either); RIDGE_HTTP/RIDGE_UDP (--single only).
#
# State (admin token, certificate, logs, the scheduler's database) lives in
# ${XDG_STATE_HOME:-~/.local/state}/ridge/local-mesh; every run starts a fresh
# mesh, and leftovers of a run that was killed (processes, namespaces) are
# removed first. Ctrl-C (or SIGTERM) stops the agents, drains the nodes,
# stops the scheduler and removes the namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=mesh
for arg in "$@"; do
  case "$arg" in
    --single) mode=single ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "run-local.sh: unknown argument $arg (see --help)" >&2
      exit 64
      ;;
  esac
done

state="${XDG_STATE_HOME:-$HOME/.local/state}/ridge"
mkdir -p "$state"
profile="${RIDGE_LOCAL_PROFILE:-release}"

# ----- build ------------------------------------------------------------------

# build PACKAGE...: installs the build dependencies and builds; sets $bin to
# the directory holding the binaries.
build() {
  if [[ -n "${RIDGE_BIN_DIR:-}" ]]; then
    bin="$RIDGE_BIN_DIR"
    return
  fi
  bash tests/install-deps.sh "${deps_flags[@]}"
  local pkgs=() p
  for p in "$@"; do pkgs+=(-p "$p"); done
  cargo build --profile "$profile" --bins "${pkgs[@]}"
  local target
  target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
  case "$profile" in
    dev) bin="$target/debug" ;;
    *) bin="$target/$profile" ;;
  esac
}

# ----- the former single node ---------------------------------------------------

if [[ "$mode" == single ]]; then
  deps_flags=()
  build ridge-dataplane
  if [[ -z "${RIDGE_JWT_SECRET:-}" ]]; then
    if [[ ! -s "$state/jwt-secret" ]]; then
      (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$state/jwt-secret")
    fi
    RIDGE_JWT_SECRET=$(cat "$state/jwt-secret")
    export RIDGE_JWT_SECRET
  fi
  http="${RIDGE_HTTP:-127.0.0.1:8080}"
  udp="${RIDGE_UDP:-127.0.0.1:5004}"
  token=$("$bin/ridge-dataplane" token --room demo --identity "guest-$RANDOM" --publish --subscribe --ttl 12h)
  admin=$("$bin/ridge-dataplane" token --room '*' --identity operator --admin --ttl 12h)
  cat <<MSG

  Ridge node starting.
  Demo page (open it in two browser tabs): http://$http/?token=$token
  Metrics:  curl -H 'Authorization: Bearer $admin' http://$http/metrics
  More tokens: RIDGE_JWT_SECRET=\$(cat $state/jwt-secret) $bin/ridge-dataplane token --room demo --identity NAME --publish --subscribe

MSG
  exec "$bin/ridge-dataplane" --http "$http" --udp "$udp"
fi

# ----- the mesh -------------------------------------------------------------------

if [[ -n "${RIDGE_LOCAL_MODE:-}" ]]; then
  net="$RIDGE_LOCAL_MODE"
elif [[ $(id -u) -eq 0 ]]; then
  net=netns
else
  net=loopback
fi
case "$net" in
  netns)
    [[ $(id -u) -eq 0 ]] || { echo "run-local.sh: RIDGE_LOCAL_MODE=netns needs root" >&2; exit 64; }
    deps_flags=(--local-mesh)
    ;;
  loopback) deps_flags=() ;;
  *) echo "run-local.sh: RIDGE_LOCAL_MODE must be netns or loopback, not $net" >&2; exit 64 ;;
esac
room="${RIDGE_ROOM:-demo}"
run="$state/local-mesh"
mkdir -p "$run"
chmod 700 "$run"

log() { printf 'run-local: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# Another run still going?
if [[ -s "$run/run.pid" ]]; then
  other=$(cat "$run/run.pid")
  if [[ "$other" != "$$" ]] && kill -0 "$other" 2>/dev/null \
    && tr '\0' ' ' < "/proc/$other/cmdline" 2>/dev/null | grep -q run-local; then
    die "a local mesh is already running (pid $other): stop it with Ctrl-C in its terminal or kill $other"
  fi
fi

# ----- network namespaces

NS=(ridge-n1 ridge-n2)
net_down() {
  local ns pid
  for ns in "${NS[@]}"; do
    if [[ -e "/run/netns/$ns" ]]; then
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
      ip netns del "$ns" 2>/dev/null || true
    fi
  done
  ip addr del 10.213.0.1/32 dev lo 2>/dev/null || true
  ip link del ridge-n1 2>/dev/null || true
  ip link del ridge-n2 2>/dev/null || true
}

net_up() {
  local i ns other
  if ip -4 route show 10.213.0.0/16 | grep -q . || ip -4 addr | grep -q ' 10\.213\.'; then
    die "10.213.0.0/16 is already in use on this machine; stop what uses it, or run with RIDGE_LOCAL_MODE=loopback"
  fi
  # The scheduler's address, reachable from both nodes through their veths.
  ip addr add 10.213.0.1/32 dev lo
  for i in 1 2; do
    ns=ridge-n$i
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip link add "ridge-n$i" type veth peer name eth0 netns "$ns"
    ip addr add "10.213.$i.1/30" dev "ridge-n$i"
    ip link set "ridge-n$i" up
    ip -n "$ns" addr add "10.213.$i.2/30" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add 10.213.0.0/16 via "10.213.$i.1" dev eth0
  done
  # The mesh link between the two nodes, off this host's own stack.
  ip -n ridge-n1 link add mesh type veth peer name mesh netns ridge-n2
  for i in 1 2; do
    ip -n "ridge-n$i" addr add "10.213.12.$i/30" dev mesh
    ip -n "ridge-n$i" link set mesh up
  done
}

# ----- processes

# Children, "pid kind name" per line (also on disk, for a later run to clean
# up after one that was killed).
children=()
pids_file="$run/pids"

# spawn KIND NAME COMMAND...: starts COMMAND in its own session (so that the
# terminal's Ctrl-C reaches only this script, which stops the children in
# order), output appended to $run/NAME.log. Secrets reach it as environment
# variables set on the call (VAR=value spawn ...), never as arguments.
spawn() {
  local kind=$1 name=$2
  shift 2
  (exec setsid "$@") >>"$run/$name.log" 2>&1 </dev/null &
  children+=("$! $kind $name")
  echo "$! $kind $name" >>"$pids_file"
}

alive() { kill -0 "$1" 2>/dev/null; }

# stop_kind KIND: SIGTERM to every child of that kind, then waits (at most
# 15 s, then SIGKILL).
stop_kind() {
  local want=$1 c pid kind name waiting i
  waiting=()
  for c in "${children[@]}"; do
    read -r pid kind name <<<"$c"
    [[ "$kind" == "$want" ]] || continue
    if alive "$pid"; then
      kill -TERM "$pid" 2>/dev/null || true
      waiting+=("$pid")
    fi
  done
  for ((i = 0; i < 150; i++)); do
    local left=()
    for pid in "${waiting[@]}"; do alive "$pid" && left+=("$pid"); done
    [[ ${#left[@]} -eq 0 ]] && return
    waiting=("${left[@]}")
    sleep 0.1
  done
  for pid in "${waiting[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}

stopped=0
stop_all() {
  [[ $stopped -eq 1 ]] && return
  stopped=1
  trap 'log "still stopping; this takes at most half a minute"' INT TERM
  if [[ ${#children[@]} -gt 0 ]]; then
    log "stopping: agents, then nodes (draining), forwarders, scheduler"
    stop_kind agent
    stop_kind dataplane
    stop_kind forward
    stop_kind scheduler
  fi
  [[ "$net" == netns ]] && net_down
  rm -f "$pids_file" "$run/run.pid"
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM
trap stop_all EXIT

# Leftovers of a run that was killed: its processes (recognised by the run
# directory or the forwarders' addresses in their command lines), its
# namespaces, its per-run state.
if [[ -s "$pids_file" ]]; then
  while read -r pid _; do
    if alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -Eq "$run|TCP:10\.213\."; then
      log "stopping leftover process $pid"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done <"$pids_file"
fi
rm -f "$pids_file"
if [[ $(id -u) -eq 0 ]] && command -v ip >/dev/null; then net_down; fi
rm -rf "$run/node1" "$run/node2" "$run/scheduler.db"* "$run"/*.log
echo $$ >"$run/run.pid"

build ridge-scheduler ridge-agent ridge-dataplane
for tool in curl openssl; do
  command -v "$tool" >/dev/null || die "needs $tool (bash tests/install-deps.sh --local-mesh installs it)"
done
if [[ "$net" == netns ]]; then
  for tool in ip socat; do
    command -v "$tool" >/dev/null || die "needs $tool (bash tests/install-deps.sh --local-mesh installs it)"
  done
  if ! ip netns add ridge-probe 2>/dev/null; then
    die "cannot create network namespaces here; run with RIDGE_LOCAL_MODE=loopback"
  fi
  ip netns del ridge-probe
fi

# ----- addresses

if [[ "$net" == netns ]]; then
  sched_ip=10.213.0.1
  http_listen=(10.213.1.2:8080 10.213.2.2:8080)
  udp_listen=(0.0.0.0:5004 0.0.0.0:5004)
  public_ip=(10.213.1.2 10.213.2.2)
  media=(10.213.1.2:5004 10.213.2.2:5004)
  mesh=(10.213.12.1:5004 10.213.12.2:5004)
  probe=(10.213.12.1:6004 10.213.12.2:6004)
  metrics=(127.0.0.1:9107 127.0.0.1:9107)
else
  sched_ip=127.0.0.1
  http_listen=(127.0.0.1:8080 127.0.0.1:8081)
  udp_listen=(127.0.0.1:5004 127.0.0.1:5014)
  public_ip=(127.0.0.1 127.0.0.1)
  media=(127.0.0.1:5004 127.0.0.1:5014)
  mesh=("${media[@]}")
  probe=(127.0.0.1:6004 127.0.0.1:6014)
  metrics=(127.0.0.1:9107 127.0.0.1:9108)
fi
# What browsers on this machine open (forwarded in netns mode).
http_url=(http://127.0.0.1:8080 http://127.0.0.1:8081)
sched_url="https://$sched_ip:8443"

# ----- secrets and the certificate

if [[ ! -s "$run/admin-token" ]]; then
  (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$run/admin-token")
fi
admin=$(cat "$run/admin-token")
if [[ ! -s "$state/jwt-secret" ]]; then
  (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$state/jwt-secret")
fi
# A leaf certificate (rustls refuses a self-signed CA as the server's own).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
  -subj /CN=ridge-local-scheduler -addext "subjectAltName=IP:$sched_ip" \
  -addext "basicConstraints=critical,CA:FALSE" \
  -keyout "$run/key.pem" -out "$run/cert.pem" 2>/dev/null
chmod 600 "$run/key.pem"
cat >"$run/scheduler.toml" <<TOML
access_token_ttl = "12h"
TOML

# ----- start

[[ "$net" == netns ]] && net_up
ctl() { RIDGE_ADMIN_TOKEN="$admin" "$bin/ridgectl" --scheduler "$sched_url" --ca-cert "$run/cert.pem" "$@"; }
api() { curl -sS --max-time 10 --cacert "$run/cert.pem" -H "Authorization: Bearer $admin" "$sched_url$1"; }

# wait_for WHAT SECONDS COMMAND...: polls COMMAND; dies with the logs if it
# never succeeds or a child exits.
wait_for() {
  local what=$1 limit=$2 i c pid kind name
  shift 2
  for ((i = 0; i < limit * 10; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    for c in "${children[@]}"; do
      read -r pid kind name <<<"$c"
      alive "$pid" || die "$name exited while waiting for $what; its log ($run/$name.log):
$(tail -n 20 "$run/$name.log")"
    done
    sleep 0.1
  done
  die "timed out waiting for $what; logs are in $run"
}

log "starting the scheduler on $sched_url ($net mode)"
RIDGE_ADMIN_TOKEN="$admin" spawn scheduler scheduler "$bin/ridge-scheduler" \
  --config "$run/scheduler.toml" --listen "$sched_ip:8443" \
  --tls-cert "$run/cert.pem" --tls-key "$run/key.pem" --database "sqlite:$run/scheduler.db"
wait_for "the scheduler" 30 api /healthz

ids=()
for i in 1 2; do
  j=$((i - 1))
  dir="$run/node$i"
  mkdir -p "$dir"
  chmod 700 "$dir"
  token=$(ctl --json tokens create --region "local-$i" --ttl 10m --max-uses 1 \
    --label trust_domain=local --description "run-local.sh node $i" |
    sed -n 's/^ *"token": "\(.*\)",\{0,1\}$/\1/p')
  [[ -n "$token" ]] || die "ridgectl did not print a bootstrap token"
  (umask 077; echo "$token" >"$dir/bootstrap-token")
  in_ns=()
  [[ "$net" == netns ]] && in_ns=(ip netns exec "ridge-n$i")
  log "starting node $i: HTTP ${http_listen[$j]}, media ${media[$j]}, mesh ${mesh[$j]}"
  # One media shard is plenty for a demo. The dataplane starts with the local secret; the
  # scheduler's dataplane_secret replaces it once the agent applies the
  # desired state.
  dp_args=(--http "${http_listen[$j]}" --udp "${udp_listen[$j]}" --public-ip "${public_ip[$j]}"
    --shards 1 --control-socket "$dir/dp.sock" --drain-timeout 5s)
  [[ "$net" == netns ]] && dp_args+=(--insecure-http --xdp off)
  RIDGE_JWT_SECRET=$(cat "$state/jwt-secret") spawn dataplane "node$i-dataplane" \
    "${in_ns[@]}" "$bin/ridge-dataplane" "${dp_args[@]}"
  wait_for "node $i's dataplane" 30 test -S "$dir/dp.sock"
  spawn agent "node$i-agent" "${in_ns[@]}" "$bin/ridge-agent" \
    --scheduler "$sched_url" --scheduler-ca "$run/cert.pem" --state-dir "$dir/agent" \
    --token-file "$dir/bootstrap-token" --cmdline-path /dev/null --control-socket "$dir/dp.sock" \
    --media-address "${media[$j]}" --mesh-address "${mesh[$j]}" --http-url "${http_url[$j]}" \
    --probe-listen "${probe[$j]}" --metrics-listen "${metrics[$j]}"
  wait_for "node $i's agent to enroll" 30 grep -q "ridge-agent running: node" "$run/node$i-agent.log"
  rm -f "$dir/bootstrap-token"
  ids+=("$(sed -n 's/^ridge-agent running: node \([^ ]*\).*/\1/p' "$run/node$i-agent.log" | tail -n 1)")
  if [[ "$net" == netns ]]; then
    spawn forward "node$i-forward" socat "TCP-LISTEN:${http_url[$j]##*:},bind=127.0.0.1,reuseaddr,fork" \
      "TCP:${http_listen[$j]}"
  fi
done

both_up() { [[ $(api /v1/nodes | grep -o '"state":"up"' | wc -l) -ge 2 ]]; }
wait_for "both nodes to be up" 30 both_up
applied() { curl -sS --max-time 5 --unix-socket "$1" http://localhost/v1/status | grep -q '"desired_version":[0-9]'; }
for i in 1 2; do
  wait_for "node $i to apply its desired state" 30 applied "$run/node$i/dp.sock"
done
if [[ "$net" == netns ]]; then
  for i in 1 2; do wait_for "the forwarder to node $i" 10 curl -s -o /dev/null "${http_url[$((i - 1))]}/"; done
fi

# dispatch I GRANTS IDENTITY: a demo URL on node I (dispatch steered by the
# node's region; on one machine the load score may pick the other node, so
# ask again a few times).
dispatch() {
  local i=$1 grants=$2 who=$3 answer node url token n
  for ((n = 0; n < 20; n++)); do
    answer=$(api "/v1/dispatch?room=$room&identity=$who&$grants&region=local-$i") || answer=
    node=$(sed -n 's/.*"node_id":"\([^"]*\)".*/\1/p' <<<"$answer")
    url=$(sed -n 's/.*"url":"\([^"]*\)".*/\1/p' <<<"$answer")
    token=$(sed -n 's/.*"token":"\([^"]*\)".*/\1/p' <<<"$answer")
    if [[ "$node" == "${ids[$((i - 1))]}" && -n "$token" ]]; then
      echo "$url/?token=$token"
      return
    fi
    sleep 0.5
  done
  die "dispatch did not pick node $i (last answer: $answer)"
}
publisher=$(dispatch 1 "publish=true&subscribe=true" "publisher-$RANDOM")
viewer=$(dispatch 2 "publish=false&subscribe=true" "viewer-$RANDOM")

cat <<MSG

  Ridge local mesh running ($net mode): a scheduler and two nodes, each
  enrolled by its own ridge-agent.

  Scheduler:  $sched_url   (node 1: ${ids[0]}, node 2: ${ids[1]})
  ridgectl:   export RIDGE_SCHEDULER=$sched_url RIDGE_CA_CERT=$run/cert.pem
              export RIDGE_ADMIN_TOKEN=\$(cat $run/admin-token)
              $bin/ridgectl nodes list    # also: rooms, routes, nodes show ID

  Room "$room":
  Publisher on node 1 (press "Join with camera & mic"):
    $publisher
  Viewer on node 2 (watch only; media reaches it over the mesh):
    $viewer

  Logs: $run/*.log.  Ctrl-C stops everything.

MSG

# Run until a signal, or until a child exits on its own. The traps only
# note the signal: stopping from a trap that interrupted `wait` is not
# reliable in bash (a child exiting meanwhile can end the trap early).
signalled=0
trap 'signalled=130' INT
trap 'signalled=143' TERM
while [[ $signalled -eq 0 ]]; do
  wait -n || true
  [[ $signalled -eq 0 ]] || break
  for c in "${children[@]}"; do
    read -r pid kind name <<<"$c"
    alive "$pid" || die "$name exited; its log ($run/$name.log):
$(tail -n 20 "$run/$name.log")"
  done
done
stop_all
exit "$signalled"

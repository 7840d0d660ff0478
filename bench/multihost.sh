#!/usr/bin/env bash
# bench/multihost.sh - a rolling restart of three hosts behind a load
# balancer, under load, with contrib/ansible/rolling-restart.yml (drain,
# check /health 503, restart, undrain, wait for /health 200) and, for
# comparison, the same rolling restart without the drain step
# (bench/multihost/naive-restart.yml: stop zdt and wait for its exit, start
# it again, wait for 200, like `systemctl restart`; the balancer finds out by
# failing). Recipes, in this order behind each balancer:
#   drain           the playbook, hosts with [supervisor] drain_delay
#                   (DRAIN_DELAY below: HAProxy's inter x fall + 1 s = 3 s):
#                   zdtctl drain turns /health 503 at once, serves on for the
#                   delay, then refuses; the balancer has taken the host out
#                   by then
#   no-drain-delay  the naive playbook, hosts with drain_delay: the stop
#                   (SIGTERM) itself turns /health 503 and serves on for the
#                   delay (not in --quick)
#   no-drain        the naive playbook, hosts without drain_delay (the
#                   default): a stop answers new requests 503 at once, then
#                   refuses connections
# Balancers:
#   haproxy-plain   active checks of /health (inter 1s fall 2 rise 2) and
#                   HAProxy's own defaults for retries: no retries, retry-on
#                   or redispatch line, so retries 3, retry-on conn-failure
#                   (a refused connect is retried, to the same server, after
#                   min(timeout connect, 1 s)), no option redispatch; a 503
#                   from a host reaches the client
#   haproxy         contrib/haproxy/zdt.cfg: the same checks, retries 3,
#                   option redispatch 1, retry-on conn-failure
#                   empty-response response-timeout 503
#   nginx           contrib/nginx/zdt-upstream.conf: passive checks only,
#                   max_fails=1 fail_timeout=2s, proxy_next_upstream error
#                   timeout http_503, proxy_next_upstream_tries 3
#
# The three "hosts" are three network namespaces (zdtmh-h1..3), each joined
# to this one by a veth pair (10.231.N.1 here, 10.231.N.2 in the namespace),
# each running its own zdt (proxy mode, listen 10.231.N.2:8080) with one Node
# process (contrib/node/server.js). Without the right to make namespaces (not
# root), or with --loopback, they are three loopback addresses 127.0.0.2-4
# instead. HAProxy and nginx run here and listen on 127.0.0.1 only; the load
# (zdt-load, 32 keep-alive clients, ?sleep=20: the app answers after 20 ms)
# goes to them, and they to the hosts: only loopback and the veth addresses
# carry traffic.
#
# ansible-core runs every host with ansible_connection=local: the playbook's
# zdtctl commands on host N are prefixed with "ip netns exec zdtmh-hN"
# (zdt_cmd_prefix), so they run inside that host's namespace; its /health
# checks (the uri module) run here and reach the host over its veth, as the
# balancer's checks do. ansible-playbook is taken from PATH, else from a venv
# in target/bench-multihost/venv, which is made with `python3 -m venv` and
# `pip install ansible-core==2.19.14` when missing (the one download this
# script may make).
#
# Health: when zdt has the admin listener ([supervisor] admin; `zdt check`
# tells), each host's admin listener is on 10.231.N.2:9180 and HAProxy
# checks GET /health there. Without it, HAProxy and the playbook check GET /
# on the app port, which a drained zdt also answers 503.
#
# Each run: the hosts are restarted first when they run the other
# configuration (with or without drain_delay), then the load starts, 2 s
# later the playbook runs, 2 s after it ends the load stops (SIGTERM; at
# most LOAD_MAX s in any case). A failed request is one zdt-load counts:
# refused or reset, a non-2xx answer, or no answer within 5 s, and the
# probe's (a new connection every 20 ms) failures. "retried" is how many
# requests the balancer sent again (HAProxy: the backend's retries +
# redispatches; without redispatch a retry goes to the same server; nginx:
# requests with more than one upstream in $upstream_addr).
#
# Usage: bench/multihost.sh [--quick] [--loopback] [--balancers LIST]
#                           [--connections N] [--deploy] [--keep]
#   --quick          haproxy-plain, recipes drain and no-drain, about 45 s
#                    (the form tests/multihost.rs runs)
#   --loopback       127.0.0.2-4 instead of network namespaces
#   --balancers LIST comma list of haproxy-plain, haproxy, nginx (all)
#   --connections N  concurrent clients (32)
#   --deploy         the program has a deploy root; each host gets a first
#                    release at the start, and the runs with the drain step
#                    deploy a second one (release_from: zdtctl deploy web
#                    --from DIR) instead of zdtctl restart
#   --keep           keep the work folder (logs, configs, LOAD lines)
# Output: a table, then one RESULT line per run. Exit status: 0 when every
# rolling restart with the drain step failed no request, 1 when one did or a
# playbook failed, 2 on a set-up error, 3 when a tool it needs is missing
# (the line before says which).
#
# Needs: root for the namespaces (else loopback), ip (iproute2), haproxy
# and/or nginx, node, curl, python3 (with venv, or ansible-playbook in PATH)
# and a release build (cargo build --release: zdt, zdtctl, zdt-load; from
# $CARGO_TARGET_DIR when set, or from $ZDT_BIN_DIR). About 4 minutes with all
# three balancers. A zdt without drain_delay (older) runs every recipe on
# hosts without it; the playbook then waits lb_drain_wait after the drain.
set -u
usage() { sed -n '2,/^set -u$/p' "$0" | sed 's/^# \{0,1\}//;/^set -u$/d' >&2; exit 2; }
die() { echo "bench/multihost.sh: $*" >&2; exit 2; }
missing() { echo "bench/multihost.sh: SKIP: $*" >&2; exit 3; }
T_START=$(date +%s)
CMDLINE="$0"; [ $# -gt 0 ] && CMDLINE+="$(printf ' %q' "$@")"

QUICK=0; LOOPBACK=0; BALANCERS=""; CONNS=32; KEEP=0; DEPLOY=0
while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK=1 ;;
    --loopback) LOOPBACK=1 ;;
    --balancers) [ $# -ge 2 ] || die "$1 wants a value"; BALANCERS=$2; shift ;;
    --connections) [ $# -ge 2 ] || die "$1 wants a value"; CONNS=$2; shift ;;
    --keep) KEEP=1 ;;
    --deploy) DEPLOY=1 ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
  shift
done
[ -n "$BALANCERS" ] || { [ "$QUICK" = 1 ] && BALANCERS=haproxy-plain || BALANCERS=haproxy-plain,haproxy,nginx; }
IFS=, read -ra LBS <<<"$BALANCERS"
for b in "${LBS[@]}"; do case $b in haproxy|haproxy-plain|nginx) ;; *) die "unknown balancer '$b' (haproxy, haproxy-plain, nginx)" ;; esac; done
# The rolling restarts run behind each balancer (--quick: the first two).
if [ "$QUICK" = 1 ]; then RECIPES=(drain no-drain); else RECIPES=(drain no-drain-delay no-drain); fi
case $CONNS in ''|*[!0-9]*) die "--connections wants a number" ;; esac

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="${ZDT_BIN_DIR:-$TARGET/release}"
NODE_APP="$ROOT/contrib/node/server.js"
PLAYBOOK="$ROOT/contrib/ansible/rolling-restart.yml"
NAIVE="$ROOT/bench/multihost/naive-restart.yml"
for b in zdt zdtctl zdt-load; do
  [ -x "$BIN/$b" ] || die "build first: cargo build --release ($BIN/$b missing)"
done
for t in node curl python3 timeout setsid; do
  command -v "$t" >/dev/null || missing "$t not found"
done
for b in "${LBS[@]}"; do b=${b%-plain}; command -v "$b" >/dev/null || missing "$b not found (apt-get install ${b/nginx/nginx-light})"; done

LOAD_MAX=150          # no load runs longer than this, whatever happens
# The balancers' health checks: HAProxy inter 1s fall 2 rise 2. The hosts'
# [supervisor] drain_delay is inter x fall + a margin of 1 s, so a host that
# drains or stops keeps serving until HAProxy has seen its /health 503 and
# taken it out (nginx has no check to wait for; see the header).
CHECK_INTER=1 CHECK_FALL=2 CHECK_RISE=2 CHECK_MARGIN=1
DRAIN_DELAY=$((CHECK_INTER * CHECK_FALL + CHECK_MARGIN))
HOSTS=(1 2 3)
WORK=$(mktemp -d /tmp/zdt-multihost.XXXXXX)
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

# --- ansible-core: from PATH, else a venv under target/ ---
ANSIBLE_PLAYBOOK=$(command -v ansible-playbook)
if [ -z "$ANSIBLE_PLAYBOOK" ] || ! "$ANSIBLE_PLAYBOOK" --version >/dev/null 2>&1; then
  VENV="$TARGET/bench-multihost/venv"
  if ! "$VENV/bin/ansible-playbook" --version >/dev/null 2>&1; then
    log "installing ansible-core==2.19.14 into $VENV (pip)"
    { python3 -m venv --clear "$VENV" && "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
        "ansible-core==2.19.14"; } >"$WORK/pip.log" 2>&1 ||
      missing "no ansible-playbook, and pip could not install ansible-core: $(tail -n 3 "$WORK/pip.log" | tr '\n' ' ')"
  fi
  ANSIBLE_PLAYBOOK="$VENV/bin/ansible-playbook"
fi
ANSIBLE_VERSION=$("$ANSIBLE_PLAYBOOK" --version 2>/dev/null | sed -n '1s/.*\[core \(.*\)\]/\1/p')
export ANSIBLE_HOME="$WORK/ansible-home" ANSIBLE_LOCAL_TEMP="$WORK/ansible-tmp" ANSIBLE_REMOTE_TEMP="$WORK/ansible-remote-tmp" ANSIBLE_NOCOLOR=1 \
  ANSIBLE_RETRY_FILES_ENABLED=0 ANSIBLE_PYTHON_INTERPRETER=auto_silent PYTHONWARNINGS=ignore

# --- processes: every one started here is tracked as pid:starttime ---
PIDS=()
# proc_fields, start_of, alive, track, stop_pid
# shellcheck source=bench/lib/procs.sh
. "$ROOT/bench/lib/procs.sh"
# zdt daemons are started by start.sh (here and by the naive playbook), which
# appends "pid:starttime" to the host's zdt.pids.
stop_host_zdts() {
  local h=$1 e
  [ -f "$WORK/h$h/zdt.pids" ] || return 0
  while read -r e; do [ -n "$e" ] && stop_pid "${e%%:*}" "${e#*:}"; done <"$WORK/h$h/zdt.pids"
}

# --- the hosts: namespaces, or loopback addresses ---
NETNS_MADE=(); LINKS_MADE=()
declare -a ADDR PREFIX
APP_PORT=8080; ADMIN_PORT=9180
make_netns() {
  local h ns
  for h in "${HOSTS[@]}"; do
    ns=zdtmh-h$h
    if ip netns list 2>/dev/null | grep -qw "$ns" || ip link show "zdtmh$h-r" >/dev/null 2>&1; then
      die "$ns or zdtmh$h-r exists already (an earlier run still going, or killed: ip netns del $ns)"
    fi
  done
  if ip -4 addr show | grep -q 'inet 10\.231\.'; then die "10.231.0.0/16 is in use here"; fi
  for h in "${HOSTS[@]}"; do
    ns=zdtmh-h$h
    ip netns add "$ns" 2>"$WORK/netns.err" || return 1
    NETNS_MADE+=("$ns")
    ip link add "zdtmh$h-r" type veth peer name "zdtmh$h-n" netns "$ns" && LINKS_MADE+=("zdtmh$h-r") &&
      ip addr add "10.231.$h.1/30" dev "zdtmh$h-r" && ip link set "zdtmh$h-r" up &&
      ip -n "$ns" addr add "10.231.$h.2/30" dev "zdtmh$h-n" && ip -n "$ns" link set "zdtmh$h-n" up &&
      ip -n "$ns" link set lo up || die "cannot set up the veth pair of $ns"
    ADDR[$h]=10.231.$h.2; PREFIX[$h]="ip netns exec $ns"
  done
}
make_loopback() {
  local h
  for h in "${HOSTS[@]}"; do ADDR[$h]=127.0.0.$((h + 1)); PREFIX[$h]=""; done
  # Two ports free on all three addresses.
  read -r APP_PORT ADMIN_PORT < <(python3 - "${ADDR[@]}" <<'PY'
import socket, sys
found = []
while len(found) < 2:
    s = socket.socket(); s.bind((sys.argv[1], 0)); p = s.getsockname()[1]; s.close()
    try:
        held = []
        for a in sys.argv[1:]:
            t = socket.socket(); t.bind((a, p)); held.append(t)
        if p not in found:
            found.append(p)
    except OSError:
        pass
print(*found)
PY
)
}

cleanup() {
  local e h p ns
  for ((h = ${#PIDS[@]} - 1; h >= 0; h--)); do e=${PIDS[$h]}; stop_pid "${e%%:*}" "${e#*:}"; done
  local waits=()
  for h in "${HOSTS[@]}"; do stop_host_zdts "$h" & waits+=($!); done
  wait "${waits[@]}"
  for ns in "${NETNS_MADE[@]}"; do
    # Anything still in a namespace made here was started here.
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
  done
  # Deleting a namespace deletes its veth pair; this is for one left half made.
  for e in "${LINKS_MADE[@]}"; do ip link show "$e" >/dev/null 2>&1 && ip link del "$e" 2>/dev/null; done
  if [ "$KEEP" = 1 ]; then echo "work folder kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

MODE=netns
if [ "$LOOPBACK" = 1 ]; then
  MODE=loopback
elif [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null; then
  MODE=loopback; log "not root or no ip(8): three loopback addresses instead of network namespaces"
elif ! make_netns; then
  MODE=loopback; log "cannot make network namespaces ($(cat "$WORK/netns.err")): loopback addresses instead"
  for ns in "${NETNS_MADE[@]}"; do ip netns del "$ns" 2>/dev/null; done; NETNS_MADE=()
  for e in "${LINKS_MADE[@]}"; do ip link del "$e" 2>/dev/null; done; LINKS_MADE=()
fi
[ "$MODE" = loopback ] && make_loopback

# --- zdt on each host ---
# Does this zdt have the admin listener? (`zdt check` rejects unknown keys.)
printf '[supervisor]\ncontrol = "x.sock"\nadmin = "127.0.0.1:9180"\n' >"$WORK/admin-probe.toml"
if "$BIN/zdt" -c "$WORK/admin-probe.toml" check >/dev/null 2>&1; then HAVE_ADMIN=1; else HAVE_ADMIN=0; fi
health_port() { if [ "$HAVE_ADMIN" = 1 ]; then echo "$ADMIN_PORT"; else echo "$APP_PORT"; fi; }
health_path() { if [ "$HAVE_ADMIN" = 1 ]; then echo /health; else echo /; fi; }
# Does it know [supervisor] drain_delay?
printf '[supervisor]\ncontrol = "x.sock"\ndrain_delay = "3s"\n' >"$WORK/delay-probe.toml"
if "$BIN/zdt" -c "$WORK/delay-probe.toml" check >/dev/null 2>&1; then HAVE_DELAY=1; else HAVE_DELAY=0; fi
HEALTH_DESC="GET $(health_path) on port $(health_port)$([ "$HAVE_ADMIN" = 1 ] && echo " (zdt's admin listener)" || echo " (the app port: this zdt has no admin listener yet; a drained zdt answers it 503)")"

# host_config H DELAY: the host's configuration, with [supervisor]
# drain_delay = DELAY seconds when DELAY > 0.
host_config() {
  local h=$1 d="$WORK/h$1"
  echo '[supervisor]'
  echo 'control = "zdt.sock"'
  echo 'log_dir = "logs"'
  [ "$HAVE_ADMIN" = 1 ] && echo "admin = \"${ADDR[$h]}:$ADMIN_PORT\""
  [ "$2" -gt 0 ] && echo "drain_delay = \"${2}s\""
  echo '[program.web]'
  if [ "$DEPLOY" = 1 ]; then
    echo 'command = ["node", "{release}/server.js"]'
    echo "directory = \"$d/app/current\""
  else
    echo "command = [\"node\", \"$NODE_APP\"]"
  fi
  echo 'mode = "proxy"'
  echo "listen = [\"tcp://${ADDR[$h]}:$APP_PORT\"]"
  echo 'ready = { http = "/" }'
  echo 'max_wait = "5s"'
  echo 'kill_timeout = "3s"'
  if [ "$DEPLOY" = 1 ]; then
    echo '[program.web.deploy]'
    echo "root = \"$d/app\""
    echo 'keep_releases = 3'
  fi
}
# Each host has two configurations: delay.toml (drain_delay, when this zdt
# has it) and nodelay.toml (none, the default); active.toml links to the one
# the host runs, which start.sh starts and the playbooks' zdtctl uses.
[ "$HAVE_DELAY" = 1 ] || log "this zdt has no [supervisor] drain_delay: the drain recipe waits lb_drain_wait after zdtctl drain instead"
HOST_CONF=delay
for h in "${HOSTS[@]}"; do
  d="$WORK/h$h"; mkdir -p "$d"
  host_config "$h" "$([ "$HAVE_DELAY" = 1 ] && echo "$DRAIN_DELAY" || echo 0)" >"$d/delay.toml"
  host_config "$h" 0 >"$d/nodelay.toml"
  ln -sfn delay.toml "$d/active.toml"
  for c in delay nodelay; do
    "$BIN/zdt" -c "$d/$c.toml" check >"$d/check.log" 2>&1 || die "zdt check $d/$c.toml: $(cat "$d/check.log")"
  done
  # start.sh starts this host's zdt (active.toml) in the background,
  # detached, and records it; stop.sh is `systemctl stop`: SIGTERM to the
  # last one started, then wait until it has exited (30 s, then SIGKILL).
  # The naive playbook runs both.
  cat >"$d/start.sh" <<EOF
#!/bin/sh
${PREFIX[$h]} setsid "$BIN/zdt" -c "$d/active.toml" >>"$d/zdt.log" 2>&1 </dev/null &
p=\$!
s=\$(cut -d')' -f2- /proc/\$p/stat | awk '{print \$20}')
echo "\$p:\$s" >>"$d/zdt.pids"
EOF
  cat >"$d/stop.sh" <<'EOF'
#!/bin/sh
e=$(tail -n 1 "$(dirname "$0")/zdt.pids"); p=${e%%:*}; s=${e#*:}
alive() { [ "$(cut -d')' -f2- /proc/$p/stat 2>/dev/null | awk '$1 != "Z" {print $20}')" = "$s" ]; }
alive || exit 0
kill -TERM "$p"
i=0; while alive && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
alive && { kill -KILL "$p"; echo "zdt $p did not exit within 30 s: killed" >&2; exit 1; }
exit 0
EOF
  chmod +x "$d/start.sh" "$d/stop.sh"
  "$d/start.sh"
done
# --deploy: every host gets its first release (the program stays STOPPED
# until then); the rolling runs with the drain step deploy a second one.
if [ "$DEPLOY" = 1 ]; then
  mkdir -p "$WORK/release"; cp "$NODE_APP" "$WORK/release/server.js"
  for h in "${HOSTS[@]}"; do
    for ((i = 0; i < 100; i++)); do [ -S "$WORK/h$h/zdt.sock" ] && break; sleep 0.1; done
    echo 1 >"$WORK/release/VERSION"
    # shellcheck disable=SC2086 # PREFIX is a command prefix, split on purpose
    ${PREFIX[$h]} "$BIN/zdtctl" -c "$WORK/h$h/active.toml" deploy web --from "$WORK/release" \
      >"$WORK/h$h/deploy-1.log" 2>&1 || die "host $h: the first deploy failed: $(tail -n 5 "$WORK/h$h/deploy-1.log")"
  done
  echo 2 >"$WORK/release/VERSION"
  RELEASE_ARGS=(-e "release_from=$WORK/release")
else
  RELEASE_ARGS=()
fi

# wait_health H CODE: the host's health URL answers CODE within 30 s.
wait_health() {
  local i
  for ((i = 0; i < 300; i++)); do
    [ "$(curl -s -o /dev/null -m 2 -w '%{http_code}' "http://${ADDR[$1]}:$(health_port)$(health_path)")" = "$2" ] && return 0
    sleep 0.1
  done
  echo "host $1 did not answer $2 within 30 s; the end of its zdt log:" >&2; tail -n 20 "$WORK/h$1/zdt.log" >&2; exit 2
}
# use_config delay|nodelay: every host runs that configuration (stop.sh,
# relink, start.sh when it runs the other one).
use_config() {
  local h waits=()
  [ "$HOST_CONF" = "$1" ] && return 0
  for h in "${HOSTS[@]}"; do
    { "$WORK/h$h/stop.sh" && ln -sfn "$1.toml" "$WORK/h$h/active.toml" && "$WORK/h$h/start.sh"; } &
    waits+=($!)
  done
  wait "${waits[@]}"
  for h in "${HOSTS[@]}"; do wait_health "$h" 200; done
  HOST_CONF=$1
}
for h in "${HOSTS[@]}"; do wait_health "$h" 200; done
log "three hosts serving ($MODE: ${ADDR[*]}, app port $APP_PORT); health: $HEALTH_DESC"

# --- inventory ---
{
  echo '[zdt]'
  for h in "${HOSTS[@]}"; do
    printf 'h%s zdt_config=%s zdt_cmd_prefix="%s" zdt_health_url=http://%s:%s%s zdt_app_url=http://%s:%s/ zdt_start=%s zdt_stop=%s\n' \
      "$h" "$WORK/h$h/active.toml" "${PREFIX[$h]}" "${ADDR[$h]}" "$(health_port)" "$(health_path)" \
      "${ADDR[$h]}" "$APP_PORT" "$WORK/h$h/start.sh" "$WORK/h$h/stop.sh"
  done
  echo '[zdt:vars]'
  echo 'ansible_connection=local'
  echo 'ansible_python_interpreter="{{ ansible_playbook_python }}"'
  echo "zdtctl=$BIN/zdtctl"
  echo 'zdt_program=web'
} >"$WORK/inventory.ini"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# --- balancers ---
LB_PORT=""; LB_PID=""
# start_haproxy VARIANT: "plain" (HAProxy's own retry defaults: retries 3,
# retry-on conn-failure, no redispatch), or "recommended"
# (contrib/haproxy/zdt.cfg: retries 3, option redispatch 1, retry-on
# conn-failure empty-response response-timeout 503).
start_haproxy() {
  local h d="$WORK/haproxy"; rm -rf "$d"; mkdir -p "$d"
  LB_PORT=$(free_port); STATS_PORT=$(free_port)
  {
    cat <<EOF
global
    maxconn 4096
    log stderr format short local0 info
defaults
    mode http
    log global
    option httplog
    option dontlog-normal
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 10s
    option http-keep-alive
EOF
    if [ "$1" = recommended ]; then
      printf '    retries 3\n    option redispatch 1\n    retry-on conn-failure empty-response response-timeout 503\n'
    fi
    cat <<EOF
frontend www
    bind 127.0.0.1:$LB_PORT
    default_backend zdt_hosts
listen stats
    bind 127.0.0.1:$STATS_PORT
    stats enable
    stats uri /stats
backend zdt_hosts
    balance roundrobin
    option httpchk GET $(health_path)
    http-check expect status 200
    default-server check port $(health_port) inter ${CHECK_INTER}s fall $CHECK_FALL rise $CHECK_RISE
EOF
    for h in "${HOSTS[@]}"; do echo "    server h$h ${ADDR[$h]}:$APP_PORT"; done
  } >"$d/haproxy.cfg"
  haproxy -c -f "$d/haproxy.cfg" >"$d/check.log" 2>&1 || die "haproxy -c: $(cat "$d/check.log")"
  haproxy -db -f "$d/haproxy.cfg" >"$d/haproxy.log" 2>&1 & LB_PID=$!; track "$LB_PID"; LB_START=$(start_of "$LB_PID")
  LB_LOG="$d/haproxy.log"
  LB_WAITS=(-e "lb_check_interval=$CHECK_INTER" -e "lb_fall=$CHECK_FALL" -e "lb_rise=$CHECK_RISE" -e "lb_margin=$CHECK_MARGIN")
}
# Retries + redispatches of the backend so far, from the stats CSV.
haproxy_retried() {
  curl -s -m 5 "http://127.0.0.1:$STATS_PORT/stats;csv" |
    awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i } $1 == "zdt_hosts" && $2 == "BACKEND" { print $c["wretr"] + $c["wredis"] }'
}
start_nginx() {
  local h d="$WORK/nginx"; mkdir -p "$d"
  LB_PORT=$(free_port)
  {
    cat <<EOF
worker_processes 2;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 4096; }
http {
    map \$upstream_addr \$retried { ~, 1; default 0; }
    log_format retried '\$msec \$status "\$upstream_addr" "\$upstream_status"';
    access_log $d/retried.log retried if=\$retried;
    client_body_temp_path $d/tmp;
    proxy_temp_path $d/tmp;
    upstream zdt_hosts {
EOF
    for h in "${HOSTS[@]}"; do echo "        server ${ADDR[$h]}:$APP_PORT max_fails=1 fail_timeout=2s;"; done
    cat <<EOF
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$LB_PORT;
        location / {
            proxy_pass http://zdt_hosts;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_connect_timeout 1s;
            proxy_next_upstream error timeout http_503;
            proxy_next_upstream_tries 3;
            proxy_next_upstream_timeout 10s;
        }
    }
}
EOF
  } >"$d/nginx.conf"
  mkdir -p "$d/tmp"; : >"$d/retried.log"
  nginx -p "$d" -c "$d/nginx.conf" -e "$d/error.log" -t >"$d/check.log" 2>&1 || die "nginx -t: $(cat "$d/check.log")"
  nginx -p "$d" -c "$d/nginx.conf" -e "$d/error.log" -g 'daemon off;' >"$d/stderr" 2>&1 & LB_PID=$!; track "$LB_PID"; LB_START=$(start_of "$LB_PID")
  LB_LOG="$d/error.log"
  # Passive checks: nothing to wait for before the restart but the 503s'
  # retries; after it, more than fail_timeout (2 s).
  LB_WAITS=(-e lb_drain_wait=1 -e lb_return_wait=3)
}
haproxy-plain_retried() { haproxy_retried; }
nginx_retried() { wc -l <"$WORK/nginx/retried.log"; }
wait_lb() { # GET / through the balancer answers 200 within 30 s
  local i
  for ((i = 0; i < 300; i++)); do
    curl -sf -m 2 -o /dev/null "http://127.0.0.1:$LB_PORT/" && return 0; sleep 0.1
  done
  echo "$1 (port $LB_PORT) did not answer within 30 s; the end of $LB_LOG:" >&2; tail -n 20 "$LB_LOG" >&2; exit 2
}

# --- one run: the load through the balancer across one rolling restart ---
RESULTS=()
EXIT=0
run() { # run BALANCER RECIPE PLAYBOOK
  local lb=$1 recipe=$2 pb=$3 out="$WORK/$1-$2" t0 t1 rc r0 r1 line
  mkdir -p "$out"
  # no-drain: hosts as set up without a thought for the balancer (no
  # drain_delay); the others: drain_delay (when this zdt has it).
  if [ "$recipe" = no-drain ]; then use_config nodelay; else use_config delay; fi
  for h in "${HOSTS[@]}"; do wait_health "$h" 200; done
  # Every host back in the balancer's rotation (HAProxy: rise 2 x inter 1s).
  sleep 3
  r0=$("${lb}_retried")
  "$BIN/zdt-load" "http://127.0.0.1:$LB_PORT/?sleep=20" -d "$LOAD_MAX" -c "$CONNS" -m keepalive -t 5 \
    --label "$lb-$recipe" >"$out/load.txt" 2>&1 & local load=$!; track "$load"
  sleep 2
  log "$lb, $recipe: rolling restart of ${#HOSTS[@]} hosts under $CONNS clients"
  t0=$(date +%s.%N)
  local extra=()
  [ "$recipe" = drain ] && extra=("${RELEASE_ARGS[@]}")
  timeout 120 "$ANSIBLE_PLAYBOOK" -i "$WORK/inventory.ini" "$pb" "${LB_WAITS[@]}" "${extra[@]}" >"$out/ansible.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  sleep 2
  kill -TERM "$load" 2>/dev/null; wait "$load" 2>/dev/null
  r1=$("${lb}_retried")
  line=$(grep '^LOAD ' "$out/load.txt") || die "no LOAD line from zdt-load: $(cat "$out/load.txt")"
  if [ "$rc" != 0 ]; then
    log "$lb, $recipe: the playbook failed (exit $rc); the end of $out/ansible.log:"; tail -n 25 "$out/ansible.log" >&2
    EXIT=1
  fi
  local res
  res="balancer=$lb recipe=$recipe drain_delay_s=$([ "$HOST_CONF" = delay ] && [ "$HAVE_DELAY" = 1 ] && echo "$DRAIN_DELAY" || echo 0) playbook_rc=$rc playbook_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') retried=$((r1 - r0)) ${line#LOAD }"
  RESULTS+=("$res")
  log "$lb, $recipe: ${line#LOAD }"
  if [ "$recipe" = drain ] && ! grep -q ' failed=0 ' <<<" ${line#LOAD } "; then EXIT=1; fi
}

for lb in "${LBS[@]}"; do
  case $lb in
    haproxy) start_haproxy recommended ;;
    haproxy-plain) start_haproxy plain ;;
    nginx) start_nginx ;;
  esac
  wait_lb "$lb"
  for recipe in "${RECIPES[@]}"; do
    [ "$recipe" = no-drain-delay ] && [ "$HAVE_DELAY" = 0 ] && continue
    if [ "$recipe" = drain ]; then run "$lb" drain "$PLAYBOOK"; else run "$lb" "$recipe" "$NAIVE"; fi
  done
  stop_pid "$LB_PID" "$LB_START"
done

# --- report ---
ELAPSED=$(($(date +%s) - T_START))
echo
echo "Rolling $([ "$DEPLOY" = 1 ] && echo "deploy (zdtctl deploy with the drain step)" || echo restart) of 3 hosts ($MODE), $CONNS keep-alive clients through the balancer, GET /?sleep=20"
echo "($(date -u +%Y-%m-%d), $(nproc) CPUs, $(uname -sr); $("$BIN/zdt" --version 2>/dev/null || echo zdt), ansible-core $ANSIBLE_VERSION, $(haproxy -v 2>/dev/null | sed -n '1s/^HAProxy version \([^ ]*\).*/HAProxy \1/p'), $(nginx -v 2>&1 | sed 's/.*: //'), Node $(node --version); health: $HEALTH_DESC; took $((ELAPSED / 60)) min $((ELAPSED % 60)) s)"
echo "Hosts' drain_delay: $([ "$HAVE_DELAY" = 1 ] && echo "${DRAIN_DELAY}s (HAProxy inter ${CHECK_INTER}s x fall $CHECK_FALL + ${CHECK_MARGIN}s) where the recipe says so" || echo "none (this zdt has no drain_delay)")"
echo "Command: $CMDLINE"
echo
printf '| balancer | recipe | requests | failed | failure kinds | retried by the balancer | longest outage (probe) | p99 ms | playbook |\n'
printf '|---|---|---|---|---|---|---|---|---|\n'
for r in "${RESULTS[@]}"; do
  awk -v line="$r" -v deploy="$DEPLOY" 'BEGIN {
    n = split(line, kv, " ")
    for (i = 1; i <= n; i++) { j = index(kv[i], "="); if (j) v[substr(kv[i], 1, j - 1)] = substr(kv[i], j + 1) }
    kinds = "none"; probe = v["probe_failed"] + 0
    if (match(line, /\(connect=[^)]*\)/)) {
      m = split(substr(line, RSTART + 1, RLENGTH - 2), k, ","); kinds = ""
      for (i = 1; i <= m; i++) { split(k[i], pr, "="); if (pr[2] != "0") kinds = kinds (kinds == "" ? "" : ", ") pr[1] " " pr[2] }
      if (probe > 0) kinds = kinds (kinds == "" ? "" : ", ") "probe " probe
      if (kinds == "") kinds = "none"
    }
    dd = (v["drain_delay_s"] > 0) ? "drain_delay " v["drain_delay_s"] "s" : "no drain_delay"
    if (v["recipe"] == "drain") recipe = "drain, " (deploy == 1 ? "deploy" : "restart") ", undrain (contrib/ansible); " dd
    else recipe = "no drain step: stop + start (systemctl restart); " dd
    printf "| %s | %s | %s | **%s** | %s | %s | %s ms | %s | %s s%s |\n", v["balancer"], recipe, v["requests"], v["failed"], kinds, \
      v["retried"], v["longest_outage_ms"], v["p99_ms"], v["playbook_s"], (v["playbook_rc"] == 0 ? "" : ", FAILED " v["playbook_rc"])
  }'
done
echo
for r in "${RESULTS[@]}"; do echo "RESULT $r"; done
exit "$EXIT"

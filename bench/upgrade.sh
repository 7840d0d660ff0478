#!/usr/bin/env bash
# bench/upgrade.sh - upgrading zdt itself under load (`zdtctl upgrade`: zdt
# re-execs its binary in place, same pid, keeping its listening sockets, its
# state and its workers) beside the reloads people use today for the process
# in front of an app: `nginx -s reload` and a HAProxy master-worker reload.
#
# The app: contrib/node/server.js, 2 copies, and contrib/php/app.php under
# `php -S` (PHP_CLI_SERVER_WORKERS=4, 2 copies). Rows, each started fresh,
# then N events 1 s apart:
#
#   zdt pass, node      zdt hands its socket to 2 Node workers (ready =
#                       notify); event: `zdtctl -c CONF upgrade`.
#   zdt proxy, node     zdt accepts and forwards to 2 Node workers on private
#                       ports (ready = GET /); event: `zdtctl upgrade`.
#   zdt proxy, php -S   the same with 2 `php -S` workers (ready = /health).
#   zdt proxy in zdt's process, node   zdt proxy, node with proxy_process =
#                       false: zdt closes its client connections before the
#                       exec instead of leaving its proxy process serving.
#   nginx -s reload     nginx (worker_processes auto, upstream keepalive 32)
#                       in front of 2 plain Node processes; event: rewrite
#                       nginx.conf (a new `add_header X-Reload: I`), then
#                       `nginx -s reload`.
#   haproxy reload      haproxy -W (master-worker, `expose-fd listeners` on
#                       its stats socket: the recommended seamless reload) in
#                       front of the same 2 Node processes; event: rewrite
#                       the config (`X-Reload: I`), `kill -USR2 <master>`.
#
# What one event's times mean:
#   done ms     zdt: the wall time of `zdtctl upgrade`, which returns once the
#               new binary serves. nginx/haproxy: from the reload command
#               until every old worker process has exited (only new workers
#               are left: the reload is over), read from /proc.
#   serving ms  zdt: the same as done. nginx/haproxy: from the reload
#               command until a new connection (GET /) is answered 200
#               with the new config's X-Reload header.
# nginx/haproxy are polled every 5 ms by one Python process that also runs
# the reload command. Both times: median (max) over the N events.
#
# Load: every event has its own window, from 0.5 s before it to 0.5 s after
# it, with two target/release/zdt-load runs side by side against
# GET /?sleep=SLEEP_MS: CLIENTS keep-alive clients (plus zdt-load's
# new-connection probe every 20 ms, whose failures count), and CLIENTS
# clients opening a new connection per request (`-m close`). Every failed
# request counts: refused, reset, closed, non-2xx, no answer within 5 s.
# Failed: summed over the N windows; p99: the median (worst) of the windows'.
#
# Pids: zdt's pid and its workers' pids (zdt's children) before the first
# and after the last upgrade; a zdt row is FAILED if any changed, or if an
# upgrade failed (the row stops at its first failed upgrade and prints why,
# e.g. "zdtctl upgrade: unknown command" with a zdt that has no upgrade).
# For nginx/haproxy: the master's pid (unchanged) and its workers (new ones
# are the point of a reload). The script exits 1 if a row FAILED.
#
# Installs nothing. Needs a release build (cargo build --release), curl,
# python3, node, php (php-cli), nginx (nginx-light), haproxy; a row whose
# tool is missing is skipped with a line saying so.
#
# Usage: bench/upgrade.sh [--upgrades N] [--clients C] [--sleep MS] [--quick]
#                         [--rows LIST] [--out DIR]
#   --upgrades N   upgrades/reloads per row (20)
#   --clients C    clients of each kind, keep-alive and new-connection (32)
#   --sleep MS     handler time of each request (20)
#   --quick        3 upgrades, zdt rows only
#   --rows LIST    comma list of rows: zdt_pass,zdt_proxy,zdt_php,nginx,haproxy
#   --out DIR      results folder (a new /tmp dir); the table: DIR/upgrade.md
set -euo pipefail
N=20; CLIENTS=32; SLEEP_MS=20; QUICK=0; OUT=""; ONLY=""
usage() { sed -n '2,/^set -euo/p' "$0" | sed 's/^# \{0,1\}//;/^set -euo/d' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --upgrades) N=${2:?}; shift ;;
    --clients) CLIENTS=${2:?}; shift ;;
    --sleep) SLEEP_MS=${2:?}; shift ;;
    --quick) QUICK=1 ;;
    --rows) ONLY=${2:?}; shift ;;
    --out) OUT=${2:?}; shift ;;
    *) usage ;;
  esac
  shift
done
[ "$QUICK" = 1 ] && N=3
for v in "$N" "$CLIENTS"; do
  case $v in ''|*[!0-9]*|0) echo "--upgrades and --clients want a positive number" >&2; exit 2 ;; esac
done
case $SLEEP_MS in ''|*[!0-9]*) echo "--sleep wants a number of ms" >&2; exit 2 ;; esac
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$ROOT/target/release"
for b in zdt zdtctl zdt-load; do
  [ -x "$BIN/$b" ] || { echo "build first: cargo build --release ($b missing)" >&2; exit 2; }
done
for t in curl python3 ps; do command -v "$t" >/dev/null || { echo "$t not found" >&2; exit 2; }; done
[ -n "$OUT" ] || OUT=$(mktemp -d /tmp/zdt-upgrade.XXXXXX)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ulimit -n 65536 2>/dev/null || true

NODE_APP="$ROOT/contrib/node/server.js"
PHP_APP="$ROOT/contrib/php/app.php"
EVENT_TIMEOUT=30 # seconds: one upgrade or reload, and each wait in it
START_TIMEOUT=60 # seconds: a stack serving after its start
LOAD_MAX=$(( EVENT_TIMEOUT + 20 )) # seconds: zdt-load's own bound per window
GAP=1 # seconds between events

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
now_ms() { date +%s%3N; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up() { curl -sf -o /dev/null -m 2 "http://127.0.0.1:$1/"; }
wait_up() { # wait_up PORT SECONDS
  local end=$(( $(date +%s) + $2 ))
  until up "$1"; do [ "$(date +%s)" -lt "$end" ] || return 1; sleep 0.1; done
}
# kv KEY LINE -> the value of KEY=value in LINE (also inside "(a=1,b=2)").
kv() { sed -n "s/.*[ (,]$1=\([^ ,)]*\).*/\1/p" <<<" $2"; }
# The live (not zombie) children of PID, sorted, on one line.
# Live children of PID, but for zdt's proxy process (zdt __proxy), which an
# upgrade replaces on purpose: the workers.
kids() {
  { ps -o pid=,stat=,args= --ppid "$1" 2>/dev/null || true; } | awk '$2 !~ /^Z/ && $0 !~ / __proxy/ { print $1 }' | sort -n | tr '\n' ' ' | sed 's/ $//'
}
# Whether PID is alive and still a child of this script.
ours() { [ "$(ps -o ppid= -p "$1" 2>/dev/null | tr -d ' ')" = "$$" ]; }
# median_max FILE COLUMN -> "median max" of the numbers in that column.
median_max() {
  awk -v c="$2" '$c ~ /^[0-9.]+$/ { a[++n] = $c + 0 }
    END { if (n == 0) { print "- -"; exit }
      for (i = 2; i <= n; i++) { y = a[i]; j = i - 1; while (j > 0 && a[j] > y) { a[j + 1] = a[j]; j-- } a[j + 1] = y }
      m = (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
      printf "%.0f %.0f\n", m, a[n] }' "$1"
}

# Every process this script starts goes into PIDS; the processes they start
# (workers) that we saw go into SEEN with their command name, so a worker
# left behind by a master killed at its deadline is ended too.
PIDS=(); SEEN=()
# stop_pid PID [SECONDS]: TERM, wait for it, KILL at the deadline.
stop_pid() {
  kill "$1" 2>/dev/null || return 0
  local i
  for ((i = 0; i < ${2:-15} * 10; i++)); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
# see PID...: remembers these workers as "pid:comm".
see() {
  local p c
  for p in "$@"; do c=$(ps -o comm= -p "$p" 2>/dev/null || true); [ -n "$c" ] && SEEN+=("$p:$c"); done
  return 0
}
# Ends the workers we saw that are still there under the same command name
# and have lost their parent (a pid reused by another program is left alone).
end_orphans() {
  local e p c
  for e in "${SEEN[@]}"; do
    p=${e%%:*}; c=${e#*:}
    if [ "$(ps -o comm= -p "$p" 2>/dev/null || true)" = "$c" ] && [ "$(ps -o ppid= -p "$p" 2>/dev/null | tr -d ' ')" = 1 ]; then
      kill -9 "$p" 2>/dev/null || true
    fi
  done
  SEEN=()
}
# Ends this row's processes, newest first (masters stop their workers).
stop_all() {
  local i
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[$i]}" 15; done
  PIDS=()
  end_orphans
}
cleanup() { stop_all >/dev/null 2>&1 || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the stacks: start_KEY DIR sets PORT and MASTER (the process that is
# --- upgraded or reloaded) and returns once it serves; event_KEY DIR I does
# --- one upgrade/reload and sets EV_DONE and EV_SERVE (ms) or EV_WHY ---

zdt_start() { # zdt_start DIR MODE APP [SUPERVISOR_LINE]
  local dir=$1 mode=$2 app=$3 extra=${4:-} cmd ready env instances=2 i
  PORT=$(free_port)
  case $app in
    node) cmd="[\"node\", \"$NODE_APP\"]"
          if [ "$mode" = pass ]; then ready='{ notify = true }'; env="{ ZDT_BIN = \"$BIN/zdt\" }"
          else ready='{ http = "/" }'; env='{}'; fi ;;
    php) cmd="[\"php\", \"-S\", \"127.0.0.1:{port}\", \"$PHP_APP\"]"
         ready='{ http = "/health" }'; env='{ PHP_CLI_SERVER_WORKERS = "4" }' ;;
  esac
  cat >"$dir/supervisor.toml" <<EOF
[supervisor]
control = "$dir/zdt.sock"
log_dir = "$dir/logs"
$extra
[program.web]
command = $cmd
listen = ["tcp://127.0.0.1:$PORT"]
mode = "$mode"
ready = $ready
instances = $instances
environment = $env
kill_timeout = "5s"
EOF
  "$BIN/zdt" -c "$dir/supervisor.toml" 2>"$dir/zdt.log" & MASTER=$!; PIDS+=("$MASTER")
  wait_up "$PORT" "$START_TIMEOUT" || return 1
  # Both instances running (pass mode: the port answers with the first).
  for ((i = 0; i < START_TIMEOUT * 10; i++)); do
    [ "$(kids "$MASTER" | wc -w)" -ge "$instances" ] && return 0
    sleep 0.1
  done
  return 1
}
start_zdt_pass() { zdt_start "$1" pass node; }
start_zdt_proxy() { zdt_start "$1" proxy node; }
start_zdt_php() { zdt_start "$1" proxy php; }
start_zdt_inproc() { zdt_start "$1" proxy node "proxy_process = false"; }
event_zdt() { # event_zdt DIR I
  local dir=$1 out="$1/upgrade-$2.txt" t0 rc=0 pid
  t0=$(now_ms)
  timeout -k 5 "$EVENT_TIMEOUT" "$BIN/zdtctl" -c "$dir/supervisor.toml" upgrade >"$out" 2>&1 || rc=$?
  EV_DONE=$(( $(now_ms) - t0 )); EV_SERVE=$EV_DONE
  if [ "$rc" -ne 0 ]; then
    if grep -qiE "unrecognized subcommand|unknown (sub)?command" "$out"; then
      EV_WHY="zdtctl upgrade: unknown command (this zdtctl has no upgrade)"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      EV_WHY="zdtctl upgrade: no answer within ${EVENT_TIMEOUT}s"
    else
      EV_WHY="zdtctl upgrade exited $rc: $(head -c 300 "$out" | tr '\n' ' ')"
    fi
    return 1
  fi
  # "upgraded: zdt A -> zdt B, pid P unchanged, T ms"
  pid=$(sed -n 's/.*pid \([0-9][0-9]*\) unchanged.*/\1/p' "$out" | head -1)
  if [ "$pid" != "$MASTER" ]; then
    EV_WHY="zdtctl upgrade says pid '${pid}', zdt was started as $MASTER: $(head -c 300 "$out" | tr '\n' ' ')"
    return 1
  fi
  ours "$MASTER" || { EV_WHY="zdt ($MASTER) is gone after the upgrade"; return 1; }
  EV_NOTE="zdt says $(sed -n 's/^upgraded: .*, \([0-9][0-9]*\) ms$/\1/p' "$out" | head -1) ms"
}
event_zdt_pass() { event_zdt "$@"; }
event_zdt_proxy() { event_zdt "$@"; }
event_zdt_php() { event_zdt "$@"; }
event_zdt_inproc() { event_zdt "$@"; }

# The 2 plain Node copies nginx and haproxy forward to: APP_A, APP_B.
start_apps() {
  local dir=$1 n p
  APP_A=$(free_port); APP_B=$(free_port)
  for n in a b; do
    p=$APP_A; [ "$n" = b ] && p=$APP_B
    PORT=$p node "$NODE_APP" >>"$dir/node-$n.log" 2>&1 & PIDS+=($!)
  done
  wait_up "$APP_A" "$START_TIMEOUT" && wait_up "$APP_B" "$START_TIMEOUT"
}

nginx_conf() { # nginx_conf DIR I: the config of reload I
  cat >"$1/nginx.conf" <<EOF
worker_processes auto;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream app { server 127.0.0.1:$APP_A; server 127.0.0.1:$APP_B; keepalive 32; }
  server {
    listen 127.0.0.1:$PORT;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      add_header X-Reload $2 always;
    }
  }
}
EOF
}
NGINX=(); # set in start_nginx: nginx with this row's prefix, config and error log
start_nginx() {
  local dir=$1
  start_apps "$dir" || return 1
  PORT=$(free_port)
  nginx_conf "$dir" 0
  NGINX=(nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log")
  "${NGINX[@]}" -g 'daemon off;' 2>"$dir/nginx.stderr" & MASTER=$!; PIDS+=("$MASTER")
  wait_up "$PORT" "$START_TIMEOUT"
}
event_nginx() { # event_nginx DIR I
  nginx_conf "$1" "$2"
  reload_and_watch "$2" timeout -k 2 "$EVENT_TIMEOUT" "${NGINX[@]}" -s reload
}

haproxy_conf() { # haproxy_conf DIR I: the config of reload I
  cat >"$1/haproxy.cfg" <<EOF
global
  maxconn 8192
  stats socket $1/admin.sock mode 600 level admin expose-fd listeners
defaults
  mode http
  option http-keep-alive
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  timeout http-keep-alive 30s
frontend web
  bind 127.0.0.1:$PORT
  http-response set-header X-Reload $2
  default_backend app
backend app
  server a 127.0.0.1:$APP_A
  server b 127.0.0.1:$APP_B
EOF
}
start_haproxy() {
  local dir=$1
  start_apps "$dir" || return 1
  PORT=$(free_port)
  haproxy_conf "$dir" 0
  haproxy -c -f "$dir/haproxy.cfg" >"$dir/haproxy-check.txt" 2>&1 || { log "haproxy -c: $(cat "$dir/haproxy-check.txt")"; return 1; }
  # -W: master-worker; -db: the master stays in the foreground (our child).
  haproxy -W -db -f "$dir/haproxy.cfg" -p "$dir/haproxy.pid" >"$dir/haproxy.log" 2>&1 & MASTER=$!; PIDS+=("$MASTER")
  wait_up "$PORT" "$START_TIMEOUT"
}
event_haproxy() { # event_haproxy DIR I
  haproxy_conf "$1" "$2"
  reload_and_watch "$2" kill -USR2 "$MASTER"
}

# reload_and_watch I CMD...: runs the reload command, then polls every 5 ms
# until a new connection is answered with "X-Reload: I" (EV_SERVE) and until
# every worker of MASTER from before is gone and a new one is there
# (EV_DONE), both in ms from the command's start, within EVENT_TIMEOUT.
# One Python process does it: a curl and a ps per poll would cost tens of ms.
reload_and_watch() {
  local want=$1 res
  shift
  res=$(python3 - "$PORT" "$MASTER" "$want" "$EVENT_TIMEOUT" "$OUT/reload-commands.log" "$@" <<'PY'
import os, socket, subprocess, sys, time
port, master, want, limit, logf = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
cmd = sys.argv[6:]

def kids():  # the live children of master
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        rest = st[st.rindex(")") + 2:].split()
        if rest[1] == master and rest[0] not in ("Z", "X"):
            out.add(int(d))
    return out

def serves():  # a new connection gets the new config's answer
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.settimeout(1)
            s.sendall(b"GET / HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        head = data.split(b"\r\n\r\n")[0].decode("latin-1").lower().split("\r\n")
        return head[0].split()[1:2] == ["200"] and f"x-reload: {want}" in head
    except (OSError, IndexError):
        return False

old = kids()
t0 = time.monotonic()
with open(logf, "a") as log:
    rc = subprocess.run(cmd, stdout=log, stderr=log, timeout=limit).returncode
if rc != 0:
    print(f"error '{' '.join(cmd)}' exited {rc}")
    sys.exit(0)
serve = done = None
now = []
while True:
    if serve is None and serves():
        serve = (time.monotonic() - t0) * 1000
    if done is None:
        now = kids()
        if now and not (now & old):
            done = (time.monotonic() - t0) * 1000
    if serve is not None and done is not None:
        print(f"ok {serve:.0f} {done:.0f} {' '.join(map(str, sorted(now)))}")
        break
    if time.monotonic() - t0 > limit:
        left = " ".join(map(str, sorted(kids() & old)))
        print("error after %gs: %s, %s" % (limit,
              "new config serves" if serve is not None else "new config not serving",
              "old workers gone" if done is not None else f"old workers still there ({left})"))
        break
    time.sleep(0.005)
PY
) || res="error the reload watcher failed"
  case $res in
    ok\ *)
      read -r _ EV_SERVE EV_DONE res <<<"$res"
      # shellcheck disable=SC2086
      see $res ;;
    *) EV_WHY=${res#error }; return 1 ;;
  esac
}

# --- one row: start, N events each under its own load window, stop ---
ROWS="$OUT/rows.tsv"; : >"$ROWS"; : >"$OUT/pids.txt"; : >"$OUT/skipped.txt"
ANY_FAILED=0
# load_window_start DIR I: the two zdt-load runs of event I, in the background.
load_window_start() {
  local url="http://127.0.0.1:$PORT/?sleep=$SLEEP_MS"
  "$BIN/zdt-load" "$url" -d "$LOAD_MAX" -c "$CLIENTS" -m keepalive --label "ka-$2" >"$1/ka-$2.txt" 2>&1 & LOAD_KA=$!; PIDS+=("$LOAD_KA")
  "$BIN/zdt-load" "$url" -d "$LOAD_MAX" -c "$CLIENTS" -m close --probe-ms 0 --label "close-$2" >"$1/close-$2.txt" 2>&1 & LOAD_CL=$!; PIDS+=("$LOAD_CL")
}
# load_window_end DIR I: ends both runs (SIGTERM: zdt-load prints its line;
# requests in flight end within its 5 s timeout) and keeps their LOAD lines.
load_window_end() {
  local k f line
  kill -TERM "$LOAD_KA" "$LOAD_CL" 2>/dev/null || true
  stop_load "$LOAD_KA"; stop_load "$LOAD_CL"
  for k in ka close; do
    f="$1/$k-$2.txt"
    line=$(grep '^LOAD ' "$f" || true)
    [ -n "$line" ] || { log "  zdt-load ($k) printed no result: $(head -c 300 "$f")"; line="LOAD requests=0 failed=0 p99_ms=-"; }
    echo "$line" >>"$1/$k.txt"
  done
}
stop_load() { # already signalled: waits up to 15 s, then KILL
  local i
  for ((i = 0; i < 150; i++)); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
# load_sums FILE -> "requests failed kinds p99median p99worst"
load_sums() {
  sed 's/[(),]/ /g' "$1" | awk '
    { for (i = 1; i <= NF; i++) { split($i, kv, "="); t[kv[1]] += kv[2] }
      for (i = 1; i <= NF; i++) if ($i ~ /^p99_ms=[0-9.]+$/) { sub(/^p99_ms=/, "", $i); p[++n] = $i + 0 } }
    END { for (i = 2; i <= n; i++) { y = p[i]; j = i - 1; while (j > 0 && p[j] > y) { p[j + 1] = p[j]; j-- } p[j + 1] = y }
      m = n ? ((n % 2) ? p[(n + 1) / 2] : (p[n / 2] + p[n / 2 + 1]) / 2) : -1
      k = ""
      split("connect broken non2xx timeout probe_failed", names, " ")
      for (i = 1; i <= 5; i++) if (t[names[i]] > 0) k = k (k == "" ? "" : ",") names[i] "=" t[names[i]]
      printf "%d %d %s %s %s\n", t["requests"], t["failed"], (k == "" ? "-" : k), (n ? sprintf("%.1f", m) : "-"), (n ? sprintf("%.1f", p[n]) : "-") }'
}
# fmt_load FILE -> "failed (kinds) / requests<TAB>p99 median (worst)"
fmt_load() {
  local req fl kinds pm pw
  read -r req fl kinds pm pw < <(load_sums "$1")
  [ "$kinds" = - ] && kinds="" || kinds=" (${kinds//,/, })"
  printf '%s%s / %s\t%s (%s)' "$fl" "${kinds//=/ }" "$req" "$pm" "$pw"
}

run_row() { # run_row KEY LABEL
  local key=$1 label=$2 dir="$OUT/$1" i ok=0 why="" status=ok evkind
  local master0 workers0 master1 workers1 pidnote
  mkdir -p "$dir"; : >"$dir/events.txt"; : >"$dir/ka.txt"; : >"$dir/close.txt"
  PORT=""; MASTER=""
  case $key in zdt_*) evkind=zdt ;; *) evkind=reload ;; esac
  if ! "start_$key" "$dir"; then
    log "$label: did not start (see $dir)"
    printf '%s\t0/%s\t-\t-\t-\t-\t-\t-\t-\tFAILED: did not start (see %s)\n' "$label" "$N" "$dir" >>"$ROWS"
    ANY_FAILED=1; stop_all; return 0
  fi
  master0=$MASTER; workers0=$(kids "$MASTER")
  # shellcheck disable=SC2086
  see $workers0
  log "$label: port $PORT, master $master0, workers $workers0; $N events under $CLIENTS keep-alive + $CLIENTS new-connection clients"
  for ((i = 1; i <= N; i++)); do
    load_window_start "$dir" "$i"
    sleep 0.5
    EV_WHY=""; EV_DONE=""; EV_SERVE=""; EV_NOTE=""
    if "event_$key" "$dir" "$i"; then
      ok=$((ok + 1))
      echo "$EV_DONE $EV_SERVE" >>"$dir/events.txt"
    else
      why="event $i: $EV_WHY"
    fi
    sleep 0.5
    load_window_end "$dir" "$i"
    log "  $i: done ${EV_DONE:--} ms, serving ${EV_SERVE:--} ms${EV_NOTE:+ ($EV_NOTE)}; keep-alive: $(fmt_load <(tail -1 "$dir/ka.txt") | tr '\t' ' ') p99; new-connection: $(fmt_load <(tail -1 "$dir/close.txt") | tr '\t' ' ') p99"
    if [ -n "$why" ]; then
      log "  $label: $why"
      [ "$evkind" = zdt ] && { [ "$i" -lt "$N" ] && log "  $label: stopping the row at its first failed upgrade"; break; }
    fi
    [ "$i" -lt "$N" ] && sleep "$GAP"
  done
  master1=$MASTER; ours "$MASTER" || master1="gone"
  workers1=$(kids "$MASTER")
  if [ "$evkind" = zdt ]; then
    pidnote="zdt $master0 → $master1, workers $workers0 → ${workers1:-none}"
    if [ "$master1" != "$master0" ] || [ "$workers1" != "$workers0" ]; then
      pidnote="CHANGED: $pidnote"; status="FAILED: pids changed"
    else
      pidnote="unchanged: $pidnote"
    fi
  else
    pidnote="master $master0 → $master1, workers $workers0 → ${workers1:-none}"
    [ "$master1" = "$master0" ] || status="FAILED: the master is gone"
  fi
  echo "$label: $pidnote" >>"$OUT/pids.txt"
  log "  $label: $pidnote"
  if [ -n "$why" ]; then
    if [ "$status" = ok ]; then status="FAILED: $why"; else status="$status; $why"; fi
  fi
  [ "$status" = ok ] || ANY_FAILED=1
  local done_mm serve_mm pidcol=-
  read -r -a done_mm < <(median_max "$dir/events.txt" 1)
  read -r -a serve_mm < <(median_max "$dir/events.txt" 2)
  case $pidnote in unchanged*) pidcol=unchanged ;; CHANGED*) pidcol=CHANGED ;; *) pidcol="same master, new workers" ;; esac
  # label, ok, done med, done max, serving med, serving max, ka, ka p99, close, close p99, pids, status
  printf '%s\t%s/%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$ok" "$N" \
    "${done_mm[0]}" "${done_mm[1]}" "${serve_mm[0]}" "${serve_mm[1]}" \
    "$(fmt_load "$dir/ka.txt")" "$(fmt_load "$dir/close.txt")" "$pidcol" "$status" >>"$ROWS"
  stop_all
  sleep 1 # let the stack's processes exit before the next one starts
}
skip_row() { # skip_row LABEL WHY
  log "$1: row skipped, $2"
  echo "$1: row skipped ($2)" >>"$OUT/skipped.txt"
  printf '%s\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\tskipped: %s\n' "$1" "$2" >>"$ROWS"
}

# row KEY LABEL TOOL...: runs the row, or skips it when a tool is missing.
row() {
  local key=$1 label=$2 t
  shift 2
  case ,${ONLY:-$key}, in *",$key,"*) ;; *) return 0 ;; esac
  for t in "$@"; do
    if ! command -v "$t" >/dev/null; then
      case $t in
        php) skip_row "$label" "no php (apt-get install php-cli)" ;;
        nginx) skip_row "$label" "no nginx (apt-get install nginx-light)" ;;
        haproxy) skip_row "$label" "no haproxy (apt-get install haproxy)" ;;
        *) skip_row "$label" "no $t" ;;
      esac
      return 0
    fi
  done
  run_row "$key" "$label"
}
row zdt_pass "zdt upgrade, pass, node" node
row zdt_proxy "zdt upgrade, proxy, node" node
row zdt_php "zdt upgrade, proxy, php -S" php
row zdt_inproc "zdt upgrade, proxy in zdt's process, node" node
if [ "$QUICK" = 1 ]; then
  log "--quick: zdt rows only"
else
  row nginx "nginx -s reload, node" node nginx
  row haproxy "haproxy -W reload (USR2), node" node haproxy
fi

# --- the table ---
TABLE="$OUT/upgrade.md"
{
  echo "bench/upgrade.sh --upgrades $N --clients $CLIENTS --sleep $SLEEP_MS$( [ "$QUICK" = 1 ] && echo " --quick")"
  echo
  echo "($(date -u +%Y-%m-%d), $(nproc) CPUs, $(uname -sr); $("$BIN/zdt" --version 2>/dev/null || echo zdt)$(command -v node >/dev/null && echo ", Node $(node --version)")$(command -v php >/dev/null && echo ", PHP $(php -r 'echo PHP_VERSION;')")$(command -v nginx >/dev/null && echo ", $(nginx -v 2>&1 | sed 's/.*: //')")$(command -v haproxy >/dev/null && echo ", HAProxy $(haproxy -v | sed -n '1s/^HAProxy version \([^ ]*\).*/\1/p')"))"
  echo
  echo "done: zdt, the wall time of \`zdtctl upgrade\` (returns once the new binary serves); nginx/haproxy, from the reload command until every old worker has exited. serving: zdt, the same; nginx/haproxy, until a new connection gets the new config's answer. Median (max) over the events. Failed / requests and p99 (median (worst) window) from one load window per event, 0.5 s before to 0.5 s after it: $CLIENTS keep-alive clients (plus a new-connection probe every 20 ms) and $CLIENTS new-connection clients side by side, GET /?sleep=$SLEEP_MS."
  echo
  echo "| row | events ok | done ms, median (max) | serving ms, median (max) | keep-alive: failed / requests | keep-alive p99 ms | new conn.: failed / requests | new conn. p99 ms | pids | status |"
  echo "|---|---|--:|--:|--:|--:|--:|--:|---|---|"
  while IFS=$'\t' read -r label ok dmed dmax smed smax ka kap cl clp pidcol status; do
    d="$dmed ($dmax)"; [ "$dmed" = - ] && d=-
    s="$smed ($smax)"; [ "$smed" = - ] && s=-
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$label" "$ok" "$d" "$s" "$ka" "$kap" "$cl" "$clp" "$pidcol" "$status"
  done <"$ROWS"
  echo
  sed 's/^/- /' "$OUT/pids.txt"
  sed 's/^/- /' "$OUT/skipped.txt"
} >"$TABLE"
{ echo; cat "$TABLE"; echo; echo "raw results: $OUT"; }
exit "$ANY_FAILED"

#!/usr/bin/env bash
# bench/proxy.sh - an app direct, behind zdt proxy mode, behind nginx and
# behind HAProxy, in the same run: wrk rounds alternate between them, so a slow
# minute of a shared machine hits every column alike. Prints requests/s, p50,
# p99 and failed requests of each, the ratios zdt/direct, zdt/nginx and
# zdt/haproxy, the CPU time each proxy spent per request (its processes' user
# + system time over the rounds, from /proc/PID/stat, divided by the
# requests) and the CPU time the app's own processes spent per request in
# each column (what a proxy costs the app it serves); then the proxies' RSS
# with IDLE idle keep-alive client connections.
#
# Columns, one wrk run each per round, in this order:
#   direct    wrk to the app itself (node2: to the first of its two copies)
#             on the private port zdt gave it
#   zdt       zdt proxy mode; the proxy in its own process (zdt __proxy, a
#             child of zdt), whose CPU and RSS are added to the daemon's
#   zin       zdt with proxy_process = false (the proxy in zdt's process),
#             with its own copies of the app; only in the plain form,
#             neither --matrix nor --quick
#   nginx     proxy_pass, upstream keepalive 128, worker_processes auto,
#             access log off; CPU and RSS: its workers
#   haproxy   HAProxy in the foreground, nbthread = CPUs, mode http, option
#             http-keep-alive, http-reuse always, option forwardfor, maxconn
#             for IDLE + the connections, 120 s client/server/keep-alive
#             timeouts; CPU and RSS: its one process (skipped, "-", when
#             haproxy is not installed)
#   restart   with --restart: a second zdt with its own copies of the app
#             (a restart replaces them), while `zdtctl -c CONF restart app`
#             runs every 2 s (the next one right after the last returned when
#             it took longer); with the restarts done and failed. zdt's
#             program has max_wait = "5s", kill_timeout = "3s" and, like
#             HAProxy's maxconn, max_connections = IDLE + the connections
#             + 1000 (its default follows the open-files limit)
# zdt and nginx add X-Forwarded-For, X-Real-IP and X-Forwarded-Proto; HAProxy
# is set to add the same three.
#
# Backends (--backend). The app's processes are zdt's workers (ports from
# zdt: PORT, {port}); direct, nginx and HAProxy go to the same processes on
# their private ports, so every column but zin and restart is served by one
# set of app processes:
#   demo    target/release/zdt-demo, 0 ms handler; zdt ready = /health
#   node    contrib/node/server.js, one process; zdt ready = /
#   node2   two node processes: zdt instances = 2, nginx and HAProxy get both
#           as upstream servers
#   php     php -S 127.0.0.1:PORT contrib/php/app.php with
#           PHP_CLI_SERVER_WORKERS=4 (php -S closes every connection after its
#           answer, keep-alive or not); zdt ready = /health
# A backend whose runtime (node, php) is missing is skipped with a line saying so.
#
# Usage: bench/proxy.sh [SECONDS] [CONNECTIONS] [ROUNDS] [IDLE_CONNECTIONS]
#        bench/proxy.sh [--matrix | --quick] [--backend LIST] [--conns LIST]
#                       [--close] [--restart] [--seconds S] [--rounds N]
#                       [--idle N] [--out FILE] [SECONDS [CONNECTIONS ...]]
#   (no option)      demo, 64 keep-alive connections, 10 s rounds, 3 rounds,
#                    every column but restart, then 10,000 idle connections;
#                    the numbers override these (the form README cites)
#   --backend LIST   demo, node, node2, php: comma list, repeatable (demo)
#   --conns LIST     wrk connections per cell, comma list (CONNECTIONS, 64)
#   --close          a new connection per request (wrk -H "Connection: close")
#                    instead of keep-alive
#   --restart        add the restart column
#   --seconds S      length of each wrk run (SECONDS, 10)
#   --rounds N       rounds per cell (ROUNDS, 3)
#   --idle N         idle keep-alive clients for the memory phase, 0 = none
#                    (IDLE_CONNECTIONS, 10000)
#   --matrix         every backend (demo,node,node2,php) x conns 32,256 x
#                    keep-alive and close, 4 s rounds, 3 rounds; the memory
#                    phase once at the end, for demo only; writes --out
#                    (/tmp/zdt-proxy-matrix.md). About 15 minutes on 2 CPUs.
#   --quick          demo,node x 32 conns x keep-alive, 3 s, 1 round, no
#                    memory phase: about a minute. Run it before committing a
#                    change to src/proxy/.
#   --out FILE       also write the markdown table to FILE
# Options given beside --matrix or --quick override their settings. A cell is
# one backend x connections x mode: its columns alternate in ROUNDS rounds
# after a 1 s warm-up run of each column when the backend's processes start.
#
# Every wrk run: -t2 --timeout 5s --latency, bounded by timeout(1) at its
# length + 30 s. Requests/s: the rounds' mean; p50 and p99: the rounds'
# median (one stall of a few hundred ms in one round, seen in every column,
# the direct one included, would decide a mean of p99s). Failed: wrk's
# "Non-2xx or 3xx responses" (4xx and 5xx) + "Socket errors" (connect, read,
# write, timeout), summed over the rounds. One exception: after an answer
# with no length, which ends when the server closes (php -S, and HAProxy
# passing such an answer on), wrk 4.1 counts a read error (and drops the
# connection it has just opened). For a column whose answer is like that (a
# curl before each cell tells) only the read errors beyond one per answer
# count, and the notes under the table say which columns those were.
# The memory phase opens IDLE keep-alive connections to each proxy, one
# request each, and reads the proxy's RSS while they are held (after the
# rounds of the last backend run, demo when it is in the list); KiB per
# connection = (with - idle) / connections opened.
#
# Output: each cell's figures (plain form: the lines README cites), the
# markdown table (a header with the date, CPUs, versions and this command),
# then one RESULT line per cell: its first keys are those of the older
# single-cell script, in the same order. Exit status: 0, 1 when a zdt column
# failed a request, 2 on a usage or set-up error.
#
# Needs wrk, nginx, curl, python3 (apt-get install wrk nginx-light curl) and a
# release build (cargo build --release); haproxy, node, php-cli for their
# column and backends. Starts its own nginx and HAProxy on free loopback
# ports; every process it starts is stopped on exit, Ctrl-C included.
# PROXY_THREADS=N sets zdt's [supervisor] proxy_threads (default: one per CPU).
set -u
usage() { sed -n '2,/^set -u$/p' "$0" | sed 's/^# \{0,1\}//;/^set -u$/d' >&2; exit 2; }
die() { echo "bench/proxy.sh: $*" >&2; exit 2; }
T_START=$(date +%s)
CMDLINE="$0$(printf ' %q' "$@")"

MATRIX=0; QUICK=0; RESTART=0; OUT=""
BACKENDS=""; CONNS=""; MODES=""; DUR=""; ROUNDS=""; IDLE=""
POS=()
while [ $# -gt 0 ]; do
  case $1 in
    --backend|--conns|--seconds|--rounds|--idle|--out)
      [ $# -ge 2 ] || die "$1 wants a value"
      case $1 in
        --backend) BACKENDS="${BACKENDS:+$BACKENDS,}$2" ;;
        --conns) CONNS=$2 ;;
        --seconds) DUR=$2 ;;
        --rounds) ROUNDS=$2 ;;
        --idle) IDLE=$2 ;;
        --out) OUT=$2 ;;
      esac
      shift ;;
    --close) MODES=close ;;
    --restart) RESTART=1 ;;
    --matrix) MATRIX=1 ;;
    --quick) QUICK=1 ;;
    -h|--help) usage ;;
    -*) echo "unknown option: $1" >&2; usage ;;
    *) POS+=("$1") ;;
  esac
  shift
done
[ ${#POS[@]} -le 4 ] || usage
[ "$MATRIX$QUICK" != 11 ] || die "--matrix and --quick do not go together"
# The positional numbers, as the older script took them.
[ ${#POS[@]} -ge 1 ] && DUR=${DUR:-${POS[0]}}
[ ${#POS[@]} -ge 2 ] && CONNS=${CONNS:-${POS[1]}}
[ ${#POS[@]} -ge 3 ] && ROUNDS=${ROUNDS:-${POS[2]}}
[ ${#POS[@]} -ge 4 ] && IDLE=${IDLE:-${POS[3]}}
if [ "$MATRIX" = 1 ]; then
  BACKENDS=${BACKENDS:-demo,node,node2,php}; CONNS=${CONNS:-32,256}; MODES=${MODES:-keepalive,close}
  DUR=${DUR:-4}; ROUNDS=${ROUNDS:-3}; IDLE=${IDLE:-10000}; OUT=${OUT:-/tmp/zdt-proxy-matrix.md}
elif [ "$QUICK" = 1 ]; then
  BACKENDS=${BACKENDS:-demo,node}; CONNS=${CONNS:-32}; MODES=${MODES:-keepalive}
  DUR=${DUR:-3}; ROUNDS=${ROUNDS:-1}; IDLE=${IDLE:-0}
else
  BACKENDS=${BACKENDS:-demo}; CONNS=${CONNS:-64}; MODES=${MODES:-keepalive}
  DUR=${DUR:-10}; ROUNDS=${ROUNDS:-3}; IDLE=${IDLE:-10000}
fi
INPROC=0; [ "$MATRIX$QUICK" = 00 ] && INPROC=1
for v in "$DUR" "$ROUNDS"; do
  case $v in ''|*[!0-9]*|0) die "SECONDS and ROUNDS want a positive number" ;; esac
done
case $IDLE in ''|*[!0-9]*) die "IDLE_CONNECTIONS wants a number" ;; esac
IFS=, read -ra CONN_LIST <<<"$CONNS"
IFS=, read -ra MODE_LIST <<<"$MODES"
[ ${#CONN_LIST[@]} -ge 1 ] || die "--conns wants a list such as 32,256"
for c in "${CONN_LIST[@]}"; do
  case $c in ''|*[!0-9]*|0|1) die "connections want a number of at least 2 (wrk -t2), not '$c'" ;; esac
done
BACKEND_LIST=()
IFS=, read -ra bl <<<"$BACKENDS"
for b in "${bl[@]}"; do
  case $b in demo|node|node2|php) ;; *) die "unknown backend '$b' (known: demo, node, node2, php)" ;; esac
  case " ${BACKEND_LIST[*]} " in *" $b "*) ;; *) BACKEND_LIST+=("$b") ;; esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$ROOT/target/release"
NODE_APP="$ROOT/contrib/node/server.js"
PHP_APP="$ROOT/contrib/php/app.php"
for t in wrk nginx curl python3 timeout ps; do
  command -v "$t" >/dev/null || die "$t not found (apt-get install wrk nginx-light curl python3)"
done
for b in zdt zdtctl zdt-demo; do
  [ -x "$BIN/$b" ] || die "build first: cargo build --release ($BIN/$b missing)"
done
HAVE_HAPROXY=0; command -v haproxy >/dev/null && HAVE_HAPROXY=1
[ "$HAVE_HAPROXY" = 1 ] || echo "no haproxy (apt-get install haproxy): its column is left out" >&2
# PROXY_THREADS=N sets zdt's [supervisor] proxy_threads (default: one per CPU).
THREADS_LINE=${PROXY_THREADS:+proxy_threads = $PROXY_THREADS}
NCPU=$(nproc)
WORK=$(mktemp -d /tmp/zdt-bench-proxy.XXXXXX)
NOTES="$WORK/notes.txt"; : >"$NOTES"
# 10,000 idle clients need as many fds in the client and each proxy.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
note() { log "$*"; echo "$*" >>"$NOTES"; }

# --- processes: every one this script starts is in PIDS as "pid:starttime",
# --- so a pid the kernel gave to another program since is never signalled ---

PIDS=()
# proc_fields, start_of, alive, track, stop_pid
# shellcheck source=bench/lib/procs.sh
. "$ROOT/bench/lib/procs.sh"
forget() { local e keep=(); for e in "${PIDS[@]}"; do [ "${e%%:*}" = "$1" ] || keep+=("$e"); done; PIDS=("${keep[@]}"); }
# descendants PID: "pid:starttime" of every process below PID.
descendants() {
  local c
  for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$c:$(start_of "$c")"; descendants "$c"; done
}
# Stops every tracked process, newest first (zdt stops its workers, nginx its
# workers), then KILLs what is left below them: `php -S` workers outlive
# their parent's TERM.
stop_all() {
  local e p i below=()
  for e in "${PIDS[@]}"; do
    while read -r p; do [ -n "$p" ] && below+=("$p"); done < <(descendants "${e%%:*}")
  done
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do e=${PIDS[$i]}; stop_pid "${e%%:*}" "${e#*:}"; done
  for e in "${below[@]}"; do alive "${e%%:*}" "${e#*:}" && kill -9 "${e%%:*}" 2>/dev/null; done
  PIDS=()
}
cleanup() { stop_all >/dev/null 2>&1; }
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() { # wait_up PORT WHAT LOG: GET / answered 2xx within 30 s
  local i
  for ((i = 0; i < 300; i++)); do curl -sf -m 2 -o /dev/null "http://127.0.0.1:$1/" && return 0; sleep 0.1; done
  echo "$2 (port $1) did not answer within 30 s; the end of $3:" >&2; tail -n 20 "$3" >&2; exit 2
}
# wait_ready CONF N LOG: zdt shows N instances RUNNING (ready) within 30 s.
wait_ready() {
  local i
  for ((i = 0; i < 300; i++)); do
    [ "$(timeout 5 "$BIN/zdtctl" -c "$1" status --json 2>/dev/null | grep -o '"state":"RUNNING"' | wc -l)" -ge "$2" ] && return 0
    sleep 0.1
  done
  echo "zdt ($1): $2 instances not ready within 30 s; the end of $3:" >&2; tail -n 20 "$3" >&2; exit 2
}
# instance_pids CONF: the pids of zdt's workers, in instance order.
instance_pids() {
  timeout 5 "$BIN/zdtctl" -c "$1" status --json 2>/dev/null | python3 -c '
import json, sys
for p in json.load(sys.stdin)["programs"]:
    for i in sorted(p["instances"], key=lambda i: i["instance"]):
        if i.get("pid"):
            print(i["pid"])'
}
# CPU time (clock ticks) the given processes have used so far: "user system".
cpu_ticks() {
  local u=0 s=0 p f
  for p in "$@"; do
    read -ra f < <(proc_fields "$p") || continue
    u=$((u + f[11])); s=$((s + f[12]))
  done
  echo "$u $s"
}
TICK_US=$((1000000 / $(getconf CLK_TCK)))
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
rss_sum() { local p t=0; for p in "$@"; do t=$((t + $(rss "$p"))); done; echo "$t"; }

# --- one backend's stacks: start_stacks BACKEND sets the ports and pids ---

declare -A PORT_OF PROCS_OF APPS_OF
start_stacks() {
  local b=$1 d="$WORK/$1" n=1 p port cmd ready env apps=() servers="" hservers="" maxc=0 c
  mkdir -p "$d"
  [ "$b" = node2 ] && n=2
  case $b in
    demo) cmd="[\"$BIN/zdt-demo\"]"; ready='{ http = "/health" }'; env='{}' ;;
    node|node2) cmd="[\"node\", \"$NODE_APP\"]"; ready='{ http = "/" }'; env='{}' ;;
    php) cmd="[\"php\", \"-S\", \"127.0.0.1:{port}\", \"$PHP_APP\"]"; ready='{ http = "/health" }'
         env='{ PHP_CLI_SERVER_WORKERS = "4" }' ;;
  esac
  ZDT=$(free_port); ZIN=$(free_port); ZRS=$(free_port); NGX=$(free_port); HAP=$(free_port)
  # Room for the idle clients and the busiest cell in zdt and HAProxy: their
  # defaults follow the open-files limit (zdt: half of it less a reserve,
  # 8,750 with a limit of 20,000), nginx has worker_connections 20000.
  for c in "${CONN_LIST[@]}"; do [ "$c" -gt "$maxc" ] && maxc=$c; done
  maxc=$((IDLE + maxc + 1000))
  # zdt_config DIR PORT PROXY_PROCESS: zdt with the backend proxied on PORT
  # (cmd, ready, n, env and maxc are start_stacks' locals).
  zdt_config() {
    mkdir -p "$1"
    cat >"$1/supervisor.toml" <<TOML
[supervisor]
control = "zdt.sock"
log_dir = "logs"
proxy_process = $3
$THREADS_LINE
[program.app]
command = $cmd
mode = "proxy"
listen = ["tcp://127.0.0.1:$2"]
ready = $ready
instances = $n
environment = $env
max_wait = "5s"
kill_timeout = "3s"
max_connections = $maxc
TOML
  }
  zdt_config "$d/zdt" "$ZDT" true
  "$BIN/zdt" -c "$d/zdt/supervisor.toml" 2>"$d/zdt.log" & ZDT_PID=$!; track "$ZDT_PID"
  if [ "$INPROC" = 1 ]; then
    zdt_config "$d/zin" "$ZIN" false
    "$BIN/zdt" -c "$d/zin/supervisor.toml" 2>"$d/zin.log" & ZIN_PID=$!; track "$ZIN_PID"
  fi
  if [ "$RESTART" = 1 ]; then
    zdt_config "$d/zrs" "$ZRS" true
    "$BIN/zdt" -c "$d/zrs/supervisor.toml" 2>"$d/zrs.log" & ZRS_PID=$!; track "$ZRS_PID"
  fi
  wait_up "$ZDT" "zdt" "$d/zdt.log"; wait_ready "$d/zdt/supervisor.toml" "$n" "$d/zdt.log"
  # The app processes every column but zin and restart use: zdt's own
  # workers, reached directly on their private ports (PORT in their
  # environment). One set of processes for all columns, so a copy of the
  # app that happens to be slower (its JIT, its heap, where it runs) cannot
  # favour one proxy; and the app CPU per request compares like with like.
  for p in $(instance_pids "$d/zdt/supervisor.toml"); do
    port=$(tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | sed -n 's/^PORT=//p')
    [ -n "$port" ] || die "zdt's worker $p has no PORT in its environment"
    apps+=("$port")
    servers+="server 127.0.0.1:$port; "
    hservers+="  server app${#apps[@]} 127.0.0.1:$port"$'\n'
  done
  [ ${#apps[@]} = "$n" ] || die "zdt runs ${#apps[@]} workers, not $n"

  mkdir -p "$d/nginx"
  cat >"$d/nginx/nginx.conf" <<NGINX
worker_processes auto;
pid $d/nginx/nginx.pid;
error_log $d/nginx/error.log warn;
events { worker_connections 20000; }
http {
  access_log off;
  upstream app { ${servers}keepalive 128; }
  server {
    listen 127.0.0.1:$NGX;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Real-IP \$remote_addr;
      proxy_set_header X-Forwarded-Proto \$scheme;
    }
  }
}
NGINX
  nginx -p "$d/nginx" -c "$d/nginx/nginx.conf" -e "$d/nginx/error.log" -g 'daemon off;' 2>"$d/nginx/stderr" & NGX_PID=$!; track "$NGX_PID"

  if [ "$HAVE_HAPROXY" = 1 ]; then
    # HAProxy counts two fds per connection in maxconn and refuses to start
    # when that passes the fd limit (20,000 on some machines); an idle client
    # needs one, so `no strict-limits` lets it start with its warning.
    cat >"$d/haproxy.cfg" <<HAPROXY
global
  nbthread $NCPU
  maxconn $maxc
  ulimit-n $(ulimit -n)
  no strict-limits
defaults
  mode http
  option http-keep-alive
  http-reuse always
  option forwardfor
  timeout connect 5s
  timeout client 120s
  timeout server 120s
  timeout http-request 120s
  timeout http-keep-alive 120s
  timeout queue 30s
frontend web
  bind 127.0.0.1:$HAP
  http-request set-header X-Real-IP %[src]
  http-request set-header X-Forwarded-Proto http
  default_backend app
backend app
  balance roundrobin
$hservers
HAPROXY
    haproxy -c -f "$d/haproxy.cfg" >"$d/haproxy-check.log" 2>&1 || die "haproxy -c: $(cat "$d/haproxy-check.log")"
    haproxy -db -f "$d/haproxy.cfg" >"$d/haproxy.log" 2>&1 & HAP_PID=$!; track "$HAP_PID"
  fi

  if [ "$RESTART" = 1 ]; then wait_up "$ZRS" "zdt (restart column)" "$d/zrs.log"; wait_ready "$d/zrs/supervisor.toml" "$n" "$d/zrs.log"; fi
  if [ "$INPROC" = 1 ]; then wait_up "$ZIN" "zdt (in-process)" "$d/zin.log"; wait_ready "$d/zin/supervisor.toml" "$n" "$d/zin.log"; fi
  wait_up "$NGX" nginx "$d/nginx/error.log"
  [ "$HAVE_HAPROXY" = 1 ] && wait_up "$HAP" haproxy "$d/haproxy.log"
  # zdt's proxy process (zdt __proxy, its child): its CPU and memory are zdt's.
  ZDT_PROXY=$(pgrep -P "$ZDT_PID" -f __proxy | head -1)
  [ -n "$ZDT_PROXY" ] || die "zdt's proxy process is not running"
  # The app's processes, for its CPU per request: zdt's workers and what
  # they forked (php -S's workers).
  app_pids() { local p; for p in "$@"; do echo "$p"; descendants "$p" | cut -d: -f1; done | tr '\n' ' '; }
  local shared
  # shellcheck disable=SC2046
  shared=$(app_pids $(instance_pids "$d/zdt/supervisor.toml"))
  NGX_WORKERS=$(pgrep -P "$NGX_PID" | tr '\n' ' ')
  CONF="$d/zrs/supervisor.toml"

  KINDS=(direct zdt)
  [ "$INPROC" = 1 ] && KINDS+=(zin)
  KINDS+=(nginx)
  [ "$HAVE_HAPROXY" = 1 ] && KINDS+=(haproxy)
  PORT_OF=([direct]=${apps[0]} [zdt]=$ZDT [nginx]=$NGX)
  PROCS_OF=([direct]="" [zdt]="$ZDT_PID $ZDT_PROXY" [nginx]="$NGX_WORKERS")
  # The restart column's app processes change under it: no app CPU there.
  APPS_OF=([direct]="$shared" [zdt]="$shared" [nginx]="$shared" [restart]="")
  if [ "$RESTART" = 1 ]; then
    PORT_OF[restart]=$ZRS; PROCS_OF[restart]="$ZRS_PID $(pgrep -P "$ZRS_PID" -f __proxy | head -1)"
  fi
  # shellcheck disable=SC2046
  if [ "$INPROC" = 1 ]; then PORT_OF[zin]=$ZIN; PROCS_OF[zin]=$ZIN_PID; APPS_OF[zin]="$(app_pids $(instance_pids "$d/zin/supervisor.toml"))"; fi
  if [ "$HAVE_HAPROXY" = 1 ]; then PORT_OF[haproxy]=$HAP; PROCS_OF[haproxy]=$HAP_PID; APPS_OF[haproxy]="$shared"; fi
  # Warm-up, not counted: a JIT, pools and caches in every column.
  for c in "${KINDS[@]}"; do wrk_run "${PORT_OF[$c]}" "${CONN_LIST[0]}" keepalive 1 "$d/warmup-$c.txt"; done
  [ "$RESTART" = 1 ] && KINDS+=(restart)
}

# run_bg CMD...: runs CMD in the background, tracked, and waits for it; the wait
# builtin returns at once when a signal comes, so the trap stops it.
run_bg() { local pid; "$@" & pid=$!; track "$pid"; wait "$pid"; forget "$pid"; }
# wrk_run PORT CONNS MODE SECONDS RAW: one wrk run, its output into RAW.
wrk_run() {
  local hdr=()
  [ "$3" = close ] && hdr=(-H "Connection: close")
  run_bg timeout -k 5 $(($4 + 30)) \
    wrk -t2 -c"$2" -d"$4s" --timeout 5s --latency "${hdr[@]}" "http://127.0.0.1:$1/" >"$5" 2>&1
}
# wrk_parse RAW -> "rps p50_ms p99_ms requests non2xx connect read write
# timeout" (wrk's error counts); requests is -1 when wrk gave no result.
wrk_parse() {
  awk '
    function ms(v) { if (v ~ /us$/) {sub(/us/,"",v); return v/1000} if (v ~ /ms$/) {sub(/ms/,"",v); return v+0} if (v ~ /m$/) {sub(/m/,"",v); return v*60000} sub(/s/,"",v); return v*1000 }
    /Requests\/sec/ {rps=$2}
    /^ +50%/ {p50=ms($2)}
    /^ +99%/ {p99=ms($2)}
    /requests in/ {n=$1; ok=1}
    /Socket errors:/ {gsub(/,/, ""); co = $4; rd = $6; wr = $8; to = $10}
    /Non-2xx or 3xx responses:/ {st = $NF}
    END {printf "%.0f %.3f %.3f %d %d %d %d %d %d\n", rps, p50, p99, (ok ? n : -1), st, co, rd, wr, to}' "$1"
}
# eof_body PORT MODE: succeeds when the answer has neither a Content-Length
# nor chunked framing, so its body ends when the server closes (php -S). wrk
# 4.1 counts a read error after every such answer (and drops the connection
# it has just opened instead): those are not failures, only read errors
# beyond one per answer are.
eof_body() {
  local hdr=() h
  [ "$2" = close ] && hdr=(-H "Connection: close")
  h=$(curl -s -m 5 -D - -o /dev/null "${hdr[@]}" "http://127.0.0.1:$1/" | tr -d '\r')
  [ -n "$h" ] && ! grep -qiE '^(content-length|transfer-encoding):' <<<"$h"
}

# restart_loop CONF SECONDS OUT: `zdtctl restart app` every 2 s while a run of
# SECONDS lasts (none in its last 0.5 s); one line per restart into OUT.
restart_loop() {
  local t0 k=1 next now
  t0=$(date +%s%3N)
  while next=$((t0 + 2000 * k)); [ $((next + 500)) -le $((t0 + $2 * 1000)) ]; do
    now=$(date +%s%3N)
    [ "$next" -gt "$now" ] && sleep "$(awk -v d=$((next - now)) 'BEGIN { printf "%.3f", d / 1000 }')"
    if timeout -k 2 30 "$BIN/zdtctl" -c "$1" restart app >>"$3.log" 2>&1; then echo ok; else echo "failed $?"; fi >>"$3"
    k=$((k + 1))
  done
}

# --- one cell: BACKEND x CONNS x MODE, the columns alternated in rounds ---

declare -A CELL NOTED
cell_key() { echo "$1|$2|$3"; }
run_cell() {
  local b=$1 c=$2 m=$3 r k procs apps rps p50 p99 n f u0 s0 u1 s1 a0 a1 raw rl sums="" st co rd wr to
  local -A RPS FAIL USR SYS NREQ EOF APP RR PR P5R
  local restarts=0 restart_err=0 eofs=""
  for k in "${KINDS[@]}"; do
    RPS[$k]=0; FAIL[$k]=0; USR[$k]=0; SYS[$k]=0; NREQ[$k]=0; EOF[$k]=0; APP[$k]=0; RR[$k]=""; PR[$k]=""; P5R[$k]=""
    eof_body "${PORT_OF[$k]}" "$m" && { EOF[$k]=1; eofs+="${eofs:+, }$k"; }
  done
  if [ -n "$eofs" ] && [ -z "${NOTED[$b|$m]:-}" ]; then
    NOTED[$b|$m]=1
    note "$b, $(mode_label "$m"): the answers of $eofs have no length and end when the server closes; wrk counts a read error after each one (and drops the connection it just opened), so failed counts only their read errors beyond one per answer"
  fi
  mkdir -p "$WORK/$b/raw"
  for r in $(seq "$ROUNDS"); do
    for k in "${KINDS[@]}"; do
      raw="$WORK/$b/raw/c$c-$m-$k-$r.txt"
      procs=${PROCS_OF[$k]}; apps=${APPS_OF[$k]}
      u0=0; s0=0; u1=0; s1=0; a0=0; a1=0
      # shellcheck disable=SC2086
      [ -n "$procs" ] && read -r u0 s0 < <(cpu_ticks $procs)
      # shellcheck disable=SC2086
      [ -n "$apps" ] && a0=$(cpu_ticks $apps | awk '{print $1 + $2}')
      rl=""
      if [ "$k" = restart ]; then : >"$raw.restarts"; restart_loop "$CONF" "$DUR" "$raw.restarts" & rl=$!; track "$rl"; fi
      wrk_run "${PORT_OF[$k]}" "$c" "$m" "$DUR" "$raw"
      read -r rps p50 p99 n st co rd wr to < <(wrk_parse "$raw")
      if [ -n "$rl" ]; then
        wait "$rl"; forget "$rl"
        restarts=$((restarts + $(grep -c . "$raw.restarts" 2>/dev/null || true)))
        restart_err=$((restart_err + $(grep -vc '^ok$' "$raw.restarts" 2>/dev/null || true)))
      fi
      # shellcheck disable=SC2086
      [ -n "$procs" ] && read -r u1 s1 < <(cpu_ticks $procs)
      # shellcheck disable=SC2086
      [ -n "$apps" ] && a1=$(cpu_ticks $apps | awk '{print $1 + $2}')
      if [ "$n" -lt 0 ]; then note "$b $c $m round $r $k: wrk gave no result ($(tail -n 1 "$raw"))"; n=0; fi
      [ "${EOF[$k]}" = 1 ] && rd=$((rd > n ? rd - n : 0))
      f=$((st + co + rd + wr + to))
      RPS[$k]=$((RPS[$k] + rps)); FAIL[$k]=$((FAIL[$k] + f)); NREQ[$k]=$((NREQ[$k] + n))
      RR[$k]+="${RR[$k]:+,}$rps"; PR[$k]+="${PR[$k]:+,}$p99"; P5R[$k]+="${P5R[$k]:+,}$p50"
      USR[$k]=$((USR[$k] + u1 - u0)); SYS[$k]=$((SYS[$k] + s1 - s0)); APP[$k]=$((APP[$k] + a1 - a0))
      log "$b c=$c $m round $r $k: $rps req/s p50 $p50 ms p99 $p99 ms failed $f"
    done
  done
  for k in "${KINDS[@]}"; do
    # name, requests/s summed, failed, user and system ticks, requests, app
    # ticks (- for none), then the rounds' requests/s, p99 and p50 lists
    sums+="$k ${RPS[$k]} ${FAIL[$k]} ${USR[$k]} ${SYS[$k]} ${NREQ[$k]} $([ -n "${APPS_OF[$k]}" ] && echo "${APP[$k]}" || echo -) ${RR[$k]} ${PR[$k]} ${P5R[$k]};"
  done
  CELL[$(cell_key "$b" "$c" "$m")]=$(awk -v sums="$sums" -v n="$ROUNDS" -v tick="$TICK_US" \
      -v b="$b" -v c="$c" -v m="$m" -v rs="$restarts" -v re="$restart_err" '
  # spread(per, a, b, col): the lowest and highest of a/b over the rounds,
  # from per[a] and per[b], comma lists of a figure per round (each round
  # runs the columns one after the other, so its figures pair up).
  function spread(per, a, b, col,   x, y, j, q, lo, hi) {
    if (!(a in per) || !(b in per)) return
    split(per[a], x, ","); split(per[b], y, ",")
    for (j = 1; j <= n; j++) { if (y[j] + 0 <= 0) return; q = x[j] / y[j]; if (j == 1 || q < lo) lo = q; if (j == 1 || q > hi) hi = q }
    printf " %s_vs_%s_%s_lo=%.3f %s_vs_%s_%s_hi=%.3f", a, b, col, lo, a, b, col, hi
  }
  # median(list): the middle of a comma list of numbers (of the two in the
  # middle, their mean).
  function median(list,   x, k, i, j, t) {
    k = split(list, x, ",")
    for (i = 2; i <= k; i++) for (j = i; j > 1 && x[j - 1] + 0 > x[j] + 0; j--) { t = x[j]; x[j] = x[j - 1]; x[j - 1] = t }
    return (k % 2) ? x[(k + 1) / 2] : (x[k / 2] + x[k / 2 + 1]) / 2
  }
  BEGIN {
    printf "backend=%s conns=%s mode=%s", b, c, m
    k = split(sums, rows, ";")
    for (i = 1; i <= k; i++) {
      if (split(rows[i], f, " ") < 10) continue
      rps[f[1]] = f[8]; p99[f[1]] = f[9]
      printf " %s_rps=%.0f %s_p50=%.3f %s_p99=%.3f %s_failed=%d", f[1], f[2]/n, f[1], median(f[10]), f[1], median(f[9]), f[1], f[3]
      if (f[1] != "direct") printf " %s_cpu_us=%.2f %s_usr_us=%.2f", f[1], (f[6] ? (f[4]+f[5])*tick/f[6] : 0), f[1], (f[6] ? f[4]*tick/f[6] : 0)
      if (f[7] != "-") printf " %s_app_us=%.2f", f[1], (f[6] ? f[7]*tick/f[6] : 0)
    }
    if (index(sums, "restart ")) printf " restarts=%d restart_errors=%d", rs, re
    spread(rps, "zdt", "nginx", "rps"); spread(rps, "zdt", "haproxy", "rps")
    spread(p99, "zdt", "nginx", "p99"); spread(p99, "zdt", "haproxy", "p99")
    printf "\n" }')
}

# Shared awk: v[] = the key=value pairs of a cell; r(a, b) = a/b or "-".
AWK_LIB='
function load(line,   i, n, kv, p) { delete v; n = split(line, kv, " "); for (i = 1; i <= n; i++) { p = index(kv[i], "="); if (p) v[substr(kv[i], 1, p - 1)] = substr(kv[i], p + 1) } }
function has(k) { return (k in v) && v[k] != "-" }
function g(k) { return has(k) ? v[k] : "-" }
function r(a, b) { return (has(a) && has(b) && v[b] + 0 > 0) ? sprintf("%.3f", v[a] / v[b]) : "-" }
# rr(b, what): the ratio r("zdt_" what, b "_" what) and, with more than one
# round, its lowest and highest over the rounds: "1.023 (0.981-1.050)".
function rr(b, what,   s, k) { s = r("zdt_" what, b "_" what); k = "zdt_vs_" b "_" what
  return (s != "-" && has(k "_lo") && v[k "_lo"] != v[k "_hi"]) ? s " (" v[k "_lo"] "-" v[k "_hi"] ")" : s }
function num(k, fmt) { return has(k) ? sprintf(fmt, v[k]) : "-" }
'
backend_label() {
  case $1 in
    demo) echo "demo worker, 0 ms handler" ;;
    node) echo "contrib/node/server.js, 1 process" ;;
    node2) echo "contrib/node/server.js, 2 processes" ;;
    php) echo "php -S with 4 PHP workers, contrib/php/app.php" ;;
  esac
}
mode_label() { [ "$1" = close ] && echo "new connection per request" || echo keep-alive; }

# The older script's report of one cell, with HAProxy and failed requests.
print_cell() { # print_cell BACKEND CONNS MODE
  awk -v line="${CELL[$(cell_key "$1" "$2" "$3")]}" -v s="$DUR" -v n="$ROUNDS" \
      -v bl="$(backend_label "$1")" -v ml="$(mode_label "$3")" "$AWK_LIB"'BEGIN { load(line)
  printf "wrk -t2 -c%d -d%ss, %d alternated round%s (means), %s, %s\n", v["conns"], s, n, (n == 1 ? "" : "s"), bl, ml
  printf "%-36s %12s %9s %9s %8s\n", "", "requests/s", "p50 ms", "p99 ms", "failed"
  split("direct zdt zin nginx haproxy restart", ks, " ")
  lab["direct"] = "direct to the worker"; lab["zdt"] = "zdt proxy mode"
  lab["zin"] = "zdt proxy mode, proxy_process=false"; lab["nginx"] = "nginx proxy_pass, upstream keepalive"
  lab["haproxy"] = "haproxy, http-reuse always"; lab["restart"] = "zdt proxy mode, restart every 2 s"
  for (i = 1; i <= 6; i++) { k = ks[i]; if (!has(k "_rps")) continue
    printf "%-36s %12.0f %9.3f %9.3f %8d\n", lab[k], v[k "_rps"], v[k "_p50"], v[k "_p99"], v[k "_failed"] }
  printf "zdt/direct: throughput %s, p99 %s\n", r("zdt_rps", "direct_rps"), r("zdt_p99", "direct_p99")
  printf "zdt/nginx:  throughput %s, p99 %s\n", r("zdt_rps", "nginx_rps"), r("zdt_p99", "nginx_p99")
  if (has("haproxy_rps")) printf "zdt/haproxy: throughput %s, p99 %s\n", r("zdt_rps", "haproxy_rps"), r("zdt_p99", "haproxy_p99")
  if (has("zin_rps")) printf "proxy process/in-process: throughput %s, p99 %s, CPU per request %s\n", r("zdt_rps", "zin_rps"), r("zdt_p99", "zin_p99"), r("zdt_cpu_us", "zin_cpu_us")
  printf "CPU per proxied request: zdt %.2f us (user %.2f, system %.2f), nginx %.2f us (user %.2f, system %.2f), zdt/nginx %s", v["zdt_cpu_us"], v["zdt_usr_us"], v["zdt_cpu_us"] - v["zdt_usr_us"], v["nginx_cpu_us"], v["nginx_usr_us"], v["nginx_cpu_us"] - v["nginx_usr_us"], r("zdt_cpu_us", "nginx_cpu_us")
  if (has("haproxy_cpu_us")) printf "; haproxy %.2f us (user %.2f, system %.2f), zdt/haproxy %s", v["haproxy_cpu_us"], v["haproxy_usr_us"], v["haproxy_cpu_us"] - v["haproxy_usr_us"], r("zdt_cpu_us", "haproxy_cpu_us")
  printf "\n"
  printf "the app'"'"'s CPU per request: direct %s us, behind zdt %s, nginx %s, haproxy %s\n", num("direct_app_us", "%.2f"), num("zdt_app_us", "%.2f"), num("nginx_app_us", "%.2f"), num("haproxy_app_us", "%.2f")
  if (has("restarts")) printf "restarts: %d during the restart column, %d failed (zdtctl exit status)\n", v["restarts"], v["restart_errors"] }'
}

# One line of a cell for the progress log of --matrix and --quick.
summary() { # summary BACKEND CONNS MODE
  awk -v line="${CELL[$(cell_key "$1" "$2" "$3")]}" -v ml="$(mode_label "$3")" "$AWK_LIB"'BEGIN { load(line)
  printf "%s, %s conns, %s: req/s direct %s zdt %s nginx %s haproxy %s; zdt/nginx %s, zdt/haproxy %s; p99 ratios %s, %s; failed %s / %s / %s / %s; app us/req %s / %s / %s / %s", \
    v["backend"], v["conns"], ml, g("direct_rps"), g("zdt_rps"), g("nginx_rps"), g("haproxy_rps"), rr("nginx", "rps"), rr("haproxy", "rps"), \
    rr("nginx", "p99"), rr("haproxy", "p99"), g("direct_failed"), g("zdt_failed"), g("nginx_failed"), g("haproxy_failed"), \
    num("direct_app_us", "%.1f"), num("zdt_app_us", "%.1f"), num("nginx_app_us", "%.1f"), num("haproxy_app_us", "%.1f")
  if (has("restart_rps")) printf "; restarting: %s req/s, p99 %s ms, failed %s, %s restarts (%s failed)", g("restart_rps"), g("restart_p99"), g("restart_failed"), g("restarts"), g("restart_errors")
  printf "\n" }'
}

# --- the memory phase: IDLE idle keep-alive clients on each proxy ---

# idle_conns OUT PORT N PIDS...: holds N keep-alive connections that each
# made one request and writes "opened answered_200 rss_kib error" into OUT
# (the summed RSS of PIDS while they are held).
idle_conns() {
  local out=$1
  shift
  run_bg timeout -k 5 300 python3 "$WORK/idle_conns.py" "$@" >"$out"
}
cat >"$WORK/idle_conns.py" <<'PY'
import socket, sys, time
port, n, pids = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
socks, ok, err = [], 0, "-"
try:
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        socks.append(s)
        s.sendall(req)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("closed before the answer")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        fields = {}
        for line in head.split(b"\r\n")[1:]:
            k, _, val = line.partition(b":")
            fields[k.strip().lower()] = val.strip().lower()
        if b"content-length" in fields:
            while len(rest) < int(fields[b"content-length"]):
                chunk = s.recv(4096)
                if not chunk:
                    break
                rest += chunk
        elif fields.get(b"transfer-encoding") == b"chunked":
            while not rest.endswith(b"0\r\n\r\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                rest += chunk
        ok += head.startswith(b"HTTP/1.1 200")
except Exception as e:
    err = (type(e).__name__ + ":" + str(e)).replace(" ", "_")
# Settled: zdt frees its spare buffers after a second without requests.
time.sleep(2.5)
rss = 0
for p in pids:
    try:
        rss += sum(int(l.split()[1]) for l in open(f"/proc/{p}/status") if l.startswith("VmRSS"))
    except OSError:
        pass
print(len(socks), ok, rss, err)
PY
MEM=""
memory_phase() { # memory_phase BACKEND: after its rounds, its stacks still up
  local b=$1 z0 n0 h0 zo zk z1 ze no nk n1 ne ho=0 hk=0 h1=0 he=- workers
  log "$b: memory with $IDLE idle keep-alive clients"
  z0=$(rss_sum "$ZDT_PID" "$ZDT_PROXY")
  idle_conns "$WORK/idle-zdt.txt" "$ZDT" "$IDLE" "$ZDT_PID" "$ZDT_PROXY"
  read -r zo zk z1 ze <"$WORK/idle-zdt.txt"
  # shellcheck disable=SC2086
  n0=$(rss_sum $NGX_WORKERS)
  # shellcheck disable=SC2086
  idle_conns "$WORK/idle-nginx.txt" "$NGX" "$IDLE" $NGX_WORKERS
  read -r no nk n1 ne <"$WORK/idle-nginx.txt"
  h0=0
  if [ "$HAVE_HAPROXY" = 1 ]; then
    h0=$(rss "$HAP_PID")
    idle_conns "$WORK/idle-haproxy.txt" "$HAP" "$IDLE" "$HAP_PID"
    read -r ho hk h1 he <"$WORK/idle-haproxy.txt"
  fi
  for e in "zdt $ze" "nginx $ne" "haproxy $he"; do [ "${e#* }" = - ] || note "memory phase, ${e%% *}: ${e#* }"; done
  workers=$(echo "$NGX_WORKERS" | wc -w)
  MEM="backend=$b idle=$IDLE zdt_rss0=$z0 zdt_rss1=${z1:-0} zdt_opened=${zo:-0} zdt_ok=${zk:-0} nginx_rss0=$n0 nginx_rss1=${n1:-0} nginx_opened=${no:-0} nginx_ok=${nk:-0} nginx_workers=$workers"
  [ "$HAVE_HAPROXY" = 1 ] && MEM+=" haproxy_rss0=$h0 haproxy_rss1=${h1:-0} haproxy_opened=${ho:-0} haproxy_ok=${hk:-0}"
}
# The older script's memory lines, with HAProxy and KiB per connection.
print_memory() {
  [ -n "$MEM" ] || return 0
  awk -v line="$MEM" -v ncpu="$NCPU" "$AWK_LIB"'
  function per(k) { return v[k "_opened"] ? (v[k "_rss1"] - v[k "_rss0"]) / v[k "_opened"] : 0 }
  BEGIN { load(line)
  printf "zdt RSS (daemon + proxy process): %d KiB idle, %d KiB with %d idle keep-alive client connections (%d answered 200), %.2f KiB per connection\n", v["zdt_rss0"], v["zdt_rss1"], v["zdt_opened"], v["zdt_ok"], per("zdt")
  printf "nginx workers RSS: %d KiB idle, %d KiB with %d idle keep-alive client connections (%d answered 200), %.2f KiB per connection\n", v["nginx_rss0"], v["nginx_rss1"], v["nginx_opened"], v["nginx_ok"], per("nginx")
  if (has("haproxy_rss0")) printf "haproxy RSS: %d KiB idle, %d KiB with %d idle keep-alive client connections (%d answered 200), %.2f KiB per connection\n", v["haproxy_rss0"], v["haproxy_rss1"], v["haproxy_opened"], v["haproxy_ok"], per("haproxy") }'
}

# --- the runs: the memory phase's backend (demo when listed) goes last ---

ORDER=(); IDLE_BACKEND=""
if [ "$IDLE" -gt 0 ]; then
  IDLE_BACKEND=${BACKEND_LIST[${#BACKEND_LIST[@]} - 1]}
  case " ${BACKEND_LIST[*]} " in *" demo "*) IDLE_BACKEND=demo ;; esac
fi
for b in "${BACKEND_LIST[@]}"; do [ "$b" = "$IDLE_BACKEND" ] || ORDER+=("$b"); done
[ -n "$IDLE_BACKEND" ] && ORDER+=("$IDLE_BACKEND")
LOAD0=$(cut -d' ' -f1 /proc/loadavg)
log "work folder $WORK; backends ${ORDER[*]}; conns ${CONN_LIST[*]}; modes ${MODE_LIST[*]}; $ROUNDS x ${DUR}s rounds"
for b in "${ORDER[@]}"; do
  case $b in
    node|node2) command -v node >/dev/null || { note "backend $b skipped: no node"; continue; } ;;
    php) command -v php >/dev/null || { note "backend $b skipped: no php (apt-get install php-cli)"; continue; } ;;
  esac
  log "$b: starting the app, zdt, nginx$([ "$HAVE_HAPROXY" = 1 ] && echo " and haproxy")"
  start_stacks "$b"
  for c in "${CONN_LIST[@]}"; do
    for m in "${MODE_LIST[@]}"; do
      case $m in keepalive|close) ;; *) die "unknown mode '$m'" ;; esac
      run_cell "$b" "$c" "$m"
      if [ "$MATRIX$QUICK" = 00 ]; then print_cell "$b" "$c" "$m"; else log "$(summary "$b" "$c" "$m")"; fi
    done
  done
  [ "$b" = "$IDLE_BACKEND" ] && memory_phase "$b"
  log "$b: stopping"
  stop_all
done
LOAD1=$(cut -d' ' -f1 /proc/loadavg)
ELAPSED=$(($(date +%s) - T_START))
[ "$MATRIX$QUICK" = 00 ] && print_memory

# --- the markdown table ---

version_line() {
  local hv wv
  hv=$( [ "$HAVE_HAPROXY" = 1 ] && haproxy -v | sed -n '1s/^HAProxy version \([^ ]*\).*/, HAProxy \1/p')
  wv=$(wrk -v 2>&1 | sed -n '1s/^wrk \([^ ]*\).*/, wrk \1/p')
  echo "($(date -u +%Y-%m-%d), $NCPU CPUs, $(uname -sr); $("$BIN/zdt" --version 2>/dev/null || echo zdt), $(nginx -v 2>&1 | sed 's/.*: //')$hv$(command -v node >/dev/null && echo ", Node $(node --version)")$(command -v php >/dev/null && echo ", PHP $(php -r 'echo PHP_VERSION;')")$wv; nice $(nice); load average $LOAD0 at the start, $LOAD1 at the end; took $((ELAPSED / 60)) min $((ELAPSED % 60)) s)"
}
table() {
  local b c m rcols=0 icols=0
  [ "$RESTART" = 1 ] && rcols=1
  [ "$INPROC" = 1 ] && icols=1
  echo "$CMDLINE"
  echo
  version_line
  echo
  echo "wrk -t2 --timeout 5s --latency, $ROUNDS round$([ "$ROUNDS" = 1 ] || echo s) of ${DUR} s per column and cell, the columns alternated in each round; requests/s: the rounds' mean; p99: the rounds' median; failed: non-2xx + socket errors, summed over the rounds. zdt/x: zdt's figure divided by x's (throughput above 1 and p99 below 1 favour zdt); in brackets, with more than one round, the lowest and highest of that ratio in single rounds. CPU: the proxy's processes' user + system time per request (zdt: daemon + proxy process; nginx: its workers; HAProxy: its process, $NCPU threads). App CPU: the app's processes' user + system time per request in each column; every column sends to the same app processes (zdt's workers, on their private ports)."
  echo
  printf '| backend | conns | mode | direct req/s | zdt req/s | nginx req/s | haproxy req/s | zdt/nginx | zdt/haproxy | direct p99 ms | zdt p99 ms | nginx p99 ms | haproxy p99 ms | zdt/nginx p99 | zdt/haproxy p99 | failed: direct / zdt / nginx / haproxy | CPU us/req: zdt / nginx / haproxy | app CPU us/req: direct / zdt / nginx / haproxy |'
  [ "$icols" = 1 ] && printf ' zdt in-process req/s | in-process p99 ms | process/in-process |'
  [ "$rcols" = 1 ] && printf ' zdt restarting req/s | restarting p99 ms | restarting failed | restarts (failed) |'
  echo
  printf '|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|'
  [ "$icols" = 1 ] && printf -- '--:|--:|--:|'
  [ "$rcols" = 1 ] && printf -- '--:|--:|--:|--:|'
  echo
  for b in "${BACKEND_LIST[@]}"; do for c in "${CONN_LIST[@]}"; do for m in "${MODE_LIST[@]}"; do
    [ -n "${CELL[$(cell_key "$b" "$c" "$m")]:-}" ] || continue
    awk -v line="${CELL[$(cell_key "$b" "$c" "$m")]}" -v ic="$icols" -v rc="$rcols" -v ml="$(mode_label "$m")" "$AWK_LIB"'BEGIN { load(line)
    printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s / %s / %s / %s | %s / %s / %s | %s / %s / %s / %s |", \
      v["backend"], v["conns"], ml, g("direct_rps"), g("zdt_rps"), g("nginx_rps"), g("haproxy_rps"), \
      rr("nginx", "rps"), rr("haproxy", "rps"), \
      num("direct_p99", "%.2f"), num("zdt_p99", "%.2f"), num("nginx_p99", "%.2f"), num("haproxy_p99", "%.2f"), \
      rr("nginx", "p99"), rr("haproxy", "p99"), \
      g("direct_failed"), g("zdt_failed"), g("nginx_failed"), g("haproxy_failed"), \
      num("zdt_cpu_us", "%.1f"), num("nginx_cpu_us", "%.1f"), num("haproxy_cpu_us", "%.1f"), \
      num("direct_app_us", "%.1f"), num("zdt_app_us", "%.1f"), num("nginx_app_us", "%.1f"), num("haproxy_app_us", "%.1f")
    if (ic) printf " %s | %s | %s |", g("zin_rps"), num("zin_p99", "%.2f"), r("zdt_rps", "zin_rps")
    if (rc) printf " %s | %s | %s | %s (%s) |", g("restart_rps"), num("restart_p99", "%.2f"), g("restart_failed"), g("restarts"), g("restart_errors")
    printf "\n" }'
  done; done; done
  if [ -n "$MEM" ]; then
    echo
    awk -v line="$MEM" -v ncpu="$NCPU" "$AWK_LIB"'
    function row(k, name) { if (!has(k "_rss0")) return
      printf "| %s | %d | %d | %d / %d | %s |\n", name, v[k "_rss0"], v[k "_rss1"], v[k "_ok"], v[k "_opened"], (v[k "_opened"] ? sprintf("%.2f", (v[k "_rss1"] - v[k "_rss0"]) / v[k "_opened"]) : "-") }
    BEGIN { load(line)
    printf "Memory, %s backend, after its rounds: RSS with %d idle keep-alive clients (one request each, then held)\n\n", v["backend"], v["idle"]
    print "| proxy | RSS idle KiB | RSS with the clients KiB | answered 200 / opened | KiB per connection |"
    print "|---|--:|--:|--:|--:|"
    row("zdt", "zdt (daemon + proxy process)"); row("nginx", "nginx (" v["nginx_workers"] " workers)"); row("haproxy", "HAProxy (1 process, " ncpu " threads)") }'
  fi
  if [ -s "$NOTES" ]; then echo; sed 's/^/- /' "$NOTES"; fi
}
TABLE=$(table)
echo
echo "$TABLE"
if [ -n "$OUT" ]; then echo "$TABLE" >"$OUT" && log "table written to $OUT"; fi

# --- RESULT lines: the older script's keys first, in their order ---

echo
ZDT_FAILED=0
for b in "${BACKEND_LIST[@]}"; do for c in "${CONN_LIST[@]}"; do for m in "${MODE_LIST[@]}"; do
  line=${CELL[$(cell_key "$b" "$c" "$m")]:-}
  [ -n "$line" ] || continue
  mem=""; [ "$b" = "$IDLE_BACKEND" ] && mem=$MEM
  awk -v line="$line" -v mem="$mem" -v idle="$IDLE" -v s="$DUR" -v n="$ROUNDS" "$AWK_LIB"'
  function f(k, fmt) { return has(k) ? sprintf(fmt, v[k]) : "-" }
  BEGIN { load(mem); for (k in v) m[k] = v[k]; load(line); for (k in m) v["mem_" k] = m[k]
  printf "RESULT direct_rps=%s zdt_rps=%s nginx_rps=%s zdt_vs_nginx=%s zdt_p99_vs_nginx=%s zdt_cpu_us=%s nginx_cpu_us=%s rss_idle_kib=%s rss_%d_conns_kib=%s inproc_rps=%s process_vs_inproc=%s", \
    f("direct_rps", "%.0f"), f("zdt_rps", "%.0f"), f("nginx_rps", "%.0f"), r("zdt_rps", "nginx_rps"), r("zdt_p99", "nginx_p99"), \
    f("zdt_cpu_us", "%.2f"), f("nginx_cpu_us", "%.2f"), g("mem_zdt_rss0"), idle, g("mem_zdt_rss1"), f("zin_rps", "%.0f"), r("zdt_rps", "zin_rps")
  printf " haproxy_rps=%s zdt_vs_haproxy=%s zdt_p99_vs_haproxy=%s haproxy_cpu_us=%s", f("haproxy_rps", "%.0f"), r("zdt_rps", "haproxy_rps"), r("zdt_p99", "haproxy_p99"), f("haproxy_cpu_us", "%.2f")
  printf " direct_failed=%s zdt_failed=%s nginx_failed=%s haproxy_failed=%s inproc_failed=%s", g("direct_failed"), g("zdt_failed"), g("nginx_failed"), g("haproxy_failed"), g("zin_failed")
  printf " nginx_rss_idle_kib=%s nginx_rss_%d_conns_kib=%s haproxy_rss_idle_kib=%s haproxy_rss_%d_conns_kib=%s", g("mem_nginx_rss0"), idle, g("mem_nginx_rss1"), g("mem_haproxy_rss0"), idle, g("mem_haproxy_rss1")
  if (has("restart_rps")) printf " restart_rps=%s restart_p99_ms=%s restart_failed=%s restarts=%s restart_errors=%s", f("restart_rps", "%.0f"), f("restart_p99", "%.3f"), g("restart_failed"), g("restarts"), g("restart_errors")
  printf " backend=%s conns=%s mode=%s seconds=%s rounds=%s\n", v["backend"], v["conns"], v["mode"], s, n }'
  for k in zdt_failed zin_failed restart_failed; do
    x=$(awk -v line="$line" -v k="$k" "$AWK_LIB"'BEGIN { load(line); print (has(k) ? v[k] : 0) }')
    ZDT_FAILED=$((ZDT_FAILED + x))
  done
done; done; done
log "took $((ELAPSED / 60)) min $((ELAPSED % 60)) s; raw wrk output in $WORK"
if [ "$ZDT_FAILED" -gt 0 ]; then log "zdt failed $ZDT_FAILED requests (see the failed columns)"; exit 1; fi
exit 0

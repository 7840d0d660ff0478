#!/usr/bin/env bash
# bench/deploy.sh - deploys of a release under load: `zdtctl deploy` beside
# the shell recipes it replaces (workflow 3: symlinked releases + PM2 reload;
# workflow 1: two copies behind an nginx backup upstream).
#
# The app: contrib/node/server.js with bench/deploy-app/package.json and its
# package-lock.json (one small dependency, so `npm ci` really installs), and
# a VERSION file; packed as app-v1.tgz and app-v2.tgz. Each approach first
# deploys v1 without load, then deploys v2, v1, v2, ... N times, 1 s apart
# (10 s for nginx, see NGINX_GAP), each under its own load window: CLIENTS
# keep-alive clients of target/release/zdt-load (GET /?sleep=SLEEP_MS; every
# failed request counts: refused, reset, non-2xx, timeout, plus a
# new-connection probe every 20 ms) from 0.5 s before the deploy to 0.5 s
# after it. Every approach builds with the same command:
# `npm ci --no-audit --no-fund --prefer-offline` (the npm cache is warmed
# first, so build time is npm's local work, not the registry's latency).
#
#   zdt proxy   `zdtctl deploy web --from app-vN.tgz`: zdt unpacks into
#               releases/ID, runs the build, switches `current`, starts a new
#               generation of 2 instances beside the old one, moves traffic
#               when they answer GET / and drains the old one.
#   zdt pass    the same with mode = "pass" (ready = notify).
#   pm2 reload  workflow 3: unpack into dist/app-<timestamp>, npm ci,
#               `ln -sfn` dist/app to it, `pm2 reload app` (cluster mode, 2
#               instances, kill_timeout 5000, listen_timeout 5000,
#               max_restarts 5; no wait_ready: the app does not send "ready",
#               so PM2 waits for "listening").
#   nginx backup  workflow 1: the same unpack, npm ci and `ln -sfn`, then two
#               copies under supervisord (a private venv; plain background
#               processes restarted by this script if it cannot be
#               installed) behind nginx `server A; server B backup;`:
#               restart B, poll B until 200, restart A, poll A until 200.
#
# Phases, median over the N deploys, ms: fetch (release on disk), build
# (npm ci), switch (symlink moved), ready (new processes serving), drained
# (old processes gone), total (wall time of the whole deploy). zdt: parsed
# from `zdtctl deploy`'s progress lines (ready: "gen G: n/n ready in";
# drained: "old generation gone N ms after the switch"). pm2: from its log,
# stamped in ms (ready: reload start to the last "New worker listening";
# drained: from there to the last old worker's exit). nginx: ready = restart B
# and poll; drained = restart A (its old process stops; B takes the traffic)
# and poll. Failed: summed over the N load windows; p99: the median and the
# worst of the windows' p99.
# Two ratios to the zdt proxy row: total, and ready+drained (the restart
# alone: the build is the same npm ci everywhere and its noise dominates).
#
# Installs what is missing, pinned, into DEPS (default target/bench-deploy):
# pm2 (npm install --prefix) and supervisor (a Python venv). A row whose
# tool cannot be installed or found (node, npm, nginx) is skipped with a line
# saying so. Needs a release build (cargo build --release), curl, python3,
# node, npm, tar.
#
# Usage: bench/deploy.sh [--deploys N] [--quick] [--skip-pm2] [--skip-nginx]
#                        [--clients C] [--sleep MS] [--out DIR] [--deps DIR]
#   --deploys N   deploys per approach (5)
#   --quick       2 deploys, zdt rows and pm2 only
#   --skip-pm2, --skip-nginx   leave that row out
#   --clients C   concurrent keep-alive clients (32)
#   --sleep MS    handler time of each request (20)
#   --out DIR     results folder (a new /tmp dir)
#   --deps DIR    where pm2 and supervisor are installed (target/bench-deploy)
set -u
N=5; QUICK=0; SKIP_PM2=0; SKIP_NGINX=0; CLIENTS=32; SLEEP_MS=20; OUT=""; DEPS=""
usage() { sed -n '2,/^set -u/p' "$0" | sed 's/^# \{0,1\}//;/^set -u/d' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --deploys) N=${2:?}; shift ;;
    --quick) QUICK=1 ;;
    --skip-pm2) SKIP_PM2=1 ;;
    --skip-nginx) SKIP_NGINX=1 ;;
    --clients) CLIENTS=${2:?}; shift ;;
    --sleep) SLEEP_MS=${2:?}; shift ;;
    --out) OUT=${2:?}; shift ;;
    --deps) DEPS=${2:?}; shift ;;
    *) usage ;;
  esac
  shift
done
[ "$QUICK" = 1 ] && { N=2; SKIP_NGINX=1; }
case $N in ''|*[!0-9]*|0) echo "--deploys wants a positive number" >&2; exit 2 ;; esac
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$ROOT/target/release"
for b in zdt zdtctl zdt-load; do
  [ -x "$BIN/$b" ] || { echo "build first: cargo build --release ($b missing)" >&2; exit 2; }
done
for t in curl python3 node npm tar; do command -v "$t" >/dev/null || { echo "$t not found" >&2; exit 2; }; done
[ -n "$DEPS" ] || DEPS="$ROOT/target/bench-deploy"
[ -n "$OUT" ] || OUT=$(mktemp -d /tmp/zdt-deploy.XXXXXX)
mkdir -p "$OUT" "$DEPS"
ulimit -n 65536 2>/dev/null || true

PM2_VERSION=7.0.4
SUPERVISOR_VERSION=4.3.0
BUILD=(npm ci --no-audit --no-fund --prefer-offline)
DEPLOY_TIMEOUT=120 # seconds, per deploy
# Seconds between nginx-backup deploys: nginx's default fail_timeout. A
# copy that refused a connection is not tried again for that long, so a
# deploy sooner restarts the backup while the primary still counts as down
# and nginx answers 502 ("no live upstreams") until the backup is up.
NGINX_GAP=10

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
now_ms() { date +%s%3N; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up() { curl -sf -o /dev/null -m 2 "http://127.0.0.1:$1/"; }
wait_up() { # wait_up PORT SECONDS
  local end=$(( $(date +%s) + $2 ))
  until up "$1"; do [ "$(date +%s)" -lt "$end" ] || return 1; sleep 0.1; done
}
version_at() { curl -s -m 2 "http://127.0.0.1:$1/" | sed -n 's/.*"version":"\([^"]*\)".*/\1/p'; }
# kv KEY LINE -> the value of KEY=value in LINE (also inside "(a=1,b=2)").
kv() { sed -n "s/.*[ (,]$1=\([^ ,)]*\).*/\1/p" <<<" $2"; }
# Prefixes each line of stdin with the time it arrived, ms.
stamp() { local l; while IFS= read -r l; do printf '%s %s\n' "$(now_ms)" "$l"; done; }

PIDS=(); STOPS=()
cleanup() {
  local s p
  for s in "${STOPS[@]}"; do eval "$s" >/dev/null 2>&1; done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
}
trap cleanup EXIT
# stop_pid PID [SECONDS]: TERM, wait for it, KILL at the deadline.
stop_pid() {
  kill "$1" 2>/dev/null || return 0
  local i
  for ((i = 0; i < ${2:-15} * 10; i++)); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$1" 2>/dev/null; wait "$1" 2>/dev/null
}

# --- the releases: app-v1.tgz and app-v2.tgz ---
for v in v1 v2; do
  mkdir -p "$OUT/src/$v"
  cp "$ROOT/contrib/node/server.js" "$ROOT/bench/deploy-app/package.json" "$ROOT/bench/deploy-app/package-lock.json" "$OUT/src/$v/"
  echo "$v" >"$OUT/src/$v/VERSION"
  tar czf "$OUT/app-$v.tgz" -C "$OUT/src/$v" .
done
# Warm the npm cache once, so every approach's build reads it.
mkdir -p "$OUT/warm" && tar xzf "$OUT/app-v1.tgz" -C "$OUT/warm"
if ! (cd "$OUT/warm" && "${BUILD[@]}" >"$OUT/npm-warm.log" 2>&1); then
  echo "npm ci failed on the app (see $OUT/npm-warm.log)" >&2; exit 2
fi

# --- installs: each prints why it cannot, or nothing ---
PM2="$DEPS/node/node_modules/.bin/pm2"
# Read from its package.json: `pm2 --version` starts a PM2 daemon.
pm2_version() { node -p "require('$DEPS/node/node_modules/pm2/package.json').version" 2>/dev/null; }
install_pm2() {
  [ "$(pm2_version)" = "$PM2_VERSION" ] && return 0
  log "installing pm2@$PM2_VERSION into $DEPS/node"
  npm install --prefix "$DEPS/node" --no-audit --no-fund --loglevel=error "pm2@$PM2_VERSION" >"$OUT/npm-pm2.log" 2>&1 &&
    [ -x "$PM2" ] || echo "npm install pm2@$PM2_VERSION failed (see $OUT/npm-pm2.log)"
}
SUPD="$DEPS/venv/bin/supervisord"; SUPCTL="$DEPS/venv/bin/supervisorctl"
install_supervisor() {
  [ "$("$SUPD" --version 2>/dev/null)" = "$SUPERVISOR_VERSION" ] && return 0
  log "installing supervisor==$SUPERVISOR_VERSION into $DEPS/venv"
  { [ -x "$DEPS/venv/bin/python" ] || python3 -m venv "$DEPS/venv"; } >"$OUT/venv.log" 2>&1 &&
    "$DEPS/venv/bin/python" -m pip install -q --disable-pip-version-check "supervisor==$SUPERVISOR_VERSION" >"$OUT/pip.log" 2>&1 &&
    [ -x "$SUPD" ] || echo "pip install supervisor==$SUPERVISOR_VERSION failed (see $OUT/pip.log)"
}

# --- the recipes' release steps (workflows 1 and 3), timed ---
# recipe_release DIR TGZ: unpack into DIR/dist/app-<timestamp>, npm ci,
# ln -sfn DIR/dist/app to it. Sets T_FETCH, T_BUILD, T_SWITCH (ms); fails
# when a step fails.
recipe_release() {
  local dir=$1 tgz=$2 rel t0 t1 t2
  rel="app-$(date +%Y%m%d-%H%M%S-%3N)"
  t0=$(now_ms)
  mkdir -p "$dir/dist/$rel" && tar xzf "$tgz" -C "$dir/dist/$rel" || return 1
  t1=$(now_ms)
  (cd "$dir/dist/$rel" && "${BUILD[@]}") >>"$dir/build.log" 2>&1 || return 1
  t2=$(now_ms)
  ln -sfn "$rel" "$dir/dist/app" || return 1
  T_FETCH=$(( t1 - t0 )); T_BUILD=$(( t2 - t1 )); T_SWITCH=$(( $(now_ms) - t2 ))
}

# --- the approaches: start_X DIR sets PORT (and STOPS); deploy_X DIR TGZ
# --- prints "fetch build switch ready drained" in ms, or fails ---

zdt_start() { # zdt_start DIR MODE
  local dir=$1 mode=$2 ready env=""
  PORT=$(free_port)
  case $mode in
    proxy) ready='{ http = "/" }' ;;
    pass) ready='{ notify = true }'; env="environment = { ZDT_BIN = \"$BIN/zdt\" }" ;;
  esac
  local build; build=$(printf '"%s", ' "${BUILD[@]}"); build="[[${build%, }]]"
  cat >"$dir/supervisor.toml" <<EOF
[supervisor]
control = "$dir/zdt.sock"
log_dir = "$dir/logs"
[program.web]
command = ["node", "server.js"]
directory = "$dir/root/current"
listen = ["tcp://127.0.0.1:$PORT"]
mode = "$mode"
ready = $ready
instances = 2
$env
[program.web.deploy]
root = "$dir/root"
build = $build
EOF
  "$BIN/zdt" -c "$dir/supervisor.toml" 2>"$dir/zdt.log" & local pid=$!
  PIDS+=("$pid"); STOPS+=("kill $pid")
  local i
  for ((i = 0; i < 100; i++)); do [ -S "$dir/zdt.sock" ] && break; sleep 0.1; done
  [ -S "$dir/zdt.sock" ] || return 1
  deploy_zdt "$dir" "$OUT/app-v1.tgz" >/dev/null
}
start_zdt_proxy() { zdt_start "$1" proxy; }
start_zdt_pass() { zdt_start "$1" pass; }
deploy_zdt() { # deploy_zdt DIR TGZ
  local dir=$1 out rc
  out="$dir/deploy-$(now_ms).log"
  timeout -k 5 "$DEPLOY_TIMEOUT" "$BIN/zdtctl" -c "$dir/supervisor.toml" deploy web --from "$2" 2>&1 | stamp >"$out"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { log "  zdtctl deploy exited $rc (see $out)"; return 1; }
  # fetch: its own figure; build: between its "running" and done lines;
  # switch: from the build's end to the switch line; ready: "n/n ready in";
  # drained: "old generation gone N ms after the switch".
  awk '
    function ms(v, u) { return u == "s" ? v * 1000 : v }
    $2 == "fetch" && $(NF) ~ /^m?s$/ { fetch = ms($(NF-1), $(NF)) }
    $2 == "build" && $(NF) == "running" { if (!b0) b0 = $1 }
    $2 == "build" && $(NF) ~ /^m?s$/ { b1 = $1 }
    $2 == "switch" && $3 == "current" { sw = $1 }
    / ready in [0-9.]+ ms/ { for (i = 1; i < NF; i++) if ($i == "in" && $(i-1) == "ready") ready = $(i+1) }
    / old generation gone [0-9]+ ms after the switch/ { for (i = 1; i < NF; i++) if ($i == "gone") gone = $(i+1) }
    END { printf "%d %d %d %d %d\n", fetch, b1 - b0, sw - (b1 ? b1 : sw), ready, gone }' "$out"
}
deploy_zdt_proxy() { deploy_zdt "$@"; }
deploy_zdt_pass() { deploy_zdt "$@"; }

start_pm2() { # workflow 3: PM2 cluster mode on a symlinked release
  local dir=$1
  PORT=$(free_port)
  # Its own daemon (PM2_HOME), with its log stamped in ms.
  PM2_ENV=(env PM2_HOME="$dir/pm2" PM2_LOG_DATE_FORMAT="YYYY-MM-DD HH:mm:ss.SSS")
  STOPS+=("env PM2_HOME=$dir/pm2 $PM2 kill")
  recipe_release "$dir" "$OUT/app-v1.tgz" || return 1
  cat >"$dir/ecosystem.config.js" <<EOF
module.exports = { apps: [{
  name: "app", script: "$dir/dist/app/server.js", cwd: "$dir/dist/app",
  exec_mode: "cluster", instances: 2,
  kill_timeout: 5000, listen_timeout: 5000, max_restarts: 5,
  env: { PORT: "$PORT" },
}] };
EOF
  "${PM2_ENV[@]}" "$PM2" start "$dir/ecosystem.config.js" >"$dir/pm2-start.log" 2>&1
}
deploy_pm2() { # deploy_pm2 DIR TGZ
  local dir=$1 t0 t1
  recipe_release "$dir" "$2" || return 1
  t0=$(now_ms)
  "${PM2_ENV[@]}" "$PM2" reload app >>"$dir/pm2-reload.log" 2>&1 || return 1
  t1=$(now_ms)
  # The daemon's log, stamped in ms: the last new worker listening, the last
  # old worker gone; both after t0.
  local tl tg
  read -r tl tg < <(sed -n 's/^\([0-9-]* [0-9:.]*\): PM2 log: \(.*\)$/\1|\2/p' "$dir/pm2/pm2.log" |
    while IFS='|' read -r when what; do
      case $what in
        *"-reload- New worker listening"*|*"id:_old_"*"exited"*|*"[app:_old_"*"exited"*) echo "$(date -d "$when" +%s%3N) $what" ;;
      esac
    done | awk -v t0="$t0" '$1 >= t0 - 5 && /New worker listening/ { l = $1 } $1 >= t0 - 5 && /exited/ { g = $1 } END { printf "%.0f %.0f\n", l, g }')
  if [ "${tl:-0}" -gt 0 ] && [ "${tg:-0}" -ge "$tl" ]; then
    echo "$T_FETCH $T_BUILD $T_SWITCH $(( tl - t0 )) $(( tg - tl ))"
  else # no log lines: the whole reload counts as ready
    echo "$T_FETCH $T_BUILD $T_SWITCH $(( t1 - t0 )) 0"
  fi
}

# workflow 1: two copies (web1 on A, web2 on B) behind nginx, A primary.
start_nginx() {
  local dir=$1 a b
  a=$(free_port); b=$(free_port); PORT=$(free_port); NGX_A=$a; NGX_B=$b
  recipe_release "$dir" "$OUT/app-v1.tgz" || return 1
  if [ -n "$SUP_MISSING" ]; then
    COPY_PIDS=()
    copy_start "$dir" 1 "$a" && copy_start "$dir" 2 "$b" || return 1
  else
    cat >"$dir/supervisord.conf" <<EOF
[unix_http_server]
file=$dir/supervisor.sock
[supervisord]
logfile=$dir/supervisord.log
pidfile=$dir/supervisord.pid
childlogdir=$dir
nodaemon=true
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[supervisorctl]
serverurl=unix://$dir/supervisor.sock
EOF
    local n p
    for n in 1 2; do
      p=$a; [ "$n" = 2 ] && p=$b
      cat >>"$dir/supervisord.conf" <<EOF
[program:web$n]
command=node server.js
directory=$dir/dist/app
environment=PORT="$p"
stopasgroup=true
killasgroup=true
stopwaitsecs=10
stdout_logfile=$dir/web$n.log
redirect_stderr=true
EOF
    done
    "$SUPD" -c "$dir/supervisord.conf" >/dev/null 2>&1 & local pid=$!
    PIDS+=("$pid"); STOPS+=("$SUPCTL -c $dir/supervisord.conf shutdown")
  fi
  mkdir -p "$dir/nginx"
  cat >"$dir/nginx/nginx.conf" <<EOF
worker_processes 1;
pid $dir/nginx/nginx.pid;
error_log $dir/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream app { server 127.0.0.1:$a; server 127.0.0.1:$b backup; keepalive 32; }
  server {
    listen 127.0.0.1:$PORT;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Real-IP \$remote_addr;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }
}
EOF
  nginx -p "$dir/nginx" -c "$dir/nginx/nginx.conf" -g 'daemon off;' 2>"$dir/nginx/stderr" & PIDS+=($!)
  wait_up "$a" 30 && wait_up "$b" 30
}
# Without supervisord: the copies are background processes of this script.
COPY_PIDS=()
copy_start() { # copy_start DIR N PORT
  (cd "$1/dist/app" && PORT=$3 exec node server.js) >>"$1/web$2.log" 2>&1 &
  COPY_PIDS[$2]=$!; PIDS+=($!)
}
# restart_copy DIR N PORT: the recipe's "restart, then poll until 200".
restart_copy() {
  if [ -n "$SUP_MISSING" ]; then
    stop_pid "${COPY_PIDS[$2]}" 10; copy_start "$1" "$2" "$3"
  else
    "$SUPCTL" -c "$1/supervisord.conf" restart "web$2" >>"$1/restarts.log" 2>&1 || return 1
  fi
  wait_up "$3" 30
}
deploy_nginx() { # deploy_nginx DIR TGZ
  local dir=$1 t0 t1
  recipe_release "$dir" "$2" || return 1
  t0=$(now_ms)
  restart_copy "$dir" 2 "$NGX_B" || return 1
  t1=$(now_ms)
  restart_copy "$dir" 1 "$NGX_A" || return 1
  echo "$T_FETCH $T_BUILD $T_SWITCH $(( t1 - t0 )) $(( $(now_ms) - t1 ))"
}

# --- one approach: start, then N deploys, each under its own load window
# --- (0.5 s before the deploy to 0.5 s after it); appends a row to ROWS ---
ROWS="$OUT/rows.tsv"; : >"$ROWS"
run_row() { # run_row KEY LABEL
  local key=$1 label=$2 dir="$OUT/$1" i v lpid line wrong=0 failed_deploys=0 s ph gap=1
  [ "$key" = nginx ] && gap=$NGINX_GAP
  mkdir -p "$dir"; : >"$dir/phases.txt"; : >"$dir/load.txt"
  STOPS_BEFORE=${#STOPS[@]}; PORT=""
  if ! "start_$key" "$dir" || ! wait_up "$PORT" 60; then
    log "$label: did not start (see $dir)"
    printf '%s\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\t%s\n' "$label" "error: did not start (see $dir)" >>"$ROWS"
    stop_row; return
  fi
  log "$label: port $PORT, serving $(version_at "$PORT"); $N deploys under $CLIENTS clients"
  for ((i = 1; i <= N; i++)); do
    v=v2; [ $((i % 2)) = 0 ] && v=v1
    "$BIN/zdt-load" "http://127.0.0.1:$PORT/?sleep=$SLEEP_MS" -d $(( DEPLOY_TIMEOUT + 10 )) -c "$CLIENTS" \
      -m keepalive --label "$key-$i" --series "$dir/series-$i.csv" >"$dir/load-$i.txt" 2>&1 &
    lpid=$!; PIDS+=("$lpid")
    sleep 0.5
    s=$(now_ms)
    # Not in a subshell: a recipe may start processes this script tracks.
    if "deploy_$key" "$dir" "$OUT/app-$v.tgz" >"$dir/phase.tmp"; then
      ph="$(cat "$dir/phase.tmp") $(( $(now_ms) - s ))"
      echo "$ph" >>"$dir/phases.txt"
      [ "$(version_at "$PORT")" = "$v" ] || wrong=$((wrong + 1))
    else
      ph=failed; failed_deploys=$((failed_deploys + 1))
    fi
    sleep 0.5
    kill -INT "$lpid" 2>/dev/null; wait "$lpid"
    line=$(grep '^LOAD ' "$dir/load-$i.txt")
    [ -n "$line" ] || { log "load failed: $(cat "$dir/load-$i.txt")"; line="LOAD requests=0 failed=0"; }
    echo "$line" >>"$dir/load.txt"
    log "  deploy $i ($v): fetch build switch ready drained total = $ph ms; requests $(kv requests "$line"), failed $(kv failed "$line"), p99 $(kv p99_ms "$line") ms"
    [ "$i" -lt "$N" ] && sleep "$gap"
  done
  cat "$dir/load.txt" >>"$OUT/load.txt"
  # Sums over the deploys' loads; p99: median and worst of the deploys'.
  local sums kinds="" k note=""
  sums=$(sed 's/[(),]/ /g' "$dir/load.txt" | awk '
    { for (i = 1; i <= NF; i++) { split($i, kv, "="); t[kv[1]] += kv[2] } p[NR] = 0
      for (i = 1; i <= NF; i++) if ($i ~ /^p99_ms=/) { sub(/^p99_ms=/, "", $i); p[NR] = $i + 0 } }
    END { n = asort_(p, NR); m = (NR % 2) ? p[(NR + 1) / 2] : (p[NR / 2] + p[NR / 2 + 1]) / 2
      printf "requests=%d failed=%d connect=%d broken=%d non2xx=%d timeout=%d probe_failed=%d p99=%.1f p99max=%.1f\n",
        t["requests"], t["failed"], t["connect"], t["broken"], t["non2xx"], t["timeout"], t["probe_failed"], m, p[NR] }
    function asort_(a, n,   i, j, y) { for (i = 2; i <= n; i++) { y = a[i]; j = i - 1; while (j > 0 && a[j] > y) { a[j + 1] = a[j]; j-- } a[j + 1] = y } return n }')
  for k in connect broken non2xx timeout probe_failed; do
    n=$(kv "$k" "$sums"); [ "${n:-0}" -gt 0 ] && kinds="$kinds${kinds:+, }${k/_failed/} $n"
  done
  [ "$failed_deploys" -gt 0 ] && note="$failed_deploys deploy(s) failed"
  [ "$wrong" -gt 0 ] && note="$note${note:+; }$wrong deploy(s) not serving the new version after"
  [ "$key" = nginx ] && note="$note${note:+; }deploys ${NGINX_GAP} s apart (nginx fail_timeout)"
  local med
  med=$(awk '{ for (c = 1; c <= NF; c++) v[c, NR] = $c } END {
      if (NR == 0) { print "- - - - - -"; exit }
      for (c = 1; c <= 6; c++) {
        n = 0; for (r = 1; r <= NR; r++) a[++n] = v[c, r]
        for (x = 2; x <= n; x++) { y = a[x]; z = x - 1; while (z > 0 && a[z] > y) { a[z + 1] = a[z]; z-- } a[z + 1] = y }
        m = (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        printf "%s%.0f", (c > 1 ? " " : ""), m
      }
      print "" }' "$dir/phases.txt")
  # label, deploys ok, fetch build switch ready drained total, requests, failed (kinds), p99, note
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$((N - failed_deploys))/$N" "${med// /$'\t'}" \
    "$(kv requests "$sums")" "$(kv failed "$sums")${kinds:+ ($kinds)}" "$(kv p99 "$sums") ($(kv p99max "$sums"))" "${note:--}" >>"$ROWS"
  stop_row
}
# Ends the row's stack: its STOPS (newest first), then its processes.
stop_row() {
  local i
  for ((i = ${#STOPS[@]} - 1; i >= STOPS_BEFORE; i--)); do eval "${STOPS[$i]}" >/dev/null 2>&1; done
  STOPS=("${STOPS[@]:0:$STOPS_BEFORE}")
  for p in "${PIDS[@]}"; do stop_pid "$p" 15; done
  PIDS=()
  sleep 1 # let the stack's processes exit before the next one starts
}
skip_row() { # skip_row LABEL WHY
  log "$1: row skipped, $2"
  echo "$1: row skipped ($2)" >>"$OUT/skipped.txt"
  printf '%s\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\t%s\n' "$1" "skipped: $2" >>"$ROWS"
}

: >"$OUT/skipped.txt"
run_row zdt_proxy "zdt deploy (proxy)"
run_row zdt_pass "zdt deploy (pass)"
if [ "$SKIP_PM2" = 1 ]; then
  log "pm2: --skip-pm2"
else
  why=$(install_pm2)
  if [ -n "$why" ]; then skip_row "pm2 reload (workflow 3)" "$why"
  else run_row pm2 "pm2 reload (workflow 3)"; fi
fi
SUP_MISSING=""
if [ "$SKIP_NGINX" = 1 ]; then
  log "nginx: --skip-nginx"
elif ! command -v nginx >/dev/null; then
  skip_row "nginx backup (workflow 1)" "no nginx (apt-get install nginx-light)"
else
  SUP_MISSING=$(install_supervisor)
  if [ -n "$SUP_MISSING" ]; then
    log "supervisord: $SUP_MISSING; the copies are restarted by this script"
    run_row nginx "nginx backup, plain processes (workflow 1)"
  else
    run_row nginx "nginx backup + supervisord (workflow 1)"
  fi
fi

# --- the table ---
ZDT_TOTAL=$(awk -F'\t' 'NR == 1 { print $8 }' "$ROWS")
ZDT_RESTART=$(awk -F'\t' 'NR == 1 && $6 ~ /^[0-9]+$/ { print $6 + $7 }' "$ROWS")
ratio() { awk -v t="$1" -v z="$2" 'BEGIN { if (t ~ /^[0-9]+$/ && z ~ /^[0-9]+$/ && z > 0) printf "%.2f×", t / z; else print "-" }'; }
TABLE="$OUT/table.md"
{
  echo "| approach | deploys ok | fetch ms | build ms | switch ms | ready ms | drained ms | total ms | total vs zdt proxy | ready+drained vs zdt proxy | requests | failed | p99 ms, median (worst) deploy | notes |"
  echo "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"
  while IFS=$'\t' read -r label ok f b sw r d tot req fl p99 note; do
    rd=-; [[ $r =~ ^[0-9]+$ ]] && rd=$(( r + d ))
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' \
      "$label" "$ok" "$f" "$b" "$sw" "$r" "$d" "$tot" "$(ratio "$tot" "$ZDT_TOTAL")" \
      "$(ratio "$rd" "$ZDT_RESTART")" "$req" "$fl" "$p99" "$note"
  done <"$ROWS"
} >"$TABLE"
{
  echo "bench/deploy.sh --deploys $N --clients $CLIENTS --sleep $SLEEP_MS$( [ "$SKIP_PM2" = 1 ] && echo " --skip-pm2")$( [ "$SKIP_NGINX" = 1 ] && echo " --skip-nginx")"
  echo "($(date -u +%Y-%m-%d), $(nproc) CPUs, $(uname -sr); Node $(node --version), npm $(npm --version)$( [ -x "$PM2" ] && echo ", pm2 $(pm2_version)")$( [ -x "$SUPD" ] && echo ", supervisord $("$SUPD" --version 2>/dev/null)")$(command -v nginx >/dev/null && echo ", $(nginx -v 2>&1 | sed 's/.*: //')"))"
  echo "Phases: median of $N deploys; build = \`${BUILD[*]}\` (npm cache warm); failed and p99 from one load window per deploy, 0.5 s before to 0.5 s after it ($CLIENTS keep-alive clients, GET /?sleep=$SLEEP_MS, plus a new-connection probe every 20 ms)."
  echo
  cat "$TABLE"
  cat "$OUT/skipped.txt"
  echo
  echo "raw results: $OUT"
} | tee "$OUT/summary.txt"

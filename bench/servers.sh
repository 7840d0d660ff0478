#!/usr/bin/env bash
# bench/servers.sh - real servers under zdt, restarted under load, in each
# mode: which ones lose requests, why, and which mode to run them in.
#
#   gunicorn (sync, 4 workers)  pass: --bind fd://3       proxy: --bind 127.0.0.1:{port}
#   uvicorn + FastAPI           pass: --fd 3              proxy: --port {port}
#   Express                     pass: app.listen({fd: 3}) proxy: app.listen(PORT)
#   Fastify                     pass: serverFactory's http server on {fd: 3}
#                               proxy: fastify.listen({port: PORT})
#   php -S (4 workers)          proxy only: it cannot take an inherited socket
#
# The apps are in bench/servers/ (20 ms handler, /health). Each stops the way
# its docs show (gunicorn and uvicorn: their own SIGTERM handling; Express:
# SIGTERM -> server.close(); Fastify: SIGTERM -> fastify.close()). Pass mode is
# ready 1 s after spawn (no HTTP probe on a shared socket); proxy mode is ready
# when GET /health answers 2xx on the instance's port.
#
# Per server and mode: one instance under zdt, CLIENTS clients of
# target/release/zdt-load (every failed request counts: refused, reset,
# non-2xx, timeout; plus a new-connection probe every 20 ms), first on
# keep-alive connections, then on a new connection per request. K
# `zdtctl restart`s, the first WARMUP s in, then every INTERVAL s (or at once
# when the previous one took longer); the load ends 2 s after the last. Prints
# one markdown table: requests, failed, failure kinds, the warnings
# `zdtctl restart` printed (an old generation SIGKILLed at max_wait, a socket
# nobody accepts on), the slowest restart, a verdict (ok: 0 failed, no warning,
# no failed restart) and the recommended mode (pass when pass is ok: it adds
# nothing to the request path; else proxy when proxy is ok).
#
# Installs what is missing, pinned, into DEPS (default target/bench-servers):
# a Python venv (gunicorn, uvicorn[standard], fastapi) and a node_modules
# (express, fastify). A server whose runtime (python3 with venv, node, php) is
# missing, or whose packages cannot be installed, is skipped with a note.
# Needs a release build (cargo build --release), curl, python3.
#
# Usage: bench/servers.sh [-s SERVERS] [-m MODES] [-k RESTARTS] [-i INTERVAL]
#                         [-w WARMUP] [-c CLIENTS] [-l LOADS] [-W MAX_WAIT]
#                         [-S SLEEP_MS] [-o DIR] [-D DEPS]
#   -s  comma list: gunicorn,uvicorn,express,fastify,php (all)
#   -m  comma list: pass,proxy (both)       -l  keepalive,close (both)
#   -k  restarts per load (5)               -i  seconds between restarts (3)
#   -w  seconds before the first (2)        -c  concurrent clients (32)
#   -W  max_wait of the program (5s: with 30 s, zdt's default, an app that
#       never exits while its keep-alive clients send would make a run
#       take minutes; it is SIGKILLed at max_wait either way)
#   -S  handler time, ms (20)               -o  results folder (a new /tmp dir)
#   -D  where the packages are installed (target/bench-servers)
set -u
SERVERS="gunicorn,uvicorn,express,fastify,php"; MODES="pass,proxy"; LOADS="keepalive,close"
K=5; INTERVAL=3; WARMUP=2; CLIENTS=32; MAX_WAIT=5s; SLEEP_MS=20; OUT=""; DEPS=""
while getopts "s:m:k:i:w:c:l:W:S:o:D:h" opt; do
  case $opt in
    s) SERVERS=$OPTARG ;; m) MODES=$OPTARG ;; k) K=$OPTARG ;; i) INTERVAL=$OPTARG ;;
    w) WARMUP=$OPTARG ;; c) CLIENTS=$OPTARG ;; l) LOADS=$OPTARG ;; W) MAX_WAIT=$OPTARG ;;
    S) SLEEP_MS=$OPTARG ;; o) OUT=$OPTARG ;; D) DEPS=$OPTARG ;;
    *) sed -n '2,/^set -u/p' "$0" | sed 's/^# \{0,1\}//;/^set -u/d' >&2; exit 2 ;;
  esac
done
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$ROOT/target/release"
APPS="$ROOT/bench/servers"
for b in zdt zdtctl zdt-load; do
  [ -x "$BIN/$b" ] || { echo "build first: cargo build --release ($b missing)" >&2; exit 2; }
done
for t in curl python3; do command -v "$t" >/dev/null || { echo "$t not found" >&2; exit 2; }; done
[ -n "$DEPS" ] || DEPS="$ROOT/target/bench-servers"
[ -n "$OUT" ] || OUT=$(mktemp -d /tmp/zdt-servers.XXXXXX)
mkdir -p "$OUT" "$DEPS"
ulimit -n 65536 2>/dev/null || true

# Pinned versions of what is installed into DEPS.
PY_PKGS=(gunicorn==27.0.1 "uvicorn[standard]==0.54.0" fastapi==0.163.2)
NODE_PKGS=(express@5.3.0 fastify@5.12.8)
PHP_WORKERS=4
GUNICORN_WORKERS=4

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
now_ms() { date +%s%3N; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up() { curl -sf -o /dev/null -m 2 "http://127.0.0.1:$1/health"; }
wait_up() { # wait_up PORT SECONDS
  local end=$(( $(date +%s) + $2 ))
  until up "$1"; do [ "$(date +%s)" -lt "$end" ] || return 1; sleep 0.1; done
}
# kv KEY LINE -> the value of KEY=value in LINE (also inside "(a=1,b=2)").
kv() { sed -n "s/.*[ (,]$1=\([^ ,)]*\).*/\1/p" <<<" $2"; }
# 12345 -> 12,345
thousands() { printf "%s" "$1" | sed ':a;s/\B[0-9]\{3\}\>/,&/;ta'; }

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; }
trap cleanup EXIT

# --- installs: each sets its status once; "" means ready ---
PY_MISSING=unchecked; NODE_MISSING=unchecked
python_deps() {
  [ "$PY_MISSING" = unchecked ] || return 0
  local venv="$DEPS/venv"
  if [ ! -x "$venv/bin/python" ] && ! python3 -m venv "$venv" >"$OUT/venv.log" 2>&1; then
    PY_MISSING="no python3 venv (apt-get install python3-venv)"; return 0
  fi
  if ! "$venv/bin/python" -m pip freeze 2>/dev/null | grep -qx "gunicorn==27.0.1" ||
     ! "$venv/bin/python" -m pip freeze 2>/dev/null | grep -qx "fastapi==0.163.2" ||
     ! "$venv/bin/python" -m pip freeze 2>/dev/null | grep -qx "uvicorn==0.54.0"; then
    log "installing ${PY_PKGS[*]} into $venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "${PY_PKGS[@]}" >"$OUT/pip.log" 2>&1 ||
      { PY_MISSING="pip install failed (see $OUT/pip.log)"; return 0; }
  fi
  PY_MISSING=""
}
node_deps() {
  [ "$NODE_MISSING" = unchecked ] || return 0
  command -v node >/dev/null || { NODE_MISSING="no node"; return 0; }
  local want have
  want=$(printf "%s\n" "${NODE_PKGS[@]}")
  have=$(for p in express fastify; do
    printf "%s@" "$p"; node -p "require('$DEPS/node/node_modules/$p/package.json').version" 2>/dev/null || echo none
  done)
  if [ "$want" != "$have" ]; then
    command -v npm >/dev/null || { NODE_MISSING="no npm"; return 0; }
    log "installing ${NODE_PKGS[*]} into $DEPS/node"
    npm install --prefix "$DEPS/node" --no-audit --no-fund --loglevel=error "${NODE_PKGS[@]}" >"$OUT/npm.log" 2>&1 ||
      { NODE_MISSING="npm install failed (see $OUT/npm.log)"; return 0; }
  fi
  NODE_MISSING=""
}

# missing SERVER -> why it cannot run here, or nothing.
missing() {
  case $1 in
    gunicorn|uvicorn) python_deps; echo "$PY_MISSING" ;;
    express|fastify) node_deps; echo "$NODE_MISSING" ;;
    php) command -v php >/dev/null || echo "no php (apt-get install php-cli)" ;;
    *) echo "unknown server" ;;
  esac
}

version() { # version SERVER
  local nodev; nodev=$(node --version 2>/dev/null)
  case $1 in
    gunicorn) "$DEPS/venv/bin/python" -c 'import gunicorn; print("gunicorn " + gunicorn.__version__)' ;;
    uvicorn) "$DEPS/venv/bin/python" -c 'import uvicorn, fastapi, sys; print("uvicorn %s, FastAPI %s (Python %d.%d)" % (uvicorn.__version__, fastapi.__version__, *sys.version_info[:2]))' ;;
    express|fastify) echo "${1^} $(node -p "require('$DEPS/node/node_modules/$1/package.json').version") (Node ${nodev#v})" ;;
    php) echo "PHP $(php -r 'echo PHP_VERSION;')" ;;
  esac
}

# The program's command and environment, as TOML values, for SERVER MODE.
program_toml() {
  local py="$DEPS/venv/bin" nodep="NODE_PATH = \"$DEPS/node/node_modules\""
  case $1/$2 in
    # No --bind: gunicorn takes LISTEN_FDS itself (as under systemd); with
    # `--bind fd://3` as well, gunicorn 27 takes fd 3 twice and exits (EBADF).
    gunicorn/pass) echo "command = [\"$py/gunicorn\", \"--chdir\", \"$APPS\", \"--workers\", \"$GUNICORN_WORKERS\", \"wsgi_app:app\"]" ;;
    gunicorn/proxy) echo "command = [\"$py/gunicorn\", \"--chdir\", \"$APPS\", \"--workers\", \"$GUNICORN_WORKERS\", \"--bind\", \"127.0.0.1:{port}\", \"wsgi_app:app\"]" ;;
    uvicorn/pass) echo "command = [\"$py/uvicorn\", \"--app-dir\", \"$APPS\", \"--fd\", \"3\", \"fastapi_app:app\"]" ;;
    uvicorn/proxy) echo "command = [\"$py/uvicorn\", \"--app-dir\", \"$APPS\", \"--host\", \"127.0.0.1\", \"--port\", \"{port}\", \"fastapi_app:app\"]" ;;
    express/*|fastify/*) echo "command = [\"node\", \"$APPS/$1.js\"]"; echo "environment = { $nodep }" ;;
    php/proxy) echo "command = [\"php\", \"-S\", \"127.0.0.1:{port}\", \"$ROOT/contrib/php/app.php\"]"
               echo "environment = { PHP_CLI_SERVER_WORKERS = \"$PHP_WORKERS\" }" ;;
  esac
  case $2 in
    pass) echo 'ready = { delay = "1s" }' ;;
    proxy) echo 'ready = { http = "/health" }' ;;
  esac
}

# --- one load with K restarts; prints the LOAD line + restart figures ---
run_load() { # run_load DIR LOADMODE URL CONF
  local dir=$1 lm=$2 url=$3 conf=$4
  "$BIN/zdt-load" "$url" -d 3600 -c "$CLIENTS" -m "$lm" --label "$lm" \
    --series "$dir/series-$lm.csv" >"$dir/load-$lm.txt" 2>&1 &
  local lpid=$! t0 i rfail=0 slowest=0 s took rc
  PIDS+=("$lpid"); t0=$(now_ms)
  : >"$dir/restarts-$lm.log"
  for ((i = 0; i < K; i++)); do
    local due=$(( t0 + (WARMUP + i * INTERVAL) * 1000 )) wait_ms
    wait_ms=$(( due - $(now_ms) ))
    [ "$wait_ms" -gt 0 ] && sleep "$(awk -v m="$wait_ms" 'BEGIN{printf "%.3f", m/1000}')"
    kill -0 "$lpid" 2>/dev/null || break
    s=$(now_ms)
    timeout -k 5 120 "$BIN/zdtctl" -c "$conf" restart app >>"$dir/restarts-$lm.log" 2>&1; rc=$?
    took=$(( $(now_ms) - s ))
    [ "$rc" -eq 0 ] || rfail=$((rfail + 1))
    [ "$took" -gt "$slowest" ] && slowest=$took
    echo "restart $((i + 1)): exit $rc, took $took ms" >>"$dir/restarts-$lm.log"
  done
  sleep 2
  kill -INT "$lpid" 2>/dev/null; wait "$lpid"
  local line; line=$(grep '^LOAD ' "$dir/load-$lm.txt")
  [ -n "$line" ] || { log "load failed: $(cat "$dir/load-$lm.txt")"; line="LOAD error=1"; }
  echo "$line restart_failures=$rfail slowest_restart_ms=$slowest"
}

# Warnings `zdtctl restart` printed in DIR's restart logs, counted by kind.
warnings_of() { # warnings_of DIR
  cat "$1"/restarts-*.log 2>/dev/null | awk '
    /^warning:.*did not exit within max_wait/ { k["SIGKILLed at max_wait"]++; next }
    /^warning:.*did not finish its requests/ { k["requests cut at max_wait"]++; next }
    /^warning:.*accept queue/ { k["accept-queue warning"]++; next }
    /^warning:/ { k["other"]++ }
    END { s = ""; for (w in k) s = s (s ? ", " : "") k[w] "× " w; print s }'
}

join() { local IFS=/; echo "$*" | sed 's|/| / |g'; }

TABLE_ROWS="$OUT/rows.tsv"; : >"$TABLE_ROWS"
IFS=',' read -r -a SERVER_LIST <<<"$SERVERS"
IFS=',' read -r -a MODE_LIST <<<"$MODES"
IFS=',' read -r -a LOAD_LIST <<<"$LOADS"
declare -A VERDICT
for srv in "${SERVER_LIST[@]}"; do
  why=$(missing "$srv")
  if [ -n "$why" ]; then
    log "$srv: skipped, $why"
    printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$srv" - - - - - - - "skipped: $why" >>"$TABLE_ROWS"
    continue
  fi
  ver=$(version "$srv")
  for mode in "${MODE_LIST[@]}"; do
    if [ "$srv/$mode" = php/pass ]; then
      printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$srv" "$ver" "$mode" - - - - - "n/a: php -S cannot take an inherited socket" >>"$TABLE_ROWS"
      continue
    fi
    dir="$OUT/$srv-$mode"; mkdir -p "$dir"
    PORT=$(free_port); conf="$dir/supervisor.toml"
    {
      echo "[supervisor]"
      echo "control = \"$dir/zdt.sock\""
      echo "log_dir = \"$dir/logs\""
      echo "[program.app]"
      program_toml "$srv" "$mode"
      echo "mode = \"$mode\""
      echo "listen = [\"tcp://127.0.0.1:$PORT\"]"
      echo "instances = 1"
      echo "max_wait = \"$MAX_WAIT\""
    } >"$conf"
    "$BIN/zdt" -c "$conf" 2>"$dir/zdt.log" & zdt=$!; PIDS+=("$zdt")
    if ! wait_up "$PORT" 60; then
      log "$srv $mode: not up (see $dir)"
      printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$srv" "$ver" "$mode" - - - - - "error: not up (see $dir)" >>"$TABLE_ROWS"
      kill "$zdt" 2>/dev/null; wait "$zdt" 2>/dev/null
      continue
    fi
    log "$srv $mode: port $PORT, $K restarts per load ($ver)"
    reqs=(); fails=(); kinds=""; rfail=0; slowest=0
    for lm in "${LOAD_LIST[@]}"; do
      wait_up "$PORT" 30 || log "  not up before the $lm load"
      run_load "$dir" "$lm" "http://127.0.0.1:$PORT/?sleep=$SLEEP_MS" "$conf" >"$dir/result-$lm.txt"
      r=$(cat "$dir/result-$lm.txt"); log "  $r"
      echo "$srv $mode $r" >>"$OUT/load.txt"
      reqs+=("$(thousands "$(kv requests "$r")")"); fails+=("$(thousands "$(kv failed "$r")")")
      k=""
      for f in connect broken non2xx timeout probe_failed; do
        n=$(kv "$f" "$r"); [ "${n:-0}" -gt 0 ] && k="$k${k:+, }${f/_failed/} $n"
      done
      [ -n "$k" ] && kinds="$kinds${kinds:+; }$lm: $k"
      rfail=$(( rfail + $(kv restart_failures "$r") ))
      sl=$(kv slowest_restart_ms "$r"); [ "${sl:-0}" -gt "$slowest" ] && slowest=$sl
    done
    warn=$(warnings_of "$dir")
    [ "$rfail" -gt 0 ] && warn="$warn${warn:+, }$rfail restart(s) exited non-zero"
    failed_total=0
    for lm in "${LOAD_LIST[@]}"; do
      n=$(kv failed "$(grep "^$srv $mode LOAD label=$lm " "$OUT/load.txt" | tail -1)")
      failed_total=$(( failed_total + ${n:-1} ))
    done
    # A socket nobody accepts on makes requests time out; with 0 failed, the
    # queue warning came from a busy server that accepted everything.
    hard=$(sed 's/[0-9]*× accept-queue warning//; s/^, //; s/, $//' <<<"$warn")
    if [ "$failed_total" -gt 0 ] || [ -n "$hard" ]; then v=FAIL
    elif [ -n "$warn" ]; then v="ok (0 failed: the queue warning is false)"
    else v=ok; fi
    VERDICT[$srv/$mode]=$v
    printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$srv" "$ver" "$mode" "$(join "${reqs[@]}")" "$(join "${fails[@]}")" \
      "${kinds:-none}" "${warn:-none}" "$(awk -v m="$slowest" 'BEGIN{printf "%.1f s", m/1000}')" "$v" >>"$TABLE_ROWS"
    # Stop: zdt drains and stops the program (kill_timeout 10 s), then exits.
    kill "$zdt" 2>/dev/null
    for _ in $(seq 300); do kill -0 "$zdt" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$zdt" 2>/dev/null; wait "$zdt" 2>/dev/null
  done
done

recommended() { # recommended SERVER
  case "${VERDICT[$1/pass]:-}/${VERDICT[$1/proxy]:-}" in
    ok*/*) echo "pass" ;;
    */ok*) [ "$1" = php ] && echo "proxy (only mode)" || echo "proxy" ;;
    /) echo "-" ;;
    */) echo "not pass (proxy not run)" ;;
    *) echo "none measured clean" ;;
  esac
}

TABLE="$OUT/table.md"
loads=$(join "${LOAD_LIST[@]}" | sed 's/keepalive/keep-alive/; s/close/new conn/')
{
  echo "| server | version | mode | requests, $loads | failed, $loads | failure kinds | restart warnings | slowest restart | verdict | recommended mode |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  while IFS=$'\t' read -r srv ver mode rq fl kd wn sl v; do
    printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n" "$srv" "$ver" "$mode" "$rq" "$fl" "$kd" "$wn" "$sl" "$v" "$(recommended "$srv")"
  done <"$TABLE_ROWS"
} >"$TABLE"
{
  echo "bench/servers.sh -s $SERVERS -m $MODES -l $LOADS -k $K -i $INTERVAL -w $WARMUP -c $CLIENTS -W $MAX_WAIT -S $SLEEP_MS"
  echo "($(date -u +%Y-%m-%d), $(nproc) CPUs, $(uname -sr); one instance per server, max_wait = \"$MAX_WAIT\")"
  echo
  cat "$TABLE"
  echo
  echo "raw results: $OUT"
} | tee "$OUT/summary.txt"

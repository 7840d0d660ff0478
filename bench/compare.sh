#!/usr/bin/env bash
# bench/compare.sh - zdt beside what people use today, under the same load and
# the same restart schedule, on the same Node app and then on `php -S`:
#
#   supervisord      `supervisorctl restart` of one copy
#   nginx-backup     two copies behind nginx (`server ... backup;`), restarted
#                    in turn with a wait for HTTP 200 (the common recipe)
#   pm2-fork         `pm2 restart` of one copy
#   pm2-cluster      `pm2 reload` of 2 cluster workers (Node only)
#   zdt-pass         `zdtctl restart` of one copy on zdt's socket (Node only:
#                    php -S cannot take an inherited socket)
#   zdt-proxy        `zdtctl restart` of one copy behind zdt's proxy
#
# Each approach runs twice: keep-alive clients, then a new connection per
# request. The load is target/release/zdt-load (every request counts: refused,
# reset, non-2xx, timeout; plus a new-connection probe every 20 ms that
# measures the outage). Prints one table and writes everything to a folder:
# LOAD lines, per-100 ms series (CSV), restart logs, and an SVG plot per app
# and mode when gnuplot is there.
#
# Installs nothing. Needs: a release build (cargo build --release), curl,
# python3; per approach: node, php-cli (apt-get install nodejs php-cli),
# supervisord (pip install supervisor), nginx (apt-get install nginx-light),
# pm2 (npm install -g pm2), gnuplot (apt-get install gnuplot-nox) for plots.
# An approach whose tool is missing is skipped and says so in the table.
#
# Usage: bench/compare.sh [-d SECONDS] [-k RESTARTS] [-i INTERVAL] [-c CLIENTS]
#                         [-s SLEEP_MS] [-o DIR] [-a APPROACHES] [-A APPS]
#   -d  seconds of load per mode (20)        -k  restarts per mode (5)
#   -i  seconds between restarts (3)         -w  warm-up before the first (2)
#   -c  concurrent clients (32)              -s  handler time, ms (20)
#   -o  results folder (a new /tmp dir)      -a  comma list of approaches (all)
#   -A  comma list of apps: node,php (both)
set -u
DUR=20; K=5; INTERVAL=3; WARMUP=2; CLIENTS=32; SLEEP_MS=20; OUT=""
APPROACHES="supervisord,nginx-backup,pm2-fork,pm2-cluster,zdt-pass,zdt-proxy"; APPS="node,php"
while getopts "d:k:i:w:c:s:o:a:A:h" opt; do
  case $opt in
    d) DUR=$OPTARG ;; k) K=$OPTARG ;; i) INTERVAL=$OPTARG ;; w) WARMUP=$OPTARG ;;
    c) CLIENTS=$OPTARG ;; s) SLEEP_MS=$OPTARG ;; o) OUT=$OPTARG ;; a) APPROACHES=$OPTARG ;; A) APPS=$OPTARG ;;
    *) sed -n '2,/^set -u/p' "$0" | sed 's/^# \{0,1\}//;/^set -u/d' >&2; exit 2 ;;
  esac
done
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$ROOT/target/release"
for b in zdt zdtctl zdt-load; do
  [ -x "$BIN/$b" ] || { echo "build first: cargo build --release ($b missing)" >&2; exit 2; }
done
for t in curl python3; do command -v "$t" >/dev/null || { echo "$t not found" >&2; exit 2; }; done
[ -n "$OUT" ] || OUT=$(mktemp -d /tmp/zdt-compare.XXXXXX)
mkdir -p "$OUT"
ulimit -n 65536 2>/dev/null || true

NODE_APP="$ROOT/contrib/node/server.js"
PHP_APP="$ROOT/contrib/php/app.php"
PHP_WORKERS=8 # php -S processes serving at a time, whatever the approach

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
now_ms() { date +%s%3N; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up() { curl -sf -o /dev/null -m 2 "http://127.0.0.1:$1/"; }
wait_up() { # wait_up PORT [SECONDS]
  local end=$(( $(date +%s) + ${2:-30} ))
  until up "$1"; do [ "$(date +%s)" -lt "$end" ] || return 1; sleep 0.05; done
}
# kv KEY LINE -> the value of KEY=value in LINE (also inside "(a=1,b=2)").
kv() { sed -n "s/.*[ (,]$1=\([^ ,)]*\).*/\1/p" <<<" $2"; }

# What each approach needs; prints the missing tool, if any.
missing() { # missing APPROACH APP
  local need=()
  case $2 in node) need+=(node) ;; php) need+=(php) ;; esac
  case $1 in
    supervisord) need+=(supervisord supervisorctl) ;;
    nginx-backup) need+=(supervisord supervisorctl nginx) ;;
    pm2-*) need+=(pm2) ;;
  esac
  for t in "${need[@]}"; do command -v "$t" >/dev/null || { echo "$t"; return; }; done
}

# The app's command line for one copy on PORT (php: PHP_WORKERS processes).
app_cmd() { # app_cmd APP PORT
  case $1 in
    node) echo "node $NODE_APP" ;;
    php) echo "php -S 127.0.0.1:$2 $PHP_APP" ;;
  esac
}

# --- the approaches: each start_* sets PORT and RESTART, and STOP to end it ---
PIDS=()
cleanup() { [ -n "${STOP:-}" ] && eval "$STOP" >/dev/null 2>&1; for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; }
trap cleanup EXIT

supervisord_conf() { # supervisord_conf DIR APP PORT... : one [program:appN] per port
  local dir=$1 app=$2; shift 2
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
  local n=0
  for p in "$@"; do
    n=$((n + 1))
    cat >>"$dir/supervisord.conf" <<EOF
[program:app$n]
command=$(app_cmd "$app" "$p")
environment=PORT="$p",PHP_CLI_SERVER_WORKERS="$PHP_WORKERS"
stopasgroup=true
killasgroup=true
EOF
  done
}

start_supervisord() { # APP DIR
  PORT=$(free_port)
  supervisord_conf "$2" "$1" "$PORT"
  supervisord -c "$2/supervisord.conf" >/dev/null 2>&1 & PIDS+=($!)
  STOP="supervisorctl -c $2/supervisord.conf shutdown"
  RESTART="supervisorctl -c $2/supervisord.conf restart app1"
  WORKERS=1
}

start_nginx_backup() { # APP DIR
  local a b; a=$(free_port); b=$(free_port); PORT=$(free_port)
  supervisord_conf "$2" "$1" "$a" "$b"
  supervisord -c "$2/supervisord.conf" >/dev/null 2>&1 & PIDS+=($!)
  mkdir -p "$2/nginx"
  cat >"$2/nginx/nginx.conf" <<EOF
worker_processes 1;
pid $2/nginx/nginx.pid;
error_log $2/nginx/error.log warn;
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
    }
  }
}
EOF
  nginx -p "$2/nginx" -c "$2/nginx/nginx.conf" -g 'daemon off;' 2>"$2/nginx/stderr" & PIDS+=($!)
  STOP="supervisorctl -c $2/supervisord.conf shutdown"
  local ctl="supervisorctl -c $2/supervisord.conf"
  RESTART="$ctl restart app1 && until curl -sf -o /dev/null http://127.0.0.1:$a/; do sleep 0.1; done && $ctl restart app2 && until curl -sf -o /dev/null http://127.0.0.1:$b/; do sleep 0.1; done"
  WORKERS=1
}

pm2_start() { # APP DIR PM2-ARGS...
  local app=$1 dir=$2; shift 2
  PORT=$(free_port)
  export PM2_HOME="$dir/pm2"
  case $app in
    node) PORT=$PORT pm2 start "$NODE_APP" --name app "$@" >"$dir/pm2-start.log" 2>&1 ;;
    php) PHP_CLI_SERVER_WORKERS=$PHP_WORKERS pm2 start "$(command -v php)" --name app \
           --interpreter none "$@" -- -S "127.0.0.1:$PORT" "$PHP_APP" >"$dir/pm2-start.log" 2>&1 ;;
  esac
  STOP="PM2_HOME=$dir/pm2 pm2 kill"
}
start_pm2_fork() { pm2_start "$1" "$2"; RESTART="PM2_HOME=$2/pm2 pm2 restart app"; WORKERS=1; }
start_pm2_cluster() { pm2_start "$1" "$2" -i 2; RESTART="PM2_HOME=$2/pm2 pm2 reload app"; WORKERS=2; }

zdt_start() { # APP DIR MODE
  PORT=$(free_port)
  local cmd ready env
  case $1/$3 in
    node/pass) cmd="\"node\", \"$NODE_APP\""; ready='{ notify = true }'; env="ZDT_BIN = \"$BIN/zdt\"" ;;
    node/proxy) cmd="\"node\", \"$NODE_APP\""; ready='{ http = "/health" }'; env='PORT = "{port}"' ;;
    php/proxy) cmd="\"php\", \"-S\", \"127.0.0.1:{port}\", \"$PHP_APP\""; ready='{ http = "/health" }'
               env="PHP_CLI_SERVER_WORKERS = \"$PHP_WORKERS\"" ;;
  esac
  cat >"$2/supervisor.toml" <<EOF
[supervisor]
control = "$2/zdt.sock"
log_dir = "$2/logs"
[program.app]
command = [$cmd]
mode = "$3"
listen = ["tcp://127.0.0.1:$PORT"]
ready = $ready
instances = 1
environment = { $env }
EOF
  "$BIN/zdt" -c "$2/supervisor.toml" 2>"$2/zdt.log" & PIDS+=($!)
  STOP="kill $!"
  RESTART="$BIN/zdtctl -c $2/supervisor.toml restart app"
  WORKERS=1
}
start_zdt_pass() { zdt_start "$1" "$2" pass; }
start_zdt_proxy() { zdt_start "$1" "$2" proxy; }

# --- one run: load + restart schedule; prints the LOAD line ---
run_mode() { # run_mode DIR MODE URL
  local dir=$1 mode=$2 url=$3
  "$BIN/zdt-load" "$url" -d "$DUR" -c "$CLIENTS" -m "$mode" --label "$mode" \
    --series "$dir/series-$mode.csv" >"$dir/load-$mode.txt" 2>&1 &
  local lpid=$! t0; t0=$(now_ms)
  : >"$dir/restarts-$mode.log"; : >"$dir/restart-at-$mode.txt"
  local i rfail=0
  for ((i = 0; i < K; i++)); do
    local due=$(( t0 + (WARMUP + i * INTERVAL) * 1000 )) wait_ms
    wait_ms=$(( due - $(now_ms) ))
    [ "$wait_ms" -gt 0 ] && sleep "$(awk -v m="$wait_ms" 'BEGIN{printf "%.3f", m/1000}')"
    kill -0 "$lpid" 2>/dev/null || break
    local s; s=$(now_ms)
    echo "$s" >>"$dir/restart-at-$mode.txt"
    timeout -k 5 60 bash -c "$RESTART" >>"$dir/restarts-$mode.log" 2>&1 || rfail=$((rfail + 1))
    echo "restart $((i + 1)) took $(( $(now_ms) - s )) ms" >>"$dir/restarts-$mode.log"
  done
  wait "$lpid"
  local line; line=$(grep '^LOAD ' "$dir/load-$mode.txt")
  [ -n "$line" ] || { log "load failed: $(cat "$dir/load-$mode.txt")"; line="LOAD error=1"; }
  echo "$line restart_failures=$rfail"
}

TABLE="$OUT/table.txt"
printf "%-8s %-13s %8s %22s %12s %9s %9s\n" app approach processes "failed (ka / new conn)" "outage ms" "p99 ms" "req/s" >"$TABLE"
IFS=',' read -r -a APP_LIST <<<"$APPS"
IFS=',' read -r -a APPROACH_LIST <<<"$APPROACHES"
for app in "${APP_LIST[@]}"; do
  for a in "${APPROACH_LIST[@]}"; do
    row() { printf "%-8s %-13s %8s %22s %12s %9s %9s\n" "$app" "$a" "$@" >>"$TABLE"; }
    if [ "$app" = php ] && { [ "$a" = pm2-cluster ] || [ "$a" = zdt-pass ]; }; then
      row - "n/a: php -S $( [ "$a" = pm2-cluster ] && echo "is not a Node cluster" || echo "cannot take a socket")" - - -
      continue
    fi
    m=$(missing "$a" "$app")
    if [ -n "$m" ]; then row - "skipped: no $m" - - -; log "$app $a: skipped, $m not found"; continue; fi
    dir="$OUT/$app-$a"; mkdir -p "$dir"
    STOP=""; PORT=""; RESTART=""; WORKERS=0
    "start_${a//-/_}" "$app" "$dir"
    path="/?sleep=$SLEEP_MS"
    if ! wait_up "$PORT" 30; then
      row - "error: not up (see $dir)" - - -; log "$app $a: not up"; eval "$STOP" >/dev/null 2>&1; STOP=""; continue
    fi
    log "$app $a: port $PORT, $K restarts per mode: $RESTART"
    ka=$(run_mode "$dir" keepalive "http://127.0.0.1:$PORT$path"); log "  $ka"
    wait_up "$PORT" 30 || log "  not up after the keep-alive run"
    cl=$(run_mode "$dir" close "http://127.0.0.1:$PORT$path"); log "  $cl"
    eval "$STOP" >/dev/null 2>&1; STOP=""
    sleep 1 # let the stack's processes exit before the next one starts
    out_ka=$(kv longest_outage_ms "$ka"); out_cl=$(kv longest_outage_ms "$cl")
    p99=$(awk -v a="$(kv p99_ms "$ka")" -v b="$(kv p99_ms "$cl")" 'BEGIN{print (a>b?a:b)}')
    rps=$(awk -v a="$(kv rps "$ka")" -v b="$(kv rps "$cl")" 'BEGIN{printf "%.0f/%.0f", a, b}')
    rf=$(( $(kv restart_failures "$ka") + $(kv restart_failures "$cl") ))
    note=""; [ "$rf" -gt 0 ] && note=" ($rf restart commands failed)"
    row "$WORKERS" "$(kv failed "$ka") / $(kv failed "$cl")$note" \
      "$(awk -v a="$out_ka" -v b="$out_cl" 'BEGIN{print (a>b?a:b)}')" "$p99" "$rps"
    echo "$app $a $ka" >>"$OUT/load.txt"; echo "$app $a $cl" >>"$OUT/load.txt"
  done
done

# --- plots: one SVG per app and mode, a row per approach ---
if command -v gnuplot >/dev/null; then
  for app in "${APP_LIST[@]}"; do
    for mode in keepalive close; do
      rows=()
      for a in "${APPROACH_LIST[@]}"; do [ -f "$OUT/$app-$a/series-$mode.csv" ] && rows+=("$a"); done
      [ ${#rows[@]} -gt 0 ] || continue
      gp="$OUT/plot-$app-$mode.gp"
      {
        echo "set terminal svg size 900,$(( 170 * ${#rows[@]} + 60 )) font 'sans,11' background '#ffffff'"
        echo "set output '$OUT/plot-$app-$mode.svg'"
        echo "set datafile separator ','"
        echo "set multiplot layout ${#rows[@]},1 title '$app, $( [ "$mode" = close ] && echo 'a new connection per request' || echo 'keep-alive clients'), $CLIENTS clients, $K restarts (dashed lines)'"
        echo "set logscale y; set yrange [1:1e6]; set ylabel 'per second'; set y2label 'p99 ms'; set y2tics; set logscale y2; set y2range [1:1e4]"
        echo "set xrange [0:$DUR]; set xlabel 'seconds' offset 0,0.6; set key outside right; set grid"
        for a in "${rows[@]}"; do
          local_start=$(kv start_epoch_ms "$(grep "^LOAD label=$mode" "$OUT/$app-$a/load-$mode.txt")")
          echo "unset arrow"
          while read -r at; do
            [ -n "$local_start" ] && echo "set arrow from $(awk -v a="$at" -v s="$local_start" 'BEGIN{print (a-s)/1000}'), graph 0 to $(awk -v a="$at" -v s="$local_start" 'BEGIN{print (a-s)/1000}'), graph 1 nohead dt 2 lc rgb '#555555'"
          done <"$OUT/$app-$a/restart-at-$mode.txt"
          echo "set title '$a' offset 0,-0.8"
          echo "plot '$OUT/$app-$a/series-$mode.csv' every ::1 using 1:(\$2>0?\$2:NaN) with lines lw 1.5 lc rgb '#2a9d3f' title 'answered/s', \
 '' every ::1 using 1:(\$3>0?\$3:NaN) with impulses lw 2 lc rgb '#d62728' title 'failed/s', \
 '' every ::1 using 1:(\$4>0?\$4:NaN) axes x1y2 with lines lw 1 lc rgb '#1f77b4' title 'p99 ms'"
        done
        echo "unset multiplot"
      } >"$gp"
      gnuplot "$gp" 2>>"$OUT/gnuplot.log" && log "plot: $OUT/plot-$app-$mode.svg"
    done
  done
else
  log "gnuplot not found (apt-get install gnuplot-nox): no plots"
fi

{
  echo "bench/compare.sh -d $DUR -k $K -i $INTERVAL -w $WARMUP -c $CLIENTS -s $SLEEP_MS  ($(date -u +%Y-%m-%d), $(nproc) CPUs, $(uname -sr))"
  echo "zdt-load: every failed request counts; outage = longest run of failed new-connection probes (every 20 ms); p99 of answered requests, worse of the two modes"
  cat "$TABLE"
  echo "raw results: $OUT"
} | tee "$OUT/summary.txt"

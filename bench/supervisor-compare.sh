#!/usr/bin/env bash
# bench/supervisor-compare.sh - zdt beside supervisord 4.x, same run:
#   1. the daemon's resident memory while it manages 10 demo workers;
#   2. `status` latency (the whole CLI call) with 200 programs.
# Needs a release build (cargo build --release) and python3. supervisord is
# taken from PATH, or installed into a private venv with --install
# (pip install supervisor); without either, its column is skipped.
# Usage: bench/supervisor-compare.sh [--install]
set -u
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$ROOT/target/release"
[ -x "$BIN/zdt" ] || { echo "build first: cargo build --release" >&2; exit 2; }
WORK=$(mktemp -d /tmp/zdt-bench-sup.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; }
trap cleanup EXIT

SUPD=$(command -v supervisord || true); SUPCTL=$(command -v supervisorctl || true)
if [ -z "$SUPD" ] && [ "${1:-}" = "--install" ]; then
  python3 -m venv "$WORK/venv" && "$WORK/venv/bin/pip" -q install 'supervisor>=4,<5' >/dev/null \
    && SUPD="$WORK/venv/bin/supervisord" && SUPCTL="$WORK/venv/bin/supervisorctl"
fi
[ -n "$SUPD" ] || echo "supervisord not found (pip install supervisor, or pass --install): its column is skipped" >&2

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
until_ok() { # until_ok SECONDS CMD... : poll CMD until it succeeds
  local end=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt "$end" ] || return 1; sleep 0.1; done
}
ms_stats() { # reads ms values, prints "median p95"
  sort -n | awk '{a[NR]=$1} END {printf "%.1f %.1f\n", a[int((NR+1)/2)], a[int(NR*0.95+0.999)]}'
}
time_cmd() { # time_cmd N CMD... -> N durations in ms, one a line
  local n=$1; shift
  for _ in $(seq "$n"); do
    local s e; s=$(date +%s%N); "$@" >/dev/null 2>&1; e=$(date +%s%N)
    echo $(( (e - s) / 1000 )) | awk '{printf "%.3f\n", $1/1000}'
  done
}

# --- zdt ---
zdt_conf() { # zdt_conf DIR N KIND
  local dir=$1 n=$2 kind=$3
  mkdir -p "$dir"
  printf '[supervisor]\ncontrol = "zdt.sock"\nlog_dir = "logs"\n' >"$dir/supervisor.toml"
  for i in $(seq "$n"); do
    if [ "$kind" = demo ]; then cmd="[\"$BIN/zdt-demo\", \"--port\", \"$((21000 + i))\"]"; else cmd='["sleep", "100000"]'; fi
    printf '\n[program.p%d]\ncommand = %s\nstartsecs = "0s"\n' "$i" "$cmd" >>"$dir/supervisor.toml"
  done
}
zdt_running() { [ "$("$BIN/zdtctl" -c "$1/supervisor.toml" --json status | grep -o '"state":"RUNNING"' | wc -l)" -eq "$2" ]; }
zdt_start() { "$BIN/zdt" -c "$1/supervisor.toml" 2>"$1/zdt.log" & ZPID=$!; PIDS+=("$ZPID"); until_ok 60 zdt_running "$1" "$2" || { echo "zdt did not start $2 programs" >&2; exit 2; }; }
zdt_stop() { "$BIN/zdtctl" -c "$1/supervisor.toml" shutdown >/dev/null 2>&1; until_ok 30 sh -c "! kill -0 $ZPID" || kill -9 "$ZPID"; }

# --- supervisord ---
sup_conf() {
  local dir=$1 n=$2 kind=$3
  mkdir -p "$dir"
  cat >"$dir/supervisord.conf" <<CONF
[unix_http_server]
file=$dir/supervisor.sock
[supervisord]
logfile=$dir/supervisord.log
pidfile=$dir/supervisord.pid
childlogdir=$dir
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[supervisorctl]
serverurl=unix://$dir/supervisor.sock
CONF
  for i in $(seq "$n"); do
    if [ "$kind" = demo ]; then cmd="$BIN/zdt-demo --port $((22000 + i))"; else cmd="sleep 100000"; fi
    printf '[program:p%d]\ncommand=%s\nstartsecs=0\n' "$i" "$cmd" >>"$dir/supervisord.conf"
  done
}
sup_running() { [ "$("$SUPCTL" -c "$1/supervisord.conf" status | grep -c RUNNING)" -eq "$2" ]; }
sup_start() { "$SUPD" -n -c "$1/supervisord.conf" >/dev/null 2>&1 & SPID=$!; PIDS+=("$SPID"); until_ok 90 sup_running "$1" "$2" || { echo "supervisord did not start $2 programs" >&2; exit 2; }; }
sup_stop() { "$SUPCTL" -c "$1/supervisord.conf" shutdown >/dev/null 2>&1; until_ok 60 sh -c "! kill -0 $SPID" || kill -9 "$SPID"; }

zdt_conf "$WORK/z10" 10 demo; zdt_start "$WORK/z10" 10; sleep 1; Z_RSS=$(rss_kib "$ZPID"); zdt_stop "$WORK/z10"
zdt_conf "$WORK/z200" 200 sleep; zdt_start "$WORK/z200" 200
read -r Z_MED Z_P95 < <(time_cmd 20 "$BIN/zdtctl" -c "$WORK/z200/supervisor.toml" status | ms_stats)
zdt_stop "$WORK/z200"
S_RSS=-; S_MED=-; S_P95=-
if [ -n "$SUPD" ]; then
  SUP_VERSION=$("$SUPD" --version)
  sup_conf "$WORK/s10" 10 demo; sup_start "$WORK/s10" 10; sleep 1; S_RSS=$(rss_kib "$SPID"); sup_stop "$WORK/s10"
  sup_conf "$WORK/s200" 200 sleep; sup_start "$WORK/s200" 200
  read -r S_MED S_P95 < <(time_cmd 20 "$SUPCTL" -c "$WORK/s200/supervisord.conf" status | ms_stats)
  sup_stop "$WORK/s200"
fi
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b == "-" || b == 0) print "-"; else printf "%.2f", a/b }'; }
echo "zdt $("$BIN/zdt" --version | awk '{print $2}') vs supervisord ${SUP_VERSION:-not run}; $(nproc) cores"
printf '%-34s %14s %14s %10s\n' "metric" "zdt" "supervisord" "zdt/sup"
printf '%-34s %14s %14s %10s\n' "daemon RSS, 10 programs (KiB)" "$Z_RSS" "$S_RSS" "$(ratio "$Z_RSS" "$S_RSS")"
printf '%-34s %14s %14s %10s\n' "status, 200 programs: median ms" "$Z_MED" "$S_MED" "$(ratio "$Z_MED" "$S_MED")"
printf '%-34s %14s %14s %10s\n' "status, 200 programs: p95 ms" "$Z_P95" "$S_P95" "$(ratio "$Z_P95" "$S_P95")"
echo "RESULT rss_zdt_kib=$Z_RSS rss_supervisord_kib=$S_RSS status_ms_zdt_median=$Z_MED status_ms_supervisord_median=$S_MED"

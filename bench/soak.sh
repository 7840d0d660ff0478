#!/usr/bin/env bash
# bench/soak.sh - many `zdtctl restart`s under continuous load, then kill -9
# of a worker every few seconds, in proxy mode and in pass mode.
#
# Part 1, restarts: N restarts back to back while zdt-load keeps CLIENTS
#   keep-alive clients busy (20 ms handler, zdt-demo, 2 instances). zdt's RSS
#   and open fds are sampled every EVERY restarts. Passes when no request
#   failed and both stayed flat: the mean of the last 3 samples is within
#   FD_SLACK fds and RSS_SLACK KiB of the mean of the first 3 (a leak of one
#   socket, pipe or pidfd per restart would add N fds).
# Part 2, kill -9: for KILL_S seconds, SIGKILL a random worker every KILL_EVERY
#   seconds under the same load. Allowed to fail: the requests in flight on
#   the killed worker at that instant. Proxy mode: every failure must be a 502
#   that zdt answered for a request its proxy had in flight on the killed
#   instance (zdt's own count, `zdtctl status --json`), at most CLIENTS per
#   kill. Pass mode (zdt cannot see requests): at most the connections the
#   worker held just before the kill. In both, every failure must fall within
#   a second after a kill.
#
# Needs a release build (cargo build --release) and python3. Installs nothing.
# Usage: bench/soak.sh [-n RESTARTS] [-e EVERY] [-c CLIENTS] [-K KILL_S]
#                      [-E KILL_EVERY] [-m MODES] [-o DIR]
#   defaults: -n 1000 -e 50 -c 32 -K 30 -E 3 -m proxy,pass
set -u
N=1000; EVERY=50; CLIENTS=32; KILL_S=30; KILL_EVERY=3; MODES="proxy,pass"; OUT=""
FD_SLACK=16; RSS_SLACK=4096
while getopts "n:e:c:K:E:m:o:h" opt; do
  case $opt in
    n) N=$OPTARG ;; e) EVERY=$OPTARG ;; c) CLIENTS=$OPTARG ;; K) KILL_S=$OPTARG ;;
    E) KILL_EVERY=$OPTARG ;; m) MODES=$OPTARG ;; o) OUT=$OPTARG ;;
    *) sed -n '2,/^set -u/p' "$0" | sed 's/^# \{0,1\}//;/^set -u/d' >&2; exit 2 ;;
  esac
done
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$ROOT/target/release"
for b in zdt zdtctl zdt-demo zdt-load; do
  [ -x "$BIN/$b" ] || { echo "build first: cargo build --release ($b missing)" >&2; exit 2; }
done
command -v python3 >/dev/null || { echo "python3 not found" >&2; exit 2; }
[ -n "$OUT" ] || OUT=$(mktemp -d /tmp/zdt-soak.XXXXXX)
mkdir -p "$OUT"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; }
trap cleanup EXIT
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
# kv KEY LINE -> the value of KEY=value in LINE (also inside "(a=1,b=2)").
kv() { sed -n "s/.*[ (,]$1=\([^ ,)]*\).*/\1/p" <<<" $2"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
fds() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 | wc -l; }
# status_py EXPR: evaluates EXPR on `zdtctl status --json` (as s).
status_py() {
  "$BIN/zdtctl" -c "$CONF" status --json 2>/dev/null | python3 -c "import json,sys; s=json.load(sys.stdin); $1"
}

VERDICT=PASS
IFS=',' read -r -a MODE_LIST <<<"$MODES"
for mode in "${MODE_LIST[@]}"; do
  dir="$OUT/$mode"; mkdir -p "$dir"
  PORT=$(free_port); CONF="$dir/supervisor.toml"
  ready='{ notify = true }'; [ "$mode" = proxy ] && ready='{ http = "/health" }'
  cat >"$CONF" <<EOF
[supervisor]
control = "$dir/zdt.sock"
log_dir = "$dir/logs"
[program.app]
command = ["$BIN/zdt-demo"]
mode = "$mode"
listen = ["tcp://127.0.0.1:$PORT"]
ready = $ready
instances = 2
EOF
  "$BIN/zdt" -c "$CONF" 2>"$dir/zdt.log" & ZDT=$!; PIDS+=("$ZDT")
  for _ in $(seq 200); do curl -sf -o /dev/null "http://127.0.0.1:$PORT/" && break; sleep 0.05; done
  URL="http://127.0.0.1:$PORT/?sleep=20"

  # --- part 1: restarts ---
  "$BIN/zdt-load" "$URL" -d 36000 -c "$CLIENTS" --label "$mode-restarts" --series "$dir/series-restarts.csv" \
    >"$dir/load-restarts.txt" 2>&1 & LOAD=$!; PIDS+=("$LOAD")
  log "$mode: $N restarts under $CLIENTS keep-alive clients; zdt pid $ZDT"
  printf "%-6s %9s %10s %5s %9s\n" mode restarts "rss KiB" fds seconds | tee "$dir/samples.txt"
  t0=$(date +%s.%N); rfail=0
  sample() { printf "%-6s %9d %10d %5d %9.1f\n" "$mode" "$1" "$(rss "$ZDT")" "$(fds "$ZDT")" \
    "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{print b-a}')" | tee -a "$dir/samples.txt"; }
  sample 0
  for ((i = 1; i <= N; i++)); do
    timeout -k 5 60 "$BIN/zdtctl" -c "$CONF" restart app >>"$dir/restarts.log" 2>&1 || rfail=$((rfail + 1))
    [ $((i % EVERY)) -eq 0 ] && sample "$i"
  done
  kill -INT "$LOAD"; wait "$LOAD"
  load=$(grep '^LOAD ' "$dir/load-restarts.txt")
  # Flat: the last 3 samples against the first 3 after the start (skipping 0).
  flat=$(awk -v fs="$FD_SLACK" -v rs="$RSS_SLACK" 'NR > 2 {r[++n]=$3; f[n]=$4}
    END { if (n < 6) { print "n/a(too few samples)"; exit }
          for (i = 1; i <= 3; i++) { r0 += r[i]/3; f0 += f[i]/3; r1 += r[n-3+i]/3; f1 += f[n-3+i]/3 }
          printf "rss_growth_kib=%d fd_growth=%.1f %s", r1-r0, f1-f0, (r1-r0 <= rs && f1-f0 <= fs) ? "flat" : "GROWING" }' "$dir/samples.txt")
  failed=$(kv failed "$load")
  v=PASS; { [ "${failed:-1}" != 0 ] || [ "$rfail" -gt 0 ] || [[ "$flat" != *flat* ]]; } && v=FAIL
  [ "$v" = PASS ] || VERDICT=FAIL
  echo "SOAK mode=$mode restarts=$N restart_failures=$rfail requests=$(kv requests "$load") failed=$failed $flat p99_ms=$(kv p99_ms "$load") npids=$(kv npids "$load") verdict=$v" | tee -a "$OUT/result.txt"

  # --- part 2: kill -9 of a worker every KILL_EVERY seconds ---
  if [ "$KILL_S" -gt 0 ]; then
    "$BIN/zdt-load" "$URL" -d "$KILL_S" -c "$CLIENTS" --label "$mode-kill" --series "$dir/series-kill.csv" \
      >"$dir/load-kill.txt" 2>&1 & LOAD=$!; PIDS+=("$LOAD")
    start_ms=$(date +%s%3N); allowed=0; kills=0; : >"$dir/kills.txt"
    zdt_502_before=$(status_py "print(sum((p.get('requests') or {}).get('failed', 0) for p in s['programs']))")
    sleep "$KILL_EVERY"
    while kill -0 "$LOAD" 2>/dev/null && [ $(( $(date +%s%3N) - start_ms )) -lt $(( (KILL_S - KILL_EVERY) * 1000 )) ]; do
      # A RUNNING worker of the current generation, with what it had in flight.
      read -r pid inflight < <(status_py "
import random
r=[i for p in s['programs'] for i in p['instances'] if i['state']=='RUNNING' and i['pid']]
i=random.choice(r) if r else None
print(i['pid'] if i else 0, ((i.get('requests') or {}).get('inflight', 0)) if i else 0)")
      if [ "${pid:-0}" -gt 0 ]; then
        if [ "$mode" = pass ]; then
          # Established connections the worker holds (its listening socket excluded).
          inflight=$(( $(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 -lname 'socket:*' 2>/dev/null | wc -l) - 1 ))
          [ "$inflight" -lt 0 ] && inflight=0
        fi
        at=$(( $(date +%s%3N) - start_ms ))
        kill -9 "$pid" 2>/dev/null && { kills=$((kills + 1)); allowed=$((allowed + inflight)); echo "$at $pid $inflight" >>"$dir/kills.txt"; }
      fi
      sleep "$KILL_EVERY"
    done
    wait "$LOAD"
    load=$(grep '^LOAD ' "$dir/load-kill.txt")
    failed=$(kv failed "$load")
    zdt_502=$(( $(status_py "print(sum((p.get('requests') or {}).get('failed', 0) for p in s['programs']))") - zdt_502_before ))
    # Failures outside [kill, kill + 1 s]: must be none.
    stray=$(awk -F, -v kills="$dir/kills.txt" 'BEGIN { while ((getline l < kills) > 0) { split(l, a, " "); k[++n] = a[1] / 1000 } }
      NR > 1 && $3 > 0 { near = 0; for (i = 1; i <= n; i++) if ($1 + 0.1 >= k[i] && $1 <= k[i] + 1) near = 1; if (!near) s += $3 / 10 }
      END { printf "%d", s }' "$dir/series-kill.csv")
    if [ "$mode" = proxy ]; then
      # zdt answered 502 exactly for the requests its proxy had in flight on a
      # killed instance; the clients saw no other failure.
      v=PASS; { [ "${failed:-1}" -ne "$zdt_502" ] || [ $(( $(kv connect "$load") + $(kv broken "$load") + $(kv timeout "$load") )) -ne 0 ] || [ "$stray" -gt 0 ] \
        || [ "$failed" -gt $(( kills * CLIENTS )) ]; } && v=FAIL
      bound="zdt_502_in_flight_on_killed=$zdt_502 in_flight_sampled_before_kill=$allowed"
    else
      v=PASS; { [ "${failed:-1}" -gt "$allowed" ] || [ "$stray" -gt 0 ]; } && v=FAIL
      bound="connections_held_by_killed=$allowed"
    fi
    [ "$v" = PASS ] || VERDICT=FAIL
    echo "KILL mode=$mode kills=$kills requests=$(kv requests "$load") failed=$failed $bound failed_away_from_kills=$stray verdict=$v" | tee -a "$OUT/result.txt"
  fi
  kill "$ZDT"; wait "$ZDT" 2>/dev/null
done
echo "SOAK verdict=$VERDICT raw=$OUT" | tee -a "$OUT/result.txt"
[ "$VERDICT" = PASS ]

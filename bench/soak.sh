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
#   SLEEP_MS sets the handler's delay (20 ms; 0 makes the most requests per
#   restart) and PAUSE_MS a pause between restarts (0), to reach a request
#   count, e.g. 1,000,000 across the 1,000 restarts: -s 0 -c 64.
# Part 2, kill -9: for KILL_S seconds, SIGKILL a random worker every KILL_EVERY
#   seconds under the same load. Allowed to fail: the requests in flight on
#   the killed worker at that instant. Proxy mode: every failure must be a 502
#   that zdt answered for a request its proxy had in flight on the killed
#   instance (zdt's own count, `zdtctl status --json`), at most CLIENTS per
#   kill. Pass mode (zdt cannot see requests): at most the connections the
#   worker held just before the kill. In both, every failure must fall within
#   a second after a kill.
# Part 3, idle clients (proxy mode, -I IDLE > 0): IDLE keep-alive clients each
#   make one request and then sit idle on their connections while zdt runs
#   IDLE_RESTARTS restarts under the same load; then each sends a second
#   request on its same connection. Passes when every one of them is answered
#   200 both times, no request of the load failed, and zdt's RSS and fds after
#   the restarts are within RSS_SLACK KiB and FD_SLACK fds of before. Needs
#   IDLE + ~1,000 fds in zdt and in the client process: the script raises its open
#   files limit (ulimit -n 65536, else to the hard limit) and sets the
#   program's max_connections to fit.
#
# Needs a release build (cargo build --release) and python3. Installs nothing.
# Usage: bench/soak.sh [-n RESTARTS] [-e EVERY] [-c CLIENTS] [-s SLEEP_MS]
#                      [-p PAUSE_MS] [-K KILL_S] [-E KILL_EVERY]
#                      [-I IDLE] [-R IDLE_RESTARTS] [-m MODES] [-o DIR]
#   defaults: -n 1000 -e 50 -c 32 -s 20 -p 0 -K 30 -E 3 -I 0 -R 100 -m proxy,pass
#   (-n 0 skips part 1, -K 0 part 2, -I 0 part 3)
set -u
N=1000; EVERY=50; CLIENTS=32; SLEEP_MS=20; PAUSE_MS=0; KILL_S=30; KILL_EVERY=3
IDLE=0; IDLE_RESTARTS=100; MODES="proxy,pass"; OUT=""
FD_SLACK=16; RSS_SLACK=4096
while getopts "n:e:c:s:p:K:E:I:R:m:o:h" opt; do
  case $opt in
    n) N=$OPTARG ;; e) EVERY=$OPTARG ;; c) CLIENTS=$OPTARG ;; s) SLEEP_MS=$OPTARG ;; p) PAUSE_MS=$OPTARG ;;
    K) KILL_S=$OPTARG ;; E) KILL_EVERY=$OPTARG ;; I) IDLE=$OPTARG ;; R) IDLE_RESTARTS=$OPTARG ;;
    m) MODES=$OPTARG ;; o) OUT=$OPTARG ;;
    *) sed -n '2,/^set -u/p' "$0" | sed 's/^# \{0,1\}//;/^set -u/d' >&2; exit 2 ;;
  esac
done
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$ROOT/target/release"
for b in zdt zdtctl zdt-demo zdt-load; do
  [ -x "$BIN/$b" ] || { echo "build first: cargo build --release ($b missing)" >&2; exit 2; }
done
command -v python3 >/dev/null || { echo "python3 not found" >&2; exit 2; }
# Part 3 holds IDLE connections in zdt and in the client.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
if [ "$IDLE" -gt 0 ] && [ "$(ulimit -n)" -lt $((IDLE + 2048)) ]; then
  echo "open files limit $(ulimit -n) is too low for $IDLE idle clients (raise the hard limit)" >&2; exit 2
fi
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
  # Part 3: room for the idle clients beside the load (proxy mode only).
  # (header_timeout: an idle keep-alive client is closed after it, 30 s by default.)
  [ "$mode" = proxy ] && [ "$IDLE" -gt 0 ] && printf 'max_connections = %d\nheader_timeout = "1h"\n' \
    $((IDLE + 4 * CLIENTS + 1024)) >>"$CONF"
  "$BIN/zdt" -c "$CONF" 2>"$dir/zdt.log" & ZDT=$!; PIDS+=("$ZDT")
  for _ in $(seq 200); do curl -sf -o /dev/null "http://127.0.0.1:$PORT/" && break; sleep 0.05; done
  URL="http://127.0.0.1:$PORT/?sleep=$SLEEP_MS"

  # --- part 1: restarts ---
  if [ "$N" -gt 0 ]; then
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
    [ "$PAUSE_MS" -gt 0 ] && sleep "$(awk -v m="$PAUSE_MS" 'BEGIN{print m/1000}')"
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
  echo "SOAK mode=$mode restarts=$N restart_failures=$rfail requests=$(kv requests "$load") failed=$failed $flat p99_ms=$(kv p99_ms "$load") npids=$(kv npids "$load") seconds=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') verdict=$v" | tee -a "$OUT/result.txt"
  fi

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

  # --- part 3: IDLE idle keep-alive clients held through IDLE_RESTARTS restarts ---
  if [ "$mode" = proxy ] && [ "$IDLE" -gt 0 ]; then
    "$BIN/zdt-load" "$URL" -d 36000 -c "$CLIENTS" --label "$mode-idle" >"$dir/load-idle.txt" 2>&1 & LOAD=$!; PIDS+=("$LOAD")
    r0=$(rss "$ZDT"); f0=$(fds "$ZDT")
    rm -f "$dir/idle-go"
    python3 - "$PORT" "$IDLE" "$dir/idle-go" >"$dir/idle.txt" 2>&1 <<'PY' & HOLD=$!; PIDS+=("$HOLD")
import os, socket, sys, time
port, n, go = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
req = b"GET /?idle HTTP/1.1\r\nHost: soak\r\n\r\n"
def answer(s):
    """The status of one answer with a Content-Length, or 0 if the connection ended."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            return 0
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = int(next(l.split(b":")[1] for l in lines if l.lower().startswith(b"content-length")))
    while len(rest) < length:
        chunk = s.recv(4096)
        if not chunk:
            return 0
        rest += chunk
    return int(lines[0].split()[1])
def exchange(s):
    try:
        s.sendall(req)
        return answer(s)
    except OSError:
        return 0
socks, first = [], 0
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    first += exchange(s) == 200
    socks.append(s)
print(f"HELD {len(socks)} first_ok={first}", flush=True)
end = time.time() + 3600
while not os.path.exists(go) and time.time() < end:
    time.sleep(0.2)
second = sum(exchange(s) == 200 for s in socks)
print(f"IDLE held={len(socks)} first_ok={first} second_ok={second}", flush=True)
PY
    for _ in $(seq 600); do grep -q '^HELD' "$dir/idle.txt" 2>/dev/null && break; kill -0 "$HOLD" 2>/dev/null || break; sleep 0.5; done
    r1=$(rss "$ZDT"); f1=$(fds "$ZDT")
    log "$mode: $IDLE idle clients held (zdt: $f1 fds, $r1 KiB); $IDLE_RESTARTS restarts"
    t0=$(date +%s.%N); rfail=0
    for ((i = 1; i <= IDLE_RESTARTS; i++)); do
      timeout -k 5 60 "$BIN/zdtctl" -c "$CONF" restart app >>"$dir/restarts-idle.log" 2>&1 || rfail=$((rfail + 1))
    done
    took=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
    r2=$(rss "$ZDT"); f2=$(fds "$ZDT")
    touch "$dir/idle-go"; wait "$HOLD"
    kill -INT "$LOAD"; wait "$LOAD"
    idle=$(grep '^IDLE ' "$dir/idle.txt"); load=$(grep '^LOAD ' "$dir/load-idle.txt")
    failed=$(kv failed "$load"); second=$(kv second_ok "$idle")
    v=PASS; { [ "${failed:-1}" != 0 ] || [ "$rfail" -gt 0 ] || [ "$(kv first_ok "$idle")" != "$IDLE" ] || [ "${second:-0}" != "$IDLE" ] \
      || [ $((r2 - r1)) -gt "$RSS_SLACK" ] || [ $((f2 - f1)) -gt "$FD_SLACK" ]; } && v=FAIL
    [ "$v" = PASS ] || VERDICT=FAIL
    echo "IDLE mode=$mode idle=$IDLE restarts=$IDLE_RESTARTS restart_failures=$rfail first_ok=$(kv first_ok "$idle") second_ok=${second:-0} load_requests=$(kv requests "$load") load_failed=$failed rss_kib=$r0/$r1/$r2 fds=$f0/$f1/$f2 (before/held/after restarts) rss_growth_kib=$((r2 - r1)) fd_growth=$((f2 - f1)) seconds=$took verdict=$v" | tee -a "$OUT/result.txt"
  fi
  kill "$ZDT"; wait "$ZDT" 2>/dev/null
done
echo "SOAK verdict=$VERDICT raw=$OUT" | tee -a "$OUT/result.txt"
[ "$VERDICT" = PASS ]

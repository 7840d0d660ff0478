#!/usr/bin/env bash
# bench/pass.sh - throughput and p99 of the demo worker behind zdt pass mode
# (socket activation) beside the same worker binding its own port, same run,
# alternated. Needs wrk (apt-get install wrk) and a release build
# (cargo build --release). Usage: bench/pass.sh [SECONDS] [CONNECTIONS] [ROUNDS]
set -u
DUR=${1:-10}; CONN=${2:-64}; ROUNDS=${3:-2}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$ROOT/target/release"
command -v wrk >/dev/null || { echo "wrk not found: apt-get install wrk" >&2; exit 2; }
[ -x "$BIN/zdt" ] || { echo "build first: cargo build --release" >&2; exit 2; }
WORK=$(mktemp -d /tmp/zdt-bench-pass.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() { for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$1/" && return 0; sleep 0.05; done; echo "port $1 not up" >&2; exit 2; }

DIRECT=$(free_port); PASS=$(free_port)
PORT=$DIRECT "$BIN/zdt-demo" >/dev/null 2>&1 & PIDS+=($!)
cat >"$WORK/supervisor.toml" <<TOML
[supervisor]
control = "zdt.sock"
log_dir = "logs"
[program.demo]
command = ["$BIN/zdt-demo"]
listen = ["tcp://127.0.0.1:$PASS"]
ready = { notify = true }
TOML
"$BIN/zdt" -c "$WORK/supervisor.toml" 2>"$WORK/zdt.log" & PIDS+=($!)
wait_up "$DIRECT"; wait_up "$PASS"

run() { # run PORT -> "rps p99_ms"
  wrk -t2 -c"$CONN" -d"${DUR}s" --latency "http://127.0.0.1:$1/" 2>/dev/null | awk '
    /Requests\/sec/ {rps=$2}
    /^ +99%/ {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}; p99=v}
    END {printf "%.0f %.2f\n", rps, p99}'
}
d_rps=0; p_rps=0; d_p99=0; p_p99=0
for _ in $(seq "$ROUNDS"); do
  read -r a b < <(run "$DIRECT"); d_rps=$((d_rps + a)); d_p99=$(awk -v x="$d_p99" -v y="$b" 'BEGIN{print x+y}')
  read -r a b < <(run "$PASS");   p_rps=$((p_rps + a)); p_p99=$(awk -v x="$p_p99" -v y="$b" 'BEGIN{print x+y}')
done
awk -v dr="$d_rps" -v pr="$p_rps" -v dp="$d_p99" -v pp="$p_p99" -v n="$ROUNDS" -v c="$CONN" -v s="$DUR" 'BEGIN{
  printf "wrk -t2 -c%d -d%ss, %d alternated rounds, demo worker, keep-alive\n", c, s, n
  printf "%-28s %12s %10s\n", "", "requests/s", "p99 ms"
  printf "%-28s %12.0f %10.2f\n", "direct (worker binds port)", dr/n, dp/n
  printf "%-28s %12.0f %10.2f\n", "zdt pass mode (fd 3)", pr/n, pp/n
  printf "ratio zdt/direct: throughput %.3f, p99 %.3f\n", pr/dr, (dp>0 ? pp/dp : 0)
  printf "RESULT direct_rps=%.0f pass_rps=%.0f ratio=%.3f\n", dr/n, pr/n, pr/dr }'

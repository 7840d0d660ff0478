#!/usr/bin/env bash
# bench/pass.sh - an app behind zdt pass mode (socket activation: zdt binds
# the port, the app accepts on fd 3) beside the same app binding its own
# port, in the same run, wrk rounds alternated between the two.
#
# Usage: bench/pass.sh [--backend demo|node] [--conns "32 256"] [--close]
#                      [--rounds N] [SECONDS [CONNECTIONS [ROUNDS]]]
#   demo   target/release/zdt-demo (multi-threaded), ready = notify
#   node   contrib/node/server.js, one process, ready = notify (through
#          `zdt notify`, as the file's header shows)
#   --close  also a new connection per request (wrk with Connection: close)
# Prints requests/s and p99 of each and the ratios pass/direct, per cell,
# and a RESULT line per cell. Needs wrk and a release build.
set -u
DUR=10; CONNS="64"; ROUNDS=2; BACKEND=demo; MODES="keep-alive"
POS=()
while [ $# -gt 0 ]; do
  case $1 in
    --backend) BACKEND=$2; shift ;;
    --conns) CONNS=$2; shift ;;
    --rounds) ROUNDS=$2; shift ;;
    --close) MODES="keep-alive close" ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *) POS+=("$1") ;;
  esac
  shift
done
[ ${#POS[@]} -ge 1 ] && DUR=${POS[0]}
[ ${#POS[@]} -ge 2 ] && CONNS=${POS[1]}
[ ${#POS[@]} -ge 3 ] && ROUNDS=${POS[2]}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$ROOT/target/release"
command -v wrk >/dev/null || { echo "wrk not found: apt-get install wrk" >&2; exit 2; }
[ -x "$BIN/zdt" ] || { echo "build first: cargo build --release" >&2; exit 2; }
case $BACKEND in
  demo) APP=("$BIN/zdt-demo") ;;
  node) command -v node >/dev/null || { echo "node not found" >&2; exit 2; }
        APP=(node "$ROOT/contrib/node/server.js") ;;
  *) echo "unknown backend $BACKEND (known: demo, node)" >&2; exit 2 ;;
esac
WORK=$(mktemp -d /tmp/zdt-bench-pass.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() { for _ in $(seq 200); do curl -sf -o /dev/null "http://127.0.0.1:$1/" && return 0; sleep 0.05; done; echo "port $1 not up" >&2; exit 2; }

DIRECT=$(free_port); PASS=$(free_port)
PORT=$DIRECT "${APP[@]}" >/dev/null 2>&1 & PIDS+=($!)
CMD=$(printf '"%s", ' "${APP[@]}"); CMD=${CMD%, }
cat >"$WORK/supervisor.toml" <<TOML
[supervisor]
control = "zdt.sock"
log_dir = "logs"
[program.app]
command = [$CMD]
listen = ["tcp://127.0.0.1:$PASS"]
ready = { notify = true }
environment = { ZDT_BIN = "$BIN/zdt" }
TOML
"$BIN/zdt" -c "$WORK/supervisor.toml" 2>"$WORK/zdt.log" & PIDS+=($!)
wait_up "$DIRECT"; wait_up "$PASS"

run() { # run PORT CONNS MODE -> "rps p99_ms errors"
  local hdr=()
  [ "$3" = close ] && hdr=(-H "Connection: close")
  wrk -t2 -c"$2" -d"${DUR}s" --latency "${hdr[@]}" "http://127.0.0.1:$1/" 2>/dev/null | awk '
    /Requests\/sec/ {rps=$2}
    /^ +99%/ {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}; p99=v}
    /Socket errors/ {gsub(/,/,""); e=$4+$6+$8+$10}
    /Non-2xx/ {e+=$5}
    END {printf "%.0f %.2f %d\n", rps, p99, e}'
}
printf "wrk -t2 -d%ss, %d alternated rounds, backend %s; means of the rounds\n" "$DUR" "$ROUNDS" "$BACKEND"
printf "%-6s %-11s %12s %12s %9s %9s %9s %9s %7s\n" conns mode "direct rq/s" "pass rq/s" "ratio" "direct p99" "pass p99" "p99 ratio" errors
for c in $CONNS; do
  for m in $MODES; do
    dr=0; pr=0; dp=0; pp=0; errs=0
    for _ in $(seq "$ROUNDS"); do
      read -r a b e < <(run "$DIRECT" "$c" "$m"); dr=$((dr + a)); dp=$(awk -v x="$dp" -v y="$b" 'BEGIN{print x+y}'); errs=$((errs + e))
      read -r a b e < <(run "$PASS" "$c" "$m");   pr=$((pr + a)); pp=$(awk -v x="$pp" -v y="$b" 'BEGIN{print x+y}'); errs=$((errs + e))
    done
    awk -v dr="$dr" -v pr="$pr" -v dp="$dp" -v pp="$pp" -v n="$ROUNDS" -v c="$c" -v m="$m" -v e="$errs" -v b="$BACKEND" 'BEGIN{
      printf "%-6d %-11s %12.0f %12.0f %9.3f %9.2f %9.2f %9.3f %7d\n", c, m, dr/n, pr/n, pr/dr, dp/n, pp/n, (dp>0 ? pp/dp : 0), e
      printf "RESULT backend=%s conns=%d mode=%s direct_rps=%.0f pass_rps=%.0f ratio=%.3f p99_ratio=%.3f errors=%d\n", b, c, m, dr/n, pr/n, pr/dr, (dp>0 ? pp/dp : 0), e > "/dev/stderr" }'
  done
done

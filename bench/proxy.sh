#!/usr/bin/env bash
# bench/proxy.sh - the demo worker direct, behind zdt proxy mode (the proxy in
# its own process, the default, and in zdt's process, proxy_process = false),
# and behind nginx (proxy_pass with upstream keepalive), same run, alternated
# rounds, wrk with keep-alive and a 0 ms handler. Prints requests/s, p50 and
# p99 and the ratios zdt/direct, zdt/nginx and process/in-process, the CPU
# time each proxy spent per request (from /proc/PID/stat over the rounds);
# then zdt's RSS (daemon and proxy process) with 10,000 idle keep-alive
# client connections.
#
# Needs wrk, nginx, curl, python3 (apt-get install wrk nginx-light curl) and a
# release build (cargo build --release). Starts its own nginx on a free port.
# Usage: bench/proxy.sh [SECONDS] [CONNECTIONS] [ROUNDS] [IDLE_CONNECTIONS]
set -u
DUR=${1:-10}; CONN=${2:-64}; ROUNDS=${3:-3}; IDLE=${4:-10000}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$ROOT/target/release"
for t in wrk nginx curl python3; do
  command -v "$t" >/dev/null || { echo "$t not found (apt-get install wrk nginx-light curl python3)" >&2; exit 2; }
done
[ -x "$BIN/zdt" ] || { echo "build first: cargo build --release" >&2; exit 2; }
# PROXY_THREADS=N sets zdt's [supervisor] proxy_threads (default: half the CPUs).
THREADS_LINE=${PROXY_THREADS:+proxy_threads = $PROXY_THREADS}
WORK=$(mktemp -d /tmp/zdt-bench-proxy.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; }
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || true
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() { for _ in $(seq 200); do curl -sf -o /dev/null "http://127.0.0.1:$1/" && return 0; sleep 0.05; done; echo "port $1 not up" >&2; exit 2; }

APP=$(free_port); ZDT=$(free_port); ZIN=$(free_port); NGX=$(free_port)
PORT=$APP "$BIN/zdt-demo" >/dev/null 2>&1 & PIDS+=($!)

# zdt_config DIR PORT PROXY_PROCESS: a zdt with the demo worker proxied on PORT.
zdt_config() {
  mkdir -p "$1"
  cat >"$1/supervisor.toml" <<TOML
[supervisor]
control = "zdt.sock"
log_dir = "logs"
proxy_process = $3
$THREADS_LINE
[program.demo]
command = ["$BIN/zdt-demo"]
mode = "proxy"
listen = ["tcp://127.0.0.1:$2"]
ready = { http = "/health" }
TOML
}
zdt_config "$WORK/zdt" "$ZDT" true
zdt_config "$WORK/zin" "$ZIN" false
"$BIN/zdt" -c "$WORK/zdt/supervisor.toml" 2>"$WORK/zdt.log" & ZDT_PID=$!; PIDS+=("$ZDT_PID")
"$BIN/zdt" -c "$WORK/zin/supervisor.toml" 2>"$WORK/zin.log" & ZIN_PID=$!; PIDS+=("$ZIN_PID")

mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<NGINX
worker_processes auto;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 20000; }
http {
  access_log off;
  upstream app { server 127.0.0.1:$APP; keepalive 128; }
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
nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g 'daemon off;' 2>"$WORK/nginx/stderr" & NGX_PID=$!; PIDS+=("$NGX_PID")
wait_up "$APP"; wait_up "$ZDT"; wait_up "$ZIN"; wait_up "$NGX"
# zdt's proxy process (zdt __proxy, its child): its CPU and memory are zdt's.
ZDT_PROXY=$(pgrep -P "$ZDT_PID" -f __proxy | head -1)
[ -n "$ZDT_PROXY" ] || { echo "zdt's proxy process is not running" >&2; exit 2; }

# CPU time (clock ticks) the given processes have used so far: "user system".
cpu_ticks() {
  local u=0 s=0 p a b
  for p in "$@"; do read -r a b < <(awk '{print $14, $15}' "/proc/$p/stat"); u=$((u + a)); s=$((s + b)); done
  echo "$u $s"
}
TICK_US=$((1000000 / $(getconf CLK_TCK)))
NGX_WORKERS=$(pgrep -P "$NGX_PID" | tr '\n' ' ')
run() { # run PORT -> "rps p50_ms p99_ms requests"
  wrk -t2 -c"$CONN" -d"${DUR}s" --latency "http://127.0.0.1:$1/" 2>/dev/null | awk '
    function ms(v) { if (v ~ /us$/) {sub(/us/,"",v); return v/1000} if (v ~ /ms$/) {sub(/ms/,"",v); return v+0} sub(/s/,"",v); return v*1000 }
    /Requests\/sec/ {rps=$2}
    /^ +50%/ {p50=ms($2)}
    /^ +99%/ {p99=ms($2)}
    /requests in/ {n=$1}
    END {printf "%.0f %.3f %.3f %d\n", rps, p50, p99, n}'
}
declare -A RPS P50 P99 USR SYS NREQ
for k in direct zdt zin nginx; do RPS[$k]=0; P50[$k]=0; P99[$k]=0; USR[$k]=0; SYS[$k]=0; NREQ[$k]=0; done
for r in $(seq "$ROUNDS"); do
  for k in direct zdt zin nginx; do
    case $k in direct) p=$APP;; zdt) p=$ZDT;; zin) p=$ZIN;; nginx) p=$NGX;; esac
    # The proxy's own CPU time over the round (zdt: the daemon and its proxy
    # process; nginx: its workers).
    case $k in direct) procs="";; zdt) procs="$ZDT_PID $ZDT_PROXY";; zin) procs=$ZIN_PID;; nginx) procs=$NGX_WORKERS;; esac
    # shellcheck disable=SC2086
    [ -n "$procs" ] && read -r u0 s0 < <(cpu_ticks $procs)
    read -r a b c n < <(run "$p")
    # shellcheck disable=SC2086
    if [ -n "$procs" ]; then
      read -r u1 s1 < <(cpu_ticks $procs)
      USR[$k]=$((USR[$k] + u1 - u0)); SYS[$k]=$((SYS[$k] + s1 - s0)); NREQ[$k]=$((NREQ[$k] + n))
    fi
    RPS[$k]=$((RPS[$k] + a))
    P50[$k]=$(awk -v x="${P50[$k]}" -v y="$b" 'BEGIN{print x+y}')
    P99[$k]=$(awk -v x="${P99[$k]}" -v y="$c" 'BEGIN{print x+y}')
    echo "round $r $k: $a req/s p50 $b ms p99 $c ms" >&2
  done
done

# zdt's memory with IDLE idle keep-alive client connections (one request each).
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
RSS0=$(( $(rss "$ZDT_PID") + $(rss "$ZDT_PROXY") ))
# Holds N keep-alive connections that each made one request, then prints how
# many were answered 200 and the summed RSS of the given pids.
idle_conns() { python3 - "$@" <<'PY'
import socket, sys
port, n, pids = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
socks, ok = [], 0
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(req)
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(4096)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
    while len(rest) < length:
        rest += s.recv(4096)
    ok += head.startswith(b"HTTP/1.1 200")
    socks.append(s)
rss = sum(int(l.split()[1]) for p in pids for l in open(f"/proc/{p}/status") if l.startswith("VmRSS"))
print(ok, rss)
PY
}
read -r IDLE_OK RSS1 < <(idle_conns "$ZDT" "$IDLE" "$ZDT_PID" "$ZDT_PROXY")
NGX_RSS0=0; for p in $NGX_WORKERS; do NGX_RSS0=$((NGX_RSS0 + $(rss "$p"))); done
read -r NGX_OK NGX_RSS1 < <(idle_conns "$NGX" "$IDLE" $NGX_WORKERS)

awk -v c="$CONN" -v s="$DUR" -v n="$ROUNDS" \
    -v dr="${RPS[direct]}" -v zr="${RPS[zdt]}" -v nr="${RPS[nginx]}" -v ir="${RPS[zin]}" \
    -v d5="${P50[direct]}" -v z5="${P50[zdt]}" -v n5="${P50[nginx]}" -v i5="${P50[zin]}" \
    -v d9="${P99[direct]}" -v z9="${P99[zdt]}" -v n9="${P99[nginx]}" -v i9="${P99[zin]}" \
    -v iu="${USR[zin]}" -v is="${SYS[zin]}" -v iq="${NREQ[zin]}" \
    -v idle="$IDLE" -v ok="$IDLE_OK" -v r0="$RSS0" -v r1="$RSS1" \
    -v gok="$NGX_OK" -v g0="$NGX_RSS0" -v g1="$NGX_RSS1" -v tick="$TICK_US" \
    -v zu="${USR[zdt]}" -v zs="${SYS[zdt]}" -v zq="${NREQ[zdt]}" \
    -v nu="${USR[nginx]}" -v ns="${SYS[nginx]}" -v nq="${NREQ[nginx]}" 'BEGIN{
  zcpu = zq ? (zu + zs) * tick / zq : 0; ncpu = nq ? (nu + ns) * tick / nq : 0
  zusr = zq ? zu * tick / zq : 0; nusr = nq ? nu * tick / nq : 0
  icpu = iq ? (iu + is) * tick / iq : 0
  printf "wrk -t2 -c%d -d%ss, %d alternated rounds (means), demo worker, 0 ms handler, keep-alive\n", c, s, n
  printf "%-34s %12s %9s %9s\n", "", "requests/s", "p50 ms", "p99 ms"
  printf "%-34s %12.0f %9.3f %9.3f\n", "direct to the worker", dr/n, d5/n, d9/n
  printf "%-34s %12.0f %9.3f %9.3f\n", "zdt proxy mode", zr/n, z5/n, z9/n
  printf "%-34s %12.0f %9.3f %9.3f\n", "zdt proxy mode, proxy_process=false", ir/n, i5/n, i9/n
  printf "%-34s %12.0f %9.3f %9.3f\n", "nginx proxy_pass, upstream keepalive", nr/n, n5/n, n9/n
  printf "zdt/direct: throughput %.3f, p99 %.3f\n", zr/dr, z9/d9
  printf "zdt/nginx:  throughput %.3f, p99 %.3f\n", zr/nr, z9/n9
  printf "proxy process/in-process: throughput %.3f, p99 %.3f, CPU per request %.3f\n", zr/ir, z9/i9, (icpu ? zcpu/icpu : 0)
  printf "CPU per proxied request: zdt %.2f us (user %.2f, system %.2f), nginx %.2f us (user %.2f, system %.2f), zdt/nginx %.3f\n", zcpu, zusr, zcpu - zusr, ncpu, nusr, ncpu - nusr, (ncpu ? zcpu/ncpu : 0)
  printf "zdt RSS (daemon + proxy process): %d KiB idle, %d KiB with %d idle keep-alive client connections (%d answered 200)\n", r0, r1, idle, ok
  printf "nginx workers RSS: %d KiB idle, %d KiB with %d idle keep-alive client connections (%d answered 200)\n", g0, g1, idle, gok
  printf "RESULT direct_rps=%.0f zdt_rps=%.0f nginx_rps=%.0f zdt_vs_nginx=%.3f zdt_p99_vs_nginx=%.3f zdt_cpu_us=%.2f nginx_cpu_us=%.2f rss_idle_kib=%d rss_%d_conns_kib=%d inproc_rps=%.0f process_vs_inproc=%.3f\n", dr/n, zr/n, nr/n, zr/nr, z9/n9, zcpu, ncpu, r0, idle, r1, ir/n, zr/ir }'

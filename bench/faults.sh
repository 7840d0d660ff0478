#!/usr/bin/env bash
# bench/faults.sh - the faults of issue 13 under keep-alive load, each with its
# expected outcome; prints one table row per fault and a verdict.
#
# Every row starts its own zdt (release build, loopback ports, its own folder
# under OUT), puts zdt-load on a program (CLIENTS keep-alive clients, a 5 ms
# handler, bounded by LOAD_S seconds per phase), does the fault, stops the load
# and checks what was expected. Rows:
#   reload-change   a reload that changes a proxied program, 3 times   0 failed
#   rename          the program renamed in the file, same address      0 failed
#   listen-in-use   a reload moving listen to an address in use        rejected, old port serves, 0 failed
#   empty-config    a config with no programs: zdtctl reload, SIGHUP   rejected without --allow-empty, 0 failed
#   failed-reload   a reload to a command never ready, then kill -9    old keeps serving (0 failed); the old
#                   of the old worker                                  command respawns, not the rejected one
#   kill-worker     kill -9 of a proxied worker, 3 times               failed = zdt's 502s for requests in
#                                                                      flight on the killed worker, no other
#   crash-loop      a worker crashing 300 ms after ready, beside a     FATAL after startretries (3), its port
#                   healthy program under load                         answers 503; the healthy one 0 failed
#   fd-limit        zdt under `prlimit --nofile=512:512`, IDLE idle    status answers within 5 s, the load's
#                   clients beyond it, kill -9 of a worker             open clients 0 failed, respawn RUNNING
#   stalled-log     stdout_logfile a FIFO a reader holds open and      status answers, restart works, the
#                   never reads, a worker writing without end          writer respawns after kill -9; 0 failed
#   forged-ready    READY=1 sent as uid nobody to the notify socket    ignored and logged; restart fails,
#                   of a never-ready new generation                    old generation serves, 0 failed
#   ignore-term     pass mode: the old worker ignores SIGTERM          SIGKILLed at max_wait, restart warns,
#                                                                      --strict exits 1; failed <= clients+1
#                                                                      per kill (zdt-load's probe is one more)
#   own-port        pass mode: the worker binds a port of its own      socket warning in status and log; its
#                                                                      own port serves, 0 failed
#   orphan          kill -9 of zdt; a pass worker's child holds the    the next zdt kills the child, the port
#                   listening socket; zdt started again                serves; 0 failed before and after
#
# Needs a release build (cargo build --release), python3, curl, prlimit,
# setpriv (util-linux). Run as root for forged-ready (it sends as uid 65534;
# skipped otherwise). Installs nothing. About 3.5 minutes for all rows.
# Usage: bench/faults.sh [-r ROWS] [-c CLIENTS] [-d LOAD_S] [-i IDLE] [-o DIR] [-l]
#   -r ROWS  comma-separated row names (default: all); -l lists them
#   defaults: -c 32 -d 6 -i 600
set -u
ALL_ROWS="reload-change,rename,listen-in-use,empty-config,failed-reload,kill-worker,crash-loop,fd-limit,stalled-log,forged-ready,ignore-term,own-port,orphan"
ROWS=$ALL_ROWS; CLIENTS=32; LOAD_S=6; IDLE=600; OUT=""
while getopts "r:c:d:i:o:lh" opt; do
  case $opt in
    r) ROWS=$OPTARG ;; c) CLIENTS=$OPTARG ;; d) LOAD_S=$OPTARG ;; i) IDLE=$OPTARG ;; o) OUT=$OPTARG ;;
    l) tr ',' '\n' <<<"$ALL_ROWS"; exit 0 ;;
    *) sed -n '2,/^set -u/p' "$0" | sed 's/^# \{0,1\}//;/^set -u/d' >&2; exit 2 ;;
  esac
done
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$ROOT/target/release"
for b in zdt zdtctl zdt-demo zdt-load; do
  [ -x "$BIN/$b" ] || { echo "build first: cargo build --release ($b missing)" >&2; exit 2; }
done
for t in python3 curl prlimit setpriv; do
  command -v "$t" >/dev/null || { echo "$t not found" >&2; exit 2; }
done
# The interpreter itself: a version manager's shim costs a process tree per call.
PY=$(python3 -c 'import sys; print(sys.executable)')
[ -n "$OUT" ] || OUT=$(mktemp -d /tmp/zdt-faults.XXXXXX)
mkdir -p "$OUT"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done; }
trap cleanup EXIT
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
kv() { sed -n "s/.*[ (,]$1=\([^ ,)]*\).*/\1/p" <<<" $2"; }
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now_ms() { date +%s%3N; }

# --- one zdt per row ---------------------------------------------------------
# setup ROW: a fresh folder D and config path CONF for the row.
setup() { ROW=$1; D="$OUT/$1"; rm -rf "$D"; mkdir -p "$D"; CONF="$D/supervisor.toml"; log "$ROW"; }
header() { printf '[supervisor]\ncontrol = "%s/zdt.sock"\nlog_dir = "%s/logs"\n\n' "$D" "$D"; }
# toml_argv WORDS...: a TOML array of strings.
toml_argv() { local s="" a; for a in "$@"; do s+="\"$a\", "; done; echo "[${s%, }]"; }
# demo NAME PORT MODE EXTRA [ARGS...]: the demo worker as [program.NAME].
demo() {
  local name=$1 port=$2 mode=$3 extra=$4 ready; shift 4
  ready='{ notify = true }'; [ "$mode" = proxy ] && ready='{ http = "/health" }'
  printf '[program.%s]\ncommand = %s\nmode = "%s"\nlisten = ["tcp://127.0.0.1:%s"]\nready = %s\n%s\n\n' \
    "$name" "$(toml_argv "$BIN/zdt-demo" "$@")" "$mode" "$port" "$ready" "$extra"
}
quiet_status() { ctl status >/dev/null 2>&1; }
ctl() { timeout -k 2 60 "$BIN/zdtctl" -c "$CONF" "$@"; }
# zdt_start [PREFIX...]: starts zdt on CONF (under PREFIX, e.g. prlimit ...)
# and waits until its control socket answers.
zdt_start() {
  "$@" "$BIN/zdt" -c "$CONF" 2>>"$D/zdt.log" & ZDT=$!; PIDS+=("$ZDT")
  wait_until 30 quiet_status || { log "$ROW: zdt did not answer"; return 1; }
}
# zdt_stop: SIGTERM, SIGKILL after 15 s; TERM_OK=0 when SIGTERM sufficed.
zdt_stop() {
  kill -TERM "$ZDT" 2>/dev/null
  TERM_OK=1; for _ in $(seq 150); do kill -0 "$ZDT" 2>/dev/null || { TERM_OK=0; break; }; sleep 0.1; done
  kill -9 "$ZDT" 2>/dev/null; wait "$ZDT" 2>/dev/null
}
# wait_until SECONDS CMD...: polls CMD every 100 ms until it succeeds.
wait_until() {
  local end=$(( $(now_ms) + $1 * 1000 )); shift
  until "$@"; do [ "$(now_ms)" -lt "$end" ] || return 1; sleep 0.1; done
}
serves() { curl -sf -m 2 -o /dev/null "http://127.0.0.1:$1/"; }
# st EXPR: python EXPR on `zdtctl status --json` (as s); prints what EXPR prints.
st() { ctl status --json 2>/dev/null | "$PY" -c "import json,sys; s=json.load(sys.stdin); $1"; }
pids_of() { st "print(' '.join(str(i['pid']) for p in s['programs'] if p['name']=='$1' for i in p['instances'] if i['pid']))"; }
running() { st "p=[p for p in s['programs'] if p['name']=='$1']; sys.exit(0 if p and all(i['state']=='RUNNING' and i['pid'] for i in p[0]['instances']) else 1)"; }
zdt_502() { st "print(sum((p.get('requests') or {}).get('failed', 0) for p in s['programs']))"; }

# --- load --------------------------------------------------------------------
# load_start PORT [LABEL] [EXTRA zdt-load flags...]: CLIENTS keep-alive clients.
load_start() {
  local port=$1 label=${2:-load}; shift; [ $# -gt 0 ] && shift
  "$BIN/zdt-load" "http://127.0.0.1:$port/?sleep=5" -d 120 -c "$CLIENTS" --label "$ROW-$label" "$@" \
    >"$D/$label.txt" 2>&1 & LOAD=$!; PIDS+=("$LOAD")
  sleep 1 # the clients connect and settle on their keep-alive connections
}
# load_stop [LABEL]: ends the load; REQ, FAILED, BROKEN (connect+broken+timeout).
load_stop() {
  local label=${1:-load} l
  kill -INT "$LOAD" 2>/dev/null; wait "$LOAD" 2>/dev/null
  l=$(grep '^LOAD ' "$D/$label.txt")
  REQ=$(( ${REQ:-0} + $(kv requests "$l") )); FAILED=$(( ${FAILED:-0} + $(kv failed "$l") ))
  BROKEN=$(( ${BROKEN:-0} + $(kv connect "$l") + $(kv broken "$l") + $(kv timeout "$l") ))
}
# hold_load: lets the load run LOAD_S seconds in all.
hold_load() { sleep "$LOAD_S"; }

# --- the table ---------------------------------------------------------------
VERDICT=PASS
printf '| fault | what was done | requests | failed | expected | seen | verdict |\n|---|---|---|---|---|---|---|\n' >"$OUT/table.md"
# row DONE EXPECTED SEEN OK: one table row (OK 1 = as expected).
row() {
  local v=PASS; [ "$4" = 1 ] || { v=FAIL; VERDICT=FAIL; }
  printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$ROW" "$1" "${REQ:-0}" "${FAILED:-0}" "$2" "$3" "$v" | tee -a "$OUT/table.md"
  unset REQ FAILED BROKEN
}

# --- rows --------------------------------------------------------------------
r_reload_change() {
  setup reload-change; local p ok=1 i; p=$(free_port)
  { header; demo web "$p" proxy "instances = 2"; } >"$CONF"
  zdt_start && wait_until 10 running web || return
  load_start "$p"
  for i in 1 2 3; do
    { header; demo web "$p" proxy "instances = 2
environment = { RELEASE = \"$i\" }"; } >"$CONF"
    ctl reload >>"$D/ctl.txt" 2>&1 || ok=0
  done
  hold_load; load_stop
  local gen; gen=$(st "print([p['generation'] for p in s['programs']][0])")
  zdt_stop
  [ "$ok" = 1 ] && [ "$FAILED" = 0 ] && [ "$gen" = 4 ] && v=1 || v=0
  row "3 reloads changing \`environment\`, 2 instances" "0 failed, generation 4" \
    "$FAILED failed, generation $gen, reloads $([ $ok = 1 ] && echo ok || echo FAILED)" $v
}

r_rename() {
  setup rename; local p; p=$(free_port)
  { header; demo web "$p" proxy "instances = 2"; } >"$CONF"
  zdt_start && wait_until 10 running web || return
  load_start "$p"
  { header; demo site "$p" proxy "instances = 2"; } >"$CONF"
  local out rc; out=$(ctl reload 2>&1); rc=$?
  hold_load; load_stop
  local names; names=$(st "print(','.join(p['name'] for p in s['programs']))")
  zdt_stop
  [ "$rc" = 0 ] && [ "$FAILED" = 0 ] && [ "$names" = site ] && [[ $out == *renamed* ]] && v=1 || v=0
  row "[program.web] renamed [program.site], same \`listen\`" "0 failed, reload says renamed" \
    "$FAILED failed, reload exit $rc ($(grep -o 'removed web[^)]*)' <<<"$out" | head -1)), programs: $names" $v
}

r_listen_in_use() {
  setup listen-in-use; local p p2; p=$(free_port); p2=$(free_port)
  PORT=$p2 "$BIN/zdt-demo" >/dev/null 2>&1 & PIDS+=($!); local squat=$!
  wait_until 10 serves "$p2" || return
  { header; demo web "$p" proxy "instances = 2"; } >"$CONF"
  zdt_start && wait_until 10 running web || return
  local before; before=$(pids_of web)
  load_start "$p"
  { header; demo web "$p2" proxy "instances = 2"; } >"$CONF"
  local out rc; out=$(ctl reload 2>&1); rc=$?
  hold_load; load_stop
  local after; after=$(pids_of web)
  serves "$p"; local old_serves=$?
  zdt_stop; kill "$squat"
  [ "$rc" = 1 ] && [[ $out == *"nothing was changed"* ]] && [ "$before" = "$after" ] && [ "$old_serves" = 0 ] \
    && [ "$FAILED" = 0 ] && v=1 || v=0
  row "reload moving \`listen\` to a port another process holds" "rejected (exit 1), same pids, old port serves, 0 failed" \
    "reload exit $rc, pids $([ "$before" = "$after" ] && echo same || echo CHANGED), old port $([ $old_serves = 0 ] && echo serves || echo DEAD), $FAILED failed" $v
}

r_empty_config() {
  setup empty-config; local p; p=$(free_port)
  { header; demo web "$p" proxy "instances = 2"; } >"$CONF"
  zdt_start && wait_until 10 running web || return
  local before; before=$(pids_of web)
  load_start "$p"
  header >"$CONF"
  local out rc; out=$(ctl reload 2>&1); rc=$?
  kill -HUP "$ZDT"
  wait_until 10 grep -q "has no programs" "$D/zdt.log"; local hup=$?
  hold_load; load_stop
  local after; after=$(pids_of web)
  zdt_stop
  [ "$rc" = 1 ] && [[ $out == *--allow-empty* ]] && [ "$hup" = 0 ] && [ "$before" = "$after" ] && [ "$FAILED" = 0 ] && v=1 || v=0
  row "config truncated to \`[supervisor]\`: \`zdtctl reload\`, then SIGHUP" "both refused (--allow-empty named), same pids, 0 failed" \
    "reload exit $rc, SIGHUP $([ $hup = 0 ] && echo refused || echo 'NOT refused'), pids $([ "$before" = "$after" ] && echo same || echo CHANGED), $FAILED failed" $v
}

r_failed_reload() {
  setup failed-reload; local p; p=$(free_port)
  { header; demo web "$p" proxy "instances = 2"; } >"$CONF"
  zdt_start && wait_until 10 running web || return
  local before; before=$(pids_of web)
  load_start "$p"
  { header; demo web "$p" proxy "instances = 2
ready_timeout = \"2s\"" --start-delay 600000; } >"$CONF"
  local out rc; out=$(ctl reload 2>&1); rc=$?
  hold_load; load_stop
  local after; after=$(pids_of web)
  # The old worker crashes: it must come back with the old command.
  local old=${before%% *}; kill -9 "$old"
  respawned() { local n; n=$(pids_of web); [[ " $n " != *" $old "* ]] && [ "$(wc -w <<<"$n")" = 2 ] && running web; }
  wait_until 20 respawned; local rs=$?
  local new; new=$(pids_of web); new=${new%% *}
  local cmd; cmd=$(tr '\0' ' ' <"/proc/$new/cmdline" 2>/dev/null)
  serves "$p"; local sv=$?
  zdt_stop
  [ "$rc" = 1 ] && [[ $out == *"previous settings"* ]] && [ "$before" = "$after" ] && [ "$FAILED" = 0 ] \
    && [ "$rs" = 0 ] && [[ $cmd != *start-delay* ]] && [ "$sv" = 0 ] && v=1 || v=0
  row "reload to a command that never listens (ready_timeout 2s); then kill -9 of an old worker" \
    "reload fails (exit 1), old pids serve, 0 failed; respawn runs the old command" \
    "reload exit $rc, pids $([ "$before" = "$after" ] && echo same || echo CHANGED), $FAILED failed; respawn $([ $rs = 0 ] && echo RUNNING || echo 'NOT running') with $([[ $cmd == *start-delay* ]] && echo 'the REJECTED' || echo 'the old') command" $v
}

r_kill_worker() {
  setup kill-worker; local p; p=$(free_port)
  { header; demo web "$p" proxy "instances = 2"; } >"$CONF"
  zdt_start && wait_until 10 running web || return
  local z0; z0=$(zdt_502)
  load_start "$p"
  local k pid kills=0
  for k in 1 2 3; do
    pid=$(pids_of web); pid=${pid%% *}
    [ $((k % 2)) = 0 ] && { pid=$(pids_of web); pid=${pid##* }; }
    kill -9 "$pid" && kills=$((kills + 1))
    respawned() { local n; n=$(pids_of web); [[ " $n " != *" $pid "* ]] && [ "$(wc -w <<<"$n")" = 2 ] && running web; }
    wait_until 20 respawned
    sleep 1
  done
  load_stop
  local z; z=$(( $(zdt_502) - z0 ))
  zdt_stop
  [ "$kills" = 3 ] && [ "$FAILED" = "$z" ] && [ "$BROKEN" = 0 ] && [ "$FAILED" -le $((3 * CLIENTS)) ] && v=1 || v=0
  row "kill -9 of a worker (of 2) 3 times, 1 s apart" "failed = requests in flight on the killed worker (zdt's 502 count), nothing else" \
    "$kills kills, each respawned; $FAILED failed, zdt answered $z 502s for requests in flight on the killed workers, $BROKEN connect/broken/timeout" $v
}

r_crash_loop() {
  setup crash-loop; local p p2; p=$(free_port); p2=$(free_port)
  { header; demo web "$p" proxy "instances = 2"
    demo flaky "$p2" proxy 'startsecs = "1s"
startretries = 3' --crash-after 300; } >"$CONF"
  zdt_start && wait_until 10 running web || return
  load_start "$p"
  local t0; t0=$(now_ms)
  fatal() { st "i=[i for p in s['programs'] if p['name']=='flaky' for i in p['instances']][0]; sys.exit(0 if i['state']=='FATAL' else 1)"; }
  wait_until 40 fatal; local f=$?
  local took=$(( ($(now_ms) - t0) / 100 ))
  local restarts; restarts=$(st "print([i['restarts'] for p in s['programs'] if p['name']=='flaky' for i in p['instances']][0])")
  local code; code=$(curl -s -m 10 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$p2/")
  load_stop
  zdt_stop
  [ "$f" = 0 ] && [ "$restarts" = 3 ] && [ "$code" = 503 ] && [ "$FAILED" = 0 ] && v=1 || v=0
  row "a program whose worker crashes 300 ms after ready (startsecs 1s, startretries 3); load on another program" \
    "FATAL after 3 restarts, its port answers 503; the other program 0 failed" \
    "$([ $f = 0 ] && echo FATAL || echo 'NOT FATAL') after $restarts restarts in $((took / 10)).$((took % 10)) s, its port answers $code; $FAILED failed" $v
}

r_fd_limit() {
  setup fd-limit; local p; p=$(free_port)
  { header; demo web "$p" proxy "instances = 2"; } >"$CONF"
  zdt_start prlimit --nofile=512:512 && wait_until 10 running web || return
  load_start "$p" load --probe-ms 0
  # IDLE clients that connect and send nothing, held until the go file appears.
  "$PY" - "$p" "$IDLE" "$D/idle-go" <<'PY' >"$D/idle.txt" 2>&1 & local idle=$!; PIDS+=("$idle")
import os, socket, sys, time
port, n, go = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
socks = []
for _ in range(n):
    s = socket.socket(); s.setblocking(False)
    try: s.connect(("127.0.0.1", port))
    except BlockingIOError: pass
    socks.append(s)
print("opened", len(socks), flush=True)
end = time.time() + 120
while not os.path.exists(go) and time.time() < end: time.sleep(0.1)
PY
  fds_at_least() { [ "$(find "/proc/$ZDT/fd" -mindepth 1 -maxdepth 1 | wc -l)" -ge 200 ]; }
  wait_until 20 fds_at_least
  local t0 rc; t0=$(now_ms); timeout 5 "$BIN/zdtctl" -c "$CONF" status >/dev/null 2>&1; rc=$?
  local ms=$(( $(now_ms) - t0 )) fds; fds=$(find "/proc/$ZDT/fd" -mindepth 1 -maxdepth 1 | wc -l)
  hold_load; load_stop
  local old; old=$(pids_of web); old=${old%% *}; kill -9 "$old"
  respawned() { local n; n=$(pids_of web); [[ " $n " != *" $old "* ]] && [ "$(wc -w <<<"$n")" = 2 ] && running web; }
  wait_until 30 respawned; local rs=$?
  touch "$D/idle-go"; wait "$idle"
  wait_until 10 serves "$p"; local sv=$?
  zdt_stop
  [ "$rc" = 0 ] && [ "$rs" = 0 ] && [ "$sv" = 0 ] && [ "$FAILED" = 0 ] && v=1 || v=0
  row "zdt under \`prlimit --nofile=512:512\`, $IDLE idle clients (zdt at $fds fds); kill -9 of a worker" \
    "status answers within 5 s, open clients 0 failed, worker respawns RUNNING, port serves after" \
    "status exit $rc in $ms ms, $FAILED failed, respawn $([ $rs = 0 ] && echo RUNNING || echo 'NOT running'), serves after: $([ $sv = 0 ] && echo yes || echo NO)" $v
}

r_stalled_log() {
  setup stalled-log; local p; p=$(free_port)
  mkfifo "$D/noisy.fifo"
  sleep 600 <>"$D/noisy.fifo" & local reader=$!; PIDS+=("$reader")
  { header; demo web "$p" proxy "instances = 2"
    printf '[program.noisy]\ncommand = ["sh", "-c", "while :; do echo stalled log reader line padding padding padding; done"]\n'
    printf 'stdout_logfile = "%s/noisy.fifo"\nstartsecs = "0s"\n\n' "$D"; } >"$CONF"
  zdt_start && wait_until 10 running web || return
  load_start "$p"
  sleep 2 # the FIFO's 64 KiB fill in a few ms; the writer keeps writing
  local rc1 rc2 rs old
  timeout 5 "$BIN/zdtctl" -c "$CONF" status >/dev/null 2>&1; rc1=$?
  timeout 30 "$BIN/zdtctl" -c "$CONF" restart web >"$D/restart.txt" 2>&1; rc2=$?
  old=$(timeout 5 "$BIN/zdtctl" -c "$CONF" pid noisy 2>/dev/null | head -1)
  if [ -n "$old" ]; then
    kill -9 "$old"
    respawned() { local n; n=$(timeout 5 "$BIN/zdtctl" -c "$CONF" pid noisy 2>/dev/null | head -1); [ -n "$n" ] && [ "$n" != "$old" ]; }
    wait_until 20 respawned; rs=$?
  else rs=1; fi
  hold_load; load_stop
  local after; timeout 5 "$BIN/zdtctl" -c "$CONF" status >/dev/null 2>&1; after=$?
  zdt_stop; kill "$reader"
  [ "$rc1" = 0 ] && [ "$rc2" = 0 ] && [ "$rs" = 0 ] && [ "$after" = 0 ] && [ "$TERM_OK" = 0 ] && [ "$FAILED" = 0 ] && v=1 || v=0
  row "\`stdout_logfile\` a FIFO held open by a reader that never reads; the worker writes without end; kill -9 of it" \
    "status answers, \`restart web\` works, the writer respawns, zdt exits on SIGTERM, 0 failed" \
    "status exit $rc1, restart exit $rc2, respawn $([ $rs = 0 ] && echo yes || echo NO), status after exit $after (124 = hung), SIGTERM $([ "$TERM_OK" = 0 ] && echo obeyed || echo 'IGNORED (SIGKILLed after 15 s)'), $FAILED failed" $v
}

r_forged_ready() {
  setup forged-ready
  if [ "$(id -u)" != 0 ]; then REQ=0; FAILED=0; row "skipped: needs root to send as uid 65534" "" "" 1; return; fi
  local p; p=$(free_port)
  { header; demo web "$p" pass 'ready_timeout = "3s"' --unready-if "$D/bad-release"; } >"$CONF"
  zdt_start && wait_until 10 running web || return
  local old; old=$(pids_of web)
  load_start "$p"
  touch "$D/bad-release"
  ctl restart web >"$D/restart.txt" 2>&1 & local restart=$!
  candidate() { local n; n=$(pids_of web); n=${n//$old/}; n=${n// /}; [ -n "$n" ] && echo "$n"; }
  local cand="" sock="" sent=1
  wait_until 10 candidate >/dev/null && cand=$(candidate)
  [ -n "$cand" ] && sock=$(tr '\0' '\n' <"/proc/$cand/environ" 2>/dev/null | sed -n 's/^NOTIFY_SOCKET=//p')
  [ -n "$sock" ] && { NOTIFY_SOCKET=$sock setpriv --reuid=65534 --regid=65534 --clear-groups \
    "$BIN/zdt" notify READY=1 >>"$D/forged.txt" 2>&1; sent=$?; }
  wait "$restart"; local rc=$?
  hold_load; load_stop
  local now; now=$(pids_of web)
  grep -q "ignoring a notify message from a process outside" "$D/zdt.log"; local logged=$?
  zdt_stop
  [ "$sent" = 0 ] && [ "$rc" = 1 ] && grep -q "not ready within ready_timeout" "$D/restart.txt" && [ "$now" = "$old" ] \
    && [ "$logged" = 0 ] && [ "$FAILED" = 0 ] && v=1 || v=0
  row "pass mode: \`restart\` to a release that never sends READY=1; \`zdt notify READY=1\` sent to its socket as uid 65534" \
    "forged message ignored and logged; restart fails (exit 1), old pid serves, 0 failed" \
    "sent $([ $sent = 0 ] && echo ok || echo FAILED), $([ $logged = 0 ] && echo logged || echo 'NOT logged'), restart exit $rc, old pid $([ "$now" = "$old" ] && echo serves || echo REPLACED), $FAILED failed" $v
}

r_ignore_term() {
  setup ignore-term; local p; p=$(free_port)
  { header; demo web "$p" pass 'max_wait = "1500ms"' --ignore-term; } >"$CONF"
  zdt_start && wait_until 10 running web || return
  load_start "$p"
  local rc1 rc2
  ctl restart web >"$D/restart1.txt" 2>&1; rc1=$?
  ctl restart --strict web >"$D/restart2.txt" 2>&1; rc2=$?
  hold_load; load_stop
  local warned=1; grep -q "warning: web:0: gen 1 did not exit within max_wait" "$D/restart1.txt" && warned=0
  zdt_stop
  [ "$rc1" = 0 ] && [ "$warned" = 0 ] && [ "$rc2" = 1 ] && [ "$FAILED" -le $((2 * (CLIENTS + 1))) ] && v=1 || v=0
  row "pass mode: 2 restarts of a worker that ignores SIGTERM (max_wait 1.5s); the 2nd with --strict" \
    "old gen SIGKILLed at max_wait; restart exit 0 with a warning; --strict exit 1; failed <= $((CLIENTS + 1)) per kill (a request per client and the load's probe, on connections it held)" \
    "restart exit $rc1 $([ $warned = 0 ] && echo 'with the warning' || echo 'WITHOUT a warning'), --strict exit $rc2, $FAILED failed" $v
}

r_own_port() {
  setup own-port; local p own; p=$(free_port); own=$(free_port)
  { header
    printf '[program.web]\ncommand = %s\nlisten = ["tcp://127.0.0.1:%s"]\nready = { notify = true }\n\n' \
      "$(toml_argv env -u LISTEN_FDS -u LISTEN_PID "$BIN/zdt-demo" --port "$own")" "$p"; } >"$CONF"
  zdt_start && wait_until 10 running web && wait_until 10 serves "$own" || return
  load_start "$own"
  # A client of zdt's address: queued by the kernel, never accepted.
  "$PY" -c 'import socket,sys,time; s=socket.create_connection(("127.0.0.1",int(sys.argv[1]))); time.sleep(60)' "$p" &
  local waiting=$!; PIDS+=("$waiting")
  warned() { st "sys.exit(0 if s['programs'][0].get('socket_warning') else 1)"; }
  wait_until 30 warned; local w=$?
  local text; text=$(ctl status 2>&1)
  grep -q "waiting in the accept queue" "$D/zdt.log"; local logged=$?
  hold_load; load_stop
  kill "$waiting"; zdt_stop
  [ "$w" = 0 ] && [[ $text == *"web: warning: "* ]] && [ "$logged" = 0 ] && [ "$FAILED" = 0 ] && v=1 || v=0
  row "pass mode: the worker binds a port of its own (LISTEN_FDS removed); one client connects to zdt's address" \
    "socket warning in status and log; the worker's own port 0 failed" \
    "warning $([ $w = 0 ] && echo 'in status' || echo 'NOT in status')$([ $logged = 0 ] && echo ' and log' || echo ', NOT logged'), $FAILED failed" $v
}

r_orphan() {
  setup orphan; local p; p=$(free_port)
  { header
    printf '[program.web]\ncommand = ["sh", "-c", "sleep 300 & echo $! > %s/child.pid; exec %s"]\nlisten = ["tcp://127.0.0.1:%s"]\nready = { notify = true }\n\n' \
      "$D" "$BIN/zdt-demo" "$p"; } >"$CONF"
  zdt_start && wait_until 10 running web || return
  load_start "$p" before
  hold_load; load_stop before
  local worker child; worker=$(pids_of web); child=$(cat "$D/child.pid")
  kill -9 "$ZDT"; wait "$ZDT" 2>/dev/null
  gone() { ! kill -0 "$1" 2>/dev/null; }
  wait_until 10 gone "$worker"
  local left=1; kill -0 "$child" 2>/dev/null && left=0
  zdt_start && wait_until 10 running web
  wait_until 10 gone "$child"; local killed=$?
  wait_until 10 serves "$p"; local sv=$?
  load_start "$p" after
  hold_load; load_stop after
  grep -q "left by a previous zdt" "$D/zdt.log"; local logged=$?
  zdt_stop; kill -9 "$child" 2>/dev/null
  [ "$left" = 0 ] && [ "$killed" = 0 ] && [ "$sv" = 0 ] && [ "$logged" = 0 ] && [ "$FAILED" = 0 ] && v=1 || v=0
  row "pass worker \`sh -c 'sleep 300 & exec zdt-demo'\` (the child inherits the socket); kill -9 of zdt; zdt started again" \
    "the child outlives zdt, the next zdt kills it (logged), the port serves; 0 failed before the kill and after the start" \
    "child $([ $left = 0 ] && echo outlived || echo 'did not outlive') zdt, $([ $killed = 0 ] && echo killed || echo 'NOT killed') by the next one$([ $logged = 0 ] && echo ' (logged)'), port $([ $sv = 0 ] && echo serves || echo DEAD), $FAILED failed" $v
}

T0=$(date +%s)
IFS=',' read -r -a ROW_LIST <<<"$ROWS"
for r in "${ROW_LIST[@]}"; do
  declare -F "r_${r//-/_}" >/dev/null || { echo "unknown row $r (-l lists them)" >&2; exit 2; }
done
for r in "${ROW_LIST[@]}"; do
  unset REQ FAILED BROKEN
  if ! "r_${r//-/_}"; then
    [ -n "${ZDT:-}" ] && zdt_stop
    [ -n "${LOAD:-}" ] && kill "$LOAD" 2>/dev/null
    row "setup failed (see $D)" "" "" 0
  fi
  ZDT=""; LOAD=""
done
echo "FAULTS verdict=$VERDICT rows=${#ROW_LIST[@]} seconds=$(( $(date +%s) - T0 )) clients=$CLIENTS table=$OUT/table.md" | tee -a "$OUT/table.md"
[ "$VERDICT" = PASS ]

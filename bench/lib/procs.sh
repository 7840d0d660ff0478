# shellcheck shell=bash
# Processes a bench script starts, tracked as "pid:starttime" so that a pid
# reused by another process is never signalled. Sourced by bench/proxy.sh
# and bench/multihost.sh; they keep the list in PIDS.

# proc_fields PID: the fields of /proc/PID/stat after "(comm)", from state on.
proc_fields() { local s; s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1; echo "${s##*) }"; }
start_of() { local f; read -ra f < <(proc_fields "$1") || return 0; echo "${f[19]:-}"; }
alive() { # alive PID STARTTIME: the same process, not a zombie
  local f; read -ra f < <(proc_fields "$1") || return 1
  [ "${f[19]:-}" = "$2" ] && [ "${f[0]}" != Z ]
}
track() { PIDS+=("$1:$(start_of "$1")"); }
# stop_pid PID STARTTIME: TERM, up to 10 s to exit, then KILL.
stop_pid() {
  local i
  alive "$1" "$2" || { wait "$1" 2>/dev/null; return 0; }
  kill "$1" 2>/dev/null
  for ((i = 0; i < 100; i++)); do alive "$1" "$2" || break; sleep 0.1; done
  alive "$1" "$2" && kill -9 "$1" 2>/dev/null
  wait "$1" 2>/dev/null
  return 0
}

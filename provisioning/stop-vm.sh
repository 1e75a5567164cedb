#!/usr/bin/env bash
# stop-vm.sh - powers the VM off through QMP: ACPI first, forced quit after a timeout.
#
# Usage: stop-vm.sh QMP_SOCKET [TIMEOUT_S]
#
#   QMP_SOCKET  the VM's QMP socket (VM_QMP_SOCKET, default /var/lib/windows-vm/qmp.sock)
#   TIMEOUT_S   seconds the guest gets to power off after the ACPI power button
#               (default 300); then QEMU is told to quit, and killed with
#               SIGKILL if it is still there 15 s later.
#
# Env:
#   VM_PID_FILE               QEMU's pid file (default: qemu.pid beside the socket,
#                             where run-vm.sh has QEMU write it). Used to tell when
#                             QEMU has exited; without it the socket is watched.
#   STOP_VM_REQUIRE_GRACEFUL  1: a forced quit is an error (exit 3)
#   STOP_VM_PROGRESS_S        seconds between progress lines (default 30)
#
# Output: the outcome on stdout, one line:
#   "stop-vm: powered off gracefully after Ns"
#   "stop-vm: forced quit after timeout (Ns): the guest did not power off"
#   "stop-vm: forced quit: REASON" (QMP refused the power-down, or the socket
#     is missing while QEMU runs: then SIGTERM/SIGKILL by pid)
#   "stop-vm: already stopped (...)"
# progress and warnings on stderr.
# Exit: 0 when QEMU is gone (graceful, forced or already stopped); 3 when it
#   had to be forced and STOP_VM_REQUIRE_GRACEFUL=1; 1 when QEMU could not be
#   stopped at all; 2 on bad arguments. Idempotent: with no QEMU running it
#   only says so.
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

readonly PROG="stop-vm"
usage() {
  log "$*"
  log "usage: stop-vm.sh QMP_SOCKET [TIMEOUT_S]"
  exit 2
}

(($# >= 1 && $# <= 2)) || usage "expected 1 or 2 arguments, got $#"
sock=$1
timeout_s=${2:-300}
[[ -n $sock ]] || usage "QMP_SOCKET is empty"
[[ $timeout_s =~ ^[0-9]+$ ]] || usage "TIMEOUT_S='$timeout_s' is not a whole number of seconds"
timeout_s=$((10#$timeout_s))
progress_s=${STOP_VM_PROGRESS_S:-30}
[[ $progress_s =~ ^[1-9][0-9]*$ ]] || usage "STOP_VM_PROGRESS_S='$progress_s' is not a positive number"
pid_file=${VM_PID_FILE:-$(dirname -- "$sock")/qemu.pid}

# A write to a QMP client that has gone away must fail, not kill this script.
trap '' PIPE

qmp_usable || { log "needs socat or an nc with -U (install socat or netcat-openbsd)"; exit 1; }

pid=$(qemu_pid_of "$pid_file" || true)
# Is QEMU still there? With a pid, its process decides; without, the socket.
running() {
  if [[ -n $pid ]]; then alive "$pid"; else qmp_answers "$sock"; fi
}

if [[ ! -S $sock && -z $pid ]]; then
  say "already stopped (no QMP socket at $sock, no running QEMU in $pid_file)"
  exit 0
fi

start_ms=$(now_ms)
forced_reason=""
if [[ -S $sock ]]; then
  reply=$(qmp "$sock" '{"execute":"system_powerdown"}' || true)
  if [[ $(grep -c '"return"' <<<"$reply") -ge 2 ]]; then
    log "ACPI power-down sent through $sock${pid:+ (QEMU pid $pid)}; waiting up to ${timeout_s}s for the guest to power off"
  elif [[ -z $pid ]] && ! qmp_answers "$sock"; then
    say "already stopped (stale QMP socket $sock does not answer, no running QEMU in $pid_file)"
    exit 0
  else
    forced_reason="QMP system_powerdown was not accepted: ${reply:-no answer on $sock}"
  fi
else
  forced_reason="QEMU pid $pid is running but its QMP socket $sock is missing"
fi

# --- wait for a graceful power-off ---------------------------------------------------
if [[ -z $forced_reason ]]; then
  next_progress=$progress_s
  while running; do
    elapsed=$((($(now_ms) - start_ms) / 1000))
    if ((elapsed >= timeout_s)); then
      forced_reason="the guest did not power off within ${timeout_s}s"
      break
    fi
    if ((elapsed >= next_progress)); then
      log "still waiting for the guest to power off (${elapsed}s/${timeout_s}s)"
      next_progress=$((next_progress + progress_s))
    fi
    sleep 1
  done
  if [[ -z $forced_reason ]]; then
    say "powered off gracefully after $((($(now_ms) - start_ms) / 1000))s"
    exit 0
  fi
fi

# --- force ------------------------------------------------------------------------------
log "WARNING: $forced_reason; forcing QEMU to quit"
quit_reply=""
if [[ -S $sock ]]; then quit_reply=$(qmp "$sock" '{"execute":"quit"}' || true); fi
if [[ $(grep -c '"return"' <<<"$quit_reply") -lt 2 && -n $pid ]]; then
  log "QMP quit was not accepted: sending SIGTERM to QEMU pid $pid"
  kill -TERM "$pid" 2>/dev/null || true
fi
for _ in $(seq 1 15); do
  running || break
  sleep 1
done
if running; then
  if [[ -n $pid ]]; then
    log "WARNING: QEMU pid $pid still alive 15s after quit: sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 1 10); do
      alive "$pid" || break
      sleep 1
    done
  fi
  if running; then
    log "could not stop QEMU${pid:+ (pid $pid)}: it is still running"
    exit 1
  fi
fi
if [[ $forced_reason == "the guest did not power off"* ]]; then
  say "forced quit after timeout (${timeout_s}s): the guest did not power off"
else
  say "forced quit: $forced_reason"
fi
if [[ ${STOP_VM_REQUIRE_GRACEFUL:-0} == 1 ]]; then
  log "STOP_VM_REQUIRE_GRACEFUL=1 and the VM had to be forced off"
  exit 3
fi
exit 0

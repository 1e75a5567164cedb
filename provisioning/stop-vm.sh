#!/usr/bin/env bash
# stop-vm.sh - powers the VM off through QMP: ACPI first, forced quit after a timeout.
#
# Usage: stop-vm.sh QMP_SOCKET [TIMEOUT_S]
#
#   QMP_SOCKET  the VM's QMP socket (VM_QMP_SOCKET, default /var/lib/windows-vm/qmp.sock)
#   TIMEOUT_S   seconds the guest gets to power off after the ACPI power button
#               (default 600: the pipeline's GUEST_SHUTDOWN_TIMEOUT_S, which is
#               also the image unit's TimeoutStopSec); then QEMU is told to quit, and killed with
#               SIGKILL if it is still there 15 s later.
#
# Env:
#   VM_PID_FILE               QEMU's pid file (default: qemu.pid beside the socket,
#                             where run-vm.sh has QEMU write it).
#   VM_DISK                   the VM's disk (default: disk.qcow2 beside the socket)
#   STOP_VM_REQUIRE_GRACEFUL  1: a forced quit is an error (exit 3)
#   STOP_VM_PROGRESS_S        seconds between progress lines (default 30)
#
# Which QEMU is this VM's: the process in the pid file, or (pid file missing or
# stale) a process found in /proc, but only a qemu-system-* whose command line
# names QMP_SOCKET (as a chardev or -qmp socket path) or VM_DISK (as a drive
# file). A pid file naming another process, or another VM's QEMU, is ignored
# (with a warning), and no process is ever signalled unless its command line
# was checked just before. Without such a process, the socket is watched.
#
# Output: the outcome on stdout, one line:
#   "stop-vm: powered off gracefully after Ns"
#   "stop-vm: forced quit after timeout (Ns): the guest did not power off"
#   "stop-vm: forced quit: REASON" (QMP answers but refused the power-down:
#     QMP quit, then SIGTERM/SIGKILL to the checked pid)
#   "stop-vm: already stopped (...)" only when no QEMU of this VM runs
# progress and warnings on stderr.
# Exit: 0 when QEMU is gone (graceful, forced or already stopped); 3 when it
#   had to be forced and STOP_VM_REQUIRE_GRACEFUL=1; 1 when QEMU could not be
#   stopped: it would not die, or a QEMU of this VM runs but its QMP socket is
#   missing or does not answer (it is then left running, named with its pid:
#   a VM cannot be powered down without QMP, so nothing is killed blind), or
#   several QEMUs name this VM; 2 on bad arguments. Idempotent: with no QEMU
#   of this VM running it only says so.
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
timeout_s=${2:-600}
[[ -n $sock ]] || usage "QMP_SOCKET is empty"
[[ $timeout_s =~ ^[0-9]+$ ]] || usage "TIMEOUT_S='$timeout_s' is not a whole number of seconds"
timeout_s=$((10#$timeout_s))
progress_s=${STOP_VM_PROGRESS_S:-30}
[[ $progress_s =~ ^[1-9][0-9]*$ ]] || usage "STOP_VM_PROGRESS_S='$progress_s' is not a positive number"
sock_dir=$(dirname -- "$sock")
pid_file=${VM_PID_FILE:-$sock_dir/qemu.pid}
disk=${VM_DISK:-$sock_dir/disk.qcow2}

# A write to a QMP client that has gone away must fail, not kill this script.
trap '' PIPE

qmp_usable || { log "needs socat or an nc with -U (install socat or netcat-openbsd)"; exit 1; }

# --- which QEMU is this VM's? --------------------------------------------------------
pid=
if p=$(qemu_pid_of "$pid_file"); then
  if qemu_names_vm "$p" "$sock" "$disk"; then
    pid=$p
  else
    log "warning: $pid_file names QEMU pid $p, whose command line names neither $sock nor $disk: not this VM's QEMU, left alone"
  fi
fi
if [[ -z $pid ]]; then
  found=()
  while IFS= read -r p; do found+=("$p"); done < <(qemu_pids_of_vm "$sock" "$disk")
  if ((${#found[@]} > 1)); then
    log "error: ${#found[@]} QEMU processes name $sock or $disk (pids ${found[*]}); stopping none: stop them by hand"
    exit 1
  fi
  if ((${#found[@]} == 1)); then
    pid=${found[0]}
    log "QEMU pid $pid of this VM found by its command line (no usable pid in $pid_file)"
  fi
fi

# This VM's QEMU is still there: the checked pid, or (none) the socket answers.
running() {
  if [[ -n $pid ]]; then qemu_names_vm "$pid" "$sock" "$disk"; else qmp_answers "$sock"; fi
}

# Sends SIG to the pid, checked again just before (a pid can be reused).
signal_qemu() { # SIG
  if [[ -n $pid ]] && qemu_names_vm "$pid" "$sock" "$disk"; then
    kill "-$1" "$pid" 2>/dev/null || true
  fi
}

if [[ -z $pid ]]; then
  if [[ ! -e $sock ]]; then
    say "already stopped (no QMP socket at $sock, no QEMU of this VM running)"
    exit 0
  fi
  if ! qmp_answers "$sock"; then
    say "already stopped (stale QMP socket $sock does not answer, no QEMU of this VM running)"
    exit 0
  fi
elif ! running; then
  say "already stopped (QEMU pid $pid has just exited)"
  exit 0
elif [[ ! -S $sock ]]; then
  log "error: QEMU pid $pid of this VM is running but its QMP socket $sock is missing: it was not stopped (no ACPI power-down without QMP). Look at the VM (serial log, VNC), then stop it by hand: kill $pid"
  exit 1
elif ! qmp_answers "$sock"; then
  log "error: QEMU pid $pid of this VM is running but does not answer on its QMP socket $sock (hung or stopped?): it was not stopped. Look at the VM (serial log, VNC), then stop it by hand: kill $pid"
  exit 1
fi

start_ms=$(now_ms)
forced_reason=""
reply=$(qmp "$sock" '{"execute":"system_powerdown"}' || true)
if [[ $(grep -c '"return"' <<<"$reply") -ge 2 ]]; then
  log "ACPI power-down sent through $sock${pid:+ (QEMU pid $pid)}; waiting up to ${timeout_s}s for the guest to power off"
elif ! running; then
  say "powered off gracefully after $((($(now_ms) - start_ms) / 1000))s"
  exit 0
else
  forced_reason="QMP system_powerdown was not accepted: $(printf '%s' "${reply:-no answer on $sock}" | tr '\n' ' ' | cut -c1-300)"
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
  signal_qemu TERM
fi
for _ in $(seq 1 15); do
  running || break
  sleep 1
done
if running; then
  if [[ -n $pid ]]; then
    log "WARNING: QEMU pid $pid still alive 15s after quit: sending SIGKILL"
    signal_qemu KILL
    for _ in $(seq 1 10); do
      running || break
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

#!/usr/bin/env bash
# wait-for-guest.sh - waits until the guest's SSH server answers through the forwarded port.
#
# Usage: wait-for-guest.sh HOST PORT TIMEOUT_S
#
#   HOST PORT   where the guest's SSH is reached (127.0.0.1 and VM_SSH_PORT on the host)
#   TIMEOUT_S   seconds to wait at most
#
# Also runs on the operator's machine to wait for the EC2 host's SSH: it needs
# only bash (3.2 or later) with /dev/tcp, and timeout, gtimeout or perl.
#
# Success means an SSH banner ("SSH-2.0-...") was read, not merely a TCP
# connect: QEMU's hostfwd accepts connections long before the guest listens.
#
# Env (all optional):
#   SERIAL_LOG               the VM's serial log: its last 40 lines are shown on failure
#   VM_PID_FILE              QEMU's pid file: when that process exits, fail at once
#   WAIT_FOR_GUEST_PROGRESS_S seconds between progress lines (default 20)
#   WAIT_GUEST_QMP_SOCKET    the VM's QMP socket: on a timeout, a screenshot of
#                            the VM's screen is saved (vm-screenshot.sh, beside
#                            this script) and its path printed
#   WAIT_GUEST_SCREEN_DIR    where that screenshot goes (default: screens/ beside
#                            the socket), as failure-<UTC time>-wait-for-guest.png
#   WAIT_GUEST_FETCH_HINT    how to fetch it, <path> standing for its path, e.g.
#                            "scp ubuntu@1.2.3.4:<path> ." (printed filled in)
#
# Output: the banner line on stdout on success; progress and errors on stderr,
# and on a timeout with WAIT_GUEST_QMP_SOCKET set:
#   wait-for-guest: screenshot: <path>
#   wait-for-guest: fetch it: <hint with the path>   (with WAIT_GUEST_FETCH_HINT)
# or "wait-for-guest: no screenshot: <why>" (never changes the exit code).
# Exit: 0 banner read; 1 timeout; 3 the VM (QEMU) exited or is not running;
#   2 bad arguments.
set -euo pipefail
# Found without dirname: this also runs on an operator's machine with few tools.
lib_dir=${BASH_SOURCE[0]%/*}
[[ $lib_dir != "${BASH_SOURCE[0]}" ]] || lib_dir=.
# shellcheck source=SCRIPTDIR/lib.sh
source "$lib_dir/lib.sh"

readonly PROG="wait-for-guest"
usage() {
  log "$*"
  log "usage: wait-for-guest.sh HOST PORT TIMEOUT_S"
  exit 2
}

(($# == 3)) || usage "expected 3 arguments, got $#"
host=$1 port=$2 timeout_s=$3
[[ -n $host && $host != *[[:space:]/]* ]] || usage "HOST='$host' is not a host name or address"
if [[ ! $port =~ ^[0-9]+$ ]] || ((10#$port < 1 || 10#$port > 65535)); then usage "PORT='$port' is not a TCP port"; fi
[[ $timeout_s =~ ^[0-9]+$ ]] || usage "TIMEOUT_S='$timeout_s' is not a whole number of seconds"
port=$((10#$port))
timeout_s=$((10#$timeout_s))
progress_s=${WAIT_FOR_GUEST_PROGRESS_S:-20}
[[ $progress_s =~ ^[1-9][0-9]*$ ]] || usage "WAIT_FOR_GUEST_PROGRESS_S='$progress_s' is not a positive number"
serial_log=${SERIAL_LOG:-}
pid_file=${VM_PID_FILE:-}
qmp_socket=${WAIT_GUEST_QMP_SOCKET:-}
screen_dir=${WAIT_GUEST_SCREEN_DIR:-}
[[ -z $qmp_socket || -n $screen_dir ]] || screen_dir="${qmp_socket%/*}/screens"
[[ $screen_dir == */* || -z $screen_dir ]] || screen_dir="./$screen_dir"

# screenshot: a PNG of the VM's screen when the QMP socket is known; prints
# where it is (and how to fetch it) on stderr. Never fails the script.
screenshot() {
  [[ -n $qmp_socket ]] || return 0
  local shooter="$lib_dir/vm-screenshot.sh" out rc=0 stamp
  if [[ ! -f $shooter ]]; then
    log "no screenshot: vm-screenshot.sh is missing beside this script"
    return 0
  fi
  stamp=$(date -u +%Y%m%dT%H%M%SZ)
  out=$(SCREENSHOT_FETCH_HINT=${WAIT_GUEST_FETCH_HINT:-} \
    bash "$shooter" "$qmp_socket" "$screen_dir/failure-$stamp-wait-for-guest.png" 2>&1) || rc=$?
  if ((rc == 0)); then
    printf '%s\n' "$out" | grep -E '^(screenshot|fetch it): ' | while IFS= read -r line; do log "$line"; done
  else
    log "no screenshot: $(printf '%s' "$out" | tail -n 1 | sed 's/^vm-screenshot: error: //')"
  fi
}

serial_tail() {
  [[ -n $serial_log ]] || return 0
  if [[ ! -s $serial_log ]]; then
    log "serial log $serial_log is empty or missing"
    return 0
  fi
  log "last 40 lines of the serial log $serial_log:"
  # Firmware output carries terminal escapes and carriage returns: drop them.
  clean_log <"$serial_log" | tail -n 40 | sed 's/^/  | /' >&2 || true
}

start=$SECONDS
qemu_pid=""
if [[ -n $pid_file ]]; then
  # QEMU writes its pid file as it starts; give a just-started VM a moment.
  for _ in $(seq 1 10); do
    [[ -s $pid_file ]] && break
    sleep 0.5
  done
  qemu_pid=$(tr -dc '0-9' 2>/dev/null <"$pid_file" || true)
  if [[ -z $qemu_pid ]] || ! alive "$qemu_pid"; then
    log "the VM is not running: no live QEMU process in VM_PID_FILE=$pid_file"
    serial_tail
    [[ -z $qmp_socket ]] || log "no screenshot: the VM (QEMU) is not running"
    exit 3
  fi
fi

# run_bounded SECONDS CMD...: runs CMD, killed after SECONDS. This script also
# runs on the operator's machine (waiting for the EC2 host's own SSH), where
# GNU timeout may be missing (macOS): fall back to gtimeout, then perl's alarm.
run_bounded() {
  local secs=$1
  shift
  if command -v timeout >/dev/null 2>&1; then
    timeout "$secs" "$@"
  elif command -v gtimeout >/dev/null 2>&1; then
    gtimeout "$secs" "$@"
  elif command -v perl >/dev/null 2>&1; then
    perl -e 'alarm shift @ARGV; exec @ARGV or exit 127' "$secs" "$@"
  else
    "$@" # read -t still bounds the wait for a banner; only a connect can take longer
  fi
}

# read_banner SECONDS: prints the first line the server sends.
# Returns 1 when the connection was refused, 2 when it connected but no line
# came, 3 when the connect itself did not complete in time.
# shellcheck disable=SC2016 # expanded by the inner bash
read_banner() {
  local out rc=0
  out=$(run_bounded "$1" bash -c '
    exec 3<>"/dev/tcp/$0/$1" || exit 11
    printf "+"
    IFS= read -r -t "$2" line <&3 || [[ -n $line ]] || exit 12
    printf "%s" "$line"
  ' "$host" "$port" "$(($1 > 1 ? $1 - 1 : 1))" 2>/dev/null) || rc=$?
  if ((rc == 0)); then
    out=${out#+}
    printf '%s' "${out%$'\r'}"
  elif ((rc == 11)); then
    return 1
  elif [[ $out == +* ]]; then
    return 2
  else
    return 3
  fi
}

# waited: whole seconds surely gone since the start. SECONDS counts the clock's whole-second
# ticks, so SECONDS - start can be up to a second more than the time that passed; one less
# keeps a timeout from ending early (it ends up to two seconds late instead).
waited() { echo $((SECONDS - start > 0 ? SECONDS - start - 1 : 0)); }

log "waiting up to ${timeout_s}s for an SSH banner on $host:$port"
next_progress=$progress_s
attempts=0
last=""
while :; do
  elapsed=$(waited)
  remaining=$((timeout_s - elapsed))
  if ((remaining > 0)); then
    attempts=$((attempts + 1))
    rc=0
    banner=$(read_banner "$((remaining < 5 ? remaining : 5))") || rc=$?
    if [[ $rc == 0 && $banner == SSH-* ]]; then
      log "guest SSH answered on $host:$port after $((SECONDS - start))s"
      printf '%s\n' "$banner"
      exit 0
    fi
    case $rc in
      0) last="got '${banner:0:60}' instead of an SSH banner" ;;
      1) last="connection refused" ;;
      2) last="connected, but no SSH banner came" ;;
      *) last="no answer to the TCP connect" ;;
    esac
  fi
  if [[ -n $qemu_pid ]] && ! alive "$qemu_pid"; then
    log "the VM exited (QEMU pid $qemu_pid is gone) after $((SECONDS - start))s, before SSH answered on $host:$port"
    serial_tail
    [[ -z $qmp_socket ]] || log "no screenshot: the VM (QEMU) is not running"
    exit 3
  fi
  elapsed=$(waited)
  if ((elapsed >= timeout_s)); then
    log "timed out after ${timeout_s}s waiting for an SSH banner on $host:$port ($attempts attempts, last: ${last:-none})"
    serial_tail
    screenshot
    exit 1
  fi
  if ((elapsed >= next_progress)); then
    log "still waiting for SSH on $host:$port (${elapsed}s/${timeout_s}s, $last)"
    next_progress=$((next_progress + progress_s))
  fi
  remaining=$((timeout_s - elapsed))
  sleep "$((remaining < 2 ? remaining : 2))"
done

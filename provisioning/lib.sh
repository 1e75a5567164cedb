#!/usr/bin/env bash
# lib.sh - helpers shared by the host scripts; sourced, never run.
#
# Usage (from a script in this folder):
#   # shellcheck source=provisioning/lib.sh
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Defines:
#   log MSG / say MSG  MSG prefixed "$PROG: " on stderr / stdout (the caller
#                      sets PROG to its name)
#   die MSG            log "error: MSG", exit 1
#   mib BYTES          BYTES in MiB, rounded to the nearest
#   sha256_of [FILE]   SHA-256 hex digest of FILE (or stdin); status 1 when it
#                      cannot be read
#   clean_log          stdin to stdout: a serial or launcher log made readable
#                      (terminal escapes, carriage returns, control characters
#                      and blank lines dropped; lines cut at 240 characters)
#   now_ms, alive, qemu_pid_of, qmp_usable, qmp_answers, qmp: time, QEMU
#                      processes and QMP
#                      (described below)
# Needs PROG from the caller (for log, say, die); sets no shell options.

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
say() { printf '%s: %s\n' "$PROG" "$*"; }
die() {
  log "error: $*"
  exit 1
}

mib() { echo $((($1 + 524288) / 1048576)); }

# Portable sed (also BSD's, for wait-for-guest.sh on an operator's Mac).
clean_log() {
  tr '\r' '\n' | sed -e "s/$(printf '\033')\\[[0-9;=?]*[A-Za-z]//g" | tr -d '\000-\010\013-\037' |
    grep -v '^[[:space:]]*$' | cut -c1-240 || true
}

# OpenSSL uses the CPU's SHA instructions (x86 SHA-NI, ARMv8 crypto extensions)
# and is several times faster than coreutils sha256sum, which is the fallback.
sha256_of() {
  local out
  local -a f
  if command -v openssl >/dev/null; then
    f=()
    if (($# > 0)); then
      f=("$1")
      [[ $1 != -* ]] || f=("./$1")
    fi
    out=$(openssl dgst -sha256 -r "${f[@]}") || return 1
  else
    out=$(sha256sum "$@") || return 1
  fi
  out=${out%% *}
  [[ $out =~ ^[0-9a-f]{64}$ ]] || return 1
  printf '%s\n' "$out"
}

# --- QEMU processes and QMP (start-vm.sh, stop-vm.sh) -------------------------

# now_ms: wall-clock milliseconds (bash's $SECONDS ticks whole seconds, so a
# wait measured with it can end up to a second early).
now_ms() {
  local t=${EPOCHREALTIME/[.,]/}
  echo $((t / 1000))
}

# alive PID: the process exists and is not a zombie.
alive() {
  local state
  state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [[ -n $state && $state != Z && $state != X ]]
}

# qemu_pid_of PID_FILE: prints the pid in PID_FILE when that process is alive
# and is a QEMU; status 1 otherwise.
qemu_pid_of() {
  local pid
  [[ -r $1 ]] || return 1
  pid=$(tr -dc '0-9' 2>/dev/null <"$1" || true)
  [[ -n $pid ]] && alive "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q qemu-system || return 1
  printf '%s\n' "$pid"
}

# qmp_usable: socat, or an nc with -U (netcat-openbsd), is there to talk QMP.
qmp_usable() {
  command -v socat >/dev/null 2>&1 || { nc -h 2>&1 || true; } | grep -q -- '-U'
}

# qmp_answers SOCKET: QEMU greets on SOCKET.
qmp_answers() {
  [[ -S $1 ]] || return 1
  if command -v socat >/dev/null 2>&1; then
    timeout 3 socat -t 0.5 - "UNIX-CONNECT:$1" </dev/null 2>/dev/null | grep -q '"QMP"'
  else
    timeout 2 nc -U "$1" </dev/null 2>/dev/null | grep -q '"QMP"'
  fi
}

# qmp SOCKET CMD...: sends qmp_capabilities then each command (one JSON
# object each) on one connection; prints QEMU's replies, one per line.
qmp() {
  local sock=$1 input
  shift
  input=$(printf '%s\n' '{"execute":"qmp_capabilities"}' "$@")
  if command -v socat >/dev/null 2>&1; then
    printf '%s\n' "$input" | timeout 10 socat -t 1 - "UNIX-CONNECT:$sock" 2>/dev/null
  else
    printf '%s\n' "$input" | timeout 10 nc -q 1 -U "$sock" 2>/dev/null
  fi
}

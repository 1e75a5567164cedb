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
#   now_ms, alive, qemu_pid_of, qemu_names_vm, qemu_pids_of_vm, qmp_usable,
#                      qmp_answers, qmp: time, QEMU processes and QMP
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

# kill_tree PID [SIGNAL]: sends SIGNAL (TERM) to PID and to every process
# below it, the children first (pgrep -P: also on an operator's macOS). A
# command's own children would otherwise live on: a background function's
# holding its output open, an ssh's ProxyCommand (ssh -W) holding a port.
# Status 1 when PID was already gone.
kill_tree() {
  local kid
  for kid in $(pgrep -P "$1" 2>/dev/null); do kill_tree "$kid" "${2:-TERM}"; done
  kill "-${2:-TERM}" "$1" 2>/dev/null
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

# phys_path PATH [BASE_DIR]: PATH with its folder resolved to a physical
# absolute path (a relative PATH is taken from BASE_DIR, default $PWD); PATH
# made absolute but otherwise as given when its folder cannot be entered.
# Builtins only.
phys_path() {
  local p=$1 base=${2:-$PWD} d
  [[ $p == /* ]] || p=$base/$p
  d=${p%/*}
  [[ -n $d ]] || d=/
  if d=$(cd -P -- "$d" 2>/dev/null && pwd -P); then
    printf '%s/%s\n' "${d%/}" "${p##*/}"
  else
    printf '%s\n' "$p"
  fi
}

# qemu_names_vm PID SOCKET [DISK]: PID is a live QEMU (argv[0] qemu-system-*)
# whose command line names SOCKET as a socket path (-chardev socket,path=...,
# -qmp unix:...) or DISK as a drive file (file=...): QEMU's ",," escapes undone,
# relative paths taken from the process's working folder, folders resolved.
# Status 1 for any other process, a gone one, or one whose command line cannot
# be read. Needs no tool beyond those alive uses.
qemu_names_vm() {
  local pid=$1 sock=$2 disk=${3:-} arg piece v want_s want_d=
  local -a args pieces
  alive "$pid" || return 1
  { mapfile -d '' -t args <"/proc/$pid/cmdline"; } 2>/dev/null || return 1
  ((${#args[@]} > 0)) || return 1
  [[ ${args[0]##*/} == qemu-system-* ]] || return 1
  want_s=$(phys_path "$sock")
  [[ -z $disk ]] || want_d=$(phys_path "$disk")
  for arg in "${args[@]:1}"; do
    [[ $arg == *path=* || $arg == *file=* || $arg == unix:* ]] || continue
    arg=${arg//,,/$'\001'}
    IFS=, read -r -a pieces <<<"$arg"
    for piece in "${pieces[@]}"; do
      piece=${piece//$'\001'/,}
      case $piece in
        path=* | unix:*)
          v=${piece#path=}
          v=${v#unix:}
          [[ ($v == /* && $v == "$sock") || $(phys_path "$v" "/proc/$pid/cwd") == "$want_s" ]] && return 0
          ;;
        file=*)
          [[ -n $disk ]] || continue
          v=${piece#file=}
          [[ ($v == /* && $v == "$disk") || $(phys_path "$v" "/proc/$pid/cwd") == "$want_d" ]] && return 0
          ;;
      esac
    done
  done
  return 1
}

# qemu_pids_of_vm SOCKET [DISK]: the pids of live QEMUs that qemu_names_vm
# matches, one per line (none: no output, status 0).
qemu_pids_of_vm() {
  local d pid a0
  for d in /proc/[0-9]*; do
    pid=${d#/proc/}
    a0=
    { IFS= read -r -d '' a0 <"$d/cmdline"; } 2>/dev/null || [[ -n $a0 ]] || continue
    [[ ${a0##*/} == qemu-system-* ]] || continue
    if qemu_names_vm "$pid" "$@"; then printf '%s\n' "$pid"; fi
  done
  return 0
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

#!/usr/bin/env bash
# vm-screenshot.sh - saves a PNG of the VM's screen (the ramfb display) through QMP.
#
# Usage: vm-screenshot.sh QMP_SOCKET OUT.png
#
#   QMP_SOCKET  the VM's QMP socket (VM_QMP_SOCKET, /var/lib/windows-vm/qmp.sock)
#   OUT.png     where to write the screenshot; its folder is created when missing
#
# QEMU itself writes the image (QMP screendump with "format": "png", QEMU 7.1
# or later) under a temporary name beside OUT.png; it is checked (PNG
# signature and IHDR header) and renamed into place, so OUT.png is either the
# previous file or a complete new one. The file is made readable (0644): a
# screen shows no secret, and an operator fetches it with scp.
#
# Env:
#   SCREENSHOT_FETCH_HINT  how to fetch the file from where you sit, with <path>
#                          standing for its path, e.g. "scp ubuntu@1.2.3.4:<path> ."
#                          (without <path>, the path is appended)
#
# Needs socat, or netcat-openbsd's nc -U (lib.sh's QMP client), and timeout.
# Bounded: three QMP tries of at most 10 s each, then 6 s for the file.
#
# Output: on success, stdout is "screenshot: <absolute path>", then, when
# SCREENSHOT_FETCH_HINT is set, "fetch it: <the hint with the path filled in>";
# the image size on stderr.
# Exit: 0 written; 1 QEMU answered but no PNG came (screendump refused, not a
#   PNG, the folder not writable); 2 bad arguments; 3 no QMP socket, or QEMU not
#   answering on it.
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

readonly PROG="vm-screenshot"
usage() {
  log "$*"
  log "usage: vm-screenshot.sh QMP_SOCKET OUT.png"
  exit 2
}
fail() { # CODE MSG
  local code=$1
  shift
  log "error: $*"
  exit "$code"
}

(($# == 2)) || usage "expected 2 arguments, got $#"
sock=$1 out=$2
[[ -n $sock ]] || usage "QMP_SOCKET is empty"
[[ -n $out && $out != */ ]] || usage "OUT.png '$out' is not a file name"
# The path goes into a JSON string for QEMU: keep it plain.
[[ $out != *[\"\\[:cntrl:]]* ]] || usage "OUT.png '$out' holds a quote, backslash or control character"
qmp_usable || fail 1 "neither socat nor nc -U (netcat-openbsd) is installed: cannot talk QMP"
[[ -e $sock ]] || fail 3 "no QMP socket at $sock: is the VM running?"
[[ -S $sock ]] || fail 3 "$sock is not a socket"

dir=$(dirname -- "$out")
mkdir -p -- "$dir" || fail 1 "cannot create the folder $dir"
dir=$(cd -- "$dir" && pwd -P)
out="$dir/$(basename -- "$out")"
tmp="$dir/.$(basename -- "$out").tmp-$$"
private=""
cleanup() {
  rm -f -- "$tmp"
  [[ -z $private ]] || rm -rf -- "$private"
}
trap cleanup EXIT
# QEMU writes the file itself. When it runs the guest as another account
# (run-vm.sh VM_USER), it cannot write into this folder: it dumps into a
# private folder of its own, and the PNG is moved into place from there.
pid_file="$(dirname -- "$sock")/qemu.pid"
qemu_uid=""
if [[ -r $pid_file ]] && read -r qpid _ <"$pid_file" && [[ $qpid =~ ^[0-9]+$ ]]; then
  qemu_uid=$(awk '/^Uid:/ { print $2 }' "/proc/$qpid/status" 2>/dev/null || true)
fi
if [[ -n $qemu_uid && $qemu_uid != "$(id -u)" ]]; then
  private=$(mktemp -d "${TMPDIR:-/tmp}/vm-screenshot.XXXXXX") || fail 1 "cannot create a private folder for QEMU's screendump"
  chown "$qemu_uid" -- "$private" || fail 1 "cannot give $private to QEMU's account (uid $qemu_uid): run as root"
  tmp="$private/screen.png"
fi

# png_size FILE: "WIDTHxHEIGHT" when FILE starts with a PNG signature and an
# IHDR chunk; status 1 otherwise.
png_size() {
  local hex
  hex=$(od -An -v -tx1 -N 24 -- "$1" 2>/dev/null | tr -d ' \n') || return 1
  [[ ${hex:0:16} == 89504e470d0a1a0a && ${hex:24:8} == 49484452 ]] || return 1
  printf '%dx%d\n' "$((16#${hex:32:8}))" "$((16#${hex:40:8}))"
}

# A busy QEMU (TCG, a loaded host) may greet late: three tries.
for try in 1 2 3; do
  replies=$(qmp "$sock" "{\"execute\":\"screendump\",\"arguments\":{\"filename\":\"$tmp\",\"format\":\"png\"}}" || true)
  [[ $replies != *'"QMP"'* ]] || break
  ((try == 3)) || sleep 1
done
[[ $replies == *'"QMP"'* ]] || fail 3 "QEMU is not answering on the QMP socket $sock (no greeting in 3 tries): is the VM running, or hung?"
if [[ $replies == *'"error"'* ]]; then
  desc=$(printf '%s\n' "$replies" | sed -n 's/.*"error": *{.*"desc": *"\([^"]*\)".*/\1/p' | head -n 1)
  case $desc in
    *format*) fail 1 "QEMU refused the screendump: $desc (PNG screendump needs QEMU 7.1 or later)" ;;
    *) fail 1 "QEMU refused the screendump: ${desc:-$replies}" ;;
  esac
fi
# QEMU replies once the file is written; a reply lost to the client's timeout
# still leaves the file: give it a moment.
size=""
for _ in $(seq 1 30); do
  [[ -s $tmp ]] && size=$(png_size "$tmp") && break
  sleep 0.2
done
if [[ -z $size ]]; then
  [[ -e $tmp ]] || fail 1 "QEMU wrote no file at $tmp (QMP replies: ${replies//$'\n'/ })"
  fail 1 "QEMU's screendump at $tmp is not a PNG ($(stat -c %s -- "$tmp") bytes)"
fi
chmod 0644 -- "$tmp"
mv -f -- "$tmp" "$out"
log "$size PNG of the VM's screen"
printf 'screenshot: %s\n' "$out"
if [[ -n ${SCREENSHOT_FETCH_HINT:-} ]]; then
  hint=$SCREENSHOT_FETCH_HINT
  if [[ $hint == *"<path>"* ]]; then
    hint=${hint//"<path>"/$out}
  else
    hint="$hint $out"
  fi
  printf 'fetch it: %s\n' "$hint"
fi

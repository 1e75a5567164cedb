#!/usr/bin/env bash
# inject-answer-file.sh - writes the answer file into a Windows disk image as
# Windows\Panther\unattend.xml and removes every other cached answer file
# there, before the image's first boot.
#
# Usage: inject-answer-file.sh DISK ANSWER_FILE
#
#   DISK         the VM disk (qcow2 or raw) holding a generalized Windows; it
#                must not be in use (a running VM is refused)
#   ANSWER_FILE  the answer file (UTF-8 XML with an <unattend> element, at most
#                4 MiB), or - to read it from stdin
#
# Why: Windows looks for its answer file in %WINDIR%\Panther\Unattend and
# %WINDIR%\Panther before removable media, so a generalized image that carries
# a cached answer file there would ignore the one on the config ISO. This
# writes ours where Windows looks first and deletes unattend.xml and
# autounattend.xml in Windows\Panther and Windows\Panther\Unattend, matched
# case-insensitively as Windows matches NTFS names (ntfs-3g keeps names that
# differ only in case apart: every variant is removed).
#
# How: the disk is exposed as a raw block device or file, its partition table
# read with sfdisk, every NTFS partition looked at (read-only loop device,
# ntfsls) until one holds Windows/System32 (images carry EFI, MSR, the OS and
# recovery partitions, in any order); that partition gets a loop device
# (losetup -o START --sizelimit SIZE, so no partition nodes or udev are needed)
# and is mounted read-write with ntfs-3g (FUSE). The answer file is written
# under a temporary name beside its destination, checked, the cached copies are
# deleted and it is renamed into place; then everything is synced, unmounted and
# detached, on every exit path (a trap). Two routes expose the disk:
#   nbd   qemu-nbd --connect=/dev/nbdN (the nbd kernel module: on Ubuntu it may
#         need linux-modules-extra for the running kernel; modprobe is tried)
#   fuse  qemu-storage-daemon --export type=fuse (QEMU 6.0 or later, FUSE):
#         the disk appears as a raw file in the run's private state directory
# INJECT_ROUTE=auto (default) takes nbd when /dev/nbd0 exists or modprobe nbd
# makes it, else fuse.
#
# The answer file holds secrets: it is streamed from ANSWER_FILE (or stdin)
# straight into the mounted NTFS volume. No copy is made on the host's own file
# systems: the state directory holds only mount points, the FUSE export and pid
# files, and it is removed on exit.
#
# Refuses (nothing written): a disk in use (by a running QEMU, or any process
# holding it open; a second run on the same disk); no NTFS partition holding
# Windows/System32; a volume Windows left hibernated (fast startup) or with an
# unclean journal, or marked dirty (check disk scheduled): the image must come
# from a full shutdown. ntfs-3g is run with norecover and the mount checked
# read-write, so nothing is "repaired" behind Windows' back.
#
# Idempotent: a rerun leaves the same end state (an identical unattend.xml is
# kept as it is). A run killed with SIGKILL leaves its state directory behind;
# the next run on the same disk unmounts, detaches and stops what it recorded
# there before it starts. Every step is bounded by a timeout.
#
# Env (all optional):
#   INJECT_ROUTE      auto (default), nbd or fuse
#   INJECT_WORK_DIR   where the private (0700) state directory
#                     inject-answer-file.<id> is made (default ${TMPDIR:-/tmp})
#
# Needs root (losetup, mount), jq, sfdisk (fdisk), ntfs-3g (ntfs-3g, ntfsls,
# ntfsinfo, ntfs-3g.probe), qemu-img, and qemu-nbd or qemu-storage-daemon.
#
# Output: progress on stderr; on success one line on stdout:
#   inject-answer-file: wrote Windows/Panther/unattend.xml (N bytes) on partition P of DISK; removed K cached answer file(s)
# ("kept (unchanged)" instead of "wrote" when the same file was already there;
# the Windows and Panther folders keep the case they have in the image).
# Exit: 0 done; 1 failure (named); 2 bad usage or input; 3 the disk is in use;
#   4 no NTFS partition with Windows/System32; 5 the Windows volume is not safe
#   to write (hibernated, unclean, dirty, or mounted read-only).
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

readonly PROG="inject-answer-file"
readonly MAX_BYTES=$((4 * 1024 * 1024))
usage() {
  log "$*"
  log "usage: inject-answer-file.sh DISK ANSWER_FILE   (ANSWER_FILE - reads stdin)"
  exit 2
}
fail() { # CODE MSG
  local code=$1
  shift
  log "error: $*"
  exit "$code"
}

(($# == 2)) || usage "expected 2 arguments, got $#"
disk_arg=$1 answer=$2
route=${INJECT_ROUTE:-auto}
case $route in auto | nbd | fuse) ;; *) usage "INJECT_ROUTE='$route' is not auto, nbd or fuse" ;; esac
[[ -f $disk_arg ]] || usage "DISK '$disk_arg' is not a file"
if [[ $answer != - ]]; then
  [[ -f $answer && -r $answer ]] || usage "ANSWER_FILE '$answer' is not a readable file"
  answer_size=$(stat -c %s -- "$answer")
  ((answer_size > 0 && answer_size <= MAX_BYTES)) ||
    usage "ANSWER_FILE '$answer' is $answer_size bytes; an answer file is 1 byte to 4 MiB"
fi
((EUID == 0)) || die "needs root (losetup and mounting): run it with sudo"
for tool in jq sfdisk losetup ntfs-3g ntfs-3g.probe ntfsls ntfsinfo qemu-img timeout flock; do
  command -v "$tool" >/dev/null 2>&1 ||
    die "$tool not found (install: jq, fdisk, util-linux, ntfs-3g, qemu-utils, coreutils)"
done
disk=$(realpath -e -- "$disk_arg")

work_base=${INJECT_WORK_DIR:-${TMPDIR:-/tmp}}
[[ -d $work_base && $work_base != *[[:space:]]* ]] ||
  usage "INJECT_WORK_DIR/TMPDIR '$work_base' is not a directory (without spaces)"
work_base=$(realpath -e -- "$work_base")
# One state directory per disk, so a later run finds what a killed one left.
# shellcheck disable=SC2119 # sha256_of hashes stdin without an argument
state="$work_base/inject-answer-file.$(printf '%s' "$disk" | sha256_of | cut -c1-16)"
mnt="$state/mnt"
raw=""

# One run per disk at a time: a lock on the disk file itself (flock; QEMU's own
# locks are fcntl locks, independent of it). Daemons started below do not
# inherit it ({lock_fd}<&-).
exec {lock_fd}<"$disk"
flock -n "$lock_fd" || fail 3 "another inject-answer-file.sh is working on $disk"

mounted() { awk -v p="$1" '$5 == p { f = 1 } END { exit !f }' /proc/self/mountinfo; }

# pids_holding FILE: "NAME (pid N)" for every process with FILE open.
pids_holding() {
  local fd pid comm out="" pattern=$1
  pattern=${pattern//\\/\\\\}
  pattern=${pattern//\*/\\*}
  pattern=${pattern//\?/\\?}
  pattern=${pattern//\[/\\[}
  while IFS= read -r fd; do
    pid=${fd#/proc/}
    pid=${pid%%/*}
    [[ $pid != "$$" && $pid != "$BASHPID" ]] || continue # this script's own lock
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || continue # gone since
    [[ $out == *"(pid $pid)"* ]] || out+="${out:+, }$comm (pid $pid)"
  done < <(timeout 30 find /proc/[0-9]*/fd -maxdepth 1 -type l -lname "$pattern" 2>/dev/null {lock_fd}<&-)
  printf '%s' "$out"
}

# wait_gone PID SECONDS: waits for PID to exit; status 1 if it is still there.
wait_gone() {
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    alive "$1" || return 0
    sleep 0.1
  done
  ! alive "$1"
}

# release: undoes everything recorded in the state directory, in reverse order
# (the trap's cleanup, and the sweep of a killed run's leftovers). Never fails.
release() {
  local pid dev f
  [[ -d $state ]] || return 0
  if mounted "$mnt"; then
    # An answer file not yet renamed into place (a failed or interrupted run).
    [[ ! -s $state/tmp ]] || rm -f -- "$(<"$state/tmp")" 2>/dev/null || true
    sync -f "$mnt" 2>/dev/null || true
    if ! timeout 300 umount "$mnt" 2>/dev/null; then
      log "warning: could not unmount $mnt cleanly; detaching it lazily"
      umount -l "$mnt" 2>/dev/null || true
    fi
  fi
  if [[ -s $state/ntfs-3g.pid ]]; then
    pid=$(<"$state/ntfs-3g.pid")
    # ntfs-3g writes out its last changes as it exits after the unmount.
    if alive "$pid" && grep -qa ntfs-3g "/proc/$pid/cmdline" 2>/dev/null && ! wait_gone "$pid" 300; then
      log "warning: ntfs-3g (pid $pid) did not exit after the unmount; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  if [[ -s $state/loops ]]; then
    while read -r dev; do
      [[ -b $dev ]] || continue
      f=$(cat "/sys/block/${dev#/dev/}/loop/backing_file" 2>/dev/null || true)
      # Only a loop device still on this run's disk (a number may be reused).
      [[ -n $f && ($f == "$state/raw" || ($f == /dev/nbd* && $f == "$(cat "$state/nbd" 2>/dev/null)")) ]] || continue
      blockdev --flushbufs "$dev" 2>/dev/null || true
      timeout 60 losetup -d "$dev" 2>/dev/null || log "warning: could not detach $dev"
    done <"$state/loops"
  fi
  if [[ -s $state/nbd ]]; then
    dev=$(<"$state/nbd")
    blockdev --flushbufs "$dev" 2>/dev/null || true
    timeout 120 qemu-nbd --disconnect "$dev" >/dev/null 2>&1 || log "warning: could not disconnect $dev"
  fi
  if [[ -s $state/qsd.pid ]]; then
    # Written through to the qcow2 before the daemon closes it.
    ! mounted "$state/raw" || timeout 300 sync -- "$state/raw" 2>/dev/null || true
    pid=$(tr -dc '0-9' <"$state/qsd.pid")
    if [[ -n $pid ]] && alive "$pid" && grep -qa qemu-storage-daemon "/proc/$pid/cmdline" 2>/dev/null; then
      # SIGTERM: the daemon flushes the qcow2 and removes its FUSE export.
      kill -TERM "$pid" 2>/dev/null || true
      if ! wait_gone "$pid" 300; then
        log "warning: qemu-storage-daemon (pid $pid) did not stop; killing it"
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 10 || true
      fi
    fi
  fi
  if mounted "$state/raw"; then
    # qemu-storage-daemon (7.2) closes the disk on SIGTERM but leaves its FUSE
    # mount behind, with nobody serving it.
    timeout 60 umount "$state/raw" 2>/dev/null || umount -l "$state/raw" 2>/dev/null || true
  fi
  sync -f "$disk" 2>/dev/null || true
  rm -rf -- "$state" 2>/dev/null || log "warning: could not remove $state"
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  set +e
  release
  exit "$rc"
}

if [[ -d $state ]]; then
  log "a previous run on this disk left $state behind: releasing what it recorded"
  release
fi
trap cleanup EXIT
trap 'log "error: interrupted (SIGINT)"; exit 130' INT
trap 'log "error: terminated (SIGTERM)"; exit 143' TERM
trap 'log "error: hung up (SIGHUP)"; exit 129' HUP

# The disk must be free: QEMU locks its images, so qemu-img cannot take the
# shared lock while a VM (or an export of the disk) runs.
if ! err=$(timeout 60 qemu-img info --output=json -- "$disk" 2>&1 >/dev/null); then
  holders=$(pids_holding "$disk")
  if [[ $err == *lock* ]]; then
    fail 3 "$disk is in use${holders:+ by $holders}: shut the VM down first (${err//$'\n'/ })"
  fi
  die "qemu-img cannot read $disk: ${err//$'\n'/ }"
fi
format=$(timeout 60 qemu-img info --output=json -- "$disk" | jq -r .format)
case $format in qcow2 | raw) ;; *) usage "DISK $disk is a $format image; qcow2 or raw expected" ;; esac

mkdir -m 0700 -- "$state"
touch -- "$state/loops"

nbd_available() {
  command -v qemu-nbd >/dev/null 2>&1 || return 1
  [[ -b /dev/nbd0 ]] && return 0
  command -v modprobe >/dev/null 2>&1 || return 1
  timeout 60 modprobe nbd >/dev/null 2>&1 || return 1
  local i
  for ((i = 0; i < 50; i++)); do
    [[ -b /dev/nbd0 ]] && return 0
    sleep 0.1
  done
  return 1
}

expose_nbd() {
  local d dev err size i
  for d in /sys/block/nbd*; do
    [[ -e $d/pid || $(cat "$d/size" 2>/dev/null) != 0 ]] && continue
    dev=/dev/${d##*/}
    [[ -b $dev ]] || continue
    printf '%s\n' "$dev" >"$state/nbd"
    # Its output goes to a file: the forked server must not hold a pipe of ours.
    if timeout 120 qemu-nbd --connect="$dev" --format="$format" --cache=writeback -- "$disk" \
      </dev/null >"$state/qemu-nbd.log" 2>&1 {lock_fd}<&-; then
      for ((i = 0; i < 100; i++)); do
        size=$(cat "$d/size" 2>/dev/null || echo 0)
        if ((size > 0)); then
          raw=$dev
          log "exposed $disk as $dev (qemu-nbd)"
          return 0
        fi
        sleep 0.1
      done
      die "qemu-nbd connected $dev, but it shows no size after 10s"
    fi
    rm -f -- "$state/nbd"
    err=$(tail -c 2000 -- "$state/qemu-nbd.log" 2>/dev/null || true)
    [[ $err == *busy* || $err == *"in use"* ]] || die "qemu-nbd --connect=$dev failed: ${err//$'\n'/ }"
  done
  die "no free /dev/nbd device (all in use)"
}

expose_fuse() {
  local err spec i
  command -v qemu-storage-daemon >/dev/null 2>&1 ||
    die "qemu-storage-daemon not found for the FUSE route (Debian/Ubuntu: qemu-system-common); or load the nbd module for qemu-nbd"
  [[ -c /dev/fuse ]] || die "/dev/fuse is missing: FUSE is not available (modprobe fuse), and neither is nbd"
  : >"$state/raw"
  spec=${disk//,/,,} # QEMU option syntax: a comma in a value is doubled
  if ! err=$(timeout 120 qemu-storage-daemon --daemonize --pidfile "$state/qsd.pid" \
    --blockdev "driver=file,node-name=file0,filename=$spec" \
    --blockdev "driver=$format,node-name=disk0,file=file0" \
    --export "type=fuse,id=exp0,node-name=disk0,mountpoint=$state/raw,writable=on" 2>&1 </dev/null {lock_fd}<&-); then
    die "qemu-storage-daemon could not export $disk over FUSE: ${err//$'\n'/ }"
  fi
  for ((i = 0; i < 100; i++)); do
    if mounted "$state/raw"; then
      raw=$state/raw
      log "exposed $disk as a raw file over FUSE (qemu-storage-daemon pid $(<"$state/qsd.pid"))"
      return 0
    fi
    sleep 0.1
  done
  die "qemu-storage-daemon started but its FUSE export $state/raw did not appear within 10s"
}

case $route in
  nbd)
    nbd_available || die "INJECT_ROUTE=nbd, but there is no /dev/nbd0 and 'modprobe nbd' did not make one (or qemu-nbd is missing)"
    expose_nbd
    ;;
  fuse) expose_fuse ;;
  auto)
    if nbd_available; then
      expose_nbd
    else
      log "no nbd device here (no /dev/nbd0, modprobe nbd did not help): using the FUSE route"
      expose_fuse
    fi
    ;;
esac

# attach_loop OFFSET SIZE [-r]: a loop device on the raw disk for one partition.
attach_loop() {
  local dev
  dev=$(timeout 60 losetup --find --show ${3:+--read-only} --offset "$1" --sizelimit "$2" -- "$raw" 2>&1) ||
    die "losetup could not map the partition at byte $1 of $raw: ${dev//$'\n'/ }"
  printf '%s\n' "$dev" >>"$state/loops"
  printf '%s\n' "$dev"
}
detach_loop() {
  timeout 60 losetup -d "$1" 2>/dev/null || log "warning: could not detach $1"
}

# ci_entry DEVICE DIR NAME: the name of DIR's entry matching NAME, ignoring
# case (ntfsls on the unmounted volume); status 1 when there is none.
ci_entry() {
  local e
  while IFS= read -r e; do
    e=${e%/}
    [[ $e == . || $e == .. ]] && continue
    if [[ ${e,,} == "${3,,}" ]]; then
      printf '%s\n' "$e"
      return 0
    fi
  done < <(timeout 120 ntfsls -f -F -p "$2" "$1" 2>/dev/null)
  return 1
}

ptable=$(timeout 60 sfdisk -J -- "$raw" 2>&1) || fail 4 "no partition table on $disk: ${ptable//$'\n'/ }"
sector=$(jq -r '.partitiontable.sectorsize // 512' <<<"$ptable")
found="" seen=()
while read -r num start size ptype; do
  [[ -n $num ]] || continue
  case ${ptype,,} in 5 | f | 85) continue ;; esac # MBR extended partitions
  off=$((start * sector)) len=$((size * sector))
  oem=$(timeout 60 dd if="$raw" iflag=skip_bytes,count_bytes skip="$((off + 3))" count=8 status=none 2>/dev/null | tr -d '\0' || true)
  if [[ $oem != "NTFS    " ]]; then
    seen+=("$num: not NTFS")
    continue
  fi
  loop=$(attach_loop "$off" "$len" -r)
  win="" sys=""
  if win=$(ci_entry "$loop" / Windows) && sys=$(ci_entry "$loop" "/$win" System32); then
    found="$num $off $len $win"
    log "partition $num ($(mib "$len") MiB at sector $start): NTFS with $win/$sys"
  else
    seen+=("$num: NTFS without Windows/System32")
  fi
  detach_loop "$loop"
  [[ -z $found ]] || break
done < <(jq -r '.partitiontable.partitions // [] | to_entries[] | "\(.key + 1) \(.value.start) \(.value.size) \(.value.type)"' <<<"$ptable")
if [[ -z $found ]]; then
  fail 4 "no NTFS partition on $disk holds Windows/System32 (${seen[*]:-no partitions}): is this a Windows image?"
fi
read -r part off len win <<<"$found"

loop=$(attach_loop "$off" "$len")
# Hibernation (fast startup) and an unclean journal: ntfs-3g's probe codes.
prc=0
probe=$(timeout 120 ntfs-3g.probe --readwrite "$loop" 2>&1) || prc=$?
case $prc in
  0) ;;
  14) fail 5 "the Windows volume (partition $part) is hibernated (fast startup): boot it and shut Windows down fully (shutdown /s /t 0 with fast startup off), or use a clean generalized image" ;;
  15) fail 5 "the Windows volume (partition $part) was not cleanly unmounted (its journal holds changes): boot it and shut Windows down fully first" ;;
  16) fail 3 "the Windows volume (partition $part) is opened exclusively by another program" ;;
  *) die "ntfs-3g.probe refuses the Windows volume (partition $part, code $prc): ${probe//$'\n'/ }" ;;
esac
# The dirty flag (check disk scheduled): ntfs-3g would mount it regardless.
vflags=$(timeout 120 ntfsinfo -f -m "$loop" 2>/dev/null | sed -n 's/^[[:space:]]*Volume Flags:[[:space:]]*//p' | head -n 1)
[[ $vflags != *DIRTY* ]] ||
  fail 5 "the Windows volume (partition $part) is marked dirty ($vflags: check disk is scheduled): boot it, let chkdsk run and shut Windows down fully first"

mkdir -m 0700 -- "$mnt"
if ! err=$(timeout 300 ntfs-3g -o rw,norecover "$loop" "$mnt" 2>&1 {lock_fd}<&-); then
  die "ntfs-3g could not mount the Windows volume (partition $part): ${err//$'\n'/ }"
fi
for p in /proc/[0-9]*; do
  mapfile -d '' -t argv 2>/dev/null <"$p/cmdline" || continue
  if [[ " ${argv[*]} " == *ntfs-3g*" $loop $mnt "* ]]; then
    printf '%s\n' "${p#/proc/}" >"$state/ntfs-3g.pid"
    break
  fi
done
mopts=$(awk -v p="$mnt" '$5 == p { print $6 }' /proc/self/mountinfo)
[[ ,$mopts, == *,rw,* ]] ||
  fail 5 "ntfs-3g mounted the Windows volume read-only (${err//$'\n'/ }): shut Windows down fully (no hibernation or fast startup) first"
log "mounted partition $part read-write"

# ci_child DIR NAME: DIR's entry matching NAME ignoring case (on the mount).
ci_child() {
  local e base
  for e in "$1"/* "$1"/.*; do
    [[ -e $e || -L $e ]] || continue
    base=${e##*/}
    if [[ ${base,,} == "${2,,}" ]]; then
      printf '%s\n' "$e"
      return 0
    fi
  done
  return 1
}

windir="$mnt/$win"
panther=$(ci_child "$windir" Panther) || {
  panther="$windir/Panther"
  mkdir -- "$panther"
}
[[ -d $panther ]] || die "$win/${panther##*/} in the image is not a directory"
rel=${panther#"$mnt"/}
tmp="$panther/.unattend.xml.inject-$$"
printf '%s\n' "$tmp" >"$state/tmp"
if [[ $answer == - ]]; then
  timeout 300 head -c $((MAX_BYTES + 1)) >"$tmp" || die "could not write the answer file from stdin into $rel"
else
  timeout 300 head -c $((MAX_BYTES + 1)) <"$answer" >"$tmp" || die "could not write $answer into $rel"
fi
bytes=$(stat -c %s -- "$tmp")
if ((bytes == 0 || bytes > MAX_BYTES)); then
  rm -f -- "$tmp"
  fail 2 "the answer file is $bytes bytes (empty, or more than 4 MiB): nothing changed in the image"
fi
if ! grep -aq '<unattend' "$tmp"; then
  rm -f -- "$tmp"
  fail 2 "the answer file has no <unattend> element (UTF-8 XML expected): nothing changed in the image"
fi

removed=0
for dir in "$panther" "$(ci_child "$panther" Unattend || true)"; do
  [[ -n $dir && -d $dir ]] || continue
  for f in "$dir"/* "$dir"/.unattend.xml.inject-*; do
    [[ -f $f ]] || continue
    name=${f##*/}
    case ${name,,} in
      unattend.xml | autounattend.xml)
        [[ $f == "$panther/unattend.xml" ]] && continue
        rm -f -- "$f"
        removed=$((removed + 1))
        log "removed the cached answer file ${f#"$mnt"/}"
        ;;
      .unattend.xml.inject-*)
        # Left by a run that was killed before it could clean up.
        [[ $f == "$tmp" ]] || rm -f -- "$f"
        ;;
    esac
  done
done
verb=wrote
if [[ -f $panther/unattend.xml ]] && cmp -s -- "$tmp" "$panther/unattend.xml"; then
  rm -f -- "$tmp"
  verb="kept (unchanged)"
else
  if [[ -e $panther/unattend.xml ]]; then
    removed=$((removed + 1))
    log "replacing the cached answer file $rel/unattend.xml"
  fi
  mv -f -- "$tmp" "$panther/unattend.xml"
fi
timeout 300 sync -f "$panther/unattend.xml" || die "could not flush $rel/unattend.xml to the image"
log "flushing and unmounting"
timeout 300 umount "$mnt" || die "could not unmount the Windows volume (partition $part)"
release
trap - EXIT INT TERM HUP
say "$verb $rel/unattend.xml ($bytes bytes) on partition $part of $disk; removed $removed cached answer file(s)"

#!/usr/bin/env bash
# base-image.sh - the installed Windows as a read-only, content-addressed base,
# and the fresh qcow2 overlay on it that each provisioning run starts from.
#
# Usage: base-image.sh present|freeze|overlay|claim VM_DIR BASE_KEY
#
#   VM_DIR    the VM's folder: install.qcow2 (the install disk prepare-disk.sh
#             wrote), QEMU_VARS.fd (the EFI variable store), disk.qcow2 (the
#             overlay the build VM boots and publish-image.sh reads), qemu.pid
#   BASE_KEY  one line of JSON naming exactly what shaped the installed disk
#             (infra/pipeline/plan.ts baseKey: the source image's SHA-256, the
#             answer file's, the drivers', the first-logon script's, the
#             install-affecting VM settings'). The base's digest <d> is the
#             SHA-256 of these bytes (plan.ts baseDigest computes the same).
#
# Files (in VM_DIR, all 0444 once written):
#   base-<d>.qcow2     the disk as Windows left it after its first logon
#                      (drivers, OpenSSH and the admin user in place)
#   base-<d>.vars.fd   the EFI variable store that goes with it (boot entries)
#   base-<d>.json      BASE_KEY, the record of what shaped it
# The base is complete when all three exist (the .qcow2 is written last).
#
# Commands:
#   present  exit 0 when base-<d> is complete ("base-image: base-<d> is
#            present: ..." on stderr), 1 when it is not.
#   freeze   the install is done and its VM is off: install.qcow2 becomes
#            base-<d>.qcow2 (renamed, no copy; prepare-disk.sh's stamp
#            install.qcow2.source-sha256 removed) and QEMU_VARS.fd is copied to
#            base-<d>.vars.fd. A base-<d> already complete is kept (a leftover
#            install.qcow2 is removed). Retention: only the current base is
#            kept; every other base-*.{qcow2,vars.fd,json} is removed, and so
#            is a disk.qcow2 that is not an overlay on base-<d> (an overlay on
#            a removed base, or a disk of the layout before bases).
#   overlay  a fresh disk.qcow2: a new, empty qcow2 overlay whose backing file
#            is base-<d>.qcow2 (by its name, in the same folder), and
#            QEMU_VARS.fd reset to base-<d>.vars.fd; then the marker
#            disk.qcow2.fresh (no provisioning has run on this overlay yet).
#   claim    run before a provisioning: with the marker present and disk.qcow2
#            on base-<d>, the marker is removed (this provisioning owns the
#            overlay; its VM may be running). Otherwise the overlay was used by
#            an earlier provisioning (a failed or interrupted run): a running
#            VM is stopped (stop-vm.sh, ACPI first) and a fresh overlay made,
#            so a provisioning never runs on top of another.
#
# Env: BASE_IMAGE_STOP_TIMEOUT_S [600] claim's shutdown window for stop-vm.sh.
# Refused (exit 1, naming the cause): freeze, overlay or claim's overlay while
#   a QEMU of this VM runs (qemu.pid), freeze without install.qcow2, overlay
#   without a complete base-<d>, a disk qemu-img cannot read.
# Output: one outcome line on stdout (freeze, overlay); claim writes only to
#   stderr (the provisioning's stdout is the guest's); progress on stderr,
#   prefixed "base-image:". Exit: 0 done; 1 refused or failed; 2 bad
#   usage. Idempotent: each command can be run again.
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

readonly PROG="base-image"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
usage() {
  log "$*"
  log "usage: base-image.sh present|freeze|overlay|claim VM_DIR BASE_KEY"
  exit 2
}

(($# == 3)) || usage "expected 3 arguments, got $#"
action=$1 vm_dir=$2 key=$3
case $action in present | freeze | overlay | claim) ;; *) usage "unknown command '$action'" ;; esac
[[ -d $vm_dir ]] || usage "VM_DIR '$vm_dir' is not a folder"
[[ $key == \{*\} && $key != *$'\n'* ]] || usage "BASE_KEY must be one line of JSON (an object)"
stop_timeout_s=${BASE_IMAGE_STOP_TIMEOUT_S:-600}
[[ $stop_timeout_s =~ ^[1-9][0-9]*$ ]] || usage "BASE_IMAGE_STOP_TIMEOUT_S='$stop_timeout_s' is not a positive number of seconds"

digest=$(printf '%s' "$key" | sha256sum | cut -d' ' -f1)
readonly name="base-$digest"
readonly base=$vm_dir/$name.qcow2 base_vars=$vm_dir/$name.vars.fd base_key=$vm_dir/$name.json
readonly install=$vm_dir/install.qcow2 vars=$vm_dir/QEMU_VARS.fd
readonly disk=$vm_dir/disk.qcow2 fresh=$vm_dir/disk.qcow2.fresh pid_file=$vm_dir/qemu.pid

complete() { [[ -f $base && -f $base_vars && -f $base_key ]]; }

refuse_running() {
  local pid
  if pid=$(qemu_pid_of "$pid_file"); then
    die "a QEMU of this VM runs (pid $pid, $pid_file): stop it first (stop-vm.sh $vm_dir/qmp.sock)"
  fi
}

# backing_of QCOW2: its backing file's name as recorded ("" when none).
backing_of() {
  local info
  info=$(qemu-img info --output=json -U -- "$1" 2>&1) || die "qemu-img cannot read $1: ${info//$'\n'/ }"
  sed -n 's/^ *"backing-filename": *"\(.*\)",\{0,1\}$/\1/p' <<<"$info" | head -n 1
}

# Removes every base but base-<d>, and a disk.qcow2 that is not an overlay on it.
prune() {
  local f removed=0
  for f in "$vm_dir"/base-*.qcow2 "$vm_dir"/base-*.vars.fd "$vm_dir"/base-*.json "$vm_dir"/base-*.tmp; do
    [[ -e $f ]] || continue
    case ${f##*/} in "$name.qcow2" | "$name.vars.fd" | "$name.json") continue ;; esac
    rm -f -- "$f"
    log "removed ${f##*/} (only the current base is kept)"
    removed=$((removed + 1))
  done
  if [[ -f $disk ]] && [[ $(backing_of "$disk") != "$name.qcow2" ]]; then
    rm -f -- "$disk" "$fresh"
    log "removed disk.qcow2: it is not an overlay on $name.qcow2 (the next overlay replaces it)"
  fi
  return 0
}

make_overlay() {
  complete || die "$name is not complete in $vm_dir (run the baseImage stage first): no overlay"
  refuse_running
  rm -f -- "$fresh" "$disk.tmp" "$vars.tmp"
  local out
  # The backing file by its name: qemu-img and QEMU take it from the overlay's folder.
  out=$(cd -- "$vm_dir" && qemu-img create -q -f qcow2 -b "$name.qcow2" -F qcow2 disk.qcow2.tmp 2>&1) ||
    die "qemu-img create of the overlay on $name.qcow2 failed: ${out//$'\n'/ }"
  cp -- "$base_vars" "$vars.tmp"
  chmod 0644 -- "$disk.tmp" "$vars.tmp"
  mv -f -- "$disk.tmp" "$disk"
  mv -f -- "$vars.tmp" "$vars"
  : >"$fresh"
  sync -- "$disk" "$vars" "$fresh" 2>/dev/null || sync
}

case $action in
  present)
    if complete; then
      log "$name is present: Windows is not installed again"
      exit 0
    fi
    log "$name is not present in $vm_dir: Windows is installed from the install disk"
    exit 1
    ;;
  freeze)
    if complete; then
      if [[ -e $install ]]; then
        rm -f -- "$install" "$install.source-sha256"
        log "removed install.qcow2: $name already holds this install"
      fi
      prune
      say "$name is current: kept"
      exit 0
    fi
    refuse_running
    [[ -f $install ]] || die "$install not found: nothing to freeze (prepare-disk.sh writes it, the install boots it)"
    [[ -f $vars ]] || die "$vars not found: the install's EFI variable store is missing"
    [[ -z $(backing_of "$install") ]] || die "$install has a backing file: an install disk is self-contained"
    rm -f -- "$base" "$base_vars" "$base_key" "$base_vars.tmp" "$base_key.tmp"
    cp -- "$vars" "$base_vars.tmp"
    printf '%s\n' "$key" >"$base_key.tmp"
    chmod 0444 -- "$base_vars.tmp" "$base_key.tmp" "$install"
    mv -f -- "$base_vars.tmp" "$base_vars"
    mv -f -- "$base_key.tmp" "$base_key"
    # Last: the disk itself (renamed, not copied), so a complete base is one that is all there.
    mv -f -- "$install" "$base"
    # prepare-disk.sh's stamp names a disk that is gone: the next prepareDisk converts again.
    rm -f -- "$install.source-sha256"
    sync -- "$base" "$base_vars" "$base_key" 2>/dev/null || sync
    size=$(stat -c %s -- "$base")
    log "froze the installed disk as $name.qcow2 ($(mib "$size") MiB, read-only) with $name.vars.fd"
    prune
    say "$name frozen"
    ;;
  overlay)
    make_overlay
    say "fresh overlay disk.qcow2 on $name.qcow2"
    ;;
  claim)
    if [[ -f $fresh && -f $disk ]] && complete && [[ $(backing_of "$disk") == "$name.qcow2" ]]; then
      rm -f -- "$fresh"
      log "disk.qcow2 is a fresh overlay on $name.qcow2: this provisioning starts from the base"
      exit 0
    fi
    log "disk.qcow2 is not a fresh overlay on $name.qcow2 (an earlier provisioning used it): making a fresh one"
    if qemu_pid_of "$pid_file" >/dev/null; then
      bash "$here/stop-vm.sh" "$vm_dir/qmp.sock" "$stop_timeout_s" >&2 ||
        die "could not stop the build VM before making a fresh overlay (stop-vm.sh exit $?)"
    fi
    make_overlay
    rm -f -- "$fresh"
    log "fresh overlay disk.qcow2 on $name.qcow2: this provisioning starts from the base"
    ;;
esac

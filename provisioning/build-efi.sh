#!/usr/bin/env bash
# build-efi.sh - write the UEFI firmware pair for the Windows ARM64 VM.
#
# Usage: build-efi.sh OUT_DIR
#
# Writes into OUT_DIR (created if missing):
#   QEMU_EFI.fd   the AArch64 UEFI firmware zero-padded to exactly 64 MiB
#                 (QEMU's virt machine wants both pflash images at 64 MiB).
#   QEMU_VARS.fd  64 MiB of zeros: the guest's EFI variable store. Once the
#                 guest has booted it holds its boot entries, so an existing
#                 QEMU_VARS.fd is never overwritten.
#
# Env:
#   EFI_FIRMWARE  firmware image to pad
#                 (default /usr/share/qemu-efi-aarch64/QEMU_EFI.fd, Debian/Ubuntu
#                 package qemu-efi-aarch64).
#
# Idempotent: a rerun with the same firmware leaves QEMU_EFI.fd untouched (it is
# compared, not rewritten). Files are written to a temporary name in OUT_DIR and
# renamed into place, so an interrupted run never leaves a half-written image.
#
# Exit: 0 on success; non-zero with a "build-efi: ..." message on stderr when the
# firmware is missing, larger than 64 MiB, or an existing QEMU_VARS.fd has the
# wrong size. Nothing is printed on stdout.
set -euo pipefail

readonly PROG=build-efi
readonly FLASH_SIZE=$((64 * 1024 * 1024))

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

[[ $# -eq 1 && -n $1 ]] || die "usage: build-efi.sh OUT_DIR"
out_dir=$1
firmware=${EFI_FIRMWARE:-/usr/share/qemu-efi-aarch64/QEMU_EFI.fd}

[[ -f $firmware ]] ||
  die "firmware $firmware not found (install the qemu-efi-aarch64 package or set EFI_FIRMWARE)"
[[ -r $firmware ]] || die "firmware $firmware is not readable"
fw_size=$(stat -c %s -- "$firmware")
((fw_size > 0)) || die "firmware $firmware is empty"
((fw_size <= FLASH_SIZE)) ||
  die "firmware $firmware is $fw_size bytes, larger than the 64 MiB ($FLASH_SIZE bytes) flash image"

mkdir -p -- "$out_dir" || die "cannot create $out_dir"
code=$out_dir/QEMU_EFI.fd
vars=$out_dir/QEMU_VARS.fd

tmp=
cleanup() { [[ -z $tmp ]] || rm -f -- "$tmp"; }
trap cleanup EXIT

# --- QEMU_EFI.fd: firmware + zero padding -----------------------------------
tmp=$(mktemp "$out_dir/.QEMU_EFI.fd.XXXXXX")
cp -- "$firmware" "$tmp"
truncate -s "$FLASH_SIZE" -- "$tmp"
chmod 0644 -- "$tmp"
if [[ -f $code ]] && cmp -s -- "$tmp" "$code"; then
  rm -f -- "$tmp"
  log "$code is up to date ($firmware, $fw_size bytes, padded to 64 MiB)"
else
  mv -f -- "$tmp" "$code"
  log "wrote $code ($firmware, $fw_size bytes, padded to 64 MiB)"
fi
tmp=

# --- QEMU_VARS.fd: empty variable store, created once ------------------------
if [[ -e $vars ]]; then
  vars_size=$(stat -c %s -- "$vars")
  ((vars_size == FLASH_SIZE)) ||
    die "$vars exists but is $vars_size bytes, not $FLASH_SIZE; it may hold the guest's boot entries, so it is left alone: move it away to create a fresh one"
  log "$vars already exists; kept (it holds the guest's EFI variables)"
else
  tmp=$(mktemp "$out_dir/.QEMU_VARS.fd.XXXXXX")
  truncate -s "$FLASH_SIZE" -- "$tmp"
  chmod 0644 -- "$tmp"
  # link(2) fails if the name exists: never replaces a store created meanwhile.
  ln -- "$tmp" "$vars" || die "could not create $vars"
  rm -f -- "$tmp"
  tmp=
  log "wrote $vars (64 MiB of zeros)"
fi

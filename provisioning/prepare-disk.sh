#!/usr/bin/env bash
# prepare-disk.sh - turn a downloaded Windows image into the VM's qcow2 disk.
#
# Usage: prepare-disk.sh SOURCE DEST.qcow2 [SIZE_GIB]
#
#   SOURCE    the downloaded image. By format (qemu-img info; a name ending in
#             .iso is always an install ISO):
#               vhdx, vpc (VHD), vmdk, vdi, raw, ...  converted to qcow2
#                                   (qemu-img convert -p -O qcow2)
#               qcow2               checked with qemu-img check, then copied
#                                   (converted instead if it has a backing file)
#               .iso                an empty qcow2 of SIZE_GIB to install onto
#                                   (the ISO itself is attached by the launcher)
#   DEST      the qcow2 disk to write (its directory is created)
#   SIZE_GIB  size of the empty disk for an ISO source, default 64. For an
#             existing disk from the same ISO a larger size grows it in place
#             (qemu-img resize); a smaller one is ignored with a warning.
#
# Env:
#   PREPARE_DISK_PROGRESS_STEP  percent between progress lines, default 5
#
# Files:
#   DEST.partial        the disk being written; renamed to DEST when complete.
#   DEST.source-sha256  one line: the SHA-256 of the SOURCE that DEST was made
#                       from. While it matches, a rerun leaves DEST alone, so a
#                       disk the VM has since booted and provisioned is never
#                       wiped unless the source changed. A DEST without this
#                       stamp is treated as incomplete and replaced.
#   SOURCE.sha256       the stamp fetch-image.sh writes ("<sha256> <size>
#                       <mtime>"); used instead of hashing SOURCE while it
#                       matches SOURCE's size and mtime, and written (best
#                       effort) after hashing SOURCE here.
#
# Output: progress and results on stderr, prefixed "prepare-disk:"; nothing on
# stdout. Exit 0 when DEST is ready; 1 with a message naming the cause (source
# missing or unreadable, unsupported or corrupt image, DEST in use by a running
# QEMU, qemu-img failure); 2 on bad usage.
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

readonly PROG=prepare-disk

usage() {
  log "usage: prepare-disk.sh SOURCE DEST.qcow2 [SIZE_GIB]"
  exit 2
}

[[ $# -eq 2 || $# -eq 3 ]] || usage
source_img=$1
dest=$2
size_gib=${3:-64}
[[ -n $source_img && -n $dest ]] || usage
[[ $size_gib =~ ^[1-9][0-9]*$ ]] || die "SIZE_GIB must be a positive whole number, got '$size_gib'"
step=${PREPARE_DISK_PROGRESS_STEP:-5}
[[ $step =~ ^[1-9][0-9]*$ ]] || die "PREPARE_DISK_PROGRESS_STEP must be a positive integer, got '$step'"

[[ -e $source_img ]] || die "source image $source_img does not exist"
[[ -f $source_img ]] || die "source image $source_img is not a regular file"
[[ -r $source_img ]] || die "source image $source_img is not readable"
[[ ! -d $dest ]] || die "DEST $dest is a directory; give a file name"

command -v qemu-img >/dev/null || die "qemu-img not found (install the qemu-utils package)"
command -v jq >/dev/null || die "jq not found (install the jq package)"

partial=$dest.partial
dest_stamp=$dest.source-sha256
source_stamp=$source_img.sha256

mkdir -p -- "$(dirname -- "$dest")" || die "cannot create the directory of $dest"

cleanup() { rm -f -- "$partial"; }
trap cleanup EXIT

write_atomic() { # FILE CONTENT
  local tmp
  tmp=$(mktemp "$1.XXXXXX")
  printf '%s\n' "$2" >"$tmp"
  chmod 0644 -- "$tmp"
  mv -f -- "$tmp" "$1"
}

# --- which source is this? ---------------------------------------------------
shopt -s nocasematch
if [[ $source_img == *.iso ]]; then
  format=iso
else
  info=$(qemu-img info --output=json -- "$source_img") ||
    die "qemu-img cannot read $source_img as a disk image"
  format=$(jq -r '.format // empty' <<<"$info")
  [[ -n $format ]] || die "qemu-img did not report a format for $source_img"
fi
shopt -u nocasematch

# --- SHA-256 of the source (from fetch-image's stamp when it is current) ----
source_stat=$(stat -c '%s %.9Y' -- "$source_img")
source_sha=
if [[ -f $source_stamp ]]; then
  read -r s_sha s_size s_mtime _ <"$source_stamp" || true
  if [[ ${s_sha:-} =~ ^[0-9a-f]{64}$ && "${s_size:-} ${s_mtime:-}" == "$source_stat" ]]; then
    source_sha=$s_sha
  fi
fi
if [[ -z $source_sha ]]; then
  log "computing SHA-256 of $source_img ($(mib "${source_stat%% *}") MiB)"
  t0=$SECONDS
  source_sha=$(sha256_of "$source_img") || die "could not read $source_img"
  log "SHA-256 computed in $((SECONDS - t0)) s"
  # Best effort: lets the next run skip the hash (the source dir may be read-only).
  write_atomic "$source_stamp" "$source_sha $source_stat" 2>/dev/null || true
fi

# Fails when a running QEMU holds DEST's write lock.
ensure_not_in_use() {
  local err
  if ! err=$(qemu-img info -- "$dest" 2>&1 >/dev/null); then
    if [[ $err == *lock* ]]; then
      die "$dest is in use by a running QEMU (${err//$'\n'/ }); stop the VM first"
    fi
    log "warning: qemu-img cannot read the existing $dest (${err//$'\n'/ }); replacing it"
  fi
}

# --- already prepared from this source? -------------------------------------
if [[ -f $dest && -f $dest_stamp ]] && [[ "$(head -n 1 -- "$dest_stamp")" == "$source_sha" ]]; then
  if [[ $format == iso ]]; then
    want=$((size_gib * 1024 * 1024 * 1024))
    have=$(qemu-img info -U --output=json -- "$dest" | jq -r '."virtual-size"')
    if ((have < want)); then
      ensure_not_in_use
      log "growing $dest from $((have / 1073741824)) GiB to $size_gib GiB (the guest must extend its partition)"
      qemu-img resize -q -- "$dest" "${size_gib}G" || die "qemu-img resize of $dest failed"
    elif ((have > want)); then
      log "warning: $dest is $((have / 1073741824)) GiB, larger than SIZE_GIB $size_gib; a disk is never shrunk, keeping it"
    fi
  fi
  log "$dest is already prepared from $source_img (sha256 $source_sha); kept as it is"
  exit 0
fi

if [[ -f $dest ]]; then
  if [[ -f $dest_stamp ]]; then
    log "$dest was prepared from another source; replacing it with one made from $source_img"
  else
    log "$dest has no $dest_stamp stamp (incomplete or made elsewhere); replacing it"
  fi
  ensure_not_in_use
fi
rm -f -- "$dest_stamp" "$partial"

# Reads qemu-img's "-p" progress ("    (12.34/100%)\r") and logs every $step %.
progress_filter() {
  local chunk pct last=-1
  while IFS= read -r -d $'\r' chunk || [[ -n $chunk ]]; do
    [[ $chunk =~ \(([0-9]+)\.[0-9]+/100%\) ]] || continue
    pct=${BASH_REMATCH[1]}
    if ((pct >= last + step || (pct == 100 && last != 100))); then
      log "$1: $pct%"
      last=$pct
    fi
  done
}

convert() { # FORMAT
  local t0=$SECONDS vsize
  vsize=$(jq -r '."virtual-size"' <<<"$info")
  log "converting $source_img ($1, virtual size $(mib "$vsize") MiB) to qcow2"
  # -W: out-of-order writes (faster; the result is only used after the rename).
  qemu-img convert -p -W -f "$1" -O qcow2 -- "$source_img" "$partial" |
    progress_filter converting ||
    die "qemu-img convert of $source_img ($1) to qcow2 failed"
  log "converted in $((SECONDS - t0)) s"
}

case $format in
  iso)
    log "$source_img is an install ISO: creating an empty ${size_gib} GiB qcow2 disk to install onto"
    qemu-img create -q -f qcow2 -- "$partial" "${size_gib}G" ||
      die "qemu-img create of a ${size_gib} GiB disk at $partial failed"
    ;;
  qcow2)
    log "checking $source_img (qcow2)"
    rc=0
    check_out=$(qemu-img check -q -- "$source_img" 2>&1) || rc=$?
    case $rc in
      0) ;;
      3) log "warning: $source_img has leaked clusters (harmless, wasted space): $check_out" ;;
      *) die "qemu-img check found $source_img damaged (exit $rc): $check_out" ;;
    esac
    backing=$(jq -r '."backing-filename" // empty' <<<"$info")
    if [[ -n $backing ]]; then
      log "$source_img has a backing file ($backing): flattening it into a standalone qcow2"
      convert qcow2
    else
      log "copying $source_img ($(mib "${source_stat%% *}") MiB)"
      t0=$SECONDS
      cp --sparse=always -- "$source_img" "$partial" || die "copying $source_img to $partial failed"
      log "copied in $((SECONDS - t0)) s"
    fi
    ;;
  vhdx | vpc | vmdk | vdi | raw | qed | parallels | dmg | cloop | bochs)
    convert "$format"
    ;;
  *)
    die "$source_img has format '$format', which this script does not convert (expected vhdx, vpc, vmdk, vdi, raw, qcow2 or an .iso)"
    ;;
esac

qemu-img check -q -- "$partial" >/dev/null 2>&1 || die "the new disk $partial fails qemu-img check"
sync -- "$partial"
mv -f -- "$partial" "$dest"
write_atomic "$dest_stamp" "$source_sha"
vsize=$(qemu-img info -U --output=json -- "$dest" | jq -r '."virtual-size"')
log "prepared $dest (qcow2, virtual size $(mib "$vsize") MiB) from $source_img (sha256 $source_sha)"

#!/usr/bin/env bash
# prepare-disk.sh - turn a downloaded Windows image into the VM's qcow2 disk.
#
# Usage: prepare-disk.sh SOURCE DEST.qcow2 [SIZE_GIB]
#
#   SOURCE    the downloaded image. Its name declares its format, and the
#             content must probe (qemu-img info) as that format:
#               .vhdx vhdx, .vhd vpc, .vmdk vmdk, .vdi vdi, .qed qed, .qcow2 qcow2,
#               .img/.raw/.bin raw, .iso an ISO 9660 or UDF image (CD001/BEA01
#               at sector 16). Another name: the probed format is used, except
#               raw (a file with no header qemu-img knows is garbage, not a
#               disk, unless its name says raw).
#             (A fixed-size .vhd, whose footer is only at its end, probes as
#             raw: its "conectix" footer makes it vpc.)
#             Refused: a probe that differs from the name (a .vhdx that probes
#             as raw is truncated or corrupt), a backing file (any format), a
#             qcow2 keeping its data in an external data file, a vmdk whose
#             extents are other files, a qcow2 that qemu-img check finds
#             damaged, an ISO shorter than its volume.
#               vhdx, vpc (VHD), vmdk, vdi, raw, qed  converted to qcow2
#                                   (qemu-img convert -p -O qcow2)
#               qcow2               checked with qemu-img check, then copied
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
#                       Removed on every failure (a full disk included) and on
#                       SIGTERM/SIGINT/SIGHUP; one left by a killed run is
#                       removed by the next.
#   DEST.source-sha256  one line: the SHA-256 of the SOURCE that DEST was made
#                       from. While it matches, a rerun leaves DEST alone, so a
#                       disk the VM has since booted and provisioned is never
#                       wiped unless the source changed. A DEST without this
#                       stamp is treated as incomplete and replaced. DEST and
#                       its stamp change only once the new disk is complete
#                       and checked: a failed or killed run leaves the earlier
#                       pair as it was.
#   SOURCE.sha256       the stamp fetch-image.sh writes ("<sha256> <size>
#                       <mtime>"); used instead of hashing SOURCE while it
#                       matches SOURCE's size and mtime, and written (best
#                       effort) after hashing SOURCE here.
#
# Output: progress and results on stderr, prefixed "prepare-disk:"; nothing on
# stdout. Exit 0 when DEST is ready; 1 with a message naming the cause (source
# missing or unreadable, a format that differs from its name, a backing or
# external data file, a corrupt or truncated image, DEST in use by a running
# QEMU, no space left, a qemu-img failure with its message); 2 on bad usage.
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
[[ ! -L $dest ]] || die "DEST $dest is a symbolic link (to $(readlink -- "$dest")); refusing to write through it: give the path of a regular file"
[[ ! -d $dest ]] || die "DEST $dest is a directory; give a file name"
[[ ! -e $dest || -f $dest ]] || die "DEST $dest exists and is not a regular file"

command -v qemu-img >/dev/null || die "qemu-img not found (install the qemu-utils package)"
command -v jq >/dev/null || die "jq not found (install the jq package)"

partial=$dest.partial
dest_stamp=$dest.source-sha256
source_stamp=$source_img.sha256
[[ ! -L $partial && ! -d $partial ]] || die "$partial is a symbolic link or a directory, not a disk in progress: remove it"

if ! err=$(mkdir -p -- "$(dirname -- "$dest")" 2>&1); then
  die "cannot create the directory of $dest: ${err#mkdir: }"
fi

# Temporary names of killed runs: DEST.partial and mktemp's STAMP.XXXXXX.
# (Tools' messages are kept in memory: a full disk cannot swallow them.)
rm -f -- "$partial"
shopt -s nullglob
for f in "$dest_stamp".?????? "$source_stamp".??????; do
  [[ -f $f && ! -L $f ]] && rm -f -- "$f"
done
shopt -u nullglob

cleanup() {
  rm -f -- "$partial"
  if [[ -n ${stamp_tmp:-} ]]; then rm -f -- "$stamp_tmp"; fi
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
trap 'exit 129' HUP

write_atomic() { # FILE CONTENT
  local tmp
  tmp=$(mktemp "$1.XXXXXX")
  printf '%s\n' "$2" >"$tmp"
  chmod 0644 -- "$tmp"
  mv -f -- "$tmp" "$1"
}

# One line of a tool's error output: newlines joined, at most 400 characters.
one_line() { printf '%s' "$1" | tr '\n' ' ' | tr -s ' ' | cut -c1-400; }

# --- which source is this? ---------------------------------------------------
declared=
shopt -s nocasematch
case $source_img in
  *.iso) declared=iso ;;
  *.vhdx) declared=vhdx ;;
  *.vhd) declared=vpc ;;
  *.vmdk) declared=vmdk ;;
  *.vdi) declared=vdi ;;
  *.qed) declared=qed ;;
  *.qcow2) declared=qcow2 ;;
  *.img | *.raw | *.bin) declared=raw ;;
esac
shopt -u nocasematch

# Little-endian unsigned integer of N bytes at OFFSET of FILE.
le_uint() { # FILE OFFSET N
  local -a b
  local v=0 i
  read -r -a b < <(od -An -v -t u1 -j "$2" -N "$3" -- "$1")
  ((${#b[@]} == $3)) || return 1
  for ((i = $3 - 1; i >= 0; i--)); do v=$((v * 256 + b[i])); done
  echo "$v"
}

if [[ $declared == iso ]]; then
  format=iso
  file_size=$(stat -c %s -- "$source_img")
  # Volume descriptors start at sector 16 (byte 32768); the identifier is at +1.
  id=$(dd if="$source_img" bs=1 skip=32769 count=5 status=none 2>/dev/null | tr -c 'A-Z0-9' '?') || id=
  case $id in
    CD001)
      blocks=$(le_uint "$source_img" $((32768 + 80)) 4) || blocks=0
      block_size=$(le_uint "$source_img" $((32768 + 128)) 2) || block_size=0
      vol=$((blocks * block_size))
      if ((vol > file_size)); then
        die "$source_img is truncated: its ISO 9660 volume is $vol bytes, the file $file_size bytes"
      fi
      ;;
    BEA01 | NSR02 | NSR03) ;;
    *)
      die "$source_img is named .iso but is not an ISO 9660 or UDF image (no CD001/BEA01 volume descriptor at sector 16): truncated, corrupt or not an ISO"
      ;;
  esac
else
  if ! info=$(qemu-img info --output=json -- "$source_img" 2>&1); then
    die "qemu-img cannot read $source_img as a disk image (truncated or corrupt?): $(one_line "$info")"
  fi
  # Only the JSON object (a warning may precede it).
  info=$(sed -n '/^{/,$p' <<<"$info")
  format=$(jq -r '.format // empty' <<<"$info")
  [[ -n $format ]] || die "qemu-img did not report a format for $source_img"
  # A fixed-size VHD has its "conectix" footer only at the end, where qemu-img's
  # probe does not look: it probes as raw.
  if [[ $declared == vpc && $format == raw ]] &&
    [[ "$(tail -c 512 -- "$source_img" | head -c 8 | tr -c '[:lower:]' '?')" == conectix ]]; then
    info=$(qemu-img info -f vpc --output=json -- "$source_img" 2>&1) ||
      die "qemu-img cannot read $source_img as a fixed-size VHD: $(one_line "$info")"
    info=$(sed -n '/^{/,$p' <<<"$info")
    format=vpc
  fi
  if [[ -n $declared && $format != "$declared" ]]; then
    if [[ $format == raw ]]; then
      die "$source_img is named as $declared but qemu-img finds no $declared header in it (it probes as raw): truncated, corrupt or not a $declared image"
    fi
    die "$source_img is named as $declared but qemu-img probes it as $format; rename it or fetch the right file"
  fi
  if [[ -z $declared && $format == raw ]]; then
    die "$source_img has no header of a disk format qemu-img knows (it probes as raw) and its name does not say raw (.img, .raw, .bin): refusing to convert what may be garbage"
  fi
  backing=$(jq -r '."full-backing-filename" // ."backing-filename" // empty' <<<"$info")
  if [[ -n $backing ]]; then
    die "$source_img has a backing file ($backing): the VM disk must be self-contained; flatten it first (qemu-img convert -O qcow2)"
  fi
  data_file=$(jq -r '."format-specific".data."data-file" // empty' <<<"$info")
  if [[ -n $data_file ]]; then
    die "$source_img keeps its data in an external file ($data_file): the VM disk must be self-contained; convert it first (qemu-img convert -O qcow2)"
  fi
  if [[ $format == vmdk ]]; then
    src_real=$(realpath -- "$source_img")
    while IFS= read -r extent; do
      [[ -n $extent ]] || continue
      [[ $extent == /* ]] || extent=$(dirname -- "$source_img")/$extent
      if [[ "$(realpath -m -- "$extent")" != "$src_real" ]]; then
        die "$source_img keeps its data in another file ($extent, a vmdk extent): the VM disk must be self-contained"
      fi
    done < <(jq -r '."format-specific".data.extents[]?.filename // empty' <<<"$info")
  fi
fi

# --- SHA-256 of the source (from fetch-image's stamp when it is current) ----
source_stat=$(stat -c '%s %.9Y' -- "$source_img")
source_sha=
if [[ -f $source_stamp && ! -L $source_stamp ]]; then
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
      die "$dest is in use by a running QEMU ($(one_line "$err")); stop the VM first"
    fi
    log "warning: qemu-img cannot read the existing $dest ($(one_line "$err")); replacing it"
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
      if ! err=$(qemu-img resize -q -- "$dest" "${size_gib}G" 2>&1); then
        die "qemu-img resize of $dest failed: $(one_line "$err")"
      fi
    elif ((have > want)); then
      log "warning: $dest is $((have / 1073741824)) GiB, larger than SIZE_GIB $size_gib; a disk is never shrunk, keeping it"
    fi
  fi
  log "$dest is already prepared from $source_img (sha256 $source_sha); kept as it is"
  exit 0
fi

if [[ -f $dest ]]; then
  if [[ -f $dest_stamp ]]; then
    log "$dest was prepared from another source; replacing it with one made from $source_img (the current disk stays until the new one is complete)"
  else
    log "$dest has no $dest_stamp stamp (incomplete or made elsewhere); replacing it"
  fi
  ensure_not_in_use
fi

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

# fd 4: this script's stderr, for progress lines while a tool's stderr is
# captured.
exec 4>&2

convert() { # FORMAT
  local t0=$SECONDS vsize err rc=0
  vsize=$(jq -r '."virtual-size"' <<<"$info")
  log "converting $source_img ($1, virtual size $(mib "$vsize") MiB) to qcow2"
  # -W: out-of-order writes (faster; the result is only used after the rename).
  # qemu-img's stdout (progress) goes to the filter, its stderr is captured.
  err=$(
    {
      qemu-img convert -p -W -f "$1" -O qcow2 -- "$source_img" "$partial" 2>&3 |
        progress_filter converting 2>&4
    } 3>&1
  ) || rc=$?
  err=$(one_line "$err")
  ((rc == 0)) || die "qemu-img convert of $source_img ($1) to qcow2 failed: ${err:-exit $rc}"
  log "converted in $((SECONDS - t0)) s"
}

case $format in
  iso)
    log "$source_img is an install ISO: creating an empty ${size_gib} GiB qcow2 disk to install onto"
    if ! err=$(qemu-img create -q -f qcow2 -- "$partial" "${size_gib}G" 2>&1); then
      die "qemu-img create of a ${size_gib} GiB disk at $partial failed: $(one_line "$err")"
    fi
    ;;
  qcow2)
    log "checking $source_img (qcow2)"
    rc=0
    check_json=$(qemu-img check --output=json -- "$source_img" 2>/dev/null) || rc=$?
    check_err=
    if ((rc != 0 && rc != 2 && rc != 3)); then
      check_err=$(one_line "$(qemu-img check -q -- "$source_img" 2>&1 >/dev/null || true)")
    fi
    [[ -n $check_json ]] || check_json='{}'
    counts=$(jq -r '"\(.corruptions // 0) corruptions, \(.leaks // 0) leaked clusters, \(."check-errors" // 0) check errors"' <<<"$check_json" 2>/dev/null) || counts=
    case $rc in
      0) ;;
      3) log "warning: $source_img has leaked clusters (harmless, wasted space): $counts" ;;
      2) die "qemu-img check found $source_img damaged ($counts): truncated or corrupt; fetch it again" ;;
      *) die "qemu-img check could not check $source_img (exit $rc${counts:+, $counts}): ${check_err:-no message}" ;;
    esac
    log "copying $source_img ($(mib "${source_stat%% *}") MiB)"
    t0=$SECONDS
    if ! err=$(cp --sparse=always -- "$source_img" "$partial" 2>&1); then
      die "copying $source_img to $partial failed: $(one_line "${err#cp: }")"
    fi
    log "copied in $((SECONDS - t0)) s"
    ;;
  vhdx | vpc | vmdk | vdi | raw | qed)
    convert "$format"
    ;;
  *)
    die "$source_img has format '$format', which this script does not convert (expected vhdx, vpc, vmdk, vdi, raw, qed, qcow2 or an .iso)"
    ;;
esac

if ! err=$(qemu-img check -q -- "$partial" 2>&1 >/dev/null); then
  die "the new disk $partial fails qemu-img check: $(one_line "$err")"
fi
if ! err=$(sync -- "$partial" 2>&1); then
  die "cannot flush $partial to disk: $(one_line "$err")"
fi
# The new stamp is written first under a temporary name (a full disk fails
# here, before DEST changes); then the old stamp goes, the disk is renamed over
# DEST and the stamp put in place. A run killed in between leaves a DEST without
# a stamp, which the next run rebuilds.
stamp_tmp=$(mktemp "$dest_stamp.XXXXXX") || die "cannot create a temporary file beside $dest_stamp"
if ! err=$( { printf '%s\n' "$source_sha" >"$stamp_tmp" && chmod 0644 -- "$stamp_tmp"; } 2>&1); then
  die "cannot write $stamp_tmp: $(one_line "$err")"
fi
rm -f -- "$dest_stamp"
mv -f -T -- "$partial" "$dest" || die "cannot rename $partial to $dest"
mv -f -T -- "$stamp_tmp" "$dest_stamp" || die "cannot rename $stamp_tmp to $dest_stamp"
stamp_tmp=
vsize=$(qemu-img info -U --output=json -- "$dest" | jq -r '."virtual-size"')
log "prepared $dest (qcow2, virtual size $(mib "$vsize") MiB) from $source_img (sha256 $source_sha)"

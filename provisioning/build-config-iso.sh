#!/usr/bin/env bash
# build-config-iso.sh - build the config ISO the Windows guest reads at setup.
#
# Usage: build-config-iso.sh OUT.iso FILE...
#
#   OUT.iso   ISO image to write (its directory is created if missing).
#   FILE      a file or directory to put at the ISO root under its basename, or
#             SRC=DEST/PATH to put SRC (file or directory) at DEST/PATH, e.g.
#             "/tmp/drivers/viostor=\$WinPEDriver\$/viostor". The split is at
#             the last '=', so DEST cannot hold '=' (SRC can).
#             SRC "-" reads that one file from stdin (at most one "-"), so a
#             secret answer file needs no copy on disk outside this script's
#             private work folder: "-=autounattend.xml".
#             The caller names the answer file: it must reach the ISO root as
#             autounattend.xml (e.g. "/tmp/answer.xml=autounattend.xml").
#             The pipeline also passes firstlogon.ps1, authorized_keys and,
#             optionally, OpenSSH-ARM64.zip (see infra/answerFile.ts).
#
# Environment:
#   CONFIG_ISO_LABEL          volume label, 1-16 of [A-Za-z0-9_-] (Joliet keeps
#                             16 characters); default WINCONFIG.
#   CONFIG_ISO_DRIVERS_ISO    optional virtio-win ISO: the WinPE drivers below
#                             are copied from it into $WinPEDriver$/<driver>
#                             (Windows Setup loads that folder from any drive
#                             root; used for ISO installs).
#   CONFIG_ISO_WINPE_DRIVERS  drivers for $WinPEDriver$, space separated;
#                             default "viostor vioscsi NetKVM".
#   CONFIG_ISO_DRIVER_FOLDER  virtio-win OS folder (w11, w10, 2k25); default w11.
#                             Each driver is read from /<driver>/<folder>/ARM64.
#
# Outputs:
#   OUT.iso        ISO 9660 + Joliet (long names) + Rock Ridge, mode 0600: it
#                  holds the answer file, which holds the password.
#   OUT.iso.stamp  hash of the staged content and of the ISO, mode 0600.
#   Also at the ISO root: windows-arm64-image.marker, which the guest's
#   first-logon command looks for.
#   OUT_DIR/.config-iso-work.<pid>.XXXXXX  the private (0700) work folder: the
#                  staged tree (with the answer file), the new ISO and stamp
#                  before their renames. Removed on every exit;
#                  the folders of killed runs (SIGKILL included) are removed by
#                  the next run before it stages anything. So no copy of an
#                  input outlives a run anywhere but in OUT.iso.
#   OUT.iso and OUT.iso.stamp change only by renames once the new ISO is
#   complete: a failed or killed run leaves the earlier pair as it was. OUT.iso
#   may not be a directory or a symbolic link to one.
#
# Idempotent: when OUT.iso and its stamp match the inputs, nothing is written
# ("up to date"). File contents are never printed.
#
# Exit status: 0 built or up to date; 1 on failure (the cause is named: a
# missing input, an output that is a directory, xorriso's error, a full disk);
# 2 on a usage error.
set -euo pipefail

readonly NAME="build-config-iso"
readonly MARKER="windows-arm64-image.marker"
readonly STAMP_FORMAT="build-config-iso/1"

log() { printf '%s: %s\n' "$NAME" "$*" >&2; }
die() {
  log "$*"
  exit 1
}
usage() {
  printf 'usage: %s OUT.iso FILE|SRC=DEST/PATH...\n' "$NAME" >&2
  exit 2
}

[[ $# -ge 2 ]] || usage
out="$1"
shift
[[ -n "$out" && "$out" != */ ]] || usage
if [[ -d "$out" ]]; then
  if [[ -L "$out" ]]; then
    die "output $out is a symbolic link to a directory ($(readlink -- "$out")); give the path of an ISO file"
  fi
  die "output $out is a directory; give the path of an ISO file"
fi
[[ ! -d "$out.stamp" ]] || die "$out.stamp is a directory; remove it"

label="${CONFIG_ISO_LABEL:-WINCONFIG}"
[[ "$label" =~ ^[A-Za-z0-9_-]{1,16}$ ]] ||
  die "CONFIG_ISO_LABEL must be 1-16 of [A-Za-z0-9_-] (got '$label')"
drivers_iso="${CONFIG_ISO_DRIVERS_ISO:-}"
winpe_drivers="${CONFIG_ISO_WINPE_DRIVERS:-viostor vioscsi NetKVM}"
driver_folder="${CONFIG_ISO_DRIVER_FOLDER:-w11}"
[[ "$driver_folder" =~ ^[A-Za-z0-9]{1,16}$ ]] ||
  die "CONFIG_ISO_DRIVER_FOLDER must be a virtio-win OS folder like w11 (got '$driver_folder')"

command -v xorriso >/dev/null 2>&1 || die "xorriso not found (apt-get install xorriso)"
command -v sha256sum >/dev/null 2>&1 || die "sha256sum not found (coreutils)"

# Everything this script creates is private: the answer file holds a secret.
umask 077

# --- parse and check the inputs before doing any work -----------------------
srcs=()
dests=()
declare -A seen=()
stdin_dest=""
for spec in "$@"; do
  if [[ "$spec" == *=* ]]; then
    src="${spec%=*}"
    dest="${spec##*=}"
  else
    src="$spec"
    dest="$(basename -- "$spec")"
  fi
  [[ -n "$src" ]] || die "empty source in '$spec'"
  # Normalise DEST: no leading ./, no trailing or doubled slashes.
  while [[ "$dest" == ./* ]]; do dest="${dest#./}"; done
  while [[ "$dest" == */ ]]; do dest="${dest%/}"; done
  while [[ "$dest" == *//* ]]; do dest="${dest//\/\//\/}"; done
  [[ -n "$dest" && "$dest" != /* ]] || die "destination of '$spec' must be a relative path in the ISO"
  case "/$dest/" in
    */../* | */./*) die "destination '$dest' must not contain '.' or '..' components" ;;
  esac
  [[ "$dest" != *\\* ]] || die "destination '$dest' must use '/' as separator"
  if [[ "$src" == - ]]; then
    [[ "$spec" == *=* ]] || die "standard input needs a destination: -=PATH"
    [[ -z "$stdin_dest" ]] || die "standard input given twice ('$stdin_dest' and '$dest')"
    stdin_dest="$dest"
  else
    [[ -e "$src" ]] || die "input not found: $src"
    [[ -r "$src" ]] || die "input not readable: $src"
  fi
  # Windows reads the Joliet tree case-insensitively: catch clashes here.
  key="${dest,,}"
  [[ "$key" != "${MARKER,,}" ]] || die "destination '$dest' is reserved for the marker file"
  [[ -z "${seen[$key]:-}" ]] || die "destination '$dest' given twice ('${seen[$key]}' and '$src')"
  seen[$key]="$src"
  srcs+=("$src")
  dests+=("$dest")
done
if [[ -n "$drivers_iso" ]]; then
  [[ -f "$drivers_iso" ]] || die "CONFIG_ISO_DRIVERS_ISO not found: $drivers_iso"
  for drv in $winpe_drivers; do
    [[ "$drv" =~ ^[A-Za-z0-9_-]+$ ]] || die "CONFIG_ISO_WINPE_DRIVERS entry '$drv' is not a driver folder name"
    key="\$winpedriver\$/${drv,,}"
    [[ -z "${seen[$key]:-}" ]] || die "destination '\$WinPEDriver\$/$drv' given twice"
    seen[$key]="$drivers_iso"
  done
fi

out_dir="$(dirname -- "$out")"
if ! err="$(mkdir -p -- "$out_dir" 2>&1)"; then
  die "cannot create output directory $out_dir: ${err#mkdir: }"
fi
stamp="$out.stamp"

# --- the private work folder; killed runs' folders go first -------------------
# A folder is another run's while its pid is a live build-config-iso.
shopt -s nullglob
for old in "$out_dir"/.config-iso-work.*; do
  [[ -d "$old" && ! -L "$old" ]] || continue
  old_pid="${old##*/.config-iso-work.}"
  old_pid="${old_pid%%.*}"
  if [[ "$old_pid" =~ ^[0-9]+$ && "$old_pid" != "$$" && -r "/proc/$old_pid/cmdline" ]] &&
    tr '\0' ' ' <"/proc/$old_pid/cmdline" 2>/dev/null | grep -q "$NAME"; then
    continue
  fi
  chmod -R u+rwX -- "$old" 2>/dev/null || true
  rm -rf -- "$old" || die "cannot remove the work folder $old of an earlier run"
done
shopt -u nullglob
stage="$(mktemp -d "$out_dir/.config-iso-work.$$.XXXXXX")" ||
  die "cannot create a work folder in $out_dir"
chmod 700 -- "$stage"
cleanup() {
  chmod -R u+rwX -- "$stage" 2>/dev/null || true
  rm -rf -- "$stage"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
trap 'exit 129' HUP
tree="$stage/tree"
mkdir -p "$tree"

for i in "${!srcs[@]}"; do
  src="${srcs[$i]}"
  dest="${dests[$i]}"
  target="$tree/$dest"
  parent="$(dirname -- "$target")"
  mkdir -p -- "$parent" 2>/dev/null || die "cannot place '$dest': a parent path is a file"
  [[ ! -e "$target" ]] || die "cannot place '$src' at '$dest': something is already there"
  if [[ "$src" == - ]]; then
    if ! err="$(cat >"$target" 2>&1)"; then
      die "cannot stage standard input as $dest: ${err#cat: }"
    fi
  elif ! err="$(cp -R -L -- "$src" "$target" 2>&1)"; then
    die "cannot copy $src: ${err#cp: }"
  fi
done

if [[ -n "$drivers_iso" ]]; then
  for drv in $winpe_drivers; do
    inner="/$drv/$driver_folder/ARM64"
    mkdir -p -- "$tree/\$WinPEDriver\$"
    if ! xlog="$(xorriso -osirrox on -indev "$drivers_iso" -extract "$inner" "$tree/\$WinPEDriver\$/$drv" 2>&1)"; then
      cause="$(grep -a -o -m 1 -E 'No space left on device|Permission denied|Read-only file system|Disk quota exceeded' <<<"$xlog" || true)"
      [[ -z "$cause" ]] || die "cannot extract $inner from $drivers_iso into $stage: $cause"
      die "driver folder $inner not found in $drivers_iso (check CONFIG_ISO_WINPE_DRIVERS and CONFIG_ISO_DRIVER_FOLDER)"
    fi
    [[ -d "$tree/\$WinPEDriver\$/$drv" ]] || die "driver folder $inner in $drivers_iso is not a directory"
  done
fi

printf 'windows-arm64-image config media\n' >"$tree/$MARKER"
chmod -R u=rwX,go= -- "$tree"

# --- stamp: what would go into the ISO ----------------------------------------
# Paths (files and directories) and file contents, sorted bytewise, plus the
# label and this script's output format.
content_hash="$(
  cd "$tree"
  {
    printf '%s\nlabel=%s\n' "$STAMP_FORMAT" "$label"
    find . -mindepth 1 -type d -print0 | LC_ALL=C sort -z | tr '\0' '\n' | sed 's/^/dir /'
    find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum
  } | sha256sum | cut -d' ' -f1
)"

if [[ -f "$out" && -f "$stamp" ]]; then
  want_inputs="$(sed -n 's/^inputs=//p' "$stamp")"
  want_iso="$(sed -n 's/^iso=//p' "$stamp")"
  if [[ "$want_inputs" == "$content_hash" ]] &&
    [[ "$want_iso" == "$(sha256sum -- "$out" | cut -d' ' -f1)" ]]; then
    chmod 600 -- "$out" "$stamp"
    log "$out is up to date"
    exit 0
  fi
fi

# --- build -------------------------------------------------------------------
# Into the work folder (the same file system as OUT.iso, so the renames are
# atomic); the stamp changes last, after the ISO.
log "building $out (label $label, $(find "$tree" -type f | wc -l) files)"
tmp_iso="$stage/new.iso"
# xorriso's output is kept in memory (a full disk cannot swallow it).
if ! xlog="$(xorriso -as mkisofs -V "$label" -J -joliet-long -r -iso-level 3 -o "$tmp_iso" "$tree" 2>&1)"; then
  tail -n 20 <<<"$xlog" | cut -c1-300 >&2
  cause="$(grep -a -o -m 1 -E 'No space left on device|Permission denied|Read-only file system|Disk quota exceeded|File too large' <<<"$xlog" || true)"
  if room="$(grep -a -o -m 1 -E 'Image size [0-9]+s exceeds free space on media [0-9]+s' <<<"$xlog")"; then
    cause="not enough space on the device ($room; s = 2048-byte sectors)"
  fi
  die "xorriso failed to write $out${cause:+: $cause}"
fi
chmod 600 -- "$tmp_iso"
iso_hash="$(sha256sum -- "$tmp_iso" | cut -d' ' -f1)"
if ! err="$( { printf 'inputs=%s\niso=%s\n' "$content_hash" "$iso_hash" >"$stage/new.stamp" && sync -- "$tmp_iso" "$stage/new.stamp"; } 2>&1)"; then
  die "cannot write the new ISO's stamp in $stage: $err"
fi
chmod 600 -- "$stage/new.stamp"
rm -f -- "$stamp"
mv -f -T -- "$tmp_iso" "$out" || die "cannot rename the new ISO to $out"
mv -f -T -- "$stage/new.stamp" "$stamp" || die "cannot rename the new stamp to $stamp"
log "wrote $out ($(stat -c %s -- "$out") bytes)"

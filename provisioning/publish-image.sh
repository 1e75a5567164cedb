#!/usr/bin/env bash
# publish-image.sh - publish the provisioned VM (disk, EFI variable store and
# the firmware it boots from) to S3 or to a folder, content-addressed, with a
# manifest. The disk is published flattened and compacted: one self-contained
# qcow2 written by `qemu-img convert -O qcow2` (no backing file, no zeroed or
# discarded clusters), zstd-compressed when IMAGE_COMPRESSION=zstd. The VM's
# own disk is only read.
#
# Usage: publish-image.sh VM_DIR DEST_URI
#
#   VM_DIR    directory holding disk.qcow2 (standalone, or an overlay on a
#             backing chain), QEMU_VARS.fd and QEMU_EFI.fd (the VM must be
#             off), and software-report.json when the guest wrote one
#   DEST_URI  s3://bucket/prefix/ (trailing slash optional; the prefix may be
#             empty), or file:///absolute/dir/ (percent-encoding allowed; the
#             folder is created when missing)
#
# Env:
#   PUBLISH_VM_ENV       the VM env file the image ran with (KEY=value lines,
#                        as run-vm.sh reads them). Its VM_MACHINE_OPTS, VM_CPUS,
#                        VM_MEMORY_GIB, VM_ACCEL (and VM_MACHINE_TYPE,
#                        VM_GIC_VERSION when set; VM_DIR/vm-resolved.env, which
#                        run-vm.sh writes at each start, overrides these two)
#                        are recorded as "machine";
#                        its VM_DIR, VM_DISK, VM_EFI_CODE and VM_EFI_VARS, when
#                        set, must be VM_DIR and its files. Unset: "machine" is
#                        null.
#   S3_ENDPOINT_URL      passed to aws as --endpoint-url (S3-compatible servers)
#   IMAGE_COMPRESSION    none (default) or zstd: how the published qcow2's
#                        clusters are stored (recorded as compression)
#   IMAGE_SOURCE_URL     recorded in the manifest as sourceUrl (null when unset)
#   IMAGE_SOURCE_SHA256  recorded as sourceSha256 (64 hex digits, null when unset)
#   WINDOWS_VERSION      recorded as windowsVersion (null when unset)
#   PUBLISH_PROGRESS_INTERVAL_S  seconds between progress lines, default 10
#   PUBLISH_LOCK_TIMEOUT_S       folder: seconds to wait while another publish
#                                holds the folder's lock, default 300
#   TMPDIR               parent of this run's private work folder, default /tmp
#   AWS credentials/region       the usual aws CLI variables or instance profile
#
# Refused before anything is written, each with a message naming the cause: a
# disk or variable store held by a running QEMU (qemu-img cannot take the
# shared lock); a disk that `qemu-img check` finds corrupt or cannot check
# (leaked clusters only warn: they waste space, they lose nothing); a disk with
# an external data file; a software-report.json that is not a JSON object; a
# QEMU_EFI.fd that is not 64 MiB; a manifest that would not fit its stdout line
# (under 4 KiB: a very long DEST_URI, which appears in seven URIs, eight with a
# software report, or IMAGE_SOURCE_URL); too little free space for the
# flattened copy (`qemu-img measure`). Fails if the disk or a file of its
# backing chain changes while it is converted.
#
# Layout (<p> = the prefix or folder, <sha> = SHA-256 of disk.qcow2):
#   <p>/<sha>/disk.qcow2     the image, content-addressed
#   <p>/<sha>/QEMU_VARS.fd   the EFI variable store that goes with it
#   <p>/<sha>/QEMU_EFI.fd    the 64 MiB firmware it was booted from
#   <p>/<sha>/software-report.json  the guest's software report (when VM_DIR
#                            has one), named in the manifest with its SHA-256
#   <p>/<sha>/manifest.json  written last in <p>/<sha>/: present = complete
#   <p>/latest.json          the newest manifest; written only after everything
#                            above is verified, and never replaced by an older
#                            manifest (below)
#   <p>/staging/<id>/        folder only: work in progress, removed when the
#                            run ends: the flattened disk and every temporary
#                            file, owned by a run through a lock on <id>/lock;
#                            the next run removes those whose lock nobody holds
#                            (and unlocked ones older than a day). S3 needs no
#                            staging: an object appears only once its upload
#                            completes, and the bucket's lifecycle rule aborts
#                            the multipart uploads of runs that were killed.
#   <p>/.publish.lock        folder only: the flock(1) lock held while <sha>/ is
#                            installed and latest.json read and written
# In a folder, <p>/<sha>/ appears complete in one rename (it is built in
# staging). On S3 a run killed after the disk's upload can leave <sha>/
# objects without manifest.json: incomplete by the rule above, never named by
# latest.json, completed by the next publish of the same disk.
# Local temporary files (for S3 also the flattened disk, so TMPDIR needs its
# size free) live in a private mktemp folder under TMPDIR, removed on exit; one
# left by a killed run is removed by the next run (same lock).
#
# Manifest (manifestVersion 2): stdout is exactly one line, the manifest as
# compact JSON, under 4 KiB:
#   {"manifestVersion":2,"sha256":...,"size":...,"format":"qcow2","virtualSize":...,
#    "compression":"none"|"zstd","allocatedBytes":...,"publishedBytes":...,
#    "imageUri":...,"varsUri":...,"varsSha256":...,"varsSize":...,
#    "efiUri":...,"efiSha256":...,"efiSize":...,"manifestUri":...,
#    "files":[{"name":"disk.qcow2","uri":...,"sha256":...,"size":...},
#             {"name":"QEMU_VARS.fd",...},{"name":"QEMU_EFI.fd",...}],
#    "softwareReport":{"name":"software-report.json","uri":...,"sha256":...,"size":...}|null,
#    "host":{"qemuVersion":...,"qemuPackage":...,"firmwarePackage":...},
#    "machine":{"machineOptions":...,"cpus":...,"memoryGiB":...,"accel":...}|null,
#    "sourceUrl":...,"sourceSha256":...,"windowsVersion":...,"createdAt":"...Z"}
# host: first line of `qemu-system-aarch64 --version`, and the dpkg versions of
# qemu-system-arm and qemu-efi-aarch64 (each null when not known here).
# virtualSize: the disk's size as the guest sees it; allocatedBytes: the guest
# data the image holds (its `qemu-img map` extents with data that are not
# zero); publishedBytes (= size): the bytes of the published disk.qcow2.
#
# How: the disk (through its backing chain) is converted once into a new
# qcow2 (in a folder: in its staging folder; S3: in the work folder), which is
# checked (`qemu-img check`) and hashed; unless <p>/<sha>/ already holds it,
# it is uploaded straight to its content-addressed key (`aws s3 cp -`, read
# from the file; in a folder: renamed), sizes checked, the manifest written
# and read back, and latest.json written last. In a folder every file is
# flushed to disk before it is renamed into place. The conversion is
# deterministic: the same disk and compression give the same bytes, hence the
# same <sha>.
# $VM_DIR/disk.qcow2.sha256 ("<sha256> <size> <compression> <chain digest>
# <allocated>") records the published hash for this disk (the chain digest
# covers the size, mtime and inode of every file of its backing chain); while
# it matches and <p>/<sha>/ holds the disk, a rerun converts and uploads no
# disk (without it, a rerun converts and hashes the disk again, and uploads
# none when <p>/<sha>/ holds it): a complete set is kept as it is; an older
# manifest (or other variables, firmware or report) gets the small files and
# a new manifest.
#
# latest.json never moves backwards: of two manifests the newer is the one
# with the larger (createdAt, sha256). latest.json is written only when it is
# missing, unreadable or older; a publish that finds a newer one leaves it and
# still succeeds (its own image is published). In a folder the read, compare
# and write hold <p>/.publish.lock. On S3 the write is conditional
# (put-object --if-match <ETag>, or --if-none-match '*' when there is none):
# when another publish wrote in between, S3 answers 412 and this one reads and
# compares again (5 rounds at most). Every write is read back; if an older
# manifest replaced it, it is written again. Remaining race: an AWS CLI
# without those options (they came with S3's conditional writes in 2024; the
# CLI 2.9 of 2022 has none), or an S3-compatible server that ignores them:
# then a publish that read latest.json before a newer one was written can
# still overwrite it after the newer publish read its own write back (the
# window is one publish's time between its read and its write, about a
# second). A warning says when the CLI cannot write conditionally.
#
# Everything else (progress, aws output) goes to stderr, prefixed
# "publish-image:". Exit 0 when the image is published and latest.json points
# at it or at a newer image; 1 with a message naming the cause otherwise; 2 on
# bad usage.
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

readonly PROG=publish-image
readonly EFI_SIZE=$((64 * 1024 * 1024))
# The stdout line (manifest and newline) must stay under this many bytes.
readonly MAX_LINE=4096
readonly LATEST_ROUNDS=5
readonly ISO_TIME='^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$'

# Keep stdout for the single result line; everything else goes to stderr.
exec 3>&1 1>&2

usage() {
  log "usage: publish-image.sh VM_DIR DEST_URI"
  exit 2
}

[[ $# -eq 2 && -n $1 && -n $2 ]] || usage
vm_dir=$1
dest_uri=$2
interval=${PUBLISH_PROGRESS_INTERVAL_S:-10}
[[ $interval =~ ^[1-9][0-9]*$ ]] || die "PUBLISH_PROGRESS_INTERVAL_S must be a positive integer, got '$interval'"
lock_timeout=${PUBLISH_LOCK_TIMEOUT_S:-300}
[[ $lock_timeout =~ ^[1-9][0-9]*$ ]] || die "PUBLISH_LOCK_TIMEOUT_S must be a positive integer, got '$lock_timeout'"

# backend "s3": objects s3://$bucket/<key>; backend "file": files $root/<key>.
# base: the URI that keys are appended to in messages and in the manifest.
bucket=
prefix=
root=
case $dest_uri in
  s3://?*)
    backend="s3"
    rest=${dest_uri#s3://}
    bucket=${rest%%/*}
    [[ $rest != */* ]] || prefix=${rest#*/}
    while [[ $prefix == */ ]]; do prefix=${prefix%/}; done
    [[ -n $bucket ]] || die "DEST_URI '$dest_uri' has no bucket name"
    base=s3://$bucket
    ;;
  file:///*)
    backend="file"
    base=$dest_uri
    while [[ $base == */ ]]; do base=${base%/}; done
    root=${base#file://}
    [[ $root == /?* ]] || die "DEST_URI '$dest_uri' is the filesystem root; name a folder"
    [[ $root != *\\* ]] || die "DEST_URI '$dest_uri' holds a backslash; use a plain absolute path"
    rest=${root//%[0-9A-Fa-f][0-9A-Fa-f]/}
    [[ $rest != *%* && $root != *%00* ]] || die "DEST_URI '$dest_uri' has a malformed percent-escape (use %XX, not %00)"
    root=$(printf '%b' "${root//%/\\x}")
    [[ $root != *//* && /$root/ != */../* && /$root/ != */./* ]] ||
      die "DEST_URI '$dest_uri' is not a plain absolute path (no //, . or ..)"
    ;;
  file://*) die "DEST_URI '$dest_uri' names a host; use file:///absolute/dir/" ;;
  *) die "DEST_URI '$dest_uri' must look like s3://bucket/prefix/ or file:///absolute/dir/" ;;
esac

source_url=${IMAGE_SOURCE_URL:-}
source_sha=${IMAGE_SOURCE_SHA256:-}
source_sha=${source_sha,,}
windows_version=${WINDOWS_VERSION:-}
[[ -z $source_sha || $source_sha =~ ^[0-9a-f]{64}$ ]] ||
  die "IMAGE_SOURCE_SHA256 '$IMAGE_SOURCE_SHA256' is not 64 hex digits"
compression=${IMAGE_COMPRESSION:-none}
case $compression in
  none) convert_opts=() ;;
  zstd) convert_opts=(-c -o compression_type=zstd) ;;
  *) die "IMAGE_COMPRESSION '$compression' is not none or zstd" ;;
esac

disk=$vm_dir/disk.qcow2
vars=$vm_dir/QEMU_VARS.fd
efi=$vm_dir/QEMU_EFI.fd
report=$vm_dir/software-report.json
stamp=$disk.sha256
[[ -f $disk ]] || die "$disk not found"
[[ -f $vars ]] || die "$vars not found"
[[ -f $efi ]] || die "$efi not found (the firmware the image boots from is published with it; build-efi.sh writes it)"
command -v qemu-img >/dev/null || die "qemu-img not found (install the qemu-utils package)"
command -v jq >/dev/null || die "jq not found (install the jq package)"
command -v flock >/dev/null || die "flock not found (install the util-linux package)"
[[ $backend != s3 ]] || command -v aws >/dev/null || die "aws not found (install the AWS CLI)"
efi_size=$(stat -c %s -- "$efi")
((efi_size == EFI_SIZE)) ||
  die "$efi is $efi_size bytes, not the 64 MiB ($EFI_SIZE bytes) firmware image QEMU boots (run build-efi.sh)"

# --- the machine the image ran with (PUBLISH_VM_ENV) ------------------------------
machine_json=null
if [[ -n ${PUBLISH_VM_ENV:-} ]]; then
  vm_env=$PUBLISH_VM_ENV
  [[ -f $vm_env && -r $vm_env ]] || die "PUBLISH_VM_ENV '$vm_env' does not exist or is not readable"
  declare -A venv=()
  n=0
  while IFS= read -r line || [[ -n $line ]]; do
    n=$((n + 1))
    line=${line%$'\r'}
    if [[ $line =~ ^[[:space:]]*(#.*)?$ ]]; then continue; fi
    [[ $line =~ ^([A-Z_][A-Z0-9_]*)=(.*)$ ]] ||
      die "PUBLISH_VM_ENV $vm_env:$n is not a KEY=value line: '${line:0:80}'"
    venv[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
  done <"$vm_env"
  # The machine type and GIC version run-vm.sh resolved at the VM's last start win.
  if [[ -r $vm_dir/vm-resolved.env ]]; then
    while IFS= read -r line || [[ -n $line ]]; do
      if [[ $line =~ ^(VM_MACHINE_TYPE|VM_GIC_VERSION)=([A-Za-z0-9._-]+)$ ]]; then venv[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}; fi
    done <"$vm_dir/vm-resolved.env"
  fi
  for k in VM_CPUS VM_MEMORY_GIB; do
    [[ -z ${venv[$k]:-} || ${venv[$k]} =~ ^[0-9]+$ ]] ||
      die "PUBLISH_VM_ENV $vm_env: $k '${venv[$k]}' is not a whole number"
  done
  for pair in "VM_DIR:$vm_dir" "VM_DISK:$disk" "VM_EFI_CODE:$efi" "VM_EFI_VARS:$vars"; do
    k=${pair%%:*}
    file=${pair#*:}
    [[ -z ${venv[$k]:-} || ${venv[$k]} -ef $file ]] ||
      die "PUBLISH_VM_ENV $vm_env sets $k=${venv[$k]}, but what is published is $file: the manifest would not describe what the image ran with"
  done
  machine_json=$(jq -cn \
    --arg opts "${venv[VM_MACHINE_OPTS]:-}" --arg cpus "${venv[VM_CPUS]:-}" --arg mem "${venv[VM_MEMORY_GIB]:-}" \
    --arg accel "${venv[VM_ACCEL]:-}" --arg type "${venv[VM_MACHINE_TYPE]:-}" --arg gic "${venv[VM_GIC_VERSION]:-}" \
    'def num: if . == "" then null else tonumber end;
     {machineOptions: $opts, cpus: ($cpus | num), memoryGiB: ($mem | num),
      accel: (if $accel == "" then null else $accel end)}
     + (if $type == "" then {} else {machineType: $type} end)
     + (if $gic == "" then {} else {gicVersion: $gic} end)')
fi

# --- the QEMU and firmware packages on this host ------------------------------
qemu_version=
if command -v qemu-system-aarch64 >/dev/null; then
  qemu_version=$(timeout 20 qemu-system-aarch64 --version 2>/dev/null | sed -n 1p) || qemu_version=
fi
pkg_version() { # PACKAGE: its dpkg version, "" when unknown
  command -v dpkg-query >/dev/null || return 0
  # shellcheck disable=SC2016 # ${Version} is dpkg-query's field, not a shell variable
  dpkg-query -W -f '${Version}' "$1" 2>/dev/null || true
}
host_json=$(jq -cn --arg q "$qemu_version" --arg qp "$(pkg_version qemu-system-arm)" \
  --arg fp "$(pkg_version qemu-efi-aarch64)" \
  'def orNull: if . == "" then null else . end;
   {qemuVersion: ($q | orNull), qemuPackage: ($qp | orNull), firmwarePackage: ($fp | orNull)}')

aws_args=()
[[ -z ${S3_ENDPOINT_URL:-} ]] || aws_args+=(--endpoint-url "$S3_ENDPOINT_URL")

key() { if [[ -n $prefix ]]; then printf '%s/%s' "$prefix" "$1"; else printf '%s' "$1"; fi; }
at() { printf '%s/%s' "$base" "$1"; }
uri() { at "$(key "$1")"; }

# --- locked folders: a run's work and staging --------------------------------------
# lock_dir DIR: an exclusive flock on DIR/lock for as long as this run (or a
# child of it) lives. The lock is taken on lock.new and only then renamed to
# lock, so a sweeper that finds DIR/lock unlocked knows its run is gone.
lock_dir() { # DIR
  local fd
  exec {fd}>"$1/lock.new" || return 1
  flock -n "$fd" || return 1
  mv -f -- "$1/lock.new" "$1/lock"
}

# sweep_dead PARENT GLOB WHAT [own]: removes the folders PARENT/GLOB whose lock
# nobody holds (their run is gone), and unlocked ones older than a day (a run
# that died before it took its lock). "own": only folders owned by this user.
sweep_dead() { # PARENT GLOB WHAT [own]
  local d
  for d in "$1"/$2; do
    [[ -d $d && ! -L $d ]] || continue
    [[ ${4:-} != own || -O $d ]] || continue
    if [[ -f $d/lock ]]; then
      flock -n "$d/lock" true 2>/dev/null || continue
    elif [[ -z $(find "$d" -maxdepth 0 -mmin +1440 2>/dev/null) ]]; then
      continue
    fi
    log "removing $3 $d"
    rm -rf -- "$d" 2>/dev/null || log "warning: could not remove $d"
  done
}

tmp_base=${TMPDIR:-/tmp}
sweep_dead "$tmp_base" 'publish-image.*' "stale work folder" own
work=$(mktemp -d "$tmp_base/publish-image.XXXXXX") || die "cannot create a work folder in $tmp_base"
pids=()
stage_dir=
lock_fd=
kill_children() {
  local p
  for p in "${pids[@]}"; do kill_tree "$p" || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
cleanup() {
  kill_children
  # A folder's staging goes with the run's staging folder. (On S3 an upload
  # that did not complete left no object.)
  if [[ -n $stage_dir ]]; then
    rm -rf -- "$stage_dir"
    rmdir -- "$root/$(key staging)" 2>/dev/null || true
  fi
  rm -rf -- "$work"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM
trap 'log "hung up"; exit 129' HUP
trap 'exit 141' PIPE
lock_dir "$work" || die "cannot lock the work folder $work"

# Storage operations. Each sends its error output to $work/op.err (see
# op_error) and dies naming the object and the cause, except where noted.
# Runs aws with the endpoint.
s3() { aws "${aws_args[@]}" "$@" 2>"$work/op.err"; }
op_error() { grep -v '^[[:space:]]*$' "$work/op.err" | tail -n 1 | cut -c1-400; }

# After a failed read of KEY (its error in $work/op.err): status 0 when KEY does
# not exist. S3 answers a missing key with 403, not 404, when the caller may
# not list the whole bucket (the host may list only its prefix): then the
# listing of KEY decides.
s3_absent() { # KEY
  local found
  grep -qE '\(404\)|Not Found|NoSuchKey|does not exist' "$work/op.err" && return 0
  grep -qE '\(403\)|Forbidden|AccessDenied' "$work/op.err" || return 1
  found=$(aws "${aws_args[@]}" s3api list-objects-v2 --bucket "$bucket" --prefix "$1" --max-keys 1 \
    --query 'Contents[0].Key' --output text 2>/dev/null) || return 1
  [[ $found != "$1" ]]
}

# Sets SZ_DISK, SZ_VARS, SZ_EFI and SZ_REPORT to the sizes of <SHA>/disk.qcow2,
# QEMU_VARS.fd, QEMU_EFI.fd and software-report.json ("" for a missing one):
# on S3 one listing.
sizes_of() { # SHA
  local k s
  SZ_DISK='' SZ_VARS='' SZ_EFI='' SZ_REPORT=''
  if [[ $backend == file ]]; then
    [[ ! -f $root/$1/disk.qcow2 ]] || SZ_DISK=$(stat -c %s -- "$root/$1/disk.qcow2")
    [[ ! -f $root/$1/QEMU_VARS.fd ]] || SZ_VARS=$(stat -c %s -- "$root/$1/QEMU_VARS.fd")
    [[ ! -f $root/$1/QEMU_EFI.fd ]] || SZ_EFI=$(stat -c %s -- "$root/$1/QEMU_EFI.fd")
    [[ ! -f $root/$1/software-report.json ]] || SZ_REPORT=$(stat -c %s -- "$root/$1/software-report.json")
    return 0
  fi
  s3 s3api list-objects-v2 --bucket "$bucket" --prefix "$(key "$1/")" \
    --query 'Contents[].[Key, Size]' --output text >"$work/sizes" ||
    die "cannot list $(uri "$1/"): $(op_error)"
  while IFS=$'\t' read -r k s; do
    case $k in
      "$(key "$1/disk.qcow2")") SZ_DISK=$s ;;
      "$(key "$1/QEMU_VARS.fd")") SZ_VARS=$s ;;
      "$(key "$1/QEMU_EFI.fd")") SZ_EFI=$s ;;
      "$(key "$1/software-report.json")") SZ_REPORT=$s ;;
    esac
  done <"$work/sizes"
}

# Dies unless <SHA>/ holds the three files (and the report, when there is
# one) with this run's sizes.
verify_sizes() { # SHA
  sizes_of "$1"
  [[ $SZ_DISK == "$size" ]] || die "$(uri "$1/disk.qcow2") is ${SZ_DISK:-missing}, expected $size bytes"
  [[ $SZ_VARS == "$vars_size" ]] || die "$(uri "$1/QEMU_VARS.fd") is ${SZ_VARS:-missing}, expected $vars_size bytes"
  [[ $SZ_EFI == "$efi_size" ]] || die "$(uri "$1/QEMU_EFI.fd") is ${SZ_EFI:-missing}, expected $efi_size bytes"
  [[ -z $report_sha || $SZ_REPORT == "$report_size" ]] ||
    die "$(uri "$1/software-report.json") is ${SZ_REPORT:-missing}, expected $report_size bytes"
}

# Copies KEY to FILE; status 1 when it does not exist. S3: sets ETAG to its ETag.
get_object() { # KEY FILE
  rm -f -- "$2"
  ETAG=
  if [[ $backend == file ]]; then
    [[ -e $root/$1 ]] || return 1
    cp -- "$root/$1" "$2" 2>"$work/op.err" || die "cannot read $(at "$1"): $(op_error)"
    return 0
  fi
  if ETAG=$(s3 s3api get-object --bucket "$bucket" --key "$1" --query ETag --output text -- "$2"); then
    return 0
  fi
  ETAG=
  s3_absent "$1" || die "cannot read $(at "$1"): $(op_error)"
  return 1
}

# S3: uploads FILE to KEY.
put_file() { # FILE KEY [CONTENT_TYPE]
  s3 s3 cp --only-show-errors --content-type "${3:-application/octet-stream}" -- "$1" "s3://$bucket/$2" ||
    die "upload of $1 to $(at "$2") failed: $(op_error)"
}

# Folder: copies FILE to DEST (in the staging folder), readable, flushed to disk.
stage_copy() { # FILE DEST
  if ! { cp -- "$1" "$2" 2>"$work/op.err" && chmod 0644 -- "$2" && sync -- "$2" 2>"$work/op.err"; }; then
    die "copying $1 to $2 failed: $(op_error)"
  fi
}
# Folder: renames SRC to DEST (both under $root: one file system).
fs_rename() { # SRC DEST
  mv -f -T -- "$1" "$2" 2>"$work/op.err" || die "moving $1 to $2 failed: $(op_error)"
}

# Runs COMMAND... in the background (its stdin the caller's, its stderr to
# ERR_FILE), logging every $interval s "WHAT: <done> of about <TOTAL> MiB,
# <s> s", where PROBE PID prints the bytes done (the loop ends when it fails);
# returns the command's exit status.
with_progress() { # WHAT TOTAL ERR_FILE PROBE COMMAND...
  local what=$1 total=$2 err=$3 probe=$4 pid rc=0 t0=$SECONDS
  shift 4
  # <&0: a background command's stdin would otherwise be /dev/null.
  "$@" <&0 2>"$err" &
  pid=$!
  pids=("$pid")
  (
    sleeper=
    trap '[[ -z $sleeper ]] || kill "$sleeper" 2>/dev/null; exit 0' TERM
    while :; do
      sleep "$interval" >/dev/null 2>&1 &
      sleeper=$!
      wait "$sleeper"
      pos=$("$probe" "$pid") || exit 0
      log "$what: $(mib "$pos") of about $(mib "$total") MiB, $((SECONDS - t0)) s"
    done
  ) &
  pids+=("$!")
  wait "$pid" || rc=$?
  # The command is reaped (its pid may be reused): only the progress loop is left to stop.
  pids=("${pids[@]:1}")
  kill_children
  return "$rc"
}
# Probes: the size of $conv (what qemu-img convert wrote); the offset of the
# process's stdin (how far the upload has read its file).
conv_size() { stat -c %s -- "$conv" 2>/dev/null || echo 0; }
stdin_offset() { awk '/^pos:/ {print $2; found = 1} END {exit !found}' "/proc/$1/fdinfo/0" 2>/dev/null; }

# S3: uploads FILE (SIZE bytes) to KEY, with progress; dies naming the cause.
# Read from stdin, so the object appears only complete (one PUT, or a
# multipart upload completed last).
put_disk() { # FILE SIZE KEY
  local t0=$SECONDS
  with_progress "uploading" "$2" "$work/upload.err" stdin_offset \
    aws "${aws_args[@]}" s3 cp --only-show-errors --expected-size "$2" - "s3://$bucket/$3" <"$1" ||
    die "upload of $1 to $(at "$3") failed: $(grep -v '^[[:space:]]*$' "$work/upload.err" | tail -n 1 | cut -c1-400)"
  log "uploaded $(mib "$2") MiB in $((SECONDS - t0)) s"
}

# Folder: the lock that serialises installing <sha>/ and latest.json.
folder_lock() {
  # (bash itself names the cause when the open fails)
  exec {lock_fd}>>"$root/.publish.lock" || die "cannot open the lock file $root/.publish.lock"
  flock -w "$lock_timeout" "$lock_fd" ||
    die "another publish has held $root/.publish.lock for more than $lock_timeout s (PUBLISH_LOCK_TIMEOUT_S); run again once it has finished"
}
folder_unlock() {
  flock -u "$lock_fd"
  exec {lock_fd}>&-
  lock_fd=
}

# Refuses when a running QEMU holds FILE (qemu-img cannot take its shared lock).
ensure_not_in_use() { # FILE FORMAT
  local err
  if ! err=$(qemu-img info -f "$2" -- "$1" 2>&1 >/dev/null); then
    if [[ $err == *lock* ]]; then
      die "$1 is in use by a running QEMU; shut the VM down before publishing (${err//$'\n'/ })"
    fi
    die "qemu-img cannot read $1: ${err//$'\n'/ }"
  fi
}

# --- the disk: not in use, its backing chain, consistent ----------------------------
ensure_not_in_use "$disk" qcow2
ensure_not_in_use "$vars" raw

disk_abs=$(realpath -- "$disk") || die "cannot resolve the path of $disk"
qemu-img info -U --backing-chain --output=json -f qcow2 -- "$disk_abs" >"$work/info.json" 2>"$work/op.err" ||
  die "qemu-img cannot read $disk (or a file of its backing chain): $(op_error)"
vsize=$(jq -r '.[0]."virtual-size"' "$work/info.json")
data_file=$(jq -r '[.[]."format-specific".data."data-file" // empty] | first // empty' "$work/info.json")
[[ -z $data_file ]] ||
  die "$disk keeps its data in an external file ($data_file): publish writes a self-contained image; convert it first (qemu-img convert -O qcow2)"
mapfile -t chain < <(jq -r '.[].filename' "$work/info.json")
((${#chain[@]} > 0)) || die "qemu-img info names no file for $disk"
# chain_state: size, mtime and inode of every file of the chain (a change
# while publish reads them, or since the stamp, shows there).
chain_state() { stat -c '%s %.9Y %i %n' -- "${chain[@]}" 2>/dev/null || echo gone; }
chain_stat=$(chain_state)
chain_digest=$(printf '%s\n%s\n' "$compression" "$chain_stat" | sha256_of) || die "could not hash the chain's state"
if ((${#chain[@]} > 1)); then
  log "$disk is an overlay on ${chain[*]:1}: it is published flattened"
fi
log "checking $disk (qemu-img check)"
check_rc=0
timeout 1800 qemu-img check -f qcow2 --output=json -- "$disk" >"$work/check.json" 2>"$work/check.err" || check_rc=$?
check_counts() { jq -r '"\(.corruptions // 0) corruptions, \(.leaks // 0) leaked clusters, \(."check-errors" // 0) check errors"' "$work/check.json" 2>/dev/null || echo "no result"; }
case $check_rc in
  0) ;;
  3) log "warning: qemu-img check: $disk has $(jq -r '.leaks // 0' "$work/check.json") leaked clusters (space only, nothing lost; 'qemu-img check -r leaks' reclaims it)" ;;
  2) die "qemu-img check found $disk corrupt ($(check_counts)): refusing to publish it; repair it (qemu-img check -r all) or build the disk again" ;;
  124) die "qemu-img check of $disk did not finish within 1800 s" ;;
  *) die "qemu-img check could not check $disk (exit $check_rc: $(check_counts); $(grep -v '^[[:space:]]*$' "$work/check.err" | tail -n 1 | cut -c1-300))" ;;
esac

vars_size=$(stat -c %s -- "$vars")
vars_sha=$(sha256_of "$vars") || die "could not read $vars"
efi_sha=$(sha256_of "$efi") || die "could not read $efi"
report_sha=
report_size=
if [[ -e $report ]]; then
  jq -e 'type == "object"' >/dev/null 2>&1 <"$report" ||
    die "$report is not a JSON object (the check step writes it); remove it or provision again"
  report_size=$(stat -c %s -- "$report")
  report_sha=$(sha256_of "$report") || die "could not read $report"
fi

# Placeholders until the flattened disk exists: the line-length check before
# anything is written uses them (the real numbers have no more digits).
size=$(stat -c %s -- "$disk")
allocated=$vsize

# Sets MANIFEST to the manifest for SHA, created at CREATED_AT.
build_manifest() { # SHA CREATED_AT
  local report_json=null
  if [[ -n $report_sha ]]; then
    report_json=$(jq -cn --arg uri "$(uri "$1/software-report.json")" --arg sha "$report_sha" \
      --argjson size "$report_size" '{name: "software-report.json", uri: $uri, sha256: $sha, size: $size}')
  fi
  MANIFEST=$(jq -cn \
    --arg sha "$1" --argjson size "$size" --argjson vsize "$vsize" \
    --arg compression "$compression" --argjson allocated "$allocated" --argjson report "$report_json" \
    --arg image "$(uri "$1/disk.qcow2")" --arg varsUri "$(uri "$1/QEMU_VARS.fd")" --arg efiUri "$(uri "$1/QEMU_EFI.fd")" \
    --arg varsSha "$vars_sha" --argjson varsSize "$vars_size" --arg efiSha "$efi_sha" --argjson efiSize "$efi_size" \
    --arg manifestUri "$(uri "$1/manifest.json")" --argjson host "$host_json" --argjson machine "$machine_json" \
    --arg sourceUrl "$source_url" --arg sourceSha "$source_sha" --arg winver "$windows_version" \
    --arg createdAt "$2" \
    'def orNull: if . == "" then null else . end;
     {manifestVersion: 2, sha256: $sha, size: $size, format: "qcow2", virtualSize: $vsize,
      compression: $compression, allocatedBytes: $allocated, publishedBytes: $size,
      imageUri: $image, varsUri: $varsUri, varsSha256: $varsSha, varsSize: $varsSize,
      efiUri: $efiUri, efiSha256: $efiSha, efiSize: $efiSize, manifestUri: $manifestUri,
      files: [{name: "disk.qcow2", uri: $image, sha256: $sha, size: $size},
              {name: "QEMU_VARS.fd", uri: $varsUri, sha256: $varsSha, size: $varsSize},
              {name: "QEMU_EFI.fd", uri: $efiUri, sha256: $efiSha, size: $efiSize}],
      softwareReport: $report, host: $host, machine: $machine,
      sourceUrl: ($sourceUrl | orNull), sourceSha256: ($sourceSha | orNull),
      windowsVersion: ($winver | orNull), createdAt: $createdAt}')
}

# Dies unless the manifest JSON fits the stdout line.
ensure_fits() { # JSON
  local n
  n=$(printf '%s\n' "$1" | wc -c)
  ((n < MAX_LINE)) ||
    die "the manifest would be a $n-byte line, and it must stay under $MAX_LINE bytes: DEST_URI is ${#dest_uri} characters (it appears in $((${#report_sha} ? 8 : 7)) URIs), IMAGE_SOURCE_URL ${#source_url}; use a shorter prefix or folder"
}
build_manifest "$(printf '%064d' 0)" "1970-01-01T00:00:00Z"
ensure_fits "$MANIFEST"

# Sets PUB_* from what is published for SHA:
#   PUB_DISK_OK  <sha>/manifest.json names this disk (sha256, size) and
#                <sha>/disk.qcow2 has its size; PUB_JSON is that manifest
#   PUB_VARS_OK, PUB_EFI_OK  the manifest records this QEMU_VARS.fd /
#                QEMU_EFI.fd (sha256) and the object has its size
#   PUB_REPORT_OK the manifest records this software report (sha256, and the
#                object has its size), or none when there is none
#   PUB_COMPLETE all of them, in a manifestVersion 2 that names this location
#                and records the compaction (publishedBytes)
#   PUB_CREATED  its createdAt when every file it records is this run's (a
#                manifestVersion 1 records no firmware), else ""
published_state() { # SHA
  local m=$work/published.json
  PUB_JSON='' PUB_DISK_OK=0 PUB_VARS_OK=0 PUB_EFI_OK=0 PUB_REPORT_OK=0 PUB_COMPLETE=0 PUB_CREATED=''
  get_object "$(key "$1/manifest.json")" "$m" || return 0
  jq -e --arg sha "$1" --argjson size "$size" 'type == "object" and .sha256 == $sha and .size == $size' \
    >/dev/null 2>&1 <"$m" || return 0
  sizes_of "$1"
  [[ $SZ_DISK == "$size" ]] || return 0
  PUB_DISK_OK=1
  PUB_JSON=$(jq -c . <"$m")
  if [[ $SZ_VARS == "$vars_size" ]] && jq -e --arg s "$vars_sha" '.varsSha256 == $s' >/dev/null <"$m"; then
    PUB_VARS_OK=1
  fi
  if [[ $SZ_EFI == "$efi_size" ]] && jq -e --arg s "$efi_sha" '.efiSha256 == $s' >/dev/null <"$m"; then
    PUB_EFI_OK=1
  fi
  if [[ -z $report_sha ]]; then
    jq -e '.softwareReport == null' >/dev/null <"$m" && PUB_REPORT_OK=1
  elif [[ $SZ_REPORT == "$report_size" ]] && jq -e --arg s "$report_sha" '.softwareReport.sha256? == $s' >/dev/null <"$m"; then
    PUB_REPORT_OK=1
  fi
  if ((PUB_VARS_OK && PUB_REPORT_OK)) && { ((PUB_EFI_OK)) || jq -e '.efiSha256 == null' >/dev/null <"$m"; }; then
    PUB_CREATED=$(jq -r '.createdAt // empty' <"$m")
    [[ $PUB_CREATED =~ $ISO_TIME ]] || PUB_CREATED=
  fi
  if ((PUB_VARS_OK && PUB_EFI_OK && PUB_REPORT_OK)) &&
    jq -e --arg u "$(uri "$1/manifest.json")" --arg i "$(uri "$1/disk.qcow2")" \
      '.manifestVersion == 2 and .manifestUri == $u and .imageUri == $i and (.files | length) == 3
       and (.publishedBytes | type) == "number"' \
      >/dev/null <"$m"; then
    PUB_COMPLETE=1
  fi
}

# S3: uploads the compact JSON in VALUE to KEY and checks it reads back equal.
put_json() { # VALUE KEY
  printf '%s\n' "$1" >"$work/put.json"
  put_file "$work/put.json" "$2" application/json
  get_object "$2" "$work/readback.json" || die "$(at "$2") is missing after it was written"
  jq -e --argjson want "$1" '. == $want' >/dev/null 2>&1 <"$work/readback.json" ||
    die "$(at "$2") does not read back as written"
}

# Prints how the manifest in FILE compares to $manifest: same, newer, older,
# or unknown (not a manifest with sha256 and createdAt).
latest_order() { # FILE
  jq -rs --argjson ours "$manifest" --arg iso "$ISO_TIME" '
    if length != 1 then "unknown" else .[0] |
      if . == $ours then "same"
      elif (type != "object" or (.sha256 | type) != "string" or (.createdAt | type) != "string")
        then "unknown"
      elif (.createdAt | test($iso) | not) then "unknown"
      elif [.createdAt, .sha256] > [$ours.createdAt, $ours.sha256] then "newer"
      else "older" end
    end' <"$1" 2>/dev/null || echo unknown
}
describe() { jq -r '"sha256 \(.sha256), created \(.createdAt)"' <"$1" 2>/dev/null || echo "?"; }

s3_conditional=1
# S3: writes $work/put.json to latest.json, on condition that it still has
# ETag (or, with none, that it does not exist). Status 1 when another writer
# came first (412/409); dies on other failures.
put_latest_s3() { # ETAG
  local cond=()
  if ((s3_conditional)); then
    if [[ -n $1 ]]; then cond=(--if-match "$1"); else cond=(--if-none-match '*'); fi
  fi
  if s3 s3api put-object --bucket "$bucket" --key "$latest_key" --body "$work/put.json" \
    --content-type application/json "${cond[@]}" >/dev/null; then
    return 0
  fi
  if ((${#cond[@]})) && grep -q 'Unknown options' "$work/op.err"; then
    s3_conditional=0
    log "warning: this AWS CLI cannot write conditionally (no put-object --if-match); latest.json is compared, written and read back instead, which leaves a narrow race between concurrent publishes"
    put_latest_s3 "$1"
    return
  fi
  grep -qE 'PreconditionFailed|\(412\)|ConditionalRequestConflict|\(409\)' "$work/op.err" && return 1
  die "upload of $(at "$latest_key") failed: $(op_error)"
}

# Points latest.json at $manifest unless it already points at a newer image.
update_latest() {
  local round order etag
  for ((round = 1; round <= LATEST_ROUNDS; round++)); do
    order=absent
    if get_object "$latest_key" "$work/latest.json"; then order=$(latest_order "$work/latest.json"); fi
    etag=$ETAG
    case $order in
      same)
        log "$(uri latest.json) already points at sha256 $sha"
        return 0
        ;;
      newer)
        log "$(uri latest.json) points at a newer image ($(describe "$work/latest.json")); left as it is"
        return 0
        ;;
      unknown) log "$(uri latest.json) holds no manifest this publish can compare; replacing it" ;;
    esac
    printf '%s\n' "$manifest" >"$work/put.json"
    if [[ $backend == file ]]; then
      stage_copy "$work/put.json" "$stage_dir/latest.json"
      fs_rename "$stage_dir/latest.json" "$root/$latest_key"
    elif ! put_latest_s3 "$etag"; then
      log "$(uri latest.json) changed while it was written (another publish); reading it again"
      continue
    fi
    order=absent
    if get_object "$latest_key" "$work/latest.json"; then order=$(latest_order "$work/latest.json"); fi
    case $order in
      same)
        log "$(uri latest.json) now points at sha256 $sha"
        return 0
        ;;
      newer)
        log "$(uri latest.json) was replaced by a newer image meanwhile ($(describe "$work/latest.json")); left as it is"
        return 0
        ;;
    esac
    [[ $backend == s3 ]] || die "$(uri latest.json) does not read back as written"
    log "warning: $(uri latest.json) was replaced by an older or unknown manifest right after it was written; writing it again"
  done
  die "$(uri latest.json) kept changing under this publish ($LATEST_ROUNDS rounds); the image is published at $(uri "$sha/"), run again to point latest.json at it"
}

# --- the destination --------------------------------------------------------------
if [[ $backend == file ]]; then
  mkdir -p -- "$root" 2>"$work/op.err" || die "cannot create the folder $root: $(op_error)"
  [[ -w $root ]] || die "the folder $root is not writable by $(id -un)"
  staging_root=$root/$(key staging)
  mkdir -p -- "$staging_root" 2>"$work/op.err" || die "cannot create $staging_root: $(op_error)"
  # Staging left by runs that were killed (a failing run removes its own).
  sweep_dead "$staging_root" '*' "stale staging folder"
  stage_dir=$(mktemp -d "$staging_root/$(date -u +%Y%m%dT%H%M%SZ)-XXXXXX" 2>"$work/op.err") ||
    die "cannot create a staging folder in $staging_root: $(op_error)"
  lock_dir "$stage_dir" || die "cannot lock the staging folder $stage_dir"
fi
latest_key=$(key latest.json)

# --- is this disk published already? ------------------------------------------------
manifest=
sha=
PUB_DISK_OK=0
if [[ -f $stamp ]]; then
  read -r st_sha st_size st_mode st_digest st_alloc _ <"$stamp" || true
  if [[ ${st_sha:-} =~ ^[0-9a-f]{64}$ && ${st_size:-} =~ ^[0-9]+$ && ${st_alloc:-} =~ ^[0-9]+$ &&
    ${st_mode:-} == "$compression" && ${st_digest:-} == "$chain_digest" ]]; then
    sha=$st_sha
    size=$st_size
    allocated=$st_alloc
    published_state "$sha"
  fi
fi

converted=0
if ((!PUB_DISK_OK)); then
  # --- flatten and compact: one new qcow2, no backing file ---------------------------
  if [[ $backend == file ]]; then
    conv=$stage_dir/disk.qcow2
    space_at=$root
  else
    conv=$work/disk.qcow2
    space_at=$work
  fi
  qemu-img measure --output=json -O qcow2 "${convert_opts[@]:1}" -- "$disk_abs" >"$work/measure.json" 2>"$work/op.err" ||
    die "qemu-img measure of $disk failed: $(op_error)"
  required=$(jq -r '.required' "$work/measure.json")
  [[ $required =~ ^[0-9]+$ ]] || die "qemu-img measure gave no required size for $disk"
  need=$((required + 1048576))
  [[ $backend != file ]] || need=$((need + vars_size + efi_size + ${report_size:-0}))
  avail=$(df -B1 --output=avail -- "$space_at" | tail -n 1)
  [[ ! $avail =~ ^[0-9]+$ ]] || ((avail >= need)) ||
    die "not enough free space in $space_at: publishing needs $(mib "$need") MiB, $(mib "$avail") MiB are free (the flattened disk as qemu-img measure counts it, and the small files)"
  log "flattening $disk into $conv (qemu-img convert -O qcow2${convert_opts[*]:+ ${convert_opts[*]}}; at most $(mib "$required") MiB)"
  t0=$SECONDS
  with_progress "flattening" "$required" "$work/convert.err" conv_size \
    qemu-img convert -O qcow2 "${convert_opts[@]}" -- "$disk_abs" "$conv" ||
    die "qemu-img convert of $disk failed: $(grep -v '^[[:space:]]*$' "$work/convert.err" | tail -n 1 | cut -c1-400)"
  # Neither the disk nor a file of its chain may have changed meanwhile.
  [[ "$(chain_state)" == "$chain_stat" ]] ||
    die "$disk (or its backing chain) changed while it was converted (was the VM started?); nothing was published"
  ensure_not_in_use "$disk" qcow2
  qemu-img check -f qcow2 -- "$conv" >/dev/null 2>"$work/op.err" ||
    die "the flattened copy $conv does not pass qemu-img check: $(op_error)"
  qemu-img map -f qcow2 --output=json -- "$conv" >"$work/map.json" 2>"$work/op.err" ||
    die "qemu-img map of $conv failed: $(op_error)"
  allocated=$(jq '[.[] | select(.data and (.zero | not)) | .length] | add // 0' "$work/map.json")
  size=$(stat -c %s -- "$conv")
  log "flattened in $((SECONDS - t0)) s: $(mib "$size") MiB published for $(mib "$allocated") MiB of data ($(mib "$vsize") MiB virtual, compression $compression)"

  log "computing the SHA-256 of $conv"
  sha=$(sha256_of "$conv") || die "hashing $conv failed"
  [[ $sha =~ ^[0-9a-f]{64}$ ]] || die "could not compute the SHA-256 of $conv"
  log "sha256 $sha"
  [[ $backend != file ]] || sync -- "$conv" 2>/dev/null || true
  # A partial stamp (a run killed while writing it) does not parse and is ignored.
  printf '%s %s %s %s %s\n' "$sha" "$size" "$compression" "$chain_digest" "$allocated" >"$stamp"
  converted=1
  published_state "$sha"
fi

# Folder: installs the files prepared in $stage_dir/$sha/ under the folder
# lock, then latest.json. FULL=1: the whole set (replacing an incomplete
# <sha>/); 0: the small files and the manifest into a <sha>/ that holds the disk.
install_in_folder() { # FULL
  folder_lock
  published_state "$sha"
  if ((PUB_COMPLETE)); then
    manifest=$PUB_JSON
    log "$(uri "$sha/") was completed meanwhile by another publish; using it"
  elif (($1)); then
    [[ ! -e $root/$sha ]] || fs_rename "$root/$sha" "$stage_dir/replaced"
    fs_rename "$stage_dir/$sha" "$root/$sha"
    verify_sizes "$sha"
    log "published $(uri "$sha/")"
  elif ((PUB_DISK_OK)); then
    local f
    for f in QEMU_VARS.fd QEMU_EFI.fd software-report.json manifest.json; do
      [[ ! -e $stage_dir/$sha/$f ]] || fs_rename "$stage_dir/$sha/$f" "$root/$sha/$f"
    done
    log "published $(uri "$sha/") (manifestVersion 2)"
  else
    die "$(uri "$sha/") changed while this publish ran; run it again"
  fi
  sync -- "$root" 2>/dev/null || true
  update_latest
  folder_unlock
}

if ((PUB_COMPLETE)); then
  manifest=$PUB_JSON
  if ((converted)); then
    log "this disk was already published at $(uri "$sha/"); no upload needed"
  else
    log "$disk (sha256 $sha) is already published at $(uri "$sha/"); no upload needed"
  fi
  if [[ $backend == file ]]; then
    folder_lock
    update_latest
    folder_unlock
  fi
elif ((PUB_DISK_OK)); then
  # --- the disk is there: add or replace the small files, write a v2 manifest --
  log "$(uri "$sha/disk.qcow2") is already published; writing its variables, firmware and a manifestVersion 2 manifest (no disk upload)"
  build_manifest "$sha" "${PUB_CREATED:-$(date -u +%Y-%m-%dT%H:%M:%SZ)}"
  manifest=$MANIFEST
  ensure_fits "$manifest"
  if [[ $backend == file ]]; then
    avail=$(df -B1 --output=avail -- "$root" | tail -n 1)
    need=$((vars_size + efi_size + 1048576))
    [[ ! $avail =~ ^[0-9]+$ ]] || ((avail >= need)) ||
      die "not enough free space in $root: publishing needs $(mib "$need") MiB, $(mib "$avail") MiB are free"
    mkdir -- "$stage_dir/$sha"
    ((PUB_VARS_OK)) || stage_copy "$vars" "$stage_dir/$sha/QEMU_VARS.fd"
    ((PUB_EFI_OK)) || stage_copy "$efi" "$stage_dir/$sha/QEMU_EFI.fd"
    ((PUB_REPORT_OK)) || [[ -z $report_sha ]] || stage_copy "$report" "$stage_dir/$sha/software-report.json"
    printf '%s\n' "$manifest" >"$work/put.json"
    stage_copy "$work/put.json" "$stage_dir/$sha/manifest.json"
    install_in_folder 0
  else
    if ((!PUB_VARS_OK)); then
      log "uploading $vars to $(uri "$sha/QEMU_VARS.fd")"
      put_file "$vars" "$(key "$sha/QEMU_VARS.fd")"
    fi
    if ((!PUB_EFI_OK)); then
      log "uploading $efi to $(uri "$sha/QEMU_EFI.fd")"
      put_file "$efi" "$(key "$sha/QEMU_EFI.fd")"
    fi
    if ((!PUB_REPORT_OK)) && [[ -n $report_sha ]]; then
      log "uploading $report to $(uri "$sha/software-report.json")"
      put_file "$report" "$(key "$sha/software-report.json")" application/json
    fi
    verify_sizes "$sha"
    put_json "$manifest" "$(key "$sha/manifest.json")"
    log "published $(uri "$sha/") (manifestVersion 2)"
  fi
else
  # --- the whole set ---------------------------------------------------------------
  build_manifest "$sha" "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  manifest=$MANIFEST
  ensure_fits "$manifest"
  if [[ $backend == file ]]; then
    log "copying to $(uri "$sha/") (built in $stage_dir, then renamed)"
    mkdir -- "$stage_dir/$sha"
    chmod 0755 -- "$stage_dir/$sha"
    chmod 0644 -- "$stage_dir/disk.qcow2"
    fs_rename "$stage_dir/disk.qcow2" "$stage_dir/$sha/disk.qcow2"
    stage_copy "$vars" "$stage_dir/$sha/QEMU_VARS.fd"
    stage_copy "$efi" "$stage_dir/$sha/QEMU_EFI.fd"
    [[ -z $report_sha ]] || stage_copy "$report" "$stage_dir/$sha/software-report.json"
    printf '%s\n' "$manifest" >"$work/put.json"
    stage_copy "$work/put.json" "$stage_dir/$sha/manifest.json"
    sync -- "$stage_dir/$sha" 2>/dev/null || true
    install_in_folder 1
  else
    image_key=$(key "$sha/disk.qcow2")
    log "uploading the flattened disk.qcow2 ($(mib "$size") MiB) to $(at "$image_key")"
    put_disk "$conv" "$size" "$image_key"
    rm -f -- "$conv"
    log "uploading $vars to $(uri "$sha/QEMU_VARS.fd")"
    put_file "$vars" "$(key "$sha/QEMU_VARS.fd")"
    log "uploading $efi to $(uri "$sha/QEMU_EFI.fd")"
    put_file "$efi" "$(key "$sha/QEMU_EFI.fd")"
    if [[ -n $report_sha ]]; then
      log "uploading $report to $(uri "$sha/software-report.json")"
      put_file "$report" "$(key "$sha/software-report.json")" application/json
    fi

    verify_sizes "$sha"
    put_json "$manifest" "$(key "$sha/manifest.json")"
    log "published $(uri "$sha/")"
  fi
fi
# S3: latest.json last (a folder wrote it under its lock).
[[ $backend != s3 ]] || update_latest

ensure_fits "$manifest"
printf '%s\n' "$manifest" >&3

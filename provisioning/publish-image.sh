#!/usr/bin/env bash
# publish-image.sh - publish the provisioned VM disk and EFI variables to S3
# or to a folder.
#
# Usage: publish-image.sh VM_DIR DEST_URI
#
#   VM_DIR    directory holding disk.qcow2 and QEMU_VARS.fd (the VM must be off)
#   DEST_URI  s3://bucket/prefix/ (trailing slash optional; the prefix may be
#             empty), or file:///absolute/dir/ (percent-encoding allowed; the
#             folder is created when missing)
#
# Env:
#   S3_ENDPOINT_URL      passed to aws as --endpoint-url (S3-compatible servers)
#   IMAGE_SOURCE_URL     recorded in the manifest as sourceUrl (null when unset)
#   IMAGE_SOURCE_SHA256  recorded as sourceSha256 (64 hex digits, null when unset)
#   WINDOWS_VERSION      recorded as windowsVersion (null when unset)
#   PUBLISH_PROGRESS_INTERVAL_S  seconds between progress lines, default 10
#   AWS credentials/region       the usual aws CLI variables or instance profile
#
# Layout (<p> = the prefix or folder, <sha> = SHA-256 of disk.qcow2):
#   <p>/staging/<id>/disk.qcow2  upload in progress; removed once copied. An
#                                interrupted S3 run may leave it behind: expire
#                                <p>/staging/ (and incomplete multipart uploads)
#                                with a bucket lifecycle rule. In a folder it is
#                                removed on failure, and leftovers of killed
#                                runs older than a day are swept at the start.
#   <p>/<sha>/disk.qcow2         the image, content-addressed
#   <p>/<sha>/QEMU_VARS.fd       the EFI variable store that goes with it
#   <p>/<sha>/manifest.json      written last in <p>/<sha>/: present = complete
#   <p>/latest.json              a copy of the newest manifest, written only after
#                                everything above is verified, so an interrupted
#                                publish leaves the previous latest.json pointing
#                                at a complete image.
#
# How: the disk is read once. It is hashed while it streams to the staging key
# (tee to openssl/sha256sum and `aws s3 cp -`, or to the staging file), then
# copied server-side to its content-addressed key (in a folder: renamed), its
# size checked, the manifest written and read back, staging deleted, and
# latest.json written last. In a folder every file is written under a temporary
# name, flushed to disk and renamed, so a reader never sees a partial file, and
# the free space is checked before the copy.
# $VM_DIR/disk.qcow2.sha256 ("<sha256> <size> <mtime>") records the hash; while
# it matches the disk and <p>/<sha>/manifest.json exists (with the same
# QEMU_VARS.fd), a rerun uploads nothing and only makes latest.json point at it.
#
# Refuses to run while a QEMU process holds the disk or the variable store
# (qemu-img cannot take the shared lock), and fails if the disk changes during
# the upload.
#
# Output: stdout is exactly one line, the manifest as compact JSON:
#   {"manifestVersion":1,"sha256":...,"size":...,"format":"qcow2","virtualSize":...,
#    "imageUri":...,"varsUri":...,"varsSha256":...,"varsSize":...,"manifestUri":...,
#    "sourceUrl":...,"sourceSha256":...,"windowsVersion":...,"createdAt":"...Z"}
# Everything else (progress, aws output) goes to stderr, prefixed
# "publish-image:". Exit 0 when latest.json points at the image; 1 with a message
# naming the cause otherwise; 2 on bad usage.
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

readonly PROG=publish-image
# CopyObject copies at most 5 GiB in one request; larger objects are copied in
# parts by `aws s3 cp s3://... s3://...`.
readonly SINGLE_COPY_MAX=$((4 * 1024 * 1024 * 1024))

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

disk=$vm_dir/disk.qcow2
vars=$vm_dir/QEMU_VARS.fd
stamp=$disk.sha256
[[ -f $disk ]] || die "$disk not found"
[[ -f $vars ]] || die "$vars not found"
command -v qemu-img >/dev/null || die "qemu-img not found (install the qemu-utils package)"
command -v jq >/dev/null || die "jq not found (install the jq package)"
[[ $backend != s3 ]] || command -v aws >/dev/null || die "aws not found (install the AWS CLI)"

aws_args=()
[[ -z ${S3_ENDPOINT_URL:-} ]] || aws_args+=(--endpoint-url "$S3_ENDPOINT_URL")

key() { if [[ -n $prefix ]]; then printf '%s/%s' "$prefix" "$1"; else printf '%s' "$1"; fi; }
at() { printf '%s/%s' "$base" "$1"; }
uri() { at "$(key "$1")"; }

work=$(mktemp -d "${TMPDIR:-/tmp}/publish-image.XXXXXX")
pids=()
# Stops PID and everything it started (a background function's own children
# would otherwise live on, holding the output open).
kill_tree() { # PID
  local c kids=()
  read -r -a kids <"/proc/$1/task/$1/children" 2>/dev/null || true
  for c in "${kids[@]}"; do kill_tree "$c"; done
  kill "$1" 2>/dev/null || true
}
kill_children() {
  local p
  for p in "${pids[@]}"; do kill_tree "$p"; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
staging_key=
cleanup() {
  kill_children
  # A failed run removes its staging file from a folder (S3: lifecycle rule).
  [[ $backend != file || -z $staging_key ]] || remove_staging "$staging_key"
  rm -rf -- "$work"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM
trap 'log "hung up"; exit 129' HUP
trap 'exit 141' PIPE

# Storage operations. Each sends its error output to $work/op.err (see
# op_error) and dies naming the object and the cause, except where noted.
# Runs aws with the endpoint.
s3() { aws "${aws_args[@]}" "$@" 2>"$work/op.err"; }
op_error() { grep -v '^[[:space:]]*$' "$work/op.err" | tail -n 1; }

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

# Sets OBJ_SIZE to the size of KEY, or to "" when it does not exist.
object_size() { # KEY
  OBJ_SIZE=
  if [[ $backend == file ]]; then
    [[ ! -f $root/$1 ]] || OBJ_SIZE=$(stat -c %s -- "$root/$1")
    return 0
  fi
  if OBJ_SIZE=$(s3 s3api head-object --bucket "$bucket" --key "$1" --query ContentLength --output text); then
    return 0
  fi
  OBJ_SIZE=
  s3_absent "$1" || die "cannot read $(at "$1"): $(op_error)"
}

# Copies KEY to FILE; status 1 when it does not exist.
get_object() { # KEY FILE
  rm -f -- "$2"
  if [[ $backend == file ]]; then
    [[ -e $root/$1 ]] || return 1
    cp -- "$root/$1" "$2" 2>"$work/op.err" || die "cannot read $(at "$1"): $(op_error)"
    return 0
  fi
  s3 s3 cp --only-show-errors "s3://$bucket/$1" "$2" && return 0
  s3_absent "$1" || die "cannot read $(at "$1"): $(op_error)"
  return 1
}

# Folder backend: makes DEST (a path under $root) from FILE by copying it under
# a temporary name, flushing it to disk and renaming it (readers never see a
# partial file). With "move", FILE is renamed instead (same file system).
fs_install() { # FILE DEST [move]
  local tmp
  mkdir -p -- "$(dirname -- "$2")" 2>"$work/op.err" || return 1
  if [[ ${3:-} == move ]]; then
    mv -f -- "$1" "$2" 2>"$work/op.err"
    return
  fi
  tmp=$(mktemp -- "$2.tmp.XXXXXX" 2>"$work/op.err") || return 1
  if cp -- "$1" "$tmp" 2>"$work/op.err" && chmod 0644 -- "$tmp" && sync -- "$tmp" 2>"$work/op.err" &&
    mv -f -- "$tmp" "$2" 2>"$work/op.err"; then
    return 0
  fi
  rm -f -- "$tmp"
  return 1
}

put_file() { # FILE KEY [CONTENT_TYPE]
  if [[ $backend == file ]]; then
    fs_install "$1" "$root/$2" || die "writing $1 to $(at "$2") failed: $(op_error)"
    return 0
  fi
  s3 s3 cp --only-show-errors --content-type "${3:-application/octet-stream}" -- "$1" "s3://$bucket/$2" ||
    die "upload of $1 to $(at "$2") failed: $(op_error)"
}

# Writes stdin to KEY (the staging upload; runs in the background, so it
# reports through its exit status and $work/upload.err, never dies).
put_stream() { # KEY SIZE
  if [[ $backend == file ]]; then
    mkdir -p -- "$(dirname -- "$root/$1")" && cat >"$root/$1" && sync -- "$root/$1"
    return
  fi
  aws "${aws_args[@]}" s3 cp --only-show-errors --expected-size "$2" - "s3://$bucket/$1"
}

# Copies SRC_KEY to DST_KEY (S3: server side) or, in a folder, renames it.
promote() { # SRC_KEY DST_KEY SIZE
  if [[ $backend == file ]]; then
    if ! { chmod 0644 -- "$root/$1" 2>"$work/op.err" && fs_install "$root/$1" "$root/$2" move; }; then
      die "moving $(at "$1") to $(at "$2") failed: $(op_error)"
    fi
  elif (($3 <= SINGLE_COPY_MAX)); then
    s3 s3api copy-object --bucket "$bucket" --key "$2" --copy-source "$bucket/$1" >/dev/null ||
      die "server-side copy to $(at "$2") failed: $(op_error)"
  else
    # Copies tags too (the host role may Get/PutObjectTagging under the prefix).
    s3 s3 cp --only-show-errors "s3://$bucket/$1" "s3://$bucket/$2" ||
      die "server-side copy to $(at "$2") failed: $(op_error)"
  fi
}

# Deletes the staging KEY (and, in a folder, its directory); only warns.
remove_staging() { # KEY
  if [[ $backend == file ]]; then
    rm -f -- "${root:?}/$1" && rmdir -- "$(dirname -- "$root/$1")" 2>/dev/null
    rmdir -- "$root/$(key staging)" 2>/dev/null || true
    return 0
  fi
  s3 s3 rm --only-show-errors "s3://$bucket/$1" || log "warning: could not delete $(at "$1"): $(op_error)"
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

ensure_not_in_use "$disk" qcow2
ensure_not_in_use "$vars" raw

disk_stat=$(stat -c '%s %.9Y' -- "$disk")
size=${disk_stat%% *}
vsize=$(qemu-img info -U --output=json -f qcow2 -- "$disk" | jq -r '."virtual-size"')
vars_size=$(stat -c %s -- "$vars")
vars_sha=$(sha256_of "$vars") || die "could not read $vars"

# Sets MANIFEST to the published manifest for SHA if it is complete and matches
# this disk and QEMU_VARS.fd; to "" otherwise.
published_manifest() { # SHA
  MANIFEST=
  get_object "$(key "$1/manifest.json")" "$work/published.json" || return 0
  jq -e --arg sha "$1" --argjson size "$size" --arg vsha "$vars_sha" \
    '.sha256 == $sha and .size == $size and .varsSha256 == $vsha' >/dev/null 2>&1 <"$work/published.json" ||
    return 0
  object_size "$(key "$1/disk.qcow2")"
  [[ $OBJ_SIZE == "$size" ]] || return 0
  object_size "$(key "$1/QEMU_VARS.fd")"
  [[ $OBJ_SIZE == "$vars_size" ]] || return 0
  MANIFEST=$(jq -c . <"$work/published.json")
}

# Uploads the compact JSON in VALUE to KEY and checks it reads back equal.
put_json() { # VALUE KEY
  printf '%s\n' "$1" >"$work/put.json"
  put_file "$work/put.json" "$2" application/json
  get_object "$2" "$work/readback.json" || die "$(at "$2") is missing after it was written"
  jq -e --argjson want "$1" '. == $want' >/dev/null 2>&1 <"$work/readback.json" ||
    die "$(at "$2") does not read back as written"
}

if [[ $backend == file ]]; then
  mkdir -p -- "$root" 2>"$work/op.err" || die "cannot create the folder $root: $(op_error)"
  [[ -w $root ]] || die "the folder $root is not writable by $(id -un)"
  # Staging left by runs that were killed (a failing run removes its own).
  if [[ -d $root/$(key staging) ]]; then
    while IFS= read -r -d '' old; do
      log "removing stale staging folder $old"
      rm -rf -- "$old"
    done < <(find "$root/$(key staging)" -mindepth 1 -maxdepth 1 -mmin +1440 -print0)
  fi
fi

manifest=
sha=
if [[ -f $stamp ]]; then
  read -r st_sha st_size st_mtime _ <"$stamp" || true
  if [[ ${st_sha:-} =~ ^[0-9a-f]{64}$ && "${st_size:-} ${st_mtime:-}" == "$disk_stat" ]]; then
    sha=$st_sha
    published_manifest "$sha"
    manifest=$MANIFEST
    if [[ -n $manifest ]]; then
      log "$disk (sha256 $sha) is already published at $(uri "$sha/"); no upload needed"
    fi
  fi
fi

if [[ -z $manifest ]]; then
  if [[ $backend == file ]]; then
    avail=$(df -B1 --output=avail -- "$root" | tail -n 1)
    need=$((size + vars_size + 1048576))
    [[ ! $avail =~ ^[0-9]+$ ]] || ((avail >= need)) ||
      die "not enough free space in $root: publishing needs $(mib "$need") MiB, $(mib "$avail") MiB are free"
  fi
  # --- stream the disk to staging, hashing it on the way ---------------------
  staging_key=$(key "staging/$(date -u +%Y%m%dT%H%M%SZ)-$$-$RANDOM/disk.qcow2")
  log "uploading $disk ($(mib "$size") MiB) to $(at "$staging_key"), computing its SHA-256 on the way"
  mkfifo "$work/hash.fifo" "$work/upload.fifo"
  t0=$SECONDS
  sha256_of <"$work/hash.fifo" >"$work/disk.sha" &
  hasher=$!
  put_stream "$staging_key" "$size" <"$work/upload.fifo" 2>"$work/upload.err" &
  uploader=$!
  tee "$work/hash.fifo" <"$disk" >"$work/upload.fifo" &
  reader=$!
  pids=("$reader" "$uploader" "$hasher")
  (
    # Progress: how far tee has read the disk.
    sleeper=
    trap '[[ -z $sleeper ]] || kill "$sleeper" 2>/dev/null; exit 0' TERM
    while :; do
      sleep "$interval" >/dev/null 2>&1 &
      sleeper=$!
      wait "$sleeper"
      pos=$(awk '/^pos:/ {print $2}' "/proc/$reader/fdinfo/0" 2>/dev/null) || exit 0
      [[ -n $pos ]] || exit 0
      el=$((SECONDS - t0))
      log "uploaded $(mib "$pos") of $(mib "$size") MiB ($((size > 0 ? pos * 100 / size : 100))%), $((el > 0 ? pos / 1048576 / el : 0)) MiB/s"
    done
  ) &
  pids+=("$!")
  rc_reader=0 rc_uploader=0 rc_hasher=0
  wait "$reader" || rc_reader=$?
  wait "$uploader" || rc_uploader=$?
  wait "$hasher" || rc_hasher=$?
  # Those three are reaped (their pids may be reused): only the progress loop is left to stop.
  pids=("${pids[@]:3}")
  kill_children
  if ((rc_uploader != 0)); then
    die "upload of $disk to $(at "$staging_key") failed: $(grep -v '^[[:space:]]*$' "$work/upload.err" | tail -n 1)"
  fi
  ((rc_reader == 0)) || die "reading $disk failed (tee exit $rc_reader)"
  ((rc_hasher == 0)) || die "hashing $disk failed (exit $rc_hasher)"
  read -r sha _ <"$work/disk.sha"
  [[ $sha =~ ^[0-9a-f]{64}$ ]] || die "could not compute the SHA-256 of $disk"
  el=$((SECONDS - t0))
  log "uploaded $(mib "$size") MiB in ${el} s; sha256 $sha"

  # The disk must not have changed while it was read.
  [[ "$(stat -c '%s %.9Y' -- "$disk")" == "$disk_stat" ]] ||
    die "$disk changed during the upload (was the VM started?); nothing was published"
  ensure_not_in_use "$disk" qcow2
  object_size "$staging_key"
  [[ $OBJ_SIZE == "$size" ]] ||
    die "staging object $(at "$staging_key") is ${OBJ_SIZE:-missing}, expected $size bytes"
  tmp=$(mktemp "$stamp.XXXXXX")
  printf '%s %s\n' "$sha" "$disk_stat" >"$tmp"
  chmod 0644 -- "$tmp"
  mv -f -- "$tmp" "$stamp"

  published_manifest "$sha"
  manifest=$MANIFEST
  if [[ -n $manifest ]]; then
    log "this disk was already published at $(uri "$sha/")"
  else
    # --- content-addressed copy ----------------------------------------------
    image_key=$(key "$sha/disk.qcow2")
    log "copying to $(at "$image_key")$([[ $backend == file ]] || echo " (server side)")"
    promote "$staging_key" "$image_key" "$size"
    log "uploading $vars to $(uri "$sha/QEMU_VARS.fd")"
    put_file "$vars" "$(key "$sha/QEMU_VARS.fd")"

    object_size "$image_key"
    [[ $OBJ_SIZE == "$size" ]] || die "$(uri "$sha/disk.qcow2") is ${OBJ_SIZE:-missing}, expected $size bytes"
    object_size "$(key "$sha/QEMU_VARS.fd")"
    [[ $OBJ_SIZE == "$vars_size" ]] ||
      die "$(uri "$sha/QEMU_VARS.fd") is ${OBJ_SIZE:-missing}, expected $vars_size bytes"

    # --- manifest --------------------------------------------------------------
    manifest=$(jq -cn \
      --arg sha "$sha" --argjson size "$size" --argjson vsize "$vsize" \
      --arg image "$(uri "$sha/disk.qcow2")" --arg varsUri "$(uri "$sha/QEMU_VARS.fd")" \
      --arg varsSha "$vars_sha" --argjson varsSize "$vars_size" \
      --arg manifestUri "$(uri "$sha/manifest.json")" \
      --arg sourceUrl "$source_url" --arg sourceSha "$source_sha" --arg winver "$windows_version" \
      --arg createdAt "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
      '{manifestVersion: 1, sha256: $sha, size: $size, format: "qcow2", virtualSize: $vsize,
        imageUri: $image, varsUri: $varsUri, varsSha256: $varsSha, varsSize: $varsSize,
        manifestUri: $manifestUri,
        sourceUrl: (if $sourceUrl == "" then null else $sourceUrl end),
        sourceSha256: (if $sourceSha == "" then null else $sourceSha end),
        windowsVersion: (if $winver == "" then null else $winver end),
        createdAt: $createdAt}')
    put_json "$manifest" "$(key "$sha/manifest.json")"
    log "published $(uri "$sha/")"
  fi
  remove_staging "$staging_key"
  staging_key=
fi

# --- latest.json, last ---------------------------------------------------------
latest_key=$(key latest.json)
if get_object "$latest_key" "$work/latest.json" &&
  jq -e --argjson want "$manifest" '. == $want' >/dev/null 2>&1 <"$work/latest.json"; then
  log "$(uri latest.json) already points at sha256 $sha"
else
  put_json "$manifest" "$latest_key"
  log "$(uri latest.json) now points at sha256 $sha"
fi

printf '%s\n' "$manifest" >&3

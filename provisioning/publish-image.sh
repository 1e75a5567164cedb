#!/usr/bin/env bash
# publish-image.sh - publish the provisioned VM disk and EFI variables to S3.
#
# Usage: publish-image.sh VM_DIR S3_URI
#
#   VM_DIR  directory holding disk.qcow2 and QEMU_VARS.fd (the VM must be off)
#   S3_URI  s3://bucket/prefix/ (trailing slash optional; the prefix may be empty)
#
# Env:
#   S3_ENDPOINT_URL      passed to aws as --endpoint-url (S3-compatible servers)
#   IMAGE_SOURCE_URL     recorded in the manifest as sourceUrl (null when unset)
#   IMAGE_SOURCE_SHA256  recorded as sourceSha256 (64 hex digits, null when unset)
#   WINDOWS_VERSION      recorded as windowsVersion (null when unset)
#   PUBLISH_PROGRESS_INTERVAL_S  seconds between progress lines, default 10
#   AWS credentials/region       the usual aws CLI variables or instance profile
#
# S3 layout (<p> = the prefix, <sha> = SHA-256 of disk.qcow2):
#   <p>/staging/<id>/disk.qcow2  upload in progress; removed once copied. An
#                                interrupted run may leave it behind: expire
#                                <p>/staging/ (and incomplete multipart uploads)
#                                with a bucket lifecycle rule.
#   <p>/<sha>/disk.qcow2         the image, content-addressed
#   <p>/<sha>/QEMU_VARS.fd       the EFI variable store that goes with it
#   <p>/<sha>/manifest.json      written last in <p>/<sha>/: present = complete
#   <p>/latest.json              a copy of the newest manifest, written only after
#                                everything above is verified, so an interrupted
#                                publish leaves the previous latest.json pointing
#                                at a complete image.
#
# How: the disk is read once. It is hashed while it streams to the staging key
# (tee to openssl/sha256sum and `aws s3 cp -`), then copied server-side to its
# content-addressed key, its size checked with head-object, the manifest written
# and read back, staging deleted, and latest.json written last.
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

readonly PROG=publish-image
# CopyObject copies at most 5 GiB in one request; larger objects are copied in
# parts by `aws s3 cp s3://... s3://...`.
readonly SINGLE_COPY_MAX=$((4 * 1024 * 1024 * 1024))

# Keep stdout for the single result line; everything else goes to stderr.
exec 3>&1 1>&2

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}
usage() {
  log "usage: publish-image.sh VM_DIR S3_URI"
  exit 2
}

[[ $# -eq 2 && -n $1 && -n $2 ]] || usage
vm_dir=$1
s3_uri=$2
interval=${PUBLISH_PROGRESS_INTERVAL_S:-10}
[[ $interval =~ ^[1-9][0-9]*$ ]] || die "PUBLISH_PROGRESS_INTERVAL_S must be a positive integer, got '$interval'"

[[ $s3_uri == s3://?* ]] || die "S3_URI '$s3_uri' must look like s3://bucket/prefix/"
rest=${s3_uri#s3://}
bucket=${rest%%/*}
prefix=
[[ $rest != */* ]] || prefix=${rest#*/}
while [[ $prefix == */ ]]; do prefix=${prefix%/}; done
[[ -n $bucket ]] || die "S3_URI '$s3_uri' has no bucket name"

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
command -v aws >/dev/null || die "aws not found (install the AWS CLI)"

aws_args=()
[[ -z ${S3_ENDPOINT_URL:-} ]] || aws_args+=(--endpoint-url "$S3_ENDPOINT_URL")

key() { if [[ -n $prefix ]]; then printf '%s/%s' "$prefix" "$1"; else printf '%s' "$1"; fi; }
uri() { printf 's3://%s/%s' "$bucket" "$(key "$1")"; }
mib() { echo $((($1 + 524288) / 1048576)); }

work=$(mktemp -d "${TMPDIR:-/tmp}/publish-image.XXXXXX")
pids=()
kill_children() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
cleanup() {
  kill_children
  rm -rf -- "$work"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM
trap 'log "hung up"; exit 129' HUP
trap 'exit 141' PIPE

# SHA-256 hex digest of FILE, or of stdin without FILE. OpenSSL uses the CPU's
# SHA instructions (x86 SHA-NI, ARMv8 crypto extensions) and is several times
# faster than coreutils sha256sum, which is the fallback.
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

# Runs aws with the endpoint; its stderr goes to $work/aws.err (see aws_error).
s3() { aws "${aws_args[@]}" "$@" 2>"$work/aws.err"; }
aws_error() { grep -v '^[[:space:]]*$' "$work/aws.err" | tail -n 1; }

# Sets OBJ_SIZE to the size of s3://bucket/KEY, or to "" when it does not exist.
object_size() {
  OBJ_SIZE=
  if OBJ_SIZE=$(s3 s3api head-object --bucket "$bucket" --key "$1" --query ContentLength --output text); then
    return 0
  fi
  OBJ_SIZE=
  grep -qE '\(404\)|Not Found|NoSuchKey' "$work/aws.err" || die "cannot read s3://$bucket/$1: $(aws_error)"
}

# Downloads s3://bucket/KEY to FILE; status 1 when it does not exist.
get_object() { # KEY FILE
  rm -f -- "$2"
  s3 s3 cp --only-show-errors "s3://$bucket/$1" "$2" && return 0
  grep -qE '\(404\)|Not Found|NoSuchKey|does not exist' "$work/aws.err" ||
    die "cannot read s3://$bucket/$1: $(aws_error)"
  return 1
}

put_file() { # FILE KEY
  s3 s3 cp --only-show-errors --content-type "${3:-application/octet-stream}" -- "$1" "s3://$bucket/$2" ||
    die "upload of $1 to s3://$bucket/$2 failed: $(aws_error)"
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
  get_object "$2" "$work/readback.json" || die "s3://$bucket/$2 is missing after upload"
  jq -e --argjson want "$1" '. == $want' >/dev/null 2>&1 <"$work/readback.json" ||
    die "s3://$bucket/$2 does not read back as written"
}

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
  # --- stream the disk to staging, hashing it on the way ---------------------
  staging_key=$(key "staging/$(date -u +%Y%m%dT%H%M%SZ)-$$-$RANDOM/disk.qcow2")
  log "uploading $disk ($(mib "$size") MiB) to s3://$bucket/$staging_key, computing its SHA-256 on the way"
  mkfifo "$work/hash.fifo" "$work/upload.fifo"
  t0=$SECONDS
  sha256_of <"$work/hash.fifo" >"$work/disk.sha" &
  hasher=$!
  aws "${aws_args[@]}" s3 cp --only-show-errors --expected-size "$size" - "s3://$bucket/$staging_key" \
    <"$work/upload.fifo" 2>"$work/upload.err" &
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
  kill_children
  if ((rc_uploader != 0)); then
    die "upload of $disk to s3://$bucket/$staging_key failed: $(grep -v '^[[:space:]]*$' "$work/upload.err" | tail -n 1)"
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
    die "staging object s3://$bucket/$staging_key is ${OBJ_SIZE:-missing}, expected $size bytes"
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
    log "copying to s3://$bucket/$image_key (server side)"
    if ((size <= SINGLE_COPY_MAX)); then
      s3 s3api copy-object --bucket "$bucket" --key "$image_key" \
        --copy-source "$bucket/$staging_key" >/dev/null ||
        die "server-side copy to s3://$bucket/$image_key failed: $(aws_error)"
    else
      s3 s3 cp --only-show-errors "s3://$bucket/$staging_key" "s3://$bucket/$image_key" ||
        die "server-side copy to s3://$bucket/$image_key failed: $(aws_error)"
    fi
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
  s3 s3 rm --only-show-errors "s3://$bucket/$staging_key" ||
    log "warning: could not delete s3://$bucket/$staging_key: $(aws_error)"
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

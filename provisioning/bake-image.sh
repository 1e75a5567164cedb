#!/usr/bin/env bash
# bake-image.sh - on the bake instance: install the published image and make
# this instance's file system the builder AMI, then power off.
#
# Usage: bake-image.sh MANIFEST_JSON ENV_FILE
#        (bake-image.sh --worker STATE_DIR MANIFEST_JSON ENV_FILE is its own
#        bounded part, started under timeout; not for direct use)
#
#   MANIFEST_JSON  the published image's manifest (publish-image.sh's output,
#                  manifestVersion 2). Used: files[] (name, uri, sha256, size)
#                  with at least disk.qcow2, QEMU_VARS.fd and QEMU_EFI.fd;
#                  sha256 (must equal disk.qcow2's); virtualSize (checked
#                  against the qcow2 when present). uri: s3://bucket/key or
#                  file:///abs/path (percent-encoding allowed).
#   ENV_FILE       the image VM's env file (what run-vm.sh reads; refused when
#                  it sets VM_CONFIG_ISO). VM_DIR in it (default
#                  /var/lib/windows-vm) is where the files go.
#
# Runs once as root from the bake instance's user data (a transient systemd
# unit, so cloud-init finishes before the clean-up). Steps, each a "stage":
#   1. check the inputs and the tools the image needs (qemu-system-aarch64,
#      qemu-img, socat, jq; aws for s3:// URIs) and the free space;
#   2. fetch each file into BAKE_ROOT$VM_DIR/NAME (dir 0700, files 0600):
#      streamed once through tee into the file and a SHA-256, progress every
#      BAKE_PROGRESS_INTERVAL_S; size and SHA-256 checked against the manifest
#      before it is renamed into place; NAME.sha256 ("<sha256> <size>
#      <mtime>") records it, so a rerun skips a verified file. s3:// downloads
#      are tried BAKE_FETCH_ATTEMPTS times unless the object is missing or
#      access is denied; file:// sources are copied;
#   3. check disk.qcow2 with qemu-img (format, virtual size); a compressed one
#      (publish's IMAGE_COMPRESSION=zstd: clusters without a host offset in
#      `qemu-img map`) is converted once into an uncompressed qcow2 (free
#      space checked with `qemu-img measure`), since the image VM always
#      runs an uncompressed disk, and its NAME.sha256 then records the
#      converted file as derived from the verified download; check that every
#      file ENV_FILE names (VM_DISK, VM_EFI_*, VM_DRIVERS_ISO, VM_INSTALL_ISO)
#      is now in place, since run-vm.sh would refuse to start without it;
#   4. wait for cloud-init to finish (BAKE_ROOT=/ only), then prepare-ami.sh
#      --generalize: launcher, vm.env (VM_HALT_ON_EXIT=1) and
#      windows-vm.service installed and enabled; cloud-init state with this
#      instance's user data, SSH host keys, machine-id and journal removed;
#   5. write the status to BAKE_STATUS_URI and power off.
# Steps 1-4 run under `timeout BAKE_TIMEOUT_S` (the whole process group is
# ended), so a hung download ends the bake with a status naming what it
# waited for. The status is written, and the instance powered off, on every
# exit path once BAKE_STATUS_URI is valid (failure, timeout, signal), so a
# failed bake never leaves an instance running. Nothing secret is involved.
#
# Env:
#   BAKE_STATUS_URI   required: s3://bucket/key or file:///abs/path.json. Without
#                     a valid one the script exits 2 and does not power off.
#   BAKE_TIMEOUT_S    bound of steps 1-4 in seconds, default 5400; writing the
#                     status takes at most 3 x 60 s more
#   BAKE_ROOT         root file system to prepare, default /
#   BAKE_POWEROFF_COMMAND  run with bash -c at the end, default `systemctl poweroff`
#   BAKE_PROGRESS_INTERVAL_S  seconds between progress lines, default 10
#   BAKE_FETCH_ATTEMPTS       attempts per s3:// download, default 3
#   S3_ENDPOINT_URL   passed to aws as --endpoint-url (tests use s3rver)
#   AWS credentials/region    the usual aws CLI variables or instance profile
#
# Status (one line of compact JSON):
#   {"status":"ok","imageSha256":"<sha>","files":[{"name":..,"sha256":..,
#    "size":N,"path":"<VM_DIR>/<name>"},...],"finishedAt":"...Z"}
#   {"status":"failed","stage":"<what it was doing>","error":"<the cause>",
#    "finishedAt":"...Z"}
# Output: progress on stderr (and the console, through the unit), prefixed
# "bake-image:"; nothing on stdout.
# Exit: 0 baked; 1 failed (status "failed" written); 2 bad usage (with a valid
# BAKE_STATUS_URI the failure is reported and the instance powered off too).
# Idempotent: a rerun verifies and skips what is in place.
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

readonly PROG=bake-image
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly here self="$here/bake-image.sh"
readonly required_files=(disk.qcow2 QEMU_VARS.fd QEMU_EFI.fd)
# The snap's aws is not on a system unit's PATH everywhere.
[[ ! -d /snap/bin || :$PATH: == *:/snap/bin:* ]] || PATH=$PATH:/snap/bin

aws_args=()
[[ -z ${S3_ENDPOINT_URL:-} ]] || aws_args+=(--endpoint-url "$S3_ENDPOINT_URL")

# file:///abs/path -> /abs/path, percent-decoded; status 1 when malformed.
file_uri_path() { # URI
  local p=${1#file://}
  [[ $1 == file:///* && $p != *\\* ]] || return 1
  [[ ${p//%[0-9A-Fa-f][0-9A-Fa-f]/} != *%* && $p != *%00* ]] || return 1
  p=$(printf '%b.' "${p//%/\\x}")
  p=${p%.}
  [[ $p == /?* && $p != *$'\n'* && /$p/ != */../* ]] || return 1
  printf '%s\n' "$p"
}

# A JSON string for any text (control characters other than \n and \t dropped).
json_str() {
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/\\n}
  s=${s//$'\t'/\\t}
  s=${s//[[:cntrl:]]/}
  printf '"%s"' "$s"
}

# ============================================================================
# Worker: steps 1-4, run by the main process under timeout.
#   bake-image.sh --worker STATE_DIR MANIFEST_JSON ENV_FILE
# Writes STATE_DIR/stage (what it is doing), STATE_DIR/error (why it failed),
# STATE_DIR/files.json and STATE_DIR/image-sha256 (on success).
# ============================================================================
# Worker's background helpers (hasher, progress): stopped on TERM/INT.
bg=()
stop_bg() {
  local p
  for p in "${bg[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${bg[@]}"; do wait "$p" 2>/dev/null || true; done
  bg=()
}

worker() { # STATE_DIR MANIFEST_JSON ENV_FILE
  state=$1 manifest=$2 env_file=$3
  root=${BAKE_ROOT:-/}
  root=$(cd "$root" && pwd -P)
  [[ $root != / ]] || root=
  interval=${BAKE_PROGRESS_INTERVAL_S:-10}
  attempts=${BAKE_FETCH_ATTEMPTS:-3}

  die() {
    log "error: $*"
    printf '%s\n' "$*" >"$state/error"
    exit 1
  }
  stage() {
    printf '%s\n' "$*" >"$state/stage"
    log "$*"
  }
  # prepare-ami.sh's error message (or its last line).
  prep_error() {
    local m
    m=$(sed -n 's/^prepare-ami: error: //p' "$state/prep.err" | tail -n 1)
    [[ -n $m ]] || m=$(grep -v '^[[:space:]]*$' "$state/prep.err" | tail -n 1)
    printf '%s\n' "${m:-prepare-ami.sh failed without a message}"
  }
  bg=()
  trap 'stop_bg; exit 143' TERM
  trap 'stop_bg; exit 130' INT

  stage "checking the manifest and $env_file"
  [[ $interval =~ ^[1-9][0-9]*$ ]] || die "BAKE_PROGRESS_INTERVAL_S must be a positive integer, got '$interval'"
  [[ $attempts =~ ^[1-9][0-9]*$ ]] || die "BAKE_FETCH_ATTEMPTS must be a positive integer, got '$attempts'"
  command -v jq >/dev/null || die "jq not found (install the jq package)"
  jq -e 'type == "object"' "$manifest" >/dev/null 2>&1 || die "the manifest $manifest is not a JSON object"
  # One TSV line per file; any entry that does not fit is named.
  bad=$(jq -r '[(.files // []) | to_entries[] | .value as $f
    | select(($f | type) != "object"
      or ($f.name | type) != "string" or ($f.name | test("^[A-Za-z0-9][A-Za-z0-9._-]*$") | not)
      or ($f.uri | type) != "string" or ($f.uri | test("^(s3://[^/\\s]+/|file:///)[^\\s]+$") | not)
      or ($f.sha256 | type) != "string" or ($f.sha256 | test("^[0-9a-f]{64}$") | not)
      or ($f.size | type) != "number" or $f.size < 0 or ($f.size | floor) != $f.size)
    | "files[\(.key)] (\($f.name? // "no name"))"] | .[:3] | join(", ")' "$manifest") ||
    die "the manifest's files is not a list"
  [[ -z $bad ]] || die "the manifest's $bad needs a plain name, an s3:// or file:/// uri, a 64-hex sha256 and a size"
  mapfile -t entries < <(jq -r '(.files // [])[] | [.name, .uri, .sha256, (.size | tostring)] | @tsv' "$manifest")
  ((${#entries[@]} > 0)) || die "the manifest lists no files (files[] is missing or empty: manifestVersion 2 is needed)"
  declare -A seen=()
  for e in "${entries[@]}"; do
    IFS=$'\t' read -r n _ <<<"$e"
    [[ -z ${seen[$n]:-} ]] || die "the manifest lists $n twice"
    seen[$n]=1
  done
  for n in "${required_files[@]}"; do
    [[ -n ${seen[$n]:-} ]] || die "the manifest does not list $n (the image VM needs ${required_files[*]})"
  done
  image_sha=$(jq -r '.files[] | select(.name == "disk.qcow2") | .sha256' "$manifest")
  top_sha=$(jq -r '.sha256 // empty' "$manifest")
  [[ -z $top_sha || $top_sha == "$image_sha" ]] ||
    die "the manifest's sha256 $top_sha differs from its disk.qcow2 entry's $image_sha"
  vsize=$(jq -r '.virtualSize // empty' "$manifest")

  # The env file: prepare-ami.sh's own check (VM_CONFIG_ISO refused), which names VM_DIR.
  vm_dir=$(bash "$here/prepare-ami.sh" --check "${root:-/}" "$env_file" 2>"$state/prep.err") ||
    die "$(prep_error)"
  dir=$root$vm_dir

  need_aws=0
  for e in "${entries[@]}"; do [[ $e != *$'\ts3://'* ]] || need_aws=1; done
  missing=()
  for t in qemu-system-aarch64:qemu-system-arm qemu-img:qemu-utils socat:socat; do
    command -v "${t%%:*}" >/dev/null || missing+=("${t%%:*} (package ${t#*:})")
  done
  ((need_aws == 0)) || command -v aws >/dev/null || missing+=("aws (snap aws-cli)")
  ((${#missing[@]} == 0)) || die "not installed: ${missing[*]}; the image needs them (did the packages fail to install? see /var/log/cloud-init-output.log)"

  mkdir -p -- "$dir" || die "cannot create $vm_dir under ${root:-/}"
  chmod 0700 -- "$dir"

  stamp_of() { stat -c '%s %.9Y' -- "$1"; }
  verified() { # DEST SHA
    [[ -f $1 && -f $1.sha256 ]] && [[ "$(cat -- "$1.sha256")" == "$2 $(stamp_of "$1")" ]]
  }
  todo=0
  for e in "${entries[@]}"; do
    IFS=$'\t' read -r n _ s z <<<"$e"
    verified "$dir/$n" "$s" || todo=$((todo + z))
  done
  avail=$(df -B1 --output=avail -- "$dir" | tail -n 1 | tr -d ' ')
  if [[ $avail =~ ^[0-9]+$ ]] && ((avail < todo + 268435456)); then
    die "not enough space in $vm_dir: the files need $(mib "$todo") MiB (+256 MiB), $(mib "$avail") MiB are free; give the bake instance a larger volume"
  fi

  # Streams URI (s3:// or file://) to stdout; its errors go to $state/fetch.err.
  source_stream() { # URI
    local p
    case $1 in
      s3://*) aws "${aws_args[@]}" s3 cp --only-show-errors -- "$1" - 2>"$state/fetch.err" ;;
      file://*)
        p=$(file_uri_path "$1") || {
          echo "malformed file:// URI" >"$state/fetch.err"
          return 2
        }
        if [[ ! -f $p ]]; then
          echo "$p does not exist or is not a regular file" >"$state/fetch.err"
          return 2
        fi
        cat -- "$p" 2>"$state/fetch.err"
        ;;
    esac
  }

  # Fetches one file, verifying it on the way; dies naming it on a mismatch.
  fetch() { # NAME URI SHA SIZE
    local n=$1 uri=$2 want=$3 size=$4 dest=$dir/$1 part=$dir/$1.partial t0 rc got have attempt=1 err
    if verified "$dest" "$want"; then
      log "$n is already in place and verified (sha256 $want)"
      return 0
    fi
    stage "fetching $n from $uri"
    rm -f -- "$dest.sha256"
    while :; do
      rm -f -- "$part" "$state/hash.fifo" "$state/hash"
      mkfifo "$state/hash.fifo"
      # shellcheck disable=SC2119 # without an argument sha256_of hashes stdin
      sha256_of <"$state/hash.fifo" >"$state/hash" &
      bg=("$!")
      (
        t=$SECONDS
        while sleep "$interval" >/dev/null 2>&1; do
          b=$(stat -c %s -- "$part" 2>/dev/null) || b=0
          el=$((SECONDS - t))
          log "fetching $n: $(mib "$b") of $(mib "$size") MiB ($((size > 0 ? b * 100 / size : 100))%), $((el > 0 ? b / 1048576 / el : 0)) MiB/s"
        done
      ) &
      bg+=("$!")
      t0=$SECONDS
      rc=0
      source_stream "$uri" | tee -- "$state/hash.fifo" >"$part" || rc=$?
      if ! wait "${bg[0]}"; then ((rc != 0)) || rc=3; fi
      kill "${bg[1]}" 2>/dev/null || true
      wait "${bg[1]}" 2>/dev/null || true
      bg=()
      ((rc != 0)) || break
      rm -f -- "$part"
      err=$(grep -v '^[[:space:]]*$' "$state/fetch.err" 2>/dev/null | tail -n 1)
      err=${err:-exit status $rc}
      if [[ $uri != s3://* ]] || grep -qE '\(404\)|\(403\)|NoSuchKey|NoSuchBucket|AccessDenied|Forbidden|Not Found' \
        "$state/fetch.err" 2>/dev/null || ((attempt >= attempts)); then
        [[ $err != *'(403)'* && $err != *AccessDenied* && $err != *Forbidden* ]] ||
          err="$err (access denied: the bake role reads only the artifact prefix, and a missing object also answers 403 to it)"
        die "cannot fetch $n (attempt $attempt): $err"
      fi
      log "attempt $attempt/$attempts for $n failed: $err; retrying in 5 s"
      sleep 5
      attempt=$((attempt + 1))
    done
    have=$(stat -c %s -- "$part")
    read -r got _ <"$state/hash" || got=
    if ((have != size)); then
      rm -f -- "$part"
      die "$n is $have bytes, the manifest says $size (expected sha256 $want, actual ${got:-unknown})"
    fi
    if [[ $got != "$want" ]]; then
      rm -f -- "$part"
      die "checksum mismatch for $n: expected sha256 $want, actual ${got:-unknown}"
    fi
    chmod 0600 -- "$part"
    mv -f -- "$part" "$dest"
    printf '%s %s\n' "$want" "$(stamp_of "$dest")" >"$dest.sha256"
    chmod 0600 -- "$dest.sha256"
    log "verified $n ($(mib "$size") MiB in $((SECONDS - t0)) s, sha256 $want)"
  }

  for e in "${entries[@]}"; do
    IFS=$'\t' read -r n u s z <<<"$e"
    fetch "$n" "$u" "$s" "$z"
  done

  stage "checking disk.qcow2 with qemu-img"
  info=$(qemu-img info -U -f qcow2 --output=json -- "$dir/disk.qcow2" 2>&1) ||
    die "disk.qcow2 is not a readable qcow2 image: ${info//$'\n'/ }"
  got_vsize=$(jq -r '."virtual-size"' <<<"$info")
  [[ -z $vsize || $got_vsize == "$vsize" ]] ||
    die "disk.qcow2 has a virtual size of $got_vsize bytes, the manifest says $vsize"

  # The image VM runs an uncompressed disk: a compressed one is converted once.
  qemu-img map -f qcow2 --output=json -- "$dir/disk.qcow2" >"$state/map.json" 2>"$state/map.err" ||
    die "qemu-img map of disk.qcow2 failed: $(grep -v '^[[:space:]]*$' "$state/map.err" | tail -n 1)"
  if jq -e 'any(.[]; .data and (has("offset") | not))' "$state/map.json" >/dev/null; then
    stage "decompressing disk.qcow2 (the image VM runs an uncompressed copy)"
    need=$(qemu-img measure --output=json -O qcow2 -f qcow2 -- "$dir/disk.qcow2" 2>"$state/map.err" | jq -r '.required') ||
      die "qemu-img measure of disk.qcow2 failed: $(grep -v '^[[:space:]]*$' "$state/map.err" | tail -n 1)"
    avail=$(df -B1 --output=avail -- "$dir" | tail -n 1 | tr -d ' ')
    if [[ $avail =~ ^[0-9]+$ && $need =~ ^[0-9]+$ ]] && ((avail < need + 268435456)); then
      die "not enough space in $vm_dir to decompress disk.qcow2: it needs $(mib "$need") MiB (+256 MiB), $(mib "$avail") MiB are free; give the bake instance a larger volume"
    fi
    t0=$SECONDS
    rm -f -- "$dir/disk.qcow2.plain"
    qemu-img convert -f qcow2 -O qcow2 -- "$dir/disk.qcow2" "$dir/disk.qcow2.plain" 2>"$state/map.err" || {
      rm -f -- "$dir/disk.qcow2.plain"
      die "decompressing disk.qcow2 failed: $(grep -v '^[[:space:]]*$' "$state/map.err" | tail -n 1)"
    }
    chmod 0600 -- "$dir/disk.qcow2.plain"
    mv -f -- "$dir/disk.qcow2.plain" "$dir/disk.qcow2"
    printf '%s %s\n' "$image_sha" "$(stamp_of "$dir/disk.qcow2")" >"$dir/disk.qcow2.sha256"
    log "decompressed disk.qcow2 in $((SECONDS - t0)) s: $(mib "$(stat -c %s -- "$dir/disk.qcow2")") MiB"
  fi

  # run-vm.sh refuses to start when a file the env names is missing: check now.
  stage "checking that the files $env_file names are in place"
  resolved=$(bash "$here/run-vm.sh" --resolve "$env_file" 2>&1) || die "run-vm.sh --resolve $env_file failed: $(tail -n 1 <<<"$resolved")"
  absent=()
  for k in VM_DISK VM_EFI_CODE VM_EFI_VARS VM_DRIVERS_ISO VM_INSTALL_ISO; do
    v=$(sed -n "s/^$k=//p" <<<"$resolved")
    [[ -z $v || -f $root$v ]] || absent+=("$k=$v")
  done
  ((${#absent[@]} == 0)) ||
    die "the image's env names ${absent[*]}, which the manifest does not provide: the VM would not start; publish it, or drop it from the image's env"

  if [[ -z $root ]] && command -v cloud-init >/dev/null; then
    stage "waiting for cloud-init to finish (cloud-init status --wait)"
    cloud-init status --wait >/dev/null 2>&1 || log "cloud-init finished with errors: $(cloud-init status 2>&1 | tail -n 1)"
  fi

  stage "installing the launcher, vm.env and windows-vm.service, and generalizing (prepare-ami.sh)"
  if ! bash "$here/prepare-ami.sh" --generalize "${root:-/}" "$env_file" 2>"$state/prep.err"; then
    cat "$state/prep.err" >&2
    die "prepare-ami.sh failed: $(prep_error)"
  fi
  cat "$state/prep.err" >&2

  jq -c --arg dir "$vm_dir" '[.files[] | {name, sha256, size, path: ($dir + "/" + .name)}]' "$manifest" \
    >"$state/files.json"
  printf '%s\n' "$image_sha" >"$state/image-sha256"
}

if [[ ${1:-} == --worker ]]; then
  shift
  worker "$@"
  exit 0
fi

# ============================================================================
# Main: validates, runs the worker under the bound, reports, powers off.
# ============================================================================
usage_error() {
  log "usage: bake-image.sh MANIFEST_JSON ENV_FILE (with BAKE_STATUS_URI set); $*"
  exit 2
}

status_uri=${BAKE_STATUS_URI:-}
status_path=
case $status_uri in
  s3://?*/?*) ;;
  file:///*) status_path=$(file_uri_path "$status_uri") || usage_error "BAKE_STATUS_URI '$status_uri' is not a plain file:///absolute/path" ;;
  "") usage_error "BAKE_STATUS_URI is not set" ;;
  *) usage_error "BAKE_STATUS_URI '$status_uri' must be s3://bucket/key or file:///absolute/path" ;;
esac
poweroff_cmd=${BAKE_POWEROFF_COMMAND:-systemctl poweroff}

state=$(mktemp -d "${TMPDIR:-/tmp}/bake-image.XXXXXX")
reported=0 powered=0 exit_code=0 fail_error='' worker=''
echo "starting" >"$state/stage"

# Writes the status JSON to BAKE_STATUS_URI (bounded; 3 attempts for S3).
write_status() { # JSON
  local try tmp
  if [[ -n $status_path ]]; then
    mkdir -p -- "$(dirname -- "$status_path")" &&
      tmp=$(mktemp "$status_path.XXXXXX") &&
      printf '%s\n' "$1" >"$tmp" && chmod 0644 -- "$tmp" && mv -f -- "$tmp" "$status_path" && return 0
    return 1
  fi
  command -v aws >/dev/null || {
    log "error: aws not found: the status cannot be written to $status_uri"
    return 1
  }
  for try in 1 2 3; do
    if printf '%s\n' "$1" | timeout 60 aws "${aws_args[@]}" s3 cp --only-show-errors \
      --content-type application/json - "$status_uri" 2>"$state/status.err"; then
      return 0
    fi
    log "writing the status to $status_uri failed (attempt $try/3): $(tail -n 1 "$state/status.err")"
    ((try == 3)) || sleep 5
  done
  return 1
}

report() { # JSON
  reported=1
  if write_status "$1"; then
    log "status written to $status_uri: $1"
  else
    log "error: could not write the status to $status_uri; it was: $1"
    exit_code=1
  fi
}

report_failure() { # ERROR
  local st
  st=$(tail -n 1 "$state/stage" 2>/dev/null) || st=unknown
  log "error: failed while $st: $1"
  report "{\"status\":\"failed\",\"stage\":$(json_str "$st"),\"error\":$(json_str "$1"),\"finishedAt\":\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\"}"
}

power_off() {
  powered=1
  sync || true
  log "powering off: $poweroff_cmd"
  bash -c "$poweroff_cmd" || log "warning: '$poweroff_cmd' failed with status $?"
}

# Every exit: report a failure not reported yet, power off, clean up.
on_exit() {
  local rc=$?
  trap '' TERM INT HUP
  trap - EXIT
  if [[ -n $worker ]]; then
    kill -TERM "$worker" 2>/dev/null || true
    wait "$worker" 2>/dev/null || true
  fi
  if ((reported == 0)); then
    report_failure "${fail_error:-bake-image.sh exited with status $rc}"
    ((rc != 0)) || rc=1
  fi
  ((powered == 1)) || power_off
  rm -rf -- "$state"
  ((rc != 0)) || rc=$exit_code
  exit "$rc"
}
trap on_exit EXIT
trap 'fail_error="interrupted by SIGTERM"; exit 143' TERM
trap 'fail_error="interrupted by SIGINT"; exit 130' INT
trap 'fail_error="interrupted by SIGHUP"; exit 129' HUP

bad_usage() {
  fail_error="bad usage: $*"
  log "usage: bake-image.sh MANIFEST_JSON ENV_FILE"
  exit 2
}
(($# == 2)) || bad_usage "expected MANIFEST_JSON ENV_FILE, got $# argument(s)"
[[ -f $1 && -r $1 ]] || bad_usage "the manifest $1 does not exist or is not readable"
[[ -f $2 && -r $2 ]] || bad_usage "the env file $2 does not exist or is not readable"
timeout_s=${BAKE_TIMEOUT_S:-5400}
[[ $timeout_s =~ ^[1-9][0-9]*$ ]] || bad_usage "BAKE_TIMEOUT_S must be a positive number of seconds, got '$timeout_s'"
[[ -d ${BAKE_ROOT:-/} ]] || bad_usage "BAKE_ROOT ${BAKE_ROOT:-} is not a directory"

log "baking the image from $1 into ${BAKE_ROOT:-/} (at most ${timeout_s} s); status to $status_uri"
t0=$SECONDS
# timeout puts the worker in its own process group and ends all of it.
timeout -k 30 "$timeout_s" bash "$self" --worker "$state" "$1" "$2" &
worker=$!
rc=0
wait "$worker" || rc=$?
worker=
if ((rc == 0)); then
  report "{\"status\":\"ok\",\"imageSha256\":$(json_str "$(cat "$state/image-sha256")"),\"files\":$(cat "$state/files.json"),\"finishedAt\":\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\"}"
  log "baked in $((SECONDS - t0)) s"
elif ((rc == 124 || (rc == 137 && SECONDS - t0 >= timeout_s))); then
  report_failure "timed out after ${timeout_s} s (BAKE_TIMEOUT_S) while $(tail -n 1 "$state/stage")"
  exit_code=1
else
  err=$(tail -n 1 "$state/error" 2>/dev/null) || err=
  report_failure "${err:-the bake exited with status $rc}"
  exit_code=1
fi
# on_exit reports exit_code.

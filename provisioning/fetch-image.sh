#!/usr/bin/env bash
# fetch-image.sh - download a file and verify its SHA-256 before it appears at DEST.
#
# Usage: fetch-image.sh URL SHA256 DEST
#
#   URL     s3://bucket/key, https://..., http://... or file:///absolute/path
#   SHA256  expected SHA-256 of the file: 64 hex digits
#   DEST    where the verified file ends up (its directory is created)
#
# Env:
#   S3_ENDPOINT_URL            passed to aws as --endpoint-url (S3-compatible servers)
#   FETCH_RETRIES              attempts per download, default 5
#   FETCH_RETRY_DELAY_S        delay before the first retry, doubled after each
#                              failure (capped at 300 s), default 5
#   FETCH_PROGRESS_INTERVAL_S  seconds between progress lines, default 10
#   AWS credentials/region     the usual aws CLI variables or instance profile
#
# Files:
#   DEST.partial  the download in progress. https/http downloads resume from it
#                 (curl -C -), file:// copies resume with a ranged read, s3://
#                 downloads start over. Removed when the checksum is wrong.
#   DEST.sha256   stamp written after verification: one line
#                 "<sha256> <size-bytes> <mtime-epoch.nanoseconds>" of DEST.
#                 While it matches DEST, a rerun does not hash DEST again.
#                 prepare-disk.sh reads it as SOURCE.sha256.
#
# Behaviour: DEST already present and verified -> says so and exits 0 without
# touching it. DEST present but not matching SHA256 -> replaced by a fresh
# download. A download is retried with backoff on network/server errors, but not
# on "not found"/"access denied". A checksum mismatch after resuming a partial
# file triggers one fresh full download before giving up.
#
# Output: progress and results on stderr, prefixed "fetch-image:"; nothing on
# stdout. Exit 0 when DEST is verified; 1 on download failure or checksum
# mismatch (the message names the URL, and the expected and actual hashes; DEST
# and DEST.partial are then absent); 2 on bad usage.
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

readonly PROG=fetch-image

usage() {
  log "usage: fetch-image.sh URL SHA256 DEST"
  exit 2
}

[[ $# -eq 3 ]] || usage
url=$1
expected=${2,,}
dest=$3
[[ -n $url && -n $dest ]] || usage
[[ $expected =~ ^[0-9a-f]{64}$ ]] || die "SHA256 argument '$2' is not 64 hex digits"
[[ $dest != */ && ! -d $dest ]] || die "DEST $dest is a directory; give a file name"

retries=${FETCH_RETRIES:-5}
retry_delay=${FETCH_RETRY_DELAY_S:-5}
progress_interval=${FETCH_PROGRESS_INTERVAL_S:-10}
[[ $retries =~ ^[1-9][0-9]*$ ]] || die "FETCH_RETRIES must be a positive integer, got '$retries'"
[[ $retry_delay =~ ^[0-9]+$ ]] || die "FETCH_RETRY_DELAY_S must be a whole number of seconds, got '$retry_delay'"
[[ $progress_interval =~ ^[1-9][0-9]*$ ]] ||
  die "FETCH_PROGRESS_INTERVAL_S must be a positive integer, got '$progress_interval'"

aws_args=()
[[ -z ${S3_ENDPOINT_URL:-} ]] || aws_args+=(--endpoint-url "$S3_ENDPOINT_URL")

partial=$dest.partial
stamp=$dest.sha256

mkdir -p -- "$(dirname -- "$dest")" || die "cannot create the directory of $dest"

work=$(mktemp -d "${TMPDIR:-/tmp}/fetch-image.XXXXXX")
watcher=
stop_watcher() {
  if [[ -n $watcher ]]; then
    kill "$watcher" 2>/dev/null || true
    wait "$watcher" 2>/dev/null || true
    watcher=
  fi
}
cleanup() {
  stop_watcher
  rm -rf -- "$work"
}
trap cleanup EXIT

# "<sha256> <size> <mtime>" for FILE with the given hash.
stamp_line() { printf '%s %s\n' "$2" "$(stat -c '%s %.9Y' -- "$1")"; }

write_stamp() { # FILE SHA STAMPFILE
  local tmp
  tmp=$(mktemp "$3.XXXXXX")
  stamp_line "$1" "$2" >"$tmp"
  chmod 0644 -- "$tmp"
  mv -f -- "$tmp" "$3"
}

stamp_matches() { # FILE SHA STAMPFILE
  [[ -f $3 ]] && [[ "$(cat -- "$3")" == "$(stamp_line "$1" "$2")" ]]
}

hash_file() { # FILE -> prints sha256, with progress lines
  local size start sum
  size=$(stat -c %s -- "$1")
  start=$SECONDS
  log "computing SHA-256 of $1 ($(mib "$size") MiB)"
  sum=$(sha256_of "$1") || die "could not read $1"
  log "SHA-256 computed in $((SECONDS - start)) s"
  printf '%s\n' "$sum"
}

# Background progress reporter: bytes on disk of DEST.partial* (aws writes to
# a temporary name next to its target) against TOTAL (may be empty).
start_watcher() { # TOTAL
  local total=$1
  (
    sleeper=
    trap '[[ -z $sleeper ]] || kill "$sleeper" 2>/dev/null; exit 0' TERM
    start=$SECONDS
    while :; do
      # wait (unlike a foreground sleep) returns at once when TERM arrives.
      sleep "$progress_interval" >/dev/null 2>&1 &
      sleeper=$!
      wait "$sleeper"
      shopt -s nullglob
      files=("$partial" "$partial".*)
      shopt -u nullglob
      have=0
      for f in "${files[@]}"; do
        [[ -f $f ]] || continue
        b=$(du -B1 -- "$f" 2>/dev/null | cut -f1) || b=0
        have=$((have + ${b:-0}))
      done
      elapsed=$((SECONDS - start))
      rate=$((elapsed > 0 ? have / 1048576 / elapsed : 0))
      if [[ -n $total && $total -gt 0 ]]; then
        ((have <= total)) || have=$total
        log "downloaded $(mib "$have") of $(mib "$total") MiB ($((have * 100 / total))%), ${rate} MiB/s"
      else
        log "downloaded $(mib "$have") MiB, ${rate} MiB/s"
      fi
    done
  ) &
  watcher=$!
}

last_error=
resumed=0

# One download attempt into $partial. Returns 0 on success, 1 for a retryable
# failure, 2 for a permanent one; sets last_error.
fetch_once() {
  local err=$work/err total code path have src_size bucket key
  resumed=0
  case $url in
    https://* | http://*)
      total=
      if [[ -s $partial ]]; then
        resumed=1
        log "resuming $url from byte $(stat -c %s -- "$partial")"
      else
        log "downloading $url"
      fi
      start_watcher "$total"
      # --fail: an HTTP error writes nothing to the partial file.
      code=$(curl --fail --location --silent --show-error --connect-timeout 30 \
        --speed-limit 1024 --speed-time 120 --continue-at - \
        --output "$partial" --write-out '%{http_code}' -- "$url" 2>"$err")
      local rc=$?
      stop_watcher
      ((rc != 0)) || return 0
      if ((rc == 33)) || [[ $code == 416 ]]; then
        # The server refused the range (partial file complete, larger than the
        # file, or ranges unsupported): start over.
        rm -f -- "$partial"
        last_error="server refused to resume (HTTP $code); restarting from the start"
        return 1
      fi
      last_error="curl exit $rc (HTTP ${code:-none}): $(tail -n 1 "$err")"
      if [[ $code =~ ^4 && $code != 408 && $code != 429 ]]; then
        [[ -s $partial ]] || rm -f -- "$partial"
        return 2
      fi
      return 1
      ;;
    file://*)
      path=${url#file://}
      path=${path#localhost}
      path=$(printf '%b' "${path//%/\\x}")
      if [[ ! -f $path ]]; then
        last_error="$path (from $url) does not exist or is not a regular file"
        return 2
      fi
      src_size=$(stat -c %s -- "$path")
      have=0
      [[ ! -f $partial ]] || have=$(stat -c %s -- "$partial")
      if ((have > src_size)); then
        rm -f -- "$partial"
        have=0
      fi
      if ((have > 0)); then
        resumed=1
        log "resuming copy of $path from byte $have of $src_size"
      else
        log "copying $path ($(mib "$src_size") MiB)"
      fi
      start_watcher "$src_size"
      dd if="$path" of="$partial" bs=4M skip="$have" seek="$have" \
        iflag=skip_bytes oflag=seek_bytes conv=notrunc status=none 2>"$err"
      local rc=$?
      stop_watcher
      if ((rc != 0)); then
        last_error="copy from $path failed: $(tail -n 1 "$err")"
        return 1
      fi
      return 0
      ;;
    s3://*)
      path=${url#s3://}
      bucket=${path%%/*}
      key=${path#*/}
      if [[ -z $bucket || -z $key || $key == "$path" ]]; then
        last_error="$url is not of the form s3://bucket/key"
        return 2
      fi
      if ! total=$(aws "${aws_args[@]}" s3api head-object --bucket "$bucket" --key "$key" \
        --query ContentLength --output text 2>"$err"); then
        last_error="$(grep -v '^[[:space:]]*$' "$err" | tail -n 1)"
        if grep -qE '\(404\)|NoSuchKey|NoSuchBucket|Not Found' "$err"; then
          return 2
        fi
        if grep -qE '\(403\)|AccessDenied|Forbidden' "$err"; then
          last_error="$last_error (access denied: the host role may read only this object, and a new role policy takes a few seconds to apply; a bucket in another account or encrypted with SSE-KMS must also grant the role access)"
          # Retry twice for the policy to apply; a refusal that lasts is final.
          ((fetch_attempt < 3)) && return 1
          return 2
        fi
        return 1
      fi
      rm -f -- "$partial" "$partial".*
      log "downloading $url ($(mib "$total") MiB)"
      start_watcher "$total"
      aws "${aws_args[@]}" s3 cp --only-show-errors -- "$url" "$partial" >&2 2>"$err"
      local rc=$?
      stop_watcher
      if ((rc != 0)); then
        rm -f -- "$partial" "$partial".*
        last_error="$(grep -v '^[[:space:]]*$' "$err" | tail -n 1)"
        return 1
      fi
      return 0
      ;;
    *)
      last_error="unsupported URL '$url' (use s3://, https://, http:// or file://)"
      return 2
      ;;
  esac
}

# Downloads into $partial with bounded retries; dies naming the URL on failure.
fetch_attempt=1
download() {
  local attempt=1 rc delay
  while :; do
    rc=0
    fetch_attempt=$attempt
    fetch_once || rc=$?
    ((rc != 0)) || return 0
    if ((rc == 2)); then
      die "cannot download $url: $last_error"
    fi
    if ((attempt >= retries)); then
      die "could not download $url after $attempt attempt(s): $last_error"
    fi
    delay=$((retry_delay << (attempt - 1)))
    ((delay <= 300)) || delay=300
    log "attempt $attempt/$retries for $url failed: $last_error; retrying in ${delay}s"
    sleep "$delay"
    attempt=$((attempt + 1))
  done
}

# --- DEST already there? -----------------------------------------------------
if [[ -f $dest ]]; then
  if stamp_matches "$dest" "$expected" "$stamp"; then
    log "$dest is already present and verified (sha256 $expected); nothing to do"
    exit 0
  fi
  log "$dest exists but has no matching $stamp stamp; verifying it"
  actual=$(hash_file "$dest")
  if [[ $actual == "$expected" ]]; then
    write_stamp "$dest" "$expected" "$stamp"
    log "$dest is already present and its checksum matches; nothing to do"
    exit 0
  fi
  log "$dest has sha256 $actual, expected $expected; downloading it again"
  rm -f -- "$dest"
fi
rm -f -- "$stamp"

# --- download and verify -----------------------------------------------------
start=$SECONDS
download
size=$(stat -c %s -- "$partial")
log "downloaded $url ($(mib "$size") MiB) in $((SECONDS - start)) s"
actual=$(hash_file "$partial")
if [[ $actual != "$expected" && $resumed -eq 1 ]]; then
  log "checksum mismatch after resuming a partial download (sha256 $actual); downloading $url again from the start"
  rm -f -- "$partial"
  download
  actual=$(hash_file "$partial")
fi
if [[ $actual != "$expected" ]]; then
  rm -f -- "$partial"
  die "checksum mismatch for $url: expected sha256 $expected, actual $actual (nothing written to $dest)"
fi

mv -f -- "$partial" "$dest"
write_stamp "$dest" "$expected" "$stamp"
log "verified $dest (sha256 $expected, $size bytes)"

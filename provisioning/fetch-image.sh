#!/usr/bin/env bash
# fetch-image.sh - download a file and verify its SHA-256 before it appears at DEST.
#
# Usage: fetch-image.sh URL SHA256 DEST
#
#   URL     s3://bucket/key, https://..., http://... or file:///absolute/path
#   SHA256  expected SHA-256 of the file: 64 hex digits
#   DEST    where the verified file ends up (its directory is created). DEST
#           and DEST.partial must not be symbolic links: they are refused,
#           never followed.
#
# Env:
#   S3_ENDPOINT_URL            passed to aws as --endpoint-url (S3-compatible servers)
#   FETCH_RETRIES              attempts per download, default 5
#   FETCH_RETRY_DELAY_S        delay before the first retry, doubled after each
#                              failure (capped at 300 s), default 5
#   FETCH_PROGRESS_INTERVAL_S  seconds between progress lines, default 10
#   FETCH_MAX_BYTES            the largest download accepted when the source does
#                              not give its size (an http(s) reply without
#                              Content-Length), and the largest size a source
#                              may announce (Content-Length, the S3 object
#                              size, the file's size); default 68719476736
#                              (64 GiB)
#   FETCH_STALL_TIMEOUT_S      an http(s) or s3 transfer that moves less than
#                              1 KiB/s for this long is a (retried) timeout;
#                              default 120
#   FETCH_CONNECT_TIMEOUT_S    connect timeout per attempt, default 30
#   AWS credentials/region     the usual aws CLI variables or instance profile
#
# Files:
#   DEST.partial  the download in progress: written only by this script, never
#                 through a symbolic link. Retries within a run resume it
#                 (https/http with a range request, file:// with a ranged read;
#                 s3:// starts over), and so does the next run after one that was
#                 killed (SIGKILL, power loss). Removed on every failure: a wrong
#                 checksum, a full disk, a permanent error, retries used up, or
#                 SIGTERM/SIGINT/SIGHUP.
#   DEST.sha256   stamp written after verification: one line
#                 "<sha256> <size-bytes> <mtime-epoch.nanoseconds>" of DEST.
#                 While it matches DEST, a rerun does not hash DEST again.
#                 prepare-disk.sh reads it as SOURCE.sha256.
#   DEST.sha256.XXXXXX  the stamp before its rename; one left by a killed run
#                 is removed by the next. Nothing else is written: error text
#                 and reply headers are kept in memory (so a full disk cannot
#                 swallow the message that names it).
#
# Behaviour: DEST already present and verified -> says so and exits 0 without
# touching it. DEST present but not matching SHA256 -> kept (with its stamp)
# until the new download is verified, then replaced by one rename; only when the
# file system lacks room for both is the outdated DEST removed first, and the
# log says so. The size is bounded: by the size the source gives (it must not
# exceed FETCH_MAX_BYTES, the file must end up that size), else by
# FETCH_MAX_BYTES; when the size is known, the free space is checked before any
# byte is written. Transient errors (connection refused or reset, timeouts,
# HTTP 5xx/408/429, a cut transfer, I/O errors reading a file:// source) are
# retried with backoff, at most FETCH_RETRIES attempts; permanent ones are not:
# HTTP 4xx, a missing S3 key or file, an S3 access denial that lasts (retried
# twice, for a new role policy to apply), permission denied, a directory, no
# space left on the device, a read-only file system, a source over
# FETCH_MAX_BYTES, a TLS certificate error. A checksum mismatch after resuming
# a partial file triggers one fresh full download before giving up.
#
# Output: progress and results on stderr, prefixed "fetch-image:"; nothing on
# stdout. Exit 0 when DEST is verified; 1 on download failure or checksum
# mismatch (the message names the URL and the cause, or the expected and actual
# hashes; DEST.partial is then absent and an earlier DEST untouched); 2 on bad
# usage.
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
partial=$dest.partial
stamp=$dest.sha256
[[ ! -L $dest ]] || die "DEST $dest is a symbolic link (to $(readlink -- "$dest")); refusing to follow it: give the path of a regular file"
[[ $dest != */ && ! -d $dest ]] || die "DEST $dest is a directory; give a file name"
[[ ! -e $dest || -f $dest ]] || die "DEST $dest exists and is not a regular file"
[[ ! -L $partial ]] ||
  die "$partial is a symbolic link (to $(readlink -- "$partial")); refusing to follow it: remove it"
[[ ! -d $partial ]] || die "$partial is a directory, not a download in progress: remove it"
[[ ! -e $partial || -f $partial ]] || die "$partial exists and is not a regular file: remove it"

retries=${FETCH_RETRIES:-5}
retry_delay=${FETCH_RETRY_DELAY_S:-5}
progress_interval=${FETCH_PROGRESS_INTERVAL_S:-10}
max_bytes=${FETCH_MAX_BYTES:-68719476736}
stall_s=${FETCH_STALL_TIMEOUT_S:-120}
connect_s=${FETCH_CONNECT_TIMEOUT_S:-30}
[[ $retries =~ ^[1-9][0-9]*$ ]] || die "FETCH_RETRIES must be a positive integer, got '$retries'"
[[ $retry_delay =~ ^[0-9]+$ ]] || die "FETCH_RETRY_DELAY_S must be a whole number of seconds, got '$retry_delay'"
[[ $progress_interval =~ ^[1-9][0-9]*$ ]] ||
  die "FETCH_PROGRESS_INTERVAL_S must be a positive integer, got '$progress_interval'"
[[ $max_bytes =~ ^[1-9][0-9]{0,17}$ ]] || die "FETCH_MAX_BYTES must be a positive number of bytes, got '$max_bytes'"
[[ $stall_s =~ ^[1-9][0-9]*$ ]] || die "FETCH_STALL_TIMEOUT_S must be a positive integer, got '$stall_s'"
[[ $connect_s =~ ^[1-9][0-9]*$ ]] || die "FETCH_CONNECT_TIMEOUT_S must be a positive integer, got '$connect_s'"

aws_args=()
[[ -z ${S3_ENDPOINT_URL:-} ]] || aws_args+=(--endpoint-url "$S3_ENDPOINT_URL")

dest_dir=$(dirname -- "$dest")
if ! err=$(mkdir -p -- "$dest_dir" 2>&1); then
  die "cannot create the directory of $dest: ${err#mkdir: }"
fi

# Stamps of killed runs, left under mktemp's temporary name.
shopt -s nullglob
for f in "$stamp".??????; do
  [[ -f $f && ! -L $f ]] && rm -f -- "$f"
done
shopt -u nullglob

watcher=
own_partial=0
stop_watcher() {
  if [[ -n $watcher ]]; then
    kill "$watcher" 2>/dev/null || true
    wait "$watcher" 2>/dev/null || true
    watcher=
  fi
}
remove_partial() {
  rm -f -- "$partial"
  shopt -s nullglob
  local f
  for f in "$partial".*; do
    [[ -L $f ]] || rm -rf -- "$f"
  done
  shopt -u nullglob
}
cleanup() {
  local rc=$?
  stop_watcher
  if ((rc != 0 && own_partial)); then remove_partial; fi
  if [[ -n ${stamp_tmp:-} ]]; then rm -f -- "$stamp_tmp"; fi
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
trap 'exit 129' HUP
own_partial=1

# "<sha256> <size> <mtime>" for FILE with the given hash.
stamp_line() { printf '%s %s\n' "$2" "$(stat -c '%s %.9Y' -- "$1")"; }

write_stamp() { # FILE SHA STAMPFILE
  stamp_tmp=$(mktemp "$3.XXXXXX") || die "cannot create a temporary file beside $3"
  if ! { stamp_line "$1" "$2" >"$stamp_tmp" && chmod 0644 -- "$stamp_tmp" && mv -f -T -- "$stamp_tmp" "$3"; }; then
    die "cannot write $3 (is the disk full?)"
  fi
  stamp_tmp=
}

stamp_matches() { # FILE SHA STAMPFILE
  [[ -f $3 && ! -L $3 ]] && [[ "$(cat -- "$3")" == "$(stamp_line "$1" "$2")" ]]
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

# The last non-empty line of TEXT, at most 400 characters.
last_line() { printf '%s\n' "$1" | tr -d '\r' | grep -av '^[[:space:]]*$' | tail -n 1 | cut -c1-400 || true; }

# A local error (writing DEST.partial, reading a file:// source) that retrying
# cannot fix: no space, no permission, a directory, a read-only file system, ...
permanent_local() { # TEXT
  [[ $1 =~ No\ space\ left|Errno\ 28|Permission\ denied|Errno\ 13|Operation\ not\ permitted|Is\ a\ directory|Errno\ 21|Read-only\ file\ system|Errno\ 30|File\ too\ large|Errno\ 27|Disk\ quota|Errno\ 122|Too\ many\ levels\ of\ symbolic\ links|Not\ a\ directory|No\ such\ file ]]
}

free_bytes() { # DIR
  local a s
  read -r a s < <(stat -f -c '%a %S' -- "$1") || return 1
  echo $((a * s))
}

# Fails (permanently) unless NEED more bytes fit beside DEST; removes an outdated
# DEST when only that makes room.
ensure_room() { # NEED
  local need=$1 avail old=0
  avail=$(free_bytes "$dest_dir") || return 0
  ((need > avail)) || return 0
  if [[ -f $dest ]]; then old=$(du -B1 -- "$dest" 2>/dev/null | cut -f1) || old=0; fi
  if ((old > 0 && need <= avail + old)); then
    log "only $(mib "$avail") MiB free for a $(mib "$need") MiB download: removing the outdated $dest to make room"
    rm -f -- "$dest" "$stamp"
    return 0
  fi
  last_error="not enough space for $partial: the download needs $(mib "$need") MiB, $(mib "$avail") MiB free on $(df -P -- "$dest_dir" 2>/dev/null | awk 'NR == 2 { print $6 }')"
  return 2
}

# Background progress reporter: bytes on disk of DEST.partial* (aws writes to
# a temporary name next to its target) against TOTAL (may be empty). It ends
# with this script, also when the script is killed.
start_watcher() { # TOTAL
  local total=$1 main=$$
  (
    sleeper=
    trap '[[ -z $sleeper ]] || kill "$sleeper" 2>/dev/null; exit 0' TERM
    start=$SECONDS
    while :; do
      # wait (unlike a foreground sleep) returns at once when TERM arrives.
      sleep "$progress_interval" >/dev/null 2>&1 &
      sleeper=$!
      wait "$sleeper"
      kill -0 "$main" 2>/dev/null || exit 0
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

partial_size() { if [[ -f $partial ]]; then stat -c %s -- "$partial"; else echo 0; fi; }

last_error=
resumed=0

# The status code and the size the last reply in curl's dumped headers (TEXT)
# announces: "CODE TOTAL" (TOTAL empty when the server gave none; from
# Content-Range when present, else Content-Length).
reply_of() { # TEXT
  printf '%s\n' "$1" | tr -d '\r' | awk '
    /^HTTP\// { code = $2; len = ""; total = ""; next }
    tolower($1) == "content-length:" { len = $2 }
    tolower($1) == "content-range:" { n = split($0, p, "/"); if (p[n] ~ /^[0-9]+$/) total = p[n] }
    END { if (total == "") total = len; print code " " total }'
}

# One http(s) attempt into $partial, resuming it when it holds bytes. Every
# byte goes through dd (O_APPEND|O_NOFOLLOW), which names the errno of a failed
# write and stops one byte past FETCH_MAX_BYTES. curl's headers (-D) and both
# tools' messages are captured together on fd 3, the pipeline's status last.
fetch_http() {
  local out st have code total size reason curl_msg write_msg st_curl st_dd
  local -a range=()
  have=$(partial_size)
  if ((have > max_bytes)); then
    rm -f -- "$partial"
    have=0
  fi
  if ((have > 0)); then
    resumed=1
    range=(--continue-at "$have")
    log "resuming $url from byte $have"
  else
    log "downloading $url"
  fi
  start_watcher ""
  # --fail: an HTTP error writes nothing to the partial file.
  out=$(
    {
      curl --fail --location --max-redirs 10 --proto '=http,https' --silent --show-error \
        --connect-timeout "$connect_s" --speed-limit 1024 --speed-time "$stall_s" \
        --max-filesize "$max_bytes" "${range[@]}" --dump-header /dev/fd/3 --output - -- "$url" 2>&3 |
        dd of="$partial" bs=1M iflag=fullblock,count_bytes count=$((max_bytes - have + 1)) \
          oflag=append,nofollow conv=notrunc status=none 2>&3
      st="${PIPESTATUS[*]}"
      printf '\nfetch-status %s\n' "$st" >&3
    } 3>&1
  )
  stop_watcher
  read -r _ st_curl st_dd < <(grep -a '^fetch-status ' <<<"$out" | tail -n 1) || true
  st_curl=${st_curl:-1} st_dd=${st_dd:-0}
  read -r code total < <(reply_of "$(grep -av '^fetch-status \|^curl: \|^dd: ' <<<"$out")") || true
  curl_msg=$(last_line "$(grep -a '^curl: ' <<<"$out")")
  write_msg=$(last_line "$(grep -a '^dd: ' <<<"$out")")
  size=$(partial_size)
  if ((st_dd != 0)); then
    reason=$write_msg
    last_error="cannot write $partial: ${reason#dd: }"
    permanent_local "$reason" && return 2
    return 1
  fi
  if ((size > max_bytes)); then
    last_error="the download is larger than FETCH_MAX_BYTES ($max_bytes bytes) and the server gave no size; raise FETCH_MAX_BYTES if the file really is that large"
    return 2
  fi
  if ((st_curl == 0)); then
    if [[ -n $total && $total != "$size" ]]; then
      last_error="the server announced $total bytes but $size arrived"
      rm -f -- "$partial"
      return 1
    fi
    return 0
  fi
  last_error="curl exit $st_curl (HTTP ${code:-none}): ${curl_msg:-no message}"
  case $st_curl in
    33)
      # The server refused the range (ranges unsupported): start over.
      rm -f -- "$partial"
      last_error="server refused to resume (curl exit 33, HTTP ${code:-none}); restarting from the start"
      return 1
      ;;
    63)
      last_error="the server announces more than FETCH_MAX_BYTES ($max_bytes bytes) (curl exit 63: $curl_msg); raise FETCH_MAX_BYTES if the file really is that large"
      return 2
      ;;
    3 | 60) return 2 ;;
  esac
  if [[ $code == 416 ]]; then
    rm -f -- "$partial"
    last_error="server refused to resume (HTTP 416); restarting from the start"
    return 1
  fi
  if [[ $code =~ ^4 && $code != 408 && $code != 429 ]]; then
    ((size > 0)) || rm -f -- "$partial"
    return 2
  fi
  return 1
}

fetch_file() {
  local err path have src_size reason
  path=${url#file://}
  path=${path#localhost}
  path=$(printf '%b' "${path//%/\\x}")
  if [[ -d $path ]]; then
    last_error="$path (from $url) is a directory, not a file"
    return 2
  fi
  if [[ ! -f $path ]]; then
    last_error="$path (from $url) does not exist or is not a regular file"
    return 2
  fi
  src_size=$(stat -c %s -- "$path")
  if ((src_size > max_bytes)); then
    last_error="$path is $src_size bytes, more than FETCH_MAX_BYTES ($max_bytes bytes)"
    return 2
  fi
  have=$(partial_size)
  if ((have > src_size)); then
    rm -f -- "$partial"
    have=0
  fi
  ensure_room $((src_size - have)) || return 2
  if ((have > 0)); then
    resumed=1
    log "resuming copy of $path from byte $have of $src_size"
  else
    log "copying $path ($(mib "$src_size") MiB)"
  fi
  start_watcher "$src_size"
  local rc=0
  err=$(dd if="$path" of="$partial" bs=4M skip="$have" seek="$have" count=$((src_size - have)) \
    iflag=skip_bytes,count_bytes oflag=seek_bytes,nofollow conv=notrunc status=none 2>&1) || rc=$?
  stop_watcher
  if ((rc != 0)); then
    reason=$(last_line "$err")
    last_error="copy from $path to $partial failed: ${reason#dd: }"
    permanent_local "$reason" && return 2
    return 1
  fi
  return 0
}

fetch_s3() {
  local out path bucket key total reason
  path=${url#s3://}
  bucket=${path%%/*}
  key=${path#*/}
  if [[ -z $bucket || -z $key || $key == "$path" ]]; then
    last_error="$url is not of the form s3://bucket/key"
    return 2
  fi
  local -a timeouts=(--cli-connect-timeout "$connect_s" --cli-read-timeout "$stall_s")
  if ! out=$(aws "${aws_args[@]}" "${timeouts[@]}" s3api head-object --bucket "$bucket" --key "$key" \
    --query ContentLength --output text 2>&1); then
    last_error=$(last_line "$out")
    if grep -qE '\(404\)|NoSuchKey|NoSuchBucket|Not Found' <<<"$out"; then
      return 2
    fi
    if grep -qE '\(403\)|AccessDenied|Forbidden' <<<"$out"; then
      last_error="$last_error (access denied: the host role may read only this object, and a new role policy takes a few seconds to apply; a bucket in another account or encrypted with SSE-KMS must also grant the role access)"
      # Retry twice for the policy to apply; a refusal that lasts is final.
      ((fetch_attempt < 3)) && return 1
      return 2
    fi
    return 1
  fi
  total=$(last_line "$out")
  if [[ ! $total =~ ^[0-9]+$ ]]; then
    last_error="S3 gave no object size for $url (got '${total:0:80}')"
    return 1
  fi
  if ((total > max_bytes)); then
    last_error="$url is $total bytes, more than FETCH_MAX_BYTES ($max_bytes bytes)"
    return 2
  fi
  remove_partial
  ensure_room "$total" || return 2
  log "downloading $url ($(mib "$total") MiB)"
  start_watcher "$total"
  local rc=0
  out=$(aws "${aws_args[@]}" "${timeouts[@]}" s3 cp --only-show-errors -- "$url" "$partial" 2>&1 >/dev/null) || rc=$?
  stop_watcher
  if ((rc != 0)); then
    remove_partial
    reason=$(last_line "$out")
    last_error=$reason
    permanent_local "$reason" && return 2
    return 1
  fi
  if [[ -L $partial || ! -f $partial ]]; then
    remove_partial
    last_error="aws s3 cp left no regular file at $partial"
    return 1
  fi
  if [[ $(partial_size) != "$total" ]]; then
    last_error="S3 announced $total bytes for $url but $(partial_size) arrived"
    remove_partial
    return 1
  fi
  return 0
}

# One download attempt into $partial. Returns 0 on success, 1 for a retryable
# failure, 2 for a permanent one; sets last_error.
fetch_once() {
  resumed=0
  case $url in
    https://* | http://*) fetch_http ;;
    file://*) fetch_file ;;
    s3://*) fetch_s3 ;;
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
    remove_partial
    exit 0
  fi
  other=
  if [[ -f $stamp && ! -L $stamp ]]; then
    read -r s_sha s_rest < <(cat -- "$stamp") || true
    if [[ ${s_sha:-} =~ ^[0-9a-f]{64}$ ]] && [[ "$(stamp_line "$dest" "$s_sha")" == "$s_sha ${s_rest:-}" ]]; then
      other=$s_sha
    fi
  fi
  if [[ -n $other ]]; then
    log "$dest holds another file (sha256 $other, from its stamp); it stays until the new download is verified"
  else
    log "$dest exists but has no matching $stamp stamp; verifying it"
    actual=$(hash_file "$dest")
    if [[ $actual == "$expected" ]]; then
      write_stamp "$dest" "$expected" "$stamp"
      log "$dest is already present and its checksum matches; nothing to do"
      remove_partial
      exit 0
    fi
    log "$dest has sha256 $actual, expected $expected; it stays until the new download is verified"
  fi
fi

# --- download and verify -----------------------------------------------------
start=$SECONDS
download
size=$(partial_size)
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
  if [[ -f $dest ]]; then
    die "checksum mismatch for $url: expected sha256 $expected, actual $actual (the earlier $dest is kept as it was)"
  fi
  die "checksum mismatch for $url: expected sha256 $expected, actual $actual (nothing written to $dest)"
fi

[[ ! -L $dest && ! -d $dest ]] || die "DEST $dest became a symbolic link or a directory during the download; refusing to replace it"
sync -- "$partial" 2>/dev/null || true
mv -f -T -- "$partial" "$dest" || die "cannot rename $partial to $dest"
own_partial=0
write_stamp "$dest" "$expected" "$stamp"
log "verified $dest (sha256 $expected, $size bytes)"

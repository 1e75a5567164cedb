#!/usr/bin/env bash
# bench.sh - throughput and peak memory of the image-handling scripts.
#
# Usage: bash test/bench/bench.sh        (npm run bench)
#
# Env:
#   BENCH_SIZE_GIB  size of the generated raw image, default 4
#   BENCH_DIR       work directory (default: a new one under $TMPDIR or /tmp);
#                   needs about 3.5 x BENCH_SIZE_GIB free
#   BENCH_KEEP=1    keep the work directory
#
# Generates a raw disk image of BENCH_SIZE_GIB with realistic content (in each
# 64 MiB stretch: 32 MiB random data, 32 MiB written zeros, like a partly used
# disk), then times, each under /usr/bin/time -v:
#   cp            a plain copy of the image, then sync (this disk's limit)
#   fetch-image   file:// download of the image, with its SHA-256 check
#   checksum      SHA-256 of the image as the scripts compute it (openssl dgst,
#                 which uses the CPU's SHA instructions; sha256sum without openssl)
#   sha256sum     coreutils sha256sum of the image, for comparison
#   prepare-disk  raw -> qcow2 (with the SHA-256 stamp fetch-image leaves, as
#                 in the pipeline)
#   publish-image the qcow2 (+ 64 MiB QEMU_VARS.fd) to s3rver on 127.0.0.1
#                 (s3rver runs as a separate process: its memory is not counted)
# The page cache is dropped before each step when /proc/sys/vm/drop_caches is
# writable (root), so every step reads from the disk.
#
# Prints a markdown table (MiB/s of the input image, peak RSS of the step and
# all its child processes) and checks the targets: prepare-disk and checksum at
# least half of cp's throughput, every peak RSS under 512 MiB. Exit 1 when a
# target is missed.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/../.." && pwd)"
PROV=$REPO/provisioning

size_gib=${BENCH_SIZE_GIB:-4}
[[ $size_gib =~ ^[1-9][0-9]*$ ]] || {
  echo "bench: BENCH_SIZE_GIB must be a positive integer" >&2
  exit 2
}
[[ -x /usr/bin/time ]] || {
  echo "bench: /usr/bin/time not found (apt-get install time)" >&2
  exit 2
}

if [[ -n ${BENCH_DIR:-} ]]; then
  mkdir -p "$BENCH_DIR"
  work=$(mktemp -d "$BENCH_DIR/bench.XXXXXX")
else
  work=$(mktemp -d "${TMPDIR:-/tmp}/bench.XXXXXX")
fi
s3_pid=
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  if [[ -n $s3_pid ]]; then
    kill "$s3_pid" 2>/dev/null || true
    wait "$s3_pid" 2>/dev/null || true
  fi
  if [[ ${BENCH_KEEP:-0} == 1 ]]; then
    echo "bench: work directory kept: $work" >&2
  else
    rm -rf -- "$work"
  fi
}
trap cleanup EXIT

log() { printf 'bench: %s\n' "$*" >&2; }

drop_caches() {
  sync
  if [[ -w /proc/sys/vm/drop_caches ]]; then
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
  fi
}
if [[ -w /proc/sys/vm/drop_caches ]]; then cache_note="page cache dropped before each step"; else
  cache_note="page cache NOT dropped (not root): reads may come from memory"
fi

# --- the image -----------------------------------------------------------------
img=$work/image.raw
log "generating a ${size_gib} GiB raw image in $work"
chunks=$((size_gib * 16))
{
  for ((i = 0; i < chunks; i++)); do
    head -c $((32 * 1024 * 1024)) /dev/urandom
    head -c $((32 * 1024 * 1024)) /dev/zero
  done
} >"$img"
img_bytes=$(stat -c %s "$img")
img_mib=$((img_bytes / 1048576))

rows=()
declare -A rate rss

# measure NAME BYTES COMMAND...: runs COMMAND under /usr/bin/time -v.
measure() {
  local name=$1 bytes=$2 tv=$work/time.$1 start end secs mib_s kb
  shift 2
  drop_caches
  log "running $name"
  start=$(date +%s.%N)
  if ! /usr/bin/time -v -o "$tv" "$@" >"$work/out.$name" 2>"$work/err.$name"; then
    log "$name failed:"
    tail -n 20 "$work/err.$name" >&2
    exit 1
  fi
  end=$(date +%s.%N)
  secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')
  mib_s=$(awk -v n="$bytes" -v s="$secs" 'BEGIN { printf "%.0f", n / 1048576 / s }')
  kb=$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$tv")
  rate[$name]=$mib_s
  rss[$name]=$((kb / 1024))
  rows+=("| $name | $((bytes / 1048576)) | $secs | $mib_s | ${rss[$name]} |")
}

# shellcheck disable=SC2016 # $1/$2 belong to the inner sh
measure cp "$img_bytes" sh -c 'cp --sparse=never "$1" "$2" && sync "$2"' sh "$img" "$work/copy.raw"
rm -f "$work/copy.raw"

img_sha=$(sha256sum "$img" | cut -d' ' -f1)
measure fetch-image "$img_bytes" bash "$PROV/fetch-image.sh" "file://$img" "$img_sha" "$work/fetched.raw"
rm -f "$work/fetched.raw" "$work/fetched.raw.sha256"

if command -v openssl >/dev/null; then
  measure checksum "$img_bytes" openssl dgst -sha256 -r "$img"
else
  measure checksum "$img_bytes" sha256sum "$img"
fi
measure sha256sum "$img_bytes" sha256sum "$img"
# The stamp fetch-image.sh writes next to the image it fetched.
printf '%s %s\n' "$img_sha" "$(stat -c '%s %.9Y' "$img")" >"$img.sha256"

mkdir -p "$work/vm"
measure prepare-disk "$img_bytes" bash "$PROV/prepare-disk.sh" "$img" "$work/vm/disk.qcow2"
qcow_bytes=$(stat -c %s "$work/vm/disk.qcow2")
truncate -s 64M "$work/vm/QEMU_VARS.fd" "$work/vm/QEMU_EFI.fd"
rm -f "$img" "$img.sha256"

# --- s3rver in its own process --------------------------------------------------
port=$(node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')
mkdir -p "$work/s3"
node "$SCRIPT_DIR/s3rver.js" "$port" "$work/s3" bench >"$work/s3rver.log" 2>&1 &
s3_pid=$!
for _ in $(seq 50); do
  grep -q listening "$work/s3rver.log" 2>/dev/null && break
  sleep 0.2
done
grep -q listening "$work/s3rver.log" || {
  log "s3rver did not start: $(cat "$work/s3rver.log")"
  exit 1
}
export AWS_ACCESS_KEY_ID=S3RVER AWS_SECRET_ACCESS_KEY=S3RVER AWS_DEFAULT_REGION=us-east-1
export AWS_EC2_METADATA_DISABLED=true S3_ENDPOINT_URL=http://127.0.0.1:$port
measure publish-image "$qcow_bytes" bash "$PROV/publish-image.sh" "$work/vm" "s3://bench/images/"
s3_rss=$(awk '/VmHWM/ { print int($2 / 1024) }' "/proc/$s3_pid/status" 2>/dev/null || echo "?")

# --- report -------------------------------------------------------------------
echo
echo "Image: ${size_gib} GiB raw (${img_mib} MiB; half random, half zeros) -> qcow2 of $((qcow_bytes / 1048576)) MiB; $cache_note."
echo "Machine: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM; s3rver peak RSS ${s3_rss} MiB (separate process, not counted)."
echo
echo "| step | input MiB | seconds | MiB/s | peak RSS MiB |"
echo "| --- | ---: | ---: | ---: | ---: |"
printf '%s\n' "${rows[@]}"
echo

fail=0
check() { # DESCRIPTION CONDITION
  if awk "BEGIN { exit !($2) }"; then echo "PASS $1"; else
    echo "FAIL $1"
    fail=1
  fi
}
half=$(awk -v c="${rate[cp]}" 'BEGIN { printf "%.0f", c / 2 }')
check "prepare-disk ${rate[prepare-disk]} MiB/s >= half of cp ($half MiB/s)" "${rate[prepare-disk]} >= $half"
check "checksum ${rate[checksum]} MiB/s >= half of cp ($half MiB/s)" "${rate[checksum]} >= $half"
for name in cp fetch-image checksum sha256sum prepare-disk publish-image; do
  check "$name peak RSS ${rss[$name]} MiB < 512 MiB" "${rss[$name]} < 512"
done
exit "$fail"

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
#   BENCH_ONLY=compaction  run only the compaction row (the qcow2 is then made
#                   with qemu-img convert, unmeasured)
#   BENCH_ONLY      vm-disk: only the VM disk row (below), nothing else
#   BENCH_VM_WRITE_MIB  MiB the guest writes per round in the VM disk row, default 32
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
#   publish-compact  the same qcow2 after 16 MiB of every 64 MiB were discarded
#                 (what the guest's TRIM leaves: freed clusters inside the
#                 file), published to a folder: flattened and compacted; the
#                 table below it shows the source file, the allocated data and
#                 the published bytes
# The page cache is dropped before each step when /proc/sys/vm/drop_caches is
# writable (root), so every step reads from the disk.
#
# VM disk row: the stand-in guest (test/fixtures/build-standin-guest.sh) booted
# by run-vm.sh under TCG, once with VM_DISK_CACHE=writethrough (the launcher's
# old mode) and once with its own choice (auto: cache=none with io_uring or
# native AIO where the host takes O_DIRECT, else writeback); in the guest,
# 3 rounds of two dd workloads writing BENCH_VM_WRITE_MIB MiB to its disk in
# 64 KiB blocks, then fsync: "direct" (oflag=direct: every block is a write
# command to the disk, as a file system that does not merge writes sends
# them) and "buffered" (through the guest's page cache, which merges them);
# the median round's MiB/s (guest clock) per mode and workload, and the
# ratios. No target: a report.
#
# Prints a markdown table (MiB/s of the input image, peak RSS of the step and
# all its child processes) and checks the targets: prepare-disk and checksum at
# least half of cp's throughput, every peak RSS under 512 MiB, the compacted
# image at most 1.05 times its allocated data. Exit 1 when a target is missed.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/../.." && pwd)"
PROV=$REPO/provisioning

size_gib=${BENCH_SIZE_GIB:-4}
only=${BENCH_ONLY:-}
[[ -z $only || $only == vm-disk || $only == compaction ]] || {
  echo "bench: BENCH_ONLY must be vm-disk, compaction or unset" >&2
  exit 2
}
vm_write_mib=${BENCH_VM_WRITE_MIB:-32}
if [[ ! $vm_write_mib =~ ^[1-9][0-9]*$ ]] || ((vm_write_mib > 64)); then
  echo "bench: BENCH_VM_WRITE_MIB must be a whole number of MiB, 1 to 64 (the stand-in's disk is 128 MiB)" >&2
  exit 2
fi
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
vm_dir=
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  if [[ -n $vm_dir && -S $vm_dir/qmp.sock ]]; then
    bash "$PROV/stop-vm.sh" "$vm_dir/qmp.sock" 0 >/dev/null 2>&1 || true
  fi
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

# --- VM disk: the guest's writes, old cache mode against the launcher's choice ---------
declare -A vm_rate vm_mode
readonly vm_workloads=(direct buffered)
vm_disk_bench() {
  local guest=$REPO/.cache/standin-guest mode port n i out secs dir vm_pid
  log "building (or reusing) the stand-in guest"
  bash "$REPO/test/fixtures/build-standin-guest.sh" "$guest" >"$work/standin-build.log" 2>&1 || {
    log "the stand-in guest could not be built:"
    tail -n 20 "$work/standin-build.log" >&2
    exit 1
  }
  local ssh_opts=(-i "$guest/id_ed25519" -o IdentitiesOnly=yes -o StrictHostKeyChecking=no
    -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR -o ConnectTimeout=20)
  for mode in writethrough auto; do
    dir=$work/vm-$mode
    mkdir -p "$dir"
    qemu-img create -q -f qcow2 -b "$guest/standin.qcow2" -F qcow2 "$dir/disk.qcow2"
    bash "$PROV/build-efi.sh" "$dir" >/dev/null 2>"$work/efi.log" || {
      log "build-efi.sh failed: $(tail -n 1 "$work/efi.log")"
      exit 1
    }
    port=$(node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')
    printf '%s\n' "VM_DIR=$dir" VM_ACCEL=tcg VM_CPUS=1 VM_MEMORY_GIB=1 VM_IMDS_PROXY=0 \
      "VM_SSH_PORT=$port" "VM_BUILDLET_PORT=$((port + 1))" "VM_DISK_CACHE=$mode" >"$dir/vm.env"
    vm_dir=$dir
    bash "$PROV/run-vm.sh" "$dir/vm.env" </dev/null >"$dir/run-vm.log" 2>&1 &
    vm_pid=$!
    log "VM disk ($mode): booting the stand-in guest"
    n=0
    until ssh "${ssh_opts[@]}" -p "$port" root@127.0.0.1 true 2>/dev/null; do
      n=$((n + 1))
      if ((n > 60)) || ! kill -0 "$vm_pid" 2>/dev/null; then
        log "the stand-in guest did not answer SSH ($mode):"
        tail -n 20 "$dir/run-vm.log" >&2
        exit 1
      fi
      sleep 5
    done
    vm_mode[$mode]=$(sed -n 's/^run-vm: disk \(cache=[^ ]*\) .*/\1/p' "$dir/run-vm.log")
    local w flag
    for w in "${vm_workloads[@]}"; do
      local rates=()
      if [[ $w == direct ]]; then flag="oflag=direct"; else flag=""; fi
      for i in 1 2 3; do
        # shellcheck disable=SC2016 # expanded in the guest
        out=$(ssh "${ssh_opts[@]}" -p "$port" root@127.0.0.1 \
          'rm -f /disk/bench.bin; sync; a=$(cut -d" " -f1 /proc/uptime)
           err=$(dd if=/dev/zero of=/disk/bench.bin bs=64k count='"$((vm_write_mib * 16))"' '"$flag"' conv=fsync 2>&1 >/dev/null) ||
             { echo "$err"; exit 3; }
           b=$(cut -d" " -f1 /proc/uptime); rm -f /disk/bench.bin; sync; echo "$a $b"') || {
          log "VM disk ($mode, $w): the guest's dd failed: $out"
          exit 1
        }
        secs=$(awk '{ printf "%.2f", $2 - $1 }' <<<"$out")
        rates+=("$(awk -v m="$vm_write_mib" -v s="$secs" 'BEGIN { printf "%.1f", m / s }')")
        log "VM disk ($mode, ${vm_mode[$mode]}, $w): round $i: $vm_write_mib MiB in ${secs}s"
      done
      vm_rate[$mode.$w]=$(printf '%s\n' "${rates[@]}" | sort -n | sed -n 2p)
    done
    bash "$PROV/stop-vm.sh" "$dir/qmp.sock" 120 >/dev/null 2>>"$work/stop.log" || true
    wait "$vm_pid" || true
    vm_dir=
  done
}
vm_disk_report() {
  local w
  echo "VM disk: stand-in guest under TCG (1 vCPU), dd of $vm_write_mib MiB in 64 KiB blocks + fsync to its NVMe disk, median of 3 rounds (guest MiB/s)."
  echo "Old: ${vm_mode[writethrough]}; new: ${vm_mode[auto]}."
  echo
  echo "| guest workload | old MiB/s | new MiB/s | new/old |"
  echo "| --- | ---: | ---: | ---: |"
  for w in "${vm_workloads[@]}"; do
    echo "| $w | ${vm_rate[writethrough.$w]} | ${vm_rate[auto.$w]} | $(awk -v a="${vm_rate[auto.$w]}" -v b="${vm_rate[writethrough.$w]}" 'BEGIN { printf "%.2f", a / b }') |"
  done
  echo
}
if [[ $only == vm-disk ]]; then
  vm_disk_bench
  echo
  vm_disk_report
  exit 0
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

if [[ -z $only ]]; then
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
else
  mkdir -p "$work/vm"
  log "converting the image to qcow2 (not measured)"
  qemu-img convert -f raw -O qcow2 "$img" "$work/vm/disk.qcow2"
fi
qcow_bytes=$(stat -c %s "$work/vm/disk.qcow2")
truncate -s 64M "$work/vm/QEMU_VARS.fd" "$work/vm/QEMU_EFI.fd"
rm -f "$img" "$img.sha256"

if [[ -z $only ]]; then
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
fi

# --- compaction: the disk with discarded data, published flattened -----------------
log "discarding 16 MiB of every 64 MiB of the qcow2 (what the guest's TRIM leaves)"
discards=()
for ((i = 0; i < chunks; i++)); do discards+=(-c "discard $((i * 64 + 8))M 16M"); done
qemu-io -f qcow2 "${discards[@]}" "$work/vm/disk.qcow2" >/dev/null
src_bytes=$(stat -c %s "$work/vm/disk.qcow2")
measure publish-compact "$src_bytes" env IMAGE_COMPRESSION=none bash "$PROV/publish-image.sh" "$work/vm" "file://$work/published/"
allocated=$(jq -r '.allocatedBytes' "$work/out.publish-compact")
published=$(jq -r '.publishedBytes' "$work/out.publish-compact")
ratio=$(awk -v p="$published" -v a="$allocated" 'BEGIN { printf "%.3f", (a > 0 ? p / a : 0) }')
compaction_report() {
  echo "Compaction (publish-compact, 16 MiB of every 64 MiB discarded):"
  echo
  echo "| source qcow2 file MiB | allocated data MiB | published MiB | published / allocated |"
  echo "| ---: | ---: | ---: | ---: |"
  echo "| $((src_bytes / 1048576)) | $((allocated / 1048576)) | $((published / 1048576)) | $ratio |"
  echo
}
compaction_ok() { awk "BEGIN { exit !($published <= 1.05 * $allocated) }"; }
compaction_target="publish-compact: published $published bytes <= 1.05 x allocated $allocated bytes (ratio $ratio)"
if [[ $only == compaction ]]; then
  echo
  printf '%s\n' "${rows[@]}"
  echo
  compaction_report
  if compaction_ok; then echo "PASS $compaction_target"; else
    echo "FAIL $compaction_target"
    exit 1
  fi
  exit 0
fi
vm_disk_bench

# --- report -------------------------------------------------------------------
echo
echo "Image: ${size_gib} GiB raw (${img_mib} MiB; half random, half zeros) -> qcow2 of $((qcow_bytes / 1048576)) MiB; $cache_note."
echo "Machine: $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM; s3rver peak RSS ${s3_rss:-?} MiB (separate process, not counted)."
echo
echo "| step | input MiB | seconds | MiB/s | peak RSS MiB |"
echo "| --- | ---: | ---: | ---: | ---: |"
printf '%s\n' "${rows[@]}"
echo
compaction_report
vm_disk_report

fail=0
check() { # DESCRIPTION CONDITION
  if awk "BEGIN { exit !($2) }"; then echo "PASS $1"; else
    echo "FAIL $1"
    fail=1
  fi
}
if [[ -z $only ]]; then
  half=$(awk -v c="${rate[cp]}" 'BEGIN { printf "%.0f", c / 2 }')
  check "prepare-disk ${rate[prepare-disk]} MiB/s >= half of cp ($half MiB/s)" "${rate[prepare-disk]} >= $half"
  check "checksum ${rate[checksum]} MiB/s >= half of cp ($half MiB/s)" "${rate[checksum]} >= $half"
fi
for name in "${!rss[@]}"; do
  check "$name peak RSS ${rss[$name]} MiB < 512 MiB" "${rss[$name]} < 512"
done
check "$compaction_target" "$published <= 1.05 * $allocated"
exit "$fail"

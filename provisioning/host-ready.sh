#!/usr/bin/env bash
# host-ready.sh: waits until a freshly booted host is ready for the pipeline.
#
# Usage:  bash host-ready.sh            (the stack sends it over SSH on stdin: bash -s)
# Inputs (environment):
#   HOST_READY_TIMEOUT_S   seconds to wait for cloud-init (default 1800)
#   HOST_READY_NEED_KVM    1 (default) to require /dev/kvm; 0 for hosts without KVM
#   HOST_READY_TOOLS       space-separated commands that must exist
#                          (default: qemu-system-aarch64 qemu-img xorriso socat aws)
# Output: progress lines; on success "host-ready: ok ..." on stdout.
# Exits non-zero, naming the cause, when cloud-init fails or times out, or a
# tool or /dev/kvm is missing.
set -euo pipefail

timeout_s=${HOST_READY_TIMEOUT_S:-1800}
need_kvm=${HOST_READY_NEED_KVM:-1}
tools=${HOST_READY_TOOLS:-"qemu-system-aarch64 qemu-img xorriso socat aws"}
# snap's bin folder is not on PATH in non-login SSH sessions.
export PATH="$PATH:/snap/bin"

die() { echo "host-ready: $*" >&2; exit 1; }

if command -v cloud-init >/dev/null 2>&1; then
  start=$SECONDS
  while :; do
    status=$(cloud-init status 2>/dev/null | sed -n 's/^status: //p' || true)
    case "$status" in
      done) break ;;
      error|degraded*)
        sudo -n tail -n 30 /var/log/cloud-init-output.log >&2 || true
        die "cloud-init finished with status '$status' (see /var/log/cloud-init-output.log above)" ;;
    esac
    elapsed=$((SECONDS - start))
    if [ "$elapsed" -ge "$timeout_s" ]; then
      sudo -n tail -n 30 /var/log/cloud-init-output.log >&2 || true
      die "cloud-init still '${status:-unknown}' after ${timeout_s}s (HOST_READY_TIMEOUT_S)"
    fi
    echo "host-ready: waiting for cloud-init (${status:-starting}), ${elapsed}s of ${timeout_s}s"
    sleep 15
  done
fi

missing=()
for t in $tools; do
  command -v "$t" >/dev/null 2>&1 || missing+=("$t")
done
[ ${#missing[@]} -eq 0 ] || die "missing tools: ${missing[*]} (cloud-init did not install them; see /var/log/cloud-init-output.log)"

if [ "$need_kvm" = 1 ] && [ ! -e /dev/kvm ]; then
  die "/dev/kvm does not exist: this instance type does not expose KVM (use a .metal Graviton type)"
fi

echo "host-ready: ok ($(uname -m), $(nproc) cores, $(awk '/MemTotal/ {printf "%d GiB", $2/1048576}' /proc/meminfo))"

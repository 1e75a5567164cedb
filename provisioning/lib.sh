#!/usr/bin/env bash
# lib.sh - helpers shared by the host scripts; sourced, never run.
#
# Usage (from a script in this folder):
#   # shellcheck source=provisioning/lib.sh
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Defines:
#   mib BYTES          BYTES in MiB, rounded to the nearest
#   sha256_of [FILE]   SHA-256 hex digest of FILE (or stdin); status 1 when it
#                      cannot be read
# Needs nothing from the caller; sets no shell options.

mib() { echo $((($1 + 524288) / 1048576)); }

# OpenSSL uses the CPU's SHA instructions (x86 SHA-NI, ARMv8 crypto extensions)
# and is several times faster than coreutils sha256sum, which is the fallback.
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

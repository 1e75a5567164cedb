#!/usr/bin/env bash
# operator-keys.sh - sets the operators' SSH keys of the host user, in place.
#
# Usage: operator-keys.sh KEYS_BASE64
#
#   KEYS_BASE64  base64 of the operators' public keys, one per line (empty: none)
#
# Rewrites the block between "# windows-arm64-image operators: begin" and
# "# windows-arm64-image operators: end" in $HOME/.ssh/authorized_keys (the
# block is appended on first use) and leaves every other line alone: the
# pipeline's own key, from the EC2 key pair, stays. The file is replaced
# atomically (mode 0600), so a failure never leaves it half-written.
# Sent by QemuHost on stdin (`bash -s -- KEYS_BASE64`); changing the keys runs
# only this, not a new host.
#
# Output: one line on stderr with the number of operator keys.
# Exit: 0 done; 1 bad input or the file could not be written.
set -euo pipefail

readonly begin_mark="# windows-arm64-image operators: begin"
readonly end_mark="# windows-arm64-image operators: end"
die() {
  echo "operator-keys: error: $*" >&2
  exit 1
}

(($# == 1)) || die "usage: operator-keys.sh KEYS_BASE64"
keys=$(printf '%s' "$1" | base64 -d 2>/dev/null) || die "KEYS_BASE64 is not base64"
count=0
while IFS= read -r line; do
  [[ -n $line ]] || continue
  [[ $line =~ ^(ssh-|ecdsa-|sk-)[A-Za-z0-9@.-]+[[:space:]]+[A-Za-z0-9+/=]+ ]] || die "not an OpenSSH public key: ${line:0:40}..."
  count=$((count + 1))
done <<<"$keys"

dir=$HOME/.ssh
file=$dir/authorized_keys
install -d -m 0700 -- "$dir"
[[ -e $file ]] || install -m 0600 /dev/null "$file"
tmp=$(mktemp "$file.XXXXXX")
trap 'rm -f -- "$tmp"' EXIT
{
  awk -v b="$begin_mark" -v e="$end_mark" '$0 == b { skip = 1 } !skip { print } $0 == e { skip = 0 }' "$file"
  if ((count > 0)); then
    printf '%s\n' "$begin_mark"
    grep -v '^$' <<<"$keys"
    printf '%s\n' "$end_mark"
  fi
} >"$tmp"
chmod 0600 -- "$tmp"
mv -f -- "$tmp" "$file"
trap - EXIT
echo "operator-keys: $count operator key(s) in $file" >&2

#!/usr/bin/env bash
# prepare-ami.sh - make a file system ready to be baked into the builder AMI.
#
# Usage: prepare-ami.sh [--generalize | --check] ROOT [ENV_FILE]
#
#   ROOT        root of the file system to prepare: / on the bake instance
#               (bake-image.sh calls this script), or an unpacked tree (tests)
#   ENV_FILE    the VM env file for the image, default $SCRIPT_DIR/../vm.env.
#               KEY=value lines as run-vm.sh reads them. Refused if it sets
#               VM_CONFIG_ISO (the answer-file media holds secrets and must not
#               ship). Installed with VM_HALT_ON_EXIT=1 (added, or replacing
#               another value): a builder instance stops when its VM stops.
#   --check     only validate ENV_FILE and this script's sources; print the
#               image's VM_DIR (default /var/lib/windows-vm) on stdout; change
#               nothing.
#   --generalize  also remove per-instance identity (below): the last step
#               before the AMI is taken.
#
# Installs (written only when different):
#   $SCRIPT_DIR/run-vm.sh                -> ROOT/usr/local/lib/windows-vm/run-vm.sh (0755)
#   $SCRIPT_DIR/imds-proxy.py            -> ROOT/usr/local/lib/windows-vm/imds-proxy.py (0755)
#   ENV_FILE                             -> ROOT/etc/windows-vm/vm.env (0644)
#   $SCRIPT_DIR/../assets/windows-vm.service
#                                        -> ROOT/etc/systemd/system/windows-vm.service (0644)
# enables the unit (`systemctl --root=ROOT enable`, which needs no running
# systemd; without systemctl the multi-user.target.wants symlink is made by
# hand). ROOT$VM_DIR/config.iso and ROOT$VM_DIR/config/ (answer-file media and
# its staging, which exist only on a build host) are deleted if present, so
# they can never ship.
#
# With --generalize:
#   - cloud-init state: `cloud-init clean --logs` when ROOT is / and cloud-init
#     is installed; otherwise ROOT/var/lib/cloud/* (except seed/) and the
#     cloud-init logs are removed. Then any user-data/vendor-data copy still
#     under ROOT/var/lib/cloud is removed too: the bake instance's own user
#     data (manifest, status URI) does not stay in the image, and cloud-init
#     runs afresh on each instance (it also makes new SSH host keys);
#   - ROOT/etc/ssh/ssh_host_* removed;
#   - ROOT/etc/machine-id emptied (systemd makes a new one at first boot);
#   - the journal: rotated and vacuumed when ROOT is / (journalctl), otherwise
#     ROOT/var/log/journal/* removed.
# Authorized SSH keys are left alone: the bake instance is started without a
# key pair and no pipeline key ever reaches it.
#
# Env: none.
# Output: progress on stderr, prefixed "prepare-ami:"; stdout is empty except
# the VM_DIR line of --check.
# Exit: 0 when done (a rerun changes nothing more); 1 with a message naming
# the cause otherwise; 2 on bad usage. Idempotent.
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

readonly PROG=prepare-ami
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
readonly UNIT=windows-vm.service

usage() {
  log "usage: prepare-ami.sh [--generalize | --check] ROOT [ENV_FILE]"
  exit 2
}

mode=install
args=()
for a in "$@"; do
  case $a in
    --generalize) mode=generalize ;;
    --check) mode=check ;;
    -h | --help) usage ;;
    -*) log "unknown option '$a'" && usage ;;
    *) args+=("$a") ;;
  esac
done
[[ ${#args[@]} -ge 1 && ${#args[@]} -le 2 ]] || usage
root_arg=${args[0]}
env_src=${args[1]:-$SCRIPT_DIR/../vm.env}

[[ -d $root_arg ]] || die "ROOT $root_arg is not a directory"
root=$(cd "$root_arg" && pwd -P)
[[ $root != / ]] || root=
# "$root/etc/..." is /etc/... for ROOT=/.

launcher_src=$SCRIPT_DIR/run-vm.sh
unit_src=$SCRIPT_DIR/../assets/$UNIT
[[ -f $launcher_src ]] || die "launcher $launcher_src not found"
proxy_src=$SCRIPT_DIR/imds-proxy.py
[[ -f $proxy_src ]] || die "metadata proxy $proxy_src not found (it goes beside the launcher)"
bash -n "$launcher_src" || die "launcher $launcher_src has a syntax error"
[[ -f $unit_src ]] || die "unit file $unit_src not found"
[[ -f $env_src ]] || die "env file $env_src not found"

# --- the env file ------------------------------------------------------------
# Same format as run-vm.sh reads: KEY=value lines, # comments, blank lines.
lineno=0
vm_dir=/var/lib/windows-vm
halt_seen=
while IFS= read -r line || [[ -n $line ]]; do
  lineno=$((lineno + 1))
  line=${line%$'\r'}
  [[ $line =~ ^[[:space:]]*(#.*)?$ ]] && continue
  [[ $line =~ ^([A-Z_][A-Z0-9_]*)=(.*)$ ]] ||
    die "$env_src line $lineno is not KEY=value: $line"
  k=${BASH_REMATCH[1]}
  v=${BASH_REMATCH[2]}
  # run-vm.sh (like systemd) drops one pair of surrounding quotes.
  if [[ $v =~ ^\"(.*)\"$ || $v =~ ^\'(.*)\'$ ]]; then v=${BASH_REMATCH[1]}; fi
  case $k in
    VM_CONFIG_ISO)
      [[ -z $v ]] ||
        die "$env_src sets VM_CONFIG_ISO (line $lineno): the answer-file media holds secrets and must not ship in the image; remove that line"
      ;;
    VM_DIR) [[ -z $v ]] || vm_dir=$v ;;
    VM_HALT_ON_EXIT) halt_seen=$v ;;
  esac
done <"$env_src"
[[ $vm_dir == /* ]] || die "$env_src sets VM_DIR=$vm_dir; it must be an absolute path"

if [[ $mode == check ]]; then
  printf '%s\n' "$vm_dir"
  exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/prepare-ami.XXXXXX")
trap 'rm -rf -- "$work"' EXIT

env_out=$work/vm.env
if [[ $halt_seen == 1 ]]; then
  cp -- "$env_src" "$env_out"
else
  grep -v -E '^[[:space:]]*VM_HALT_ON_EXIT=' "$env_src" >"$env_out" || true
  [[ -z $(tail -c 1 "$env_out") ]] || echo >>"$env_out"
  {
    echo "# Set by prepare-ami.sh: the builder instance halts when its VM stops."
    echo "VM_HALT_ON_EXIT=1"
  } >>"$env_out"
  log "VM_HALT_ON_EXIT was '${halt_seen:-unset}' in $env_src; the image gets VM_HALT_ON_EXIT=1"
fi

# Copies SRC to DST with MODE through a temporary file, unless DST is the same.
install_file() { # SRC DST MODE
  local src=$1 dst=$2 mode=$3 tmp
  if [[ -f $dst ]] && cmp -s -- "$src" "$dst"; then
    chmod "$mode" -- "$dst"
    log "${dst#"$root"} is up to date"
    return 0
  fi
  mkdir -p -- "$(dirname -- "$dst")"
  tmp=$(mktemp "$dst.XXXXXX")
  cp -- "$src" "$tmp"
  chmod "$mode" -- "$tmp"
  mv -f -- "$tmp" "$dst"
  log "installed ${dst#"$root"}"
}

install_file "$launcher_src" "$root/usr/local/lib/windows-vm/run-vm.sh" 0755
# The guest's metadata proxy: run-vm.sh looks for it beside itself.
install_file "$proxy_src" "$root/usr/local/lib/windows-vm/imds-proxy.py" 0755
install_file "$env_out" "$root/etc/windows-vm/vm.env" 0644
install_file "$unit_src" "$root/etc/systemd/system/$UNIT" 0644

# --- enable the unit -----------------------------------------------------------
wants=$root/etc/systemd/system/multi-user.target.wants/$UNIT
if command -v systemctl >/dev/null; then
  systemctl --root="${root:-/}" --quiet enable "$UNIT" >&2 ||
    die "systemctl --root=${root:-/} enable $UNIT failed"
else
  log "systemctl not found: linking the unit into multi-user.target.wants by hand"
  mkdir -p -- "$(dirname -- "$wants")"
  ln -sfn -- "/etc/systemd/system/$UNIT" "$wants"
fi
[[ -L $wants ]] || die "$UNIT is not enabled: ${wants#"$root"} is missing"
log "$UNIT is enabled (multi-user.target)"

# --- answer-file media (only ever on a build host; never ships) ----------------
if [[ -e $root$vm_dir/config.iso ]]; then
  rm -f -- "$root$vm_dir/config.iso"
  log "removed $vm_dir/config.iso (answer-file media)"
fi
if [[ -e $root$vm_dir/config ]]; then
  find "$root$vm_dir/config" -type f -exec shred -u -- {} + 2>/dev/null || true
  rm -rf -- "$root$vm_dir/config"
  log "removed $vm_dir/config/ (answer file staged for the config ISO)"
fi

if [[ $mode != generalize ]]; then
  log "done (not generalized: host keys, cloud-init state and machine-id untouched)"
  exit 0
fi

# --- generalize ----------------------------------------------------------------
if [[ -z $root ]] && command -v cloud-init >/dev/null; then
  cloud-init clean --logs >&2 || die "cloud-init clean --logs failed"
  log "cloud-init state cleaned (cloud-init clean --logs)"
else
  if [[ -d $root/var/lib/cloud ]]; then
    find "$root/var/lib/cloud" -mindepth 1 -maxdepth 1 ! -name seed -exec rm -rf -- {} +
  fi
  rm -f -- "$root/var/log/cloud-init.log" "$root/var/log/cloud-init-output.log"
  log "cloud-init state removed (/var/lib/cloud except seed/, cloud-init logs)"
fi
if [[ -d $root/var/lib/cloud ]]; then
  left=0
  while IFS= read -r -d '' f; do
    rm -f -- "$f"
    left=$((left + 1))
  done < <(find "$root/var/lib/cloud" \( -name 'user-data*' -o -name 'vendor-data*' -o -name 'cloud-config.txt' \) \
    ! -type d -print0)
  ((left == 0)) || log "removed $left user-data/vendor-data file(s) left under /var/lib/cloud"
fi

shopt -s nullglob
host_keys=("$root"/etc/ssh/ssh_host_*)
shopt -u nullglob
if ((${#host_keys[@]} > 0)); then
  rm -f -- "${host_keys[@]}"
  log "removed ${#host_keys[@]} SSH host key file(s) from /etc/ssh"
fi

if [[ -s $root/etc/machine-id ]]; then
  : >"$root/etc/machine-id"
  log "emptied /etc/machine-id (a new one is made at first boot)"
fi

if [[ -z $root ]] && command -v journalctl >/dev/null; then
  journalctl --rotate >&2 2>/dev/null || true
  journalctl --vacuum-time=1s >&2 2>/dev/null || log "warning: journalctl --vacuum-time failed; the bake's journal stays"
  log "journal rotated and vacuumed"
elif [[ -d $root/var/log/journal ]]; then
  find "$root/var/log/journal" -mindepth 1 -maxdepth 1 -exec rm -rf -- {} +
  log "removed /var/log/journal/*"
fi

log "done (generalized)"

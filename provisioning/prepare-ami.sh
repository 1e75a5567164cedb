#!/usr/bin/env bash
# prepare-ami.sh - make a host file system ready to be baked into the builder AMI.
#
# Usage: prepare-ami.sh [--generalize] ROOT [ENV_FILE]
#
#   ROOT        root of the file system to prepare: / on the build host, or a
#               mounted/unpacked tree (tests)
#   ENV_FILE    the VM env file for the image, default $SCRIPT_DIR/../vm.env.
#               Refused if it sets VM_CONFIG_ISO (the answer-file media holds
#               secrets and must not ship). Installed with VM_HALT_ON_EXIT=1
#               (added or replacing another value): a builder instance stops
#               when its VM stops.
#   --generalize  also remove per-instance identity (see below); the last step
#               before the AMI is taken.
#
# Installs (written only when different):
#   $SCRIPT_DIR/run-vm.sh                -> ROOT/usr/local/lib/windows-vm/run-vm.sh (0755)
#   ENV_FILE                             -> ROOT/etc/windows-vm/vm.env (0644)
#   $SCRIPT_DIR/../assets/windows-vm.service
#                                        -> ROOT/etc/systemd/system/windows-vm.service (0644)
# enables the unit (`systemctl --root=ROOT enable`, which needs no running
# systemd; without systemctl the multi-user.target.wants symlink is made by
# hand) and deletes ROOT$VM_DIR/config.iso and ROOT$VM_DIR/config/ (the
# answer file with the password, and the pipeline key, staged for the ISO;
# VM_DIR from ENV_FILE, default /var/lib/windows-vm).
#
# With --generalize:
#   - cloud-init state: `cloud-init clean --logs` when ROOT is / and cloud-init
#     is installed; otherwise ROOT/var/lib/cloud/* (except seed/) and the
#     cloud-init logs are removed, so cloud-init runs afresh on each instance
#     (it also makes new SSH host keys);
#   - ROOT/etc/ssh/ssh_host_* removed;
#   - ROOT/etc/machine-id emptied (systemd makes a new one at first boot);
#   - the key in PIPELINE_PUBLIC_KEY (an OpenSSH public key line) removed from
#     ROOT/root/.ssh/authorized_keys and ROOT/home/*/.ssh/authorized_keys; other
#     keys stay. Without PIPELINE_PUBLIC_KEY a warning says no key was removed.
#
# With BUILD_INSTANCE_ID (the build host's EC2 instance id) set, it is written
# to ROOT/etc/windows-vm/build-instance-id: the unit's ExecCondition
# (run-vm.sh --not-build-host) then skips the VM on the build host itself.
#
# Env: PIPELINE_PUBLIC_KEY (only read with --generalize); BUILD_INSTANCE_ID.
# Output: what was done, on stderr, prefixed "prepare-ami:"; nothing on stdout.
# Exit: 0 when done (a rerun changes nothing more); 1 with a message naming
# the cause otherwise; 2 on bad usage. Idempotent.
set -euo pipefail

readonly PROG=prepare-ami
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
readonly UNIT=windows-vm.service

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}
usage() {
  log "usage: prepare-ami.sh [--generalize] ROOT [ENV_FILE]"
  exit 2
}

generalize=0
args=()
for a in "$@"; do
  case $a in
    --generalize) generalize=1 ;;
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
bash -n "$launcher_src" || die "launcher $launcher_src has a syntax error"
[[ -f $unit_src ]] || die "unit file $unit_src not found"
[[ -f $env_src ]] || die "env file $env_src not found"

work=$(mktemp -d "${TMPDIR:-/tmp}/prepare-ami.XXXXXX")
trap 'rm -rf -- "$work"' EXIT

# --- the env file ------------------------------------------------------------
# Same format as run-vm.sh reads: KEY=value lines, # comments, blank lines.
lineno=0
vm_dir=/var/lib/windows-vm
halt_seen=
while IFS= read -r line || [[ -n $line ]]; do
  lineno=$((lineno + 1))
  [[ $line =~ ^[[:space:]]*(#.*)?$ ]] && continue
  [[ $line =~ ^([A-Z_][A-Z0-9_]*)=(.*)$ ]] ||
    die "$env_src line $lineno is not KEY=value: $line"
  k=${BASH_REMATCH[1]}
  v=${BASH_REMATCH[2]}
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
install_file "$env_out" "$root/etc/windows-vm/vm.env" 0644
install_file "$unit_src" "$root/etc/systemd/system/$UNIT" 0644
if [[ -n ${BUILD_INSTANCE_ID:-} ]]; then
  [[ $BUILD_INSTANCE_ID =~ ^i-[0-9a-f]{8,17}$ ]] || die "BUILD_INSTANCE_ID '$BUILD_INSTANCE_ID' is not an EC2 instance id"
  printf '%s\n' "$BUILD_INSTANCE_ID" >"$work/build-instance-id"
  install_file "$work/build-instance-id" "$root/etc/windows-vm/build-instance-id" 0644
fi

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

# --- answer-file media and its staging folder (they hold the password) ---------
config_iso=$root$vm_dir/config.iso
if [[ -e $config_iso ]]; then
  rm -f -- "$config_iso"
  log "removed ${config_iso#"$root"} (answer-file media)"
fi
config_dir=$root$vm_dir/config
if [[ -e $config_dir ]]; then
  find "$config_dir" -type f -exec shred -u -- {} + 2>/dev/null || true
  rm -rf -- "$config_dir"
  log "removed ${config_dir#"$root"}/ (answer file and key staged for the config ISO)"
fi

if ((generalize == 0)); then
  log "done (not generalized: host keys, cloud-init state and authorized keys untouched)"
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

if [[ -z ${PIPELINE_PUBLIC_KEY:-} ]]; then
  log "warning: PIPELINE_PUBLIC_KEY is not set: no authorized key removed"
else
  blob=
  read -r -a key_fields <<<"$PIPELINE_PUBLIC_KEY"
  for field in "${key_fields[@]}"; do
    if [[ $field =~ ^AAAA[0-9A-Za-z+/]+=*$ ]]; then
      blob=$field
      break
    fi
  done
  [[ -n $blob ]] || die "PIPELINE_PUBLIC_KEY does not look like an OpenSSH public key (no base64 key field)"
  shopt -s nullglob
  key_files=("$root"/root/.ssh/authorized_keys "$root"/home/*/.ssh/authorized_keys)
  shopt -u nullglob
  removed=0
  for f in "${key_files[@]}"; do
    [[ -f $f ]] || continue
    grep -qF -- "$blob" "$f" || continue
    tmp=$(mktemp "$f.XXXXXX")
    awk -v blob="$blob" '{ for (i = 1; i <= NF; i++) if ($i == blob) next; print }' "$f" >"$tmp"
    chmod --reference="$f" -- "$tmp"
    chown --reference="$f" -- "$tmp"
    mv -f -- "$tmp" "$f"
    removed=$((removed + 1))
    log "removed the pipeline key from ${f#"$root"}"
  done
  ((removed > 0)) || log "the pipeline key is in no authorized_keys file"
fi

log "done (generalized)"

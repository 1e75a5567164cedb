#!/usr/bin/env bash
# shellcheck disable=SC2054 # QEMU option values are comma-separated lists
# run-vm.sh - runs the Windows ARM64 VM under QEMU in the foreground.
#
# Usage: run-vm.sh [--print|--check|--resolve] [ENV_FILE]
#
#   ENV_FILE   the VM's env file (/etc/windows-vm/vm.env on the baked image).
#              Lines are KEY=value (no quotes needed, no spaces in values),
#              '#' starts a comment line. The file is parsed, never sourced:
#              only lines matching ^[A-Z_][A-Z0-9_]*= are accepted, only VM_*
#              keys are used, any other line is an error. Without ENV_FILE the
#              variables come from the environment alone (systemd's
#              EnvironmentFile= sets them). A variable already set in the
#              environment takes precedence over the file.
#   --print    validate, then print the QEMU command line (one argument per
#              line) on stdout instead of starting QEMU. Same as
#              RUN_VM_DRY_RUN=1. Skips the run-time checks (ports in use,
#              VM already running).
#   --check    validate everything, start nothing; exit 0 when QEMU could start.
#   --resolve  print the resolved settings (KEY=value, defaults applied) and
#              exit, without validation.
#
# Variables (defaults in brackets):
#   VM_DIR [/var/lib/windows-vm]      data dir; qemu.pid is written there
#   VM_CPUS [4]                       vCPUs (more than 4 crashed Windows on a1.metal)
#   VM_MEMORY_GIB [8]                 guest memory in GiB
#   VM_ACCEL [kvm]                    kvm (-cpu host) or tcg (-cpu max,pauth=off, tests only)
#   VM_MACHINE_TYPE [auto]            virt-X.Y machine type; auto: the versioned type
#                                     this QEMU's "virt" stands for (-machine help),
#                                     so the virtual hardware stays put across QEMU
#                                     upgrades of a running image's host
#   VM_GIC_VERSION [3]                interrupt controller: 2, 3, 4, host or max (the
#                                     stack sets it per host type; a gic-version= in
#                                     VM_MACHINE_OPTS counts as this and must agree)
#   VM_MACHINE_OPTS []                extra -machine options, e.g. its=off
#   VM_DISK [$VM_DIR/disk.qcow2]      qcow2 system disk, attached as NVMe
#   VM_DISK_CACHE [auto]              auto, none, writeback or writethrough. auto:
#                                     none (O_DIRECT, with aio=io_uring, else native)
#                                     when the disk's file system takes O_DIRECT and
#                                     this QEMU opens the disk that way, else
#                                     writeback. Every mode but writethrough gives
#                                     the guest a write cache and honours its flushes;
#                                     discard=unmap,detect-zeroes=unmap always
#   VM_EFI_CODE [$VM_DIR/QEMU_EFI.fd] 64 MiB firmware, read-only pflash
#   VM_EFI_VARS [$VM_DIR/QEMU_VARS.fd] 64 MiB EFI variable store, writable pflash
#   VM_DRIVERS_ISO []                 virtio-win ISO, read-only USB CD (optional)
#   VM_CONFIG_ISO []                  answer-file ISO, read-only USB CD (optional)
#   VM_INSTALL_ISO []                 Windows install ISO, read-only USB CD booted
#                                     before the disk (optional; for ISO installs)
#   VM_SSH_PORT [2222]                host port 127.0.0.1:N -> guest 22
#   VM_BUILDLET_PORT [443]            host port *:N -> guest 443 (all addresses)
#   VM_VNC_DISPLAY []                 VNC display number on 127.0.0.1 (optional)
#   VM_QMP_SOCKET [$VM_DIR/qmp.sock]  QMP control socket (stop-vm.sh uses it)
#   VM_SERIAL_LOG [$VM_DIR/serial.log] guest serial console, appended to
#   VM_HALT_ON_EXIT [0]               1: power the host off when QEMU exits
#   VM_MAC [52:54:00:12:34:56]        guest NIC MAC address
#   VM_IMDS_PROXY [1]                 1: guest 10.0.2.100:8173 -> the metadata proxy
#                                     (imds-proxy.py beside this script: user data and
#                                     non-credential meta-data only; needs python3)
#   VM_USER [windows-vm as root]      the unprivileged account QEMU runs as (root only;
#                                     root: QEMU stays root, and the guest can reach
#                                     the instance role's credentials)
# Environment only (never read from the file):
#   RUN_VM_DRY_RUN=1                  same as --print
#   RUN_VM_HALT_COMMAND               program run instead of the host power-off
#                                     when VM_HALT_ON_EXIT=1 (for tests)
#
# The guest cannot reach the host's credentials. Started as root, QEMU opens
# its files, sockets, ports and /dev/kvm as root and then runs the guest as
# VM_USER (QEMU's -runas, or -run-with user= on QEMU 9.1+); before that this
# script installs the nftables table inet windows_vm_<uid> (replaced on every
# start), which refuses that uid's connections to 169.254.0.0/16,
# fd00:ec2::/32 and fe80::/10 (the Amazon DNS resolver excepted), so the guest
# reaches the internet but not the metadata service. The proxy reaches the
# service through a gate (imds-proxy.py --gate, run as nobody, an abstract unix
# socket) that forwards only what the proxy may ask. Unset VM_USER whose
# account does not exist: a warning, and QEMU runs as root; VM_USER set
# explicitly: the account must exist, or nothing starts. Needs nft (nftables)
# and setpriv (util-linux) then.
#
# Outputs: $VM_DIR/qemu.pid (written by QEMU, removed when it exits; QEMU run
#   as VM_USER cannot remove it, nor the QMP socket, from a VM_DIR only root
#   may write: they stay, stale, until the next start replaces them), the
#   serial log (a "=== run-vm: ..." line is appended before each start; a log
#   over 16 MiB is cut to its last 1 MiB), the QMP socket, the nftables table
#   (it stays after QEMU exits). The QEMU command line, the firewall's and the
#   gate's lines ("imds-gate: GET /latest/user-data -> 200") go to stderr.
# Exit: 2 when validation fails (every problem is listed first, QEMU is not
#   started) or the firewall or the gate cannot be set up; otherwise QEMU's own
#   exit status (QEMU replaces this script via exec unless VM_HALT_ON_EXIT=1,
#   so systemd supervises QEMU directly). With
#   VM_HALT_ON_EXIT=1 the host is powered off after QEMU exits by itself (the
#   guest shut down, or QEMU quit or crashed); not when the service is being
#   stopped: this script got SIGTERM/SIGINT/SIGHUP (forwarded to QEMU), or its
#   systemd unit is "deactivating" (ExecStop powered the guest down).
set -euo pipefail

readonly me="run-vm"
readonly qemu_bin="qemu-system-aarch64"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly efi_size=$((64 * 1024 * 1024))

log() { printf '%s: %s\n' "$me" "$*" >&2; }
q() { printf '%s' "${1//,/,,}"; } # escape a value inside a QEMU option list
die() {
  log "$*"
  exit 2
}

mode=run
env_file=""
while (($#)); do
  case "$1" in
    --print) mode=print ;;
    --check) mode=check ;;
    --resolve) mode=resolve ;;
    -h | --help)
      awk 'NR > 2 && !/^#/ { exit } NR > 2 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"
      exit 0
      ;;
    -*) die "unknown option '$1' (usage: run-vm.sh [--print|--check|--resolve] [ENV_FILE])" ;;
    *)
      [[ -z $env_file ]] || die "more than one ENV_FILE given ('$env_file', '$1')"
      env_file=$1
      ;;
  esac
  shift
done
if [[ $mode == run && ${RUN_VM_DRY_RUN:-0} == 1 ]]; then mode=print; fi

readonly known_vars=(VM_DIR VM_CPUS VM_MEMORY_GIB VM_ACCEL VM_MACHINE_TYPE VM_GIC_VERSION VM_MACHINE_OPTS VM_DISK
  VM_DISK_CACHE VM_EFI_CODE VM_EFI_VARS
  VM_DRIVERS_ISO VM_CONFIG_ISO VM_INSTALL_ISO VM_SSH_PORT VM_BUILDLET_PORT VM_VNC_DISPLAY VM_QMP_SOCKET VM_SERIAL_LOG
  VM_HALT_ON_EXIT VM_MAC VM_IMDS_PROXY VM_USER)

problems=()
problem() { problems+=("$*"); }
warnings=()
warn() { warnings+=("$*"); }

# --- env file ---------------------------------------------------------------
if [[ -n $env_file ]]; then
  [[ -f $env_file && -r $env_file ]] || die "ENV_FILE '$env_file' does not exist or is not readable"
  declare -A from_file=()
  lineno=0
  while IFS= read -r line || [[ -n $line ]]; do
    lineno=$((lineno + 1))
    line=${line%$'\r'}
    [[ $line =~ ^[[:space:]]*(#.*)?$ ]] && continue
    if [[ ! $line =~ ^([A-Z_][A-Z0-9_]*)=(.*)$ ]]; then
      problem "$env_file:$lineno: not a KEY=value line: '${line:0:80}'"
      continue
    fi
    key=${BASH_REMATCH[1]}
    value=${BASH_REMATCH[2]}
    # systemd's EnvironmentFile= drops one pair of surrounding quotes: so do we.
    if [[ $value =~ ^\"(.*)\"$ || $value =~ ^\'(.*)\'$ ]]; then value=${BASH_REMATCH[1]}; fi
    [[ $key == VM_* ]] || continue
    # The environment wins over the file; a later line wins over an earlier one.
    if [[ -v $key && -z ${from_file[$key]:-} ]]; then continue; fi
    printf -v "$key" '%s' "$value"
    from_file[$key]=1
  done <"$env_file"
fi

# Unknown VM_* names are most likely typos: say so rather than ignore them.
while IFS= read -r name; do
  known=0
  for k in "${known_vars[@]}"; do [[ $name == "$k" ]] && known=1 && break; done
  ((known)) || warn "unknown variable $name ignored (typo?)"
done < <(compgen -v VM_ || true)

# --- defaults ----------------------------------------------------------------
VM_DIR=${VM_DIR:-/var/lib/windows-vm}
VM_CPUS=${VM_CPUS:-4}
VM_MEMORY_GIB=${VM_MEMORY_GIB:-8}
VM_ACCEL=${VM_ACCEL:-kvm}
VM_MACHINE_TYPE=${VM_MACHINE_TYPE:-auto}
VM_GIC_VERSION=${VM_GIC_VERSION:-}
VM_MACHINE_OPTS=${VM_MACHINE_OPTS:-}
VM_DISK=${VM_DISK:-$VM_DIR/disk.qcow2}
VM_DISK_CACHE=${VM_DISK_CACHE:-auto}
# A gic-version= in VM_MACHINE_OPTS is the GIC version; VM_GIC_VERSION, when
# set, must agree with it. Neither: GICv3, which every Graviton host has.
opts_gic=""
if [[ ,$VM_MACHINE_OPTS, =~ ,gic-version=([^,]*), ]]; then opts_gic=${BASH_REMATCH[1]}; fi
VM_GIC_VERSION=${VM_GIC_VERSION:-${opts_gic:-3}}
VM_EFI_CODE=${VM_EFI_CODE:-$VM_DIR/QEMU_EFI.fd}
VM_EFI_VARS=${VM_EFI_VARS:-$VM_DIR/QEMU_VARS.fd}
VM_DRIVERS_ISO=${VM_DRIVERS_ISO:-}
VM_CONFIG_ISO=${VM_CONFIG_ISO:-}
VM_INSTALL_ISO=${VM_INSTALL_ISO:-}
VM_SSH_PORT=${VM_SSH_PORT:-2222}
VM_BUILDLET_PORT=${VM_BUILDLET_PORT:-443}
VM_VNC_DISPLAY=${VM_VNC_DISPLAY:-}
VM_QMP_SOCKET=${VM_QMP_SOCKET:-$VM_DIR/qmp.sock}
VM_SERIAL_LOG=${VM_SERIAL_LOG:-$VM_DIR/serial.log}
VM_HALT_ON_EXIT=${VM_HALT_ON_EXIT:-0}
VM_MAC=${VM_MAC:-52:54:00:12:34:56}
VM_IMDS_PROXY=${VM_IMDS_PROXY:-1}
vm_user_explicit=0
[[ -z ${VM_USER:-} ]] || vm_user_explicit=1
if ((EUID == 0)); then VM_USER=${VM_USER:-windows-vm}; else VM_USER=${VM_USER:-}; fi
pid_file="$VM_DIR/qemu.pid"
resolved_file="$VM_DIR/vm-resolved.env"

if [[ $mode == resolve ]]; then
  for k in "${known_vars[@]}"; do printf '%s=%s\n' "$k" "${!k}"; done
  printf 'VM_PID_FILE=%s\n' "$pid_file"
  exit 0
fi

# --- validation ----------------------------------------------------------------
is_uint() { [[ $1 =~ ^[0-9]+$ ]] && ((10#$1 >= ${2:-0})) && ((10#$1 <= ${3:-999999})); }

is_uint "$VM_CPUS" 1 512 || problem "VM_CPUS=$VM_CPUS is not a whole number of vCPUs (1-512)"
is_uint "$VM_MEMORY_GIB" 1 4096 || problem "VM_MEMORY_GIB=$VM_MEMORY_GIB is not a whole number of GiB (1-4096)"
is_uint "$VM_SSH_PORT" 1 65535 || problem "VM_SSH_PORT=$VM_SSH_PORT is not a TCP port number"
is_uint "$VM_BUILDLET_PORT" 1 65535 || problem "VM_BUILDLET_PORT=$VM_BUILDLET_PORT is not a TCP port number"
if is_uint "$VM_SSH_PORT" 1 65535 && [[ $VM_SSH_PORT == "$VM_BUILDLET_PORT" ]]; then
  problem "VM_SSH_PORT and VM_BUILDLET_PORT are both $VM_SSH_PORT: they must differ"
fi
if [[ -n $VM_VNC_DISPLAY ]] && ! is_uint "$VM_VNC_DISPLAY" 0 59535; then
  problem "VM_VNC_DISPLAY=$VM_VNC_DISPLAY is not a display number (e.g. 1 for port 5901)"
fi
[[ $VM_HALT_ON_EXIT == [01] ]] || problem "VM_HALT_ON_EXIT=$VM_HALT_ON_EXIT must be 0 or 1"
[[ $VM_IMDS_PROXY == [01] ]] || problem "VM_IMDS_PROXY=$VM_IMDS_PROXY must be 0 or 1"
[[ $VM_MAC =~ ^([0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}$ ]] || problem "VM_MAC=$VM_MAC is not a MAC address (xx:xx:xx:xx:xx:xx)"
[[ $VM_MACHINE_OPTS =~ ^[A-Za-z0-9=,._-]*$ ]] ||
  problem "VM_MACHINE_OPTS=$VM_MACHINE_OPTS may only hold -machine options like gic-version=max,its=off"

[[ $VM_GIC_VERSION =~ ^(2|3|4|host|max)$ ]] || problem "VM_GIC_VERSION=$VM_GIC_VERSION must be 2, 3, 4, host or max"
[[ -z $opts_gic || $opts_gic == "$VM_GIC_VERSION" ]] ||
  problem "VM_MACHINE_OPTS sets gic-version=$opts_gic but VM_GIC_VERSION=$VM_GIC_VERSION: set it in one place (VM_GIC_VERSION)"
[[ $VM_MACHINE_TYPE == auto || $VM_MACHINE_TYPE =~ ^virt-[0-9]+\.[0-9]+$ ]] ||
  problem "VM_MACHINE_TYPE=$VM_MACHINE_TYPE must be auto or a versioned virt machine type like virt-8.2"
[[ $VM_DISK_CACHE =~ ^(auto|none|writeback|writethrough)$ ]] ||
  problem "VM_DISK_CACHE=$VM_DISK_CACHE must be auto, none, writeback or writethrough"

if is_uint "$VM_CPUS" 1 512; then
  ((10#$VM_CPUS <= 4)) || warn "VM_CPUS=$VM_CPUS: more than 4 vCPUs crashed Windows on a1.metal (CLOCK_WATCHDOG_TIMEOUT)"
  host_cpus=$(nproc 2>/dev/null || echo 0)
  if ((host_cpus > 0 && 10#$VM_CPUS > host_cpus)); then
    warn "VM_CPUS=$VM_CPUS is more than the host's $host_cpus CPUs"
  fi
fi
if is_uint "$VM_MEMORY_GIB" 1 4096; then
  host_kib=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo 2>/dev/null || echo 0)
  if ((host_kib > 0 && 10#$VM_MEMORY_GIB * 1024 * 1024 > host_kib)); then
    problem "VM_MEMORY_GIB=$VM_MEMORY_GIB is more than the host's memory ($((host_kib / 1024 / 1024)) GiB)"
  elif ((host_kib > 0 && 10#$VM_MEMORY_GIB * 1024 * 1024 > host_kib * 9 / 10)); then
    warn "VM_MEMORY_GIB=$VM_MEMORY_GIB leaves less than 10% of the host's memory to the host"
  fi
fi

case "$VM_ACCEL" in
  kvm)
    host_arch=$(uname -m)
    if [[ $host_arch != aarch64 ]]; then
      problem "VM_ACCEL=kvm needs an aarch64 host, this one is $host_arch (use VM_ACCEL=tcg for tests)"
    elif [[ ! -e /dev/kvm ]]; then
      problem "VM_ACCEL=kvm but /dev/kvm does not exist (no KVM on this host: use a .metal instance, or VM_ACCEL=tcg for tests)"
    elif [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
      problem "VM_ACCEL=kvm but /dev/kvm is not readable and writable by $(id -un) (run as root, or VM_ACCEL=tcg for tests)"
    fi
    ;;
  tcg) ;;
  *) problem "VM_ACCEL=$VM_ACCEL must be kvm or tcg" ;;
esac

# resolve_machine_type sets machine_type (and machine_why) from VM_MACHINE_TYPE
# and `qemu-system-aarch64 -machine help`, whose line for "virt" reads
# "virt  QEMU 8.2 ARM Virtual Machine (alias of virt-8.2)".
machine_type="" machine_why=""
resolve_machine_type() {
  local help
  if ! help=$(timeout 30 "$qemu_bin" -machine help 2>/dev/null); then
    problem "$qemu_bin -machine help failed: cannot tell its machine types"
    return
  fi
  if [[ $VM_MACHINE_TYPE == auto ]]; then
    machine_type=$(sed -n 's/^virt[[:space:]].*(alias of \(virt-[0-9][0-9]*\.[0-9][0-9]*\))[[:space:]]*$/\1/p' <<<"$help" | head -n 1)
    machine_why="the versioned type this QEMU's virt stands for"
    [[ -n $machine_type ]] ||
      problem "$qemu_bin -machine help shows no versioned type behind virt (no 'alias of virt-X.Y'): set VM_MACHINE_TYPE=virt-X.Y"
  elif awk -v t="$VM_MACHINE_TYPE" '$1 == t { found = 1 } END { exit !found }' <<<"$help"; then
    machine_type=$VM_MACHINE_TYPE machine_why="VM_MACHINE_TYPE"
  else
    problem "VM_MACHINE_TYPE=$VM_MACHINE_TYPE is not a machine type of this QEMU (its virt types: $(awk '$1 ~ /^virt-[0-9]/ { printf "%s ", $1 }' <<<"$help"))"
  fi
}

if ! command -v "$qemu_bin" >/dev/null 2>&1; then
  problem "$qemu_bin not found on PATH (install the qemu-system-arm package)"
elif [[ $VM_MACHINE_TYPE == auto || $VM_MACHINE_TYPE =~ ^virt-[0-9]+\.[0-9]+$ ]]; then
  resolve_machine_type
fi

[[ -d $VM_DIR ]] || problem "VM_DIR=$VM_DIR is not a directory"

file_size() { stat -Lc %s -- "$1" 2>/dev/null || echo -1; }

# check_file VAR HINT [writable]
check_file() {
  local var=$1 hint=$2 rw=${3:-}
  local path=${!var}
  if [[ ! -e $path ]]; then
    problem "$var=$path does not exist ($hint)"
  elif [[ ! -f $path ]]; then
    problem "$var=$path is not a regular file"
  elif [[ ! -r $path ]]; then
    problem "$var=$path is not readable by $(id -un)"
  elif [[ $rw == writable && ! -w $path ]]; then
    problem "$var=$path is not writable by $(id -un) (QEMU writes to it)"
  else
    return 0
  fi
  return 1
}

if check_file VM_EFI_CODE "run build-efi.sh first"; then
  size=$(file_size "$VM_EFI_CODE")
  ((size == efi_size)) || problem "VM_EFI_CODE=$VM_EFI_CODE is $size bytes, the virt machine's pflash needs exactly $efi_size (64 MiB; run build-efi.sh)"
fi
if check_file VM_EFI_VARS "run build-efi.sh first" writable; then
  size=$(file_size "$VM_EFI_VARS")
  ((size == efi_size)) || problem "VM_EFI_VARS=$VM_EFI_VARS is $size bytes, the virt machine's pflash needs exactly $efi_size (64 MiB; run build-efi.sh)"
fi
disk_ok=0
if check_file VM_DISK "run prepare-disk.sh first" writable; then
  magic=$(head -c 4 -- "$VM_DISK" | od -An -tx1 | tr -d ' \n')
  if [[ $magic == 514649fb ]]; then disk_ok=1; else
    problem "VM_DISK=$VM_DISK is not a qcow2 image (convert it with qemu-img convert -O qcow2)"
  fi
fi

# qemu_opens_disk AIO: this QEMU opens VM_DISK with O_DIRECT and aio=AIO (read-only,
# without taking its lock, so a running VM's disk can be probed too).
qemu_opens_disk() {
  printf '%s\n' '{"execute":"qmp_capabilities"}' '{"execute":"quit"}' |
    timeout 30 "$qemu_bin" -machine none -nodefaults -no-user-config -display none -qmp stdio \
      -blockdev "driver=file,node-name=probe,filename=$(q "$VM_DISK"),cache.direct=on,aio=$1,read-only=on,locking=off" \
      >/dev/null 2>&1
}

# choose_disk_mode sets disk_cache, disk_aio ("" for QEMU's default) and
# disk_why. cache=none is O_DIRECT: no host page cache, and the guest's FLUSH
# still reaches the disk; writethrough (what this launcher used before) syncs
# the host file after every write.
disk_cache="" disk_aio="" disk_why=""
choose_disk_mode() {
  if [[ $VM_DISK_CACHE == writeback || $VM_DISK_CACHE == writethrough ]]; then
    disk_cache=$VM_DISK_CACHE disk_why="VM_DISK_CACHE=$VM_DISK_CACHE"
    return
  fi
  if ! dd if="$VM_DISK" of=/dev/null bs=4096 count=1 iflag=direct status=none 2>/dev/null; then
    if [[ $VM_DISK_CACHE == none ]]; then
      problem "VM_DISK_CACHE=none, but the file system of VM_DISK=$VM_DISK does not take O_DIRECT: set VM_DISK_CACHE=auto or writeback"
    fi
    disk_cache=writeback disk_why="the file system of $VM_DISK does not take O_DIRECT"
    return
  fi
  local aio
  for aio in io_uring native; do
    if qemu_opens_disk "$aio"; then
      disk_cache=none disk_aio=$aio
      disk_why="O_DIRECT works on the file system of $VM_DISK, and this QEMU opens it with aio=$aio"
      return
    fi
  done
  if [[ $VM_DISK_CACHE == none ]]; then
    disk_cache=none disk_why="VM_DISK_CACHE=none; this QEMU opens $VM_DISK with neither aio=io_uring nor aio=native"
  else
    disk_cache=writeback disk_why="this QEMU opens $VM_DISK with O_DIRECT and neither aio=io_uring nor aio=native"
  fi
}
if ((disk_ok)) && [[ $VM_DISK_CACHE =~ ^(auto|none|writeback|writethrough)$ ]] && command -v "$qemu_bin" >/dev/null 2>&1; then
  choose_disk_mode
fi
[[ -z $VM_DRIVERS_ISO ]] || check_file VM_DRIVERS_ISO "fetch the virtio-win ISO, or leave VM_DRIVERS_ISO empty" || true
[[ -z $VM_CONFIG_ISO ]] || check_file VM_CONFIG_ISO "run build-config-iso.sh, or leave VM_CONFIG_ISO empty" || true
[[ -z $VM_INSTALL_ISO ]] || check_file VM_INSTALL_ISO "fetch the Windows ISO, or leave VM_INSTALL_ISO empty" || true

for var in VM_SERIAL_LOG VM_QMP_SOCKET; do
  dir=$(dirname -- "${!var}")
  if [[ ! -d $dir ]]; then
    problem "$var=${!var}: directory $dir does not exist"
  elif [[ ! -w $dir ]]; then
    problem "$var=${!var}: directory $dir is not writable by $(id -un)"
  fi
done
# A unix socket path holds at most 107 bytes.
((${#VM_QMP_SOCKET} <= 107)) || problem "VM_QMP_SOCKET=$VM_QMP_SOCKET is longer than 107 bytes (a unix socket path limit)"
if [[ -e $VM_SERIAL_LOG && ! -w $VM_SERIAL_LOG ]]; then
  problem "VM_SERIAL_LOG=$VM_SERIAL_LOG is not writable by $(id -un)"
fi

# Every path goes into a QEMU option value, where ',' must be doubled; a
# space would break the env file format anyway.
for var in VM_DIR VM_DISK VM_EFI_CODE VM_EFI_VARS VM_DRIVERS_ISO VM_CONFIG_ISO VM_INSTALL_ISO VM_QMP_SOCKET VM_SERIAL_LOG; do
  [[ ${!var} != *[[:space:]]* ]] || problem "$var='${!var}' contains white space"
done

# --- who QEMU runs as, and the metadata proxy (see "The guest cannot reach the
# host's credentials" above) ----------------------------------------------------
# check_privileges sets run_as (the account QEMU drops to; empty: it does not
# drop) with run_as_uid, and the gate's account (nobody) in gate_uid/gate_gid.
run_as="" run_as_uid="" gate_uid="" gate_gid=""
check_privileges() {
  if [[ -n $VM_USER && ! $VM_USER =~ ^[a-z_][a-z0-9_-]{0,31}$ ]]; then
    problem "VM_USER=$VM_USER is not an account name (lowercase letters, digits, '_' and '-')"
    return
  fi
  if ((EUID != 0)); then
    if [[ -n $VM_USER && $VM_USER != "$(id -un)" ]]; then
      problem "VM_USER=$VM_USER: only root can run QEMU as another account (this is $(id -un)): start as root, or leave VM_USER unset"
    elif [[ $VM_IMDS_PROXY == 1 ]]; then
      warn "not started as root: no firewall rule keeps the guest from the instance metadata service; start as root to run QEMU as an unprivileged VM_USER behind one"
    fi
    return
  fi
  if [[ $VM_USER == root ]]; then
    warn "VM_USER=root: QEMU runs as root, and the guest can reach the instance metadata service and the role's credentials"
    return
  fi
  local create="useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin $VM_USER"
  if ! run_as_uid=$(id -u -- "$VM_USER" 2>/dev/null); then
    if ((vm_user_explicit)); then
      problem "VM_USER=$VM_USER: no such account; create it ($create), or set VM_USER=root"
    else
      warn "the account $VM_USER does not exist, so QEMU runs as root and the guest can reach the instance metadata service and the role's credentials; create it ($create)"
    fi
    return
  fi
  if ((run_as_uid == 0)); then
    problem "VM_USER=$VM_USER has uid 0: name an unprivileged account (or VM_USER=root)"
    return
  fi
  if ! gate_uid=$(id -u nobody 2>/dev/null) || ! gate_gid=$(id -g nobody 2>/dev/null); then
    problem "VM_USER=$VM_USER: no account 'nobody' to run the metadata gate as"
  elif ((run_as_uid == gate_uid)); then
    problem "VM_USER=$VM_USER: the metadata gate runs as nobody (uid $gate_uid), so QEMU needs an account of its own"
  fi
  run_as=$VM_USER
  command -v nft >/dev/null 2>&1 ||
    problem "VM_USER=$VM_USER: nft not found (install nftables): without its rule the guest could reach the instance's credentials"
  command -v setpriv >/dev/null 2>&1 || problem "VM_USER=$VM_USER: setpriv not found (install util-linux)"
}

# check_imds_proxy sets python and imds_proxy when VM_IMDS_PROXY=1.
python="" imds_proxy="$here/imds-proxy.py" gate_name="windows-vm-imds-$$"
check_imds_proxy() {
  [[ $VM_IMDS_PROXY == 1 ]] || return 0
  python=/usr/bin/python3
  [[ -x $python ]] || python=$(command -v python3 2>/dev/null || true)
  if [[ -z $python ]]; then
    problem "VM_IMDS_PROXY=1 needs python3 for the metadata proxy (install python3), or set VM_IMDS_PROXY=0"
  elif [[ ! -r $imds_proxy ]]; then
    problem "VM_IMDS_PROXY=1 but the metadata proxy $imds_proxy is missing: install it beside run-vm.sh"
  elif [[ ! $imds_proxy$python =~ ^[A-Za-z0-9/._+@-]+$ ]]; then
    problem "the metadata proxy's path $imds_proxy (or $python) holds characters other than letters, digits and /._+@- (it goes into QEMU's -netdev option)"
  elif [[ -n $run_as && -n $gate_uid ]] && command -v setpriv >/dev/null 2>&1; then
    # QEMU runs the proxy as VM_USER, the gate runs as nobody: both must reach it.
    local who
    for who in "$run_as" nobody; do
      setpriv --reuid="$who" --regid="$(id -g "$who")" --init-groups -- test -r "$imds_proxy" 2>/dev/null ||
        warn "$who cannot read $imds_proxy (a folder on its path is closed to it): the guest's metadata requests will fail"
    done
  fi
}

check_privileges
check_imds_proxy

# Is a QEMU from this VM_DIR already running? (QEMU removes qemu.pid on a
# clean exit; after a crash the file stays, so check the process too.)
running_pid() {
  local pid
  [[ -r $pid_file ]] || return 1
  pid=$(tr -dc '0-9' 2>/dev/null <"$pid_file" || true)
  [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q qemu-system || return 1
  printf '%s\n' "$pid"
}

# shellcheck disable=SC2016 # $1 expands in the inner bash
port_in_use() { timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null; }

if [[ $mode != print ]]; then
  if pid=$(running_pid); then
    problem "a QEMU for VM_DIR=$VM_DIR is already running (pid $pid from $pid_file); stop it first: stop-vm.sh $VM_QMP_SOCKET"
  else
    for var in VM_SSH_PORT VM_BUILDLET_PORT; do
      if is_uint "${!var}" 1 65535 && port_in_use "${!var}"; then
        problem "$var=${!var}: something already listens on port ${!var} of this host"
      fi
    done
  fi
  unpriv_start=$(cat /proc/sys/net/ipv4/ip_unprivileged_port_start 2>/dev/null || echo 1024)
  if ((EUID != 0)) && is_uint "$VM_BUILDLET_PORT" 1 65535 && ((10#$VM_BUILDLET_PORT < unpriv_start)); then
    problem "VM_BUILDLET_PORT=$VM_BUILDLET_PORT is below $unpriv_start: only root can forward it (run as root)"
  fi
fi

for w in "${warnings[@]}"; do log "WARNING: $w"; done
if ((${#problems[@]})); then
  log "cannot start the VM (env file: ${env_file:-none, environment only}):"
  for p in "${problems[@]}"; do printf '  - %s\n' "$p" >&2; done
  exit 2
fi
log "machine $machine_type ($machine_why), GIC version $VM_GIC_VERSION"
log "disk cache=$disk_cache${disk_aio:+,aio=$disk_aio},discard=unmap,detect-zeroes=unmap ($disk_why)"
if [[ $mode == check ]]; then
  log "configuration OK"
  exit 0
fi

# --- who QEMU runs as, and the metadata proxy: the run-time parts ---------------

# imds_guestfwd: the -netdev user option that runs the proxy per guest connection.
imds_guestfwd() {
  local cmdline="$python -I -S $imds_proxy"
  [[ -z $run_as ]] || cmdline+=" --upstream unix:@$gate_name --upstream-uid $gate_uid"
  printf 'guestfwd=tcp:10.0.2.100:8173-cmd:%s' "$(q "$cmdline")"
}

# runas_args: QEMU's options to drop to run_as once it has opened everything.
runas_args() {
  if "$qemu_bin" -help 2>/dev/null | grep -q -- '-run-with .*user='; then
    cmd+=(-run-with "user=$(q "$run_as")")
  else
    cmd+=(-runas "$run_as")
  fi
}

# install_metadata_firewall: (re)places table inet windows_vm_<uid>, whose
# chain guest refuses run_as's connections to the link-local and EC2 metadata
# addresses (the Amazon DNS resolver on port 53 excepted). Loopback stays open:
# libslirp makes its guestfwd socket pairs over 127.0.0.1.
install_metadata_firewall() {
  local table="windows_vm_$run_as_uid" out
  out=$(printf '%s\n' \
    "table inet $table" \
    "delete table inet $table" \
    "table inet $table {" \
    "  chain output {" \
    "    type filter hook output priority filter; policy accept;" \
    "    meta skuid $run_as_uid jump guest" \
    "  }" \
    "  chain guest {" \
    "    meta l4proto { tcp, udp } th dport 53 ip daddr 169.254.169.253 accept" \
    "    meta l4proto { tcp, udp } th dport 53 ip6 daddr fd00:ec2::253 accept" \
    "    ip daddr 169.254.0.0/16 counter jump refuse" \
    "    ip6 daddr { fd00:ec2::/32, fe80::/10 } counter jump refuse" \
    "  }" \
    "  chain refuse {" \
    "    meta l4proto tcp reject with tcp reset" \
    "    reject with icmpx type admin-prohibited" \
    "  }" \
    "}" | nft -f - 2>&1) || die "cannot install the nftables table inet $table that keeps $run_as (uid $run_as_uid) from the instance metadata service: ${out//$'\n'/ }"
  log "nftables table inet $table: $run_as (uid $run_as_uid) gets no connection to 169.254.0.0/16, fd00:ec2::/32 or fe80::/10 (Amazon DNS excepted)"
}

# start_imds_gate: the gate (imds-proxy.py --gate, as nobody) that the proxy
# reaches the metadata service through; it exits when QEMU (this pid, after
# exec) is gone.
start_imds_gate() {
  local fd line="" gate_pid
  exec {fd}< <(exec setpriv --reuid="$gate_uid" --regid="$gate_gid" --clear-groups --no-new-privs -- \
    "$python" -I -S "$imds_proxy" --gate "$gate_name" --vm-uid "$run_as_uid" --parent "$$" </dev/null)
  gate_pid=$!
  read -r -t 10 -u "$fd" line || true
  exec {fd}<&-
  if [[ $line != ready ]]; then
    kill "$gate_pid" 2>/dev/null || true
    die "the metadata gate ($imds_proxy --gate, as nobody) did not start within 10 s: see its messages above"
  fi
}

# --- command line --------------------------------------------------------------

# The versioned machine type and the GIC version first, then the other options.
machine="$machine_type,gic-version=$VM_GIC_VERSION"
IFS=, read -r -a machine_opts <<<"$VM_MACHINE_OPTS"
for o in "${machine_opts[@]}"; do
  [[ -z $o || $o == gic-version=* ]] || machine+=",$o"
done
disk_opts="cache=$disk_cache${disk_aio:+,aio=$disk_aio},discard=unmap,detect-zeroes=unmap"
# Under TCG, emulating pointer authentication's QARMA5 cipher costs about half
# of the boot time (the stand-in guest: ~23 s with it, ~12 s without).
if [[ $VM_ACCEL == kvm ]]; then cpu=host; else cpu=max,pauth=off; fi

netdev="user,id=net0,hostfwd=tcp:127.0.0.1:$VM_SSH_PORT-:22,hostfwd=tcp::$VM_BUILDLET_PORT-:443"
[[ $VM_IMDS_PROXY != 1 ]] || netdev+=",$(imds_guestfwd)"

cmd=(
  "$qemu_bin"
  -name windows-vm
  -no-user-config -nodefaults
  -machine "$machine"
  -accel "$VM_ACCEL" -cpu "$cpu"
  -smp "$((10#$VM_CPUS))" -m "$((10#$VM_MEMORY_GIB))G"
  -drive "if=pflash,unit=0,format=raw,readonly=on,file=$(q "$VM_EFI_CODE")"
  -drive "if=pflash,unit=1,format=raw,file=$(q "$VM_EFI_VARS")"
  # 8 USB 2 and 8 USB 3 ports: the default 4 cannot take keyboard, mouse and
  # three USB CDs, and QEMU would then put two CDs behind a 12 Mb/s hub.
  -device nec-usb-xhci,id=xhci,p2=8,p3=8
  -device usb-kbd,bus=xhci.0
  -device usb-mouse,bus=xhci.0
  -device ramfb
)
if [[ -n $VM_VNC_DISPLAY ]]; then
  cmd+=(-vnc "127.0.0.1:$((10#$VM_VNC_DISPLAY))")
else
  cmd+=(-display none)
fi
# Boot order: the firmware's own (USB before NVMe, which an ISO without an EFI
# boot image passes in no time), except with an install ISO: that first, then
# the disk. (With any bootindex set, devices without one are not boot options.)
disk_boot="" install_boot=""
if [[ -n $VM_INSTALL_ISO ]]; then disk_boot=",bootindex=1" install_boot=",bootindex=0"; fi
cmd+=(
  -drive "if=none,id=disk0,format=qcow2,$disk_opts,file=$(q "$VM_DISK")"
  -device "nvme,drive=disk0,serial=windows-disk0$disk_boot"
)
if [[ -n $VM_INSTALL_ISO ]]; then
  cmd+=(
    -drive "if=none,id=install,format=raw,media=cdrom,readonly=on,file=$(q "$VM_INSTALL_ISO")"
    -device "usb-storage,bus=xhci.0,drive=install,removable=on$install_boot"
  )
fi
if [[ -n $VM_DRIVERS_ISO ]]; then
  cmd+=(
    -drive "if=none,id=drivers,format=raw,media=cdrom,readonly=on,file=$(q "$VM_DRIVERS_ISO")"
    -device usb-storage,bus=xhci.0,drive=drivers,removable=on
  )
fi
if [[ -n $VM_CONFIG_ISO ]]; then
  cmd+=(
    -drive "if=none,id=config,format=raw,media=cdrom,readonly=on,file=$(q "$VM_CONFIG_ISO")"
    -device usb-storage,bus=xhci.0,drive=config,removable=on
  )
fi
cmd+=(
  -device "virtio-net-pci,disable-legacy=on,romfile=,netdev=net0,mac=$VM_MAC"
  -netdev "$netdev"
  -device virtio-rng-pci
  -chardev "file,id=serial0,path=$(q "$VM_SERIAL_LOG"),append=on"
  -serial chardev:serial0
  -chardev "socket,id=qmp0,path=$(q "$VM_QMP_SOCKET"),server=on,wait=off"
  -mon chardev=qmp0,mode=control
  -pidfile "$pid_file"
)
[[ -z $run_as ]] || runas_args

if [[ $mode == print ]]; then
  printf '%s\n' "${cmd[@]}"
  exit 0
fi

# --- run -------------------------------------------------------------------------
# Keep the serial log bounded across many boots, and mark where this boot starts.
if [[ -f $VM_SERIAL_LOG ]] && (($(file_size "$VM_SERIAL_LOG") > 16 * 1024 * 1024)); then
  tail -c $((1024 * 1024)) -- "$VM_SERIAL_LOG" >"$VM_SERIAL_LOG.tmp" && mv -f -- "$VM_SERIAL_LOG.tmp" "$VM_SERIAL_LOG"
fi
printf '\n=== run-vm: starting QEMU at %s ===\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >>"$VM_SERIAL_LOG"
# What this start resolved, for publish-image.sh's manifest.
if ! printf '%s\n' "# run-vm.sh, $(date -u +%Y-%m-%dT%H:%M:%SZ): the settings QEMU was last started with" \
  "VM_MACHINE_TYPE=$machine_type" "VM_GIC_VERSION=$VM_GIC_VERSION" "VM_DISK_CACHE=$disk_cache" "VM_DISK_AIO=$disk_aio" \
  >"$resolved_file.tmp" 2>/dev/null || ! mv -f -- "$resolved_file.tmp" "$resolved_file" 2>/dev/null; then
  log "WARNING: cannot write $resolved_file: the published manifest will not name the machine type and GIC version"
fi

if [[ -n $run_as ]]; then
  install_metadata_firewall
  [[ $VM_IMDS_PROXY != 1 ]] || start_imds_gate
fi
log "starting: $(printf '%q ' "${cmd[@]}")"

if [[ $VM_HALT_ON_EXIT != 1 ]]; then
  exec "${cmd[@]}"
fi

# VM_HALT_ON_EXIT=1: QEMU runs as a child so the host can be powered off after it.
"${cmd[@]}" </dev/null &
qemu_pid=$!
stopped_by=""
# shellcheck disable=SC2317 # called from the traps below
forward() {
  stopped_by=$1
  log "received SIG$1: passing it to QEMU (pid $qemu_pid)"
  kill -s "$1" "$qemu_pid" 2>/dev/null || true
}
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward HUP' HUP
rc=0
while :; do
  rc=0
  wait "$qemu_pid" || rc=$?
  # wait returns early (>128) when a trapped signal arrives: wait again.
  if ! kill -0 "$qemu_pid" 2>/dev/null; then break; fi
done
trap - TERM INT HUP

if [[ -n $stopped_by ]]; then
  log "QEMU exited with status $rc after SIG$stopped_by; the service was stopped, so the host is NOT powered off"
  exit "$rc"
fi
# Under systemd, `systemctl stop` first runs the unit's ExecStop (an ACPI
# power-down): the guest shuts down and QEMU exits by itself while the unit is
# "deactivating". That is a stop of the service too, not a reason to power off.
own_unit=$(grep -o '[^/]*\.service$' /proc/self/cgroup 2>/dev/null | head -n 1 || true)
if [[ -n $own_unit ]] && command -v systemctl >/dev/null 2>&1 &&
  [[ $(systemctl show --property=ActiveState --value "$own_unit" 2>/dev/null || true) == deactivating ]]; then
  log "QEMU exited with status $rc while $own_unit is being stopped, so the host is NOT powered off"
  exit "$rc"
fi
if [[ -n ${RUN_VM_HALT_COMMAND:-} ]]; then
  halt_cmd=("$RUN_VM_HALT_COMMAND")
elif [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
  halt_cmd=(systemctl poweroff)
elif [[ -x /sbin/poweroff ]]; then
  halt_cmd=(/sbin/poweroff)
else
  halt_cmd=(/sbin/halt -p)
fi
log "QEMU exited with status $rc; VM_HALT_ON_EXIT=1: powering off the host with '${halt_cmd[*]}'"
"${halt_cmd[@]}" || log "power-off command '${halt_cmd[*]}' failed with status $?"
exit "$rc"

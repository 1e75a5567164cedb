#!/usr/bin/env bash
# start-vm.sh - starts the VM (run-vm.sh) in the background and checks that QEMU came up.
#
# Usage: start-vm.sh ENV_FILE [UNIT_NAME]
#
#   ENV_FILE   the VM's env file (see run-vm.sh for the variables)
#   UNIT_NAME  systemd unit name for the VM (default windows-vm-build)
#
# Where systemd runs (/run/systemd/system exists) the launcher runs as a
# transient unit: systemd-run --unit=UNIT_NAME --collect --property=KillMode=mixed
# run-vm.sh ENV_FILE, so `systemctl stop UNIT_NAME` and the journal work and it
# is cleaned up when it ends. Elsewhere it runs detached (setsid nohup), its
# output in $VM_DIR/run-vm.log (the previous one kept as run-vm.log.1) and the
# launcher's pid in $VM_DIR/run-vm.pid (the launcher execs QEMU, so it is
# QEMU's pid too, unless VM_HALT_ON_EXIT=1).
#
# Steps: (1) if a QEMU for this VM is already running (pid file alive and QMP
# answers) say so and exit 0; (2) validate with `run-vm.sh --check` (exit 2 with
# every problem listed); (3) start; (4) wait up to START_VM_WAIT_S (default 20)
# for QEMU's pid file and QMP socket. If QEMU died, print the cause: the tail
# of run-vm.log (or the unit's journal) and of the serial log; if it did not
# come up in time, stop the launcher and say so. (5) When VM_INSTALL_ISO is set
# and the disk holds no data yet (a first install), press Enter through QMP
# (send-key) once a second for START_VM_BOOT_KEYS_S seconds: the Windows ISO's
# boot loader waits a few seconds at "Press any key to boot from CD or DVD" and
# otherwise falls through to the empty disk. A disk that already holds data
# (Setup under way or done) gets no key, so it boots from the disk.
#
# Env: START_VM_WAIT_S; START_VM_SYSTEMD (auto [default], 1: use systemd-run,
#   0: run detached even where systemd runs); START_VM_BOOT_KEYS_S (default
#   60, 0 = never press keys); VM_* variables in the environment override the
#   file (and are passed on to the transient unit).
# Output: one line on stdout: "start-vm: VM started (...)" or
#   "start-vm: VM already running (...)"; progress and errors on stderr.
# Exit: 0 started or already running; 2 invalid configuration (nothing
#   started); 1 QEMU failed to start or did not come up in time.
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

readonly PROG="start-vm"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly run_vm="$SCRIPT_DIR/run-vm.sh"
usage() {
  log "$*"
  log "usage: start-vm.sh ENV_FILE [UNIT_NAME]"
  exit 2
}

(($# >= 1 && $# <= 2)) || usage "expected 1 or 2 arguments, got $#"
[[ -f $1 && -r $1 ]] || usage "ENV_FILE '$1' does not exist or is not readable"
env_file=$(readlink -f -- "$1")
unit=${2:-windows-vm-build}
[[ $unit =~ ^[A-Za-z0-9:_.@-]+$ ]] || usage "UNIT_NAME='$unit' is not a valid unit name"
wait_s=${START_VM_WAIT_S:-20}
[[ $wait_s =~ ^[1-9][0-9]*$ ]] || usage "START_VM_WAIT_S='$wait_s' is not a positive number"
keys_s=${START_VM_BOOT_KEYS_S:-60}
[[ $keys_s =~ ^[0-9]+$ ]] || usage "START_VM_BOOT_KEYS_S='$keys_s' is not a whole number of seconds"
keys_s=$((10#$keys_s))

# The resolved settings, from the launcher itself (one parser, one set of defaults).
declare -A cfg=()
while IFS= read -r line; do
  [[ $line =~ ^([A-Z_][A-Z0-9_]*)=(.*)$ ]] && cfg[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
done < <(bash "$run_vm" --resolve "$env_file")
[[ -n ${cfg[VM_DIR]:-} ]] || { log "could not read the settings of $env_file"; exit 2; }
vm_dir=${cfg[VM_DIR]}
qmp_sock=${cfg[VM_QMP_SOCKET]}
serial_log=${cfg[VM_SERIAL_LOG]}
pid_file=${cfg[VM_PID_FILE]}
run_log="$vm_dir/run-vm.log"
launcher_pid_file="$vm_dir/run-vm.pid"

case ${START_VM_SYSTEMD:-auto} in
  auto)
    use_systemd=0
    if [[ -d /run/systemd/system ]] && command -v systemd-run >/dev/null 2>&1; then use_systemd=1; fi
    ;;
  1) use_systemd=1 ;;
  0) use_systemd=0 ;;
  *) usage "START_VM_SYSTEMD='$START_VM_SYSTEMD' must be auto, 0 or 1" ;;
esac

# The serial output of this start only: what follows run-vm's last marker line.
show_serial() {
  local out
  [[ -s $serial_log ]] || return 0
  out=$(clean_log <"$serial_log" | awk '/^=== run-vm: starting QEMU/ { n = 0 } { buf[n++] = $0 } END { for (i = 1; i < n; i++) print buf[i] }' | tail -n 20)
  if [[ -z $out ]]; then
    log "serial log $serial_log: no output from this start"
  else
    log "serial log ($serial_log, this start, last 20 lines):"
    printf '%s\n' "$out" | sed 's/^/  | /' >&2
  fi
}

# --- 1. already running? -------------------------------------------------------------
if pid=$(qemu_pid_of "$pid_file"); then
  for _ in 1 2 3 4 5; do
    qmp_answers "$qmp_sock" && break
    sleep 1
  done
  if qmp_answers "$qmp_sock"; then
    say "VM already running (QEMU pid $pid, QMP $qmp_sock); nothing to do"
    exit 0
  fi
  log "QEMU pid $pid (from $pid_file) is running but its QMP socket $qmp_sock does not answer;"
  log "stop it first (stop-vm.sh $qmp_sock, or kill $pid)"
  exit 1
fi
if ((use_systemd)) && systemctl is-active --quiet "$unit"; then
  say "VM already running as systemd unit $unit; nothing to do"
  exit 0
fi

# --- 2. validate -------------------------------------------------------------------------
if ! bash "$run_vm" --check "$env_file"; then
  log "not starting the VM: fix the problems above in $env_file"
  exit 2
fi

# A first install from an ISO needs a key at the boot loader's prompt (step 5).
press_keys=0
if [[ -n ${cfg[VM_INSTALL_ISO]:-} ]] && ((keys_s > 0)); then
  if ! map=$(qemu-img map --output=json -f qcow2 -- "${cfg[VM_DISK]}" 2>&1); then
    log "warning: cannot read ${cfg[VM_DISK]} (${map//$'\n'/ }); not pressing keys at the install ISO's prompt"
  elif grep -q '"data": *true' <<<"$map"; then
    log "${cfg[VM_DISK]} already holds data: no key at the install ISO's prompt, so it boots from the disk"
  else
    qmp_usable || { log "needs socat or an nc with -U to press keys (install socat or netcat-openbsd)"; exit 1; }
    press_keys=1
  fi
fi

# --- 3. start ------------------------------------------------------------------------------
launcher_pid=""
if ((use_systemd)); then
  setenv=()
  while IFS= read -r name; do setenv+=("--setenv=$name=${!name}"); done < <(compgen -e VM_ || true)
  systemctl reset-failed "$unit" >/dev/null 2>&1 || true
  log "starting $run_vm as transient systemd unit $unit"
  systemd-run --quiet --unit="$unit" --collect --property=KillMode=mixed \
    --description="Windows ARM64 VM ($env_file)" "${setenv[@]}" \
    "$(command -v bash)" "$run_vm" "$env_file" || {
    log "systemd-run failed to start unit $unit"
    exit 1
  }
else
  [[ ! -f $run_log ]] || mv -f -- "$run_log" "$run_log.1"
  log "starting $run_vm in the background (no systemd here); log: $run_log"
  setsid nohup bash "$run_vm" "$env_file" >"$run_log" 2>&1 </dev/null &
  launcher_pid=$!
  printf '%s\n' "$launcher_pid" >"$launcher_pid_file"
fi

# --- 4. did it come up? -------------------------------------------------------------
launcher_alive() {
  if ((use_systemd)); then
    local state
    state=$(systemctl is-active "$unit" 2>/dev/null || true)
    [[ $state == active || $state == activating || $state == reloading ]]
  else
    alive "$launcher_pid"
  fi
}
# The launcher's output: its log file, or the unit's journal.
launcher_output() {
  if ((use_systemd)); then
    journalctl -u "$unit" -n 40 --no-pager -o cat 2>/dev/null | clean_log || true
  elif [[ -s $run_log ]]; then
    clean_log <"$run_log" | tail -n 30
  fi
}
failed() {
  log "QEMU failed to start: $1"
  if ((use_systemd)); then log "journal of $unit:"; else log "launcher output ($run_log):"; fi
  launcher_output | sed 's/^/  | /' >&2
  show_serial
  exit 1
}

start=$SECONDS
while :; do
  if pid=$(qemu_pid_of "$pid_file") && qmp_answers "$qmp_sock"; then
    if ((use_systemd)); then where="unit $unit"; else where="log $run_log"; fi
    say "VM started (QEMU pid $pid, QMP $qmp_sock, serial log $serial_log, $where)"
    break
  fi
  if ! launcher_alive; then
    # QEMU's last words are the cause ("qemu-system-aarch64: ...: reason").
    cause=$(launcher_output | grep -v -e '^run-vm: starting:' -e 'Could not open option rom' | tail -n 1 || true)
    failed "${cause:-the launcher exited}"
  fi
  if ((SECONDS - start >= wait_s)); then
    # Leave nothing half-started behind.
    if ((use_systemd)); then
      systemctl stop "$unit" >/dev/null 2>&1 || true
    else
      kill -TERM "$launcher_pid" 2>/dev/null || true
    fi
    failed "no answering QMP socket at $qmp_sock within ${wait_s}s; the launcher was stopped"
  fi
  sleep 0.5
done

# --- 5. a first install from an ISO: press Enter at the boot loader's prompt -------------
((press_keys)) || exit 0
log "blank disk and an install ISO: pressing Enter once a second for ${keys_s}s (the ISO's \"Press any key to boot from CD or DVD\")"
key='{"execute":"send-key","arguments":{"keys":[{"type":"qcode","data":"ret"}]}}'
pressed=0
refused=""
start=$SECONDS
while ((SECONDS - start < keys_s)); do
  if ! qemu_pid_of "$pid_file" >/dev/null; then
    log "QEMU exited while the install ISO was booting"
    show_serial
    exit 1
  fi
  # Two replies: qmp_capabilities, then send-key.
  reply=$(qmp "$qmp_sock" "$key" || true)
  if [[ $(grep -c '"return"' <<<"$reply") -ge 2 ]]; then
    pressed=$((pressed + 1))
  else
    refused=$(grep -o '"desc": *"[^"]*"' <<<"$reply" | tail -n 1 || true)
  fi
  if ((pressed > 0 && pressed % 15 == 0)); then log "pressed Enter $pressed times"; fi
  sleep 1
done
((pressed > 0)) || { log "QEMU refused every key press${refused:+: $refused}"; exit 1; }
log "pressed Enter $pressed times; Windows Setup should be booting from the ISO"

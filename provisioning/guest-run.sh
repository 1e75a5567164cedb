#!/usr/bin/env bash
# guest-run.sh - runs the guest provisioning over SSH to the build VM, booting the VM first if needed.
#
# Usage: guest-run.sh VM_ENV_FILE BUILD_UNIT SSH_PORT GUEST_USER GUEST_COMMAND
#
#   VM_ENV_FILE    the build VM's env file (run-vm.sh reads it; VM_DIR from it)
#   BUILD_UNIT     the VM's unit name for start-vm.sh (e.g. windows-vm-build)
#   SSH_PORT       the guest's SSH on 127.0.0.1 of this host (QEMU's forward)
#   GUEST_USER     the guest user to log in as
#   GUEST_COMMAND  the command run in the guest (Windows: powershell
#                  -NoProfile ... -EncodedCommand ...)
#
# Runs on the build host (as root, inside stage.sh, which bounds it).
#
# Stdin: first the guest-only SSH private key (a PEM block, from its
# "-----BEGIN ... PRIVATE KEY-----" line to the matching END line, ended by a
# newline), then the payload (the settings JSON, a secret): the guest
# command's stdin. The key goes through a pipe into a private ssh-agent (see
# ssh-key.sh) and never touches a disk; the payload is kept in memory (a
# shell variable) so that a retry can send it again, never on a disk, never
# in the log.
#
# Steps: (1) when no QEMU of this VM runs ($VM_DIR/qemu.pid naming a live
# qemu-system process: after the idle guard powered the host off, say), start
# it with start-vm.sh VM_ENV_FILE BUILD_UNIT and wait for its SSH with
# wait-for-guest.sh 127.0.0.1 SSH_PORT GUEST_RUN_BOOT_TIMEOUT_S; (2) run
# GUEST_COMMAND over
#   ssh -o BatchMode=yes -o ConnectTimeout=20 -o ServerAliveInterval=15
#       -o ServerAliveCountMax=8 -o StrictHostKeyChecking=no
#       -o UserKnownHostsFile=/dev/null -p SSH_PORT GUEST_USER@127.0.0.1
# (plus -F /dev/null, LogLevel=ERROR and this agent only; the guest's host
# key is not verified: it is reached on loopback only) with the payload on
# its stdin. Exit 255 (refused, or the connection dropped: Windows restarting
# its sshd, say) means: wait for the guest's SSH again (bounded) and retry,
# GUEST_RUN_RETRIES attempts in all (the guest provisioning is idempotent).
# Any other exit code is the guest's answer and ends the script. If the VM
# exits meanwhile the script fails (the next run starts it again).
#
# Env: GUEST_RUN_RETRIES [3] attempts in all; GUEST_RUN_BOOT_TIMEOUT_S
#   [3600] the wait for the guest's SSH after a start or a drop;
#   GUEST_RUN_REPORT (a file on this host, e.g. $VM_DIR/software-report.json):
#   the guest's software report arrives as one stdout line
#   "windows-arm64-image-software-report: <base64 of the JSON>"; that line is
#   not printed but decoded, checked to be a JSON object (jq) and written
#   there (through a temporary file). The file is removed before the guest
#   command runs, so a report is always this run's; a guest command that
#   succeeds without sending one fails (exit 4);
#   VM_* variables override the env file (as for run-vm.sh).
# Output: the guest command's stdout and stderr; guest-run's own lines
#   (each attempt, the VM start) on stderr, prefixed "guest-run:".
# Exit: 0 the guest command succeeded; its exit code when it failed
#   ("guest-run: the guest command failed with exit code N"); 255 SSH
#   failed on every attempt; 3 the VM is not running or exited; 1 the VM
#   could not be started or its SSH did not come up; 2 bad usage or no key
#   on stdin; 4 GUEST_RUN_REPORT is set and no valid report arrived.
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=SCRIPTDIR/ssh-key.sh
source "$(dirname "${BASH_SOURCE[0]}")/ssh-key.sh"

readonly PROG="guest-run"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
usage() {
  log "$*"
  log "usage: guest-run.sh VM_ENV_FILE BUILD_UNIT SSH_PORT GUEST_USER GUEST_COMMAND"
  exit 2
}

(($# == 5)) || usage "expected 5 arguments, got $#"
env_file=$1 unit=$2 port=$3 guest_user=$4 guest_command=$5
[[ -f $env_file && -r $env_file ]] || usage "VM_ENV_FILE '$env_file' does not exist or is not readable"
[[ $unit =~ ^[A-Za-z0-9:_.@-]+$ ]] || usage "BUILD_UNIT='$unit' is not a valid unit name"
if [[ ! $port =~ ^[1-9][0-9]{0,4}$ ]] || ((port > 65535)); then usage "SSH_PORT='$port' is not a TCP port"; fi
[[ $guest_user =~ ^[A-Za-z_][A-Za-z0-9_.-]*$ ]] || usage "GUEST_USER='${guest_user:0:40}' is not a user name"
[[ -n $guest_command ]] || usage "GUEST_COMMAND is empty"
retries=${GUEST_RUN_RETRIES:-3}
[[ $retries =~ ^[1-9][0-9]?$ ]] || usage "GUEST_RUN_RETRIES='$retries' is not a number of attempts (1-99)"
boot_timeout_s=${GUEST_RUN_BOOT_TIMEOUT_S:-3600}
[[ $boot_timeout_s =~ ^[1-9][0-9]*$ ]] || usage "GUEST_RUN_BOOT_TIMEOUT_S='$boot_timeout_s' is not a positive number of seconds"
report=${GUEST_RUN_REPORT:-}
readonly REPORT_TAG="windows-arm64-image-software-report: "
if [[ -n $report ]]; then
  [[ -d $(dirname -- "$report") ]] || usage "GUEST_RUN_REPORT '$report': its folder does not exist"
  command -v jq >/dev/null || usage "GUEST_RUN_REPORT needs jq (install the jq package)"
  rm -f -- "$report" "$report.tmp" || usage "GUEST_RUN_REPORT '$report' cannot be removed"
fi

# Passes the guest command's stdout through as it came (a last line without a
# newline stays without one), except the report line, which (with
# GUEST_RUN_REPORT) is decoded into $report.tmp. Without GUEST_RUN_REPORT the
# output is not parsed at all.
report_filter() {
  if [[ -z $report ]]; then
    cat
    return
  fi
  local line nl
  while :; do
    if IFS= read -r line; then
      nl=$'\n'
    elif [[ -n $line ]]; then
      nl=""
    else
      break
    fi
    if [[ $line == "$REPORT_TAG"* ]]; then
      line=${line#"$REPORT_TAG"}
      printf '%s' "${line%$'\r'}" | base64 -d >"$report.tmp" 2>/dev/null || printf 'not base64\n' >"$report.tmp"
    else
      printf '%s%s' "$line" "$nl"
    fi
    [[ -n $nl ]] || break
  done
}

# The VM's files, from the launcher itself (one parser, one set of defaults).
pid_file="" serial_log=""
while IFS= read -r line; do
  case $line in
    VM_PID_FILE=*) pid_file=${line#*=} ;;
    VM_SERIAL_LOG=*) serial_log=${line#*=} ;;
  esac
done < <(bash "$here/run-vm.sh" --resolve "$env_file")
[[ -n $pid_file ]] || { log "could not read the VM settings of $env_file"; exit 2; }

trap stop_private_agent EXIT
read_private_key
# The payload, whole: the x keeps its trailing newlines.
payload=$(
  cat
  printf x
)
payload=${payload%x}
start_private_agent

ssh_opts=(-F /dev/null -T -p "$port"
  -o BatchMode=yes -o ConnectTimeout=20 -o ServerAliveInterval=15 -o ServerAliveCountMax=8
  -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR
  -o IdentityAgent=SSH_AUTH_SOCK -o ForwardAgent=no -o ClearAllForwardings=yes)

# wait_ssh: the guest's SSH banner, bounded; 3 when the VM exited.
wait_ssh() {
  SERIAL_LOG=$serial_log VM_PID_FILE=$pid_file bash "$here/wait-for-guest.sh" 127.0.0.1 "$port" "$boot_timeout_s" >&2
}

if ! qemu_pid=$(qemu_pid_of "$pid_file"); then
  log "the build VM is not running (no live QEMU in $pid_file): starting it"
  rc=0
  bash "$here/start-vm.sh" "$env_file" "$unit" >&2 || rc=$?
  ((rc == 0)) || { log "the build VM could not be started (start-vm.sh exit $rc)"; exit 1; }
  rc=0
  wait_ssh || rc=$?
  ((rc == 0)) || { log "the guest's SSH did not come up after the VM was started (wait-for-guest.sh exit $rc)"; exit "$((rc == 3 ? 3 : 1))"; }
else
  log "the build VM runs (QEMU pid $qemu_pid)"
fi

attempt=1
while :; do
  log "attempt $attempt/$retries: running the guest command as $guest_user@127.0.0.1:$port"
  rc=0
  [[ -z $report ]] || rm -f -- "$report.tmp"
  # shellcheck disable=SC2029 # the command is for the guest's shell, as given
  ssh "${ssh_opts[@]}" "$guest_user@127.0.0.1" "$guest_command" < <(printf '%s' "$payload") | report_filter || rc=$?
  if ((rc == 0)); then
    log "the guest command succeeded (attempt $attempt/$retries)"
    if [[ -n $report ]]; then
      if [[ ! -s $report.tmp ]]; then
        log "the guest command sent no software report (a \"$REPORT_TAG...\" line); $report not written"
        exit 4
      fi
      if ! jq -e 'type == "object"' "$report.tmp" >/dev/null 2>&1; then
        rm -f -- "$report.tmp"
        log "the software report the guest sent is not a JSON object; $report not written"
        exit 4
      fi
      mv -f -- "$report.tmp" "$report"
      log "software report saved to $report ($(stat -c %s -- "$report") bytes)"
    fi
    exit 0
  fi
  if ((rc != 255)); then
    log "the guest command failed with exit code $rc"
    exit "$rc"
  fi
  if ! qemu_pid_of "$pid_file" >/dev/null; then
    log "the VM exited while the guest command ran (no live QEMU in $pid_file); the next run starts it again"
    exit 3
  fi
  if ((attempt >= retries)); then
    log "the SSH connection to the guest was refused or lost on all $retries attempts; giving up"
    exit 255
  fi
  log "attempt $attempt/$retries: the SSH connection to the guest was refused or lost (exit 255); waiting for its SSH again"
  rc=0
  wait_ssh || rc=$?
  if ((rc == 3)); then
    log "the VM exited while waiting for the guest's SSH; the next run starts it again"
    exit 3
  fi
  ((rc == 0)) || { log "the guest's SSH did not come back within ${boot_timeout_s}s (wait-for-guest.sh exit $rc)"; exit 1; }
  attempt=$((attempt + 1))
done

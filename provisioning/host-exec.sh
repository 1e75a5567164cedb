#!/usr/bin/env bash
# host-exec.sh - runs a command on the build host, or uploads files to it, over OpenSSH.
#
# Usage: host-exec.sh run REMOTE_COMMAND
#        host-exec.sh upload SRC_DIR DEST_DIR FILE...
#
#   run     runs REMOTE_COMMAND (a shell command string) on the host once,
#           the payload on its stdin; exits with its exit code.
#   upload  streams `tar -C SRC_DIR -c FILE...` to the host and unpacks it
#           there as root: `sudo -n mkdir -p DEST_DIR && sudo -n tar -x
#           --no-same-owner -C DEST_DIR`. The files end up owned by root
#           (not by the login user, so nothing running as that user can
#           change what root runs later); run them with `bash FILE`.
#           FILE: relative paths under SRC_DIR (no "..", no leading "-").
#
# Runs where Pulumi runs (the operator's machine), from Pulumi's
# local.Command, which enforces the stage's customTimeouts. Needs bash 3.2 or
# later, OpenSSH (ssh, ssh-agent, ssh-add), tar; for starting a stopped
# host, the AWS CLI (through host-power.sh).
#
# Stdin: first the SSH private key (a PEM block, from its
# "-----BEGIN ... PRIVATE KEY-----" line to the matching END line, which
# ends with a newline), then the payload: everything after the END line is
# the remote command's stdin (`run`; `upload` sends none). The key never
# touches a disk: it goes through a pipe into a private ssh-agent (a socket
# in a 0700 mktemp folder), killed and removed on every exit path (a watcher
# does it if this script is killed outright).
#
# Connection: ssh -T -o BatchMode=yes -o ConnectTimeout=... -o
# ServerAliveInterval=15 -o ServerAliveCountMax=8 -o StrictHostKeyChecking=no
# -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR, plus IdentityAgent (this
# agent only), no agent or port forwarding, no connection sharing; then
# HOST_EXEC_SSH_OPTS. THE HOST KEY IS NOT VERIFIED (as the command provider
# did not verify it either): the connection is encrypted and the host proves
# nothing; keep sshAllowedCidrs tight.
#
# Steps: (1) probe with `true`, up to HOST_EXEC_PROBE_TRIES attempts
# HOST_EXEC_PROBE_DELAY_S apart (a host that just booted may answer before it
# accepts the key); (2) if it does not answer and HOST_EXEC_INSTANCE_ID is
# set, start the host: host-power.sh start ID ADDRESS TIMEOUT (starts a
# stopped instance and waits for the SSH banner), then probe again until
# HOST_EXEC_BOOT_TIMEOUT_S has passed since the start; (3) run the command
# once (no retry: a stage that ran halfway is for the next `pulumi up`).
#
# Env (defaults in brackets):
#   HOST_EXEC_ADDRESS     the host's Elastic IP or DNS name (required)
#   HOST_EXEC_USER        the login user (required)
#   HOST_EXEC_PORT [22]
#   HOST_EXEC_INSTANCE_ID  i-...: the host is started when SSH does not answer
#   HOST_EXEC_BOOT_TIMEOUT_S [1800]   bound of probing plus starting the host
#   HOST_EXEC_CONNECT_TIMEOUT_S [20]  ssh's ConnectTimeout
#   HOST_EXEC_PROBE_TRIES [3], HOST_EXEC_PROBE_DELAY_S [5]
#   HOST_EXEC_SSH [ssh]    the ssh program (tests substitute a path)
#   HOST_EXEC_SSH_OPTS     extra ssh options, split on whitespace
#                          (e.g. "-F /dev/null -o IdentitiesOnly=yes")
#   AWS_REGION, AWS_PROFILE   for host-power.sh
#
# Output: the remote command's stdout and stderr pass through; host-exec's own
#   short lines on stderr, prefixed "host-exec:".
# Exit: the remote command's exit code (run; 0 for a finished upload);
#   255 the connection was lost while the command ran (or the command itself
#   exited 255); 3 the host could not be reached (or started); 2 bad usage or
#   no key on stdin; 129/130/143 stopped by SIGHUP/SIGINT/SIGTERM.
set -euo pipefail
# Found without dirname, as in wait-for-guest.sh.
lib_dir=${BASH_SOURCE[0]%/*}
[[ $lib_dir != "${BASH_SOURCE[0]}" ]] || lib_dir=.
# shellcheck source=SCRIPTDIR/lib.sh
source "$lib_dir/lib.sh"
# shellcheck source=SCRIPTDIR/ssh-key.sh
source "$lib_dir/ssh-key.sh"

readonly PROG="host-exec"
usage() {
  log "$*"
  log "usage: host-exec.sh run REMOTE_COMMAND | host-exec.sh upload SRC_DIR DEST_DIR FILE..."
  exit 2
}
is_uint() { [[ $1 =~ ^[1-9][0-9]{0,6}$ ]]; }

action=${1:-}
case $action in
  run) [[ $# == 2 && -n $2 ]] || usage "run takes one non-empty REMOTE_COMMAND" ;;
  upload) (($# >= 4)) || usage "upload takes SRC_DIR DEST_DIR and at least one FILE" ;;
  *) usage "unknown action '${action:0:40}'" ;;
esac

address=${HOST_EXEC_ADDRESS:-}
user=${HOST_EXEC_USER:-}
port=${HOST_EXEC_PORT:-22}
instance_id=${HOST_EXEC_INSTANCE_ID:-}
boot_timeout_s=${HOST_EXEC_BOOT_TIMEOUT_S:-1800}
connect_timeout_s=${HOST_EXEC_CONNECT_TIMEOUT_S:-20}
probe_tries=${HOST_EXEC_PROBE_TRIES:-3}
probe_delay_s=${HOST_EXEC_PROBE_DELAY_S:-5}
ssh_bin=${HOST_EXEC_SSH:-ssh}
[[ -n $address ]] || usage "HOST_EXEC_ADDRESS is not set (the host's address)"
[[ $address =~ ^[A-Za-z0-9][A-Za-z0-9.:-]*$ ]] || usage "HOST_EXEC_ADDRESS='${address:0:80}' is not a host name or address"
[[ -n $user ]] || usage "HOST_EXEC_USER is not set (the login user)"
[[ $user =~ ^[A-Za-z_][A-Za-z0-9_.-]*$ ]] || usage "HOST_EXEC_USER='${user:0:40}' is not a user name"
if ! is_uint "$port" || ((port > 65535)); then usage "HOST_EXEC_PORT='$port' is not a TCP port"; fi
if [[ -n $instance_id && ! $instance_id =~ ^i-[0-9a-f]{8,17}$ ]]; then
  usage "HOST_EXEC_INSTANCE_ID='${instance_id:0:40}' is not an EC2 instance id"
fi
is_uint "$boot_timeout_s" || usage "HOST_EXEC_BOOT_TIMEOUT_S='$boot_timeout_s' is not a positive number of seconds"
is_uint "$connect_timeout_s" || usage "HOST_EXEC_CONNECT_TIMEOUT_S='$connect_timeout_s' is not a positive number of seconds"
is_uint "$probe_tries" || usage "HOST_EXEC_PROBE_TRIES='$probe_tries' is not a positive number"
[[ $probe_delay_s =~ ^[0-9]+$ ]] || usage "HOST_EXEC_PROBE_DELAY_S='$probe_delay_s' is not a whole number of seconds"
command -v "$ssh_bin" >/dev/null 2>&1 || usage "HOST_EXEC_SSH='$ssh_bin': no such program (install OpenSSH)"
for tool in ssh-agent ssh-add; do
  command -v "$tool" >/dev/null 2>&1 || usage "$tool is not installed (it comes with OpenSSH)"
done

if [[ $action == upload ]]; then
  src_dir=$2 dest_dir=$3
  shift 3
  files=("$@")
  [[ -d $src_dir ]] || usage "SRC_DIR '$src_dir' is not a folder"
  [[ $dest_dir =~ ^/[A-Za-z0-9._/+@-]*$ && ! $dest_dir =~ (^|/)\.\.(/|$) ]] ||
    usage "DEST_DIR='${dest_dir:0:80}' must be an absolute path of letters, digits and ._/+@-"
  for f in "${files[@]}"; do
    [[ $f =~ ^[A-Za-z0-9._+@][A-Za-z0-9._/+@-]*$ && ! $f =~ (^|/)\.\.(/|$) ]] ||
      usage "FILE '${f:0:80}' must be a relative path under SRC_DIR (letters, digits, ._/+@-; no '..')"
    [[ -f $src_dir/$f && -r $src_dir/$f ]] || usage "FILE '$f' is not a readable file under $src_dir"
  done
fi

target="$user@$address"
where="$target:$port"
ssh_opts=(-T -p "$port"
  -o BatchMode=yes -o "ConnectTimeout=$connect_timeout_s"
  -o ServerAliveInterval=15 -o ServerAliveCountMax=8
  -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR
  -o IdentityAgent=SSH_AUTH_SOCK -o ForwardAgent=no -o ClearAllForwardings=yes
  -o ControlMaster=no -o ControlPath=none -o PermitLocalCommand=no)
if [[ -n ${HOST_EXEC_SSH_OPTS:-} ]]; then
  set -f
  # shellcheck disable=SC2206 # split on whitespace, on purpose
  ssh_opts+=($HOST_EXEC_SSH_OPTS)
  set +f
fi

child=""
# shellcheck disable=SC2317 # run by the traps below
on_signal() { # NAME CODE
  trap '' HUP INT TERM
  [[ -z $child ]] || kill -TERM "$child" 2>/dev/null || true
  log "stopped by SIG$1"
  exit "$2"
}
trap stop_private_agent EXIT
trap 'on_signal HUP 129' HUP
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM

read_private_key
start_private_agent

# run_bounded SECONDS CMD...: CMD, killed after SECONDS (GNU timeout, gtimeout
# on a Mac with coreutils, else perl's alarm).
run_bounded() {
  local secs=$1
  shift
  if command -v timeout >/dev/null 2>&1; then
    timeout "$secs" "$@"
  elif command -v gtimeout >/dev/null 2>&1; then
    gtimeout "$secs" "$@"
  else
    perl -e 'alarm shift @ARGV; exec @ARGV or exit 127' "$secs" "$@"
  fi
}

# probe: one `true` over SSH; the error (one short line) in probe_error.
probe_error=""
probe() {
  local out rc=0
  out=$(run_bounded $((connect_timeout_s + 40)) "$ssh_bin" "${ssh_opts[@]}" "$target" true </dev/null 2>&1 >/dev/null) || rc=$?
  ((rc != 0)) || return 0
  out=$(printf '%s' "$out" | tr '\n\r' '  ' | sed 's/  */ /g; s/^ //; s/ $//' | cut -c1-200)
  if ((rc == 124)); then out="no answer within $((connect_timeout_s + 40))s${out:+ ($out)}"; fi
  probe_error=${out:-ssh exited with $rc}
  return 1
}
start=$SECONDS
reached=0
i=1
while ((i <= probe_tries)); do
  if probe; then
    reached=1
    break
  fi
  log "SSH to $where: ${probe_error} (attempt $i/$probe_tries)"
  # A host that does not answer at all is started at once; a refused key may be a host still booting.
  if [[ -n $instance_id && $probe_error != *"Permission denied"* ]]; then break; fi
  ((i == probe_tries)) || sleep "$probe_delay_s"
  i=$((i + 1))
done
if ((!reached)); then
  [[ -n $instance_id ]] ||
    { log "cannot reach $where over SSH: $probe_error (no HOST_EXEC_INSTANCE_ID, so the host is not started from here)"; exit 3; }
  left=$((boot_timeout_s - (SECONDS - start)))
  ((left > 0)) || left=1
  log "starting the host $instance_id if it is stopped, and waiting up to ${left}s for its SSH"
  rc=0
  HOST_POWER_SSH_PORT=$port bash "$lib_dir/host-power.sh" start "$instance_id" "$address" "$left" </dev/null >/dev/null || rc=$?
  ((rc == 0)) || { log "cannot reach $where: host-power.sh start $instance_id failed (exit $rc; its messages are above)"; exit 3; }
  i=1
  while :; do
    if probe; then
      reached=1
      break
    fi
    if ((SECONDS - start >= boot_timeout_s)); then
      log "cannot reach $where over SSH after ${boot_timeout_s}s, the host started: $probe_error"
      exit 3
    fi
    log "SSH to $where after the start: ${probe_error} (attempt $i); trying again in ${probe_delay_s}s"
    sleep "$probe_delay_s"
    i=$((i + 1))
  done
fi

if [[ $action == upload ]]; then
  rc=0
  COPYFILE_DISABLE=1 tar -C "$src_dir" -cf - "${files[@]}" |
    "$ssh_bin" "${ssh_opts[@]}" "$target" \
      "sudo -n mkdir -p $dest_dir && sudo -n tar -x --no-same-owner --warning=no-unknown-keyword -C $dest_dir -f -" || rc=$?
  if ((rc == 255)); then
    log "the SSH connection to $target was lost during the upload (nothing is recorded; the next pulumi up uploads again)"
    exit 255
  fi
  ((rc == 0)) || { log "the upload to $where:$dest_dir failed (exit $rc)"; exit "$rc"; }
  log "uploaded ${#files[@]} file(s) to $where:$dest_dir"
  exit 0
fi

rc=0
"$ssh_bin" "${ssh_opts[@]}" "$target" "$2" <&0 &
child=$!
note_agent_child "$child"
wait "$child" || rc=$?
child=""
if ((rc == 255)); then
  log "the SSH connection to $target was lost while the command ran (the stage is not recorded; the next pulumi up runs it again)"
fi
exit "$rc"

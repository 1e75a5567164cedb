#!/usr/bin/env bash
# smoke-test.sh - boots a freshly baked AMI on a metal instance from the
# operator's machine (where Pulumi runs) and proves that the VM inside it
# comes up: the guest answers SSH through the instance's loopback forward and
# a check of the guest passes there. Then the instance is terminated.
#
# Usage: smoke-test.sh run
#
# Steps: (1) launch one instance (aws ec2 run-instances) of
# SMOKE_INSTANCE_TYPE from SMOKE_AMI_ID in SMOKE_SUBNET_ID with a public
# address, SMOKE_SECURITY_GROUP_ID (SSH from the allowed CIDRs only), IMDSv2
# required (hop limit 1), the root volume encrypted (gp3), no key pair, no
# instance profile, --instance-initiated-shutdown-behavior terminate (the
# image halts the instance when its VM exits), tagged; its user data is a
# cloud-config that authorizes the smoke key (the first key on stdin; its
# public half only) for the instance's own user (SMOKE_INSTANCE_USER); (2)
# wait until it runs and has a public address; (3) wait until its SSH
# accepts the smoke key; (4) wait until the guest answers SSH on
# 127.0.0.1:SMOKE_GUEST_PORT of the instance (windows-vm.service's forward to
# the guest's port 22), reached through the instance (ssh -W, the guest key
# from the agent: no key is copied to the instance): a session that runs
# `exit 0` (cmd and PowerShell both understand it) is retried every
# SMOKE_POLL_S seconds until it succeeds, so that the bound ending a session
# still connecting reads as a guest that does not answer; then run
# SMOKE_GUEST_COMMAND there with the payload on its stdin; exit 255 (the
# connection dropped) goes back to waiting for the guest, any other exit code
# is the check's answer; (5) terminate the
# instance (wait until it is shutting down or gone, 300 s at most).
# SMOKE_TIMEOUT_S bounds steps 1 to 4 together.
#
# A failure names its cause and, once the instance's SSH answered, saves the
# VM's screen (vm-screenshot.sh and lib.sh streamed to the instance and run
# there with sudo against the VM's QMP socket; the PNG comes back over the
# same SSH connection) to SMOKE_SCREENSHOT_DIR/<instance id>.png on this
# machine and prints its path, and prints the last lines of the VM's serial
# log; before that, the last lines of the instance's console. The instance is
# terminated on every path: SIGTERM/SIGINT/SIGHUP terminate it, and a watcher
# process terminates it if this script is killed outright (SIGKILL).
#
# Stdin: the smoke key (a PEM block, from "-----BEGIN ... PRIVATE KEY-----" to
# its END line), then the guest key (another PEM block), then the payload:
# the guest command's stdin (the guest settings, a secret). Both keys go
# through a pipe into a private ssh-agent (ssh-key.sh), never onto a disk;
# the payload stays in memory.
#
# Env (required unless marked):
#   SMOKE_AMI_ID             the AMI under test, ami-...
#   SMOKE_INSTANCE_TYPE      a .metal type (the VM needs KVM), e.g. a1.metal
#   SMOKE_SUBNET_ID          subnet-... (the build host's)
#   SMOKE_SECURITY_GROUP_ID  sg-... (SSH from sshAllowedCidrs only)
#   SMOKE_GUEST_USER         the guest user the guest key logs in as
#   SMOKE_GUEST_COMMAND      the check run in the guest (Windows: powershell
#                            -EncodedCommand ...); its stdin is the payload
#   SMOKE_GUEST_PORT [2222]  the guest's SSH on the instance's 127.0.0.1
#   SMOKE_VM_DIR [/var/lib/windows-vm]  the VM's folder on the instance
#                            (qmp.sock and serial.log)
#   SMOKE_INSTANCE_USER [ubuntu]  the instance's own login user
#   SMOKE_SSH_PORT [22]      the instance's sshd port
#   SMOKE_TIMEOUT_S [2700]   bound of launch, boot, the guest's SSH and the check
#   SMOKE_POLL_S [15]        seconds between polls
#   SMOKE_CONNECT_TIMEOUT_S [20]  ssh's ConnectTimeout
#   SMOKE_SCREENSHOT_DIR [.work/smoke-test]  where a failure's screenshot goes
#   SMOKE_TAGS_JSON          optional [{"Key":..,"Value":..},...] for the
#                            instance and its volume
#   AWS_REGION, AWS_PROFILE as set by the stack.
# Output: progress and errors on stderr, prefixed "smoke-test:" (the check's
#   own output prefixed "  | ", each line cut at 1000 characters); on success
#   stdout is exactly one line:
#   {"amiId":"ami-...","instanceId":"i-...","guest":"127.0.0.1:2222","passedAt":"...Z"}
# Exit: 0 passed (the instance was terminated); 1 failed (the cause is named;
#   the instance was terminated); 2 bad usage or environment;
#   129/130/143 interrupted (the instance was terminated).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/lib.sh
source "$here/lib.sh"
# shellcheck source=SCRIPTDIR/ssh-key.sh
source "$here/ssh-key.sh"

readonly PROG=smoke-test

usage() {
  log "$*"
  log "usage: smoke-test.sh run (see the header for stdin and the environment)"
  exit 2
}

[[ $# == 1 && $1 == run ]] || usage "expected the single argument 'run'"
need() { [[ -n ${!1:-} ]] || usage "$1 is not set"; }
for v in SMOKE_AMI_ID SMOKE_INSTANCE_TYPE SMOKE_SUBNET_ID SMOKE_SECURITY_GROUP_ID SMOKE_GUEST_USER SMOKE_GUEST_COMMAND; do
  need "$v"
done
is_uint() { [[ $1 =~ ^[1-9][0-9]{0,6}$ ]]; }
[[ $SMOKE_AMI_ID =~ ^ami-[0-9a-f]{8,17}$ ]] || usage "SMOKE_AMI_ID='$SMOKE_AMI_ID' is not an AMI id"
[[ $SMOKE_INSTANCE_TYPE =~ ^[a-z][a-z0-9-]*\.[a-z0-9-]+$ ]] || usage "SMOKE_INSTANCE_TYPE='$SMOKE_INSTANCE_TYPE' is not an instance type"
[[ $SMOKE_SUBNET_ID =~ ^subnet-[0-9a-f]{8,17}$ ]] || usage "SMOKE_SUBNET_ID='$SMOKE_SUBNET_ID' is not a subnet id"
[[ $SMOKE_SECURITY_GROUP_ID =~ ^sg-[0-9a-f]{8,17}$ ]] || usage "SMOKE_SECURITY_GROUP_ID='$SMOKE_SECURITY_GROUP_ID' is not a security group id"
[[ $SMOKE_GUEST_USER =~ ^[A-Za-z_][A-Za-z0-9_.-]*$ ]] || usage "SMOKE_GUEST_USER='${SMOKE_GUEST_USER:0:40}' is not a user name"
instance_user=${SMOKE_INSTANCE_USER:-ubuntu}
[[ $instance_user =~ ^[a-z_][a-z0-9_-]*$ ]] || usage "SMOKE_INSTANCE_USER='${instance_user:0:40}' is not a user name"
guest_port=${SMOKE_GUEST_PORT:-2222}
ssh_port=${SMOKE_SSH_PORT:-22}
if ! is_uint "$guest_port" || ((guest_port > 65535)); then usage "SMOKE_GUEST_PORT='$guest_port' is not a TCP port"; fi
if ! is_uint "$ssh_port" || ((ssh_port > 65535)); then usage "SMOKE_SSH_PORT='$ssh_port' is not a TCP port"; fi
timeout_s=${SMOKE_TIMEOUT_S:-2700}
poll_s=${SMOKE_POLL_S:-15}
connect_s=${SMOKE_CONNECT_TIMEOUT_S:-20}
is_uint "$timeout_s" || usage "SMOKE_TIMEOUT_S='$timeout_s' is not a positive number of seconds"
is_uint "$poll_s" || usage "SMOKE_POLL_S='$poll_s' is not a positive number of seconds"
is_uint "$connect_s" || usage "SMOKE_CONNECT_TIMEOUT_S='$connect_s' is not a positive number of seconds"
vm_dir=${SMOKE_VM_DIR:-/var/lib/windows-vm}
[[ $vm_dir == /* && $vm_dir =~ ^[A-Za-z0-9_./-]+$ ]] || usage "SMOKE_VM_DIR='$vm_dir' is not an absolute path of plain characters"
shot_dir=${SMOKE_SCREENSHOT_DIR:-.work/smoke-test}
tags=${SMOKE_TAGS_JSON:-'[{"Key":"Name","Value":"windows-arm64-image-smoke-test"}]'}
[[ $tags =~ ^[[:space:]]*\[.*\][[:space:]]*$ && $tags != *$'\n'* ]] ||
  usage "SMOKE_TAGS_JSON must be one line of JSON: [{\"Key\":\"...\",\"Value\":\"...\"},...]"
command -v aws >/dev/null || die "the AWS CLI is not installed: it launches and terminates the smoke-test instance (install AWS CLI v2)"

one_line() { grep -v '^[[:space:]]*$' | tail -n 1 | tr -d '\n' || true; }

work=$(mktemp -d "${TMPDIR:-/tmp}/smoke-test.XXXXXX")
chmod 0700 "$work"
id=''
addr=''
done_flag=$work/watch
watcher=''
child=''
cleanup() {
  stop_private_agent
  [[ -z $child ]] || kill_tree "$child" || true
  # The watcher (once started) removes $work after this script is gone.
  [[ -n $watcher ]] || rm -rf -- "$work"
}
trap cleanup EXIT

# --- keys and payload ------------------------------------------------------------
read_private_key
smoke_pem=$SSH_KEY_PEM
read_private_key
guest_pem=$SSH_KEY_PEM
payload=$(
  cat
  printf x
)
payload=${payload%x}
SSH_KEY_PEM=$smoke_pem
smoke_pem=''
start_private_agent
smoke_pub=$(ssh-add -L 2>/dev/null | head -n 1) || smoke_pub=''
[[ $smoke_pub == ssh-* || $smoke_pub == ecdsa-* ]] || die "the smoke key's public half could not be read from the agent ('${smoke_pub:0:40}')"
out=$(printf '%s' "$guest_pem" | SSH_ASKPASS_REQUIRE=never DISPLAY="" ssh-add -q - 2>&1) ||
  die "ssh-add refused the guest key on stdin (${out//$'\n'/ }); it must be an unencrypted OpenSSH or PEM private key"
guest_pem=''

user_data=$work/user-data
printf '#cloud-config\n# windows-arm64-image smoke test: the smoke key for the default user\nssh_authorized_keys:\n  - %s\n' \
  "$smoke_pub" >"$user_data"

# --- EC2 helpers -------------------------------------------------------------------
state_of() { # ID: the state name, "gone" when EC2 does not know it, "unknown" on other errors
  local out
  if out=$(aws ec2 describe-instances --instance-ids "$1" --query 'Reservations[0].Instances[0].State.Name' \
    --output text 2>&1); then
    printf '%s\n' "$out"
  elif [[ $out == *InvalidInstanceID.NotFound* ]]; then
    echo gone
  else
    log "cannot read the state of $1: $(one_line <<<"$out")"
    echo unknown
  fi
}
request_terminate() { # ID: asks EC2 to terminate ID; says so, or why not (never fails)
  local out
  if out=$(aws ec2 terminate-instances --instance-ids "$1" 2>&1); then
    log "terminating $1"
  elif [[ $out == *InvalidInstanceID.NotFound* ]]; then
    log "$1 is already gone"
  else
    log "error: terminate-instances $1 failed: $(one_line <<<"$out"); terminate it by hand: aws ec2 terminate-instances --instance-ids $1"
    return 1
  fi
}

# --- signals and the watcher ---------------------------------------------------------
interrupted() { # SIGNAL
  trap '' TERM INT HUP
  log "interrupted by SIG$1"
  [[ -z $child ]] || kill_tree "$child" || true
  if [[ -n $id ]]; then
    request_terminate "$id" || true
    echo finished >"$done_flag"
  fi
  case $1 in INT) exit 130 ;; HUP) exit 129 ;; *) exit 143 ;; esac
}
held=''
trap 'held=TERM' TERM
trap 'held=INT' INT
trap 'held=HUP' HUP

token=smoke-$(date -u +%Y%m%dT%H%M%S)-$$-$RANDOM
echo watch >"$done_flag"
(
  trap '' INT HUP TERM
  while kill -0 "$$" 2>/dev/null; do sleep 2; done
  if [[ "$(cat "$done_flag" 2>/dev/null)" == watch ]]; then
    ids=$(cat "$work/id" 2>/dev/null) ||
      ids=$(aws ec2 describe-instances --filters "Name=client-token,Values=$token" \
        --query 'Reservations[].Instances[].InstanceId' --output text 2>/dev/null) || ids=''
    for i in $ids; do
      [[ $i =~ ^i-[0-9a-f]{8,17}$ ]] && aws ec2 terminate-instances --instance-ids "$i" >/dev/null 2>&1
    done
  fi
  rm -rf -- "$work"
) </dev/null >/dev/null 2>&1 &
watcher=$!

# --- launch ------------------------------------------------------------------------
start=$SECONDS
out=$(aws ec2 describe-images --image-ids "$SMOKE_AMI_ID" --query 'Images[0].RootDeviceName' --output text 2>&1) || {
  echo finished >"$done_flag"
  die "cannot read the AMI $SMOKE_AMI_ID: $(one_line <<<"$out")"
}
root_device=$out
[[ $root_device == /dev/* ]] || {
  echo finished >"$done_flag"
  die "the AMI $SMOKE_AMI_ID has no root device name ('$root_device'): does it exist in this region?"
}
bdm="[{\"DeviceName\":\"$root_device\",\"Ebs\":{\"VolumeType\":\"gp3\",\"Encrypted\":true,\"DeleteOnTermination\":true}}]"
nic="[{\"DeviceIndex\":0,\"SubnetId\":\"$SMOKE_SUBNET_ID\",\"Groups\":[\"$SMOKE_SECURITY_GROUP_ID\"],\"AssociatePublicIpAddress\":true,\"DeleteOnTermination\":true}]"
tag_specs="[{\"ResourceType\":\"instance\",\"Tags\":$tags},{\"ResourceType\":\"volume\",\"Tags\":$tags}]"
log "launching a $SMOKE_INSTANCE_TYPE from $SMOKE_AMI_ID in $SMOKE_SUBNET_ID (bound ${timeout_s} s for boot, the guest's SSH and the check)"
if ! out=$(aws ec2 run-instances --count 1 --image-id "$SMOKE_AMI_ID" --instance-type "$SMOKE_INSTANCE_TYPE" \
  --client-token "$token" --network-interfaces "$nic" --user-data "file://$user_data" \
  --metadata-options 'HttpTokens=required,HttpEndpoint=enabled,HttpPutResponseHopLimit=1' \
  --block-device-mappings "$bdm" --instance-initiated-shutdown-behavior terminate \
  --tag-specifications "$tag_specs" --query 'Instances[0].InstanceId' --output text 2>&1); then
  echo finished >"$done_flag"
  [[ -z $held ]] || interrupted "$held"
  die "run-instances refused the smoke-test instance: $(one_line <<<"$out")"
fi
if [[ ! $out =~ ^i-[0-9a-f]{8,17}$ ]]; then
  [[ -z $held ]] || interrupted "$held"
  die "run-instances answered '$(one_line <<<"$out")' instead of an instance id (the watcher terminates what client token $token launched)"
fi
id=$out
printf '%s\n' "$id" >"$work/id"
trap 'interrupted TERM' TERM
trap 'interrupted INT' INT
trap 'interrupted HUP' HUP
[[ -z $held ]] || interrupted "$held"
log "started $id"

# Waits SECONDS (interruptible: a signal's trap runs at once).
pause() {
  sleep "$1" >/dev/null 2>&1 &
  wait $! || true
}
left() { echo $((timeout_s - (SECONDS - start))); }
left_or_1() { local r; r=$(left); echo $((r > 0 ? r : 1)); } # what a bound may still be given

# Runs a command in the background, bounded by SECONDS (then TERM, KILL 5 s
# later), so that a signal's trap runs at once (and logs to this script's
# stderr); its status is the command's (143/137 when it was cut off). Its
# stdout goes to OUT, its stderr to ERR (the same file: both there); stdin as
# redirected by the caller.
bounded() { # SECONDS OUT ERR CMD...
  local s=$1 o=$2 e=$3 rc=0 w
  shift 3
  if [[ $o == "$e" ]]; then
    "$@" <&0 >"$o" 2>&1 &
  else
    "$@" <&0 >"$o" 2>"$e" &
  fi
  child=$!
  note_agent_child "$child"
  # The watchdog: ends the command at its bound, or at once when this script is gone (killed).
  (
    end=$((SECONDS + s))
    while ((SECONDS < end)) && kill -0 "$$" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 1; done
    kill_tree "$child" || exit 0
    sleep 5
    kill_tree "$child" KILL || true
  ) </dev/null >/dev/null 2>&1 &
  w=$!
  wait "$child" || rc=$?
  kill -TERM "$w" 2>/dev/null || true
  wait "$w" 2>/dev/null || true
  child=''
  return "$rc"
}

console_tail() {
  local out
  out=$(aws ec2 get-console-output --instance-id "$id" --latest --query Output --output text 2>/dev/null) ||
    out=$(aws ec2 get-console-output --instance-id "$id" --query Output --output text 2>&1) ||
    out="(no console output: $(one_line <<<"$out"))"
  log "last lines of the console of $id:"
  clean_log <<<"$out" | tail -n 25 | sed 's/^/  | /' >&2
}

inst_opts=(-F /dev/null -p "$ssh_port" -o BatchMode=yes -o "ConnectTimeout=$connect_s"
  -o ServerAliveInterval=15 -o ServerAliveCountMax=4 -o StrictHostKeyChecking=no
  -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o IdentityAgent=SSH_AUTH_SOCK
  -o ForwardAgent=no -o ControlMaster=no -o ControlPath=none)
on_instance() { # COMMAND: runs COMMAND on the instance (stdin, stdout, stderr as redirected)
  # shellcheck disable=SC2029 # the command is for the instance's shell
  ssh "${inst_opts[@]}" -T -o ClearAllForwardings=yes "$instance_user@$addr" "$1"
}

# The VM's screen, saved here; and the tail of its serial log.
vm_diagnostics() {
  local png remote size
  if [[ -z $addr || ${instance_ssh:-0} != 1 ]]; then
    log "no screenshot of the VM: the instance's SSH never answered"
    return 0
  fi
  mkdir -p -- "$shot_dir" 2>/dev/null || true
  png="$(cd "$shot_dir" 2>/dev/null && pwd)/$id.png" || png="$work/$id.png"
  remote="d=\$(mktemp -d) && trap 'rm -rf \"\$d\"' EXIT && tar -x -C \"\$d\" && sudo -n bash \"\$d/vm-screenshot.sh\" $vm_dir/qmp.sock \"\$d/screen.png\" >&2 && cat \"\$d/screen.png\""
  if tar -C "$here" -c lib.sh vm-screenshot.sh | bounded 90 "$png.part" "$work/shot.err" on_instance "$remote" &&
    size=$(od -An -v -tx1 -N 8 -- "$png.part" | tr -d ' \n') && [[ $size == 89504e470d0a1a0a ]]; then
    mv -f -- "$png.part" "$png"
    log "the VM's screen when it failed: $png"
  else
    rm -f -- "$png.part"
    log "no screenshot of the VM: $(grep -v '^screenshot:' "$work/shot.err" | clean_log | tail -n 1)"
  fi
  if bounded 60 "$work/serial" "$work/serial" on_instance "sudo -n tail -n 30 $vm_dir/serial.log" </dev/null; then
    log "last lines of the VM's serial log ($vm_dir/serial.log on $id):"
    clean_log <"$work/serial" | tail -n 30 | sed 's/^/  | /' >&2
  else
    log "no serial log of the VM: $(one_line <"$work/serial")"
  fi
}

# Fails the run: diagnostics, the instance terminated, the cause named.
fail() { # MESSAGE
  vm_diagnostics
  trap '' TERM INT HUP
  request_terminate "$id" || true
  echo finished >"$done_flag"
  die "$*"
}

instance_gone() { # STATE: fails when the instance is no longer running
  local reason
  case $1 in
    shutting-down | terminated | stopping | stopped)
      reason=$(aws ec2 describe-instances --instance-ids "$id" \
        --query 'Reservations[0].Instances[0].StateReason.Message' --output text 2>/dev/null) || reason=unknown
      addr=''
      console_tail
      fail "$id was $1 before the smoke test passed (state reason: $reason; the image halts the instance when its VM exits)"
      ;;
    gone)
      addr=''
      fail "$id disappeared (EC2 does not know it any more)"
      ;;
  esac
}

# --- wait until it runs, with a public address ----------------------------------------
unknown=0
while :; do
  s=$(state_of "$id")
  case $s in
    running)
      out=$(aws ec2 describe-instances --instance-ids "$id" \
        --query 'Reservations[0].Instances[0].PublicIpAddress' --output text 2>&1) || out=''
      if [[ $out =~ ^[0-9a-fA-F.:]+$ ]]; then
        addr=$out
        break
      fi
      ;;
    pending | unknown) ;;
    gone)
      unknown=$((unknown + 1))
      ((unknown < 5)) || instance_gone gone
      ;;
    *) instance_gone "$s" ;;
  esac
  if (($(left) <= 0)); then
    console_tail
    fail "$id did not run with a public address within ${timeout_s} s (SMOKE_TIMEOUT_S; it is $s)"
  fi
  pause "$poll_s"
done
log "$id runs at $addr ($((SECONDS - start)) s); waiting for its SSH"

# --- the instance's SSH ----------------------------------------------------------------
instance_ssh=0
last_log=$SECONDS
while :; do
  rc=0
  bounded "$((connect_s + 30))" /dev/null "$work/ssh.err" on_instance true </dev/null || rc=$?
  if ((rc == 0)); then
    instance_ssh=1
    break
  fi
  if (($(left) <= 0)); then
    console_tail
    fail "the SSH of $id ($instance_user@$addr:$ssh_port) did not accept the smoke key within ${timeout_s} s (SMOKE_TIMEOUT_S; last: $(clean_log <"$work/ssh.err" | one_line)); its console is above"
  fi
  if ((SECONDS - last_log >= 60)); then
    log "$id: no SSH yet ($((SECONDS - start)) s; $(clean_log <"$work/ssh.err" | one_line))"
    last_log=$SECONDS
  fi
  instance_gone "$(state_of "$id")"
  pause "$poll_s"
done
log "$id answers SSH ($((SECONDS - start)) s); waiting for the VM's guest on 127.0.0.1:$guest_port there"

# --- the guest, through the instance's loopback forward ----------------------------------
proxy="ssh ${inst_opts[*]} -W %h:%p $instance_user@$addr"
guest_opts=(-F /dev/null -T -p "$guest_port" -o BatchMode=yes -o "ConnectTimeout=$connect_s"
  -o ServerAliveInterval=15 -o ServerAliveCountMax=8 -o StrictHostKeyChecking=no
  -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o IdentityAgent=SSH_AUTH_SOCK
  -o ForwardAgent=no -o ClearAllForwardings=yes -o ControlMaster=no -o ControlPath=none
  -o "ProxyCommand=$proxy")
guest="127.0.0.1:$guest_port"
attempt=0
# The first refusal is said at once, then one line a minute.
last_log=$((SECONDS - 60))
while :; do
  attempt=$((attempt + 1))
  remaining=$(left_or_1)
  # Does the guest answer? A session that does nothing, bounded like the instance's probe.
  rc=0
  bounded "$((remaining < connect_s + 30 ? remaining : connect_s + 30))" /dev/null "$work/check.err" \
    ssh "${guest_opts[@]}" "$SMOKE_GUEST_USER@127.0.0.1" "exit 0" </dev/null || rc=$?
  if ((rc == 0)); then
    remaining=$(left_or_1)
    # shellcheck disable=SC2029 # the command is for the guest's shell, as given
    bounded "$remaining" "$work/check.out" "$work/check.err" ssh "${guest_opts[@]}" "$SMOKE_GUEST_USER@127.0.0.1" \
      "$SMOKE_GUEST_COMMAND" < <(printf '%s' "$payload") || rc=$?
    if ((rc == 0)); then
      log "the check in the guest passed (attempt $attempt, $((SECONDS - start)) s):"
      clean_log <"$work/check.out" | cut -c1-1000 | sed 's/^/  | /' >&2
      break
    fi
    if ((rc != 255)); then
      log "the check's output:"
      cat "$work/check.out" "$work/check.err" | clean_log | tail -n 60 | cut -c1-1000 | sed 's/^/  | /' >&2
      if (($(left) <= 0)) && ((rc == 143 || rc == 137)); then
        fail "the check in the guest ($SMOKE_GUEST_USER@$guest on $id) did not finish within ${timeout_s} s (SMOKE_TIMEOUT_S)"
      fi
      fail "the check in the guest ($SMOKE_GUEST_USER@$guest on $id) failed with exit code $rc"
    fi
  fi
  why=$(clean_log <"$work/check.err" | one_line)
  if (($(left) <= 0)); then
    fail "the VM in $id did not answer on the guest's SSH at $guest (the instance's loopback forward to the guest's port 22) within ${timeout_s} s (SMOKE_TIMEOUT_S; last: ${why:-no answer})"
  fi
  if ((SECONDS - last_log >= 60)); then
    log "the guest at $guest on $id does not answer yet ($((SECONDS - start)) s; ${why:-no answer})"
    last_log=$SECONDS
  fi
  instance_gone "$(state_of "$id")"
  pause "$poll_s"
done

# --- passed: terminate --------------------------------------------------------------------
trap '' TERM INT HUP
request_terminate "$id" || {
  echo finished >"$done_flag"
  die "the smoke test passed, but $id could not be terminated (see above)"
}
echo finished >"$done_flag"
t0=$SECONDS
while :; do
  s=$(state_of "$id")
  [[ $s != shutting-down && $s != terminated && $s != gone ]] || break
  ((SECONDS - t0 < 300)) || die "the smoke test passed, but $id is still $s 300 s after terminate-instances"
  sleep "$poll_s"
done
log "$id is $s; the smoke test of $SMOKE_AMI_ID passed in $((SECONDS - start)) s"
printf '{"amiId":"%s","instanceId":"%s","guest":"%s","passedAt":"%s"}\n' "$SMOKE_AMI_ID" "$id" "$guest" \
  "$(date -u +%Y-%m-%dT%H:%M:%SZ)"

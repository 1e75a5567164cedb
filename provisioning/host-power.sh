#!/usr/bin/env bash
# host-power.sh - starts or stops the EC2 build host from the operator's machine.
#
# Usage: host-power.sh start INSTANCE_ID HOST TIMEOUT_S
#        host-power.sh stop INSTANCE_ID
#
#   start  makes sure the instance runs (start-instances when it is stopped,
#          first waiting out a stop in progress), then waits for the SSH
#          banner on HOST:22 with wait-for-guest.sh, TIMEOUT_S seconds at most.
#          The stack stops the host after each build; a later `pulumi up` that
#          has work to do starts it again here.
#   stop   stop-instances and wait until the instance is stopped (no-op when
#          it already is).
#
# Runs where Pulumi runs: needs bash, the AWS CLI and the same credentials and
# region as the stack (AWS_REGION, AWS_PROFILE: set by the stack). When the
# AWS CLI is missing or cannot read the instance, `start` only waits for SSH
# (enough for a host that runs) and says how to start the host by hand, unless
# HOST_POWER_REQUIRE_CLI=1 (the stack will have to stop the host after the
# build): then it fails at once, naming the cause and the fix, rather than
# after hours of work. `stop` fails naming the cause.
#
# Env (optional): HOST_POWER_POLL_S seconds between state polls (default 10);
#   HOST_POWER_SSH_PORT the SSH port to wait for (default 22);
#   HOST_POWER_REQUIRE_CLI 1 to require a working AWS CLI for `start`.
# Output: progress and errors on stderr, prefixed "host-power:"; with `start`,
#   the SSH banner on stdout.
# Exit: 0 done; 1 the instance could not be started or stopped (the cause is
#   named); 2 bad arguments; with `start`, wait-for-guest.sh's status otherwise.
set -euo pipefail

readonly me="host-power"
log() { printf '%s: %s\n' "$me" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}
usage() {
  log "$*"
  log "usage: host-power.sh start INSTANCE_ID HOST TIMEOUT_S | host-power.sh stop INSTANCE_ID"
  exit 2
}

action=${1:-}
case $action in
  start) (($# == 4)) || usage "start takes INSTANCE_ID HOST TIMEOUT_S" ;;
  stop) (($# == 2)) || usage "stop takes INSTANCE_ID" ;;
  *) usage "unknown action '$action'" ;;
esac
id=$2
[[ $id =~ ^i-[0-9a-f]{8,17}$ ]] || usage "INSTANCE_ID='$id' is not an EC2 instance id"
poll_s=${HOST_POWER_POLL_S:-10}
[[ $poll_s =~ ^[1-9][0-9]*$ ]] || usage "HOST_POWER_POLL_S='$poll_s' is not a positive number"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# The instance's state name (pending, running, stopping, stopped, ...).
state() {
  local out
  out=$(aws ec2 describe-instances --instance-ids "$id" --query 'Reservations[0].Instances[0].State.Name' \
    --output text 2>&1) || die "cannot read the state of $id: ${out//$'\n'/ }"
  printf '%s\n' "$out"
}

# Waits (bounded) until the state is one of the given names; prints it.
wait_state() { # LIMIT_S NAME...
  local limit=$1 s start=$SECONDS
  shift
  while :; do
    s=$(state)
    for want in "$@"; do [[ $s == "$want" ]] && { printf '%s\n' "$s"; return 0; }; done
    case $s in shutting-down | terminated) die "$id is $s: the host is gone; run pulumi up to create a new one" ;; esac
    ((SECONDS - start < limit)) || die "$id is still $s after ${limit}s (wanted: $*)"
    log "$id is $s; waiting"
    sleep "$poll_s"
  done
}

if [[ $action == stop ]]; then
  command -v aws >/dev/null || die "the AWS CLI is not installed: it stops the host after a build (install AWS CLI v2, or set keepHostRunning: true)"
  s=$(state)
  if [[ $s == stopped ]]; then
    log "$id is already stopped"
    exit 0
  fi
  [[ $s == stopping ]] || {
    out=$(aws ec2 stop-instances --instance-ids "$id" 2>&1) || die "stop-instances $id failed: ${out//$'\n'/ }"
    log "stopping $id (was $s)"
  }
  wait_state 900 stopped >/dev/null
  log "$id is stopped"
  exit 0
fi

host=$3 timeout_s=$4
cli_problem=""
if ! command -v aws >/dev/null; then
  cli_problem="the AWS CLI is not installed"
elif ! probe=$(aws ec2 describe-instances --instance-ids "$id" --query 'Reservations[0].Instances[0].State.Name' \
  --output text 2>&1); then
  cli_problem="the AWS CLI cannot read $id: ${probe//$'\n'/ }"
fi
if [[ -n $cli_problem ]]; then
  if [[ ${HOST_POWER_REQUIRE_CLI:-0} == 1 ]]; then
    die "$cli_problem; it must stop the host after the build (keepHostRunning is false). Fix: install AWS CLI v2 and give it the stack's identity (the same environment credentials or profile as Pulumi; stack-config credentials such as aws:accessKey do not reach it), or set keepHostRunning: true"
  fi
  log "warning: $cli_problem, so a stopped host cannot be started from here;"
  log "if SSH does not answer, start it: aws ec2 start-instances --instance-ids $id"
else
  s=$(state)
  case $s in
    running | pending) ;;
    stopping | stopped)
      [[ $s == stopped ]] || s=$(wait_state 900 stopped)
      out=$(aws ec2 start-instances --instance-ids "$id" 2>&1) || die "start-instances $id failed: ${out//$'\n'/ }"
      log "starting $id (it was stopped after the last build); a metal host takes 5 to 15 minutes"
      ;;
    *) die "$id is $s: the host is gone; run pulumi up to create a new one" ;;
  esac
  wait_state "$timeout_s" running >/dev/null
fi
exec bash "$here/wait-for-guest.sh" "$host" "${HOST_POWER_SSH_PORT:-22}" "$timeout_s"

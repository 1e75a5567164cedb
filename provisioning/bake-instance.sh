#!/usr/bin/env bash
# bake-instance.sh - runs the short-lived bake instance from the operator's
# machine (where Pulumi runs): launch it, wait until it has baked the image
# and stopped, read its status; or terminate it.
#
# Usage: bake-instance.sh run
#        bake-instance.sh terminate INSTANCE_ID
#
#   run        launches one instance (aws ec2 run-instances) from BAKE_AMI_ID
#              with the user data (renderBakeUserData in infra/bake.ts: it runs
#              bake-image.sh, which writes BAKE_STATUS_URI and powers off):
#              IMDSv2 required (hop limit 1), an encrypted gp3 root volume of
#              BAKE_VOLUME_GIB on the AMI's root device, no key pair,
#              --instance-initiated-shutdown-behavior stop, tagged. A status
#              object already at BAKE_STATUS_URI is deleted first (a stale one
#              must not be read as this bake's). Then waits, BAKE_TIMEOUT_S at
#              most, until the instance is stopped, and reads the status.
#              Success (status "ok"): prints one line and leaves the instance
#              stopped (the AMI is taken from it; terminate it afterwards).
#              Any failure (status "failed", no status, timeout, the instance
#              terminated, run-instances refused): the instance it started is
#              terminated and the script fails naming the cause; without a
#              status, the last lines of the instance's console are printed.
#              SIGTERM/SIGINT/SIGHUP terminate the instance too, and a watcher
#              process terminates it if this script is killed outright
#              (SIGKILL) before it has finished.
#   terminate  terminates INSTANCE_ID and waits (600 s at most) until it is
#              terminated; a no-op when it is already gone.
#
# Env for run (required unless marked):
#   BAKE_AMI_ID             the host AMI (Ubuntu 24.04 arm64), ami-...
#   BAKE_INSTANCE_TYPE      e.g. c7g.large
#   BAKE_VOLUME_GIB         root volume size in GiB (it becomes the AMI's)
#   BAKE_SUBNET_ID          optional subnet-...; default: the default VPC's
#   BAKE_SECURITY_GROUP_ID  sg-... (no ingress needed: nothing connects in)
#   BAKE_INSTANCE_PROFILE   instance profile name (bakePolicyDocument's role)
#   BAKE_STATUS_URI         s3://bucket/key or file:///abs/path (the latter for tests)
#   BAKE_USER_DATA_FILE     the gzip'd user data (a file: it is binary). When
#                           unset, stdin is read as its base64 text instead.
#                           At most 16384 bytes (EC2's limit).
#   BAKE_TAGS_JSON          optional [{"Key":..,"Value":..},...] for the
#                           instance and its volume (default: a Name tag)
#   BAKE_TIMEOUT_S          default 5400: boot, packages and the bake
#   BAKE_POLL_S             seconds between state polls, default 15
#   AWS_REGION, AWS_PROFILE as set by the stack; S3_ENDPOINT_URL: passed to
#                           aws s3 as --endpoint-url (tests use s3rver)
# Output (run): progress and errors on stderr, prefixed "bake-instance:";
#   on success stdout is exactly one line, the status with the instance id:
#   {"instanceId":"i-...","status":"ok","imageSha256":"...","files":[...],"finishedAt":"..."}
# Exit: 0 done; 1 failed (the cause is named; the instance was terminated);
#   2 bad usage or environment; 130/143/129 interrupted (instance terminated).
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

readonly PROG=bake-instance
readonly USER_DATA_MAX=16384

usage() {
  log "$*"
  log "usage: bake-instance.sh run | bake-instance.sh terminate INSTANCE_ID (see the header for the environment)"
  exit 2
}

action=${1:-}
case $action in
  run) (($# == 1)) || usage "run takes no arguments (it reads the environment)" ;;
  terminate) (($# == 2)) || usage "terminate takes INSTANCE_ID" ;;
  *) usage "unknown action '$action'" ;;
esac
poll_s=${BAKE_POLL_S:-15}
[[ $poll_s =~ ^[1-9][0-9]*$ ]] || usage "BAKE_POLL_S='$poll_s' is not a positive number of seconds"
command -v aws >/dev/null || die "the AWS CLI is not installed: it launches and stops the bake instance (install AWS CLI v2)"
s3_args=()
[[ -z ${S3_ENDPOINT_URL:-} ]] || s3_args+=(--endpoint-url "$S3_ENDPOINT_URL")

# stdin's last non-blank line.
one_line() { grep -v '^[[:space:]]*$' | tail -n 1 | tr -d '\n' || true; }

# The instance's state name, or "gone" when EC2 does not know it.
state_of() { # ID
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

# Asks EC2 to terminate ID; says so, or why not (never fails).
request_terminate() { # ID
  local out
  if out=$(aws ec2 terminate-instances --instance-ids "$1" 2>&1); then
    log "terminating $1"
  elif [[ $out == *InvalidInstanceID.NotFound* ]]; then
    log "$1 is already gone"
  else
    log "error: terminate-instances $1 failed: $(one_line <<<"$out"); terminate it by hand: aws ec2 terminate-instances --instance-ids $1"
  fi
}

if [[ $action == terminate ]]; then
  id=$2
  [[ $id =~ ^i-[0-9a-f]{8,17}$ ]] || usage "INSTANCE_ID='$id' is not an EC2 instance id"
  s=$(state_of "$id")
  if [[ $s == terminated || $s == gone ]]; then
    log "$id is already terminated"
    exit 0
  fi
  out=$(aws ec2 terminate-instances --instance-ids "$id" 2>&1) ||
    die "terminate-instances $id failed: $(one_line <<<"$out")"
  log "terminating $id (was $s)"
  start=$SECONDS
  while :; do
    s=$(state_of "$id")
    [[ $s != terminated && $s != gone ]] || break
    ((SECONDS - start < 600)) || die "$id is still $s 600 s after terminate-instances"
    sleep "$poll_s"
  done
  log "$id is terminated"
  exit 0
fi

# --- run: inputs -----------------------------------------------------------------
need() { [[ -n ${!1:-} ]] || usage "$1 is not set"; }
for v in BAKE_AMI_ID BAKE_INSTANCE_TYPE BAKE_VOLUME_GIB BAKE_SECURITY_GROUP_ID BAKE_INSTANCE_PROFILE BAKE_STATUS_URI; do
  need "$v"
done
[[ $BAKE_AMI_ID =~ ^ami-[0-9a-f]{8,17}$ ]] || usage "BAKE_AMI_ID='$BAKE_AMI_ID' is not an AMI id"
[[ $BAKE_INSTANCE_TYPE =~ ^[a-z][a-z0-9-]*\.[a-z0-9-]+$ ]] || usage "BAKE_INSTANCE_TYPE='$BAKE_INSTANCE_TYPE' is not an instance type"
if [[ ! $BAKE_VOLUME_GIB =~ ^[1-9][0-9]*$ ]] || ((BAKE_VOLUME_GIB < 8 || BAKE_VOLUME_GIB > 16384)); then
  usage "BAKE_VOLUME_GIB='$BAKE_VOLUME_GIB' is not a volume size in GiB (8-16384)"
fi
[[ -z ${BAKE_SUBNET_ID:-} || $BAKE_SUBNET_ID =~ ^subnet-[0-9a-f]{8,17}$ ]] || usage "BAKE_SUBNET_ID='$BAKE_SUBNET_ID' is not a subnet id"
[[ $BAKE_SECURITY_GROUP_ID =~ ^sg-[0-9a-f]{8,17}$ ]] || usage "BAKE_SECURITY_GROUP_ID='$BAKE_SECURITY_GROUP_ID' is not a security group id"
[[ $BAKE_INSTANCE_PROFILE =~ ^[A-Za-z0-9+=,.@_-]{1,128}$ ]] || usage "BAKE_INSTANCE_PROFILE='$BAKE_INSTANCE_PROFILE' is not an instance profile name"
timeout_s=${BAKE_TIMEOUT_S:-5400}
[[ $timeout_s =~ ^[1-9][0-9]*$ ]] || usage "BAKE_TIMEOUT_S='$timeout_s' is not a positive number of seconds"
status_uri=$BAKE_STATUS_URI
status_path=
case $status_uri in
  s3://?*/?*) ;;
  file:///*)
    [[ $status_uri != *\\* ]] || usage "BAKE_STATUS_URI='$status_uri' holds a backslash"
    status_path=${status_uri#file://}
    status_path=$(printf '%b' "${status_path//%/\\x}")
    ;;
  *) usage "BAKE_STATUS_URI='$status_uri' must be s3://bucket/key or file:///absolute/path" ;;
esac
tags=${BAKE_TAGS_JSON:-'[{"Key":"Name","Value":"windows-arm64-image-bake"}]'}
[[ $tags =~ ^[[:space:]]*\[.*\][[:space:]]*$ && $tags != *$'\n'* ]] ||
  usage "BAKE_TAGS_JSON must be one line of JSON: [{\"Key\":\"...\",\"Value\":\"...\"},...]"

work=$(mktemp -d "${TMPDIR:-/tmp}/bake-instance.XXXXXX")
chmod 0700 "$work"
id=''
done_flag=$work/watch
watcher=''
cleanup() {
  # The watcher (once started) removes $work after this script is gone.
  [[ -n $watcher ]] || rm -rf -- "$work"
}
trap cleanup EXIT

if [[ -n ${BAKE_USER_DATA_FILE:-} ]]; then
  [[ -f $BAKE_USER_DATA_FILE && -r $BAKE_USER_DATA_FILE ]] ||
    usage "BAKE_USER_DATA_FILE '$BAKE_USER_DATA_FILE' does not exist or is not readable"
  user_data=$BAKE_USER_DATA_FILE
else
  user_data=$work/user-data
  base64 --decode >"$user_data" 2>"$work/b64.err" ||
    usage "stdin is not the base64 of the user data (BAKE_USER_DATA_FILE is unset): $(one_line <"$work/b64.err")"
fi
ud_size=$(wc -c <"$user_data" | tr -d ' ')
((ud_size > 0)) || usage "the user data is empty"
((ud_size <= USER_DATA_MAX)) || usage "the user data is $ud_size bytes; EC2 takes at most $USER_DATA_MAX"

# --- status object -----------------------------------------------------------------
# Sets STATUS to the status object's text ("" when absent) and STATUS_ERR.
STATUS='' STATUS_ERR=''
read_status() {
  STATUS='' STATUS_ERR=''
  if [[ -n $status_path ]]; then
    if [[ -f $status_path ]]; then STATUS=$(tr -d '\r\n' <"$status_path"); else STATUS_ERR="$status_path does not exist"; fi
    return 0
  fi
  if STATUS=$(aws "${s3_args[@]}" s3 cp --only-show-errors "$status_uri" - 2>"$work/status.err"); then
    STATUS=$(tr -d '\r\n' <<<"$STATUS")
  else
    STATUS=''
    STATUS_ERR=$(one_line <"$work/status.err")
  fi
}
# The string field NAME of the status, JSON escapes undone (\" \\ \n \t \/).
field() { # NAME
  local re="\"$1\":\"(([^\"\\\\]|\\\\.)*)\"" v
  [[ $STATUS =~ $re ]] || return 0
  v=${BASH_REMATCH[1]}
  v=${v//\\n/ }
  v=${v//\\t/ }
  v=${v//\\\//\/}
  v=${v//\\\"/\"}
  printf '%s\n' "${v//\\\\/\\}"
}

if [[ -n $status_path ]]; then
  rm -f -- "$status_path" || die "cannot delete the stale status $status_path"
else
  out=$(aws "${s3_args[@]}" s3 rm --only-show-errors "$status_uri" 2>&1) ||
    die "cannot delete a stale status at $status_uri before the bake: $(one_line <<<"$out")"
fi

# --- launch ------------------------------------------------------------------------
out=$(aws ec2 describe-images --image-ids "$BAKE_AMI_ID" --query 'Images[0].RootDeviceName' --output text 2>&1) ||
  die "cannot read the AMI $BAKE_AMI_ID: $(one_line <<<"$out")"
root_device=$out
[[ $root_device == /dev/* ]] || die "the AMI $BAKE_AMI_ID has no root device name ('$root_device'): does it exist in this region?"

bdm="[{\"DeviceName\":\"$root_device\",\"Ebs\":{\"VolumeSize\":$BAKE_VOLUME_GIB,\"VolumeType\":\"gp3\",\"Encrypted\":true,\"DeleteOnTermination\":true}}]"
tag_specs="[{\"ResourceType\":\"instance\",\"Tags\":$tags},{\"ResourceType\":\"volume\",\"Tags\":$tags}]"
net_args=(--security-group-ids "$BAKE_SECURITY_GROUP_ID")
[[ -z ${BAKE_SUBNET_ID:-} ]] || net_args+=(--subnet-id "$BAKE_SUBNET_ID")

# Signals from here on terminate what was started (during run-instances they
# are held until its answer names the instance).
interrupted() { # SIGNAL (TERM, INT or HUP)
  trap '' TERM INT HUP
  log "interrupted by SIG$1"
  if [[ -n $id ]]; then
    request_terminate "$id"
    echo finished >"$done_flag"
  fi
  case $1 in INT) exit 130 ;; HUP) exit 129 ;; *) exit 143 ;; esac
}
held=''
trap 'held=TERM' TERM
trap 'held=INT' INT
trap 'held=HUP' HUP

# The watcher: terminates the instance if this script dies (even by SIGKILL)
# before it has decided. It finds the instance by $work/id or, killed during
# run-instances, by the launch's client token; it holds none of this
# script's output.
token=bake-$(date -u +%Y%m%dT%H%M%S)-$$-$RANDOM
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

log "launching a $BAKE_INSTANCE_TYPE from $BAKE_AMI_ID ($BAKE_VOLUME_GIB GiB encrypted gp3 on $root_device, user data $ud_size bytes)"
if ! out=$(aws ec2 run-instances --count 1 --image-id "$BAKE_AMI_ID" --instance-type "$BAKE_INSTANCE_TYPE" \
  --client-token "$token" --iam-instance-profile "Name=$BAKE_INSTANCE_PROFILE" "${net_args[@]}" \
  --user-data "fileb://$user_data" \
  --metadata-options 'HttpTokens=required,HttpEndpoint=enabled,HttpPutResponseHopLimit=1' \
  --block-device-mappings "$bdm" --instance-initiated-shutdown-behavior stop \
  --tag-specifications "$tag_specs" --query 'Instances[0].InstanceId' --output text 2>&1); then
  echo finished >"$done_flag"
  [[ -z $held ]] || interrupted "$held"
  die "run-instances refused the bake instance: $(one_line <<<"$out")"
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
log "started $id; waiting (at most ${timeout_s} s) for it to bake the image and stop"

# Fails the run: terminates the instance, names the cause.
fail() { # MESSAGE
  trap '' TERM INT HUP
  request_terminate "$id"
  echo finished >"$done_flag"
  die "$*"
}

console_tail() {
  local out
  out=$(aws ec2 get-console-output --instance-id "$id" --latest --query Output --output text 2>/dev/null) ||
    out=$(aws ec2 get-console-output --instance-id "$id" --query Output --output text 2>&1) ||
    out="(no console output: $(one_line <<<"$out"))"
  log "last lines of the console of $id:"
  clean_log <<<"$out" | tail -n 25 | sed 's/^/  | /' >&2
}

# --- wait until stopped ----------------------------------------------------------------
start=$SECONDS
last=''
unknown=0
while :; do
  s=$(state_of "$id")
  case $s in
    stopped) break ;;
    pending | running | stopping | unknown) ;;
    gone)
      # Right after run-instances EC2 may not list the instance yet.
      unknown=$((unknown + 1))
      ((unknown < 5)) || fail "$id disappeared (EC2 does not know it any more)"
      ;;
    shutting-down | terminated)
      reason=$(aws ec2 describe-instances --instance-ids "$id" \
        --query 'Reservations[0].Instances[0].StateReason.Message' --output text 2>/dev/null) || reason=unknown
      fail "$id was $s before it finished the bake (state reason: $reason)"
      ;;
    *) fail "$id is in the unexpected state '$s'" ;;
  esac
  elapsed=$((SECONDS - start))
  if ((elapsed >= timeout_s)); then
    console_tail
    fail "$id did not finish the bake within ${timeout_s} s (BAKE_TIMEOUT_S; it is $s); its console is above"
  fi
  if [[ $s != "$last" ]] || ((elapsed % 300 < poll_s)); then
    log "$id is $s (${elapsed} s)"
    last=$s
  fi
  sleep "$poll_s" >/dev/null 2>&1 &
  wait $! || true
done
log "$id has stopped after $((SECONDS - start)) s; reading the status at $status_uri"

read_status
if [[ -z $STATUS ]]; then
  console_tail
  fail "$id stopped without writing a status to $status_uri ($STATUS_ERR); its console is above"
fi
st=$(field status)
case $st in
  ok)
    [[ $STATUS == \{* ]] || fail "the status at $status_uri is not a JSON object: ${STATUS:0:200}"
    echo keep >"$done_flag"
    log "$id baked image sha256 $(field imageSha256); it stays stopped for the AMI"
    printf '{"instanceId":"%s",%s\n' "$id" "${STATUS#\{}"
    ;;
  failed) fail "the bake on $id failed while $(field stage): $(field error)" ;;
  *) fail "the status at $status_uri has no known status ('$st'): ${STATUS:0:200}" ;;
esac

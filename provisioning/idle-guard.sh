#!/usr/bin/env bash
# idle-guard.sh - powers the build host off when no pipeline stage has run for a while.
#
# Usage: idle-guard.sh [--status]
#
#   Run as root every minute by windows-arm64-image-idle.timer (installed by
#   idle-guard-install.sh). The host is BUSY while
#     - a stage marker $STAGE_RUN_DIR/<stageId>.<pid> exists whose pid is
#       alive (the stage wrapper keeps it while its stage runs and writes its
#       pid on the first line; without a pid there, the name's suffix is used).
#       A marker whose pid is gone is stale (a killed wrapper): it is removed
#       and does not count;
#     - an interactive login session exists (IDLE_WHO_COMMAND, `who`: utmp
#       holds terminal sessions only, so the pipeline's own SSH commands, which
#       have no tty, do not count).
#   While busy it records what it saw (time and what) in
#   $IDLE_STATE_DIR/last-seen, so the idle time of a stage whose wrapper was
#   killed, or of an operator's session, starts when it was last seen.
#   Otherwise the host has been IDLE since the newest of: the mtime of
#   $STAGE_STATE_DIR/last-activity (touched by the wrapper at the start and
#   end of each stage; a stage id as the first word of its first line names
#   the stage), the last-seen record (idle-guard-install.sh writes one too),
#   and the boot (now - uptime). Once idle for at least IDLE_MINUTES it logs:
#     idle-guard: no stage for 47 min (last: stage fetchImage at 2026-12-01 10:00:00 UTC; limit 45 min): powering off
#   checks the markers and sessions once more, and runs IDLE_POWEROFF_COMMAND.
#   An EC2 instance stops (it is not terminated) when its OS powers off.
#
#   --status  print the decision on stdout (busy, idle for N of M min,
#             disabled, ...); change nothing, power nothing off.
#
# Configuration, IDLE_ENV_FILE [/etc/windows-arm64-image/idle.env], written by
# idle-guard-install.sh; KEY=value lines, parsed (never sourced):
#   IDLE_MINUTES  idle minutes before the power-off (a whole number, 1..10080)
#   IDLE_ENABLED  1: on; 0: never power off (keepHostRunning: true)
#   IDLE_HOST_ID  EC2 instance id of the build host. When set, the guard acts
#                 only on that instance: an instance launched from the AMI
#                 baked from this disk carries the same files, and must not
#                 be powered off (it logs that it is not the build host).
#
# Environment (defaults in brackets; the paths are there for tests):
#   STAGE_RUN_DIR [/run/windows-arm64-image/stages]  stage markers (absent: none)
#   STAGE_STATE_DIR [/var/lib/windows-arm64-image]   holds last-activity
#   IDLE_STATE_DIR [$STATE_DIRECTORY or /var/lib/windows-arm64-image-idle]
#                 the guard's own last-seen record and lock
#   IDLE_ENV_FILE [/etc/windows-arm64-image/idle.env]
#   IDLE_POWEROFF_COMMAND [systemctl poweroff]  run with bash -c, bounded to 120 s
#   IDLE_WHO_COMMAND [who]  prints one line per interactive session
#                 ("user tty ..."), bounded to 20 s
#   IDLE_NOW_S    the current time, epoch seconds [the clock]
#   IDLE_UPTIME_S seconds since boot [/proc/uptime]
#   IDLE_INSTANCE_ID  this instance's id [IMDSv2 at IDLE_IMDS_URL
#                 (http://169.254.169.254)]; read only when IDLE_HOST_ID is set
#
# When it cannot tell, it does not power off. A host left running by mistake
# costs its hourly rate until the next look (the guard runs again a minute
# later, and the pipeline stops the host after a build); a host powered off
# under a running stage loses the stage's work and can leave a half-written
# VM disk that the next run must rebuild from the source image. So: a run
# dir that exists but is not a readable directory, a marker that cannot be
# read, a `who` that fails, a missing or invalid env file, an unreadable
# instance id: each is logged (naming the cause) and the guard exits 1
# without powering off. A marker that names no pid counts as busy until it is
# IDLE_MINUTES old, then it is ignored (logged, left in place). A pid reused
# by another process keeps the host up (the safe side). A time in the future
# (the clock went back) counts as now.
#
# Output: with --status the decision on stdout; otherwise one line on stderr
# (the journal) per run: busy with what, idle for how long, or the power-off.
# Exit: 0 decided (busy, not idle long enough, disabled, not the build host,
#   power-off requested); 1 could not tell, bad configuration or the
#   power-off command failed (nothing was powered off by this script); 2 bad
#   usage. Idempotent: a run changes nothing but stale markers and its own
#   record, and a second power-off request is harmless.
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

readonly PROG=idle-guard

status_only=0
if (($# == 1)) && [[ $1 == --status ]]; then
  status_only=1
elif (($# > 0)); then
  log "usage: idle-guard.sh [--status] (got: $*)"
  exit 2
fi

run_dir=${STAGE_RUN_DIR:-/run/windows-arm64-image/stages}
stage_state_dir=${STAGE_STATE_DIR:-/var/lib/windows-arm64-image}
state_dir=${IDLE_STATE_DIR:-${STATE_DIRECTORY:-/var/lib/windows-arm64-image-idle}}
env_file=${IDLE_ENV_FILE:-/etc/windows-arm64-image/idle.env}
poweroff_cmd=${IDLE_POWEROFF_COMMAND:-systemctl poweroff}
who_cmd=${IDLE_WHO_COMMAND:-who}
imds=${IDLE_IMDS_URL:-http://169.254.169.254}
seen_file=$state_dir/last-seen

# "cannot tell": never power off, say why, exit 1.
unsure() {
  log "cannot tell whether the host is idle: $*; not powering off"
  ((status_only == 0)) || say "unknown: $*"
  exit 1
}
# A decision: on stdout with --status, on stderr (the journal) otherwise.
report() {
  if ((status_only)); then say "$*"; else log "$*"; fi
}
is_uint() { [[ $1 =~ ^[0-9]{1,12}$ ]]; }
when() { date -u -d "@$1" '+%Y-%m-%d %H:%M:%S UTC'; }

now=${IDLE_NOW_S:-$(date +%s)}
is_uint "$now" || unsure "IDLE_NOW_S='$now' is not epoch seconds"
now=$((10#$now))

# --- configuration --------------------------------------------------------------
[[ -e $env_file ]] || unsure "$env_file is missing (run idle-guard-install.sh MINUTES|off to configure the guard)"
[[ -f $env_file && -r $env_file ]] || unsure "$env_file is not a readable file"
minutes=
enabled=
host_id=
lineno=0
while IFS= read -r line || [[ -n $line ]]; do
  lineno=$((lineno + 1))
  [[ $line =~ ^[[:space:]]*(#.*)?$ ]] && continue
  [[ $line =~ ^([A-Z_][A-Z0-9_]*)=(.*)$ ]] || unsure "$env_file line $lineno is not KEY=value"
  case ${BASH_REMATCH[1]} in
    IDLE_MINUTES) minutes=${BASH_REMATCH[2]} ;;
    IDLE_ENABLED) enabled=${BASH_REMATCH[2]} ;;
    IDLE_HOST_ID) host_id=${BASH_REMATCH[2]} ;;
    *) log "warning: $env_file line $lineno: unknown key ${BASH_REMATCH[1]} ignored" ;;
  esac
done <"$env_file"

[[ $enabled == [01] ]] || unsure "IDLE_ENABLED='$enabled' in $env_file must be 0 or 1"
if [[ $enabled == 0 ]]; then
  report "disabled (IDLE_ENABLED=0 in $env_file, keepHostRunning): the host is never powered off by this guard"
  exit 0
fi
if ! [[ $minutes =~ ^[0-9]{1,5}$ ]] || ((10#$minutes < 1 || 10#$minutes > 10080)); then
  unsure "IDLE_MINUTES='$minutes' in $env_file must be a whole number of minutes from 1 to 10080"
fi
minutes=$((10#$minutes))

if [[ -n $host_id ]]; then
  here=${IDLE_INSTANCE_ID:-}
  if [[ -z $here ]]; then
    token=$(curl -fsS -m 3 -X PUT "$imds/latest/api/token" -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' 2>/dev/null) ||
      unsure "this instance's id could not be read (no IMDSv2 token from $imds)"
    here=$(curl -fsS -m 3 -H "X-aws-ec2-metadata-token: $token" "$imds/latest/meta-data/instance-id" 2>/dev/null) ||
      unsure "this instance's id could not be read from $imds"
  fi
  if [[ $here != "$host_id" ]]; then
    report "this instance ($here) is not the build host ($host_id, IDLE_HOST_ID in $env_file): nothing to do here"
    exit 0
  fi
fi

# --- busy? ------------------------------------------------------------------------
# scan_busy: sets busy_what to what keeps the host busy ("" when nothing);
# removes stale markers (not with --status); exits through unsure when it
# cannot tell.
scan_busy() {
  local f name pid first stage age line user tty
  local -a sessions
  busy_what=
  if [[ -e $run_dir || -L $run_dir ]]; then
    [[ -d $run_dir && -r $run_dir && -x $run_dir ]] || unsure "$run_dir (STAGE_RUN_DIR) is not a readable directory"
    for f in "$run_dir"/*; do
      [[ -e $f || -L $f ]] || continue # no markers (the glob did not match), or one just removed
      [[ -f $f ]] || continue
      name=${f##*/}
      first=
      if ! { read -r first _ || [[ -n $first ]]; } 2>/dev/null <"$f"; then
        # Empty (being written), or it could not be opened.
        [[ -e $f ]] || continue # removed by its wrapper just now: the stage ended
        [[ -r $f ]] || unsure "stage marker $f cannot be read"
      fi
      if is_uint "$first" && ((10#$first > 0)); then
        pid=$((10#$first))
      elif [[ $name =~ \.([0-9]{1,10})$ ]] && ((10#${BASH_REMATCH[1]} > 0)); then
        pid=$((10#${BASH_REMATCH[1]}))
      else
        age=$((now - $(stat -c %Y -- "$f" 2>/dev/null || echo "$now")))
        if ((age < minutes * 60)); then
          busy_what="marker $name (no pid in it yet)"
          return 0
        fi
        log "warning: $f names no pid and is $((age / 60)) min old: ignored (not a stage marker)"
        continue
      fi
      stage=${name%.*}
      if alive "$pid"; then
        busy_what="stage $stage (pid $pid)"
        return 0
      fi
      if ((status_only)); then
        log "stale marker $name (pid $pid is gone): not counted"
      elif rm -f -- "$f" 2>/dev/null; then
        log "removed stale marker $name (pid $pid is gone: its wrapper was killed)"
      else
        log "warning: could not remove stale marker $f (pid $pid is gone); not counted"
      fi
    done
  fi
  # Interactive sessions.
  local out
  out=$(timeout 20 bash -c "$who_cmd" 2>/dev/null) || unsure "'$who_cmd' (IDLE_WHO_COMMAND) failed, so login sessions are unknown"
  mapfile -t sessions < <(grep -v '^[[:space:]]*$' <<<"$out" || true)
  if ((${#sessions[@]} > 0)); then
    line=${sessions[0]}
    read -r user tty _ <<<"$line"
    busy_what="login $user on ${tty:-?}"
    ((${#sessions[@]} == 1)) || busy_what+=" (+$((${#sessions[@]} - 1)) more)"
  fi
  return 0
}

if ((status_only == 0)); then
  mkdir -p -- "$state_dir" 2>/dev/null || unsure "cannot create $state_dir (IDLE_STATE_DIR)"
  { exec 9>"$state_dir/lock"; } 2>/dev/null || unsure "cannot open $state_dir/lock"
  if ! flock -w 30 9; then
    log "another idle-guard run holds $state_dir/lock: leaving it to that run"
    exit 0
  fi
fi

scan_busy
if [[ -n $busy_what ]]; then
  if ((status_only == 0)); then
    tmp=$seen_file.tmp.$$
    if printf '%s %s\n' "$now" "$busy_what" >"$tmp" 2>/dev/null && mv -f -- "$tmp" "$seen_file" 2>/dev/null; then
      :
    else
      rm -f -- "$tmp" 2>/dev/null || true
      log "warning: could not write $seen_file"
    fi
  fi
  report "busy: $busy_what"
  exit 0
fi

# --- idle since when? -------------------------------------------------------------
since=-1
since_what=
consider() { # EPOCH WHAT
  local t=$1
  if ((t > now)); then
    log "warning: $2 is in the future ($(when "$t")): the clock went back? counted as now"
    t=$now
  fi
  if ((t > since)); then
    since=$t
    since_what=$2
  fi
}

activity=$stage_state_dir/last-activity
if [[ -e $activity ]]; then
  t=$(stat -c %Y -- "$activity" 2>/dev/null) || unsure "cannot stat $activity"
  first=
  { read -r first _ <"$activity" || true; } 2>/dev/null
  if [[ $first =~ ^[A-Za-z][A-Za-z0-9_.:-]{0,63}$ ]]; then
    consider "$t" "stage $first"
  else
    consider "$t" "stage activity"
  fi
fi

if [[ -f $seen_file ]]; then
  rec=
  { IFS= read -r rec <"$seen_file" || true; } 2>/dev/null
  if [[ $rec =~ ^([0-9]{1,12})\ (.+)$ ]]; then
    consider "$((10#${BASH_REMATCH[1]}))" "${BASH_REMATCH[2]}"
  else
    log "warning: $seen_file is malformed: ignored"
  fi
fi

up=${IDLE_UPTIME_S:-}
if [[ -z $up ]]; then
  up=$(cut -d' ' -f1 /proc/uptime 2>/dev/null) || up=
  up=${up%%.*}
fi
is_uint "$up" || unsure "uptime unknown (IDLE_UPTIME_S='${IDLE_UPTIME_S:-}', /proc/uptime unreadable)"
consider "$((now - 10#$up))" "boot"

idle_s=$((now - since))
idle_min=$((idle_s / 60))
if ((idle_s < minutes * 60)); then
  report "idle for $idle_min min (last: $since_what at $(when "$since")); powering off after $minutes min"
  exit 0
fi

msg="no stage for $idle_min min (last: $since_what at $(when "$since"); limit $minutes min)"
if ((status_only)); then
  say "$msg: would power off"
  exit 0
fi
# Once more, right before acting: a stage may have started meanwhile.
scan_busy
if [[ -n $busy_what ]]; then
  log "busy: $busy_what (started just now): not powering off"
  exit 0
fi
log "$msg: powering off ($poweroff_cmd)"
if ! timeout 120 bash -c "$poweroff_cmd" >&2; then
  log "error: the power-off command '$poweroff_cmd' (IDLE_POWEROFF_COMMAND) failed"
  exit 1
fi

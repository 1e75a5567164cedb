#!/usr/bin/env bash
# idle-guard-install.sh - turns the build host's idle guard on (MINUTES) or off.
#
# Usage: idle-guard-install.sh MINUTES|off
#
#   MINUTES  hostIdleMinutes: power the host off after this many minutes with
#            no pipeline stage and no login session (a whole number, 10..1440)
#   off      keepHostRunning: true: the guard never powers the host off
#
# Run as root on the build host, as a pipeline stage:
#   sudo -n bash /opt/windows-arm64-image/provisioning/idle-guard-install.sh 45
#
# Writes (each only when its content differs; atomically, mode 0644):
#   ROOT/etc/windows-arm64-image/idle.env            IDLE_MINUTES, IDLE_ENABLED,
#                                                    IDLE_HOST_ID (read by idle-guard.sh)
#   ROOT/etc/systemd/system/windows-arm64-image-idle.service   from
#   ROOT/etc/systemd/system/windows-arm64-image-idle.timer     $SCRIPT_DIR/../assets/
# then, with MINUTES: daemon-reload (when a unit changed), enable and start
# the timer (restarted when it changed); with off: the timer disabled and
# stopped (the unit files stay, IDLE_ENABLED=0 makes the guard a no-op).
# With MINUTES it also records "now" in
#   ROOT/var/lib/windows-arm64-image-idle/last-seen (the guard's own record),
# so idle time counts from the installation at the earliest.
# IDLE_HOST_ID is this EC2 instance's id: the guard acts on this instance
# only, never on instances launched from an AMI baked from this disk. `off`
# keeps IDLE_MINUTES from the file (45 if none) and writes no IDLE_HOST_ID.
#
# Without a running systemd (ROOT other than /, containers, tests) the unit is
# enabled with `systemctl --root` (or a timers.target.wants link by hand),
# and it says it could not start or stop it.
#
# Env:
#   IDLE_INSTALL_ROOT [/]   file-system root to install under (tests)
#   IDLE_INSTANCE_ID        this instance's id [IMDSv2 at IDLE_IMDS_URL
#                           (http://169.254.169.254)]; with MINUTES it must be
#                           known (the guard only ever runs on an EC2 host)
#   IDLE_NOW_S              the time recorded in last-seen [the clock]
#
# Output: one line per file or unit on stdout, saying what changed or that it
# was up to date; errors on stderr.
# Exit: 0 done (a rerun changes nothing but the last-seen time); 1 a step
# failed (named); 2 bad usage or MINUTES out of range (the message names
# hostIdleMinutes and the fix). Idempotent.
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

readonly PROG=idle-guard-install
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
readonly SERVICE=windows-arm64-image-idle.service
readonly TIMER=windows-arm64-image-idle.timer
readonly DEFAULT_MINUTES=45

usage() {
  log "$*"
  log "usage: idle-guard-install.sh MINUTES|off"
  exit 2
}

(($# == 1)) || usage "expected one argument (MINUTES or off), got $#"
arg=$1
if [[ $arg == off ]]; then
  enable=0
else
  enable=1
  if ! [[ $arg =~ ^[0-9]{1,5}$ ]] || ((10#$arg < 10 || 10#$arg > 1440)); then
    log "error: hostIdleMinutes must be a whole number of minutes from 10 to 1440, got '$arg'."
    log "Fix: pulumi config set windows-arm64-image:hostIdleMinutes 45 (10..1440), or set keepHostRunning: true to keep the host running."
    exit 2
  fi
  minutes=$((10#$arg))
fi

root_arg=${IDLE_INSTALL_ROOT:-/}
[[ -d $root_arg ]] || die "IDLE_INSTALL_ROOT $root_arg is not a directory"
root=$(cd "$root_arg" && pwd -P)
[[ $root != / ]] || root=
# "$root/etc/..." is /etc/... for ROOT=/.
if [[ -z $root && $EUID -ne 0 ]]; then
  die "must run as root to write /etc (the stage runs it with sudo -n)"
fi

service_src=$SCRIPT_DIR/../assets/$SERVICE
timer_src=$SCRIPT_DIR/../assets/$TIMER
for f in "$service_src" "$timer_src"; do
  [[ -f $f ]] || die "unit file $f not found (uploaded with the scripts to /opt/windows-arm64-image/assets)"
done
guard=$SCRIPT_DIR/idle-guard.sh
[[ -f $guard ]] || die "$guard not found"
bash -n "$guard" || die "$guard has a syntax error"

env_file=$root/etc/windows-arm64-image/idle.env
unit_dir=$root/etc/systemd/system

work=$(mktemp -d "${TMPDIR:-/tmp}/idle-guard-install.XXXXXX")
trap 'rm -rf -- "$work"' EXIT

# --- idle.env ----------------------------------------------------------------
if ((enable)); then
  host_id=${IDLE_INSTANCE_ID:-}
  if [[ -z $host_id ]]; then
    imds=${IDLE_IMDS_URL:-http://169.254.169.254}
    token=$(curl -fsS -m 3 -X PUT "$imds/latest/api/token" -H 'X-aws-ec2-metadata-token-ttl-seconds: 60' 2>/dev/null) || token=
    [[ -z $token ]] ||
      host_id=$(curl -fsS -m 3 -H "X-aws-ec2-metadata-token: $token" "$imds/latest/meta-data/instance-id" 2>/dev/null) || host_id=
  fi
  [[ -n $host_id ]] ||
    die "this host's EC2 instance id could not be read from the instance metadata (IMDSv2 at ${IDLE_IMDS_URL:-http://169.254.169.254}): the idle guard powers a host off and runs only on the EC2 build host, which it must name; use hostIdleMinutes on the aws target only"
  [[ $host_id =~ ^i-[0-9a-f]{8,17}$ ]] || die "'$host_id' is not an EC2 instance id"
else
  minutes=$DEFAULT_MINUTES
  if [[ -r $env_file ]]; then
    old=$(sed -n 's/^IDLE_MINUTES=\([0-9]\{1,5\}\)$/\1/p' "$env_file" | tail -n 1)
    [[ -z $old ]] || minutes=$((10#$old))
  fi
  host_id=
fi
{
  echo "# Written by idle-guard-install.sh (hostIdleMinutes, keepHostRunning); read by idle-guard.sh."
  echo "IDLE_MINUTES=$minutes"
  echo "IDLE_ENABLED=$enable"
  [[ -z $host_id ]] || echo "IDLE_HOST_ID=$host_id"
} >"$work/idle.env"

# Copies SRC to DST (mode 0644) through a temporary file unless DST is the same;
# sets changed=1 when it wrote.
install_file() { # SRC DST
  local src=$1 dst=$2 tmp
  if [[ -f $dst ]] && cmp -s -- "$src" "$dst"; then
    chmod 0644 -- "$dst"
    say "${dst#"$root"} is up to date"
    return 0
  fi
  mkdir -p -- "$(dirname -- "$dst")" || die "cannot create $(dirname -- "$dst")"
  tmp=$(mktemp "$dst.XXXXXX") || die "cannot write in $(dirname -- "$dst")"
  if ! { cp -- "$src" "$tmp" && chmod 0644 -- "$tmp" && mv -f -- "$tmp" "$dst"; }; then
    rm -f -- "$tmp"
    die "cannot write $dst"
  fi
  say "wrote ${dst#"$root"}"
  changed=1
}

install_file "$work/idle.env" "$env_file"
units_changed=0
timer_changed=0
changed=0
install_file "$service_src" "$unit_dir/$SERVICE"
((changed == 0)) || units_changed=1
changed=0
install_file "$timer_src" "$unit_dir/$TIMER"
((changed == 0)) || units_changed=1 timer_changed=1
if ((enable)); then
  # The guard counts idle time from now at the earliest, whatever ran before.
  state_dir=$root/var/lib/windows-arm64-image-idle
  install -d -m 0700 -- "$state_dir" || die "cannot create $state_dir"
  printf '%s %s\n' "${IDLE_NOW_S:-$(date +%s)}" "idle-guard-install" >"$work/last-seen"
  mv -f -- "$work/last-seen" "$state_dir/last-seen" || die "cannot write $state_dir/last-seen"
  say "IDLE_MINUTES=$minutes IDLE_ENABLED=1 IDLE_HOST_ID=$host_id: the host powers off after $minutes min with no stage and no login"
else
  say "IDLE_ENABLED=0: the idle guard never powers the host off (keepHostRunning)"
fi

# --- the timer -------------------------------------------------------------------
wants=$unit_dir/timers.target.wants/$TIMER
live=0
[[ -n $root || ! -d /run/systemd/system ]] || live=1

if ((live)); then
  if ((units_changed)); then
    systemctl daemon-reload || die "systemctl daemon-reload failed"
    say "systemd reloaded"
  fi
  if ((enable)); then
    if systemctl is-enabled --quiet "$TIMER" 2>/dev/null; then
      say "$TIMER was already enabled"
    else
      systemctl --quiet enable "$TIMER" || die "systemctl enable $TIMER failed"
      say "enabled $TIMER"
    fi
    if ((timer_changed)); then
      systemctl restart "$TIMER" || die "systemctl restart $TIMER failed"
      say "restarted $TIMER (its settings changed)"
    elif systemctl is-active --quiet "$TIMER"; then
      say "$TIMER is running"
    else
      systemctl start "$TIMER" || die "systemctl start $TIMER failed"
      say "started $TIMER"
    fi
  else
    if systemctl is-enabled --quiet "$TIMER" 2>/dev/null; then
      systemctl --quiet disable "$TIMER" || die "systemctl disable $TIMER failed"
      say "disabled $TIMER"
    else
      say "$TIMER was not enabled"
    fi
    if systemctl is-active --quiet "$TIMER"; then
      systemctl stop "$TIMER" || die "systemctl stop $TIMER failed"
      say "stopped $TIMER"
    else
      say "$TIMER is not running"
    fi
  fi
  exit 0
fi

# No running systemd here: the links only, effective at the next boot.
if command -v systemctl >/dev/null; then
  if ((enable)); then
    systemctl --root="${root:-/}" --quiet enable "$TIMER" 2>/dev/null || die "systemctl --root=${root:-/} enable $TIMER failed"
  else
    systemctl --root="${root:-/}" --quiet disable "$TIMER" 2>/dev/null || die "systemctl --root=${root:-/} disable $TIMER failed"
  fi
elif ((enable)); then
  mkdir -p -- "$(dirname -- "$wants")"
  ln -sfn -- "/etc/systemd/system/$TIMER" "$wants"
else
  rm -f -- "$wants"
fi
if ((enable)); then
  [[ -L $wants ]] || die "$TIMER is not enabled: ${wants#"$root"} is missing"
  say "enabled $TIMER under ${root:-/}; no running systemd here, so it could not be started (it starts at the next boot)"
else
  [[ ! -e $wants && ! -L $wants ]] || die "$TIMER is still enabled: ${wants#"$root"} exists"
  say "disabled $TIMER under ${root:-/}; no running systemd here, so nothing was stopped"
fi

#!/usr/bin/env bash
# screen-keeper.sh - keeps a rolling set of screenshots of the VM while it is
# being set up, and takes one more on demand when a stage fails.
#
# Usage: screen-keeper.sh start QMP_SOCKET DIR
#        screen-keeper.sh stop  QMP_SOCKET DIR
#        screen-keeper.sh shot  QMP_SOCKET DIR [LABEL]
#
#   QMP_SOCKET  the VM's QMP socket (/var/lib/windows-vm/qmp.sock); stop ignores it
#   DIR         the screenshots' folder (e.g. /var/lib/windows-vm/screens),
#               created when missing
#   LABEL       shot only: a word for the file name (default "shot"), e.g. the
#               stage that failed
#
# start   starts a background loop (detached from the calling session: setsid,
#         its output in DIR/screen-keeper.log) that saves
#         DIR/screen-<UTC time>.png (e.g. screen-20261201T200100Z.png) at once
#         and then every SCREEN_KEEPER_INTERVAL_S seconds, deleting all but
#         the newest SCREEN_KEEPER_KEEP of them. It records its pid in
#         DIR/screen-keeper.pid and ends by itself after SCREEN_KEEPER_MAX_S,
#         or when QEMU has not answered for SCREEN_KEEPER_GIVE_UP screenshots
#         in a row (the VM is gone). Idempotent: a keeper already running for
#         this DIR and socket is left alone (one for another socket is
#         replaced).
# stop    stops that loop and waits for it (SIGTERM, SIGKILL after 15 s);
#         a no-op when none runs. The screenshots stay.
# shot    takes one screenshot now, DIR/failure-<UTC time>-<LABEL>.png, and
#         prints vm-screenshot.sh's lines (its path, and the fetch hint when
#         SCREENSHOT_FETCH_HINT is set); keeps the newest SCREEN_KEEPER_KEEP
#         failure-*.png (the rolling screen-*.png are never these).
#
# Env (all optional):
#   SCREEN_KEEPER_INTERVAL_S  seconds between screenshots (default 60)
#   SCREEN_KEEPER_KEEP        screenshots kept (default 30)
#   SCREEN_KEEPER_MAX_S       lifetime of the loop in seconds (default 21600, 6 h)
#   SCREEN_KEEPER_GIVE_UP     unanswered screenshots in a row that end it (default 10)
#   SCREENSHOT_FETCH_HINT     see vm-screenshot.sh (shot)
#
# Needs vm-screenshot.sh beside it, flock and setsid (util-linux).
#
# Output: one line on stdout saying what happened ("screen keeper started
# (pid N) ...", "... already running (pid N) ...", "screen keeper stopped ...",
# "no screen keeper running ..."); for shot, vm-screenshot.sh's stdout.
# Exit: 0 done; 1 failure (named: the loop did not start, could not be
# stopped; for shot, vm-screenshot.sh's code: 1 no PNG, 3 QEMU not reachable);
# 2 bad arguments.
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source=SCRIPTDIR/lib.sh
source "$here/lib.sh"

readonly PROG="screen-keeper"
usage() {
  log "$*"
  log "usage: screen-keeper.sh start|stop QMP_SOCKET DIR   or   screen-keeper.sh shot QMP_SOCKET DIR [LABEL]"
  exit 2
}

(($# >= 3)) || usage "expected a command, QMP_SOCKET and DIR, got $# arguments"
cmd=$1 sock=$2 dir=$3
case $cmd in
  start | stop | _loop) (($# == 3)) || usage "$cmd takes QMP_SOCKET and DIR, got $(($# - 1)) arguments" ;;
  shot) (($# <= 4)) || usage "shot takes QMP_SOCKET, DIR and LABEL at most" ;;
  *) usage "unknown command '$cmd'" ;;
esac
label=${4:-shot}
[[ $label =~ ^[A-Za-z0-9._-]{1,40}$ ]] || usage "LABEL '$label' is not a word (letters, digits, . _ -)"
[[ -n $sock && -n $dir ]] || usage "QMP_SOCKET and DIR must not be empty"
positive() { # NAME VALUE
  [[ $2 =~ ^[1-9][0-9]*$ ]] || usage "$1='$2' is not a positive whole number"
}
interval=${SCREEN_KEEPER_INTERVAL_S:-60}
keep=${SCREEN_KEEPER_KEEP:-30}
max_s=${SCREEN_KEEPER_MAX_S:-21600}
give_up=${SCREEN_KEEPER_GIVE_UP:-10}
positive SCREEN_KEEPER_INTERVAL_S "$interval"
positive SCREEN_KEEPER_KEEP "$keep"
positive SCREEN_KEEPER_MAX_S "$max_s"
positive SCREEN_KEEPER_GIVE_UP "$give_up"
shooter="$here/vm-screenshot.sh"
[[ -f $shooter ]] || die "vm-screenshot.sh is missing beside this script ($shooter)"

mkdir -p -- "$dir" || die "cannot create the folder $dir"
dir=$(cd -- "$dir" && pwd -P)
[[ $sock == /* ]] || sock="$PWD/$sock"
pid_file="$dir/screen-keeper.pid"
log_file="$dir/screen-keeper.log"

utc() { date -u +%Y%m%dT%H%M%SZ; }

# prune PREFIX N: deletes all but the newest N DIR/PREFIX-*.png (the UTC time
# in the names sorts them).
prune() {
  local -a files
  local n i
  mapfile -t files < <(find "$dir" -maxdepth 1 -type f -name "$1-*.png" -printf '%f\n' | LC_ALL=C sort)
  n=${#files[@]}
  for ((i = 0; i < n - $2; i++)); do
    rm -f -- "${dir:?}/${files[i]}"
  done
}

# keeper_pid: the pid of the loop recorded for DIR, when it is alive.
keeper_pid() {
  local pid
  [[ -s $pid_file ]] || return 1
  pid=$(tr -dc '0-9' 2>/dev/null <"$pid_file")
  [[ -n $pid ]] && alive "$pid" || return 1
  tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q "screen-keeper.sh _loop " || return 1
  printf '%s\n' "$pid"
}

count() { find "$dir" -maxdepth 1 -type f -name 'screen-*.png' | wc -l; }

if [[ $cmd == shot ]]; then
  rc=0
  bash "$shooter" "$sock" "$dir/failure-$(utc)-$label.png" || rc=$?
  prune failure "$keep"
  exit "$rc"
fi

if [[ $cmd == _loop ]]; then
  # The background loop (started by "start"; not meant to be run by hand).
  # Holds no pipe or socket inherited from its starter (a remote session or a
  # stage's output pipe would otherwise stay open for hours).
  for link in /proc/"$BASHPID"/fd/*; do
    fd=${link##*/}
    [[ $fd =~ ^[0-9]+$ ]] || continue
    ((fd > 2)) || continue
    case $(readlink "$link" 2>/dev/null) in pipe:* | socket:*) eval "exec $fd>&-" ;; esac
  done
  printf '%s\n' "$BASHPID" >"$pid_file.tmp"
  mv -f -- "$pid_file.tmp" "$pid_file"
  stopping=0 sleeper=""
  trap 'stopping=1; [[ -z $sleeper ]] || kill "$sleeper" 2>/dev/null || true' TERM INT
  trap '' HUP
  finish() {
    [[ $(tr -dc '0-9' 2>/dev/null <"$pid_file") != "$BASHPID" ]] || rm -f -- "$pid_file"
    log "$(utc) $*; $(count) screenshot(s) in $dir"
    exit 0
  }
  log "$(utc) started: every ${interval}s, the newest $keep kept, for at most ${max_s}s"
  start=$SECONDS unanswered=0
  while ((stopping == 0)); do
    ((SECONDS - start < max_s)) || finish "lifetime of ${max_s}s reached: ending"
    # The log stays small however long the loop runs.
    if [[ -f $log_file ]] && (($(stat -c %s -- "$log_file") > 262144)); then
      tail -n 200 -- "$log_file" >"$log_file.tmp" && mv -f -- "$log_file.tmp" "$log_file"
    fi
    tick=$SECONDS rc=0
    prune screen $((keep - 1)) # room for this one: never more than $keep
    out=$(bash "$shooter" "$sock" "$dir/screen-$(utc).png" 2>&1) || rc=$?
    if ((rc == 0)); then
      unanswered=0
    else
      log "$(utc) no screenshot (exit $rc): $(printf '%s' "$out" | tail -n 1 | cut -c1-300)"
      # The screenshot script or the folder gone (the VM folder removed): nothing more to keep.
      [[ -f $shooter && -d $dir ]] || finish "$shooter or $dir is gone: ending"
      if ((rc == 3)); then
        unanswered=$((unanswered + 1))
        ((unanswered < give_up)) || finish "QEMU did not answer $unanswered times in a row (the VM is gone?): ending"
      fi
    fi
    ((stopping == 0)) || break
    wait_s=$((interval - (SECONDS - tick)))
    ((wait_s > 0)) || wait_s=1
    sleep "$wait_s" &
    sleeper=$!
    wait "$sleeper" 2>/dev/null || true
    sleeper=""
  done
  finish "stopped"
fi

# start and stop: one at a time per DIR.
exec {lock_fd}>"$dir/.screen-keeper.lock"
timeout 30 flock "$lock_fd" || die "another screen-keeper.sh start/stop on $dir did not finish within 30s"

stop_keeper() { # PID
  local i
  kill -TERM "$1" 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do
    alive "$1" || break
    sleep 0.1
  done
  if alive "$1"; then
    log "the keeper (pid $1) did not stop within 15s: killing it"
    kill -KILL "$1" 2>/dev/null || true
    sleep 0.5
    ! alive "$1" || die "the screen keeper (pid $1) could not be stopped"
  fi
  rm -f -- "$pid_file"
}

if [[ $cmd == stop ]]; then
  if pid=$(keeper_pid); then
    stop_keeper "$pid"
    say "screen keeper stopped (pid $pid); $(count) screenshot(s) in $dir"
  else
    rm -f -- "$pid_file"
    say "no screen keeper running for $dir; $(count) screenshot(s) there"
  fi
  exit 0
fi

# start
if pid=$(keeper_pid); then
  if tr '\0' '\n' 2>/dev/null <"/proc/$pid/cmdline" | grep -qxF -- "$sock"; then
    say "screen keeper already running (pid $pid) for $sock; screenshots in $dir"
    exit 0
  fi
  log "a keeper for another QMP socket runs for $dir (pid $pid): replacing it"
  stop_keeper "$pid"
fi
rm -f -- "$pid_file"
[[ -S $sock ]] || log "warning: no QMP socket at $sock yet: the keeper logs each miss and ends after $give_up in a row"
command -v setsid >/dev/null 2>&1 || die "setsid (util-linux) not found"
# Detached: its own session, no terminal, nothing shared with the caller's
# output (a remote command returns while the loop runs on).
SCREEN_KEEPER_INTERVAL_S=$interval SCREEN_KEEPER_KEEP=$keep SCREEN_KEEPER_MAX_S=$max_s SCREEN_KEEPER_GIVE_UP=$give_up \
  setsid bash "$here/screen-keeper.sh" _loop "$sock" "$dir" </dev/null >>"$log_file" 2>&1 {lock_fd}>&- &
for _ in $(seq 1 100); do
  pid=$(keeper_pid) && break
  sleep 0.1
done
[[ -n ${pid:-} ]] || die "the keeper loop did not start; see $log_file: $(tail -n 3 -- "$log_file" 2>/dev/null | tr '\n' ' ')"
say "screen keeper started (pid $pid): a screenshot every ${interval}s in $dir (screen-<UTC time>.png, the newest $keep kept) for at most ${max_s}s; log: $log_file"

#!/usr/bin/env bash
# stage.sh - runs one pipeline stage's command, bounded in time, its output kept readable.
#
# Usage: stage.sh STAGE_ID TIMEOUT_S WHAT COMMAND
#
#   STAGE_ID   the stage, [A-Za-z][A-Za-z0-9]* (e.g. fetchImage)
#   TIMEOUT_S  the stage's host-side bound in seconds (a positive whole number)
#   WHAT       what the stage waits for, named when it times out
#              (e.g. "the Windows image download")
#   COMMAND    a bash command string, run as `bash -c COMMAND`
#
# Runs on the build host (as root: sudo -n env STAGE_RUN_DIR=... bash
# stage.sh ...) or, for the local target, on the machine running Pulumi.
#
# Bounded: COMMAND runs under `timeout --kill-after=60 TIMEOUT_S`, which puts
# it in a process group of its own: at the bound the whole group gets SIGTERM,
# and SIGKILL 60 s later. SIGTERM, SIGINT or SIGHUP to stage.sh end the group
# the same way (SIGKILL after 10 s). If stage.sh itself is killed (SIGKILL),
# a watcher process ends the group, removes the marker and records the
# activity within about a second. A process that detaches (setsid) and
# redirects its output, like the VM that start-vm.sh starts, keeps running;
# one left in the group that still holds the stage's output is ended 5 s
# after the command exits.
#
# Stdin is passed to COMMAND unchanged (it may carry a secret: stage.sh never
# reads, logs or stores it). COMMAND is never printed either.
#
# Output: COMMAND's stdout on stdout and its stderr on stderr, streamed as it
# comes (each piece flushed at once) and line by line; a line longer than 4000
# bytes is cut to 4000 bytes (less when that would split a UTF-8 character)
# followed by " …[cut N bytes]" (N: the bytes left out), so no reader ever
# meets a line over 4 KiB. A last line without a newline gets one. stage.sh's
# own lines go to stderr:
#   stage <STAGE_ID>: start (bound <N> min)
#   stage <STAGE_ID>: still running after <M> min (bound <N> min)   [every STAGE_PROGRESS_S;
#                     "<S> s" in the first two minutes]
#   stage <STAGE_ID>: done in <S> s
#   stage <STAGE_ID>: failed with exit code <c>
#   stage <STAGE_ID>: timed out after <N> min (host-side bound) waiting for <WHAT>
# (<N> min: TIMEOUT_S / 60, with up to two decimals when not whole; <S>: one
# decimal.) When the output can no longer be written (the SSH session or
# Pulumi went away), the next line written finds out: the stage is ended as
# on SIGHUP. The progress line makes sure that happens within
# STAGE_PROGRESS_S even for a quiet command.
#
# For the idle guard (idle-guard.sh): while the stage runs, the marker
# $STAGE_RUN_DIR/<STAGE_ID>.<pid of stage.sh> holds that pid on one line; it is
# removed on every exit path. $STAGE_STATE_DIR/last-activity is rewritten (its
# first line: STAGE_ID) at the start and at the end.
#
# Env (defaults in brackets):
#   STAGE_RUN_DIR [/run/windows-arm64-image/stages]  created 0755 if missing
#   STAGE_STATE_DIR [/var/lib/windows-arm64-image]    created if missing
#   STAGE_PROGRESS_S [60]  seconds between "still running" lines
# Needs bash 4.1+, coreutils timeout, perl (the line filter).
#
# Exit: COMMAND's exit code (0 done); 124 the bound was reached; 129, 130 or
#   143 stopped by SIGHUP (or lost output), SIGINT or SIGTERM; 2 bad usage.
# Idempotent as far as COMMAND is: stage.sh itself keeps no state between runs.
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PROG="stage"
usage() {
  log "$*"
  log "usage: stage.sh STAGE_ID TIMEOUT_S WHAT COMMAND"
  exit 2
}

(($# == 4)) || usage "expected 4 arguments, got $#"
stage_id=$1 timeout_s=$2 what=$3 command=$4
[[ $stage_id =~ ^[A-Za-z][A-Za-z0-9]*$ ]] || usage "STAGE_ID='${stage_id:0:60}' is not a stage id ([A-Za-z][A-Za-z0-9]*)"
[[ $timeout_s =~ ^[1-9][0-9]{0,6}$ ]] || usage "TIMEOUT_S='${timeout_s:0:20}' is not a positive whole number of seconds"
[[ -n $what && $what != *$'\n'* && ${#what} -le 300 ]] || usage "WHAT must be a short phrase on one line"
[[ -n $command ]] || usage "COMMAND is empty"
progress_s=${STAGE_PROGRESS_S:-60}
[[ $progress_s =~ ^[1-9][0-9]*$ ]] || usage "STAGE_PROGRESS_S='$progress_s' is not a positive number"
PROG="stage $stage_id"
command -v timeout >/dev/null || die "coreutils timeout is not installed: it bounds the stage"
command -v perl >/dev/null || die "perl is not installed: it filters the stage's output"
run_dir=${STAGE_RUN_DIR:-/run/windows-arm64-image/stages}
state_dir=${STAGE_STATE_DIR:-/var/lib/windows-arm64-image}

# TIMEOUT_S as minutes: whole when it is, else with up to two decimals.
minutes() {
  local s=$1 frac
  if ((s % 60 == 0)); then
    printf '%d' $((s / 60))
  else
    frac=$(((s % 60) * 100 / 60))
    ((frac > 0)) || frac=1
    printf '%d.%02d' $((s / 60)) "$frac" | sed 's/0$//'
  fi
}
bound="$(minutes "$timeout_s") min"

# The line filter: stdin to stdout, streamed, long lines cut. When its output
# is gone (EPIPE) it tells stage.sh (SIGHUP) and stops.
# shellcheck disable=SC2016 # perl code
readonly filter='
  use strict; use warnings;
  my ($max, $boss) = @ARGV;
  $SIG{PIPE} = "IGNORE";
  binmode STDIN; binmode STDOUT; $| = 1;
  my ($len, $cut, $buf) = (0, 0, "");
  sub out { print STDOUT @_ or do { kill "HUP", $boss; exit 1 } }
  sub endline { out($cut ? " \xe2\x80\xa6[cut $cut bytes]\n" : "\n"); ($len, $cut) = (0, 0) }
  while (1) {
    my $n = sysread(STDIN, $buf, 65536);
    if (!defined $n) { next if $!{EINTR}; last }
    last if $n == 0;
    my $pos = 0;
    while ($pos < $n) {
      my $nl = index($buf, "\n", $pos);
      my $end = $nl < 0 ? $n : $nl;
      my $seg = $end - $pos;
      my $room = $max - $len;
      my $take = $seg < $room ? $seg : $room;
      if ($take < $seg) {
        # Never split a UTF-8 character: back off over continuation bytes.
        $take-- while $take > 0 && (ord(substr($buf, $pos + $take, 1)) & 0xC0) == 0x80;
      }
      if ($take > 0) { out(substr($buf, $pos, $take)); $len += $take }
      if ($take < $seg) { $cut += $seg - $take; $len = $max }
      last if $nl < 0;
      endline();
      $pos = $nl + 1;
    }
  }
  endline() if $len || $cut;
'

marker="$run_dir/$stage_id.$$"
cmd_pid="" watch_pid="" out_pid="" err_pid="" finished=0

record_activity() { printf '%s\n' "$stage_id" >"$state_dir/last-activity" 2>/dev/null || true; }

cleanup() {
  [[ -z $watch_pid ]] || kill -TERM "$watch_pid" 2>/dev/null || true
  for p in $out_pid $err_pid; do
    if alive "$p"; then kill -TERM "$p" 2>/dev/null || true; fi
  done
  rm -f -- "$marker"
  record_activity
}

# kill_group SIG: the command's process group (and timeout itself, in case it
# has not made its group yet).
kill_group() {
  [[ -n $cmd_pid ]] || return 0
  kill "-$1" -- "-$cmd_pid" 2>/dev/null || true
  kill "-$1" "$cmd_pid" 2>/dev/null || true
}

# wait_gone SECONDS PID...: true once none of the PIDs is alive.
wait_gone() {
  local deadline=$(($(now_ms) + $1 * 1000)) p busy
  shift
  while :; do
    busy=0
    for p in "$@"; do if [[ -n $p ]] && alive "$p"; then busy=1; fi; done
    ((busy)) || return 0
    (($(now_ms) < deadline)) || return 1
    sleep 0.05
  done
}

on_signal() { # NAME CODE
  trap '' HUP INT TERM
  if ((!finished)) && [[ -n $cmd_pid ]]; then
    kill_group TERM
    wait_gone 10 "$cmd_pid" || kill_group KILL
    wait_gone 2 "$out_pid" "$err_pid" || true
  fi
  if [[ $1 == HUP ]]; then
    log "stopped: SIGHUP or the stage's output is gone (the SSH session or Pulumi went away); the command was ended" || true
  else
    log "stopped by SIG$1; the command was ended" || true
  fi
  exit "$2"
}

trap cleanup EXIT
trap 'on_signal HUP 129' HUP
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
# A handler (not "ignore"), so the command still gets the default SIGPIPE.
trap ':' PIPE

if [[ ! -d $run_dir ]]; then
  { mkdir -p -- "$run_dir" && chmod 0755 -- "$run_dir"; } || die "cannot create STAGE_RUN_DIR=$run_dir"
fi
mkdir -p -- "$state_dir" || die "cannot create STAGE_STATE_DIR=$state_dir"
printf '%s\n' "$$" >"$marker" || die "cannot write the stage marker $marker"
record_activity
log "start (bound $bound)"
start_ms=$(now_ms)

exec {in_fd}<&0
exec {out_fd}> >(exec {in_fd}<&- && exec perl -e "$filter" 4000 "$$")
out_pid=$!
exec {err_fd}> >(exec {in_fd}<&- {out_fd}>&- && exec perl -e "$filter" 4000 "$$" >&2)
err_pid=$!
timeout --kill-after=60 "$timeout_s" bash -c "$command" <&"$in_fd" >&"$out_fd" 2>&"$err_fd" {in_fd}<&- {out_fd}>&- {err_fd}>&- &
cmd_pid=$!
exec {in_fd}<&- {out_fd}>&- {err_fd}>&-

# The watcher: progress lines, lost output, and stage.sh killed outright.
(
  trap '' PIPE
  exec </dev/null >/dev/null
  owner=$$ next=$progress_s t0=$SECONDS
  while sleep 1; do
    if ! kill -0 "$owner"; then
      kill -TERM -- "-$cmd_pid" || true
      for _ in {1..100}; do
        alive "$cmd_pid" || break
        sleep 0.1
      done
      kill -KILL -- "-$cmd_pid" || true
      rm -f -- "$marker"
      record_activity
      exit 0
    fi
    if ((SECONDS - t0 >= next)); then
      t=$((SECONDS - t0))
      if ((t >= 120)); then t="$((t / 60)) min"; else t="$t s"; fi
      printf 'stage %s: still running after %s (bound %s)\n' "$stage_id" "$t" "$bound" >&3 ||
        { kill -HUP "$owner"; exit 0; }
      next=$((next + progress_s))
    fi
  done
) 3>&2 2>/dev/null &
watch_pid=$!

rc=0
wait "$cmd_pid" || rc=$?
finished=1
elapsed_ms=$(($(now_ms) - start_ms))

# Let the filters pass on the last lines. Something left in the group that
# still holds the output would keep them (and the caller) waiting: end it.
if ! wait_gone 5 "$out_pid" "$err_pid"; then
  log "a process the command left behind still holds the stage's output: ending the command's process group"
  kill_group TERM
  wait_gone 5 "$out_pid" "$err_pid" || {
    kill_group KILL
    wait_gone 2 "$out_pid" "$err_pid" || true
  }
fi

if ((rc == 124 || rc == 137)) && ((elapsed_ms >= timeout_s * 1000 - 100)); then
  log "timed out after $bound (host-side bound) waiting for $what"
  exit 124
fi
if ((rc != 0)); then
  log "failed with exit code $rc"
  exit "$rc"
fi
log "done in $((elapsed_ms / 1000)).$((elapsed_ms % 1000 / 100)) s"

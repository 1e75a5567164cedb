#!/usr/bin/env bash
# ssh-key.sh - an SSH private key read from stdin into a private ssh-agent; sourced, never run.
#
# Usage (from host-exec.sh and guest-run.sh, after lib.sh):
#   # shellcheck source=provisioning/ssh-key.sh
#   source "$lib_dir/ssh-key.sh"
#   read_private_key       # stdin: the PEM block, up to and including its END line
#   start_private_agent    # the key into a private agent; exports SSH_AUTH_SOCK
#   note_agent_child PID   # a process the watcher ends if the caller is killed
#   stop_private_agent     # the agent killed, its folder removed (idempotent)
#
# read_private_key reads stdin one line at a time, so nothing after the key's
# END line is consumed: the rest of stdin (the payload) stays for the caller.
# It accepts "-----BEGIN <LABEL> PRIVATE KEY-----" (OPENSSH, RSA, EC or none,
# a CR at line ends ignored, blank lines before it skipped) and wants the END
# line with the same label, ended by a newline. It never prints a line of the
# key. The key is held in SSH_KEY_PEM (a shell variable) until
# start_private_agent hands it to `ssh-add -` through a pipe and clears it: it
# is never written to a file.
#
# start_private_agent runs `ssh-agent -a <mktemp -d dir, 0700>/agent` and a
# watcher process: when the calling script ends without its cleanup (killed
# by SIGKILL), the watcher ends the noted child (an ssh), the agent and
# removes the folder within about a second. The caller runs
# stop_private_agent from its EXIT trap.
#
# Portable to bash 3.2 (an operator's Mac runs host-exec.sh): no {fd}
# redirections, no associative arrays, no here-strings (bash before 5.1 puts
# a here-string in a temporary file).
# Needs PROG, log and die (lib.sh), ssh-agent and ssh-add.

SSH_KEY_PEM=""
SSH_AGENT_DIR=""
SSH_AGENT_PID_OF_KEY=""
SSH_AGENT_WATCH_PID=""

read_private_key() {
  local line label="" n=0 begin_re end end_re
  begin_re='^-----BEGIN (([A-Z0-9]+ )*)PRIVATE KEY-----$'
  end_re='^-----END (([A-Z0-9]+ )*)PRIVATE KEY-----'
  SSH_KEY_PEM=""
  while :; do
    line=""
    if ! IFS= read -r line; then
      # A last line without its newline still counts only if it is the END line.
      [[ -n $label && -n $line ]] || die "stdin ended before a whole private key: it must start with a '-----BEGIN ... PRIVATE KEY-----' block, the payload after its END line"
    fi
    line=${line%$'\r'}
    n=$((n + 1))
    ((n <= 400)) || die "no END line within 400 lines of stdin: stdin must start with an SSH private key (PEM)"
    if [[ -z $label ]]; then
      [[ $line =~ ^[[:space:]]*$ ]] && continue
      [[ $line =~ $begin_re ]] || die "stdin does not start with an SSH private key: expected a '-----BEGIN ... PRIVATE KEY-----' line first"
      label=${BASH_REMATCH[1]}
      SSH_KEY_PEM="$line"$'\n'
      continue
    fi
    end="-----END ${label}PRIVATE KEY-----"
    if [[ $line == "$end" ]]; then
      SSH_KEY_PEM="$SSH_KEY_PEM$line"$'\n'
      return 0
    fi
    if [[ $line =~ $end_re ]]; then
      [[ $line == "$end"* ]] && die "the private key's END line goes on after the marker: end the key with a newline before the payload"
      die "the private key's END line does not match its BEGIN line (${label}PRIVATE KEY)"
    fi
    SSH_KEY_PEM="$SSH_KEY_PEM$line"$'\n'
  done
}

start_private_agent() {
  local base=${TMPDIR:-/tmp} out owner=$$
  # A Unix socket path must stay under ~104 bytes.
  ((${#base} <= 60)) || base=/tmp
  SSH_AGENT_DIR=$(mktemp -d "${base%/}/ssh-key.XXXXXX") || die "cannot create a private folder for the ssh-agent under $base"
  chmod 700 "$SSH_AGENT_DIR"
  out=$(ssh-agent -s -a "$SSH_AGENT_DIR/agent" 2>&1) || die "ssh-agent did not start: ${out//$'\n'/ }"
  SSH_AGENT_PID_OF_KEY=$(printf '%s\n' "$out" | sed -n 's/^SSH_AGENT_PID=\([0-9][0-9]*\);.*/\1/p')
  [[ -n $SSH_AGENT_PID_OF_KEY ]] || die "ssh-agent did not say its pid: ${out//$'\n'/ }"
  export SSH_AUTH_SOCK="$SSH_AGENT_DIR/agent"
  unset SSH_AGENT_PID
  # The watcher holds none of the caller's streams, so it never keeps a pipe open.
  (
    trap '' HUP INT
    while kill -0 "$owner" 2>/dev/null; do sleep 1; done
    child=$(cat "$SSH_AGENT_DIR/child.pid" 2>/dev/null || true)
    [[ -z $child ]] || kill -TERM "$child" 2>/dev/null || true
    kill -TERM "$SSH_AGENT_PID_OF_KEY" 2>/dev/null || true
    rm -rf -- "$SSH_AGENT_DIR"
  ) </dev/null >/dev/null 2>&1 &
  SSH_AGENT_WATCH_PID=$!
  # A passphrase would be asked for on a terminal: refuse instead.
  out=$(printf '%s' "$SSH_KEY_PEM" | SSH_ASKPASS_REQUIRE=never DISPLAY="" ssh-add -q - 2>&1) ||
    die "ssh-add refused the private key on stdin (${out//$'\n'/ }); it must be an unencrypted OpenSSH or PEM private key"
  SSH_KEY_PEM=""
}

note_agent_child() {
  [[ -z $SSH_AGENT_DIR ]] || printf '%s\n' "$1" >"$SSH_AGENT_DIR/child.pid"
}

stop_private_agent() {
  [[ -z $SSH_AGENT_WATCH_PID ]] || kill -TERM "$SSH_AGENT_WATCH_PID" 2>/dev/null || true
  [[ -z $SSH_AGENT_PID_OF_KEY ]] || kill -TERM "$SSH_AGENT_PID_OF_KEY" 2>/dev/null || true
  [[ -z $SSH_AGENT_DIR ]] || rm -rf -- "$SSH_AGENT_DIR"
  SSH_AGENT_WATCH_PID="" SSH_AGENT_PID_OF_KEY="" SSH_AGENT_DIR="" SSH_KEY_PEM=""
}

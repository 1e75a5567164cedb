#!/usr/bin/env bash
# lanes.sh - `npm test`: every check and test suite, the slow ones in parallel lanes.
#
# Usage:  bash test/lanes.sh            (from npm test; run as root, like scripts/setup.sh)
# Env:    LANES_SERIAL=1  run the lanes one after another instead (same commands)
#         LANES_LOG_DIR   where each lane's output is kept (default <repo>/.cache/lanes)
#
# 1. The fixtures every lane shares (the stand-in guest), built once.
# 2. The lanes, all at once (the first: the checks, build (tsc), lint and shellcheck, which
#    need no fixture), each in a network namespace of its own (`unshare --net`, with
#    only its loopback up): the lifecycle's local target and its aws plan both forward the
#    guest's SSH to 127.0.0.1:2222 and VNC to display 3, as a real host does, and a namespace
#    per lane lets them do so side by side. Output goes to LANES_LOG_DIR/<lane>.log and is
#    printed whole when the lane ends; a line a minute names the lanes still running.
#    START_VM_SYSTEMD=0: a VM started by a test stays in its lane's namespace (a systemd
#    transient unit would run in the host's).
# Exit: 0 when every step and lane passed; otherwise 1, after every lane has ended, naming
# the lanes that failed. The last line is "lanes: all N passed in S s" or
# "lanes: failed: <lane> ...".
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
LOG_DIR=${LANES_LOG_DIR:-$REPO/.cache/lanes}
mkdir -p "$LOG_DIR"
export PATH="$HOME/.dotnet/tools:$REPO/node_modules/.bin:$PATH"
export START_VM_SYSTEMD=0
t_start=$SECONDS

step() {
  local t0=$SECONDS
  echo "==> $*"
  "$@"
  echo "==> $1 ... done in $((SECONDS - t0)) s"
}

# The lanes: name, then the command (a string for bash -c).
# The longest first. publish.test.ts is the longest script test file: its S3 half and the
# rest (folders, the fault table) have a lane each; the other script tests share a lane,
# two files at a time.
LANES=(
  checks "npm run --silent build && npm run --silent lint && npm run --silent shellcheck"
  publish-s3 "mocha --timeout 600000 -g 'publish-image.sh to S3' test/scripts/publish.test.ts"
  publish-other "mocha --timeout 600000 -g 'publish-image.sh to S3' --invert test/scripts/publish.test.ts"
  lifecycle-local "LIFECYCLE_PART=local mocha --timeout 3600000 -g 'local target' test/lifecycle/lifecycle.test.ts"
  lifecycle-aws "LIFECYCLE_PART=aws mocha --timeout 3600000 -g 'aws plan' test/lifecycle/lifecycle.test.ts"
  e2e "mocha --timeout 900000 'test/e2e/**/*.test.ts'"
  scripts "mocha --parallel --jobs 2 --timeout 600000 --ignore test/scripts/publish.test.ts 'test/scripts/**/*.test.ts'"
  pwsh "bash test/pwsh/run.sh"
  unit "mocha 'test/unit/**/*.test.ts'"
)

step bash test/fixtures/build-standin-guest.sh "$REPO/.cache/standin-guest"

# The scripts call `aws` hundreds of times. Where `aws` is a pyenv shim, each call also runs
# pyenv's own bash scripts (about 0.4 s of CPU); the tests call the executable it resolves to.
if real_aws=$(pyenv which aws 2>/dev/null) && [[ -x $real_aws ]]; then
  mkdir -p "$LOG_DIR/bin"
  ln -sfn "$real_aws" "$LOG_DIR/bin/aws"
  export PATH="$LOG_DIR/bin:$PATH"
  echo "==> aws: $real_aws (resolved from the pyenv shim)"
fi

isolate=1
if ! unshare --net true 2>/dev/null; then
  echo "lanes: cannot create a network namespace here (unshare --net needs root): running the lanes one after another"
  isolate=0
fi
[[ ${LANES_SERIAL:-0} == 1 ]] && isolate=0

# run_lane NAME COMMAND: runs COMMAND (in its own network namespace when isolated) into the lane's log.
run_lane() {
  local name=$1 cmd=$2 log="$LOG_DIR/$1.log" t0=$SECONDS rc=0
  {
    echo "lane $name: $cmd"
    if ((isolate)); then
      # shellcheck disable=SC2016 # $1 is expanded by the inner bash
      unshare --net bash -c 'ip link set lo up && eval "$1"' lane "$cmd" || rc=$?
    else
      bash -c "$cmd" || rc=$?
    fi
    echo "lane $name: exit $rc after $((SECONDS - t0)) s"
  } >"$log" 2>&1 </dev/null
  return "$rc"
}

declare -A PID=() RC=()
names=()
# Each lane in a process group of its own, so an interrupted run ends every lane's processes.
set -m
on_signal() {
  echo "lanes: interrupted: stopping ${!PID[*]}"
  for name in "${!PID[@]}"; do kill -TERM -- "-${PID[$name]}" 2>/dev/null || true; done
  exit 130
}
trap on_signal INT TERM HUP
for ((i = 0; i < ${#LANES[@]}; i += 2)); do
  name=${LANES[i]}
  names+=("$name")
  if ((isolate)); then
    run_lane "$name" "${LANES[i + 1]}" &
    PID[$name]=$!
  else
    echo "==> lane $name"
    run_lane "$name" "${LANES[i + 1]}" && RC[$name]=0 || RC[$name]=$?
    cat "$LOG_DIR/$name.log"
  fi
done

if ((isolate)); then
  echo "==> lanes started: ${names[*]} (logs in $LOG_DIR)"
  t_lanes=$SECONDS
  while ((${#PID[@]} > 0)); do
    for name in "${!PID[@]}"; do
      if ! kill -0 "${PID[$name]}" 2>/dev/null; then
        wait "${PID[$name]}" && RC[$name]=0 || RC[$name]=$?
        unset "PID[$name]"
        echo
        echo "==> lane $name ended (exit ${RC[$name]}, $((SECONDS - t_lanes)) s after the start):"
        cat "$LOG_DIR/$name.log"
      fi
    done
    ((${#PID[@]} == 0)) && break
    for ((w = 0; w < 60 && ${#PID[@]} > 0; w++)); do
      sleep 1
      for name in "${!PID[@]}"; do kill -0 "${PID[$name]}" 2>/dev/null || break 2; done
    done
    ((w >= 60)) && echo "lanes: still running after $((SECONDS - t_lanes)) s: ${!PID[*]}"
  done
fi

# The lifecycle's two parts each end with "lifecycle: N scenarios passed"; this is their sum.
total=0
for part in lifecycle-local lifecycle-aws; do
  n=$(sed -n 's/^lifecycle: \([0-9][0-9]*\) scenarios passed$/\1/p' "$LOG_DIR/$part.log" | tail -n1)
  total=$((total + ${n:-0}))
done
echo
echo "lifecycle: $total scenarios passed"

failed=()
for name in "${names[@]}"; do [[ ${RC[$name]} == 0 ]] || failed+=("$name"); done
# The failures of every failed lane once more, at the end: a log cut to its last part (CI
# keeps the tail) still shows why each lane failed, not only the lanes that ended last.
for name in "${failed[@]}"; do
  echo
  echo "==> lane $name failed; its failures:"
  log="$LOG_DIR/$name.log"
  from=$(grep -n -E '^  [0-9]+ failing$|^failed tests:$' "$log" | tail -n1 | cut -d: -f1 || true)
  if [[ -n $from ]]; then
    tail -n "+$from" "$log" | head -n 150 | cut -c1-400
  else
    tail -n 40 "$log" | cut -c1-400
  fi
done
if ((${#failed[@]})); then
  echo "lanes: failed: ${failed[*]} (total $((SECONDS - t_start)) s)"
  exit 1
fi
echo "lanes: all ${#names[@]} passed in $((SECONDS - t_start)) s"

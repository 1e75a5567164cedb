#!/usr/bin/env bash
# The stand-in build host: an sshd on 127.0.0.1:$FAKE_HOST_PORT in its own
# mount namespace, where the AWS layout's folders (/opt/windows-arm64-image,
# /var/lib/windows-vm, ...) are bind mounts of folders under $FAKE_HOST_ROOT
# (its "EBS volume": kept across stops). `start` boots it; `stop` powers it
# off: every process in its namespace (sshd, stages, QEMU) is killed.
# Usage: host.sh start|stop ID
set -euo pipefail
d=${FAKE_AWS_DIR:?}
root=${FAKE_HOST_ROOT:?}
action=$1 id=$2
inst=$d/instances/$id
mkdir -p "$inst"
readonly DIRS=(/opt/windows-arm64-image /var/lib/windows-vm /run/windows-arm64-image /var/lib/windows-arm64-image)
ns_pids() { # the pids in the namespace of the running sshd
  local pid ns p
  pid=$(cat "$inst/sshd.pid" 2>/dev/null) || return 0
  ns=$(readlink "/proc/$pid/ns/mnt" 2>/dev/null) || return 0
  # Never the machine's own namespace (the host runs in one of its own).
  [[ $ns != "$(readlink /proc/1/ns/mnt)" ]] || return 0
  for p in /proc/[0-9]*; do
    # Not this script (a power-off from inside the host: it goes last).
    [[ ${p#/proc/} != "$$" ]] || continue
    [[ $(readlink "$p/ns/mnt" 2>/dev/null) == "$ns" ]] && echo "${p#/proc/}"
  done
  return 0
}
case $action in
  start)
    [[ $(cat "$inst/state" 2>/dev/null) != running ]] || exit 0
    for dir in "${DIRS[@]}"; do mkdir -p "$dir" "$root$dir"; done
    mkdir -p /run/sshd
    binds=""
    for dir in "${DIRS[@]}"; do binds+="mount --bind '$root$dir' '$dir' && "; done
    setsid unshare -m --propagation private bash -c "${binds}echo \$\$ >'$inst/sshd.pid' && exec /usr/sbin/sshd -D -e -f '$FAKE_HOST_SSHD_CONFIG'" \
      </dev/null >>"$inst/console" 2>&1 &
    for _ in $(seq 1 100); do
      if (exec 3<>"/dev/tcp/127.0.0.1/$FAKE_HOST_PORT") 2>/dev/null; then break; fi
      sleep 0.1
    done
    echo running >"$inst/state"
    echo "host.sh: $id started" >&2
    ;;
  stop)
    inside=0
    [[ $(readlink /proc/self/ns/mnt) != "$(readlink "/proc/$(cat "$inst/sshd.pid" 2>/dev/null || echo 1)/ns/mnt" 2>/dev/null)" ]] || inside=1
    mapfile -t pids < <(ns_pids)
    echo stopped >"$inst/state"
    rm -f "$inst/sshd.pid"
    echo "host.sh: $id powered off (${#pids[@]} processes)" >&2
    ((${#pids[@]} == 0)) || kill -9 "${pids[@]}" 2>/dev/null || true
    # Powered off from inside (the idle guard): this process goes with the host.
    ((inside == 0)) || kill -9 $$
    ;;
  *) exit 2 ;;
esac

#!/usr/bin/env bash
# Stop the local Ray head that scripts/cluster-up.sh started in STATE_DIR, and only that one.
# usage: scripts/cluster-down.sh STATE_DIR
# `ray stop` is not scoped (it stops every Ray on the machine). Every process of this cluster inherits the marker
# MOE_CLUSTER_STATE=STATE_DIR from cluster-up.sh; this sends SIGTERM to `ray start --block` (it stops what it started),
# then SIGTERM/SIGKILL to whatever carries the marker still (worker nodes the autoscaler launched, job drivers and
# actors live in process groups and sessions of their own). Then removes the cluster's Ray temp dir.
set -uo pipefail
[ $# -eq 1 ] || { sed -n 3p "$0" | cut -c3- >&2; exit 2; }
state=$(cd "$1" 2>/dev/null && pwd) || { echo "cluster-down: no directory $1" >&2; exit 0; }
[ -f "$state/head.pid" ] || { echo "cluster-down: no cluster recorded in $state" >&2; exit 0; }
# shellcheck disable=SC1091
. "$state/env"
pid=$MOE_HEAD_PID

members() {  # every process carrying this cluster's marker, whatever its session (job drivers get their own)
  grep -lzxF "MOE_CLUSTER_STATE=$state" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 | grep -vxF "$$"
}
alive() { [ -n "$(members)" ]; }
signal_all() { for p in $(members); do kill "-$1" "$p" 2>/dev/null; done; }
wait_gone() {  # $1 seconds
  local end=$((SECONDS + $1))
  while alive && [ $SECONDS -lt $end ]; do sleep 0.5; done
  ! alive
}
# The pid is ours only while it is still `ray start` on our temp dir (a stale pid may have been reused).
if { tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null | grep -qF -- "--temp-dir=$MOE_RAY_TEMP_DIR"; then
  kill -TERM "$pid" 2>/dev/null
  end=$((SECONDS + 30))
  while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 0.5; done
  wait_gone 3  # what it stopped exits; worker nodes the autoscaler started are not its to stop
fi
alive && { signal_all TERM; wait_gone 10; }
alive && { signal_all KILL; wait_gone 10; }
if alive; then
  echo "cluster-down: processes of the cluster are still alive: $(members | tr '\n' ' ')" >&2
  exit 1
fi
rm -rf -- "$MOE_RAY_TEMP_DIR"
rm -f -- "$state/head.pid"
echo "cluster-down: stopped the Ray head (pid $pid) and everything it started"

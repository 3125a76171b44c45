#!/usr/bin/env bash
# Start a local Ray head: token auth, dashboard on 127.0.0.1 only, free ports, its own Ray temp dir.
# usage: scripts/cluster-up.sh STATE_DIR [ray start options, e.g. --num-cpus=2 --autoscaling-config=cluster-local.yaml]
# STATE_DIR (created, mode 700) receives `env` (source it before `ray job`/`serve` commands: RAY_AUTH_MODE,
# RAY_AUTH_TOKEN_PATH, MOE_DASHBOARD_URL, MOE_GCS_ADDRESS, ...), the 0600 token (unless RAY_AUTH_TOKEN_PATH names an
# existing one) and head.log. Stop it with scripts/cluster-down.sh STATE_DIR; never `ray stop`, which stops every
# Ray on the machine. A fake multi-node autoscaling config (cluster-local.yaml) is pointed at this head's port.
set -euo pipefail
[ $# -ge 1 ] || { sed -n 3p "$0" | cut -c3- >&2; exit 2; }
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1" && chmod 700 "$1" && state=$(cd "$1" && pwd)
shift
[ ! -e "$state/head.pid" ] || { echo "cluster-up: $state already has a cluster; cluster-down.sh it first" >&2; exit 1; }
export PATH="$repo/.venv/bin:$PATH"  # the cluster runs in the venv: jobs and replicas import moe_platform from it

token=${RAY_AUTH_TOKEN_PATH:-$state/ray-token}
if [ ! -s "$token" ]; then
  (umask 077; python -c 'import secrets; print(secrets.token_hex(32))' > "$token")
fi
# Ports bound together (so they differ), released, then handed to Ray: no clash with a cluster already running.
read -r ip gcs dash agent client < <(python -c '
import socket
from ray._private.services import get_node_ip_address
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(get_node_ip_address(), *(s.getsockname()[1] for s in socks))')
ray_tmp=$(mktemp -d /tmp/moe-ray.XXXXXX)  # short: Ray's unix socket paths live under it

# Ray's fake multi-node provider starts its worker nodes against provider.gcs_address (default port 6379): give it a
# copy of the config naming this head, and switch the provider on (RAY_FAKE_CLUSTER).
args=()
for a in "$@"; do
  if [[ $a == --autoscaling-config=* ]]; then
    fake=$(python -c '
import sys, yaml
src, dst, gcs = sys.argv[1:]
cfg = yaml.safe_load(open(src))
fake = cfg["provider"]["type"] == "fake_multinode"
if fake:
    cfg["provider"]["gcs_address"] = gcs
yaml.safe_dump(cfg, open(dst, "w"), sort_keys=False)
print(int(fake))' "${a#*=}" "$state/autoscaling.yaml" "$ip:$gcs")
    [ "$fake" = 0 ] || export RAY_FAKE_CLUSTER=1
    a=--autoscaling-config=$state/autoscaling.yaml
  fi
  args+=("$a")
done

# setsid: a Ctrl-C meant for the caller does not hit the head. Everything the head starts (raylet, GCS, dashboard,
# autoscaler, fake worker nodes, job drivers, actors) inherits MOE_CLUSTER_STATE: cluster-down.sh finds them by it,
# without touching any other Ray on the machine. RAY_API_SERVER_ADDRESS: Ray's own state-API calls inside the
# cluster (Ray Train makes some) would otherwise find several Ray instances on a shared machine and give up.
MOE_CLUSTER_STATE=$state RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$token RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dash \
  setsid ray start --head --block --disable-usage-stats --port="$gcs" --dashboard-host=127.0.0.1 \
  --dashboard-port="$dash" --dashboard-agent-listen-port="$agent" --ray-client-server-port="$client" \
  --temp-dir="$ray_tmp" ${args[@]+"${args[@]}"} >"$state/head.log" 2>&1 &
pid=$!
echo "$pid" > "$state/head.pid"
cat > "$state/env" <<EOF
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$token
export MOE_DASHBOARD_URL=http://127.0.0.1:$dash
export MOE_GCS_ADDRESS=$ip:$gcs
export MOE_RAY_TEMP_DIR=$ray_tmp
export MOE_HEAD_PID=$pid
EOF

# Up once the dashboard answers at all (it wants the token for real answers).
if ! python -c '
import os, sys, time, urllib.error, urllib.request
url, pid = sys.argv[1], int(sys.argv[2])
end = time.monotonic() + 180
while time.monotonic() < end:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("cluster-up: `ray start` exited")
    try:
        urllib.request.urlopen(url, timeout=2).close()
        sys.exit(0)
    except urllib.error.HTTPError:
        sys.exit(0)
    except OSError:
        time.sleep(0.5)
sys.exit("cluster-up: the dashboard did not answer within 180 s")' "http://127.0.0.1:$dash/api/version" "$pid"; then
  tail -n 30 "$state/head.log" >&2
  bash "$repo/scripts/cluster-down.sh" "$state"
  exit 1
fi
echo "cluster-up: Ray head pid $pid, GCS $ip:$gcs, dashboard http://127.0.0.1:$dash (token: $token)"

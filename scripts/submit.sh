#!/usr/bin/env bash
# Submit the training job to the cluster of scripts/cluster-up.sh with `ray job submit`, follow its logs, and exit 0
# only if it SUCCEEDED.
# usage: scripts/submit.sh STATE_DIR [--section.key=value ...]   (CONFIG=jobs/configs/other.toml to change config)
# The repo is the job's working dir. Give an absolute --run.storage_path: a relative one lands in Ray's copy of it.
set -euo pipefail
[ $# -ge 1 ] || { sed -n 4p "$0" | cut -c3- >&2; exit 2; }
repo=$(cd "$(dirname "$0")/.." && pwd)
state=$1
shift
# shellcheck disable=SC1091
. "$state/env"  # RAY_AUTH_MODE=token + RAY_AUTH_TOKEN_PATH: the CLI sends the token
export PATH="$repo/.venv/bin:$PATH"
job=moe-train-$(date +%Y%m%d-%H%M%S)-$$
end=$((SECONDS + 120))
# The head refuses jobs while its job agent is still starting ("No available agent"): ask again, for a while.
until out=$(ray job submit --address "$MOE_DASHBOARD_URL" --submission-id "$job" --no-wait --working-dir "$repo" \
              -- python jobs/train.py --config "${CONFIG:-jobs/configs/tiny.toml}" "$@" 2>&1); do
  if [[ $out != *"No available agent"* ]] || [ $SECONDS -ge $end ]; then
    echo "$out" >&2
    exit 1
  fi
  sleep 1
done
echo "submit: job $job submitted to $MOE_DASHBOARD_URL; following its logs"
ray job logs --address "$MOE_DASHBOARD_URL" --follow "$job"
status=$(ray job status --address "$MOE_DASHBOARD_URL" "$job" 2>&1)
if [[ ${status,,} != *succeeded* ]]; then
  echo "$status" >&2
  exit 1
fi
echo "submit: job $job SUCCEEDED"

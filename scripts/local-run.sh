# Sourced by quickstart.sh and finetune-example.sh: set up .venv, make a work directory ($work, with the cluster's
# state in $state = $work/cluster), and on exit, also on failure or Ctrl-C, take down what was started there
# (`serve shutdown` if deploy.sh got as far as deploying, then cluster-down.sh) and delete the work directory unless
# KEEP=1. usage: . scripts/local-run.sh TAG   (TAG prefixes the log lines: "[TAG] ...")
tag=$1
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)
bash scripts/setup.sh
export PATH="$repo/.venv/bin:$PATH"
start=$SECONDS
work=$(mktemp -d "/tmp/moe-$tag.XXXXXX")
state=$work/cluster

cleanup() {
  local rc=$?
  trap - INT TERM
  if [ -f "$state/serve-config.yaml" ]; then
    (. "$state/env" && timeout 120 serve shutdown --address "$MOE_DASHBOARD_URL" --yes >/dev/null 2>&1) || true
  fi
  bash scripts/cluster-down.sh "$state" || true
  if [ "${KEEP:-0}" = 1 ]; then echo "[$tag] kept $work"; else rm -rf -- "$work"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
echo "[$tag] working in $work (deleted at the end unless KEEP=1)"

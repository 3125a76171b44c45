#!/usr/bin/env bash
# Deploy the OpenAI-compatible Serve app (serve/config.yaml) serving EXPORT_DIR on the cluster of cluster-up.sh,
# and wait until /health answers; its URL goes to STATE_DIR/serve-url. Remove it with `serve shutdown`.
# usage: scripts/deploy.sh STATE_DIR EXPORT_DIR [HTTP_PORT]   (default port: a free one; HTTP on 127.0.0.1 only)
set -euo pipefail
[ $# -ge 2 ] || { sed -n 4p "$0" | cut -c3- >&2; exit 2; }
repo=$(cd "$(dirname "$0")/.." && pwd)
state=$1
export_dir=$(cd "$2" && pwd)
# shellcheck disable=SC1091
. "$state/env"
export PATH="$repo/.venv/bin:$PATH"
port=${3:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

# serve/config.yaml with absolute model paths (the cluster does not run in this directory), our port, and the
# rollout audit log in STATE_DIR (a rollout controller resumes from its log: one left in the checkout would carry a
# finished rollout's state over to the next cluster).
python - "$repo/serve/config.yaml" "$state/serve-config.yaml" "$export_dir" "$port" "$(cd "$state" && pwd)" <<'PY'
import sys
import yaml
src, dst, model, port, state = sys.argv[1:]
cfg = yaml.safe_load(open(src))
cfg["http_options"]["port"] = int(port)
for app in cfg["applications"]:
    app["args"]["model"] = model
    app["args"]["audit_log"] = f"{state}/rollouts/{app['name']}.audit.jsonl"
    for d in app.get("deployments", []):
        d.setdefault("user_config", {})["model"] = model
yaml.safe_dump(cfg, open(dst, "w"), sort_keys=False)
PY
serve deploy --address "$MOE_DASHBOARD_URL" "$state/serve-config.yaml"
url=http://127.0.0.1:$port
end=$((SECONDS + 300))
until python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5).close()' "$url/health" \
    2>/dev/null; do
  status=$(serve status --address "$MOE_DASHBOARD_URL" 2>&1 || true)
  if [[ $status == *DEPLOY_FAILED* || $status == *UNHEALTHY* ]] || [ $SECONDS -ge $end ]; then
    echo "deploy: the app did not become healthy:" >&2
    echo "$status" >&2
    exit 1
  fi
  sleep 2
done
echo "$url" > "$state/serve-url"
echo "deploy: serving $export_dir at $url"

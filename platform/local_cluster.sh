#!/usr/bin/env bash
# A local Ray "cluster" for `ray job submit`: one head on this machine, bound to 127.0.0.1,
# token authentication on, dashboard (the job API) at http://127.0.0.1:8265.
#
#   platform/local_cluster.sh start      # prints the token file and the submit command
#   platform/local_cluster.sh status
#   platform/local_cluster.sh stop
#
# Environment: RAY (the ray executable, default: .venv/bin/ray if present, else ray),
# RAY_PORT (6379), DASHBOARD_PORT (8265), NUM_CPUS / NUM_GPUS (default: all), RAY_TEMP_DIR
# (default /tmp/ray), AGENT_PORT (the dashboard agent that runs jobs, 52365: set it when another
# Ray on this machine holds that port), RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token; generated if missing).
# `stop` is `ray stop`: it stops every Ray process of this user on this machine.
#
# Without a token Ray 2.60 starts the head with authentication *disabled* and accepts any job
# (a warning only), so this script always generates one and sets RAY_AUTH_MODE=token.
# Clients need the same: `export RAY_AUTH_MODE=token` (before Python imports ray) and the token in
# ~/.ray/auth_token, $RAY_AUTH_TOKEN_PATH or $RAY_AUTH_TOKEN.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${RAY:-}" ]]; then
  if [[ -x .venv/bin/ray ]]; then RAY=.venv/bin/ray; else RAY=ray; fi
fi
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
export RAY_AUTH_MODE=token

case "${1:-}" in
  start)
    token_path=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
    if [[ -z "${RAY_AUTH_TOKEN:-}" && ! -s "$token_path" ]]; then
      if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
        # `ray get-auth-token --generate` writes ~/.ray/auth_token; copy it where asked.
        mkdir -p "$(dirname "$token_path")"
        HOME_TOKEN=$HOME/.ray/auth_token
        [[ -s "$HOME_TOKEN" ]] || "$RAY" get-auth-token --generate >/dev/null
        install -m 600 "$HOME_TOKEN" "$token_path"
      else
        "$RAY" get-auth-token --generate >/dev/null
        chmod 600 "$token_path"
      fi
    fi
    args=(--head --node-ip-address 127.0.0.1 --port "$RAY_PORT"
          --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --disable-usage-stats)
    [[ -n "${NUM_CPUS:-}" ]] && args+=(--num-cpus "$NUM_CPUS")
    [[ -n "${NUM_GPUS:-}" ]] && args+=(--num-gpus "$NUM_GPUS")
    [[ -n "${RAY_TEMP_DIR:-}" ]] && args+=(--temp-dir "$RAY_TEMP_DIR")
    [[ -n "${AGENT_PORT:-}" ]] && args+=(--dashboard-agent-listen-port "$AGENT_PORT")
    "$RAY" start "${args[@]}"
    cat <<MSG

Ray head on 127.0.0.1:$RAY_PORT, dashboard and job API on http://127.0.0.1:$DASHBOARD_PORT
Token authentication on; token in ${RAY_AUTH_TOKEN:+\$RAY_AUTH_TOKEN}${RAY_AUTH_TOKEN:-$token_path}.
Submit a job (from the repository root, the virtual environment active):

  export RAY_AUTH_MODE=token
  ray job submit --address http://127.0.0.1:$DASHBOARD_PORT --runtime-env platform/runtime_env.yaml \\
      -- tsesnet train --store \$PWD/data/store.zarr --config platform/configs/small.yaml \\
         --set run.storage_path=\$PWD/ray_results

Stop it with: platform/local_cluster.sh stop
MSG
    ;;
  status)
    "$RAY" status --address "127.0.0.1:$RAY_PORT"
    ;;
  stop)
    "$RAY" stop
    ;;
  *)
    echo "usage: $0 start|status|stop" >&2
    exit 2
    ;;
esac

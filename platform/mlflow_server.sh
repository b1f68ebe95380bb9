#!/usr/bin/env bash
# An MLflow tracking server for a cluster (training, sweeps and prediction log to it).
#
#   platform/mlflow_server.sh            # serves on $MLFLOW_HOST:$MLFLOW_PORT (127.0.0.1:5000)
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
#
# Environment:
#   MLFLOW_BACKEND_STORE_URI      database for runs and the registry; default sqlite:///$PWD/mlflow.db
#                                 (use postgresql://... or mysql://... when several nodes write)
#   MLFLOW_ARTIFACTS_DESTINATION  where artifacts go, proxied by the server; default $PWD/mlartifacts
#                                 (s3://bucket/prefix or a shared path on a cluster)
#   MLFLOW_HOST / MLFLOW_PORT     bind address (127.0.0.1: local only; on a cluster the private IP
#                                 or 0.0.0.0 behind a firewall, never a public interface)
#   MLFLOW_WORKERS                gunicorn/uvicorn workers (2)
#
# Locally no server is needed: without MLFLOW_TRACKING_URI, tsesnet writes mlflow.db and
# mlartifacts/ in the working directory; `mlflow ui --backend-store-uri sqlite:///mlflow.db`
# browses them.
set -euo pipefail
MLFLOW=${MLFLOW:-mlflow}
[[ -x .venv/bin/mlflow && "$MLFLOW" == mlflow ]] && MLFLOW=.venv/bin/mlflow
BACKEND=${MLFLOW_BACKEND_STORE_URI:-sqlite:///$PWD/mlflow.db}
ARTIFACTS=${MLFLOW_ARTIFACTS_DESTINATION:-$PWD/mlartifacts}
exec "$MLFLOW" server \
  --backend-store-uri "$BACKEND" \
  --artifacts-destination "$ARTIFACTS" \
  --serve-artifacts \
  --host "${MLFLOW_HOST:-127.0.0.1}" \
  --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-2}"

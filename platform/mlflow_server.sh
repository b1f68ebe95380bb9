#!/usr/bin/env bash
# An MLflow tracking server for a cluster (training, sweeps and prediction log to it).
#
#   platform/mlflow_server.sh            # serves on $MLFLOW_HOST:$MLFLOW_PORT (127.0.0.1:5000)
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
#
# Environment (MLflow's own variable names: `mlflow server` reads each of them itself, so none of
# them, passwords included, appears on a command line that `ps` shows):
#   MLFLOW_BACKEND_STORE_URI      database for runs and the registry; default sqlite:///$PWD/mlflow.db
#                                 (postgresql://USER@HOST:5432/DB when several nodes write; give
#                                 the password in a PGPASSFILE, never in the URI)
#   MLFLOW_ARTIFACTS_DESTINATION  where artifacts go, proxied by the server; default $PWD/mlartifacts
#                                 (s3://bucket/prefix or a shared path on a cluster)
#   MLFLOW_HOST / MLFLOW_PORT     bind address (127.0.0.1: local only; on a cluster the head's
#                                 private IP, never a public interface)
#   MLFLOW_SERVER_ALLOWED_HOSTS   Host headers accepted (MLflow's default: localhost only); on a
#                                 cluster HEAD_PRIVATE_IP:5000
#   MLFLOW_WORKERS                uvicorn workers (2)
#   MLFLOW_AUTH_CONFIG_PATH       an MLflow basic-auth .ini (admin_username, admin_password,
#                                 database_uri, default_permission): turns authentication on.
#                                 Required when MLFLOW_HOST is not a loopback address, unless
#                                 MLFLOW_NO_AUTH=1 says that a proxy in front authenticates.
#   MLFLOW_FLASK_SERVER_SECRET_KEY  the auth app's CSRF key (default: random at each start)
#   PGPASSFILE                    PostgreSQL passwords (mode 0600), read by the database driver
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  MLflow's GenAI job runner (default here: false; MLflow's
#                                 own default starts 7 huey consumer processes, about 1.9 GB and
#                                 14 CPU-seconds, for jobs tsesnet never submits)
#
# Locally no server is needed: without MLFLOW_TRACKING_URI, tsesnet writes mlflow.db and
# mlartifacts/ in the working directory; `mlflow ui --backend-store-uri sqlite:///mlflow.db`
# browses them.
set -euo pipefail
die() { echo "mlflow_server.sh: $*" >&2; exit 1; }
MLFLOW=${MLFLOW:-mlflow}
[[ -x .venv/bin/mlflow && "$MLFLOW" == mlflow ]] && MLFLOW=.venv/bin/mlflow
export MLFLOW_BACKEND_STORE_URI=${MLFLOW_BACKEND_STORE_URI:-sqlite:///$PWD/mlflow.db}
export MLFLOW_ARTIFACTS_DESTINATION=${MLFLOW_ARTIFACTS_DESTINATION:-$PWD/mlartifacts}
export MLFLOW_HOST=${MLFLOW_HOST:-127.0.0.1}
export MLFLOW_PORT=${MLFLOW_PORT:-5000}
export MLFLOW_WORKERS=${MLFLOW_WORKERS:-2}
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

# A password inside a URI would reach MLflow's logs and error messages. Look in every part of it
# (user:password@, ?password=, ;Pwd= of ODBC strings), in any case, percent-escapes decoded.
holds_secret() {
  local uri=${1//\\/} decoded
  decoded=$(printf '%b' "${uri//%/\\x}") || decoded=$uri
  decoded=${decoded,,}
  [[ $decoded =~ ^[a-z0-9+.-]+://[^/?#@]*:[^/?#@]*@ ]] && return 0
  [[ $decoded =~ [?\&\;#]([a-z_]*(pass|pwd|secret|token|credential)[a-z_]*|[a-z_]*(api|access|account|sas)_?key)= ]]
}
for name in MLFLOW_BACKEND_STORE_URI MLFLOW_ARTIFACTS_DESTINATION; do
  if holds_secret "${!name}"; then
    die "$name holds a password or other secret; put it in a PGPASSFILE (or ~/.pgpass) or the" \
        "storage client's own credentials instead"
  fi
done
args=(server --serve-artifacts)
if [[ -n "${MLFLOW_AUTH_CONFIG_PATH:-}" ]]; then
  [[ -r $MLFLOW_AUTH_CONFIG_PATH ]] || die "MLFLOW_AUTH_CONFIG_PATH=$MLFLOW_AUTH_CONFIG_PATH is not readable"
  if (( 8#$(stat -c %a "$MLFLOW_AUTH_CONFIG_PATH") & 8#077 )); then
    die "$MLFLOW_AUTH_CONFIG_PATH holds the admin password and is readable by others; chmod 600 it"
  fi
  export MLFLOW_AUTH_CONFIG_PATH
  # The auth app's CSRF protection needs a key shared by the server's workers; a new random one
  # per start unless given (signed-in browser sessions then end with a restart).
  MLFLOW_FLASK_SERVER_SECRET_KEY=${MLFLOW_FLASK_SERVER_SECRET_KEY:-$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')}
  export MLFLOW_FLASK_SERVER_SECRET_KEY
  args+=(--app-name basic-auth)
else
  case $MLFLOW_HOST in
    127.*|localhost|::1) ;;
    *) [[ "${MLFLOW_NO_AUTH:-0}" == 1 ]] \
         || die "MLFLOW_HOST=$MLFLOW_HOST is reachable from other machines but authentication" \
                "is off: set MLFLOW_AUTH_CONFIG_PATH (basic auth), or MLFLOW_NO_AUTH=1 behind" \
                "an authenticating proxy" ;;
  esac
fi
exec "$MLFLOW" "${args[@]}"

#!/usr/bin/env bash
# A cluster on one machine (Ray head + worker nodes, an S3 API, an MLflow server): see
# platform/rehearsal.py for what runs and why. Run from anywhere; it uses this checkout's .venv.
#
#   platform/rehearsal.sh up            # about 2 minutes; prints the environment to export
#   eval "$(platform/rehearsal.sh env)"
#   platform/rehearsal.sh status | down | outage s3 30 | kill-node node2 | add-node
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python=${PYTHON:-$here/../.venv/bin/python}
[[ -x $python ]] || python=python3
exec "$python" "$here/rehearsal.py" "$@"

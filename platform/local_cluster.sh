#!/usr/bin/env bash
# A local Ray "cluster" for `ray job submit` and `tsesnet submit`: one head on this machine, every
# port it opens bound to 127.0.0.1, token authentication on, the dashboard (the job API) at
# http://127.0.0.1:$DASHBOARD_PORT. Run it from anywhere; it acts on the checkout it lives in.
#
#   platform/local_cluster.sh start      # prints the token file, the ports and the submit command
#   platform/local_cluster.sh status     # `ray status`, and the head's listening sockets
#   platform/local_cluster.sh stop       # ends this head only (the processes `start` started)
#
# Environment (set the ports to run beside another Ray on the same machine; every one of Ray's
# other ports is picked free at start):
#   RAY                     the ray executable (default: .venv/bin/ray of this checkout, else ray)
#   RAY_PORT                GCS port, 6379
#   DASHBOARD_PORT          dashboard and job API, 8265
#   CLIENT_PORT             Ray Client server (ray://), 10001
#   AGENT_PORT              the dashboard agent that runs jobs, 52365
#   DASHBOARD_METRIC_PORT   the dashboard's Prometheus metrics, 44227 (Ray's own variable)
#   AUTOSCALER_METRIC_PORT  the autoscaler's Prometheus metrics, 44217 (Ray's own variable)
#   NUM_CPUS / NUM_GPUS     resources of the head (default: all)
#   RAY_TEMP_DIR            this head's temp dir, default /tmp/tsesnet-ray-$UID-$RAY_PORT (may be
#                           shared with other Ray instances, e.g. Ray's own /tmp/ray)
#   RAY_AUTH_TOKEN_PATH     the token file (default ~/.ray/auth_token; generated, 0600 in a 0700
#                           folder, if missing; made mode 0600 if others can read it)
#   TSESNET_STATE_DIR       where `start` records what it started, default
#                           ${XDG_STATE_HOME:-~/.local/state}/tsesnet
#   STOP_GRACE              seconds `stop` waits after SIGTERM before SIGKILL, 10
#
# Why these choices:
# - Ray replaces `--node-ip-address 127.0.0.1` by the machine's LAN address and then listens
#   on all interfaces (GCS, raylet, Ray Client). RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 puts Ray in
#   its single-machine mode (the one it uses on macOS), where the node address stays 127.0.0.1 and
#   every listener is on loopback; such a head accepts no other nodes, which is the point here.
# - `ray stop` stops every Ray process of this user on the machine, other people's and other
#   sessions' included, and a temp dir says nothing about ownership (/tmp/ray is every Ray's
#   default; a driver has files open there). So `start` runs `ray start` with a random marker in
#   its environment (inherited by every process Ray starts; /proc/PID/environ is readable by its
#   owner only) and records the PIDs and start times (field 22 of /proc/PID/stat) of the marked
#   processes. `stop` signals only those still alive with the same start time, marked processes,
#   and their descendants (workers, job drivers started later).
# - Without a token Ray 2.60 starts the head with authentication *disabled* and accepts any job
#   (a warning only), so this script always has a token and sets RAY_AUTH_MODE=token. Clients need
#   the same: `export RAY_AUTH_MODE=token` (before Python imports ray) and the token in
#   ~/.ray/auth_token, $RAY_AUTH_TOKEN_PATH or $RAY_AUTH_TOKEN.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${RAY:-}" ]]; then
  if [[ -x .venv/bin/ray ]]; then RAY=$PWD/.venv/bin/ray; else RAY=ray; fi
fi
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
CLIENT_PORT=${CLIENT_PORT:-10001}
AGENT_PORT=${AGENT_PORT:-52365}
export DASHBOARD_METRIC_PORT=${DASHBOARD_METRIC_PORT:-44227}
export AUTOSCALER_METRIC_PORT=${AUTOSCALER_METRIC_PORT:-44217}
RAY_TEMP_DIR=${RAY_TEMP_DIR:-/tmp/tsesnet-ray-$(id -u)-$RAY_PORT}
TOKEN_PATH=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
STOP_GRACE=${STOP_GRACE:-10}
export RAY_AUTH_MODE=token
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

STATE_DIR=${TSESNET_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/tsesnet}
STATE="$STATE_DIR/ray-head-$RAY_PORT.pids"

# A process's start time in clock ticks since boot (field 22 of /proc/PID/stat; the fields after
# the command name, which may hold spaces and parentheses, start at field 3).
start_time() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  # shellcheck disable=SC2086
  set -- $stat
  echo "${20}"
}

# The processes this head's `start` started: the recorded PIDs still alive with their recorded
# start time, the processes of this user carrying the start's marker, and their descendants.
head_pids() {
  [[ -r $STATE ]] || return 0
  local marker pid started
  marker=$(sed -n 's/^marker //p' "$STATE")
  {
    while read -r pid started; do
      [[ $pid =~ ^[0-9]+$ ]] && [[ $(start_time "$pid") == "$started" ]] && echo "$pid"
    done <"$STATE"
    # grep reads the marker from a pipe, so that it does not find itself.
    [[ -n $marker ]] && { grep -l -a -F -f <(printf 'TSESNET_LOCAL_HEAD=%s\n' "$marker") \
      /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 || true; }
  } | with_descendants
}

# The PIDs read (one a line) and every descendant of theirs that this user owns; zombies (dead,
# not yet reaped) left out.
with_descendants() {
  { sed 's/^/W /'; ps -e -o pid=,ppid=,uid=,stat= | sed 's/^ */P /'; } | awk -v me="$(id -u)" '
    $1 == "W" { want[$2] = 1; next }
    $1 == "P" && $4 == me && $5 !~ /^Z/ { parent[$2] = $3; seen[$2] = 1 }
    END {
      do {
        grew = 0
        for (p in seen) if (!(p in want) && (parent[p] in want)) { want[p] = 1; grew = 1 }
      } while (grew)
      for (p in want) if (p in seen) print p
    }' | sort -n
}

# Record what `start` started (PIDs and start times), readable by this user only.
record_pids() {
  local pid tmp="$STATE.tmp.$$"
  {
    echo "marker $1"
    for pid in $(head_pids); do echo "$pid $(start_time "$pid")"; done
  } >"$tmp"
  mv -f "$tmp" "$STATE"
}

# The head's listening TCP sockets (address:port process), from `ss -ltnp`.
head_listeners() {
  command -v ss >/dev/null || return 0
  local pids
  pids=$(head_pids | paste -sd'|' -)
  [[ -n $pids ]] || return 0
  ss -ltnpH | grep -E "pid=($pids)," | awk '{print $4, $6}' || true
}

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

check_ports_free() {
  local name
  for name in RAY_PORT DASHBOARD_PORT CLIENT_PORT AGENT_PORT DASHBOARD_METRIC_PORT \
              AUTOSCALER_METRIC_PORT; do
    if port_taken "${!name}"; then
      die "port ${!name} ($name) is already in use on 127.0.0.1 (another Ray?); pick a free one:" \
          "$name=PORT $0 start"
    fi
  done
}

# A token file that exists, readable by its owner only. A new one is written here (256 random
# bits, hex, as `ray get-auth-token --generate` writes): Ray refuses a RAY_AUTH_TOKEN_PATH that
# is set but missing, even to generate it. noclobber: never over a file that appears meanwhile.
ensure_token() {
  [[ -n "${RAY_AUTH_TOKEN:-}" ]] && return 0
  if [[ ! -e "$TOKEN_PATH" && ! -L "$TOKEN_PATH" ]]; then
    mkdir -p -m 700 "$(dirname "$TOKEN_PATH")" \
      || die "cannot create the folder of the token file $TOKEN_PATH"
    (umask 077 && set -o noclobber && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$TOKEN_PATH") \
      2>/dev/null || die "cannot write a new token to $TOKEN_PATH"
    echo "local_cluster.sh: wrote a new Ray token to $TOKEN_PATH (mode 0600)"
  fi
  [[ -f "$TOKEN_PATH" && -r "$TOKEN_PATH" ]] || die "the token file $TOKEN_PATH is not a readable file"
  [[ -s "$TOKEN_PATH" ]] || die "the token file $TOKEN_PATH is empty; remove it (a new one is" \
    "generated) or write the cluster's token into it"
  local mode
  mode=$(stat -c %a "$TOKEN_PATH")
  if (( 8#$mode & 8#077 )); then
    chmod 600 "$TOKEN_PATH"
    echo "local_cluster.sh: the Ray token file $TOKEN_PATH was readable by others (mode $mode); set it to 0600"
  fi
}

start() {
  [[ -z $(head_pids) ]] || die "a head started by this script is already running on port" \
    "$RAY_PORT ($(head_pids | wc -l) processes recorded in $STATE); stop it first: $0 stop"
  check_ports_free
  ensure_token
  mkdir -p -m 700 "$RAY_TEMP_DIR" "$STATE_DIR"
  local marker
  marker=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  (umask 077 && echo "marker $marker" >"$STATE")
  # Jobs run `tsesnet ...`: put the executables beside this ray on their PATH.
  PATH="$(dirname "$(command -v "$RAY")"):$PATH"
  local args=(--head --node-ip-address 127.0.0.1 --port "$RAY_PORT"
    --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT"
    --ray-client-server-port "$CLIENT_PORT" --dashboard-agent-listen-port "$AGENT_PORT"
    --temp-dir "$RAY_TEMP_DIR" --disable-usage-stats)
  [[ -n "${NUM_CPUS:-}" ]] && args+=(--num-cpus "$NUM_CPUS")
  [[ -n "${NUM_GPUS:-}" ]] && args+=(--num-gpus "$NUM_GPUS")
  local log="$RAY_TEMP_DIR/ray-start.log"
  if ! TSESNET_LOCAL_HEAD=$marker "$RAY" start "${args[@]}" >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    record_pids "$marker"
    die "ray start failed (full output in $log); end what it left with: $0 stop"
  fi
  # `ray start` returns before the job API and the Ray Client server listen; wait for them.
  local waited=0
  until port_taken "$DASHBOARD_PORT" && port_taken "$CLIENT_PORT"; do
    (( waited++ < 60 )) || die "the dashboard ($DASHBOARD_PORT) or Ray Client ($CLIENT_PORT) did not come up; logs in $RAY_TEMP_DIR/session_latest/logs"
    sleep 1
  done
  record_pids "$marker"
  cat <<MSG
Ray head on 127.0.0.1:$RAY_PORT, dashboard and job API on http://127.0.0.1:$DASHBOARD_PORT
Token authentication on; token in ${RAY_AUTH_TOKEN:+\$RAY_AUTH_TOKEN}${RAY_AUTH_TOKEN:-$TOKEN_PATH}.
Temp dir (logs) $RAY_TEMP_DIR. PIDs recorded in $STATE. Listening:
$(head_listeners | sed 's/^/  /')
Submit a job (the virtual environment active, from any directory):

  export RAY_AUTH_MODE=token
  tsesnet submit --address http://127.0.0.1:$DASHBOARD_PORT -- tsesnet train --store /abs/store.zarr ...

Stop it with: $([[ $RAY_PORT == 6379 ]] || echo "RAY_PORT=$RAY_PORT ")$0 stop
MSG
}

# SIGTERM to every process of this head; SIGKILL to those still there after STOP_GRACE seconds
# (Ray's GCS and autoscaler monitor take longer than that to act on SIGTERM; `ray stop` waits 16 s).
stop() {
  local pids left="" waited=0
  pids=$(head_pids | tr '\n' ' ')
  [[ -n ${pids// } ]] || { echo "no head started by this script runs on port $RAY_PORT"; rm -f "$STATE"; return 0; }
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  while (( waited < STOP_GRACE * 2 )); do
    left=$(head_pids | tr '\n' ' ')
    [[ -n ${left// } ]] || break
    sleep 0.5
    waited=$((waited + 1))
  done
  # shellcheck disable=SC2086
  if [[ -n ${left// } ]]; then
    kill -KILL $left 2>/dev/null || true
    # SIGKILL is delivered asynchronously: return only once they are gone (at most 10 s).
    waited=0
    while [[ -n $(head_pids) ]] && (( waited++ < 20 )); do sleep 0.5; done
  fi
  rm -f "$STATE"
  echo "stopped the head in $RAY_TEMP_DIR ($(wc -w <<<"$pids") processes, $(wc -w <<<"$left")" \
    "of them by SIGKILL after ${STOP_GRACE} s); no other Ray was signalled"
}

case "${1:-}" in
  start) start ;;
  status)
    "$RAY" status --address "127.0.0.1:$RAY_PORT"
    echo "Listening (address:port process):"
    head_listeners | sed 's/^/  /'
    ;;
  stop) stop ;;
  *)
    echo "usage: $0 start|status|stop" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# The shared servers on one PostgreSQL, all on loopback (`make stack` / `make stack-down`):
#
#   scripts/stack.sh up|down|status|env [STATE_DIR]
#
# - PostgreSQL 15 (scripts/local_postgres.sh, in STATE_DIR/postgres or LMFORGE_PG_DIR) with
#   the databases optuna, mlflow and prefect;
# - an MLflow tracking server, backend store in the mlflow database, artifacts proxied by the
#   server into STATE_DIR/mlflow-artifacts;
# - a Prefect server on the prefect database (postgresql+asyncpg), the process work pool
#   lmforge-process and one worker of it, whose flow runs report to this MLflow and Prefect.
#
# STATE_DIR: argument, else LMFORGE_STACK_DIR, else /tmp/lmforge-stack (logs and pid files too).
# Ports: LMFORGE_STACK_MLFLOW_PORT (5050), LMFORGE_STACK_PREFECT_PORT (4250), LMFORGE_PG_PORT
# (55432): away from `make ui`'s 5000 and 4200, so both can run. `env` prints the variables a
# client needs (`eval "$(scripts/stack.sh env)"`); no password is in them: the database
# password lives only in STATE_DIR/postgres/pgpass (0600), read by libpq and asyncpg via PGPASSFILE.
# `down` stops the worker, both servers and PostgreSQL; nothing of the stack is left running.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE=$(realpath -m "${2:-${LMFORGE_STACK_DIR:-/tmp/lmforge-stack}}")
MLFLOW_PORT=${LMFORGE_STACK_MLFLOW_PORT:-5050}
PREFECT_PORT=${LMFORGE_STACK_PREFECT_PORT:-4250}
POOL=lmforge-process
# LMFORGE_PG_DIR puts the stack on a PostgreSQL folder of local_postgres.sh elsewhere (the tests
# share one per session); `down` stops that one too.
export LMFORGE_PG_DIR=${LMFORGE_PG_DIR:-$STATE/postgres}
# Services in the order `down` stops them (the worker first, so no run starts on a dying server).
SERVICES=(worker prefect mlflow)

export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false

die() { echo "stack: $*" >&2; exit 1; }

alive() {  # a service whose pid file names a live process group
    local pid
    pid=$(cat "$STATE/$1.pid" 2>/dev/null) || return 1
    kill -0 -- "-$pid" 2>/dev/null
}

# Read after local_postgres.sh up: the port it runs on (its state file) and libpq's password file.
db_env() {
    local pg_port
    pg_port=$(cat "$LMFORGE_PG_DIR/port")
    export PGPASSFILE=$LMFORGE_PG_DIR/pgpass
    MLFLOW_DB=postgresql://lmforge@127.0.0.1:$pg_port/mlflow
    PREFECT_DB=postgresql+asyncpg://lmforge@127.0.0.1:$pg_port/prefect
    export LMFORGE_OPTUNA_STORAGE=postgresql://lmforge@127.0.0.1:$pg_port/optuna
    export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
    export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
}

# A 2xx from url (Python's urllib rather than curl, which a bare Debian lacks).
healthy() {
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" 2>/dev/null
}

# start NAME HEALTH_URL CMD...: in a session of its own (so `down` stops its whole process
# group), output to NAME.log; waits up to 120 s for HEALTH_URL (none: for the process to stay up).
start() {
    local name=$1 health=$2 i
    shift 2
    if alive "$name"; then
        echo "stack: $name already running"
        return
    fi
    setsid "$@" >"$STATE/$name.log" 2>&1 </dev/null &
    echo $! >"$STATE/$name.pid"
    for i in $(seq 1 240); do
        alive "$name" || die "$name exited: see $STATE/$name.log"
        if [ -z "$health" ]; then
            [ "$i" -ge 6 ] && return
        elif healthy "$health"; then
            return
        fi
        sleep 0.5
    done
    die "$name not healthy after 120 s: see $STATE/$name.log"
}

port_free() {
    if ! alive "$2" && (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
        die "port $1 on 127.0.0.1 is taken by another process: set LMFORGE_STACK_${2^^}_PORT"
    fi
}

up() {
    command -v mlflow >/dev/null && command -v prefect >/dev/null \
        || die "mlflow and prefect not on PATH: run it through \`make stack\` or put .venv/bin first"
    mkdir -p "$STATE/mlflow-artifacts" "$STATE/prefect-home"
    "$HERE/local_postgres.sh" up
    db_env
    port_free "$MLFLOW_PORT" mlflow
    port_free "$PREFECT_PORT" prefect
    # The backend URI goes through the environment: mlflow reads MLFLOW_BACKEND_STORE_URI.
    MLFLOW_BACKEND_STORE_URI=$MLFLOW_DB MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
        start mlflow "$MLFLOW_TRACKING_URI/health" mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" \
        --workers 1 --artifacts-destination "$STATE/mlflow-artifacts"
    PREFECT_HOME=$STATE/prefect-home PREFECT_SERVER_DATABASE_CONNECTION_URL=$PREFECT_DB \
        start prefect "$PREFECT_API_URL/health" prefect server start --host 127.0.0.1 --port "$PREFECT_PORT"
    export PREFECT_HOME=$STATE/prefect-home
    prefect work-pool inspect "$POOL" >/dev/null 2>&1 \
        || prefect work-pool create "$POOL" --type process >>"$STATE/prefect.log" 2>&1 \
        || die "could not create the work pool $POOL: see $STATE/prefect.log"
    # The worker polls every 5 s; flow runs it starts inherit this environment (the stack's MLflow,
    # Prefect and Optuna storage).
    PREFECT_WORKER_QUERY_SECONDS=5 start worker "" prefect worker start --pool "$POOL" --type process
    echo "stack: up in $STATE"
    env_lines
}

env_lines() {
    echo "export MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI"
    echo "export PREFECT_API_URL=$PREFECT_API_URL"
    echo "export LMFORGE_OPTUNA_STORAGE=$LMFORGE_OPTUNA_STORAGE"
    echo "export PGPASSFILE=$PGPASSFILE"
}

# SIGTERM to the whole process group (the servers' uvicorn children too), SIGKILL if it is still
# there after 15 s. Prefect 3.9's process worker, started in the background, logs the SIGTERM
# and then hangs (seen here: also on SIGINT): it gets 5 s, then is killed; flow runs it started
# are in its group and go with it.
stop() {
    local name=$1 pid i ticks=30
    [ "$name" = worker ] && ticks=10
    pid=$(cat "$STATE/$name.pid" 2>/dev/null) || return 0
    if alive "$name"; then
        kill -TERM -- "-$pid" 2>/dev/null || true
        for i in $(seq 1 "$ticks"); do
            alive "$name" || break
            sleep 0.5
        done
        if alive "$name"; then
            [ "$name" = worker ] || echo "stack: $name did not stop on SIGTERM in 15 s: killed" >&2
            kill -KILL -- "-$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$STATE/$name.pid"
    echo "stack: $name stopped"
}

case "${1:-}" in
    up) up ;;
    down)
        for name in "${SERVICES[@]}"; do stop "$name"; done
        "$HERE/local_postgres.sh" down
        ;;
    status)
        code=0
        for name in "${SERVICES[@]}"; do
            if alive "$name"; then echo "stack: $name running"; else echo "stack: $name not running"; code=3; fi
        done
        "$HERE/local_postgres.sh" status || code=3
        exit $code
        ;;
    env)
        [ -f "$LMFORGE_PG_DIR/port" ] || die "no stack in $STATE: run scripts/stack.sh up first"
        db_env
        env_lines
        ;;
    *) die "usage: $0 up|down|status|env [STATE_DIR]" ;;
esac

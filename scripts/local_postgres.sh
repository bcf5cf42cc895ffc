#!/usr/bin/env bash
# A PostgreSQL 15 of lmforge's own, in its own folder, on loopback: the shared store for Optuna
# studies, the MLflow tracking server and the Prefect server (scripts/stack.sh starts those).
#
#   scripts/local_postgres.sh up|down|status|urls [STATE_DIR]
#
# STATE_DIR (argument, else LMFORGE_PG_DIR, else /tmp/lmforge-postgres) holds data/, run/ (the
# unix socket), postgres.log and pgpass. LMFORGE_PG_PORT picks the TCP port on 127.0.0.1
# (default 55432, away from a system cluster's 5432).
#
# `up` is idempotent: initdb on first use, start when stopped, then the role `lmforge` and the
# databases optuna, mlflow and prefect (owned by that role) when missing. The role's password is
# generated here and written only to STATE_DIR/pgpass (mode 0600, libpq's .pgpass format):
# libpq (psycopg2) and asyncpg read it through PGPASSFILE, so the URLs that `urls` prints carry
# no password and none reaches a command line, a log or the environment.
# `down` stops the server (nothing of it left running); `status` exits 0 when it runs, 3 when not.
set -euo pipefail

PG_BIN=${LMFORGE_PG_BIN:-/usr/lib/postgresql/15/bin}
STATE=$(realpath -m "${2:-${LMFORGE_PG_DIR:-/tmp/lmforge-postgres}}")
# The port of the last `up` is kept in STATE_DIR/port, so down/status/urls find it again.
PORT=${LMFORGE_PG_PORT:-$(cat "$STATE/port" 2>/dev/null || echo 55432)}
ROLE=lmforge
DATABASES=(optuna mlflow prefect)
DATA=$STATE/data
SOCK=$STATE/run
PGPASS=$STATE/pgpass

die() { echo "local_postgres: $*" >&2; exit 1; }

[ -x "$PG_BIN/pg_ctl" ] || die "no PostgreSQL 15 at $PG_BIN (install it: apt-get install -y postgresql)"

# initdb and the server refuse to run as root: as root they run as the `postgres` user that the
# Debian package creates, which then owns data/ and run/ (not pgpass, which stays root's).
if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root needs the postgres user (apt-get install -y postgresql)"
    DB_USER=postgres
    as_db() { runuser -u postgres -- "$@"; }
else
    DB_USER=$(id -un)
    as_db() { "$@"; }
fi

running() { [ -f "$DATA/PG_VERSION" ] && as_db "$PG_BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; }

# psql as the cluster's superuser over the unix socket (peer auth): SQL comes on stdin, so the
# password set there is never an argument that ps would show.
psql_super() { as_db "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$SOCK" -p "$PORT" -d postgres "$@"; }

init_cluster() {
    mkdir -p "$STATE"
    chmod 0755 "$STATE"  # the db user must reach data/ and run/ inside a root-owned folder
    install -d -m 0700 -o "$DB_USER" "$DATA" "$SOCK"
    # Peer auth on the socket (the superuser, for setup), SCRAM passwords on TCP (everyone else).
    as_db "$PG_BIN/initdb" -D "$DATA" -U "$DB_USER" --auth-local=peer --auth-host=scram-sha-256 \
        -E UTF8 --locale=C.UTF-8 >"$STATE/initdb.log" 2>&1 \
        || die "initdb failed: see $STATE/initdb.log"
    # Loopback only, our own socket folder; statements that fail are not logged (one could hold
    # the ALTER ROLE ... PASSWORD below).
    cat >>"$DATA/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$SOCK'
log_min_error_statement = panic
max_connections = 200
EOF
}

start() {
    touch "$STATE/postgres.log" && chown "$DB_USER" "$STATE/postgres.log"
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
        die "port $PORT on 127.0.0.1 is taken by another process: set LMFORGE_PG_PORT"
    fi
    as_db "$PG_BIN/pg_ctl" -D "$DATA" -l "$STATE/postgres.log" -o "-p $PORT" -w -t 60 start >/dev/null \
        || die "the server did not start: see $STATE/postgres.log"
    echo "$PORT" >"$STATE/port"
}

ensure_role_and_databases() {
    local exists password
    exists=$(psql_super -tA -c "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")
    if [ "$exists" != 1 ] || [ ! -s "$PGPASS" ]; then
        # A new password whenever pgpass is missing: the file is the only place it lives.
        password=$(head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32)
        local verb=CREATE
        [ "$exists" = 1 ] && verb=ALTER
        psql_super <<<"$verb ROLE $ROLE LOGIN PASSWORD '$password';"
        (umask 077 && printf '127.0.0.1:*:*:%s:%s\n' "$ROLE" "$password" >"$PGPASS.tmp")
        mv "$PGPASS.tmp" "$PGPASS"
    fi
    for db in "${DATABASES[@]}"; do
        exists=$(psql_super -tA -c "SELECT 1 FROM pg_database WHERE datname = '$db'")
        [ "$exists" = 1 ] || psql_super -c "CREATE DATABASE $db OWNER $ROLE"
    done
}

urls() {
    echo "PGPASSFILE=$PGPASS"
    for db in "${DATABASES[@]}"; do
        echo "${db}=postgresql://$ROLE@127.0.0.1:$PORT/$db"
    done
}

case "${1:-}" in
    up)
        [ -f "$DATA/PG_VERSION" ] || init_cluster
        running || start
        ensure_role_and_databases
        echo "local_postgres: up on 127.0.0.1:$PORT, state in $STATE (password in $PGPASS, mode 0600)"
        ;;
    down)
        if running; then
            as_db "$PG_BIN/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >/dev/null
            echo "local_postgres: stopped ($STATE)"
        else
            echo "local_postgres: not running ($STATE)"
        fi
        ;;
    status)
        if running; then
            echo "local_postgres: running on 127.0.0.1:$PORT ($STATE)"
        else
            echo "local_postgres: not running ($STATE)"
            exit 3
        fi
        ;;
    urls) urls ;;
    *) die "usage: $0 up|down|status|urls [STATE_DIR]" ;;
esac

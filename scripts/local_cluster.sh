#!/usr/bin/env bash
# A local two-node Slurm cluster on this machine, for running the data stages with
# `data_engine.executor: slurm` (tests/test_slurm_data.py) without a real cluster.
#
#   scripts/local_cluster.sh up      # start munged, slurmctld and two slurmd (n1, n2); wait until both are idle
#   scripts/local_cluster.sh status  # sinfo of the cluster
#   scripts/local_cluster.sh env     # the line to eval so sbatch/squeue/srun talk to it: export SLURM_CONF=...
#   scripts/local_cluster.sh down    # cancel its jobs, stop every daemon it started; nothing is left running
#
# Both commands are idempotent. Everything lives under LMFORGE_CLUSTER_DIR (default
# /tmp/lmforge-cluster; the first argument after the command overrides it): its own slurm.conf
# (pass SLURM_CONF to the clients), its own munge key and socket (a system munged, if any, is left
# alone), spool, logs and pid files. Both "nodes" are this host, so every path is shared between
# them, as a cluster's shared filesystem would be. Needs root and Debian's slurm-wlm and munge
# packages (Slurm 22.05): apt-get install -y slurm-wlm munge
set -euo pipefail

CMD=${1:-}
DIR=${2:-${LMFORGE_CLUSTER_DIR:-/tmp/lmforge-cluster}}
PARTITION=${LMFORGE_CLUSTER_PARTITION:-lmforge}
PORT=${LMFORGE_CLUSTER_PORT:-17000}   # slurmctld; the nodes take the next two ports
NODES=(n1 n2)
CONF=$DIR/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket.2

die() { echo "local_cluster: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the process it names is running
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

need_tools() {
    local missing=()
    for tool in munged mungekey slurmctld slurmd sinfo sbatch; do
        command -v "$tool" >/dev/null || [[ -x /usr/sbin/$tool ]] || missing+=("$tool")
    done
    ((${#missing[@]} == 0)) || die "missing ${missing[*]}: apt-get install -y slurm-wlm munge"
    [[ $(id -u) == 0 ]] || die "run as root (the cluster runs its jobs as root: SlurmUser=root)"
}

write_conf() {
    local host mem
    host=$(hostname -s)
    # Each node is given half the machine's memory (slurmd drains a node that claims more than it has).
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
    mkdir -p "$DIR/ctld"
    for node in "${NODES[@]}"; do mkdir -p "$DIR/$node"; done
    cat > "$CONF" <<EOF
# Written by scripts/local_cluster.sh: two nodes of one CPU each on this host ($host).
ClusterName=lmforge
# The address given: clients need not resolve this host's name (a fresh CI machine may not).
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/ctld
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdSpoolDir=$DIR/%n
SlurmdPidFile=$DIR/%n/slurmd.pid
SlurmdLogFile=$DIR/%n/slurmd.log
# No cgroups in a container: processes are tracked through /proc, tasks are not pinned.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=30
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 1)) CPUs=1 RealMemory=$mem State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 2)) CPUs=1 RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    alive "$DIR/munge/munged.pid" && return
    mkdir -p "$DIR/munge"
    chmod 700 "$DIR/munge"
    [[ -s $DIR/munge/munge.key ]] || mungekey --create --keyfile="$DIR/munge/munge.key"
    chmod 600 "$DIR/munge/munge.key"
    # --force: munged refuses a socket folder that others cannot enter; ours is 0700 (the key lies beside it).
    munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
}

node_state() {  # node_state NODE: idle, down*, ... as sinfo says
    sinfo -h -n "$1" -o %t 2>/dev/null | head -1
}

up() {
    need_tools
    mkdir -p "$DIR"
    start_munge
    [[ -f $CONF ]] && alive "$DIR/slurmctld.pid" || write_conf
    export SLURM_CONF=$CONF
    alive "$DIR/slurmctld.pid" || slurmctld -f "$CONF"
    for node in "${NODES[@]}"; do
        alive "$DIR/$node/slurmd.pid" || slurmd -f "$CONF" -N "$node"
    done
    local deadline=$((SECONDS + ${LMFORGE_CLUSTER_WAIT_S:-60})) states
    while :; do
        states="$(node_state n1) $(node_state n2)"
        [[ $states == "idle idle" ]] && break
        if ((SECONDS > deadline)); then
            sinfo -N -l >&2 || true
            die "nodes not idle after ${LMFORGE_CLUSTER_WAIT_S:-60} s ($states); logs in $DIR/slurmctld.log and $DIR/n*/slurmd.log"
        fi
        # A node seen down before its slurmd registered stays down until told otherwise.
        [[ $states == *down* ]] && scontrol update NodeName=n1,n2 State=RESUME 2>/dev/null || true
        sleep 0.5
    done
    echo "local_cluster: up, partition $PARTITION (export SLURM_CONF=$CONF)"
}

stop() {  # stop PIDFILE NAME: SIGTERM, then SIGKILL after 10 s; wait until it is gone
    local pidfile=$1 pid
    alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { echo "local_cluster: $2 ($pid) ignored SIGTERM, killing it" >&2; kill -9 "$pid"; }
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$pidfile"
}

down() {
    export SLURM_CONF=$CONF
    if [[ -f $CONF ]] && alive "$DIR/slurmctld.pid"; then
        # Jobs first: a job step's slurmstepd outlives its slurmd.
        scancel --partition="$PARTITION" 2>/dev/null || true
        for _ in $(seq 150); do
            [[ -z $(squeue -h -p "$PARTITION" 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
    # The nodes together: each slurmd takes seconds to shut down.
    for node in "${NODES[@]}"; do stop "$DIR/$node/slurmd.pid" "slurmd $node" & done
    wait
    stop "$DIR/slurmctld.pid" slurmctld
    stop "$DIR/munge/munged.pid" munged
    echo "local_cluster: down"
}

case $CMD in
    up) up ;;
    down) down ;;
    status) [[ -f $CONF ]] || die "no cluster in $DIR (run: $0 up)"; SLURM_CONF=$CONF sinfo -N -l ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) die "usage: $0 up|down|status|env [STATE_DIR]  (default \$LMFORGE_CLUSTER_DIR or /tmp/lmforge-cluster)" ;;
esac

# shellcheck shell=bash
# Sourced by devcluster.sh: a second Slurm cluster on the same machine, beside the shared one
# (issue 21's scale runs: 64 slurmd while everyone's tests use the 4-node cluster).
#
#   devcluster.sh up --instance scale --nodes 64     start it (idempotent), wait until idle
#   devcluster.sh status --instance scale            its daemons and sinfo
#   devcluster.sh down --instance scale              cancel its jobs, stop its daemons
#
# An instance has its own ClusterName (NAME), slurmctld and slurmd ports (--port-base P: the
# controller on P, node i on P+i), slurm.conf (/etc/slurm-NAME/slurm.conf: clients use it
# through SLURM_CONF), state, pid files and logs ($STATE_DIR/instances/NAME,
# $LOG_DIR/NAME) and node names (NAME1..NAMEn). It never starts, stops or reconfigures
# anything of the shared cluster: it uses the shared munged and slurmdbd (accounting as
# cluster NAME; sacct is where hpcdl and submitit read job states), which must be up.

NODE_COUNT=""        # --nodes (up); otherwise what the instance was last started with
PORT_BASE=18000      # --port-base
FIRST_JOB_ID=10000000

parse_instance_options() {
    while (($#)); do
        case $1 in
            --instance) INSTANCE=${2:-}; shift 2 || die "--instance needs a NAME" ;;
            --instance=*) INSTANCE=${1#*=}; shift ;;
            --nodes) NODE_COUNT=${2:-}; shift 2 || die "--nodes needs a number" ;;
            --nodes=*) NODE_COUNT=${1#*=}; shift ;;
            --port-base) PORT_BASE=${2:-}; shift 2 || die "--port-base needs a port" ;;
            --port-base=*) PORT_BASE=${1#*=}; shift ;;
            *) die "unknown option '$1' (allowed: --instance NAME, --nodes N, --port-base P)" ;;
        esac
    done
    if [[ -z $INSTANCE ]]; then
        # The shared cluster keeps its four nodes: the tests and the site profile devcluster
        # describe them (GPUs on node3-4, features), and resizing it would restart everyone's
        # jobs.
        [[ -z $NODE_COUNT || $NODE_COUNT == "${#NODES[@]}" ]] ||
            die "--nodes needs --instance NAME: the shared cluster keeps its ${#NODES[@]} nodes (a bigger cluster is a separate instance)"
        return 0
    fi
    [[ $INSTANCE =~ ^[a-z][a-z0-9]{0,15}$ && $INSTANCE != "$CLUSTER" ]] ||
        die "--instance: '$INSTANCE' is not allowed (a-z then a-z/0-9, at most 16 characters, not '$CLUSTER')"
    [[ -z $NODE_COUNT || ($NODE_COUNT =~ ^[0-9]+$ && $NODE_COUNT -ge 1 && $NODE_COUNT -le 512) ]] ||
        die "--nodes: '$NODE_COUNT' is not allowed (1 to 512)"
    [[ $PORT_BASE =~ ^[0-9]+$ && $PORT_BASE -ge 1024 && $PORT_BASE -le 65000 ]] ||
        die "--port-base: '$PORT_BASE' is not allowed (1024 to 65000)"
    use_instance
}

# use_instance: point every path, name and port of devcluster.sh at the instance.
use_instance() {
    CLUSTER=$INSTANCE
    STATE_DIR=$BASE_STATE_DIR/instances/$INSTANCE
    LOG_DIR=${DEVCLUSTER_LOG_DIR:-/var/log/hpcdl-devcluster}/$INSTANCE
    CONF_DIR=/etc/slurm-$INSTANCE
    PID_DIR=$STATE_DIR/pids
    # The daemons' command names are islurmctld/islurmd (symlinks to Slurm's programs,
    # make_instance_bin): a devcluster.sh that knows nothing of instances (another checkout's)
    # takes any slurmctld or slurmd it did not start for a stranger and refuses to start the
    # shared cluster. Their argv[0] stays slurmctld/slurmd: Slurm decides by it that it runs
    # as that daemon (an islurmctld argv[0] segfaults at start).
    CTLD_KEY=islurmctld SLURMD_KEY=islurmd
    CTLD_BIN=$STATE_DIR/bin/start-islurmctld SLURMD_BIN=$STATE_DIR/bin/start-islurmd
    export SLURM_CONF=$CONF_DIR/slurm.conf
    local size_file=$STATE_DIR/size ports_file=$STATE_DIR/port-base
    if [[ -z $NODE_COUNT ]]; then   # down/status, or up again: the size it was started with
        NODE_COUNT=$(cat "$size_file" 2>/dev/null || echo 4)
        [[ -r $ports_file ]] && PORT_BASE=$(cat "$ports_file")
    fi
    local i
    NODES=()
    for ((i = 1; i <= NODE_COUNT; i++)); do NODES+=("$INSTANCE$i"); done
}

render_instance() {
    [[ $1 == slurm.conf ]] || die "an instance has no $1"
    local last=$((PORT_BASE + NODE_COUNT)) spec ports
    if ((NODE_COUNT == 1)); then spec=${INSTANCE}1 ports=$((PORT_BASE + 1))
    else spec="$INSTANCE[1-$NODE_COUNT]" ports="[$((PORT_BASE + 1))-$last]"; fi
    sed -e "s|@STATE_DIR@|$STATE_DIR|g" -e "s|@LOG_DIR@|$LOG_DIR|g" \
        -e "s|@CLUSTER@|$INSTANCE|g" -e "s|@CTLD_PORT@|$PORT_BASE|g" \
        -e "s|@NODE_COUNT@|$NODE_COUNT|g" -e "s|@NODE_SPEC@|$spec|g" -e "s|@PORT_SPEC@|$ports|g" \
        -e "s|@FIRST_JOB_ID@|$FIRST_JOB_ID|g" -e "s|@CONF@|$SLURM_CONF|g" \
        "$HERE/slurm-instance.conf.in"
}

make_instance_bin() {
    mkdir -p "$STATE_DIR/bin"
    local d
    for d in slurmctld slurmd; do
        ln -sfn "/usr/sbin/$d" "$STATE_DIR/bin/i$d"
        printf '#!/bin/bash\nexec -a %s %q "$@"\n' "$d" "$STATE_DIR/bin/i$d" >"$STATE_DIR/bin/start-i$d"
        chmod 755 "$STATE_DIR/bin/start-i$d"
    done
}

# port_taken PORT: something listens on PORT (TCP) that is not this instance's own daemon.
port_taken() {
    ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
}

cmd_up_instance() {
    need_root
    make_dirs
    exec 9>"$STATE_DIR/lock"
    flock -w 300 9 || die "another devcluster.sh holds $STATE_DIR/lock"
    [[ -x /usr/sbin/slurmctld ]] || die "Slurm is not installed: run 'devcluster.sh up' (the shared cluster) first"
    munge_ok || die "munged does not answer: run 'devcluster.sh up' (the shared cluster) first"

    local slurm_changed=0 n port
    install_conf slurm.conf 644 && slurm_changed=1   # sacctmgr below reads it
    dbd_ok || die "the shared slurmdbd does not answer: run 'devcluster.sh up' (the shared cluster) first"
    make_instance_bin
    if ((slurm_changed)); then   # new size or ports: restart this instance (only)
        for key in "$PID_DIR/$SLURMD_KEY"-*; do [[ -e $key ]] && stop_pid "${key##*/}"; done
        stop_pid $CTLD_KEY
    fi
    echo "$NODE_COUNT" >"$STATE_DIR/size"
    echo "$PORT_BASE" >"$STATE_DIR/port-base"
    # A port held by someone else makes a daemon die with a bind error in its log; say which.
    [[ -n $(recorded_pid $CTLD_KEY) ]] || ! port_taken "$PORT_BASE" ||
        die "port $PORT_BASE (slurmctld) is in use: choose another --port-base"
    for ((n = 1; n <= NODE_COUNT; n++)); do
        port=$((PORT_BASE + n))
        [[ -n $(recorded_pid "$SLURMD_KEY-$INSTANCE$n") ]] || ! port_taken "$port" ||
            die "port $port (slurmd $INSTANCE$n) is in use: choose another --port-base"
    done

    ensure_accounting   # cluster $INSTANCE in the shared slurmdbd, root's association
    start_slurmctld
    start_slurmds
    TIMEOUT=$((TIMEOUT > NODE_COUNT * 2 ? TIMEOUT : NODE_COUNT * 2))
    wait_nodes
    if ((CHANGED)); then
        say "instance $INSTANCE up in $((SECONDS - STARTED_AT))s: $NODE_COUNT nodes idle (partition cpu)"
    else
        say "instance $INSTANCE already up (nothing changed)"
    fi
    say "clients: export SLURM_CONF=$SLURM_CONF"
}

cmd_down_instance() {
    need_root
    mkdir -p "$STATE_DIR" "$PID_DIR"
    exec 9>"$STATE_DIR/lock"
    flock -w 300 9 || die "another devcluster.sh holds $STATE_DIR/lock"
    if [[ -n $(recorded_pid $CTLD_KEY) ]] && ctld_ok; then
        local jobs i
        jobs=$(timeout 10 squeue -h -o '%A' 2>/dev/null | sort -u | tr '\n' ' ' || true)
        if [[ -n ${jobs// /} ]]; then
            say "cancelling the jobs of $INSTANCE"
            # shellcheck disable=SC2086
            timeout 30 scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 60; i++)); do
                [[ -z $(timeout 10 squeue -h -o '%A' 2>/dev/null || true) ]] && break
                sleep 0.5
            done
        fi
    fi
    local key
    for key in "$PID_DIR/$SLURMD_KEY"-*; do [[ -e $key ]] && stop_pid "${key##*/}"; done
    stop_pid $CTLD_KEY
    say "instance $INSTANCE down (the shared cluster, munged and slurmdbd untouched)"
}

cmd_status_instance() {
    local ok=0 key pid up=0
    echo "devcluster instance $INSTANCE ($SLURM_CONF):"
    for key in $CTLD_KEY "${NODES[@]/#/$SLURMD_KEY-}"; do
        pid=$(recorded_pid "$key")
        if [[ -n $pid ]]; then up=$((up + 1)); else printf '  %-14s NOT RUNNING\n' "$key"; ok=1; fi
    done
    printf '  %d of %d daemons running (slurmctld and %d slurmd)\n' "$up" "$((NODE_COUNT + 1))" "$NODE_COUNT"
    if [[ -n $(recorded_pid $CTLD_KEY) ]]; then
        timeout 10 sinfo 2>&1 | sed 's/^/  /' || ok=1
        nodes_ready || ok=1
    fi
    if ((ok == 0)); then echo "devcluster $INSTANCE: up"; else echo "devcluster $INSTANCE: not up"; fi
    return "$ok"
}

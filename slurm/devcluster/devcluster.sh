#!/usr/bin/env bash
# hpcdl devcluster: a real Slurm 22.05 cluster on one machine, for development and tests.
#
#   devcluster.sh up       install packages if missing, write configs, start every daemon,
#                          wait until node1..node7 are idle (idempotent)
#   devcluster.sh down     cancel jobs, stop only the daemons that `up` started
#   devcluster.sh status   show daemons and sinfo; exit 0 when everything is up, 1 otherwise
#   devcluster.sh postgres start (idempotent) the study database: a PostgreSQL server on
#                          127.0.0.1:$PG_PORT with a role and a database for hpcdl-alice,
#                          the password in ~hpcdl-alice/.hpcdl/pgpassword (0600); `up` runs it
#   devcluster.sh grant PATH...
#                          let the test users reach PATH (search permission, by ACL, on every
#                          parent directory they cannot cross), e.g. a venv under /root
#   devcluster.sh up|down|status --instance NAME [--nodes N] [--port-base P]
#                          a second cluster beside the shared one (N slurmd, default 4, ports
#                          P..P+N, default 18000; clients: SLURM_CONF=/etc/slurm-NAME/slurm.conf)
#
# Needs root (it writes /etc/slurm, /etc/hosts and starts daemons). Works without systemd:
# every daemon is started directly in the foreground under setsid, its PID recorded in
# $DEVCLUSTER_STATE_DIR/pids/. See README.md beside this file.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CLUSTER=devcluster
STATE_DIR=${DEVCLUSTER_STATE_DIR:-/var/lib/hpcdl-devcluster}
LOG_DIR=${DEVCLUSTER_LOG_DIR:-/var/log/hpcdl-devcluster}
TIMEOUT=${DEVCLUSTER_TIMEOUT:-60}
# /etc/slurm is where every Slurm client looks by default; another directory (for the
# script's own tests) is exported as SLURM_CONF to the daemons and clients started here.
CONF_DIR=${DEVCLUSTER_CONF_DIR:-/etc/slurm}
[[ $CONF_DIR == /etc/slurm ]] || export SLURM_CONF=$CONF_DIR/slurm.conf
PID_DIR=$STATE_DIR/pids
BASE_STATE_DIR=$STATE_DIR   # instances live under it (instance.sh)
INSTANCE=""                 # empty: the shared cluster; else `--instance NAME` (instance.sh)
# Keys (and command names) of the Slurm daemons and their programs; an instance's differ
# (instance.sh), so that this script's checks for foreign daemons never see another cluster's.
CTLD_KEY=slurmctld SLURMD_KEY=slurmd CTLD_BIN=/usr/sbin/slurmctld SLURMD_BIN=/usr/sbin/slurmd
MARKER='# managed by hpcdl devcluster'
HOSTS_MARKER='# hpcdl devcluster nodes'
NODES=(node1 node2 node3 node4 node5 node6 node7)  # node5-7: the hidden `fault` partition
DB_USER=slurm
DB_PASS=${DEVCLUSTER_DB_PASS:-hpcdl-devcluster}
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server lmod acl sudo postgresql openssh-server rsync chromium)  # postgresql: the study-database tests; openssh-server, rsync: remote mode and tunnels; chromium: the dashboard tests (headless)
# Unprivileged users, as on a real site: the tests submit as USERS[0] and try to reach its
# files as USERS[1]. They share one primary group, the harsher case (a group-readable file is
# readable by the other user), as on sites that give a project one group. OPERATOR is a Slurm
# administrator (sacctmgr AdminLevel) without Unix privileges, for the test steps that change
# node states or raise a job's time limit.
USERS=(hpcdl-alice hpcdl-bob)
OPERATOR=hpcdl-op
GROUP=hpcdl-users
ACCOUNT=hpcdl
SUDOERS=/etc/sudoers.d/hpcdl-devcluster

# The study database (issue 21): a server of its own (not Debian's 'main' cluster, which
# listens on 5432 when started), data and socket under STATE_DIR, loopback only.
PG_PORT=${DEVCLUSTER_PG_PORT:-5433}
PG_DATA=$STATE_DIR/postgres/data
PG_RUN=$STATE_DIR/postgres/run
PG_USER=${USERS[0]}               # one role per user, as a site would; its own database
PG_DB=hpo_${USERS[0]//-/_}

CHANGED=0          # set to 1 by every action `up` takes
STARTED_AT=$SECONDS

say() { echo "devcluster: $*"; }
warn() { echo "devcluster: $*" >&2; }
die() { echo "devcluster: error: $*" >&2; exit 1; }

need_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (it writes /etc/slurm, /etc/hosts and starts daemons)"
}

# ---------------------------------------------------------------- processes

# pid_alive PID COMM: PID is a live (non-zombie) process whose command name is COMM.
pid_alive() {
    local pid=$1 comm=$2 c stat
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    { read -r c <"/proc/$pid/comm"; } 2>/dev/null || return 1
    [[ $c == "$comm" ]] || return 1
    { read -r stat <"/proc/$pid/stat"; } 2>/dev/null || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z && ${stat:0:1} != X ]]
}

# Daemon keys: munged mariadbd slurmdbd slurmctld slurmd-node1..7. The key's prefix
# before '-' is the process command name.
comm_of() { echo "${1%%-*}"; }
log_of() { echo "$LOG_DIR/$1.log"; }

# recorded_pid KEY: the PID `up` recorded for KEY if that process still runs, else nothing.
recorded_pid() {
    local key=$1 pid
    [[ -r $PID_DIR/$key ]] || return 0
    pid=$(cat "$PID_DIR/$key" 2>/dev/null || true)
    if pid_alive "$pid" "$(comm_of "$key")"; then echo "$pid"; fi
}

# procs_named COMM: PIDs of live processes with command name COMM.
procs_named() {
    local d pid
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        if pid_alive "$pid" "$1"; then echo "$pid"; fi
    done
}

# slurmd_node PID: the node name given to that slurmd with -N (empty if none).
slurmd_node() {
    local -a args
    mapfile -d '' -t args <"/proc/$1/cmdline" 2>/dev/null || return 0
    local i
    for ((i = 0; i < ${#args[@]}; i++)); do
        if [[ ${args[i]} == -N ]]; then echo "${args[i + 1]:-}"; return 0; fi
        if [[ ${args[i]} == -N?* ]]; then echo "${args[i]#-N}"; return 0; fi
    done
}

# start_daemon KEY CMD...: start a foreground daemon in its own session, output appended
# to the KEY log, record its PID, and fail (with the log) if it dies within a second.
# fd 9 (the lock held by `up`) is closed so that the daemon does not keep the lock.
start_daemon() {
    local key=$1; shift
    local log pid i
    log=$(log_of "$key")
    echo "=== $(date '+%F %T') devcluster: starting $key: $*" >>"$log"
    setsid "$@" >>"$log" 2>&1 </dev/null 9>&- &
    pid=$!
    echo "$pid" >"$PID_DIR/$key"
    CHANGED=1
    for ((i = 0; i < 10; i++)); do
        sleep 0.1
        pid_alive "$pid" "$(comm_of "$key")" || fail_daemon "$key" "exited right after start"
    done
    say "started $key (pid $pid)"
}

# start_slurm_daemon KEY PIDFILE CMD...: start a Slurm daemon that detaches itself (so it
# logs with timestamps to its LogFile, and slurmstepd logs beside slurmd's), then record
# the PID it writes to PIDFILE. Errors before it detaches land in the same log.
start_slurm_daemon() {
    local key=$1 pidfile=$2; shift 2
    local log pid="" i
    log=$(log_of "$key")
    rm -f "$pidfile"
    echo "=== $(date '+%F %T') devcluster: starting $key: $*" >>"$log"
    CHANGED=1
    "$@" >>"$log" 2>&1 </dev/null 9>&- || fail_daemon "$key" "failed to start (exit $?)"
    for ((i = 0; i < 100; i++)); do
        pid=$(cat "$pidfile" 2>/dev/null || true)
        pid_alive "$pid" "$(comm_of "$key")" && break
        pid=""
        sleep 0.1
    done
    [[ -n $pid ]] || fail_daemon "$key" "did not write $pidfile within 10s"
    echo "$pid" >"$PID_DIR/$key"
    say "started $key (pid $pid)"
}

# fail_daemon KEY WHY: report which daemon failed with the end of its log, exit 1.
fail_daemon() {
    local key=$1 why=$2 log
    log=$(log_of "$key")
    warn "error: $key $why"
    if [[ -r $log ]]; then
        warn "last 30 lines of $log:"
        tail -n 30 "$log" | sed 's/^/    /' >&2
    fi
    exit 1
}

# stop_pid KEY: SIGTERM the recorded process of KEY, SIGKILL after 20 s; forget it.
stop_pid() {
    local key=$1 pid i
    pid=$(recorded_pid "$key")
    if [[ -n $pid ]]; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 200; i++)); do
            pid_alive "$pid" "$(comm_of "$key")" || break
            sleep 0.1
        done
        if pid_alive "$pid" "$(comm_of "$key")"; then
            warn "$key (pid $pid) ignored SIGTERM for 20 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
        fi
        say "stopped $key (pid $pid)"
    fi
    rm -f "$PID_DIR/$key"
}

# wait_for SECONDS KEY CMD...: retry CMD until it succeeds; fail KEY's start otherwise.
# The daemon's liveness is checked on every round, so a crash is reported at once.
wait_for() {
    local secs=$1 key=$2; shift 2
    local deadline=$((SECONDS + secs)) pid
    pid=$(cat "$PID_DIR/$key" 2>/dev/null || true)
    until "$@" >/dev/null 2>&1; do
        if [[ -n $pid ]] && ! pid_alive "$pid" "$(comm_of "$key")"; then
            fail_daemon "$key" "died during startup"
        fi
        ((SECONDS < deadline)) || fail_daemon "$key" "did not become ready within ${secs}s"
        sleep 0.5
    done
}

# ---------------------------------------------------------------- checks

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
pg_bin() { local b; b=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1); echo "${b:-/usr/lib/postgresql/15/bin}"; }
pg_ok() { "$(pg_bin)/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -t 2; }
mysql_ok() { mysqladmin --connect-timeout=2 ping >/dev/null 2>&1; }
dbd_ok() { timeout 10 sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1; }
ctld_ok() { timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }

# node_states: "NODE STATE" lines, one per node (long state names, '*' = not responding).
node_states() { timeout 10 sinfo -a -h -N -o '%N %T' 2>/dev/null | sort -u; }  # -a: the hidden partition's nodes too

# nodes_ready: every node of the cluster is responding and usable.
nodes_ready() {
    local states node st n=0
    states=$(node_states) || return 1
    while read -r node st; do
        [[ -n $node ]] || continue
        case $st in
            idle | mixed | allocated | completing) n=$((n + 1)) ;;
            *) return 1 ;;
        esac
    done <<<"$states"
    ((n == ${#NODES[@]}))
}

# ---------------------------------------------------------------- up: steps

install_packages() {
    local -a missing=()
    local p
    command -v dpkg-query >/dev/null || die "dpkg-query not found: devcluster needs Debian/Ubuntu"
    for p in "${PACKAGES[@]}"; do
        [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true) == installed ]] || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    say "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # Update the package lists only when the install cannot work without it.
    if ! apt-get install -y -q -o DPkg::Lock::Timeout=300 "${missing[@]}" >"$LOG_DIR/apt.log" 2>&1; then
        apt-get update -q -o DPkg::Lock::Timeout=300 >>"$LOG_DIR/apt.log" 2>&1 || { tail -n 30 "$LOG_DIR/apt.log" >&2; die "apt-get update failed"; }
        apt-get install -y -q -o DPkg::Lock::Timeout=300 "${missing[@]}" >>"$LOG_DIR/apt.log" 2>&1 || { tail -n 30 "$LOG_DIR/apt.log" >&2; die "apt-get install ${missing[*]} failed"; }
    fi
    CHANGED=1
}

make_dirs() {
    mkdir -p "$STATE_DIR" "$PID_DIR" "$STATE_DIR/run" "$STATE_DIR/slurmctld" "$LOG_DIR" "$CONF_DIR"
    local n
    for n in "${NODES[@]}"; do mkdir -p "$STATE_DIR/slurmd/$n"; done
}

# Fake GPU devices: character devices like /dev/null (major 1, minor 3).
make_gpu_devices() {
    local i dev
    for i in 0 1; do
        dev=$STATE_DIR/gpu$i
        if [[ ! -c $dev ]]; then
            rm -f "$dev"
            mknod "$dev" c 1 3
            chmod 666 "$dev"
            CHANGED=1
        fi
    done
}

# /etc/hosts: node names resolve to 127.0.0.1 (a job can use its first node as rendezvous).
ensure_hosts() {
    local line="127.0.0.1 ${NODES[*]} $HOSTS_MARKER"
    grep -qxF "$line" /etc/hosts 2>/dev/null && return 0
    local tmp
    tmp=$(grep -vF "$HOSTS_MARKER" /etc/hosts 2>/dev/null || true)
    # Rewrite in place (not by rename): /etc/hosts is often a bind mount in containers.
    printf '%s\n%s\n' "$tmp" "$line" | sed '/./,$!d' >/etc/hosts
    CHANGED=1
    say "added node names to /etc/hosts"
}

render() {
    if [[ -n $INSTANCE ]]; then render_instance "$1"; return; fi
    sed -e "s|@STATE_DIR@|$STATE_DIR|g" -e "s|@LOG_DIR@|$LOG_DIR|g" \
        -e "s|@DB_USER@|$DB_USER|g" -e "s|@DB_PASS@|$DB_PASS|g" "$HERE/$1.in"
}

# install_conf NAME MODE: write /etc/slurm/NAME from NAME.in if it differs.
# Returns 0 when the file was (re)written, 1 when already up to date.
install_conf() {
    local name=$1 mode=$2 dest=$CONF_DIR/$1 new
    new=$(render "$name")
    if [[ -e $dest ]]; then
        grep -qF "$MARKER" "$dest" ||
            die "$dest exists and was not written by devcluster (no '$MARKER' line); move it away first"
        if [[ $(cat "$dest") == "$new" && $(stat -c '%a %U' "$dest") == "$mode root" ]]; then
            return 1
        fi
    fi
    (umask 077 && printf '%s\n' "$new" >"$dest.devcluster.tmp")
    chown root:root "$dest.devcluster.tmp"
    chmod "$mode" "$dest.devcluster.tmp"
    mv -f "$dest.devcluster.tmp" "$dest"
    CHANGED=1
    say "wrote $dest"
    return 0
}

# Refuse to run next to Slurm daemons that this script did not start.
check_foreign_daemons() {
    local comm pid key
    for comm in slurmctld slurmdbd; do
        for pid in $(procs_named "$comm"); do
            [[ $pid == "$(recorded_pid "$comm")" ]] ||
                die "$comm is already running (pid $pid) but was not started by devcluster; stop it first"
        done
    done
    for pid in $(procs_named slurmd); do
        key=slurmd-$(slurmd_node "$pid")
        [[ $pid == "$(recorded_pid "$key")" ]] ||
            die "slurmd is already running (pid $pid) but was not started by devcluster; stop it first"
    done
}

start_munge() {
    if munge_ok; then return 0; fi
    local pid
    pid=$(recorded_pid munged)
    [[ -z $pid ]] || fail_daemon munged "is running (pid $pid) but does not answer"
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
        CHANGED=1
    fi
    chown -R munge:munge /etc/munge
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    # --force: a stale socket from an unclean stop must not block the start.
    start_daemon munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F --force
    wait_for 20 munged munge_ok
}

start_mariadb() {
    if mysql_ok; then return 0; fi
    local pid
    pid=$(recorded_pid mariadbd)
    [[ -z $pid ]] || fail_daemon mariadbd "is running (pid $pid) but does not answer"
    mkdir -p /run/mysqld
    chown mysql:mysql /run/mysqld
    if [[ ! -d /var/lib/mysql/mysql ]]; then
        say "initialising /var/lib/mysql"
        mkdir -p /var/lib/mysql
        chown mysql:mysql /var/lib/mysql
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql >>"$(log_of mariadbd)" 2>&1 ||
            fail_daemon mariadbd "could not initialise /var/lib/mysql"
    fi
    # Started directly: in containers policy-rc.d usually denies invoke-rc.d/service.
    start_daemon mariadbd /usr/sbin/mariadbd --user=mysql
    wait_for 60 mariadbd mysql_ok
}

ensure_db_user() {
    mysql --batch <<SQL || die "could not create the '$DB_USER' database user"
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
SQL
}

start_slurmdbd() {
    if [[ -n $(recorded_pid slurmdbd) ]] && dbd_ok; then return 0; fi
    [[ -z $(recorded_pid slurmdbd) ]] || stop_pid slurmdbd
    ensure_db_user
    start_slurm_daemon slurmdbd "$STATE_DIR/run/slurmdbd.pid" /usr/sbin/slurmdbd
    wait_for 60 slurmdbd dbd_ok
}

ensure_accounting() {
    local out
    out=$(timeout 10 sacctmgr -n -P list cluster format=cluster) || die "sacctmgr list cluster failed"
    if ! grep -qx "$CLUSTER" <<<"$out"; then
        timeout 30 sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
        CHANGED=1
        say "added cluster $CLUSTER to the accounting database"
    fi
    # Adding a cluster gives root an association under account root; make sure of it.
    out=$(timeout 10 sacctmgr -n -P list assoc cluster="$CLUSTER" user=root format=user) || die "sacctmgr list assoc failed"
    if ! grep -qx root <<<"$out"; then
        timeout 30 sacctmgr -i add user root account=root cluster="$CLUSTER" >/dev/null ||
            die "sacctmgr add user root failed"
        CHANGED=1
        say "added an association for root"
    fi
}

# ensure_users: the test users and their group (homes under /home, 0700, login shell bash).
ensure_users() {
    local u
    if ! getent group "$GROUP" >/dev/null; then
        groupadd "$GROUP" || die "groupadd $GROUP failed"
        CHANGED=1
        say "added group $GROUP"
    fi
    for u in "${USERS[@]}" "$OPERATOR"; do
        if ! getent passwd "$u" >/dev/null; then
            useradd --create-home --home-dir "/home/$u" --shell /bin/bash --gid "$GROUP" "$u" ||
                die "useradd $u failed"
            CHANGED=1
            say "added user $u (group $GROUP)"
        fi
        chmod 700 "/home/$u"
    done
}

# ensure_prolog: the Prolog of slurm.conf (prolog.sh.in: fails a node's next launch when a test
# asks) and the folder where the test users' group asks (sticky: each removes only its own).
ensure_prolog() {
    local dest=$STATE_DIR/prolog.sh new
    new=$(render prolog.sh)
    if [[ ! -f $dest || $(cat "$dest") != "$new" ]]; then
        printf '%s\n' "$new" >"$dest.tmp" && chmod 755 "$dest.tmp" && mv -f "$dest.tmp" "$dest"
        CHANGED=1
        say "wrote $dest"
    fi
    mkdir -p "$STATE_DIR/fail-launch"
    chown "root:$GROUP" "$STATE_DIR/fail-launch"
    chmod 1770 "$STATE_DIR/fail-launch"
}

# ensure_sudoers: the test users may run scontrol as the operator, and nothing else: tests
# that run as a user set a node DOWN that way (sudo -n -u hpcdl-op scontrol update NodeName=...).
ensure_sudoers() {
    local users new
    users=$(IFS=,; echo "${USERS[*]}")
    new="$MARKER
$users ALL=($OPERATOR) NOPASSWD: $(command -v scontrol)"
    [[ -r $SUDOERS && $(cat "$SUDOERS") == "$new" ]] && return 0
    (umask 077 && printf '%s\n' "$new" >"$SUDOERS.devcluster.tmp")
    chmod 440 "$SUDOERS.devcluster.tmp"
    visudo -cqf "$SUDOERS.devcluster.tmp" || { rm -f "$SUDOERS.devcluster.tmp"; die "visudo rejected $SUDOERS"; }
    mv -f "$SUDOERS.devcluster.tmp" "$SUDOERS"
    CHANGED=1
    say "wrote $SUDOERS (${USERS[*]} may run scontrol as $OPERATOR)"
}

# ensure_user_accounting: an account for the test users and their associations, and the
# operator's admin level. Jobs of users without an association are accepted while
# AccountingStorageEnforce is unset (as here), but a site that enforces it needs them, and
# sacct/sreport then show the right account.
ensure_user_accounting() {
    local out u
    out=$(timeout 10 sacctmgr -n -P list account format=account) || die "sacctmgr list account failed"
    if ! grep -qx "$ACCOUNT" <<<"$out"; then
        timeout 30 sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" \
            description="hpcdl test users" organization=hpcdl >/dev/null ||
            die "sacctmgr add account $ACCOUNT failed"
        CHANGED=1
        say "added account $ACCOUNT"
    fi
    out=$(timeout 10 sacctmgr -n -P list assoc cluster="$CLUSTER" account="$ACCOUNT" format=user) ||
        die "sacctmgr list assoc failed"
    for u in "${USERS[@]}" "$OPERATOR"; do
        grep -qx "$u" <<<"$out" && continue
        timeout 30 sacctmgr -i add user "$u" account="$ACCOUNT" cluster="$CLUSTER" >/dev/null ||
            die "sacctmgr add user $u failed"
        CHANGED=1
        say "added $u to account $ACCOUNT"
    done
    out=$(timeout 10 sacctmgr -n -P show user "$OPERATOR" format=adminlevel) || die "sacctmgr show user failed"
    if [[ $out != Administrator ]]; then
        timeout 30 sacctmgr -i modify user "$OPERATOR" set adminlevel=Administrator >/dev/null ||
            die "sacctmgr modify user $OPERATOR failed"
        CHANGED=1
        say "made $OPERATOR a Slurm administrator (AdminLevel=Administrator)"
    fi
}

start_slurmctld() {
    if [[ -n $(recorded_pid $CTLD_KEY) ]]; then
        wait_for 30 $CTLD_KEY ctld_ok
        return 0
    fi
    start_slurm_daemon $CTLD_KEY "$STATE_DIR/run/slurmctld.pid" $CTLD_BIN
    wait_for 60 $CTLD_KEY ctld_ok
}

start_slurmds() {
    local n
    for n in "${NODES[@]}"; do
        [[ -n $(recorded_pid "$SLURMD_KEY-$n") ]] && continue
        start_slurm_daemon "$SLURMD_KEY-$n" "$STATE_DIR/run/slurmd-$n.pid" $SLURMD_BIN -N "$n"
    done
}

# Wait until all nodes are idle (or busy); resume nodes left DOWN/DRAINED by an earlier run.
wait_nodes() {
    local deadline=$((SECONDS + TIMEOUT)) states node st key resumed=""
    while ! nodes_ready; do
        for key in $CTLD_KEY "${NODES[@]/#/$SLURMD_KEY-}"; do
            [[ -n $(recorded_pid "$key") ]] || fail_daemon "$key" "died while waiting for the nodes"
        done
        states=$(node_states || true)
        while read -r node st; do
            [[ -n $node ]] || continue
            case $st in
                *'*') ;; # not responding yet
                down* | drain* | fail* | inval*)
                    if [[ " $resumed " != *" $node "* ]]; then
                        say "resuming $node (was $st)"
                        timeout 10 scontrol update nodename="$node" state=resume || true
                        resumed+=" $node"
                        CHANGED=1
                    fi
                    ;;
            esac
        done <<<"$states"
        if ((SECONDS >= deadline)); then
            warn "error: nodes not idle after ${TIMEOUT}s:"
            printf '    %s\n' "${states//$'\n'/$'\n'    }" >&2
            for node in "${NODES[@]}"; do
                if ! grep -Eq "^$node (idle|mixed|allocated|completing)\$" <<<"$states"; then
                    fail_daemon "$SLURMD_KEY-$node" "did not register as idle (state: $(awk -v n="$node" '$1==n {print $2}' <<<"$states"))"
                fi
            done
            fail_daemon $CTLD_KEY "nodes did not become idle"
        fi
        sleep 0.5
    done
}

# ---------------------------------------------------------------- postgres

# psql_pg SQL...: run SQL as the server's superuser over its private socket.
psql_pg() {
    setpriv --reuid=postgres --regid=postgres --init-groups \
        "$(pg_bin)/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_RUN" -p "$PG_PORT" -U postgres -d postgres "$@"
}

start_postgres() {
    if pg_ok; then return 0; fi
    local pid
    pid=$(recorded_pid postgres)
    [[ -z $pid ]] || fail_daemon postgres "is running (pid $pid) but does not answer"
    mkdir -p "$PG_RUN" "$(dirname "$PG_DATA")"
    chown postgres:postgres "$(dirname "$PG_DATA")" "$PG_RUN"
    chmod 700 "$(dirname "$PG_DATA")"
    if [[ ! -s $PG_DATA/PG_VERSION ]]; then
        say "initialising $PG_DATA"
        # Local (socket) connections: the postgres system user only (peer); TCP: passwords.
        setpriv --reuid=postgres --regid=postgres --init-groups "$(pg_bin)/initdb" -D "$PG_DATA" \
            -U postgres --auth-local=peer --auth-host=scram-sha-256 -E UTF8 \
            >>"$(log_of postgres)" 2>&1 || fail_daemon postgres "initdb failed"
        CHANGED=1
    fi
    # max_connections: every sweep worker holds one connection (pool_size 1) while it runs.
    start_daemon postgres setpriv --reuid=postgres --regid=postgres --init-groups \
        "$(pg_bin)/postgres" -D "$PG_DATA" -c listen_addresses=127.0.0.1 -p "$PG_PORT" \
        -c unix_socket_directories="$PG_RUN" -c max_connections=300
    wait_for 60 postgres pg_ok
}

# ensure_pg_user: the role and database of USERS[0]; the password (random once, kept) in a
# 0600 file of that user's, and the storage setting a sweep spec can point at beside it.
ensure_pg_user() {
    local home dir pwfile pw
    home=$(getent passwd "$PG_USER" | cut -d: -f6)
    dir=$home/.hpcdl
    pwfile=$dir/pgpassword
    setpriv --reuid="$PG_USER" --regid="$GROUP" --init-groups mkdir -p -m 700 "$dir"
    if [[ ! -s $pwfile ]]; then
        (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=\n' >"$pwfile.tmp")
        chown "$PG_USER:$GROUP" "$pwfile.tmp"
        mv -f "$pwfile.tmp" "$pwfile"
        CHANGED=1
        say "wrote $pwfile (0600)"
    fi
    chown "$PG_USER:$GROUP" "$pwfile"
    chmod 600 "$pwfile"
    pw=$(head -n 1 "$pwfile")
    # The password goes to psql on stdin (never on a command line other users can read).
    psql_pg <<SQL || die "could not create the PostgreSQL role and database for $PG_USER"
SELECT format('CREATE ROLE %I LOGIN', '$PG_USER') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER')\gexec
ALTER ROLE "$PG_USER" LOGIN PASSWORD '$pw';
SELECT format('CREATE DATABASE %I OWNER %I', '$PG_DB', '$PG_USER') WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PG_DB')\gexec
REVOKE ALL ON DATABASE "$PG_DB" FROM PUBLIC;
SQL
    local conf="url: postgresql://$PG_USER@127.0.0.1:$PG_PORT/$PG_DB
password_file: $pwfile"
    if [[ $(cat "$dir/study-database.yaml" 2>/dev/null) != "$conf" ]]; then
        printf '%s\n' "$conf" >"$dir/study-database.yaml"
        chown "$PG_USER:$GROUP" "$dir/study-database.yaml"
        chmod 600 "$dir/study-database.yaml"
        CHANGED=1
        say "wrote $dir/study-database.yaml (postgresql://$PG_USER@127.0.0.1:$PG_PORT/$PG_DB)"
    fi
}

# cmd_postgres: the study database alone (idempotent; `up` runs it after the users exist).
cmd_postgres() {
    need_root
    make_dirs
    exec 9>"$STATE_DIR/lock"
    flock -w 300 9 || die "another devcluster.sh holds $STATE_DIR/lock"
    install_packages
    ensure_users
    start_postgres
    ensure_pg_user
    say "study database: postgresql://$PG_USER@127.0.0.1:$PG_PORT/$PG_DB"
}


cmd_up() {
    need_root
    make_dirs
    exec 9>"$STATE_DIR/lock"
    flock -w 300 9 || die "another devcluster.sh holds $STATE_DIR/lock"

    install_packages
    make_gpu_devices
    ensure_hosts

    local slurm_changed=0 dbd_changed=0
    install_conf slurm.conf 644 && slurm_changed=1
    install_conf gres.conf 644 && slurm_changed=1
    install_conf slurmdbd.conf 600 && dbd_changed=1

    check_foreign_daemons
    # New configuration: restart what reads it.
    if ((slurm_changed)); then
        local n
        for n in "${NODES[@]}"; do stop_pid "slurmd-$n"; done
        stop_pid slurmctld
    fi
    ((dbd_changed)) && stop_pid slurmdbd

    start_munge
    start_mariadb
    start_slurmdbd
    ensure_accounting
    ensure_users
    ensure_prolog
    ensure_sudoers
    ensure_user_accounting
    start_slurmctld
    start_slurmds
    wait_nodes
    start_postgres
    ensure_pg_user

    if ((CHANGED)); then
        say "cluster up in $((SECONDS - STARTED_AT))s: ${#NODES[@]} nodes idle (partitions cpu, gpu, low, high; hidden: fault)"
    else
        say "cluster already up (nothing changed)"
    fi
}

# ---------------------------------------------------------------- down

cmd_down() {
    need_root
    mkdir -p "$STATE_DIR" "$PID_DIR"
    exec 9>"$STATE_DIR/lock"
    flock -w 300 9 || die "another devcluster.sh holds $STATE_DIR/lock"

    # Cancel the cluster's jobs first so no job step outlives its slurmd.
    if [[ -n $(recorded_pid slurmctld) ]] && ctld_ok; then
        local jobs i
        jobs=$(timeout 10 squeue -h -o '%A' 2>/dev/null | sort -u | tr '\n' ' ' || true)
        if [[ -n ${jobs// /} ]]; then
            say "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            timeout 10 scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 30; i++)); do
                [[ -z $(timeout 10 squeue -h -o '%A' 2>/dev/null || true) ]] && break
                sleep 0.5
            done
        fi
    fi
    local n
    for n in "${NODES[@]}"; do stop_pid "slurmd-$n"; done
    stop_pid slurmctld
    stop_pid slurmdbd
    stop_pid postgres   # only if `up` started it
    stop_pid mariadbd   # only if `up` started it
    stop_pid munged     # only if `up` started it
    say "cluster down"
}

# ---------------------------------------------------------------- status

cmd_status() {
    local ok=0 key pid
    report() { printf '  %-14s %s\n' "$1" "$2"; }
    echo "devcluster daemons:"
    pid=$(recorded_pid munged)
    if [[ -n $pid ]] && munge_ok; then report munged "running (pid $pid)"
    elif munge_ok; then report munged "running (not started by devcluster)"
    else report munged "NOT RUNNING"; ok=1; fi
    pid=$(recorded_pid mariadbd)
    if [[ -n $pid ]] && mysql_ok; then report mariadb "running (pid $pid)"
    elif mysql_ok; then report mariadb "running (not started by devcluster)"
    else report mariadb "NOT RUNNING"; ok=1; fi
    pid=$(recorded_pid postgres)
    if [[ -n $pid ]] && pg_ok; then report postgres "running (pid $pid), port $PG_PORT"
    else report postgres "NOT RUNNING"; ok=1; fi
    for key in slurmdbd slurmctld "${NODES[@]/#/slurmd-}"; do
        pid=$(recorded_pid "$key")
        if [[ -n $pid ]]; then report "$key" "running (pid $pid)"
        else report "$key" "NOT RUNNING"; ok=1; fi
    done
    if [[ -n $(recorded_pid slurmctld) ]]; then
        echo "sinfo:"
        timeout 10 sinfo 2>&1 | sed 's/^/  /' || ok=1
        nodes_ready || ok=1
    fi
    if ((ok == 0)); then echo "devcluster: up"; else echo "devcluster: not up"; fi
    return "$ok"
}

# ---------------------------------------------------------------- grant

# cmd_grant PATH...: give the group of the test users search permission (x, never read: they
# cannot list) on each parent directory of PATH they cannot cross, by an ACL entry, so that a
# Python under /root (pyenv) or a checkout in a private folder is usable by their jobs. Paths
# are resolved first (a venv's python is a symlink into its base interpreter).
cmd_grant() {
    need_root
    (($#)) || die "grant needs at least one PATH"
    getent group "$GROUP" >/dev/null || die "no group $GROUP: run 'devcluster.sh up' first"
    command -v setfacl >/dev/null || die "setfacl not found (apt-get install acl)"
    local path dir
    local -a chain
    for path in "$@"; do
        path=$(realpath -e -- "$path") || die "no such path: $path"
        dir=$path
        [[ -d $dir ]] || dir=$(dirname -- "$dir")
        chain=()
        while [[ $dir != / ]]; do chain=("$dir" "${chain[@]}"); dir=$(dirname -- "$dir"); done
        # From the top down: whether a user can cross a folder is only testable once its
        # parents are crossable.
        for dir in "${chain[@]}"; do
            if ! setpriv --reuid="${USERS[0]}" --regid="$GROUP" --clear-groups test -x "$dir"; then
                setfacl -m "g:$GROUP:--x" "$dir" || die "setfacl on $dir failed"
                say "granted $GROUP search permission on $dir"
            fi
        done
    done
}

usage() {
    sed -n '2,16s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

# shellcheck source=instance.sh
source "$HERE/instance.sh"

CMD=${1:-}
(($#)) && shift
case $CMD in up | down | status) parse_instance_options "$@" ;; esac

case $CMD in
    up) if [[ -n $INSTANCE ]]; then cmd_up_instance; else cmd_up; fi ;;
    down) if [[ -n $INSTANCE ]]; then cmd_down_instance; else cmd_down; fi ;;
    status) if [[ -n $INSTANCE ]]; then cmd_status_instance; else cmd_status; fi ;;
    postgres) cmd_postgres ;;
    grant) cmd_grant "$@" ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
esac

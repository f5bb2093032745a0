#!/usr/bin/env bash
# Stand up a single-node Slurm cluster on this machine, for the real-Slurm tests.
#
#   sudo tests/slurm/setup_cluster.sh [--no-accounting] [--no-install]
#
# - Installs Debian's slurm-wlm + munge (and slurmdbd + mariadb-server unless
#   --no-accounting) with apt-get when they are missing.
# - Writes /etc/slurm/{slurm.conf,gres.conf,cgroup.conf[,slurmdbd.conf]} (an existing
#   slurm.conf that this script did not write is backed up and restored by teardown).
# - One node named after this host with two fake A100s (gres gpu:a100:2 backed by
#   character devices made with mknod under the state dir), two partitions: `cpu`
#   (default) and `gpu`, both on that node.
# - Starts munged, [mariadbd, slurmdbd,] slurmctld, slurmd; records their PIDs in the
#   state dir; waits until `sinfo` reports the node idle.
# - Idempotent: if the cluster recorded in the state dir is already up, it says so and
#   exits 0; a half-dead one is torn down first.
#
# The last line printed is `SLURM_CLUSTER=started` or `SLURM_CLUSTER=running`.
# Environment: EVO_SLURM_STATE (state dir, default /tmp/evoformer-slurm),
# EVO_SLURM_CTLD_PORT / EVO_SLURM_D_PORT / EVO_SLURM_DBD_PORT (6817 / 6818 / 6819).
# Teardown: tests/slurm/teardown_cluster.sh (kills by recorded PID, cleans the state).
set -euo pipefail

STATE="${EVO_SLURM_STATE:-/tmp/evoformer-slurm}"
CTLD_PORT="${EVO_SLURM_CTLD_PORT:-6817}"
D_PORT="${EVO_SLURM_D_PORT:-6818}"
DBD_PORT="${EVO_SLURM_DBD_PORT:-6819}"
CLUSTER=evoci
ACCOUNT=evoci
MARKER="# written by evoformer-workflow tests/slurm/setup_cluster.sh"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

accounting=1
install=1
for arg in "$@"; do
    case "$arg" in
    --no-accounting) accounting=0 ;;
    --no-install) install=0 ;;
    -h | --help)
        sed -n '2,22p' "$0"
        exit 0
        ;;
    *)
        echo "unknown argument: $arg" >&2
        exit 2
        ;;
    esac
done

elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
log() { printf '[setup_cluster %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() {
    printf '[setup_cluster] ERROR: %s\n' "$*" >&2
    for f in "$STATE"/log/*.log; do
        [[ -f "$f" ]] || continue
        printf -- '---- last lines of %s ----\n' "$f" >&2
        tail -n 20 "$f" >&2 || true
    done
    exit 1
}

t_start=$EPOCHREALTIME

if [[ $EUID -ne 0 ]]; then
    die "must run as root (it installs packages, writes /etc/slurm and starts daemons)"
fi

# ------------------------------------------------------------------ already up?
alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

if [[ -f "$STATE/daemons" ]]; then
    all_alive=1
    while read -r name; do
        alive "$STATE/pids/$name" || all_alive=0
    done <"$STATE/daemons"
    if [[ $all_alive -eq 1 ]] && sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        log "cluster in $STATE is already running"
        echo "SLURM_CLUSTER=running"
        exit 0
    fi
    log "found a half-running cluster in $STATE: tearing it down first"
    "$HERE/teardown_cluster.sh"
fi

# ------------------------------------------------------------------ packages
pkgs=(slurm-wlm munge)
[[ $accounting -eq 1 ]] && pkgs+=(slurmdbd mariadb-server)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
t_apt=0
if [[ ${#missing[@]} -gt 0 ]]; then
    [[ $install -eq 1 ]] || die "missing packages (and --no-install given): ${missing[*]}"
    command -v apt-get >/dev/null || die "missing packages and no apt-get: ${missing[*]}"
    log "installing ${missing[*]} with apt-get"
    ta=$EPOCHREALTIME
    export DEBIAN_FRONTEND=noninteractive
    # An `apt-get update` is only needed when the package lists are missing or stale.
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >"/tmp/evoformer-slurm-apt.log" 2>&1; then
        apt-get update -q >>"/tmp/evoformer-slurm-apt.log" 2>&1 || true
        apt-get install -y -q --no-install-recommends "${missing[@]}" >>"/tmp/evoformer-slurm-apt.log" 2>&1 ||
            {
                tail -n 30 /tmp/evoformer-slurm-apt.log >&2
                die "apt-get install ${missing[*]} failed"
            }
    fi
    t_apt=$(elapsed "$ta")
fi

# ------------------------------------------------------------------ state + config
rm -rf "$STATE"
mkdir -p "$STATE"/{pids,log,ctld,spool,dev}
chmod 755 "$STATE"
echo "$accounting" >"$STATE/accounting"
: >"$STATE/daemons"

host="$(hostname -s)"
mkdir -p /etc/slurm
if [[ -f /etc/slurm/slurm.conf ]] && ! grep -qF "$MARKER" /etc/slurm/slurm.conf; then
    log "backing up the existing /etc/slurm to $STATE/etc-slurm.orig"
    cp -a /etc/slurm "$STATE/etc-slurm.orig"
fi

# Fake A100s: gres.conf needs File= entries (count-only GRES are dropped by 22.05).
for i in 0 1; do
    mknod "$STATE/dev/nvidia$i" c 195 "$i"
done

if [[ $accounting -eq 1 ]]; then
    acct_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux"
else
    acct_lines="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

# Job processes are tracked with cgroups (as on real clusters: a cancelled or timed-out
# job leaves no orphans) where the cgroup v1 freezer is mounted, else by parent PID.
proctrack="${EVO_SLURM_PROCTRACK:-}"
if [[ -z "$proctrack" ]]; then
    if [[ -w /sys/fs/cgroup/freezer/cgroup.procs || -w /sys/fs/cgroup/freezer/tasks ]]; then
        proctrack=proctrack/cgroup
    else
        proctrack=proctrack/linuxproc
    fi
fi

# The node is declared bigger than the machine (config_overrides) so the profile's
# realistic A100-node requests (cpus_per_gpu, mem_mb) fit; nothing is enforced
# (task/none, no cgroup constraints: this also runs inside containers).
cat >/etc/slurm/slurm.conf <<EOF
$MARKER
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
SlurmctldPort=$CTLD_PORT
SlurmdPort=$D_PORT
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=$proctrack
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
ReturnToService=2
# squeue and scontrol keep finished jobs for MinJobAge s: >= 3 x the plugin's first status check
# interval, so the profile setting slurm-status-command: squeue works without accounting.
MinJobAge=3600
KillWait=5
InactiveLimit=0
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MessageTimeout=20
GresTypes=gpu
$acct_lines
JobCompType=jobcomp/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=32 Boards=1 SocketsPerBoard=1 CoresPerSocket=32 ThreadsPerCore=1 RealMemory=256000 Gres=gpu:a100:2 State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=2-00:00:00 State=UP
PartitionName=gpu Nodes=$host Default=NO MaxTime=2-00:00:00 State=UP
EOF

cat >/etc/slurm/gres.conf <<EOF
$MARKER
AutoDetect=off
NodeName=$host Name=gpu Type=a100 File=$STATE/dev/nvidia[0-1]
EOF

cat >/etc/slurm/cgroup.conf <<EOF
$MARKER
CgroupPlugin=cgroup/v1
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF

# ------------------------------------------------------------------ daemons
# start NAME PIDFILE-VAR CMD...: run CMD in the background (no inherited fds, so a
# caller that captures our output does not wait on the daemons) and record its PID.
start() {
    local name=$1
    shift
    setsid "$@" </dev/null >>"$STATE/log/$name.out" 2>&1 &
    echo $! >"$STATE/pids/$name"
    echo "$name" >>"$STATE/daemons"
}

wait_for() { # wait_for SECONDS DESCRIPTION CMD...
    local secs=$1 what=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "timed out after ${secs}s waiting for $what"
        sleep 0.5
    done
}

t_daemons=$EPOCHREALTIME

# munge (runs as the munge user; the key comes with the package)
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
[[ -s /etc/munge/munge.key ]] || {
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
}
if [[ -S /run/munge/munge.socket.2 ]] && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running (not ours: left alone)"
else
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    start munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground
    wait_for 15 munged bash -c 'munge -n | unmunge'
fi

if [[ $accounting -eq 1 ]]; then
    # MariaDB on its unix socket only (no TCP), data in the state dir.
    mkdir -p "$STATE/mysql" /run/mysqld
    chown mysql:mysql "$STATE/mysql" /run/mysqld
    mariadb-install-db --user=mysql --datadir="$STATE/mysql" --skip-test-db \
        --auth-root-authentication-method=socket >"$STATE/log/mariadb-install.log" 2>&1 ||
        die "mariadb-install-db failed (see $STATE/log/mariadb-install.log)"
    start mariadbd /usr/sbin/mariadbd --user=mysql --datadir="$STATE/mysql" \
        --socket=/run/mysqld/mysqld.sock --skip-networking \
        --pid-file="$STATE/mysql/mariadbd.pid" \
        --innodb-buffer-pool-size=32M
    wait_for 60 mariadb mariadb --socket=/run/mysqld/mysqld.sock -e 'select 1'

    cat >/etc/slurm/slurmdbd.conf <<EOF
$MARKER
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
DebugLevel=info
EOF
    chmod 600 /etc/slurm/slurmdbd.conf
    start slurmdbd /usr/sbin/slurmdbd -D
    wait_for 60 slurmdbd sacctmgr -n list cluster
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
    sacctmgr -i add account "$ACCOUNT" Description=ci Organization=ci >/dev/null
    sacctmgr -i add user root Account="$ACCOUNT" DefaultAccount="$ACCOUNT" >/dev/null
else
    rm -f /etc/slurm/slurmdbd.conf
fi

start slurmctld /usr/sbin/slurmctld -D -i
wait_for 30 slurmctld scontrol ping
start slurmd /usr/sbin/slurmd -D
node_ready() { sinfo -h -n "$host" -o '%T' | grep -qE '^(idle|mixed|allocated)$'; }
wait_for 60 "node $host to become idle" node_ready
# A node that registered before its GRES were read is drained: resume it.
scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true

log "$(sinfo -h -o '%P %a %D %T %G' | tr '\n' ';')"
log "gres: $(scontrol show node "$host" | grep -oE 'Gres=[^ ]+')"
log "accounting=$accounting  $proctrack  apt: ${t_apt}s  daemons: $(elapsed "$t_daemons")s  total: $(elapsed "$t_start")s"
echo "SLURM_CLUSTER=started"

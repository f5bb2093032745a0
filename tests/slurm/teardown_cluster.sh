#!/usr/bin/env bash
# Stop the single-node Slurm cluster started by setup_cluster.sh and clean its state.
#
#   tests/slurm/teardown_cluster.sh [--keep-state]
#
# Kills only the daemons whose PIDs setup_cluster.sh recorded (in reverse start order:
# TERM, then KILL after a grace period), cancels nothing else, removes the config files
# this project wrote in /etc/slurm (restoring a backed-up original) and the state dir.
# Safe to run twice, or when nothing is running.
set -euo pipefail

STATE="${EVO_SLURM_STATE:-/tmp/evoformer-slurm}"
MARKER="# written by evoformer-workflow tests/slurm/setup_cluster.sh"
keep_state=0
[[ "${1:-}" == "--keep-state" ]] && keep_state=1

log() { printf '[teardown_cluster] %s\n' "$*"; }

if [[ ! -d "$STATE" ]]; then
    log "no state dir $STATE: nothing to do"
    exit 0
fi

# Jobs first, while slurmctld and slurmd are still up, so that slurmstepd ends each
# job's processes itself (we never signal processes we did not start).
if [[ -s "$STATE/pids/slurmctld" ]] && kill -0 "$(cat "$STATE/pids/slurmctld")" 2>/dev/null; then
    scancel --user="$(id -un)" >/dev/null 2>&1 || true
    for ((i = 0; i < 60; i++)); do
        [[ -z "$(squeue -h -t PD,R,CG,S -o %i 2>/dev/null)" ]] && break
        sleep 0.5
    done
fi

stop_pid() { # stop_pid NAME PID
    local name=$1 pid=$2 i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do
        kill -0 "$pid" 2>/dev/null || {
            log "stopped $name ($pid)"
            return 0
        }
        sleep 0.25
    done
    kill -KILL "$pid" 2>/dev/null || true
    log "killed $name ($pid)"
}

if [[ -f "$STATE/daemons" ]]; then
    mapfile -t names < <(tac "$STATE/daemons")
    for name in "${names[@]}"; do
        [[ -s "$STATE/pids/$name" ]] || continue
        stop_pid "$name" "$(cat "$STATE/pids/$name")"
    done
fi

# Empty job cgroups left by proctrack/cgroup.
for d in /sys/fs/cgroup/*/slurm_"$(hostname -s)"; do
    if [[ -d "$d" ]]; then
        find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    fi
done

for f in slurm.conf gres.conf cgroup.conf slurmdbd.conf; do
    if [[ -f "/etc/slurm/$f" ]] && grep -qF "$MARKER" "/etc/slurm/$f"; then
        rm -f "/etc/slurm/$f"
    fi
done
if [[ -d "$STATE/etc-slurm.orig" ]]; then
    cp -a "$STATE/etc-slurm.orig/." /etc/slurm/
    log "restored the original /etc/slurm"
fi

if [[ $keep_state -eq 0 ]]; then
    rm -rf "$STATE"
    log "removed $STATE"
fi

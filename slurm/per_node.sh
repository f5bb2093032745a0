#!/usr/bin/env bash
# Run a command once per node of the Slurm job it is in, with all of the job's CPUs and
# GPUs on that node, and pass Slurm's warning signal (SIGUSR1) on to the command's
# training processes:
#
#     bash slurm/per_node.sh python -m evoformer.launch -- <train arguments>
#
# - In a Slurm batch script (SLURM_JOB_ID set, not yet inside a job step): starts one
#   job step with one task per node,
#       srun --nodes=N --ntasks-per-node=1 --cpus-per-task=C --kill-on-bad-exit=1 ...
#   with N and C read from the job's allocation (`scontrol show job`), so that torchrun
#   (started by CMD) runs once per node, finds the node's GPUs in CUDA_VISIBLE_DEVICES
#   and the other nodes in SLURM_JOB_NODELIST / SLURM_NNODES / SLURM_NODEID.
# - Outside Slurm, or already inside a job step: runs CMD right here (same signal rules).
#
# Signals. `--signal=USR1@600` (slurm/config.yaml) makes Slurm send SIGUSR1 to the job
# step 10 min before the time limit; with proctrack/cgroup (most clusters) Slurm signals
# only each task's first process, not its children. So the task here is a small bash
# that starts CMD with SIGUSR1 ignored (torchrun and wrappers keep ignoring it; the
# training processes install their own handler) and forwards a SIGUSR1 it receives to
# every process under CMD, and a SIGTERM (time limit, scancel) to CMD itself (torchrun
# passes it on to its workers, which checkpoint).
#
# The `train` rule runs in the job's batch script -- the plugin's `mpi` mode, set in
# slurm/config.yaml -- so these signals reach only this job step, not the Snakemake
# processes around the rule.
set -euo pipefail

if [[ $# -eq 0 ]]; then
    echo "usage: $0 CMD [ARGS...]" >&2
    exit 2
fi

descendants() { # descendants PID: all PIDs below PID in the process tree
    ps -e -o pid=,ppid= | awk -v root="$1" '
        { parent[$1] = $2 }
        END {
            changed = 1; mark[root] = 1
            while (changed) {
                changed = 0
                for (p in parent) if (!(p in mark) && (parent[p] in mark)) { mark[p] = 1; changed = 1 }
            }
            for (p in mark) if (p != root) print p
        }'
}

run_task() { # run CMD as a child, forwarding USR1 (to all of it) and TERM (to its top)
    trap '' USR1
    "$@" &
    local child=$! rc=0
    forward_usr1() {
        local p
        # shellcheck disable=SC2046 # one PID per word
        for p in "$child" $(descendants "$child"); do kill -USR1 "$p" 2>/dev/null || true; done
    }
    trap forward_usr1 USR1
    trap 'kill -TERM "$child" 2>/dev/null || true' TERM
    trap 'kill -INT "$child" 2>/dev/null || true' INT
    while true; do
        rc=0
        wait "$child" || rc=$?
        # `wait` also returns (> 128) when a trapped signal arrives: wait again then
        kill -0 "$child" 2>/dev/null || exit "$rc"
    done
}

if [[ "$1" == "--task" ]]; then
    shift
    run_task "$@"
fi

if [[ -z "${SLURM_JOB_ID:-}" || -n "${SLURM_STEP_ID:-}" ]]; then
    run_task "$@"
fi

job="$(scontrol show job --oneliner "$SLURM_JOB_ID")"
field() { # field NAME: value of NAME=value in the `scontrol show job` line
    grep -oE "(^| )$1=[^ ]+" <<<"$job" | head -n 1 | cut -d= -f2-
}
nodes="$(field NumNodes)"
cpus="$(field NumCPUs)"
if ! [[ "$nodes" =~ ^[0-9]+$ && "$cpus" =~ ^[0-9]+$ ]]; then
    echo "per_node.sh: cannot read NumNodes/NumCPUs of job $SLURM_JOB_ID from scontrol" >&2
    exit 1
fi
cpus_per_node=$((cpus / nodes))
((cpus_per_node >= 1)) || cpus_per_node=1

echo "per_node.sh: job $SLURM_JOB_ID: $nodes node(s), $cpus_per_node CPUs per node:" \
    "srun --nodes=$nodes --ntasks-per-node=1 --cpus-per-task=$cpus_per_node $*" >&2
exec srun --nodes="$nodes" --ntasks-per-node=1 --cpus-per-task="$cpus_per_node" \
    --kill-on-bad-exit=1 bash "${BASH_SOURCE[0]}" --task "$@"

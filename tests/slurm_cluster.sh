#!/usr/bin/env bash
# A one-node Slurm cluster on 127.0.0.1 for the tests (Debian's slurm-wlm: slurmctld + slurmd).
#
#   tests/slurm_cluster.sh start DIR   # writes DIR/slurm.conf, starts both daemons, waits for the node
#   tests/slurm_cluster.sh stop DIR    # stops the daemons it started (by their pid files)
#
# Then point Slurm's commands at it: SLURM_CONF=DIR/slurm.conf sbatch ...
# auth/none (no munge key needed), process tracking without cgroups, one partition "debug" holding
# this machine. The daemons run as the current user (the tests run as root); the ports are picked free.
set -euo pipefail
cmd=${1:?start|stop}
dir=$(realpath -m "${2:?DIR}")

if [[ $cmd == stop ]]; then
    for d in slurmd slurmctld; do
        [[ -f $dir/$d.pid ]] && kill "$(cat "$dir/$d.pid")" 2>/dev/null || true
    done
    exit 0
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
host=$(hostname -s)
cpus=$(nproc)
user=$(id -un)
mkdir -p "$dir/state" "$dir/spool"
cat > "$dir/slurm.conf" <<EOF
ClusterName=shardloom-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
AuthType=auth/none
CredType=cred/none
SlurmUser=$user
SlurmdUser=$user
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
PlugStackConfig=/dev/null
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
export SLURM_CONF=$dir/slurm.conf
slurmctld -i
slurmd
for _ in $(seq 50); do
    if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
        echo "$SLURM_CONF"
        exit 0
    fi
    sleep 0.2
done
echo "slurm node did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
exit 1

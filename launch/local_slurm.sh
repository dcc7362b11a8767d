#!/usr/bin/env bash
# A SLURM cluster on this machine, for trying the launch scripts and for the tests: installs
# Debian's slurmctld, slurmd, slurm-client and munge if they are missing, writes a minimal
# slurm.conf (one partition `debug`, requeue allowed) and starts the daemons. The machine is
# two SLURM nodes, <host> and <host>-2 (two slurmd on one host), so that multi-node jobs run
# for real; each node offers all the machine's CPUs.
# Needs root (the daemons and apt). Idempotent: a second call only checks the cluster answers.
#
#   sudo bash launch/local_slurm.sh          # start (or check) the cluster
#   sudo bash launch/local_slurm.sh stop     # stop the daemons
set -euo pipefail
conf=/etc/slurm/slurm.conf
say() { echo "local_slurm: $*" >&2; }

if [ "${1:-start}" = stop ]; then
  for d in slurmd slurmctld munged; do
    pkill -x "$d" || true
    for _ in $(seq 50); do pgrep -x "$d" >/dev/null || break; sleep 0.2; done
  done
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  say "needs root (it installs packages and starts the SLURM daemons); run it with sudo"
  exit 2
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || { say "apt-get not found: install slurmctld, slurmd," \
    "slurm-client and munge with this system's package manager"; exit 2; }
  say "installing slurmctld slurmd slurm-client munge"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge \
    >/tmp/local_slurm_apt.log 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive \
         apt-get install -y -q slurmctld slurmd slurm-client munge >>/tmp/local_slurm_apt.log 2>&1; } \
    || { say "apt-get failed, see /tmp/local_slurm_apt.log"; exit 2; }
fi

node=$(hostname -s)
cpus=$(nproc)
mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
node2="$node-2"
if [ ! -f "$conf" ] || ! grep -q "^NodeName=$node2 " "$conf"; then
  say "writing $conf (nodes $node and $node2 on this host, $cpus CPUs, ${mem} MiB)"
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd/"$node" \
    /var/spool/slurmd/"$node2" /var/log/slurm
  cat >"$conf" <<EOF
# Written by ipt's launch/local_slurm.sh: one node, for tests and trying things out.
ClusterName=ipt-local
SlurmctldHost=$node
SlurmUser=root
AuthType=auth/munge
# a requeued job waits this long before it may start again (default 120 s)
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
# schedule (and restart a requeued job) within seconds, not the default minute
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
NodeName=$node NodeHostname=$node NodeAddr=127.0.0.1 Port=6818 CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=$node2 NodeHostname=$node NodeAddr=127.0.0.1 Port=6828 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
  echo 'CgroupPlugin=cgroup/v1' >/etc/slurm/cgroup.conf  # 22.05 loads one even unused
fi

if ! pgrep -x munged >/dev/null; then
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge 2>/dev/null || true
  [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key \
                                     2>/dev/null; chown munge:munge /etc/munge/munge.key; }
  chmod 0400 /etc/munge/munge.key
  su -s /bin/sh munge -c "munged" || munged --force
fi
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -f "slurmd -N $node\$" >/dev/null || slurmd -N "$node"
pgrep -f "slurmd -N $node2\$" >/dev/null || slurmd -N "$node2"

deadline=$((SECONDS + 60))
while [ $SECONDS -lt $deadline ]; do
  up=0
  for n in "$node" "$node2"; do
    state=$(timeout 5 sinfo -h -n "$n" -o %T 2>/dev/null || true)
    case "$state" in
      idle*|mixed*|alloc*) up=$((up + 1)) ;;
      down*|drain*) scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true ;;
    esac
  done
  [ "$up" -eq 2 ] && { say "cluster up: nodes $node and $node2 answer"; exit 0; }
  sleep 1
done
say "the cluster did not come up (node states: $(sinfo -h -o '%n %T' 2>/dev/null | tr '\n' ' '));" \
    "see /var/log/slurm/*.log"
exit 1

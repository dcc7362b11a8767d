#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying the launch scripts and for the tests:
# installs Debian's slurmctld, slurmd, slurm-client and munge if they are missing, writes a
# minimal slurm.conf (one node, one partition `debug`, requeue allowed) and starts the daemons.
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
if [ ! -f "$conf" ] || ! grep -q "^NodeName=$node " "$conf"; then
  say "writing $conf (node $node, $cpus CPUs, ${mem} MiB)"
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
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
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$node CPUs=$cpus RealMemory=$mem State=UNKNOWN
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
pgrep -x slurmd >/dev/null || slurmd

deadline=$((SECONDS + 60))
while [ $SECONDS -lt $deadline ]; do
  state=$(timeout 5 sinfo -h -n "$node" -o %T 2>/dev/null || true)
  case "$state" in
    idle*|mixed*|alloc*) say "cluster up: node $node is $state"; exit 0 ;;
    down*|drain*) scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  sleep 1
done
say "the cluster did not come up (node state: ${state:-none}); see /var/log/slurm/*.log"
exit 1

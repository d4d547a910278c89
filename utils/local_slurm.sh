#!/usr/bin/env bash
# A real SLURM cluster of two virtual nodes (node1, node2) on this host, for
# tests and demos. Needs root, munge and the SLURM daemons
# (utils/install_system_deps.sh installs them on Debian/Ubuntu).
#
#   utils/local_slurm.sh start    # prints the line to export: SLURM_CONF=...
#   utils/local_slurm.sh status
#   utils/local_slurm.sh stop
#
# State, logs and the config live in $SSLSKY_SLURM_DIR (default /tmp/sslsky-slurm);
# clients find the cluster through SLURM_CONF=$SSLSKY_SLURM_DIR/slurm.conf.
set -euo pipefail

DIR=${SSLSKY_SLURM_DIR:-/tmp/sslsky-slurm}
CONF=$DIR/slurm.conf
NODES=(node1 node2)
PORTS=(6818 6819)
CTLD_PORT=${SSLSKY_SLURMCTLD_PORT:-6817}
CPUS=${SSLSKY_SLURM_CPUS:-2}

log() { echo "local_slurm: $*" >&2; }

write_conf() {
  mkdir -p "$DIR/state" "$DIR/spool"
  local host
  host=$(hostname -s)
  cat > "$CONF" <<CONF
ClusterName=sslsky-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=30
SlurmdTimeout=60
InactiveLimit=0
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
NodeName=${NODES[0]} NodeHostname=$host NodeAddr=127.0.0.1 Port=${PORTS[0]} CPUs=$CPUS RealMemory=4000 State=UNKNOWN
NodeName=${NODES[1]} NodeHostname=$host NodeAddr=127.0.0.1 Port=${PORTS[1]} CPUs=$CPUS RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
  for n in "${NODES[@]}"; do
    mkdir -p "$DIR/spool/$n"
    grep -qE "[[:space:]]$n([[:space:]]|\$)" /etc/hosts || echo "127.0.0.1 $n" >> /etc/hosts
  done
}

start_munge() {
  if pgrep -x munged >/dev/null; then return; fi
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
  chmod 0400 /etc/munge/munge.key
  chmod 0755 /run/munge
  runuser -u munge -- munged
}

wait_idle() {
  for _ in $(seq 1 60); do
    local states
    states=$(SLURM_CONF=$CONF sinfo -h -N -o '%N %t' 2>/dev/null || true)
    if [ "$(echo "$states" | grep -cE 'idle|mix|alloc')" -ge ${#NODES[@]} ]; then
      log "up: $(echo "$states" | tr '\n' ' ')"
      return 0
    fi
    if echo "$states" | grep -qE 'down|drain'; then
      SLURM_CONF=$CONF scontrol update nodename="$(IFS=,; echo "${NODES[*]}")" state=resume 2>/dev/null || true
    fi
    sleep 1
  done
  log "nodes did not become idle; see $DIR/*.log"
  SLURM_CONF=$CONF sinfo -N >&2 || true
  return 1
}

start() {
  if [ "$(id -u)" -ne 0 ]; then log "needs root"; exit 1; fi
  for cmd in munged slurmctld slurmd sbatch; do
    command -v "$cmd" >/dev/null || { log "$cmd not found: run utils/install_system_deps.sh"; exit 1; }
  done
  if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
    log "already running"
    wait_idle
    echo "export SLURM_CONF=$CONF"
    return
  fi
  write_conf
  start_munge
  SLURM_CONF=$CONF slurmctld -f "$CONF" -c
  for n in "${NODES[@]}"; do SLURM_CONF=$CONF slurmd -f "$CONF" -N "$n"; done
  wait_idle
  echo "export SLURM_CONF=$CONF"
}

stop() {
  for pidfile in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid"; do
    [ -f "$pidfile" ] || continue
    kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  for _ in $(seq 1 20); do
    pgrep -f "slurm(ctld|d) -f $CONF" >/dev/null || break
    sleep 0.5
  done
  pkill -9 -f "slurm(ctld|d) -f $CONF" 2>/dev/null || true
  rm -f "$DIR"/*.pid
  log "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) SLURM_CONF=$CONF sinfo -N; SLURM_CONF=$CONF squeue ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac

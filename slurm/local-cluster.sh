#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, to try the SLURM paths of this project on a
# workstation and to run tests/test_slurm.py in CI. Debian/Ubuntu, root, no systemd needed.
#
#   bash slurm/local-cluster.sh start    # install packages if missing, configure, start, wait for an idle node
#   bash slurm/local-cluster.sh status   # daemons, node and queue
#   bash slurm/local-cluster.sh stop     # cancel every job, stop every daemon by its pid file
#
# Daemons: munged (auth), mariadbd + slurmdbd (accounting: without them `sacct` fails and the
# submitit launcher waits for ever on a job that died without writing its result), slurmctld,
# slurmd. `start` is idempotent: with everything up it only waits for the node; with a partial
# set up it stops the rest and starts afresh. Logs: /var/log/slurm/.
#
# Environment:
#   SMOE_SLURM_ACCOUNTING=0   skip MariaDB + slurmdbd (smaller install; `sacct` then fails)
#   SMOE_SLURM_NO_INSTALL=1   never call apt-get: fail if a package is missing
set -euo pipefail

ACCOUNTING=${SMOE_SLURM_ACCOUNTING:-1}
NO_INSTALL=${SMOE_SLURM_NO_INSTALL:-0}
LOGDIR=/var/log/slurm
CONF=/etc/slurm
# order matters for `stop`: the node daemon first (it owns the job steps), munge last
DAEMONS=(slurmd slurmctld slurmdbd mariadbd munged)

say() { printf '[local-cluster] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

pidfile() {
  case "$1" in
    slurmd | slurmctld | slurmdbd) echo "/run/$1.pid" ;;
    mariadbd) echo /run/mysqld/mysqld.pid ;;
    munged) echo /run/munge/munged.pid ;;
  esac
}
wanted() { [ "$ACCOUNTING" = 1 ] || { [ "$1" != slurmdbd ] && [ "$1" != mariadbd ]; }; }
running() { local f; f=$(pidfile "$1"); [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; }

# poll a command every 0.2 s for up to $1 seconds
wait_until() {
  local tries=$(($1 * 5)); shift
  while [ "$tries" -gt 0 ]; do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2; tries=$((tries - 1))
  done
  say "gave up waiting for '$*' (see $LOGDIR/*.log)"; return 1
}
node_idle() { [ "$(sinfo -h -o %t 2>/dev/null | head -1)" = idle ]; }
queue_empty() { [ -z "$(squeue -h 2>/dev/null)" ]; }

install_packages() {
  local want=(slurmctld slurmd slurm-client munge) missing=() p added_policy=0
  if [ "$ACCOUNTING" = 1 ]; then want+=(slurmdbd mariadb-server); fi
  for p in "${want[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$NO_INSTALL" = 1 ] && die "missing packages: ${missing[*]} (unset SMOE_SLURM_NO_INSTALL to install them)"
  command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get: install SLURM by hand"
  # the packages' postinst scripts would try to start their daemons through invoke-rc.d; a
  # policy-rc.d that exits 101 stops that, since this script starts them itself
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d && added_policy=1
  fi
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ "$added_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
}

write_config() {
  local node accounting="AccountingStorageType=accounting_storage/none"
  # `slurmd -C` prints this machine's real CPUs/sockets/memory, so the node line always matches
  node=$(slurmd -C | head -1)
  if [ "$ACCOUNTING" = 1 ]; then
    accounting=$'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost'
    cat >"$CONF/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
PidFile=/run/slurmdbd.pid
LogFile=$LOGDIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StorageLoc=slurm_acct_db
EOF
    chown slurm:slurm "$CONF/slurmdbd.conf"
    chmod 0600 "$CONF/slurmdbd.conf"   # slurmdbd refuses a readable config
  fi
  cat >"$CONF/slurm.conf" <<EOF
# written by slurm/local-cluster.sh; rewritten at every fresh start
ClusterName=local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
MailProg=/bin/true
MpiDefault=none
# no cgroups: processes are tracked through /proc, and task/affinity pins each task to its CPUs
# (so a 1-CPU job's torch uses 1 thread and two jobs do not oversubscribe the cores)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/linux
$accounting
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGDIR/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
# a requeued job may start again cred_expire+1 s after the requeue (default 120 s; minimum 5)
AuthInfo=cred_expire=10
# look at pending jobs every 2 s instead of every 60 s, so requeued jobs restart promptly
SchedulerParameters=sched_interval=2,bf_interval=2
# refuse at submission a job that can never fit, rather than leave it (and a waiting launcher) pending
EnforcePartLimits=ALL
ReturnToService=2
KillWait=5
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_accounting() {
  install -d -o mysql -g mysql -m 0755 /run/mysqld
  setsid /usr/sbin/mariadbd --user=mysql >"$LOGDIR/mariadb.log" 2>&1 </dev/null &
  wait_until 30 mariadb-admin ping
  wait_until 10 test -s /run/mysqld/mysqld.pid
  # OS user slurm logs in through the unix socket: no database password exists anywhere
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
              CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED VIA unix_socket;
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
  slurmdbd                      # daemonises, writes /run/slurmdbd.pid
  wait_until 30 sacctmgr -n show cluster
}

start() {
  [ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts system daemons)"
  local d all_up=1
  for d in "${DAEMONS[@]}"; do
    if wanted "$d" && ! running "$d"; then all_up=0; fi
  done
  if [ "$all_up" = 1 ]; then
    wait_until 30 node_idle_or_busy
    say "already running"; sinfo; return 0
  fi
  stop >/dev/null 2>&1 || true   # a partial set (e.g. after a crash): start from a clean slate
  local t0=$SECONDS
  install_packages
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o slurm -g slurm -m 0755 "$LOGDIR" /var/lib/slurm/slurmctld
  install -d -m 0755 /var/lib/slurm/slurmd "$CONF"
  write_config
  runuser -u munge -- /usr/sbin/munged   # daemonises, writes /run/munge/munged.pid
  munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"
  if [ "$ACCOUNTING" = 1 ]; then start_accounting; fi
  slurmctld
  slurmd
  # until slurmd has registered the node shows `unk`, so `idle` really means the node is usable
  wait_until 30 node_idle
  say "up in $((SECONDS - t0)) s"
  sinfo
}
# an already running cluster may have jobs on its node
node_idle_or_busy() { sinfo -h -o %t 2>/dev/null | grep -Eq '^(idle|mix|alloc)'; }

stop() {
  local d f pid
  if running slurmctld; then   # end jobs first, so that no slurmstepd outlives slurmd
    squeue -h -o %F 2>/dev/null | sort -u | xargs -r scancel 2>/dev/null || true
    wait_until 20 queue_empty || true
  fi
  for d in "${DAEMONS[@]}"; do
    f=$(pidfile "$d")
    if ! running "$d"; then rm -f "$f"; continue; fi
    pid=$(cat "$f")
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
    rm -f "$f"
    say "stopped $d (pid $pid)"
  done
}

status() {
  local d rc=0
  for d in "${DAEMONS[@]}"; do
    wanted "$d" || continue
    if running "$d"; then echo "$d: running (pid $(cat "$(pidfile "$d")"))"; else echo "$d: stopped"; rc=3; fi
  done
  if running slurmctld; then sinfo; squeue; fi
  return "$rc"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# slurm_cluster.sh - a REAL Slurm cluster with virtual nodes on this one machine, for slade_dist's
# integration tests (tests/integration/conftest.py runs it once per test session).
#
#   bash tests/integration/slurm_cluster.sh [start|stop|status]      (root; default: start)
#
# start is idempotent: installs what is missing (Debian 12 packages: Slurm 22.05, munge, and MariaDB +
# slurmdbd for sacct), writes the configs, starts whatever is not running (restarting the Slurm
# daemons when slurm.conf changed) and waits until every node is idle. A second run is a ~1 s no-op.
# No systemd and no cgroups are needed: daemons are started directly, processes tracked via /proc.
#
# Why each non-default setting is there (measured on these machines):
#  - several `slurmd -N nodeI` on one host (Debian builds Slurm with multiple-slurmd), each with its
#    own port/spool/pid/log (%n), and config_overrides so a node may claim CPUs the VM lacks;
#  - the node names resolve (/etc/hosts) because submitit takes MASTER_ADDR from the first node name;
#  - accounting (slurmdbd): without sacct submitit cannot see a cancelled job and waits forever;
#  - cred_expire=10 + sched_interval=2: a requeued job restarts in ~11 s instead of ~2-3 min;
#  - partition "high" preempts (requeues) jobs of the default partition "debug", and
#    preempt_send_user_signal delivers the job's --signal (submitit's USR2 -> checkpoint + requeue).
#
# Knobs: SLADE_SLURM_NODES (2), SLADE_SLURM_CPUS (CPUs per virtual node, default 2),
#        SLADE_SLURM_WAIT_S (90). Writes /etc/slurm, /etc/munge, one marked /etc/hosts line,
#        /var/lib/slurm, /var/log/slurm, /var/lib/mysql (DB slade_slurm_acct), /run/*.pid.
set -euo pipefail

ACTION=${1:-start}
NODES=${SLADE_SLURM_NODES:-2}
CPUS=${SLADE_SLURM_CPUS:-2}
WAIT_S=${SLADE_SLURM_WAIT_S:-90}
CLUSTER=slade
HOST=$(hostname -s)
LOGDIR=/var/log/slurm
STATE=/var/lib/slurm
DBD_PORT=6819
DB_NAME=slade_slurm_acct
DB_PASS=slade_local_only

say() { echo "[slurm_cluster] $*"; }
die() { echo "[slurm_cluster] ERROR: $*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || die "must run as root (it installs packages and starts system daemons)"
nodes() { local i; for ((i = 1; i <= NODES; i++)); do echo "node$i"; done; }

alive() {  # alive PIDFILE COMM: the pid in the file runs (not a zombie) and is COMM
  local p st
  p=$(cat "$1" 2>/dev/null) || return 1
  [[ $p =~ ^[0-9]+$ ]] || return 1
  st=$(sed -e 's/^.*) //' "/proc/$p/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [[ -n $st && $st != Z && $st != X ]] || return 1
  grep -q "$2" "/proc/$p/comm" 2>/dev/null
}

stop_one() {  # stop_one PIDFILE COMM: SIGTERM that pid only (never by name), SIGKILL after 20 s
  local p i
  if alive "$1" "$2"; then
    p=$(cat "$1"); kill -TERM "$p" 2>/dev/null || true
    for ((i = 0; i < 200; i++)); do alive "$1" "$2" || break; sleep 0.1; done
    alive "$1" "$2" && kill -KILL "$p" 2>/dev/null || true
    say "stopped $2 ($p)"
  fi
  rm -f "$1"
}

stop_slurm() {
  local f
  for f in /run/slurmd-*.pid; do [[ -e $f ]] && stop_one "$f" slurmd; done
  stop_one /run/slurmctld.pid slurmctld
}

case $ACTION in
  stop) stop_slurm; stop_one /run/slurmdbd.pid slurmdbd; stop_one /run/mysqld/mysqld.pid mariadbd
        stop_one /run/munge/munged.pid munged; exit 0 ;;
  status) sinfo -N -l || true; squeue || true; exit 0 ;;
  start) ;;
  *) die "unknown action '$ACTION' (start|stop|status)" ;;
esac
T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1fs", b - a }'; }

# 1. packages (apt-get update only when something is missing)
missing=()
for p in munge slurmctld slurmd slurm-client slurmdbd mariadb-server; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # postinst scripts fail to start services without systemd ("policy-rc.d denied"): harmless
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
say "packages ok ($(elapsed))"

# 2. virtual node names resolve to this host (one marked line, rewritten when NODES changes)
line="127.0.0.1 $(nodes | tr '\n' ' ')# slade_slurm"
if ! grep -qxF "$line" /etc/hosts; then
  others=$(grep -v '# slade_slurm$' /etc/hosts || true)
  printf '%s\n%s\n' "$others" "$line" >/etc/hosts
fi
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST # slade_slurm" >>/etc/hosts

# 3. munge (key 0400 munge:munge, /run/munge recreated after a reboot)
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
[[ -s /etc/munge/munge.key ]] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
chmod 0700 /etc/munge /var/log/munge; chmod 0400 /etc/munge/munge.key; chmod 0755 /run/munge
if ! alive /run/munge/munged.pid munged; then
  rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
  runuser -u munge -- /usr/sbin/munged
  for ((i = 0; i < 100; i++)); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi
munge -n </dev/null | unmunge >/dev/null 2>&1 || die "munge does not work (see /var/log/munge)"

# 4. configs: written to a temp file, installed only when different (so restarts happen on change only)
mkdir -p /etc/slurm "$LOGDIR" "$STATE/slurmctld"
for n in $(nodes); do mkdir -p "$STATE/slurmd/$n"; done
mem=$(awk -v n="$NODES" '/MemTotal/ { print int($2 / 1024 * 0.8 / n) }' /proc/meminfo)
new=$(mktemp)
{
  cat <<EOF
# written by slade_dist tests/integration/slurm_cluster.sh ($NODES virtual nodes on $HOST)
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=300
MailProg=/bin/true
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
EOF
  for ((i = 1; i <= NODES; i++)); do
    echo "NodeName=node$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((17000 + i)) CPUs=$CPUS RealMemory=$mem State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=10"
  echo "PartitionName=high Nodes=ALL Default=NO MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF"
} >"$new"
conf_changed=0
cmp -s "$new" /etc/slurm/slurm.conf || { install -m 0644 "$new" /etc/slurm/slurm.conf; conf_changed=1; }
cat >"$new" <<EOF
# written by slade_dist tests/integration/slurm_cluster.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LOGDIR/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
dbd_changed=0   # slurmdbd refuses a slurmdbd.conf that is not 0600 and owned by SlurmUser
cmp -s "$new" /etc/slurm/slurmdbd.conf || { install -m 0600 -o root -g root "$new" /etc/slurm/slurmdbd.conf; dbd_changed=1; }
rm -f "$new"

# 5. MariaDB (unix socket only) + slurmdbd
mkdir -p /run/mysqld; chown mysql:mysql /run/mysqld
[[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
if ! alive /run/mysqld/mysqld.pid mariadbd; then
  setsid /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid --skip-networking \
    --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900 >>"$LOGDIR/mariadb.log" 2>&1 </dev/null &
  for ((i = 0; i < 300; i++)); do mariadb-admin ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
mariadb-admin ping >/dev/null 2>&1 || die "MariaDB did not start (see $LOGDIR/mariadb.log)"
mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
            GRANT ALL ON $DB_NAME.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
((dbd_changed)) && stop_one /run/slurmdbd.pid slurmdbd
alive /run/slurmdbd.pid slurmdbd || /usr/sbin/slurmdbd
for ((i = 0; i < 300; i++)); do (echo >/dev/tcp/127.0.0.1/$DBD_PORT) 2>/dev/null && break; sleep 0.1; done
(echo >/dev/tcp/127.0.0.1/$DBD_PORT) 2>/dev/null || die "slurmdbd did not start (see $LOGDIR/slurmdbd.log)"
say "accounting daemons ok ($(elapsed))"

# 6. slurmctld + one slurmd per virtual node (all restarted together when slurm.conf changed,
#    otherwise they refuse each other's config hash)
((conf_changed)) && stop_slurm
for f in /run/slurmd-*.pid; do   # slurmd of nodes no longer configured
  [[ -e $f ]] || continue
  n=${f#/run/slurmd-}; n=${n%.pid}
  nodes | grep -qx "$n" || stop_one "$f" slurmd
done
ctld_started=0
if ! alive /run/slurmctld.pid slurmctld; then
  /usr/sbin/slurmctld
  ctld_started=1
  for ((i = 0; i < 200; i++)); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
fi
scontrol ping 2>/dev/null | grep -q UP || die "slurmctld is not up (see $LOGDIR/slurmctld.log)"
# slurmctld restores its saved jobs. After a restart (machine reboot, VM snapshot) their processes are
# gone, but a job saved as RUNNING keeps its nodes allocated and the nodes never turn idle: cancel them.
if ((ctld_started)); then
  stale=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  if [[ -n ${stale// /} ]]; then
    say "cancelling jobs left from before the restart: $stale"
    scancel $stale 2>/dev/null || true
  fi
fi
declare -A started=()
for n in $(nodes); do
  alive "/run/slurmd-$n.pid" slurmd && continue
  started[$n]=$(date +%s)
  /usr/sbin/slurmd -N "$n"
done

# 7. every node idle; a freshly started slurmd must also have registered (saved state says idle before)
ready() {
  local info t
  info=$(scontrol show node "$1" -o 2>/dev/null) || return 1
  grep -q 'State=IDLE ' <<<"$info" || return 1
  [[ -z ${started[$1]:-} ]] && return 0
  t=$(grep -o 'SlurmdStartTime=[^ ]*' <<<"$info" | cut -d= -f2)
  [[ -n $t && $t != None ]] && (($(date -d "$t" +%s) >= started[$1] - 1))
}
ok=0
for ((i = 0; i < WAIT_S * 5; i++)); do
  n_ready=0
  for n in $(nodes); do ready "$n" && n_ready=$((n_ready + 1)); done
  ((n_ready == NODES)) && { ok=1; break; }
  if ((i == 25)); then  # a node left down/drained by an earlier run: resume it once
    for n in $(sinfo -h -N -o '%N %T' | awk '$2 ~ /down|drain|fail/ {print $1}'); do
      scontrol update NodeName="$n" State=RESUME 2>/dev/null || true
    done
  fi
  sleep 0.2
done
((ok)) || { scontrol show node | grep -E 'NodeName|State|Reason' >&2; die "nodes not idle after ${WAIT_S}s (logs: $LOGDIR)"; }
for ((i = 0; i < 100; i++)); do
  sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER" && break; sleep 0.2
done
sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
sacct -n -X -j 1 >/dev/null || die "sacct does not answer (see $LOGDIR/slurmdbd.log)"
say "ready in $(elapsed): nodes $(nodes | tr '\n' ' ')(${CPUS} CPUs each), partitions debug (default), high (preempts debug)"

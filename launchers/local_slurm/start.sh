#!/usr/bin/env bash
# A real SLURM cluster on this machine, for dist_clm's CI and for trying the SLURM launcher: munged, mariadbd +
# slurmdbd (accounting: submitit reads job states with sacct), slurmctld, and four slurmd: the machine itself
# as one node, and three more nodes dn1, dn2, dn3 (a slurmd each, with its own node name, address and port).
#
#   bash launchers/local_slurm/start.sh     # installs Debian's slurm-wlm/munge/slurmdbd/mariadb if missing
#   bash launchers/local_slurm/stop.sh
#
# Partitions: `debug` (default) and `urgent` on the machine's node, whose jobs preempt debug jobs
# (PreemptMode=REQUEUE, and the job's --signal is sent first: preempt_send_user_signal); `multi` on dn[1-3]
# and `multi_urgent`, which preempts it the same way.
#
# The nodes dn1-dn3 are separate slurmd processes on this machine (slurmd -N NAME), reached by slurmctld at
# 127.0.1.1-3 (loopback addresses: traffic never leaves the machine), each on its own port, with its own
# spool, log and pid file; /etc/hosts maps their names to those addresses (a "dist-clm local-slurm" line,
# removed by stop.sh), because jobs take the master address from the first node's name. They share the
# machine's hostname and CPUs (each declares 2 CPUs and a quarter of the memory), which is what a job can
# tell apart from real nodes. A node dies for real when its slurmd and job steps are killed: slurmctld marks
# it DOWN after SlurmdTimeout (5 s) and requeues its jobs (JobRequeue=1, NODE_FAIL); `slurmd -N dnK`
# brings it back (ReturnToService=2). JobRequeue=1 (submitit does not pass --requeue),
# KillWait=5, cred_expire=10 (a requeued job restarts ~12 s later instead of SLURM's default 2 min).
# State, configs and logs live in $DIST_CLM_SLURM_DIR (default /tmp/dist-clm-slurm); /etc/slurm/slurm.conf
# is linked to its slurm.conf. Must run as root. A second start while the cluster is up does nothing.
set -Eeuo pipefail
DIR=${DIST_CLM_SLURM_DIR:-/tmp/dist-clm-slurm}
PORT=${DIST_CLM_SLURM_PORT:-6917}     # slurmctld; slurmd +1, slurmdbd +2, mariadb +3
CONF=$DIR/slurm.conf
SOCK=$DIR/munge/socket
NODE=$(hostname -s)
MULTI=(dn1 dn2 dn3)   # the extra nodes, at 127.0.1.1.. and ports PORT+11..
export PATH=$PATH:/usr/sbin:/sbin SLURM_CONF=$CONF

say() { echo "[local-slurm] $*"; }
fail() {
  echo "[local-slurm] error: $*" >&2
  for f in "$DIR"/log/*; do [[ -s $f ]] && { echo "--- $f" >&2; tail -n 12 "$f" >&2; }; done
  exit 1
}
until_ok() { local i; for ((i = 0; i < 300; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done; return 1; }
pid_of() { local i; for ((i = 0; i < 300; i++)); do [[ -s $1 ]] && { tr -dc 0-9 < "$1"; return 0; }; sleep 0.2; done; return 1; }

[[ $(id -u) == 0 ]] || fail "run as root (slurmd and munged need it)"
if [[ -f $DIR/up ]] && scontrol ping 2>/dev/null | grep -q "is UP" \
   && [[ $(sinfo -h -N -o %T 2>/dev/null | head -n1) =~ ^(idle|mixed|allocated|completing)$ ]] \
   && [[ $(sinfo -h -N -o %N 2>/dev/null | sort -u | wc -l) == 4 ]]; then
  say "already up ($CONF)"; exit 0
fi

pkgs=(slurm-wlm munge slurmdbd mariadb-server-core mariadb-client-core)
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
  say "installing ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/tmp/dist-clm-slurm-apt.log 2>&1 \
    || { apt-get update -q >>/tmp/dist-clm-slurm-apt.log 2>&1 \
         && apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>/tmp/dist-clm-slurm-apt.log 2>&1; } \
    || fail "apt-get install failed (see /tmp/dist-clm-slurm-apt.log)"
fi

bash "$(dirname "$0")/stop.sh" --quiet || true   # leftovers of an earlier start
rm -rf "$DIR"
mkdir -p "$DIR"/{log,run,ctld,slurmd,munge,db}
chmod 755 "$DIR" "$DIR/munge"

# munge: our own key and socket
dd if=/dev/urandom of="$DIR/munge/key" bs=1024 count=1 status=none && chmod 400 "$DIR/munge/key"
munged --socket="$SOCK" --key-file="$DIR/munge/key" --log-file="$DIR/log/munged" \
  --pid-file="$DIR/run/munged.pid" --seed-file="$DIR/munge/seed" || fail "munged did not start"
echo "munged $(pid_of "$DIR/run/munged.pid")" >> "$DIR/pids"

# accounting: a private mariadb on 127.0.0.1, then slurmdbd
mariadb-install-db --no-defaults --user=root --datadir="$DIR/db/data" --auth-root-authentication-method=socket \
  --skip-test-db >"$DIR/log/mariadb-install" 2>&1 || fail "mariadb-install-db failed"
setsid nohup mariadbd --no-defaults --user=root --datadir="$DIR/db/data" --socket="$DIR/db/sock" \
  --pid-file="$DIR/run/mariadbd.pid" --port=$((PORT + 3)) --bind-address=127.0.0.1 --skip-name-resolve \
  --log-error="$DIR/log/mariadbd" </dev/null >/dev/null 2>&1 &
echo "mariadbd $(pid_of "$DIR/run/mariadbd.pid")" >> "$DIR/pids"
sql() { mariadb --no-defaults --socket="$DIR/db/sock" -u root -e "$1"; }
until_ok sql "SELECT 1" || fail "mariadb does not answer"
for host in localhost 127.0.0.1; do
  sql "CREATE USER 'slurm'@'$host' IDENTIFIED BY 'slurm'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'$host';"
done
cat > "$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$((PORT + 2))
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((PORT + 3))
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
chmod 600 "$DIR/slurmdbd.conf"

# the cluster: the whole machine as one node (90% of its memory), two partitions
read -r cpus mem < <(slurmd -C | awk 'NR == 1 { for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
                                                 print v["CPUs"], int(v["RealMemory"] * 0.9) }')
cat > "$CONF" <<EOF
ClusterName=distclm
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK,cred_expire=10
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/slurmd/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.%n.pid
SlurmctldLogFile=$DIR/log/slurmctld
SlurmdLogFile=$DIR/log/slurmd.%n
SlurmdTimeout=5
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=2,bf_interval=1
JobRequeue=1
KillWait=5
MinJobAge=600
ReturnToService=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((PORT + 2))
AccountingStoragePass=$SOCK
JobAcctGatherType=jobacct_gather/none
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=urgent Nodes=$NODE MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
for i in "${!MULTI[@]}"; do
  echo "NodeName=${MULTI[$i]} NodeHostname=$(hostname) NodeAddr=127.0.1.$((i + 1)) Port=$((PORT + 11 + i))" \
       "CPUs=2 RealMemory=$((mem / 4)) State=UNKNOWN" >> "$CONF"
done
nodes="dn[1-${#MULTI[@]}]"
echo "PartitionName=multi Nodes=$nodes MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30" >> "$CONF"
echo "PartitionName=multi_urgent Nodes=$nodes MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF" >> "$CONF"
# the extra nodes' names resolve to their addresses (a job's master address is its first node's name)
sed -i '/# dist-clm local-slurm$/d' /etc/hosts
for i in "${!MULTI[@]}"; do echo "127.0.1.$((i + 1)) ${MULTI[$i]} # dist-clm local-slurm" >> /etc/hosts; done
slurmdbd || fail "slurmdbd did not start"
echo "slurmdbd $(pid_of "$DIR/run/slurmdbd.pid")" >> "$DIR/pids"
until_ok sacctmgr -n list cluster || fail "slurmdbd does not answer"
sacctmgr -i -Q add cluster distclm >/dev/null || fail "sacctmgr add cluster failed"
slurmctld -f "$CONF" || fail "slurmctld did not start"
echo "slurmctld $(pid_of "$DIR/run/slurmctld.pid")" >> "$DIR/pids"
until_ok bash -c "scontrol ping | grep -q 'is UP'" || fail "slurmctld does not answer"
for n in "$NODE" "${MULTI[@]}"; do
  mkdir -p "$DIR/slurmd/$n"
  slurmd -f "$CONF" -N "$n" || fail "slurmd of node $n did not start"
  echo "slurmd $(pid_of "$DIR/run/slurmd.$n.pid")" >> "$DIR/pids"
done
for n in "$NODE" "${MULTI[@]}"; do
  until_ok bash -c "scontrol show node $n | grep -q 'State=IDLE'" || fail "node $n did not become idle"
done
mkdir -p /etc/slurm && ln -sfn "$CONF" /etc/slurm/slurm.conf
srun -N1 -n1 --time=1 -J smoke true || fail "srun smoke test failed"
[[ $(srun -p multi -N2 -n2 --time=1 -J smoke2 printenv SLURMD_NODENAME | sort | tr '\n' ' ') == "dn1 dn2 " ]] \
  || fail "a two-node srun did not run on dn1 and dn2"
sacct -n -X -o JobID >/dev/null || fail "sacct does not work"
touch "$DIR/up"
say "up: node $NODE ($cpus CPUs, $mem MB), partitions debug (default) and urgent; nodes ${MULTI[*]}," \
    "partitions multi and multi_urgent; state in $DIR"

#!/usr/bin/env bash
# Stop the cluster launchers/local_slurm/start.sh started: cancel its jobs, then stop its daemons (SIGTERM,
# SIGKILL after 20 s), only processes whose command line or environment names its state directory; remove
# the node names it added to /etc/hosts.
set -uo pipefail
DIR=${DIST_CLM_SLURM_DIR:-/tmp/dist-clm-slurm}
QUIET=0; [[ ${1:-} == --quiet ]] && QUIET=1
export PATH=$PATH:/usr/sbin:/sbin SLURM_CONF=$DIR/slurm.conf
say() { [[ $QUIET == 1 ]] || echo "[local-slurm] $*"; }
ours() { [[ $2 =~ ^[0-9]+$ && $(cat "/proc/$2/comm" 2>/dev/null) == "$1" ]] \
         && grep -qaF -- "$DIR" "/proc/$2/cmdline" "/proc/$2/environ" 2>/dev/null; }
[[ -f $DIR/pids ]] || { say "nothing to stop"; exit 0; }
rm -f "$DIR/up"
if scontrol ping 2>/dev/null | grep -q "is UP"; then
  jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [[ -n ${jobs// /} ]]; then
    say "cancelling jobs $jobs"
    scancel $jobs 2>/dev/null
    for ((i = 0; i < 100; i++)); do [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break; sleep 0.2; done
  fi
fi
for name in slurmd slurmctld slurmdbd mariadbd munged; do
  # every such daemon of ours, also one started after start.sh (a node brought back with slurmd -N)
  for f in /proc/[0-9]*/comm; do
    pid=${f#/proc/}; pid=${pid%/comm}
    ours "$name" "$pid" || continue
    say "stopping $name ($pid)"
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < 100; i++)); do ours "$name" "$pid" || break; sleep 0.2; done
    ours "$name" "$pid" && kill -KILL "$pid" 2>/dev/null
  done
done
for f in /proc/[0-9]*/comm; do   # job step daemons outliving slurmd
  pid=${f#/proc/}; pid=${pid%/comm}
  [[ $(cat "$f" 2>/dev/null) == slurmstepd ]] && grep -qaF -- "$DIR" "/proc/$pid/environ" 2>/dev/null \
    && kill -KILL "$pid" 2>/dev/null
done
rm -f "$DIR/pids"
sed -i '/# dist-clm local-slurm$/d' /etc/hosts 2>/dev/null
say "stopped"

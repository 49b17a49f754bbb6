#!/usr/bin/env bash
# Start a real single-node Slurm cluster on this machine, to try gradsweep's Slurm sweeps
# (hydra/launcher=slurm) without a cluster. Debian/Ubuntu, as root; no systemd needed.
#
#   sudo deploy/slurm/start.sh               # installs slurmctld slurmd slurm-client munge if missing
#   source /tmp/gradsweep-slurm/env.sh       # SLURM_CONF and the sacct stand-in, for this shell
#   python src/train.py -m hydra/launcher=slurm clip.max_norm=1,5,20
#   sudo deploy/slurm/stop.sh                # [--purge: also delete the state folder]
#
# Idempotent: run it again and it checks each daemon, starts what is missing, removes stale pid
# files and restarts the Slurm daemons when the generated config changed. Config, state and logs
# live in ${GRADSWEEP_SLURM_DIR:-/tmp/gradsweep-slurm}; munged uses the system socket
# (/run/munge/munge.socket.2) and key (/etc/munge/munge.key, created if absent). Any failure ends
# the script with one line naming the log to read and a non-zero status.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
trap 'fail "line $LINENO: \"$BASH_COMMAND\" failed"' ERR
TIMEOUT_S="${GRADSWEEP_SLURM_TIMEOUT:-60}"
T0=$(date +%s%N)

[ "$(id -u)" = 0 ] || fail "run as root (it installs packages and starts the Slurm and munge daemons)"
mkdir -p "$DIR/etc" "$DIR/log" "$DIR/run" "$DIR/state/slurmctld" "$DIR/state/slurmd"
install -d -m 1777 "$DIR/sacct-seen"  # the sacct stand-in's memory of array tasks (bin/sacct), for every user

# ------------------------------------------------------------------------------ packages
missing=()
for bin in slurmctld slurmd sinfo scontrol munged munge; do
    command -v "$bin" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
done
export PATH="$PATH:/usr/sbin:/sbin"
if ((${#missing[@]})); then
    command -v apt-get >/dev/null 2>&1 || fail "missing ${missing[*]} and no apt-get: install Slurm (slurmctld, slurmd, client) and munge yourself"
    note "installing slurmctld slurmd slurm-client munge (apt-get, log $DIR/log/apt.log)"
    export DEBIAN_FRONTEND=noninteractive
    pkgs=(slurmctld slurmd slurm-client munge)
    if ! apt-get install -y --no-install-recommends "${pkgs[@]}" >"$DIR/log/apt.log" 2>&1; then
        { apt-get update && apt-get install -y --no-install-recommends "${pkgs[@]}"; } >>"$DIR/log/apt.log" 2>&1 \
            || fail "apt-get install ${pkgs[*]} failed: see $DIR/log/apt.log"
    fi
fi

# ------------------------------------------------------------------------------ munge
KEY=/etc/munge/munge.key
if [ ! -s "$KEY" ]; then
    install -d -o munge -g munge -m 0700 /etc/munge
    mungekey --create --keyfile="$KEY" >/dev/null 2>&1 || dd if=/dev/urandom of="$KEY" bs=1024 count=1 status=none
    chown munge:munge "$KEY"
    chmod 0400 "$KEY"
    note "created the munge key $KEY"
fi
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 "$MUNGE_DIR"
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if munge_ok; then
    if pid=$(running_pid "$MUNGE_DIR/munged.pid" munged); then
        note "munged running (pid $pid)"
    else
        note "munged running (not started by this script: left alone by stop.sh)"
    fi
else
    if hung=$(running_pid "$MUNGE_DIR/munged.pid" munged); then kill -KILL "$hung" 2>/dev/null || true; fi  # ours, not answering
    runuser -u munge -- munged --force --log-file="$MUNGE_DIR/munged.log" --pid-file="$MUNGE_DIR/munged.pid" \
        >>"$DIR/log/munged.out" 2>&1 || fail "munged did not start: see $MUNGE_DIR/munged.log and $DIR/log/munged.out"
    for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
    munge_ok || fail "munged does not answer: see $MUNGE_DIR/munged.log"
    note "started munged (pid $(cat "$MUNGE_DIR/munged.pid"))"
fi

# ------------------------------------------------------------------------------ slurm.conf
NODE=$(hostname -s)
NODELINE=$(slurmd -C 2>/dev/null | head -n 1)  # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
[[ "$NODELINE" == NodeName=* ]] || fail "slurmd -C did not describe this node: '$NODELINE'"
sed -e "s|@DIR@|$DIR|g" -e "s|@NODE@|$NODE|g" -e "s|@NODELINE@|$NODELINE|g" "$HERE/slurm.conf.in" >"$CONF.new"
ctld=$(running_pid "$DIR/run/slurmctld.pid" slurmctld || true)
slurmd_pid=$(running_pid "$DIR/run/slurmd.pid" slurmd || true)
if [ -f "$CONF" ] && ! cmp -s "$CONF" "$CONF.new" && [ -n "$ctld$slurmd_pid" ]; then
    note "the config changed: restarting slurmd and slurmctld"
    stop_daemon "$DIR/run/slurmd.pid" slurmd
    stop_daemon "$DIR/run/slurmctld.pid" slurmctld
    ctld="" slurmd_pid=""
fi
mv -f "$CONF.new" "$CONF"
cat >"$DIR/env.sh" <<EOF
# source me: Slurm's commands find this cluster's config, and sacct (no accounting database here)
# is the stand-in in $HERE/bin that submitit asks how a job ended.
export SLURM_CONF="$CONF"
case ":\$PATH:" in *":$HERE/bin:"*) ;; *) export PATH="$HERE/bin:\$PATH" ;; esac
EOF
# Slurm's commands look for /etc/slurm/slurm.conf when SLURM_CONF is not set: point it here when it
# is free (or a link left by an earlier run of this script), so `sinfo` works in any shell.
link=false
if [ ! -e "$SYSTEM_CONF" ] && [ ! -L "$SYSTEM_CONF" ]; then
    link=true
elif [ -L "$SYSTEM_CONF" ]; then
    target=$(readlink "$SYSTEM_CONF")
    if [ "$target" = "$CONF" ] || { [[ "$target" == */etc/slurm.conf ]] && [ ! -e "$target" ]; }; then link=true; fi
fi
if $link; then
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    ln -sfn "$CONF" "$SYSTEM_CONF"
fi

# ------------------------------------------------------------------------------ daemons
start_daemon() {  # NAME PID: the daemon this script started runs as PID, else start it (not over a stranger)
    local name=$1 running=$2 other
    if [ -n "$running" ]; then
        note "$name running (pid $running)"
        return 0
    fi
    other=$(pgrep -x "$name" | head -n 1 || true)  # one this script did not start would hold the port
    [ -z "$other" ] || fail "a $name this script did not start runs (pid $other): stop it first"
    "$name" -f "$CONF" >>"$DIR/log/$name.out" 2>&1 || fail "$name did not start: see $DIR/log/$name.log"
    note "started $name"
}
start_daemon slurmctld "$ctld"
for _ in $(seq $((TIMEOUT_S * 5))); do
    scontrol ping 2>/dev/null | grep -q "is UP" && break
    sleep 0.2
done
scontrol ping 2>/dev/null | grep -q "is UP" || fail "slurmctld does not answer: see $DIR/log/slurmctld.log"
start_daemon slurmd "$slurmd_pid"

# the node: idle (or running jobs) once slurmd registered; a node marked down or drained is resumed
state=""
for _ in $(seq $((TIMEOUT_S * 5))); do
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1 || true)
    case "$state" in
        idle | mixed | allocated | completing) break ;;
        down | drained | draining | fail | failing)
            scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
done
case "$state" in
    idle | mixed | allocated | completing) ;;
    *) fail "node $NODE is '${state:-unknown}' after ${TIMEOUT_S} s, not idle: see $DIR/log/slurmd.log and slurmctld.log" ;;
esac

cpus=$(sinfo -h -n "$NODE" -o %c | head -n 1)
mem=$(sinfo -h -n "$NODE" -o %m | head -n 1)
ms=$((($(date +%s%N) - T0) / 1000000))
note "cluster up in $((ms / 1000)).$((ms % 1000 / 100)) s: node $NODE $state ($cpus CPUs, $mem MB), partition debug"
note "config: $CONF   logs: $DIR/log/slurmctld.log, $DIR/log/slurmd.log, $MUNGE_DIR/munged.log"
note "in your shell: source $DIR/env.sh   (SLURM_CONF, and the sacct stand-in on PATH)"

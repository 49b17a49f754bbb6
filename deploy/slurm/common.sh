# Shared by deploy/slurm/start.sh and stop.sh (sourced, not run).
# shellcheck shell=bash disable=SC2034  # its variables are used by the scripts that source it

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DIR="${GRADSWEEP_SLURM_DIR:-/tmp/gradsweep-slurm}"
CONF="$DIR/etc/slurm.conf"
MUNGE_DIR="$DIR/munge"  # munged's pid file and log (owned by the munge user)
SYSTEM_CONF=/etc/slurm/slurm.conf
export SLURM_CONF="$CONF"
export PATH="$HERE/bin:$PATH"  # the sacct stand-in: this cluster keeps no accounting database

note() { echo "[slurm] $*"; }
fail() { echo "$(basename "$0"): error: $*" >&2; exit 1; }

# The pid of a daemon of ours that runs (its pid file names a live process called $2); a stale pid
# file (slurmctld leaves its own behind on exit) is removed.
running_pid() {
    local file=$1 name=$2 pid
    [ -f "$file" ] || return 1
    pid=$(tr -dc '0-9' <"$file" 2>/dev/null || true)
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
        echo "$pid"
        return 0
    fi
    rm -f "$file"
    return 1
}

# Stop the daemon of pid file $1 (process name $2): SIGTERM, then SIGKILL after $3 seconds.
stop_daemon() {
    local file=$1 name=$2 wait_s=${3:-15} pid i
    pid=$(running_pid "$file" "$name") || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < wait_s * 10; i++)); do
        [ -d "/proc/$pid" ] || break
        sleep 0.1
    done
    if [ -d "/proc/$pid" ]; then
        note "$name (pid $pid) ignored SIGTERM for ${wait_s} s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    rm -f "$file"
    note "stopped $name (pid $pid)"
}

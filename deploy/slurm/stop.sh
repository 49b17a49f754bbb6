#!/usr/bin/env bash
# Stop the single-node Slurm cluster deploy/slurm/start.sh started: cancel its jobs, stop slurmd,
# slurmctld and the munged it started (a munged that was already running is left alone), and remove
# their pid files. Idempotent. The state folder (${GRADSWEEP_SLURM_DIR:-/tmp/gradsweep-slurm}) is
# kept, so the next start is quick; --purge deletes it.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
trap 'fail "line $LINENO: \"$BASH_COMMAND\" failed"' ERR
export PATH="$PATH:/usr/sbin:/sbin"

purge=false
case "${1:-}" in
    --purge) purge=true ;;
    "") ;;
    *) fail "unknown option '$1'; allowed: --purge" ;;
esac
[ "$(id -u)" = 0 ] || fail "run as root (the daemons run as root)"
if [ ! -d "$DIR" ]; then
    note "nothing to stop: $DIR does not exist"
    exit 0
fi

ctld=$(running_pid "$DIR/run/slurmctld.pid" slurmctld || true)
slurmd_pid=$(running_pid "$DIR/run/slurmd.pid" slurmd || true)

# jobs first: a job's processes (slurmstepd and the job) outlive slurmd
if [ -n "$ctld" ] && [ -f "$CONF" ]; then
    jobs=$(squeue -h -t PENDING,RUNNING,SUSPENDED,COMPLETING -o %A 2>/dev/null | sort -u | tr '\n' ' ' || true)
    if [ -n "${jobs// /}" ]; then
        note "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 150); do  # KillWait (10 s) and a margin
            [ -z "$(squeue -h -t RUNNING,COMPLETING -o %A 2>/dev/null)" ] && break
            sleep 0.1
        done
    fi
fi

stop_daemon "$DIR/run/slurmd.pid" slurmd &  # both at once: each takes 1-2 s to shut down
stop_daemon "$DIR/run/slurmctld.pid" slurmctld &
wait
if [ -z "$slurmd_pid" ] && [ -z "$ctld" ]; then
    note "slurmd and slurmctld were not running"
fi
# job step daemons still alive after slurmd is gone (a job that ignored the cancel) belong to this
# cluster's jobs: start.sh refuses to run beside another slurmd
if [ -n "$slurmd_pid" ]; then
    for p in $(pgrep -x slurmstepd || true); do
        kill -KILL "$p" 2>/dev/null && note "killed left-over slurmstepd (pid $p)" || true
    done
fi

stop_daemon "$MUNGE_DIR/munged.pid" munged

# the link start.sh made for Slurm's commands, if it points here
if [ -L "$SYSTEM_CONF" ] && [ "$(readlink "$SYSTEM_CONF")" = "$CONF" ]; then
    rm -f "$SYSTEM_CONF"
fi
rm -f "$DIR/run/"*.pid "$MUNGE_DIR/munged.pid" 2>/dev/null || true

if $purge; then
    rm -rf "$DIR"
    note "deleted $DIR"
fi
left=$( (pgrep -x slurmctld; pgrep -x slurmd) | tr '\n' ' ' || true)
[ -z "$left" ] || fail "Slurm daemons still running (pids $left): not started from $DIR?"
note "stopped; logs were in $DIR/log"

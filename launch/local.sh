#!/usr/bin/env bash
# Run one stage as N processes on this machine, joined over CPU collectives: the same multi-process code path
# as a TPU pod slice or a SLURM job (rlhf_jax/runtime/distributed.py), for trying it out and for tests.
#
#   launch/local.sh [--dry-run] N CONFIG [section.key=value ...]
#   launch/local.sh 2 configs/generate.yaml run_dir=/tmp/lgen
#
# --dry-run first validates the config with its overrides (`$PY -m rlhf_jax.main ... --check`, on the CPU) and
# stops with its one-line error and status 2 when it is wrong; then it prints the N commands.
# Expects: a Linux machine with bash >= 4.3, the project installed in .venv (or python3 able to import
# rlhf_jax), and setsid (util-linux; without it the processes share this script's process group).
# Relative paths (CONFIG, PY, LOG_DIR, run_dir overrides) are relative to the repository root: the script
# runs there, as launch/single_host.sh does. Launcher options (--dry-run, --help) may stand anywhere among
# the arguments; everything else after N and CONFIG is passed to every process as config overrides.
#
# Every process i in 0..N-1 runs `$PY -m rlhf_jax.main --config CONFIG overrides...` with
#   JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT  (PORT: a free port unless set)
#   JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=i  JAX_PLATFORMS=cpu
#   XLA_FLAGS=<the caller's XLA_FLAGS without a device-count flag> \
#             --xla_force_host_platform_device_count=$DEVICES_PER_PROCESS
#   PYTHONUNBUFFERED=1 (unless set: the logs are complete up to a crash)
# Process 0 writes to this terminal; process i > 0 appends to $LOG_DIR/rlhf_jax_local.proc<i>.log after a header
# line naming the launch.
#
# Environment: PY (default .venv/bin/python if executable, else python3), PORT, DEVICES_PER_PROCESS
# (default 4), LOG_DIR (default /tmp), KILL_GRACE (seconds between SIGTERM and SIGKILL, default 5).
#
# Exit status: the first non-zero exit status of a process (in the order they exit), else 0. The program's
# own: 2 user error (one `error:` line), 3 diverged, 4 interrupted by SIGTERM/SIGINT after saving a checkpoint
# (rerun the same command to resume); 128+n: killed by signal n. This launcher's own usage errors (a bad N,
# a missing CONFIG file) exit 2 as well.
# When a process exits non-zero the others get SIGTERM, then SIGKILL after KILL_GRACE seconds (no process is
# left hanging in a collective). SIGTERM, SIGINT or SIGHUP to this script sends SIGTERM to every process (the
# program saves and exits 4: a simulated preemption); the script then waits for them and exits with their
# status. A second signal is forwarded again (the program then stops at once).
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

quote() {  # the arguments as one line a shell reads back as the same words
    local out="" arg sq="'" esc="'\\''"
    for arg in "$@"; do
        if [[ $arg =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
            out+="$arg "
        else
            out+="'${arg//$sq/$esc}' "
        fi
    done
    echo "${out% }"
}

die() {  # die STATUS MESSAGE
    echo "local.sh: $2" >&2
    exit "$1"
}

dry_run=0
positional=()
for arg in "$@"; do
    case $arg in
        --dry-run) dry_run=1 ;;
        -h | --help) usage; exit 0 ;;
        *) positional+=("$arg") ;;
    esac
done
[ "${#positional[@]}" -ge 2 ] || die 2 "usage: launch/local.sh [--dry-run] N CONFIG [section.key=value ...] (--help)"
nproc=${positional[0]}
config=${positional[1]}
overrides=("${positional[@]:2}")
[[ $nproc =~ ^[1-9][0-9]*$ ]] || die 2 "N must be a positive integer, got '$nproc'"
devices=${DEVICES_PER_PROCESS:-4}
[[ $devices =~ ^[1-9][0-9]*$ ]] || die 2 "DEVICES_PER_PROCESS must be a positive integer, got '$devices'"
grace=${KILL_GRACE:-5}
[[ $grace =~ ^[0-9]+$ ]] || die 2 "KILL_GRACE must be a whole number of seconds, got '$grace'"

cd "$(dirname "$0")/.."
[ -f "$config" ] || die 2 "error: config file $config not found (relative paths start at $PWD)"
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
log_dir=${LOG_DIR:-/tmp}

free_port() {  # a port nothing listens on now: the OS picks it
    local py
    for py in python3 "$PY"; do
        if "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' \
            2>/dev/null; then
            return 0
        fi
    done
    echo $((20000 + RANDOM % 30000))
}
port=${PORT:-$(free_port)}
[[ $port =~ ^[0-9]+$ ]] || die 2 "PORT must be a number, got '$port'"

# The caller's XLA_FLAGS, with the simulated device count replaced.
xla_flags=()
read -ra caller_flags <<<"${XLA_FLAGS:-}"
for flag in ${caller_flags[@]+"${caller_flags[@]}"}; do  # (bash 4.3: an empty array is unset)
    case $flag in
        --xla_force_host_platform_device_count=*) ;;
        *) xla_flags+=("$flag") ;;
    esac
done
xla_flags+=("--xla_force_host_platform_device_count=$devices")

command_of() {  # command_of I: sets cmd to process I's command line
    cmd=(env "JAX_COORDINATOR_ADDRESS=127.0.0.1:$port" "JAX_NUM_PROCESSES=$nproc" "JAX_PROCESS_ID=$1"
         "JAX_PLATFORMS=cpu" "XLA_FLAGS=${xla_flags[*]}" "PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}"
         "$PY" -m rlhf_jax.main --config "$config" ${overrides[@]+"${overrides[@]}"})
}

log_of() {
    echo "$log_dir/rlhf_jax_local.proc$1.log"
}

if [ "$dry_run" = 1 ]; then
    rc=0
    out=$(JAX_PLATFORMS=cpu "$PY" -m rlhf_jax.main --config "$config" ${overrides[@]+"${overrides[@]}"} --check \
        2>&1) || rc=$?
    case $rc in
        0) echo "$out" >&2 ;;
        2) echo "$out" >&2; exit 2 ;;
        *) die 2 "error: $PY cannot run rlhf_jax (${out##*$'\n'}): run make setup or set PY" ;;
    esac
    echo "# cd $PWD"
    for ((i = 0; i < nproc; i++)); do
        command_of "$i"
        if [ "$i" = 0 ]; then
            quote "${cmd[@]}"
        else
            echo "$(quote "${cmd[@]}") >> $(quote "$(log_of "$i")") 2>&1"
        fi
    done
    exit 0
fi

mkdir -p "$log_dir"
own_group=()
command -v setsid >/dev/null && own_group=(setsid)
pids=()
rcs=()
echo "local.sh: $nproc processes x $devices CPU devices, coordinator 127.0.0.1:$port" >&2
if [ "$nproc" = 2 ]; then
    echo "local.sh: process 1 logs to $(log_of 1)" >&2
elif [ "$nproc" -gt 2 ]; then
    echo "local.sh: processes 1..$((nproc - 1)) log to $(log_of '<i>')" >&2
fi

signal_all() {  # signal_all SIGNAL: to every process still running (its whole process group if it has one)
    local i
    for i in "${!pids[@]}"; do
        [ -z "${rcs[i]:-}" ] || continue
        if [ "${#own_group[@]}" -gt 0 ]; then
            kill "-$1" -- "-${pids[i]}" 2>/dev/null || kill "-$1" "${pids[i]}" 2>/dev/null || true
        else
            kill "-$1" "${pids[i]}" 2>/dev/null || true
        fi
    done
}

stopping=0   # a signal was forwarded
killing=0    # a process failed; the others were sent SIGTERM
timer=""     # a sleeper whose end means: SIGKILL the rest
# shellcheck disable=SC2329  # called by the traps below
on_signal() {
    echo "local.sh: $1 received: sending SIGTERM to every process (they save and exit 4)" >&2
    stopping=1
    signal_all TERM
}
trap 'on_signal SIGTERM' TERM
trap 'on_signal SIGINT' INT
trap 'on_signal SIGHUP' HUP
trap 'signal_all KILL; [ -z "$timer" ] || kill "$timer" 2>/dev/null || true' EXIT

for ((i = 0; i < nproc; i++)); do
    command_of "$i"
    if [ "$i" = 0 ]; then
        ${own_group[@]+"${own_group[@]}"} "${cmd[@]}" </dev/null &
    else
        # appended after a header: another run's log under the same LOG_DIR (one refused on its run_dir, say)
        # must not truncate this one's
        echo "== local.sh $(date '+%F %T'), pid $$: process $i of $nproc" >>"$(log_of "$i")"
        ${own_group[@]+"${own_group[@]}"} "${cmd[@]}" </dev/null >>"$(log_of "$i")" 2>&1 &
    fi
    pids+=($!)
done
[ "$stopping" = 0 ] || signal_all TERM  # a signal that came while they were starting

running=$nproc
first_rc=""
while [ "$running" -gt 0 ]; do
    wait -n 2>/dev/null || true  # returns when a child (or the timer) ends, or on a trapped signal
    for ((i = 0; i < nproc; i++)); do
        [ -z "${rcs[i]:-}" ] || continue
        ! kill -0 "${pids[i]}" 2>/dev/null || continue
        rc=0
        wait "${pids[i]}" || rc=$?
        rcs[i]=$rc
        running=$((running - 1))
        [ "$rc" != 0 ] || continue
        [ -n "$first_rc" ] || first_rc=$rc
        echo "local.sh: process $i exited with status $rc" >&2
        if [ "$i" != 0 ] && [ "$killing" = 0 ] && { [ "$stopping" = 0 ] || [ "$rc" != 4 ]; }; then
            echo "local.sh: the last lines of $(log_of "$i"):" >&2
            tail -n 20 "$(log_of "$i")" >&2 || true
        fi
        # A failure (during a requested stop: any status but 4) leaves the others waiting on a dead peer.
        if [ "$killing" = 0 ] && { [ "$stopping" = 0 ] || [ "$rc" != 4 ]; } && [ "$running" -gt 0 ]; then
            killing=1
            echo "local.sh: stopping the other processes" >&2
            signal_all TERM
            sleep "$grace" &
            timer=$!
        fi
    done
    if [ -n "$timer" ] && ! kill -0 "$timer" 2>/dev/null; then
        [ "$running" = 0 ] || echo "local.sh: $running processes still running after ${grace}s: SIGKILL" >&2
        signal_all KILL
        timer=""
    fi
done
[ -z "$timer" ] || { kill "$timer" 2>/dev/null || true; }
timer=""
exit "${first_rc:-0}"

#!/usr/bin/env bash
# Run one stage on every worker of a Cloud TPU VM slice (a pod slice is several hosts; JAX finds the others
# itself, no distributed settings are needed on TPU VMs).
#
#   launch/tpu_pod.sh --name NAME --zone ZONE [options] --config CONFIG [-- section.key=value ...]
#   launch/tpu_pod.sh --name rlhf --zone us-west4-a --accelerator-type v5litepod-16 --spot --bucket my-bucket \
#       --config configs/sft.yaml -- run_dir=/mnt/shared/runs/sft data.dir=/mnt/shared/data
#   launch/tpu_pod.sh --name rlhf --zone us-west4-a --delete          # only delete the slice
#
# Expects, on this machine: gcloud (authenticated, the Cloud TPU API enabled in the project, TPU quota in the
# zone for the accelerator type), git, tar and bash. On the slice: a TPU VM image with python3.11 or newer, or
# apt able to install it (--python; Ubuntu 22.04 images install it from jammy-updates), and internet access
# for pip (and for gcsfuse with --bucket).
#
# Before anything, the config with its overrides is validated here (`$PY -m rlhf_jax.main ... --check`, on the
# CPU; PY defaults to .venv/bin/python, else python3): a wrong one stops the script with its one-line error and
# status 2, with --dry-run too, before any slice is created. Where PY cannot run rlhf_jax, a warning says the
# config was not validated and the launch goes on.
#
# Steps, each a gcloud command (--dry-run prints them all, in order, and runs nothing):
#   1. `tpu-vm describe NAME`: the slice exists -> reuse it; otherwise `tpu-vm create` it (--accelerator-type,
#      --version, --spot).
#   2. install (unless --skip-install): the working tree's files that git does not ignore (uncommitted and
#      untracked ones included; outside a git checkout all but .venv/ and runs/) go as a tarball to
#      ~/rlhf_jax on every worker (`tpu-vm scp --worker=all`); then on every worker ~/rlhf_jax/.venv (kept
#      between installs) gets `pip install -r requirements.txt "jax[tpu]==<jax pin of requirements.txt>"` and
#      `pip install --no-deps -e .`
#   3. with --bucket B: gcsfuse (installed when missing) mounts gs://B at /mnt/shared on every worker.
#   4. `tpu-vm ssh NAME --worker=all --command ...`: every worker runs
#      `launch/single_host.sh CONFIG overrides...` in ~/rlhf_jax. Worker 0's output streams here (and to
#      ~/rlhf_jax_logs/worker0.log); worker i writes ~/rlhf_jax_logs/worker<i>.log on that worker
#      (`tpu-vm ssh NAME --worker=i --command 'tail -n 50 ~/rlhf_jax_logs/worker<i>.log'`).
#   5. with --delete: `tpu-vm delete` (also when the run failed); the exit status stays the run's.
# Ctrl-C here stops watching (and skips the delete); the run goes on on the workers: --stop stops it there.
#
# Shared storage: every worker reads the same data and writes the same run_dir (Orbax checkpoints are written
# by all workers together; process 0 writes metrics and exports' metadata), so run_dir and data.dir must be on
# storage all workers share: a GCS bucket mounted with gcsfuse (--bucket B mounts gs://B at /mnt/shared; the
# slice's service account needs read/write access to it) or a Filestore NFS share mounted on every worker.
# Paths on a worker's own disk (the default runs/...) give every worker its own run and a broken checkpoint.
#
# Options (environment fallbacks in brackets):
#   --name NAME               the TPU VM [TPU_NAME]
#   --zone ZONE               e.g. us-west4-a [TPU_ZONE, else CLOUDSDK_COMPUTE_ZONE]
#   --project PROJECT         [TPU_PROJECT, else CLOUDSDK_CORE_PROJECT; else gcloud's default project]
#   --accelerator-type TYPE   e.g. v5litepod-16, v5p-64, v6e-16, v4-32 [TPU_ACCELERATOR_TYPE; v5litepod-16]
#   --version IMAGE           TPU software image [TPU_VERSION; by type: v5litepod -> v2-alpha-tpuv5-lite,
#                             v5p -> v2-alpha-tpuv5, v6e -> v2-alpha-tpuv6e, others -> tpu-ubuntu2204-base]
#   --spot                    create a Spot slice (preemptible; rerun the same command to resume) [TPU_SPOT=1]
#   --config CONFIG           config path, relative to the repository root [TPU_CONFIG]
#   --bucket B                mount gs://B at /mnt/shared on every worker before the run [TPU_BUCKET]
#   --python PYTHON           interpreter for the workers' venv [TPU_PYTHON; python3.11]
#   --skip-install            reuse the code and venv already on the workers (a slice this run creates
#                             is installed all the same)
#   --stop                    send SIGTERM to a run on every worker (it saves and exits 4), and nothing else
#   --delete                  delete the slice after the run; without --config: only delete it
#   --dry-run                 print every command, in order, and run nothing
#   -h, --help                this text
#   -- section.key=value ...  config overrides, passed to every worker
#
# Exit status: that of the run's `gcloud ... ssh --worker=all` (non-zero when a worker's program fails; the
# program's statuses: 2 user error, 3 diverged, 4 interrupted by a signal after saving); 2 for a usage error
# of this script; a failing create or install stops the script with gcloud's status.
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

die() {
    echo "tpu_pod.sh: $1" >&2
    exit 2
}

name=${TPU_NAME:-}
zone=${TPU_ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}
project=${TPU_PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}
accelerator=${TPU_ACCELERATOR_TYPE:-v5litepod-16}
version=${TPU_VERSION:-}
spot=${TPU_SPOT:-0}
case $spot in 0 | 1) ;; *) die "TPU_SPOT must be 0 or 1, got '$spot'" ;; esac  # TPU_SPOT=true is no Spot slice
config=${TPU_CONFIG:-}
bucket=${TPU_BUCKET:-}
python=${TPU_PYTHON:-python3.11}
skip_install=0
created=0
stop=0
delete=0
dry_run=0
overrides=()

while [ $# -gt 0 ]; do
    case $1 in
        --name | --zone | --project | --accelerator-type | --version | --config | --bucket | --python)
            [ $# -ge 2 ] || die "$1 needs a value"
            case $1 in
                --name) name=$2 ;;
                --zone) zone=$2 ;;
                --project) project=$2 ;;
                --accelerator-type) accelerator=$2 ;;
                --version) version=$2 ;;
                --config) config=$2 ;;
                --bucket) bucket=$2 ;;
                --python) python=$2 ;;
            esac
            shift 2 ;;
        --name=* | --zone=* | --project=* | --accelerator-type=* | --version=* | --config=* | --bucket=* | --python=*)
            value=${1#*=}
            case $1 in
                --name=*) name=$value ;;
                --zone=*) zone=$value ;;
                --project=*) project=$value ;;
                --accelerator-type=*) accelerator=$value ;;
                --version=*) version=$value ;;
                --config=*) config=$value ;;
                --bucket=*) bucket=$value ;;
                --python=*) python=$value ;;
            esac
            shift ;;
        --spot) spot=1; shift ;;
        --skip-install) skip_install=1; shift ;;
        --stop) stop=1; shift ;;
        --delete) delete=1; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; overrides=("$@"); break ;;
        *) die "unknown argument '$1' (config overrides go after --; see --help)" ;;
    esac
done

[ -n "$name" ] || die "--name (or TPU_NAME) is required"
[ -n "$zone" ] || die "--zone (or TPU_ZONE) is required"
[ -n "$config" ] || [ "$delete" = 1 ] || [ "$stop" = 1 ] || die "--config (or TPU_CONFIG) is required"
bucket=${bucket#gs://}
bucket=${bucket%/}
if [ -z "$version" ]; then
    case $accelerator in
        v5litepod-* | v5e-*) version=v2-alpha-tpuv5-lite ;;
        v5p-*) version=v2-alpha-tpuv5 ;;
        v6e-*) version=v2-alpha-tpuv6e ;;
        *) version=tpu-ubuntu2204-base ;;
    esac
fi

cd "$(dirname "$0")/.."
[ -z "$config" ] || [ -f "$config" ] || die "config file $config not found (relative paths start at $PWD)"
# The workers get the repository's files git does not ignore, and run the config at the same path there.
if [ -n "$config" ] && git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    case $config in
        /*) die "config file $config: give it relative to the repository ($PWD), where the workers find it" ;;
    esac
    if [ -z "$(git ls-files -co --exclude-standard -- "$config")" ]; then
        die "config file $config: git ignores it, so the workers would not get it; move it out of the ignored path"
    fi
fi
jax_version=$(sed -n 's/^jax==\([^[:space:]#]*\).*/\1/p' requirements.txt)
[ -n "$jax_version" ] || die "no jax==VERSION pin in requirements.txt"

where=(--zone "$zone")
[ -z "$project" ] || where+=(--project "$project")

run() {  # run COMMAND...: print it with --dry-run, else run it
    if [ "$dry_run" = 1 ]; then
        quote "$@"
    else
        echo "+ $(quote "$@")" >&2
        "$@"
    fi
}

remote() {  # remote SCRIPT: run a shell command line on every worker
    run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command "$1"
}

if [ "$dry_run" = 0 ]; then
    command -v gcloud >/dev/null || die "gcloud not found (install the Google Cloud SDK)"
fi

validate() {  # the config checked here, as every worker will check it, before anything is created or run
    local py=${PY:-.venv/bin/python} out rc=0
    [ -x "$py" ] || py=python3
    out=$(JAX_PLATFORMS=cpu "$py" -m rlhf_jax.main --config "$config" ${overrides[@]+"${overrides[@]}"} --check \
        2>&1) || rc=$?
    case $rc in
        0) echo "tpu_pod.sh: ${out##*$'\n'}" >&2 ;;
        2) echo "$out" >&2; exit 2 ;;
        *) echo "tpu_pod.sh: warning: $config not validated here ($py cannot run rlhf_jax: ${out##*$'\n'})" >&2 ;;
    esac
}

logs=\$HOME/rlhf_jax_logs  # on the workers; expanded there
metadata=http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number
# This worker's number: from the metadata server, else from the hostname (...-w-<i>).
# shellcheck disable=SC2016  # the remote scripts are expanded on the workers
worker_number='w=$(curl -sf --max-time 5 -H "Metadata-Flavor: Google" '$metadata' 2>/dev/null'
# shellcheck disable=SC2016
worker_number+=' || hostname | sed -n "s/.*-w-\([0-9]*\)$/\1/p"); w=${w:-0}'

if [ "$stop" = 1 ]; then
    # Only a pid that is still the run's (a finished run's may have been reused by another process): single_host.sh,
    # which execs python -m rlhf_jax.main under the same pid.
    # shellcheck disable=SC2016
    stop_job="pid=\$(cat $logs/run.pid 2>/dev/null) && grep -qaE 'single_host.sh|rlhf_jax[.]main' /proc/\$pid/cmdline"
    stop_job+=" 2>/dev/null"
    stop_job+=" && kill -TERM \"\$pid\""
    remote "if $stop_job; then echo \"\$(hostname): SIGTERM to \$pid\"; else echo \"\$(hostname): no run\"; fi"
    exit 0
fi

if [ -z "$config" ]; then  # --delete alone
    run gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
    exit 0
fi

validate

# 1. Create the slice unless it exists.
create=(gcloud compute tpus tpu-vm create "$name" "${where[@]}" --accelerator-type "$accelerator" --version "$version")
[ "$spot" != 1 ] || create+=(--spot)
if [ "$dry_run" = 1 ]; then
    quote gcloud compute tpus tpu-vm describe "$name" "${where[@]}" --format 'value(state)'
    echo "# only if the describe fails (no such TPU VM):"
    quote "${create[@]}"
    [ "$skip_install" = 0 ] || echo "# (--skip-install: the install below runs all the same after a create)"
elif state=$(gcloud compute tpus tpu-vm describe "$name" "${where[@]}" --format 'value(state)' 2>/dev/null); then
    if [ "$state" = PREEMPTED ]; then  # a preempted Spot slice cannot be restarted: it is made again
        echo "tpu_pod.sh: TPU VM $name was preempted: deleting and creating it again" >&2
        run gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
        run "${create[@]}"
        created=1
    else
        echo "tpu_pod.sh: reusing TPU VM $name ($state)" >&2
        [ "$state" = READY ] || echo "tpu_pod.sh: warning: $name is $state, not READY" >&2
    fi
else
    run "${create[@]}"
    created=1
fi
if [ "$created" = 1 ] && [ "$skip_install" = 1 ]; then  # a new slice's disks hold nothing yet
    echo "tpu_pod.sh: $name was just created: installing the project despite --skip-install" >&2
    skip_install=0
fi

# 2. Install the project on every worker.
if [ "$skip_install" = 0 ]; then
    tarball=${TMPDIR:-/tmp}/rlhf_jax.$$.tar.gz
    if [ "$dry_run" = 1 ]; then
        echo "# the working tree's files that git does not ignore, as a tarball:"
        echo "git ls-files -z -co --exclude-standard | tar -czf $tarball --null -T -"
    else
        trap 'rm -f "$tarball"' EXIT
        if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
            git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do
                [ ! -e "$f" ] || printf '%s\0' "$f"  # deleted but not yet committed
            done | tar -czf "$tarball" --null -T -
        else  # not a git checkout: everything but the local venv, runs and caches
            tar -czf "$tarball" --exclude=./.venv --exclude=./runs --exclude=./.git --exclude='*/__pycache__' .
        fi
    fi
    run gcloud compute tpus tpu-vm scp "$tarball" "$name:rlhf_jax.tar.gz" "${where[@]}" --worker=all
    py=$(quote "$python")
    install="set -e; rm -rf ~/rlhf_jax.new; mkdir -p ~/rlhf_jax.new; tar -xzf ~/rlhf_jax.tar.gz -C ~/rlhf_jax.new"
    # What the tarball does not bring (the venv, runs/ and datasets under a relative run_dir or data.dir, caches)
    # moves across whole: a reinstall to resume keeps the checkpoints.
    # shellcheck disable=SC2016
    install+='; for f in ~/rlhf_jax/* ~/rlhf_jax/.[!.]* ~/rlhf_jax/..?*; do [ -e "$f" ] || continue'
    # shellcheck disable=SC2016
    install+='; [ -e ~/rlhf_jax.new/"${f##*/}" ] || mv "$f" ~/rlhf_jax.new/; done'
    install+="; rm -rf ~/rlhf_jax; mv ~/rlhf_jax.new ~/rlhf_jax; cd ~/rlhf_jax"
    install+="; if [ ! -x .venv/bin/python ] && ! { command -v $py >/dev/null && $py -m venv .venv; }; then"
    install+=" rm -rf .venv; sudo apt-get update -qq; sudo apt-get install -y -qq $py $py-venv; $py -m venv .venv; fi"
    install+="; .venv/bin/pip install -q --upgrade pip"
    install+="; .venv/bin/pip install -q -r requirements.txt $(quote "jax[tpu]==$jax_version")"
    install+="; .venv/bin/pip install -q --no-deps -e ."
    remote "$install"
fi

# 3. Shared storage.
if [ -n "$bucket" ]; then
    mount="set -e; if ! mountpoint -q /mnt/shared; then"
    mount+=" if ! command -v gcsfuse >/dev/null; then"
    key=/usr/share/keyrings/cloud.google.asc
    mount+=" echo \"deb [signed-by=$key] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\""
    mount+=" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null"
    mount+="; curl -fsS https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee $key >/dev/null"
    mount+="; sudo apt-get update -qq; sudo apt-get install -y -qq gcsfuse; fi"
    mount+="; sudo mkdir -p /mnt/shared; sudo chown \"\$(id -u):\$(id -g)\" /mnt/shared"
    # Checkpoints and exports are written beside their place and renamed in: a flat bucket renames directories
    # only up to --rename-dir-limit objects.
    mount+="; gcsfuse --implicit-dirs --rename-dir-limit=200000 $(quote "$bucket") /mnt/shared; fi"
    remote "$mount"
fi

# 4. Run on every worker; worker 0's output streams here.
# The log exists before the run starts, so worker 0's `tail -f` never misses it however fast the run ends.
job="cd ~/rlhf_jax 2>/dev/null || { echo \"\$(hostname): no ~/rlhf_jax: rerun without --skip-install\" >&2; exit 2; }"
job+="; mkdir -p $logs; $worker_number; log=$logs/worker\$w.log; : >\"\$log\""
job+="; launch/single_host.sh $(quote "$config" ${overrides[@]+"${overrides[@]}"}) >>\"\$log\" 2>&1 </dev/null & pid=\$!"
job+="; echo \$pid >$logs/run.pid; t="
job+="; if [ \"\$w\" = 0 ]; then tail -n +1 -f --pid=\$pid \"\$log\" & t=\$!; fi"
job+="; wait \$pid; rc=\$?; rm -f $logs/run.pid; if [ -n \"\$t\" ]; then wait \$t; fi"
job+="; [ \$rc = 0 ] || echo \"worker \$w: exit status \$rc (log: \$log)\" >&2; exit \$rc"
rc=0
remote "$job" || rc=$?

# 5. Delete on request.
if [ "$delete" = 1 ]; then
    run gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet || true
fi
exit "$rc"

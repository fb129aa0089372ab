"""Where the processes of a run are found (config, environment, SLURM), and the helpers that are no-ops with one
process. The multi-process runs themselves are in test_multiprocess.py."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax.config import DistributedSection
from rlhf_jax.errors import UserError
from rlhf_jax.runtime import distributed

ROOT = Path(__file__).resolve().parents[1]

EXPLICIT = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}


def test_one_process_unless_told_or_detected(monkeypatch):
    monkeypatch.setattr(distributed, "_on_tpu_vm", lambda: False)
    assert distributed.settings(None, {}) is None
    assert distributed.settings(DistributedSection(), {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None


def test_environment_then_config_key_by_key(monkeypatch):
    monkeypatch.setattr(distributed, "_on_tpu_vm", lambda: False)
    assert distributed.settings(None, EXPLICIT) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                                    "process_id": 2}
    section = DistributedSection(coordinator_address="head:99", process_id=3)
    assert distributed.settings(section, EXPLICIT) == {"coordinator_address": "head:99", "num_processes": 4,
                                                       "process_id": 3}


def test_slurm_and_tpu_slices_are_left_to_jax_detection(monkeypatch):
    monkeypatch.setattr(distributed, "_on_tpu_vm", lambda: False)
    assert distributed.settings(None, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16"}) == {}
    # the batch script and salloc shells see SLURM_NTASKS too, but run one process
    assert distributed.settings(None, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}) is None
    assert distributed.settings(None, {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == {}
    monkeypatch.setattr(distributed, "_on_tpu_vm", lambda: True)
    assert distributed.settings(None, {}) == {}


@pytest.mark.parametrize("env, fragment", [
    ({"JAX_NUM_PROCESSES": "2"}, "coordinator_address / JAX_COORDINATOR_ADDRESS, process_id / JAX_PROCESS_ID"),
    ({**EXPLICIT, "JAX_PROCESS_ID": "4"}, "process_id 4 is outside 0..3"),
    ({**EXPLICIT, "JAX_NUM_PROCESSES": "four"}, "JAX_NUM_PROCESSES='four': expected an integer"),
])
def test_incomplete_or_inconsistent_settings_are_one_line(env, fragment, monkeypatch):
    monkeypatch.setattr(distributed, "_on_tpu_vm", lambda: False)
    with pytest.raises(UserError, match=re.escape(fragment)) as e:
        distributed.settings(None, env)
    assert "\n" not in str(e.value)


def test_with_one_process_the_helpers_are_plain():
    assert not distributed.is_multiprocess() and distributed.is_primary()
    distributed.barrier("nothing to wait for")
    assert distributed.all_gather_json({"next_index": 3}) == [{"next_index": 3}]
    assert distributed.broadcast_json([1, "a"]) == [1, "a"]
    assert distributed.on_primary(lambda: {"done": True}) == {"done": True}
    with distributed.alone():
        assert not distributed.acting_alone()  # alone only means something with several processes
    import jax

    x = jax.device_put(np.arange(8.0))
    np.testing.assert_array_equal(distributed.to_host({"x": x})["x"], np.arange(8.0))


_TWO_PROCESSES = """
import json, sys
import numpy as np
from rlhf_jax.runtime import distributed
distributed.initialize()
me = distributed.jax.process_index()
widths = np.array([[3, 90], [70, 2]][me])  # each process's own widths: the agreed ones are the larger of each
print(json.dumps({"max": distributed.max_over_processes(widths).tolist(),
                  "all": distributed.all_gather_json({"process": me}),
                  "primary": distributed.broadcast_json(me)}))
"""


def test_two_processes_agree_on_the_largest_width_and_gather_in_order(tmp_path):
    """Buckets take the widest batch of any process: max_over_processes is the element-wise maximum (a minimum
    would cut another process's rows); gathers come in process order and a broadcast is process 0's."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**env, "JAX_PLATFORMS": "cpu", "JAX_NUM_PROCESSES": "2",
                                              "JAX_PROCESS_ID": str(i),
                                              "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}"})
             for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert results[0] == results[1] == {"max": [70, 90], "all": [{"process": 0}, {"process": 1}], "primary": 0}


def test_the_stages_that_only_write_files_run_on_process_0_alone(monkeypatch, tmp_path):
    """prepare runs no sharded program: with several processes process 0 writes and the others wait for its
    summary, instead of each writing the same dataset."""
    from rlhf_jax.config import load_config
    from rlhf_jax.stages import dispatch

    on_primary = []
    monkeypatch.setattr(distributed, "on_primary", lambda fn: on_primary.append(fn) or fn())
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(5)))
    summary = dispatch.run(load_config(None, ["stage=prepare", f"run_dir={tmp_path / 'run'}", f"data.dir={tmp_path}",
                                              "prepare.format=jsonl_prompts", f"prepare.inputs=[{path}]",
                                              "prepare.name=p"]))
    assert len(on_primary) == 1 and summary["examples"] == {"train": 5}


# ------------------------------------------------------------------------------------------------ failures


def _two_mains(tmp_path, code: str, args: list[list[str]]) -> list:
    """Two processes of `python -m rlhf_jax.main` joined on loopback, each with its own arguments, started by
    `code` (which may replace a stage on one of them)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return [subprocess.Popen([sys.executable, "-c", code, *args[i]], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=tmp_path,
                             env={**env, "JAX_PLATFORMS": "cpu", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i),
                                  "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                  "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
            for i in range(2)]


_MAIN = """
import sys
from rlhf_jax import main
from rlhf_jax.runtime.signals import exit_process
exit_process(main.main(sys.argv[1:]))
"""


def test_processes_given_other_settings_stop_in_one_line_naming_them(tmp_path):
    """Each process trained with its own learning rate, without a word, and the run recorded process 0's."""
    common = ["--config", str(ROOT / "configs" / "generate.yaml"), f"run_dir={tmp_path / 'run'}",
              "sampling.max_new_tokens=2"]
    procs = _two_mains(tmp_path, _MAIN, [common, [*common, "sampling.temperature=0.5"]])
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 2, err[-2000:]
        assert err.strip().splitlines()[-1] == (
            "error: distributed: process 1 was given other settings than process 0: sampling.temperature=0.5 "
            "(process 0: 0.7); every process must run the same config with the same overrides"), err[-2000:]
    assert not (tmp_path / "run").exists()


_ONE_FAILS = """
import sys, os
from rlhf_jax.errors import UserError
from rlhf_jax.stages import dispatch

def fails(cfg, run_dir):
    if os.environ["JAX_PROCESS_ID"] == "1":
        raise {error}("only this process's: its own data, disk or bug")
    return dispatch.run_generate(cfg, run_dir)

dispatch.STAGES["generate"] = fails
""" + _MAIN


@pytest.mark.parametrize("error, status", [("UserError", 2), ("RuntimeError", 1)])
def test_a_process_that_stops_on_its_own_error_exits_instead_of_waiting_for_the_others(tmp_path, error, status):
    """JAX's exit handler waits at a barrier for every process, while process 0 waits for this one in a collective:
    both hung until something killed them. The failing process now exits at once with its status (a launcher then
    stops the others)."""
    import subprocess

    argv = ["--config", str(ROOT / "configs" / "generate.yaml"), f"run_dir={tmp_path / 'run'}"]
    procs = _two_mains(tmp_path, _ONE_FAILS.format(error=error), [argv, argv])
    try:
        _, err = procs[1].communicate(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("the failing process did not exit")
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[1].returncode == status, err[-2000:]
    assert "only this process's: its own data, disk or bug" in err


def test_a_wait_for_the_other_processes_that_timed_out_is_one_line():
    """Process 0's backend start waits for every process's devices: with one of them stopped on its own error it
    timed out after two minutes with a traceback."""
    from rlhf_jax.errors import lost_processes_in_one_line

    timed_out = ("Unable to initialize backend 'cpu': INTERNAL: Getting local topologies failed: Error 1: "
                 "GetKeyValue() timed out with key: cpu:local_topology/cpu/1 and duration: 2m")
    with pytest.raises(UserError) as caught, lost_processes_in_one_line():
        raise RuntimeError(timed_out + "\n\nmore lines")
    assert str(caught.value) == (f"distributed: waiting for the other processes timed out ({timed_out}); one of "
                                 "them stopped on an error of its own (see its log) or never started")
    with pytest.raises(RuntimeError, match="something else"), lost_processes_in_one_line():
        raise RuntimeError("something else\nGetKeyValue() in a later line of another error")
    for first in ("DEADLINE_EXCEEDED: Barrier timed out. Barrier_id: wrote x", "Barrier timed out: id x"):
        with pytest.raises(UserError, match="waiting for the other processes timed out"), \
                lost_processes_in_one_line():
            raise RuntimeError(first)


@pytest.mark.parametrize("entry", ["stage", "pipeline"])
def test_main_reports_a_timed_out_wait_for_the_other_processes_in_one_line(monkeypatch, capsys, entry):
    from rlhf_jax import main as main_cli
    from rlhf_jax import pipeline
    from rlhf_jax.stages import dispatch

    def timed_out(*args):
        raise RuntimeError("INTERNAL: GetKeyValue() timed out with key: cpu:local_topology/cpu/1\nmore")

    monkeypatch.setattr(dispatch if entry == "stage" else pipeline, "run", timed_out)
    config = ROOT / "configs" / ("generate.yaml" if entry == "stage" else "demo.yaml")
    assert main_cli.main(["--config", str(config)]) == 2
    assert capsys.readouterr().err.startswith("error: distributed: waiting for the other processes timed out")


def test_joining_says_so_and_waits_as_long_as_configured(monkeypatch, capsys):
    """A process whose peers never start waited five minutes in silence (JAX's default) before an abort."""
    import sys

    import jax

    joined = []
    monkeypatch.setattr(distributed, "_STATE", {})
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(jax.config, "update", lambda *args: None)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: joined.append(kwargs))
    distributed.initialize(DistributedSection(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2,
                                              initialization_timeout=45))
    assert joined == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2,
                       "cluster_detection_method": "deactivate", "initialization_timeout": 105}]  # ours ends first
    assert capsys.readouterr().err == ("distributed: process 2 of 4 joining at 10.0.0.1:1234; waiting up to 45 s for "
                                       "all of them (distributed.initialization_timeout)\n")


def test_check_same_names_up_to_three_keys_of_the_first_process_that_differs(monkeypatch):
    monkeypatch.setattr(distributed, "is_multiprocess", lambda: True)
    base = {"a": 1, "b": float("nan"), "c": [1, 2], "d": "x", "e": None, "f": 0.5}
    gathered = [base, dict(base), {**base, "a": 2, "c": [1, 3], "d": "y", "e": 0, "g": True}]
    monkeypatch.setattr(distributed, "all_gather_json", lambda value: json.loads(json.dumps(gathered)))
    with pytest.raises(UserError) as caught:
        distributed.check_same(base, "settings")
    assert str(caught.value) == ("distributed: process 2 was given other settings than process 0: a=2 (process 0: 1); "
                                 "c=[1, 3] (process 0: [1, 2]); d='y' (process 0: 'x') and 2 more; every process must "
                                 "run the same config with the same overrides")
    gathered[2] = dict(base)  # equal, NaN included
    distributed.check_same(base, "settings")


_ONE_LEAVES = """
import os, sys
if os.environ["JAX_PROCESS_ID"] == "1":  # joins, then is gone before the devices are set up
    from rlhf_jax.runtime import distributed
    distributed.initialize()
    os._exit(7)
""" + _MAIN


def test_a_process_left_waiting_for_one_that_is_gone_ends_in_one_line(tmp_path):
    """Process 0's backend waits for every process's devices; when that wait timed out, the exit asked JAX how many
    processes there were, which started the backend (and the wait) again, until JAX's heartbeat aborted it."""
    argv = ["--config", str(ROOT / "configs" / "generate.yaml"), f"run_dir={tmp_path / 'run'}"]
    import os

    os.environ["JAX_CPU_GET_LOCAL_TOPOLOGY_TIMEOUT_MINUTES"] = "1"  # inherited by the two processes
    try:
        procs = _two_mains(tmp_path, _ONE_LEAVES, [argv, argv])
    finally:
        del os.environ["JAX_CPU_GET_LOCAL_TOPOLOGY_TIMEOUT_MINUTES"]
    outs = [p.communicate(timeout=95) for p in procs]
    assert procs[1].returncode == 7
    last = outs[0][1].strip().splitlines()[-1]
    assert procs[0].returncode == 2 and last.startswith("error: distributed: waiting for the other processes timed "
                                                        "out (") and "GetKeyValue" in last, outs[0][1][-2000:]


_NEVER_STARTS = """
import os
if os.environ["JAX_PROCESS_ID"] == "1":
    os._exit(7)  # never joins (a node that did not come up)
""" + _MAIN


@pytest.mark.parametrize("waiting", [0, 1])
def test_a_process_whose_peer_never_joins_stops_in_one_line_at_the_timeout(tmp_path, waiting):
    """JAX aborted the process with a C++ stack trace when its wait for the others timed out."""
    argv = ["--config", str(ROOT / "configs" / "generate.yaml"), f"run_dir={tmp_path / 'run'}",
            "distributed.initialization_timeout=3"]
    code = _NEVER_STARTS.replace('== "1"', f'== "{1 - waiting}"')
    procs = _two_mains(tmp_path, code, [argv, argv])
    outs = [p.communicate(timeout=60) for p in procs]
    err = outs[waiting][1]
    assert procs[1 - waiting].returncode == 7
    assert procs[waiting].returncode == 2, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        "error: distributed: not every process joined within 3 s (distributed.initialization_timeout): one of them "
        "never started, stopped before joining, or cannot reach 127.0.0.1:" + _port_joined_at(err)), err[-2000:]
    assert not (tmp_path / "run").exists()


def _port_joined_at(err: str) -> str:
    return re.search(r"joining at 127\.0\.0\.1:(\d+)", err).group(1)


@pytest.mark.parametrize("kind, status", [(RuntimeError, 1), (KeyboardInterrupt, 130)])
def test_an_uncaught_exception_ends_a_joined_process_at_once_after_its_traceback(monkeypatch, kind, status):
    """JAX's exit handler would wait at a barrier for processes that wait for this one in a collective."""
    import sys

    printed, exited = [], []
    monkeypatch.setattr(sys, "excepthook", lambda *args: printed.append(args[0]))
    monkeypatch.setattr(distributed.os, "_exit", exited.append)
    distributed._exit_at_once_on_a_crash()
    monkeypatch.setattr(distributed, "_STATE", {"settings": None})  # alone: the traceback, then Python's own exit
    sys.excepthook(kind, kind("x"), None)
    assert printed == [kind] and exited == []
    monkeypatch.setattr(distributed, "_STATE", {"settings": {"num_processes": 2}})
    sys.excepthook(kind, kind("x"), None)
    assert printed == [kind, kind] and exited == [status]


def test_a_join_that_succeeds_stops_its_timeout(monkeypatch):
    """The watchdog that ends a process whose peers never join would end every run at the timeout if left on."""
    import sys
    import time

    import jax

    fired = []
    monkeypatch.setattr(distributed, "_STATE", {})
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(jax.config, "update", lambda *args: None)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: None)
    monkeypatch.setattr(distributed, "_not_all_joined", lambda *args: fired.append(args))
    distributed.initialize(DistributedSection(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1,
                                              initialization_timeout=1))
    time.sleep(1.3)
    assert fired == []

"""Where the processes of a run are found (config, environment, SLURM), and the helpers that are no-ops with one
process. The multi-process runs themselves are in test_multiprocess.py."""

import json
import re

import numpy as np
import pytest

from rlhf_jax.config import DistributedSection
from rlhf_jax.errors import UserError
from rlhf_jax.runtime import distributed

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

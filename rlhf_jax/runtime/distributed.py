"""Several processes, one program: JAX's multi-controller runtime over TPU pod slices, SLURM clusters and
processes on one machine (`launch/local.sh`). Every process runs the same stage; each reads its share of every
global batch, all of them take part in each compiled step and in Orbax checkpoints, and process 0 alone writes
the run's files (metrics, samples, exports' metadata, reports).

`initialize` joins the processes (a no-op with one process). Where the processes are is found in this order:
  1. the `distributed` config section, key by key;
  2. the environment: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID
     (set by launch/local.sh and launch/gpu_slurm.sbatch);
  3. automatic detection under SLURM (more than one task) and on a TPU VM;
otherwise there is one process.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import sys
import threading

import jax
import numpy as np

from rlhf_jax.errors import UserError

_STATE: dict = {}  # the settings this process joined with; set once per process


def settings(section=None, environ=None) -> dict | None:
    """{coordinator_address, num_processes, process_id} to join with, {} to let JAX detect the cluster, or
    None for a single process. Raises UserError on an incomplete or inconsistent explicit setting."""
    environ = os.environ if environ is None else environ

    def pick(key: str, env: str, unset):
        value = getattr(section, key, unset) if section is not None else unset
        if value == unset and environ.get(env, "") != "":
            raw = environ[env]
            try:
                value = raw if isinstance(unset, str) else int(raw)
            except ValueError:
                raise UserError(f"{env}={raw!r}: expected an integer") from None
        return value

    address = pick("coordinator_address", "JAX_COORDINATOR_ADDRESS", "")
    count = pick("num_processes", "JAX_NUM_PROCESSES", 0)
    index = pick("process_id", "JAX_PROCESS_ID", -1)
    if address or count > 1:
        missing = [name for name, v in (("coordinator_address / JAX_COORDINATOR_ADDRESS", address),
                                        ("num_processes / JAX_NUM_PROCESSES", count > 0),
                                        ("process_id / JAX_PROCESS_ID", index >= 0)) if not v]
        if missing:
            raise UserError(f"distributed: {', '.join(missing)} not set (all three are needed to join "
                            "processes explicitly)")
        if not 0 <= index < count:
            raise UserError(f"distributed: process_id {index} is outside 0..{count - 1}")
        return {"coordinator_address": address, "num_processes": count, "process_id": index}
    # Inside an srun step of several tasks (not the batch script or an salloc shell, where SLURM_NTASKS is set too).
    if int(environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in environ:
        return {}
    if environ.get("TPU_WORKER_HOSTNAMES", "").count(",") or _on_tpu_vm():
        return {}
    return None


def _on_tpu_vm() -> bool:
    """TPU chips on this host (v4/v5e: /dev/accel*; v5p/v6e: vfio devices, with libtpu installed)."""
    import importlib.util

    return bool(glob.glob("/dev/accel[0-9]*")) or bool(
        glob.glob("/dev/vfio/[0-9]*") and importlib.util.find_spec("libtpu") is not None)


def initialize(section=None) -> None:
    """Join the other processes of this run (once per process; later calls must ask for the same)."""
    wanted = settings(section)
    if "settings" in _STATE:
        if wanted is not None and wanted != _STATE["settings"] and _STATE["settings"] != {}:
            raise UserError(f"distributed: already joined as {_STATE['settings']}, now asked for {wanted}")
        return
    _STATE["settings"] = wanted
    if wanted is None:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU arrays' collectives between processes
    # SIGTERM stays ours (loop.StopSignals agrees on it between processes): JAX's preemption notifier would take
    # it over for the whole process, also where no training loop asks it to stop.
    jax.config.update("jax_enable_preemption_service", False)
    # Given all three, nothing is detected: under srun JAX would otherwise keep one GPU per task
    # (JAX_LOCAL_DEVICE_IDS still chooses them for one task per GPU).
    detect = {"cluster_detection_method": "deactivate"} if wanted else {}
    timeout = getattr(section, "initialization_timeout", 300)
    who = (f"process {wanted['process_id']} of {wanted['num_processes']} joining at {wanted['coordinator_address']}"
           if wanted else "joining the detected cluster's processes")
    print(f"distributed: {who}; waiting up to {timeout} s for all of them (distributed.initialization_timeout)",
          file=sys.stderr, flush=True)
    where = wanted.get("coordinator_address") or "the detected coordinator"
    # JAX aborts the process with a C++ stack trace when its own wait times out: ours ends first, in one line.
    watchdog = threading.Timer(timeout, _not_all_joined, (timeout, where))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**wanted, **detect, initialization_timeout=timeout + _JAX_GRACE_S)
    except Exception as e:  # noqa: BLE001 - a wrong address or a missing peer surfaces as many error types
        raise UserError(f"distributed: cannot join {wanted or 'the detected cluster'} ({_first_line(e)})") from None
    finally:
        watchdog.cancel()
    _exit_at_once_on_a_crash()


_JAX_GRACE_S = 60  # JAX's own join timeout comes this long after ours


def _not_all_joined(timeout: int, where: str) -> None:
    """Ends a process whose join did not complete in time (called on a timer thread, while JAX waits)."""
    print(f"error: distributed: not every process joined within {timeout} s (distributed.initialization_timeout): "
          f"one of them never started, stopped before joining, or cannot reach {where}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2)


def _exit_at_once_on_a_crash() -> None:
    """An exception no one catches ends this process once its traceback is printed, without JAX's exit handler,
    which would wait at a barrier for the other processes while they wait for this one in a collective (see
    `signals.exit_process` for the errors the entry points report)."""
    previous = sys.excepthook

    def crashed(kind, value, traceback):
        previous(kind, value, traceback)
        if joined_others():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130 if issubclass(kind, KeyboardInterrupt) else 1)

    sys.excepthook = crashed


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


def _joined() -> bool:
    """Whether this process joined others (asking jax before that would start its backend single-process)."""
    return _STATE.get("settings") is not None


def joined_others() -> bool:
    """Whether this process joined others: asks JAX nothing, since a backend that failed to start (a peer gone)
    would start, and wait, again. A detected cluster counts as several processes."""
    settings = _STATE.get("settings")
    return settings is not None and settings.get("num_processes", 2) > 1


def is_multiprocess() -> bool:
    """Several processes take part in what this process does now (not inside `alone()`)."""
    return _joined() and jax.process_count() > 1 and not _STATE.get("alone")


@contextlib.contextmanager
def alone():
    """Inside, this process works as if it were the only one: no barriers or gathers, and Orbax writes and reads
    for this process alone (what process 0 does by itself, see `on_primary`)."""
    before = _STATE.get("alone", False)
    _STATE["alone"] = True
    try:
        yield
    finally:
        _STATE["alone"] = before


def acting_alone() -> bool:
    return bool(_STATE.get("alone")) and _joined() and jax.process_count() > 1


def is_primary() -> bool:
    """Process 0 writes the run's files."""
    return not _joined() or jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (no-op with one process)."""
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_host(tree):
    """Numpy copies of (possibly sharded, possibly other processes') arrays, on every process. Collective
    with several processes (every process must call it with the same tree); one leaf is gathered at a time,
    so no device ever holds more than one whole leaf."""
    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(jax.device_get(x))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process (collective: every process calls it at the same point)."""
    if not is_multiprocess():
        return flag
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([flag], np.int32))).any())


def max_over_processes(x: np.ndarray) -> np.ndarray:
    """The element-wise maximum of an integer array over every process (`x` itself with one process)."""
    if not is_multiprocess():
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x, np.int64))).max(axis=0)


def sum_over_processes(x: np.ndarray) -> np.ndarray:
    """The element-wise sum of an integer array over every process (`x` itself with one process)."""
    if not is_multiprocess():
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x, np.int64))).sum(axis=0)


def broadcast_json(value):
    """Process 0's JSON-serialisable `value`, on every process."""
    return all_gather_json(value)[0] if is_multiprocess() else value


def all_gather_json(value) -> list:
    """[value of process 0, value of process 1, ...]: small JSON-serialisable values from every process."""
    if not is_multiprocess():
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([data.size], np.int32))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:data.size] = data
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths.reshape(-1))]


def on_primary(fn):
    """fn() run by process 0 alone (it writes files), and its JSON-serialisable result, or the UserError it
    raised, given to every process (which waits for it)."""
    if not is_multiprocess():
        return fn()
    result = error = None
    failure: BaseException | None = None
    if is_primary():
        try:
            with alone():
                result = fn()
        except BaseException as e:  # noqa: BLE001 - the others must hear of any failure, not wait for it
            failure, error = e, str(e) if isinstance(e, UserError) else f"process 0 failed ({_first_line(e)})"
    result, error = broadcast_json([result, error])
    if failure is not None:
        raise failure
    if error is not None:
        raise UserError(error)
    return result


def check_same(settings: dict, what: str) -> None:
    """Every process must run the same program: `settings` (flat, JSON-serialisable) are compared with process 0's
    (collective). A difference is one line on every process naming the keys, where the processes would otherwise
    train apart without a word (each with its own learning rate) or wait in a collective one of them never reaches."""
    if not is_multiprocess():
        return
    values = all_gather_json(settings)
    for index, other in enumerate(values[1:], 1):
        keys = sorted(k for k in set(values[0]) | set(other)  # as JSON text: a NaN equals itself
                      if json.dumps(values[0].get(k)) != json.dumps(other.get(k)))
        if keys:
            shown = "; ".join(f"{k}={other.get(k)!r} (process 0: {values[0].get(k)!r})" for k in keys[:3])
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise UserError(f"distributed: process {index} was given other {what} than process 0: {shown}{more}; "
                            "every process must run the same config with the same overrides")


def shared_token(nbytes: int = 3) -> str:
    """A random token that every process agrees on (temporary names must not differ between processes)."""
    return broadcast_json(secrets.token_hex(nbytes))

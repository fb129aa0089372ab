"""Writing an output directory as a whole: its path holds either what was there before or the complete new
contents, never a mix of the two and never a half-written directory.

    with replace_dir(out, overwrite=args.overwrite, inputs=[args.input]) as tmp:
        ...write every file into tmp (an empty directory next to `out`)...
    # done: tmp has become `out`, and the previous `out` is deleted

An error or interrupt inside the block deletes tmp (and the parents it created) and leaves `out` as it was;
an OSError there (a full disk, an unwritable parent) is re-raised as a one-line `OutputDirError` naming `out`
and the OS reason. Refused up front, also as OutputDirError: an `out` that is a file, that exists and is not
empty (without `overwrite`), or that is, is inside or contains one of `inputs` (replacing it would delete
them). Call `check_out_dir` with the same arguments to refuse a bad `out` before any slow loading.

`make_run_dir(run_dir)` creates a run's directory and says which directories it made, so that a run stopped by a
user error before any progress can remove them again (`remove_made`); `run_dir_lock(run_dir)` holds an OS lock on
`{run_dir}/.lock` for a run's life, so that two runs never write one run_dir at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

from rlhf_jax.errors import UserError, os_reason

PathLike = str | os.PathLike


class OutputDirError(UserError):
    """An output directory that cannot be written, or that must not be (it exists, or it holds an input)."""


def check_out_dir(out: PathLike, overwrite: bool = False, inputs: Iterable[PathLike] = ()) -> Path:
    """`out` resolved, once it is known to be writable as a whole: not a file, not one of `inputs`, not inside
    or around one of them, and (unless `overwrite`) absent or empty. Raises OutputDirError otherwise."""
    out = Path(out)
    for src in inputs:
        _check_apart(out, Path(src))
    try:
        if out.exists() and not out.is_dir():
            raise OutputDirError(f"{out}: is a file, expected a directory")
        parent = next(p for p in out.absolute().parents if p.exists())
        if not parent.is_dir():
            raise OutputDirError(f"{out}: cannot be created, {parent} is a file")
        if out.is_dir() and not overwrite and any(out.iterdir()):
            raise OutputDirError(f"{out}: already exists and is not empty (pass --overwrite to replace it)")
    except OSError as e:
        raise write_error(out, e) from None
    return out.resolve()


@contextlib.contextmanager
def replace_dir(out: PathLike, overwrite: bool = False, inputs: Iterable[PathLike] = ()) -> Iterator[Path]:
    """Yields an empty temporary directory beside `out` to write into; on a clean exit it replaces `out`
    (see the module docstring). Checks `out` with `check_out_dir` first.

    With several JAX processes every process enters it (each may write its part, e.g. its shards of a
    checkpoint): they share one temporary name, process 0 creates it and swaps it in once all have written."""
    out = check_out_dir(out, overwrite, inputs)
    primary, barrier, token, on_primary = _processes()
    new_parents = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    tmp, done = None, False
    try:
        tmp = out.parent / f".{out.name}.partial-{token}"
        if primary:
            _clear_leftovers(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()  # not tempfile.mkdtemp: that is mode 0700, this follows the umask like any new directory
        barrier(f"created {tmp}")
        yield tmp
        barrier(f"written {tmp}")
        on_primary(lambda: _swap_in(tmp, out))  # every process hears whether the swap worked
        done = True
    except OSError as e:
        raise write_error(out, e) from None
    finally:
        if tmp is not None and primary:
            remove_dir(tmp)  # gone already after a successful swap
        for parent in new_parents if not done and primary else ():
            with contextlib.suppress(OSError):  # only while empty: nothing else is ever removed
                parent.rmdir()


def make_run_dir(run_dir: PathLike, key: str = "run_dir") -> list[str]:
    """Creates `run_dir` and its missing parents, or refuses in one line (a file, a parent that cannot be made);
    returns the directories it created, deepest first (strings: the list may go to other processes as JSON)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{key}={run_dir}: is a file, expected a directory")
    created = [str(d) for d in (run_dir, *run_dir.parents) if not d.exists()]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{key}={run_dir}: cannot create ({os_reason(e)})") from None
    return created


def remove_made(created: list[str]) -> None:
    """Undoes `make_run_dir`: the run dir (the first) with everything in it, then each parent it made while empty
    (runs/ of runs/sft). The caller decides that nothing in it is worth keeping."""
    if not created:
        return
    shutil.rmtree(created[0], ignore_errors=True)
    for parent in created[1:]:
        with contextlib.suppress(OSError):
            os.rmdir(parent)


@contextlib.contextmanager
def run_dir_lock(run_dir: PathLike, key: str = "run_dir") -> Iterator[None]:
    """Holds an exclusive lock on `{run_dir}/.lock` (which records the holder's pid and host) for the block; a run
    dir locked by another process is refused in one line naming it. The OS drops the lock when its holder ends,
    however it ends, so a killed run never leaves a stale lock. With several JAX processes, process 0 locks for
    all of them. A filesystem without locks (some FUSE mounts) gets a warning and no lock."""
    run_dir = Path(run_dir)
    on_primary = _processes()[3]
    fds: list[int] = []

    def lock() -> None:
        fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        fds.append(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise UserError(f"{key}={run_dir}: in use by {holder}; wait for that run to end or use another "
                            f"{key}") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            print(f"warning: {key}={run_dir}: cannot be locked ({os_reason(e)}); nothing stops a second run on "
                  "it at the same time", file=sys.stderr)
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    try:
        on_primary(lock)
        yield
    finally:
        for fd in fds:
            os.close(fd)


def _clear_leftovers(out: Path) -> None:
    """What writers of `out` killed mid-write left beside it (each name carries its writer's pid; a live writer's
    is kept): a partial directory is deleted; an old `out` renamed aside is renamed back when the kill came
    before the new one took its place, else deleted."""
    if not out.parent.is_dir():
        return
    for kind in ("old", "partial"):  # an old `out` first: it is restored only where no new one was swapped in
        for leftover in sorted(out.parent.glob(f".{glob.escape(out.name)}.{kind}-*")):
            pid = leftover.name.rpartition(f".{kind}-")[2].split("-")[0]
            # this process writes one `out` at a time: its own pid is a former process's (a restarted container's
            # entry point gets the same pid)
            if not pid.isdigit() or (int(pid) != os.getpid() and _alive(int(pid))):
                continue
            if kind == "old" and not out.exists():
                os.replace(leftover, out)
            else:
                remove_dir(leftover)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def _processes():
    """(whether this process creates and swaps directories, a barrier between processes, a temporary name token
    every process agrees on, a runner of what process 0 does alone that tells every process how it went). Without
    rlhf_jax.runtime.distributed loaded there is one process."""
    distributed = sys.modules.get("rlhf_jax.runtime.distributed")  # not loaded: one process
    if distributed is not None and distributed.is_multiprocess():
        token = distributed.broadcast_json(f"{os.getpid()}-{secrets.token_hex(3)}")  # process 0's pid: its writer
        return distributed.is_primary(), distributed.barrier, token, distributed.on_primary
    return True, lambda name: None, f"{os.getpid()}-{secrets.token_hex(3)}", lambda fn: fn()


def write_error(out: Path, error: OSError) -> OutputDirError:
    """'<out>: cannot write (<OS reason>); nothing was changed', for an OSError met while writing `out`."""
    return OutputDirError(f"{out}: cannot write ({os_reason(error)}); nothing was changed")


def _check_apart(out: Path, src: Path) -> None:
    """Replacing `out` deletes what it held: refuse an `out` that is, is inside, or contains an input."""
    o, s = out.resolve(), src.resolve()
    if o == s:
        raise OutputDirError(f"{out}: is the input {src}; write the output to another directory")
    if s in o.parents:
        raise OutputDirError(f"{out}: is inside the input {src}; write the output outside it")
    if o in s.parents:
        raise OutputDirError(f"{out}: contains the input {src}; replacing it would delete the input")


def remove_dir(tmp: Path) -> None:
    """Delete a temporary directory, and again after pauses while it reappears: writes that a failed library
    call left in flight (orbax's, after a full disk) can recreate files in it after the first pass."""
    for pause in (0.0, 0.2, 1.0):
        time.sleep(pause)
        try:
            if not tmp.exists():
                return
        except OSError:  # a name the file system refuses: nothing to remove, and the first error must show
            return
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the old `out` aside, rename `tmp` in, then delete the old one. If the second rename fails the
    old `out` is renamed back; a kill between the two renames leaves it whole as `.<name>.old-*` beside `out`."""
    if not out.exists():
        os.replace(tmp, out)
        sync_dir(out.parent)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(3)}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:  # an OSError, or a second Ctrl-C landing between the renames
        if not out.exists():
            os.replace(old, out)
        raise
    sync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_bytes_atomically(path: Path, data: bytes) -> Path:
    """Write a file under a temporary name beside it, then rename: a reader never sees half of it, a failed
    write leaves no temporary file, and after a crash or power loss the file is the old one or the new one, whole
    (the data reaches the disk before the rename, the rename before this returns)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_dir(path.parent)
    return path


def sync_dir(directory: Path) -> None:
    """Make the renames in `directory` durable; a file system that cannot sync a directory is left as it is."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_safetensors(tensors: dict, path: Path) -> None:
    """A safetensors file (PyTorch's metadata, as transformers and peft expect), its I/O errors (a full disk) as
    OSErrors, and its mode following the umask as every other file here: safetensors creates files 0600, which a
    serving account or a colleague could not read beside their readable config.json."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as e:
        raise OSError(f"{Path(path).name}: {os_reason(e)}") from None
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc); elsewhere set for an instant to
    the strictest value, so that a file another thread creates meanwhile is private, never open to all."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def write_text_atomically(path: Path, text: str) -> Path:
    return write_bytes_atomically(path, text.encode())


def write_json_atomically(path: Path, data) -> None:
    write_text_atomically(path, json.dumps(data, indent=2))

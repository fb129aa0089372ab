"""Model files and directories that fail safely: through the real CLIs (`convert`, `generate`, called in-process
through `main(argv)`), every bad input or failed write is one `error: ...` line and exit code 2, and what is on
disk afterwards is either the previous output, whole, or the new one, whole; never a mix or a half.

Failed writes are simulated by monkeypatching the write to raise OSError(ENOSPC) (tests run as root, so
permission bits do not fail them).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
from safetensors import SafetensorError

from rlhf_jax import convert as convert_cli
from rlhf_jax import generate as generate_cli
from rlhf_jax.errors import UserError
from rlhf_jax.models import hf
from rlhf_jax.models.checkpoint import load_model
from rlhf_jax.models.tiny import build_tiny_model, tiny_config
from rlhf_jax.models.transformer import init_params, make_model

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ------------------------------------------------------------------------------------------------ helpers


def _run(capsys, fn, argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = fn([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _convert(capsys, *argv) -> tuple[int, str, str]:
    return _run(capsys, convert_cli.main, argv)


def _generate(capsys, model, prompt_file) -> tuple[int, str, str]:
    return _run(capsys, generate_cli.main, ["--model", model, "--prompt-file", prompt_file, "--max-new-tokens", 4,
                                            "--batch-size", 8])


def _assert_user_error(rc: int, err: str, *fragments) -> str:
    """A user error: exit code 2 and exactly one stderr line `error: ...`, no traceback."""
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert str(fragment) in lines[0], lines[0]
    return lines[0]


def _assert_same_params(a: dict, b: dict) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _leftovers(out: Path) -> list[str]:
    """Temporary siblings that writing `out` may leave: none must remain, whatever happened."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model_io")


@pytest.fixture(scope="module")
def hf_a(workdir) -> Path:
    return build_tiny_model(workdir / "hf_a", seed=0, vocab_size=300)


@pytest.fixture(scope="module")
def hf_b(workdir) -> Path:
    """Same shapes and tokenizer as hf_a, other weights: tells an old output from a new one."""
    return build_tiny_model(workdir / "hf_b", seed=1, vocab_size=300)


@pytest.fixture(scope="module")
def params_a(hf_a) -> dict:
    return load_model(hf_a).params


@pytest.fixture(scope="module")
def params_b(hf_b) -> dict:
    return load_model(hf_b).params


@pytest.fixture(scope="module")
def ckpt_a(workdir, hf_a) -> Path:
    assert convert_cli.main(["--from-hf", str(hf_a), "--out", str(workdir / "ckpt_a")]) == 0
    return workdir / "ckpt_a"


@pytest.fixture(scope="module")
def ckpt_b(workdir, hf_b) -> Path:
    assert convert_cli.main(["--from-hf", str(hf_b), "--out", str(workdir / "ckpt_b")]) == 0
    return workdir / "ckpt_b"


@pytest.fixture(scope="module")
def prompt_file(workdir) -> Path:
    path = workdir / "prompts.txt"
    path.write_text("Once upon a time\n")
    return path


def _sharded_export(out: Path, hf_dir: Path) -> Path:
    """A previous HF export of `hf_dir` in several shards with an index (as large models are saved)."""
    loaded = load_model(hf_dir)
    hf.save_hf(out, loaded.params, loaded.cfg, loaded.head, loaded.tokenizer_dir, max_shard_bytes=100_000)
    assert (out / "model.safetensors.index.json").exists()
    return out


# ------------------------------------------------------------------------------------------------ safe overwrites


def test_to_hf_overwrite_replaces_a_sharded_export_as_a_whole(capsys, tmp_path, hf_a, ckpt_b, params_b):
    out = _sharded_export(tmp_path / "export", hf_a)
    rc, _, err = _convert(capsys, "--to-hf", "--checkpoint", ckpt_b, "--out", out, "--overwrite")
    assert rc == 0, err
    names = _files(out)
    assert "model.safetensors" in names
    assert not [n for n in names if n.startswith("model-") or n.endswith(".index.json")], names  # no stale shards
    _assert_same_params(load_model(out).params, params_b)
    assert _leftovers(out) == []


@pytest.mark.parametrize("fault", ["oserror", "safetensors"])
def test_to_hf_disk_full_keeps_the_previous_export(capsys, monkeypatch, tmp_path, hf_a, ckpt_b, params_a, fault):
    out = _sharded_export(tmp_path / "export", hf_a)
    before = _files(out)

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 100)  # a partial file, then the disk is full
        if fault == "oserror":
            raise ENOSPC
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    rc, out_text, err = _convert(capsys, "--to-hf", "--checkpoint", ckpt_b, "--out", out, "--overwrite")
    _assert_user_error(rc, err, out, "No space left on device")
    assert out_text == ""
    assert _files(out) == before
    _assert_same_params(load_model(out).params, params_a)
    assert _leftovers(out) == []


def test_exported_weights_are_as_readable_as_the_rest_of_the_export(capsys, tmp_path, ckpt_a):
    """safetensors creates its files 0600: a serving account could read config.json but not the weights."""
    umask = os.umask(0o022)
    try:
        rc, _, err = _convert(capsys, "--to-hf", "--checkpoint", ckpt_a, "--out", tmp_path / "hf")
    finally:
        os.umask(umask)
    assert rc == 0, err
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "hf").iterdir() if p.is_file()}
    assert modes["model.safetensors"] == modes["config.json"] == "0o644", modes


@pytest.mark.parametrize("fault", ["oserror", "tensorstore"])
def test_from_hf_disk_full_keeps_the_previous_checkpoint(capsys, monkeypatch, tmp_path, hf_b, ckpt_a, params_a,
                                                         params_b, fault):
    out = tmp_path / "ckpt"
    shutil.copytree(ckpt_a, out)
    (out / "notes.txt").write_text("from an older conversion\n")

    def full_disk(self, path, *args, **kwargs):
        Path(path).mkdir(parents=True)
        (Path(path) / "_METADATA").write_text("{")  # a partial write, then the disk is full
        if fault == "oserror":
            raise ENOSPC
        raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "embed/0.0" in OCDBT database at local file "{path}": '
                         "No space left on device [os_error_code='28']")

    with monkeypatch.context() as m:
        m.setattr(ocp.PyTreeCheckpointer, "save", full_disk)
        rc, _, err = _convert(capsys, "--from-hf", hf_b, "--out", out, "--overwrite")
    _assert_user_error(rc, err, out, "No space left on device")
    assert _files(out) == _files(ckpt_a) | {"notes.txt"}
    _assert_same_params(load_model(out).params, params_a)
    assert _leftovers(out) == []

    rc, _, err = _convert(capsys, "--from-hf", hf_b, "--out", out, "--overwrite")
    assert rc == 0, err
    assert not (out / "notes.txt").exists()  # replaced as a whole, not merged
    _assert_same_params(load_model(out).params, params_b)
    assert _leftovers(out) == []


def test_failed_swap_puts_the_previous_export_back(capsys, monkeypatch, tmp_path, hf_a, ckpt_b, params_a):
    out = _sharded_export(tmp_path / "export", hf_a)
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".export.partial-"):  # renaming the new export in fails
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    rc, _, err = _convert(capsys, "--to-hf", "--checkpoint", ckpt_b, "--out", out, "--overwrite")
    _assert_user_error(rc, err, out, os.strerror(errno.EXDEV))
    _assert_same_params(load_model(out).params, params_a)
    assert _leftovers(out) == []


def test_leftovers_of_writers_killed_mid_write_are_cleared(tmp_path):
    """A writer killed mid-write leaves its partial directory (a whole model's copy) beside `out`, and one killed
    between its two renames leaves the old `out` aside with no `out`: the next write of `out` deletes the first
    and puts the second back. A live writer's are not touched; this process's pid on a name it is not writing is a
    former process's (a restarted container's entry point gets the same pid)."""
    import subprocess

    from rlhf_jax.runtime import fsio

    child = subprocess.Popen(["true"])
    child.wait()
    dead = child.pid
    out = tmp_path / "export"
    out.mkdir()
    (out / "a").write_text("old")
    partial, live = tmp_path / f".export.partial-{dead}-abcdef", tmp_path / f".export.partial-{os.getppid()}-0a0b0c"
    for leftover in (partial, live):
        leftover.mkdir()
        (leftover / "a").write_text("half")
    with fsio.replace_dir(out, overwrite=True) as tmp:
        (tmp / "a").write_text("new")
    assert (out / "a").read_text() == "new" and not partial.exists() and live.exists()

    os.replace(out, tmp_path / f".export.old-{dead}-abcdef")  # killed after renaming `out` aside
    with pytest.raises(RuntimeError), fsio.replace_dir(out) as tmp:
        raise RuntimeError("this write fails too")
    assert (out / "a").read_text() == "new"  # the old `out` is back
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "export"]

    os.replace(out, tmp_path / f".export.old-{os.getpid()}-abcdef")  # the same, by a former process of our pid
    (tmp_path / f".export.partial-{os.getpid()}-123456").mkdir()
    with pytest.raises(RuntimeError), fsio.replace_dir(out) as tmp:
        raise RuntimeError("this write fails too")
    assert (out / "a").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == [live.name, "export"]


def test_a_failed_write_leaves_the_old_file_or_nothing_beside_it(tmp_path, monkeypatch):
    """A file whose write fails (a full disk at fsync) keeps its old bytes and gets no temporary beside it; a
    directory whose write fails leaves none of the parents it created."""
    from rlhf_jax.runtime import fsio

    path = tmp_path / "facts.json"
    path.write_text("old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(fsio.os, "fsync", full_disk)
        with pytest.raises(OSError):
            fsio.write_bytes_atomically(path, b"new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["facts.json"]
    with pytest.raises(RuntimeError), fsio.replace_dir(tmp_path / "a" / "b" / "out") as tmp:
        (tmp / "half").write_text("written before the failure")
        raise RuntimeError("the writer fails")
    assert [p.name for p in tmp_path.iterdir()] == ["facts.json"]


def test_a_ctrl_c_between_the_swaps_renames_puts_the_old_output_back(tmp_path, monkeypatch):
    from rlhf_jax.runtime import fsio

    out = tmp_path / "export"
    out.mkdir()
    (out / "a").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".export.partial-"):  # the second rename: interrupted just before it
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt), fsio.replace_dir(out, overwrite=True) as tmp:
        (tmp / "a").write_text("new")
    assert (out / "a").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["export"]


@pytest.mark.parametrize("case", ["from_hf_onto_itself", "to_hf_inside_input", "to_hf_around_input"])
def test_out_overlapping_the_input_is_refused(capsys, tmp_path, hf_a, ckpt_a, params_a, case):
    if case == "from_hf_onto_itself":
        source = shutil.copytree(hf_a, tmp_path / "hf")
        argv, out, fragment = ["--from-hf", source], source, "is the input"
    elif case == "to_hf_inside_input":
        source = shutil.copytree(ckpt_a, tmp_path / "ckpt")
        argv, out, fragment = ["--to-hf", "--checkpoint", source], source / "hf", "is inside the input"
    else:
        source = shutil.copytree(ckpt_a, tmp_path / "run" / "export")
        argv, out, fragment = ["--to-hf", "--checkpoint", source], tmp_path / "run", "contains the input"
    before = _files(tmp_path)
    rc, _, err = _convert(capsys, *argv, "--out", out, "--overwrite")
    _assert_user_error(rc, err, out, fragment)
    assert _files(tmp_path) == before
    _assert_same_params(load_model(source).params, params_a)


@pytest.mark.parametrize("direction", ["from_hf", "to_hf"])
def test_out_that_is_a_file_or_under_one(capsys, tmp_path, hf_a, ckpt_a, direction):
    source = ["--from-hf", hf_a] if direction == "from_hf" else ["--to-hf", "--checkpoint", ckpt_a]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me\n")
    rc, _, err = _convert(capsys, *source, "--out", a_file)
    _assert_user_error(rc, err, a_file, "is a file, expected a directory")
    rc, _, err = _convert(capsys, *source, "--out", a_file / "model")
    _assert_user_error(rc, err, a_file / "model", f"{a_file} is a file")
    assert a_file.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_build_tiny_model_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "tiny" / "sub").mkdir(parents=True)
    (tmp_path / "tiny" / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(UserError, match="already exists and is not empty"):
        build_tiny_model(tmp_path / "tiny")
    assert _files(tmp_path / "tiny") == {"model.safetensors.index.json"}
    build_tiny_model(tmp_path / "tiny", overwrite=True)
    assert "model.safetensors.index.json" not in _files(tmp_path / "tiny")
    assert load_model(tmp_path / "tiny").tokenizer_dir is not None


# ------------------------------------------------------------------------------------------------ corrupt weights


def test_truncated_safetensors_names_the_file(capsys, tmp_path, hf_a, prompt_file):
    model = shutil.copytree(hf_a, tmp_path / "hf")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    rc, _, err = _generate(capsys, model, prompt_file)
    _assert_user_error(rc, err, weights, "corrupt or truncated safetensors file")
    rc, _, err = _convert(capsys, "--from-hf", model, "--out", tmp_path / "ckpt")
    _assert_user_error(rc, err, weights, "corrupt or truncated")
    assert not (tmp_path / "ckpt").exists() and _leftovers(tmp_path / "ckpt") == []


def _with_float8_tensor(weights: Path, name: str) -> None:
    """Rewrites a safetensors file with `name` stored as float8 (F8_E4M3, as quantized releases store weights)."""
    import json
    import struct

    header_len = struct.unpack("<Q", weights.read_bytes()[:8])[0]
    header = json.loads(weights.read_bytes()[8:8 + header_len])
    data = weights.read_bytes()[8 + header_len:]
    tensors, out, offset = {k: v for k, v in header.items() if k != "__metadata__"}, {}, 0
    chunks = []
    for key, info in sorted(tensors.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        start, end = info["data_offsets"]
        chunk = data[start:end] if key != name else bytes((end - start) // 4)  # one byte per value
        out[key] = {**info, "dtype": "F8_E4M3" if key == name else info["dtype"],
                    "data_offsets": [offset, offset + len(chunk)]}
        chunks.append(chunk)
        offset += len(chunk)
    text = json.dumps(out).encode()
    weights.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def test_a_quantized_checkpoint_is_one_line_naming_its_config_or_tensor(capsys, tmp_path, hf_a, prompt_file):
    """An FP8 release (Qwen3-8B-FP8) ended in numpy's AttributeError for the float8 dtype."""
    import json

    from safetensors import safe_open

    model = shutil.copytree(hf_a, tmp_path / "hf")
    weights = model / "model.safetensors"
    with safe_open(str(weights), framework="numpy") as f:
        name = next(k for k in f.keys() if k.endswith("down_proj.weight"))
    _with_float8_tensor(weights, name)
    rc, _, err = _generate(capsys, model, prompt_file)
    _assert_user_error(rc, err, weights, f"tensor {name!r} has dtype F8_E4M3", "unquantized")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    rc, _, err = _convert(capsys, "--from-hf", model, "--out", tmp_path / "ckpt")
    _assert_user_error(rc, err, model / "config.json", "quantization_config (quant_method 'fp8')", "unquantized")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("direction", ["from_hf", "to_hf"])
def test_running_out_of_host_memory_is_one_line_and_never_called_corrupt(capsys, monkeypatch, tmp_path, hf_a, ckpt_a,
                                                                        direction):
    """A conversion short of memory ended in a traceback, or called a sound checkpoint corrupt."""
    import orbax.checkpoint as ocp

    from rlhf_jax.models import hf as hf_io

    def short_of_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 297. MiB for an array with shape (77856768,) and data type float32")

    monkeypatch.setattr(ocp.Checkpointer, "restore", short_of_memory)
    monkeypatch.setattr(hf_io, "_tensor", short_of_memory)
    argv = ("--from-hf", hf_a) if direction == "from_hf" else ("--to-hf", "--checkpoint", ckpt_a)
    rc, _, err = _convert(capsys, *argv, "--out", tmp_path / "out")
    assert rc == 5 and err.count("\n") == 1, err
    assert err.startswith("error: out of host memory (Unable to allocate 297. MiB") and "corrupt" not in err, err
    assert "converting holds the whole model in host memory" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family, count", [("llama", "num_hidden_layers"), ("gpt2", "n_layer")])
def test_a_config_that_counts_fewer_layers_than_the_weights_hold_says_so(capsys, tmp_path, prompt_file, family,
                                                                         count):
    """It was called an unsupported variant of the architecture."""
    import json

    model = build_tiny_model(tmp_path / "hf", seed=0, family=family)
    config = json.loads((model / "config.json").read_text())
    layers = config[count]
    (model / "config.json").write_text(json.dumps({**config, count: layers - 1}))
    rc, _, err = _generate(capsys, model, prompt_file)
    _assert_user_error(rc, err, f"hf: {layers} layers present, but config.json's {count} is {layers - 1}; one of "
                                "them is wrong")


def test_missing_shard_names_the_file(capsys, tmp_path, hf_a):
    model = _sharded_export(tmp_path / "hf", hf_a)
    shard = sorted(model.glob("model-*.safetensors"))[-1]
    shard.unlink()
    rc, _, err = _convert(capsys, "--from-hf", model, "--out", tmp_path / "ckpt")
    _assert_user_error(rc, err, shard, "file not found", "model.safetensors.index.json")


def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncated_data", "missing_metadata", "missing_params", "bad_model_json"])
def test_corrupt_orbax_checkpoint_names_it(capsys, tmp_path, ckpt_a, prompt_file, damage):
    ckpt = shutil.copytree(ckpt_a, tmp_path / "ckpt")
    if damage == "truncated_data":
        data = _largest_file(ckpt / "params")
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
        named, fragment = ckpt / "params", "corrupt or truncated Orbax checkpoint (OUT_OF_RANGE: Error reading"
    elif damage == "missing_metadata":
        (ckpt / "params" / "_METADATA").unlink()
        named, fragment = ckpt / "params", "metadata"
    elif damage == "missing_params":
        shutil.rmtree(ckpt / "params")
        named, fragment = ckpt / "params", "does not exist"
    else:
        (ckpt / "model.json").write_text('{"format": "rlhf_jax.model", "config": {')
        named, fragment = ckpt / "model.json", "invalid JSON"
    rc, _, err = _convert(capsys, "--to-hf", "--checkpoint", ckpt, "--out", tmp_path / "hf")
    _assert_user_error(rc, err, named, fragment)
    assert not (tmp_path / "hf").exists() and _leftovers(tmp_path / "hf") == []
    rc, _, err = _generate(capsys, ckpt, prompt_file)
    _assert_user_error(rc, err, named, fragment)


@pytest.mark.parametrize("edit, fragment", [
    ({"n_layers": 1}, "layer_1/attn/o (4, 16, 64) is not in model.json's model"),
    ({"n_layers": 3}, "no layer_2/attn/o, which model.json's model has"),
    ({"d_ff": 24}, "layer_0/mlp/wi has shape (64, 2, 128), model.json's model (64, 2, 24)"),
])
def test_a_model_json_that_does_not_describe_the_weights_is_one_line(capsys, tmp_path, ckpt_a, prompt_file, edit,
                                                                        fragment):
    """Fewer layers exported a smaller model without a word; another width wrote a config.json that no loader
    accepts; more layers was a KeyError."""
    ckpt = shutil.copytree(ckpt_a, tmp_path / "ckpt")
    meta = json.loads((ckpt / "model.json").read_text())
    meta["config"].update(edit)
    (ckpt / "model.json").write_text(json.dumps(meta))
    rc, _, err = _convert(capsys, "--to-hf", "--checkpoint", ckpt, "--out", tmp_path / "hf")
    _assert_user_error(rc, err, ckpt / "params", fragment)
    assert not (tmp_path / "hf").exists()
    rc, _, err = _generate(capsys, ckpt, prompt_file)
    _assert_user_error(rc, err, ckpt / "params", fragment)


# ------------------------------------------------------------------------------------------------ wrong inputs


def _training_run(root: Path, ckpt: Path, export: bool = True, best: bool = False) -> Path:
    """The layout a training stage writes: config.json, checkpoints/<step>/ (Orbax train state), export/."""
    run = root / "run"
    (run / "checkpoints" / "5" / "state").mkdir(parents=True)
    (run / "checkpoints" / "5" / "_CHECKPOINT_METADATA").write_text("{}")
    (run / "config.json").write_text(json.dumps({"stage": "sft", "seed": 0, "model": {"path": ""}}))
    for name, wanted in (("export", export), ("best", best)):
        if wanted:
            shutil.copytree(ckpt, run / name)
    return run


def test_training_run_directory_points_to_its_export(capsys, tmp_path, ckpt_a, prompt_file):
    run = _training_run(tmp_path, ckpt_a)
    rc, _, err = _generate(capsys, run, prompt_file)
    _assert_user_error(rc, err, f"{run}: is a training run directory; use {run / 'export'}")
    rc, _, err = _convert(capsys, "--to-hf", "--checkpoint", run, "--out", tmp_path / "hf")
    _assert_user_error(rc, err, "is a training run directory", run / "export")
    rc, _, err = _convert(capsys, "--to-hf", "--checkpoint", run / "export", "--out", tmp_path / "hf")
    assert rc == 0, err


def test_a_peft_adapter_directory_points_to_the_merged_export(capsys, tmp_path, ckpt_a, prompt_file):
    """A LoRA run writes export_adapter/ (PEFT's layout, no base weights) beside export/: the adapter given as a
    model is one line naming the merged export."""
    run = _training_run(tmp_path, ckpt_a)
    (run / "export_adapter").mkdir()
    (run / "export_adapter" / "adapter_config.json").write_text("{}")
    rc, _, err = _generate(capsys, run / "export_adapter", prompt_file)
    _assert_user_error(rc, err, f"{run / 'export_adapter'}: is a PEFT adapter (LoRA weights alone, no base model); "
                                f"use {run / 'export'}, the run's merged model")
    rc, _, err = _convert(capsys, "--to-hf", "--checkpoint", run / "export_adapter", "--out", tmp_path / "hf")
    _assert_user_error(rc, err, "is a PEFT adapter", run / "export")


def test_a_relative_model_path_is_named_once_as_given(tmp_path, monkeypatch):
    """Errors raised on the resolved path read `model.path=rel: /abs/rel: ...` before."""
    from rlhf_jax.models.checkpoint import CheckpointError, load_model

    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "notes.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_model("not_a_model", key="model.path")
    assert str(info.value) == ("model.path=not_a_model: expected a rlhf_jax checkpoint (model.json) or a HF "
                               "checkpoint dir (config.json)")


def test_unfinished_training_run_points_to_best(capsys, tmp_path, ckpt_a, prompt_file):
    run = _training_run(tmp_path, ckpt_a, export=False, best=True)
    rc, _, err = _generate(capsys, run, prompt_file)
    _assert_user_error(rc, err, "is a training run directory", "no export/", run / "best")


def test_training_checkpoint_step_is_not_a_model(capsys, tmp_path, ckpt_a, prompt_file):
    run = _training_run(tmp_path, ckpt_a)
    step = run / "checkpoints" / "5"
    rc, _, err = _generate(capsys, step, prompt_file)
    _assert_user_error(rc, err, step, "is a training checkpoint", "step 5", f"use {run / 'export'}")
    rc, _, err = _convert(capsys, "--to-hf", "--checkpoint", step, "--out", tmp_path / "hf")
    _assert_user_error(rc, err, "is a training checkpoint", run / "export")
    rc, _, err = _convert(capsys, "--to-hf", "--checkpoint", run / "checkpoints", "--out", tmp_path / "hf")
    _assert_user_error(rc, err, "training checkpoints of run", run / "export")
    assert not (tmp_path / "hf").exists()


def test_hf_dir_without_tokenizer(capsys, tmp_path, hf_a, prompt_file, params_a):
    model = tmp_path / "hf"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(hf_a / name, model / name)
    rc, _, err = _generate(capsys, model, prompt_file)
    _assert_user_error(rc, err, "no tokenizer files")
    # Converting needs no tokenizer: it round-trips, and the checkpoint says it has none.
    rc, _, err = _convert(capsys, "--from-hf", model, "--out", tmp_path / "ckpt")
    assert rc == 0, err
    assert not (tmp_path / "ckpt" / "tokenizer").exists()
    assert load_model(tmp_path / "ckpt").tokenizer_dir is None
    rc, _, err = _convert(capsys, "--to-hf", "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "hf2")
    assert rc == 0, err
    _assert_same_params(load_model(tmp_path / "hf2").params, params_a)


def test_a_tokenizer_with_code_of_its_own_is_one_line(capsys, tmp_path, hf_a, prompt_file):
    """A tokenizer with code of its own (auto_map) ended in transformers' traceback asking for trust_remote_code."""
    import json

    model = shutil.copytree(hf_a, tmp_path / "hf")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="FooTokenizer", auto_map={"AutoTokenizer": ["tokenization_foo.FooTokenizer", None]})
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    rc, _, err = _generate(capsys, model, prompt_file)
    _assert_user_error(rc, err, model, "its tokenizer needs code of its own (tokenizer_config.json's auto_map), which "
                                       "is never run")


def test_vocab_size_smaller_than_the_tokenizer(capsys, tmp_path, hf_a, prompt_file):
    tok = load_model(hf_a)
    cfg = tiny_config(256, tok.cfg.eos_token_ids[0], tok.cfg.pad_token_id)
    params = jax.device_get(init_params(make_model(cfg), jax.random.key(0)))
    model = tmp_path / "hf"
    hf.save_hf(model, params, cfg, tokenizer_dir=hf_a)  # the tokenizer has 300 ids
    rc, out, err = _generate(capsys, model, prompt_file)
    _assert_user_error(rc, err, model / "config.json", "vocab_size 256", "300")
    assert out == ""
    rc, _, err = _convert(capsys, "--from-hf", model, "--out", tmp_path / "ckpt")
    _assert_user_error(rc, err, "vocab_size 256", "300")


def test_missing_paths_and_files_for_directories(capsys, tmp_path, hf_a, prompt_file):
    missing = tmp_path / "no_such_model"
    rc, _, err = _generate(capsys, missing, prompt_file)
    _assert_user_error(rc, err, f"{missing}: does not exist")
    rc, _, err = _convert(capsys, "--to-hf", "--checkpoint", missing, "--out", tmp_path / "hf")
    _assert_user_error(rc, err, f"{missing}: does not exist")
    rc, _, err = _convert(capsys, "--from-hf", missing, "--out", tmp_path / "ckpt")
    _assert_user_error(rc, err, f"{missing}: does not exist")

    a_file = tmp_path / "model.safetensors"
    shutil.copyfile(hf_a / "model.safetensors", a_file)
    rc, _, err = _generate(capsys, a_file, prompt_file)
    _assert_user_error(rc, err, a_file, "is a file, expected a model directory")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_directory_where_a_file_is_expected(capsys, tmp_path, hf_a, prompt_file, name):
    model = shutil.copytree(hf_a, tmp_path / "hf")
    (model / name).unlink()
    (model / name).mkdir()
    rc, _, err = _generate(capsys, model, prompt_file)
    _assert_user_error(rc, err, model / name, "is a directory, expected a")


_ABANDONED_READ = '''
class Pause:
    def __await__(self):
        yield


async def _read_array_index_and_device_put():
    try:
        await Pause()
    finally:
        raise Exception("Encountered error while reading array index: (slice(0, 4, 1),)")
'''


@pytest.mark.parametrize("library", ["orbax", "mine"])
def test_reads_abandoned_after_a_failed_restore_print_nothing_when_collected(monkeypatch, library):
    """A restore that failed leaves Orbax's other reads in flight; collected later, each printed its traceback
    (hundreds of lines after the run's one-line error). Another coroutine's still reaches Python's hook."""
    import gc
    import sys

    from rlhf_jax.models import checkpoint

    reached = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: reached.append(unraisable.exc_value))
    checkpoint._drop_abandoned_call_noise()
    where = "/site-packages/orbax/checkpoint/serialization.py" if library == "orbax" else "/home/me/reads.py"
    scope: dict = {}
    exec(compile(_ABANDONED_READ, where, "exec"), scope)
    read = scope["_read_array_index_and_device_put"]()
    read.send(None)  # in flight, then abandoned
    del read
    gc.collect()
    assert [str(e) for e in reached] == ([] if library == "orbax" else
                                         ["Encountered error while reading array index: (slice(0, 4, 1),)"])

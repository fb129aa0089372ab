"""The command-line tools as a user runs them: `rlhf_jax.generate`, `rlhf_jax.convert` and `rlhf_jax.main`.

The CLIs are called in-process through their `main(argv)` functions (stdout/stderr captured), except one
subprocess check that `python -m rlhf_jax.main` works as a module entry point. One tiny model is built per
module; every generation uses small shapes (batch 8 over the 8 simulated devices, 8 new tokens).
"""

from __future__ import annotations

import json
import gc
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from compile_helpers import jit_forward
from rlhf_jax import convert as convert_cli
from rlhf_jax import generate as generate_cli
from rlhf_jax import main as main_cli
from rlhf_jax.errors import UserError
from rlhf_jax.models.generation import read_prompts
from rlhf_jax.models.tiny import build_tiny_model, bundled_prompts

from cli_helpers import run_quietly as _quiet

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 8
PROMPTS = ["Once upon a time", "The sky is blue because", "A good friend is someone who"]
RECORD_KEYS = {"prompt", "prompt_ids", "ids", "text", "ended", "logprobs"}


# ------------------------------------------------------------------------------------------------ helpers


def _run(capsys, fn, argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop anything printed before this call
    rc = fn([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def _gen_argv(model, prompt_file, *extra) -> list[str]:
    return ["--model", str(model), "--prompt-file", str(prompt_file), "--max-new-tokens", str(MAX_NEW),
            "--batch-size", "8", "--output", "jsonl", *map(str, extra)]


def _assert_user_error(rc: int, err: str, *fragments: str) -> str:
    """A user error: exit code 2 and exactly one stderr line `error: ...`, no traceback."""
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def hf_dir(workdir) -> Path:
    """The tiny Llama (4 heads, 2 KV heads) with a small byte-level BPE, as a HF checkpoint directory."""
    return build_tiny_model(workdir / "tiny_hf", seed=0, vocab_size=300)


@pytest.fixture(scope="module")
def prompt_file(workdir) -> Path:
    path = workdir / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def greedy_default(hf_dir, prompt_file) -> list[dict]:
    """Greedy records from the HF dir on the default mesh (-1,1,1): the reference for several tests."""
    rc, out, err = _quiet(generate_cli.main, _gen_argv(hf_dir, prompt_file, "--temperature", "0", "--seed", "0"))
    assert rc == 0, err
    return _records(out)


@pytest.fixture(scope="module")
def converted(hf_dir, workdir) -> dict:
    """HF -> Orbax checkpoint -> HF again, through the convert CLI."""
    ckpt, hf2 = workdir / "ckpt", workdir / "hf_export"
    from_hf = _quiet(convert_cli.main, ["--from-hf", str(hf_dir), "--out", str(ckpt)])
    to_hf = _quiet(convert_cli.main, ["--to-hf", "--checkpoint", str(ckpt), "--out", str(hf2)])
    return {"ckpt": ckpt, "hf2": hf2, "from_hf": from_hf, "to_hf": to_hf}


# ------------------------------------------------------------------------------------------------ generate


def _check_records(records: list[dict], prompts: list[str]) -> None:
    assert [r["prompt"] for r in records] == prompts
    for r in records:
        assert set(r) == RECORD_KEYS
        assert r["prompt_ids"] and all(isinstance(i, int) for i in r["prompt_ids"])
        assert isinstance(r["text"], str)
        assert 1 <= len(r["ids"]) == len(r["logprobs"]) <= MAX_NEW
        # a response that stopped early ended; one that did not end ran to the most new tokens
        assert isinstance(r["ended"], bool) and (r["ended"] or len(r["ids"]) == MAX_NEW)
        assert len(r["ids"]) == MAX_NEW or r["ended"]
        assert all(isinstance(i, int) and 0 <= i < 300 for i in r["ids"])
        assert all(lp <= 0.0 for lp in r["logprobs"])


def test_generate_jsonl_records_in_prompt_order(capsys, hf_dir, prompt_file):
    argv = _gen_argv(hf_dir, prompt_file, "--temperature", "1.0", "--seed", "7")
    rc, out, err = _run(capsys, generate_cli.main, argv)
    assert rc == 0, err
    assert len(out.splitlines()) == 3
    first = _records(out)
    _check_records(first, PROMPTS)

    rc, out_again, err = _run(capsys, generate_cli.main, argv)
    assert rc == 0, err
    assert out_again == out, "the same seed must give identical output"

    rc, out_other, err = _run(capsys, generate_cli.main,
                              _gen_argv(hf_dir, prompt_file, "--temperature", "1.0", "--seed", "8"))
    assert rc == 0, err
    assert [r["ids"] for r in _records(out_other)] != [r["ids"] for r in first], "the seed must matter"


def test_each_batch_draws_its_own_samples(capsys, hf_dir, workdir):
    """One prompt 16 times in batches of 8: the second batch's rows are not the first's again (each batch's
    draws come from its own key), as the label stage's K samples of a prompt must not be."""
    path = workdir / "same_prompt.txt"
    path.write_text("the cat sat\n" * 16)
    argv = [*_gen_argv(hf_dir, path, "--temperature", "1.0", "--seed", "3")]
    rc, out, err = _run(capsys, generate_cli.main, argv)
    assert rc == 0, err
    ids = [tuple(r["ids"]) for r in _records(out)]
    assert ids[:8] != ids[8:] and len(set(ids)) > 8


def test_generate_greedy_ignores_seed(capsys, hf_dir, prompt_file, greedy_default):
    _check_records(greedy_default, PROMPTS)
    rc, out, err = _run(capsys, generate_cli.main,
                        _gen_argv(hf_dir, prompt_file, "--temperature", "0", "--seed", "123"))
    assert rc == 0, err
    assert _records(out) == greedy_default


def test_generate_jsonl_prompt_file_with_line_breaks(capsys, hf_dir, workdir):
    path = workdir / "multi.jsonl"
    rows = [{"prompt": "multi\nline"}, {"prompt": "second prompt", "extra": 1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, err = _run(capsys, generate_cli.main, _gen_argv(hf_dir, path, "--temperature", "0"))
    assert rc == 0, err
    records = _records(out)
    assert len(out.splitlines()) == 2
    _check_records(records, ["multi\nline", "second prompt"])


def test_generate_sharded_mesh_matches_default(capsys, hf_dir, prompt_file, greedy_default):
    """data=2 (-1: the devices left), fsdp=2, tensor=2: the tiny GQA Llama's 2 KV heads split over the tensor
    axis."""
    rc, out, err = _run(capsys, generate_cli.main,
                        _gen_argv(hf_dir, prompt_file, "--temperature", "0", "--mesh-shape", "-1,2,2"))
    assert rc == 0, err
    records = _records(out)
    assert [r["ids"] for r in records] == [r["ids"] for r in greedy_default]
    for r, ref in zip(records, greedy_default):
        np.testing.assert_allclose(r["logprobs"], ref["logprobs"], atol=1e-4)


def test_generate_chat_template_encodes_prompts_as_training_does(capsys, hf_dir, prompt_file, workdir):
    """--chat-template wraps prompts exactly as the training pipeline's data.chat_template does."""
    import shutil

    from rlhf_jax.config import DataSection
    from rlhf_jax.data.pipeline import Tokenize
    from rlhf_jax.models.tokenizer import load_tokenizer

    chat_dir = workdir / "tiny_chat"
    shutil.copytree(hf_dir, chat_dir)
    (chat_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}Bot:{% endif %}")
    rc, out, err = _run(capsys, generate_cli.main, _gen_argv(chat_dir, prompt_file, "--temperature", "0",
                                                              "--chat-template", "--max-prompt-tokens", "6"))
    assert rc == 0, err
    tokenize = Tokenize(load_tokenizer(chat_dir), "prompts", DataSection(max_prompt_tokens=6, chat_template=True), 0)
    for record in _records(out):
        row = tokenize({"prompt": record["prompt"].encode()})
        assert record["prompt_ids"] == row["prompt_ids"][row["prompt_mask"]].tolist()
    plain = load_tokenizer(hf_dir)(PROMPTS[0])["input_ids"]
    assert _records(out)[0]["prompt_ids"] != plain[-6:]

    rc, _, err = _run(capsys, generate_cli.main, _gen_argv(hf_dir, prompt_file, "--chat-template"))
    _assert_user_error(rc, err, f"{hf_dir}: its tokenizer has no chat template (--chat-template asks for one)")


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_outside_a_training_loop_is_one_line_with_exit_4(capsys, monkeypatch, tmp_path, sig):
    """A preemption or Ctrl-C while a run loads, compiles or exports (no loop's handlers then) stops it with
    the documented exit 4 and one line, not a traceback or 143; the handlers are given back after."""
    def load_config(*args):
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the signal's handler interrupts this
        raise AssertionError("not interrupted")

    monkeypatch.setattr(main_cli, "load_config", load_config)
    # Python's own Ctrl-C handler, which a job started in the background (`cmd &`) does not get: SIGINT is
    # ignored there from the start, as a shell means it to be
    sigint_before = signal.signal(signal.SIGINT, signal.default_int_handler)
    before = signal.getsignal(signal.SIGTERM)
    (tmp_path / "c.yaml").write_text("seed: 0\n")
    try:
        rc, _, err = _run(capsys, main_cli.main, ["--config", tmp_path / "c.yaml"])
    finally:
        signal.signal(signal.SIGINT, sigint_before)
    assert rc == 4 and err.strip() == ("interrupted outside a training step (loading, compiling, sampling or "
                                       "writing): what was saved before stays; rerun the same command to resume"), err
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("where", ["gc_callback", "weakref_callback"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_where_python_drops_exceptions_is_not_lost(sig, where):
    """JAX frees device buffers in a gc callback, and collections run weakref callbacks; Python prints an exception
    raised inside one as ignored and drops it, so a Ctrl-C landing there let the run go on to the end with exit 0.
    It is raised again just after."""
    import weakref

    from rlhf_jax.runtime.signals import sigterm_as_ctrl_c

    def signalled(*args):
        if not fired:
            fired.append(where)
            os.kill(os.getpid(), sig)  # handled at the callback's next bytecode, inside it
            time.sleep(0.01)

    class Thing:
        pass

    fired: list = []
    sigint_before = signal.signal(signal.SIGINT, signal.default_int_handler)
    hook_before = sys.unraisablehook
    if where == "gc_callback":
        gc.callbacks.append(signalled)
    thing = Thing()
    ref = weakref.ref(thing, signalled if where == "weakref_callback" else None)
    try:
        with sigterm_as_ctrl_c(), pytest.raises(KeyboardInterrupt):
            del thing
            gc.collect()
            time.sleep(2)  # the signal, raised again, interrupts this
    finally:
        if signalled in gc.callbacks:
            gc.callbacks.remove(signalled)
        signal.signal(signal.SIGINT, sigint_before)
    assert fired == [where] and ref() is None and sys.unraisablehook is hook_before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_an_import_is_raised_once_the_import_is_done(sig, tmp_path, monkeypatch):
    """numpy and jax are imported lazily, once the run has started: a KeyboardInterrupt raised inside their import
    left them half initialised (an ImportError's traceback, an abort or a crash instead of exit 4)."""
    from rlhf_jax.runtime.signals import sigterm_as_ctrl_c

    (tmp_path / "slow_to_import.py").write_text(
        f"import os, time\nos.kill(os.getpid(), {int(sig)})\ntime.sleep(0.3)\nWHOLE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sigint_before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with sigterm_as_ctrl_c(), pytest.raises(KeyboardInterrupt):
            import slow_to_import  # noqa: F401

            time.sleep(2)  # the signal, raised once the import is done, interrupts this
    finally:
        signal.signal(signal.SIGINT, sigint_before)
        module = sys.modules.pop("slow_to_import", None)
    assert module is not None and module.WHOLE


_SIGNALLED_IN_TEARDOWN = """
import os, signal, sys, time
from rlhf_jax.runtime.signals import exit_process

class Late:  # torn down with this module, after every exit handler: as JAX's objects are
    def __del__(self):
        os.kill(os.getpid(), signal.{sig})
        time.sleep(0.2)
        print("torn down", file=sys.stderr, flush=True)

late = Late()
exit_process(3)
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_while_the_interpreter_tears_down_leaves_the_status(sig):
    """Past the exit handlers Python gave the signals their default action back: a SIGTERM in the second or two
    of JAX's teardown ended a finished run with status 143 (130 for a Ctrl-C)."""
    done = subprocess.run([sys.executable, "-c", _SIGNALLED_IN_TEARDOWN.format(sig=sig)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 3 and done.stderr == "torn down\n", done.stderr


def test_a_dropped_signal_is_not_raised_again_once_the_block_is_left():
    """The re-raise comes 50 ms after the drop: a block left before then (its program done, or a KeyboardInterrupt
    already on its way out) must not get it outside, where the restored Ctrl-C handler raises it uncaught (the
    process then died with status 130 instead of its own)."""
    from rlhf_jax.runtime.signals import sigterm_as_ctrl_c

    def signalled(*args):
        if not fired:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)

    fired: list = []
    sigint_before = signal.signal(signal.SIGINT, signal.default_int_handler)
    gc.callbacks.append(signalled)
    try:
        with sigterm_as_ctrl_c():
            gc.collect()  # the signal lands in the callback and is dropped; the block ends before its re-raise
        gc.callbacks.remove(signalled)
        time.sleep(0.3)
    finally:
        if signalled in gc.callbacks:
            gc.callbacks.remove(signalled)
        signal.signal(signal.SIGINT, sigint_before)
    assert fired == [True]


def test_a_signal_while_the_process_exits_ends_it_quietly_with_its_status():
    """A second Ctrl-C while the interpreter runs its exit handlers (JAX's clean-up) printed an ignored
    KeyboardInterrupt's traceback after the run's last line."""
    code = ("import atexit, os, signal, time\n"
            "from rlhf_jax.runtime.signals import exit_process\n"
            "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(2)))\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "exit_process(4)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 4 and not done.stderr, done.stderr


def test_error_missing_prompt_file(capsys, hf_dir, workdir):
    missing = workdir / "no_such_prompts.txt"
    rc, _, err = _run(capsys, generate_cli.main, _gen_argv(hf_dir, missing))
    _assert_user_error(rc, err, str(missing), "not found")


def test_error_empty_line_in_prompt_file(capsys, hf_dir, workdir):
    path = workdir / "gap.txt"
    path.write_text("first\n\nthird\n")
    rc, _, err = _run(capsys, generate_cli.main, _gen_argv(hf_dir, path))
    _assert_user_error(rc, err, f"{path}:2", "empty prompt")


def test_prompt_files_break_lines_at_newlines_only(tmp_path):
    """A JSON string may hold U+2028 and a text line a form feed: neither ends a prompt (str.splitlines would)."""
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False) + "\r\n" + '{"prompt": "c"}\n',
                     encoding="utf-8")
    assert read_prompts(jsonl) == ["a\u2028b", "c"]
    text = tmp_path / "p.txt"
    text.write_text("first\x0cstill first\r\nsecond\n", encoding="utf-8")
    assert read_prompts(text) == ["first\x0cstill first", "second"]


def test_prompt_files_of_any_json_suffix_case_are_jsonl_and_a_bom_is_not_text(tmp_path):
    for name in ("p.JSONL", "p.json", "p.Jsonl"):
        (tmp_path / name).write_text('{"prompt": "a"}\n')
        assert read_prompts(tmp_path / name) == ["a"], name
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhello\n")
    assert read_prompts(tmp_path / "bom.txt") == ["hello"]
    (tmp_path / "open.jsonl").write_text('{"prompt": "a\n')
    with pytest.raises(UserError, match=r"open.jsonl:1: invalid JSON \(Unterminated string starting at column 12\)$"):
        read_prompts(tmp_path / "open.jsonl")


def test_error_invalid_json_prompt_line(capsys, hf_dir, workdir):
    path = workdir / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    rc, _, err = _run(capsys, generate_cli.main, _gen_argv(hf_dir, path))
    _assert_user_error(rc, err, f"{path}:2: invalid JSON (Expecting value at column 12)")


def test_error_model_dir_of_neither_format(capsys, prompt_file, workdir):
    empty = workdir / "not_a_model"
    empty.mkdir()
    (empty / "README.txt").write_text("nothing here\n")
    rc, _, err = _run(capsys, generate_cli.main, _gen_argv(empty, prompt_file))
    _assert_user_error(rc, err, "not_a_model", "model.json", "config.json")


def test_error_batch_size_not_divisible_by_devices(capsys, hf_dir, prompt_file):
    argv = _gen_argv(hf_dir, prompt_file)
    argv[argv.index("--batch-size") + 1] = "4"
    rc, out, err = _run(capsys, generate_cli.main, argv)
    _assert_user_error(rc, err, "--batch-size 4", "8 data-parallel devices")
    assert out == ""
    rc, _, err = _run(capsys, generate_cli.main, _gen_argv(hf_dir, prompt_file, "--seed", str(2 ** 64)))
    _assert_user_error(rc, err, "--seed must be from 0 to 2^32 - 1")


def test_the_generate_cli_stops_quietly_when_its_reader_does(hf_dir, prompt_file):
    """`python -m rlhf_jax.generate ... | head -1`: exit 0 and no traceback when the pipe closes."""
    import subprocess

    argv = _gen_argv(hf_dir, prompt_file)
    argv[argv.index("--batch-size") + 1] = "1"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_jax.generate", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO, env=env)
    assert json.loads(proc.stdout.readline())["prompt"] == PROMPTS[0]
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 0 and "Traceback" not in err, err


def test_error_mesh_that_does_not_fit_devices(capsys, hf_dir, prompt_file):
    rc, _, err = _run(capsys, generate_cli.main, _gen_argv(hf_dir, prompt_file, "--mesh-shape", "3,1,1"))
    _assert_user_error(rc, err, "needs 3 devices, found 8 (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=3 "
                                "makes 3)")


@pytest.mark.parametrize("flags, fragment", [
    (["--top-k", "100000"], "error: --top-k 100000 exceeds the model's vocabulary of "),
    (["--max-new-tokens", "5000"], " + --max-new-tokens (5000) = "),
])
def test_errors_found_with_the_model_name_the_flags(capsys, hf_dir, prompt_file, flags, fragment):
    rc, _, err = _run(capsys, generate_cli.main, _gen_argv(hf_dir, prompt_file, *flags))
    _assert_user_error(rc, err, fragment)


def test_new_tokens_may_fill_the_models_positions_exactly(capsys, hf_dir, prompt_file):
    """The longest prompt plus --max-new-tokens may equal the model's positions (the last token drawn is never
    fed back); one more is refused naming both."""
    rc, _, err = _run(capsys, generate_cli.main, _gen_argv(hf_dir, prompt_file, "--max-new-tokens", "5000"))
    width, positions = map(int, re.search(r"the longest prompt \((\d+) tokens\).* the model's (\d+) positions",
                                          err).groups())
    rc, _, err = _run(capsys, generate_cli.main, _gen_argv(hf_dir, prompt_file, "--max-new-tokens",
                                                           str(positions - width)))
    assert rc == 0, err
    rc, _, err = _run(capsys, generate_cli.main, _gen_argv(hf_dir, prompt_file, "--max-new-tokens",
                                                           str(positions - width + 1)))
    _assert_user_error(rc, err, f"= {positions + 1} exceeds the model's {positions} positions")


@pytest.mark.parametrize("case", ["mesh_not_int", "mesh_wrong_rank", "mesh_zero", "prompt_file_is_dir"])
def test_error_malformed_inputs_are_user_errors(capsys, hf_dir, prompt_file, workdir, case):
    argv = {"mesh_not_int": _gen_argv(hf_dir, prompt_file, "--mesh-shape", "2,x"),
            "mesh_wrong_rank": _gen_argv(hf_dir, prompt_file, "--mesh-shape", "8"),
            "mesh_zero": _gen_argv(hf_dir, prompt_file, "--mesh-shape", "0,-1,1"),
            "prompt_file_is_dir": _gen_argv(hf_dir, workdir)}[case]
    rc, _, err = _run(capsys, generate_cli.main, argv)
    _assert_user_error(rc, err)


# ------------------------------------------------------------------------------------------------ convert


def test_convert_round_trip_is_exact(converted, hf_dir):
    from safetensors.numpy import load_file

    for step in ("from_hf", "to_hf"):
        rc, out, err = converted[step]
        assert rc == 0, err
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["family"] == "llama" and summary["head"] == "lm"
    assert (converted["ckpt"] / "model.json").is_file()
    assert (converted["ckpt"] / "tokenizer" / "tokenizer.json").is_file()

    original = load_file(str(hf_dir / "model.safetensors"))
    exported = load_file(str(converted["hf2"] / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        np.testing.assert_array_equal(exported[name], tensor, err_msg=name)
    assert (converted["hf2"] / "tokenizer.json").is_file()


def test_convert_refuses_existing_out(capsys, converted, hf_dir):
    ckpt, hf2 = converted["ckpt"], converted["hf2"]
    rc, out, err = _run(capsys, convert_cli.main, ["--from-hf", hf_dir, "--out", ckpt])
    _assert_user_error(rc, err, "already exists", "overwrite")
    assert out == ""
    rc, out, err = _run(capsys, convert_cli.main, ["--to-hf", "--checkpoint", ckpt, "--out", hf2])
    _assert_user_error(rc, err, "already exists", "--overwrite")
    assert out == ""
    assert (ckpt / "model.json").is_file() and (hf2 / "model.safetensors").is_file()  # left alone
    for extra in (["--checkpoint", ckpt], ["--dtype", "bfloat16"]):  # options of the export, not of an import
        rc, out, err = _run(capsys, convert_cli.main, ["--from-hf", hf_dir, "--out", hf2.parent / "new", *extra])
        _assert_user_error(rc, err, "--from-hf imports one HF directory as it is stored", "--to-hf only")


def test_generate_from_orbax_checkpoint_matches_hf(capsys, converted, prompt_file, greedy_default):
    rc, out, err = _run(capsys, generate_cli.main,
                        _gen_argv(converted["ckpt"], prompt_file, "--temperature", "0"))
    assert rc == 0, err
    records = _records(out)
    assert [r["ids"] for r in records] == [r["ids"] for r in greedy_default]
    assert [r["text"] for r in records] == [r["text"] for r in greedy_default]
    for r, ref in zip(records, greedy_default):
        np.testing.assert_allclose(r["logprobs"], ref["logprobs"], atol=1e-6)


def test_transformers_loads_export_and_logits_match(converted):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from rlhf_jax.models.checkpoint import load_model
    from rlhf_jax.models.transformer import make_model

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(converted["hf2"])).float().eval()
    assert isinstance(hf_model, transformers.LlamaForCausalLM)
    loaded = load_model(converted["ckpt"])
    model = make_model(loaded.cfg)

    rng = np.random.default_rng(0)
    ids = rng.integers(0, loaded.cfg.vocab_size, size=(2, 7)).astype(np.int32)
    mask = np.ones_like(ids, dtype=bool)
    mask[1, :3] = False  # a left-padded row
    ids[1, :3] = 0
    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)

    ours = np.asarray(jit_forward(model, loaded.params, ids, mask))
    with torch.no_grad():
        theirs = hf_model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                          attention_mask=torch.from_numpy(mask.astype(np.int64)),
                          position_ids=torch.from_numpy(positions.astype(np.int64))).logits.numpy()
    assert ours.shape == theirs.shape == (2, 7, loaded.cfg.vocab_size)
    np.testing.assert_allclose(ours[mask], theirs[mask], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------ main


def test_main_generate_config_runs_generate_stage(capsys, tmp_path):
    run_dir = tmp_path / "demo_run"
    rc, out, err = _run(capsys, main_cli.main, ["--config", REPO / "configs" / "generate.yaml", f"run_dir={run_dir}",
                                                f"sampling.max_new_tokens={MAX_NEW}"])
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stage"] == "generate" and summary["prompts"] == 8

    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8
    assert [s["prompt"] for s in samples] == bundled_prompts()
    for s in samples:
        assert set(s) == RECORD_KEYS
        assert 1 <= len(s["ids"]) == len(s["logprobs"]) <= MAX_NEW
    assert summary["new_tokens"] == sum(len(s["ids"]) for s in samples)
    assert not list(run_dir.glob("*.partial"))

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(m["stage"] == "generate" for m in metrics)
    assert metrics[-1]["step"] == 8 and metrics[-1]["new_tokens"] == summary["new_tokens"]
    rc, _, err = _run(capsys, main_cli.main, ["--config", REPO / "configs" / "generate.yaml", f"run_dir={run_dir}",
                                              f"sampling.max_new_tokens={MAX_NEW}"])
    assert rc == 0, err  # a rerun replaces its samples and its metrics' lines
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == len(metrics)

    config = json.loads((run_dir / "config.json").read_text())
    assert config["run_dir"] == str(run_dir) and config["sampling"]["max_new_tokens"] == MAX_NEW
    assert config["stage"] == "generate"
    assert (run_dir / "tensorboard").is_dir() and any((run_dir / "tensorboard").iterdir())
    prompts = tmp_path / "ten.txt"  # a last batch short of sampling.batch_size still gets its metrics line
    prompts.write_text("".join(f"{p}\n" for p in (bundled_prompts() * 2)[:10]))
    rc, _, err = _run(capsys, main_cli.main, ["--config", REPO / "configs" / "generate.yaml",
                                              f"run_dir={tmp_path / 'ten'}", f"generate.prompt_file={prompts}",
                                              f"sampling.max_new_tokens={MAX_NEW}", "sampling.batch_size=8"])
    assert rc == 0, err
    lines = [json.loads(line) for line in (tmp_path / "ten" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [8, 10]


def test_the_generate_stage_leaves_other_runs_and_bad_outputs_alone(capsys, tmp_path, hf_dir):
    """It never takes over another stage's run_dir (its config.json, metrics), and an output path under a file is
    refused naming generate.output, leaving no run_dir behind."""
    base = ["--config", REPO / "configs" / "generate.yaml", f"model.path={hf_dir}",
            f"sampling.max_new_tokens={MAX_NEW}"]
    sft_run = tmp_path / "sft_run"
    sft_run.mkdir()
    (sft_run / "config.json").write_text('{"stage": "sft", "seed": 0}')
    rc, _, err = _run(capsys, main_cli.main, [*base, f"run_dir={sft_run}"])
    _assert_user_error(rc, err, f"run_dir={sft_run}: holds a run of stage 'sft'")
    assert json.loads((sft_run / "config.json").read_text())["stage"] == "sft"
    assert not {"samples.jsonl", "metrics.jsonl", "tensorboard"} & {p.name for p in sft_run.iterdir()}

    a_file = tmp_path / "prompts.txt"
    a_file.write_text("hi\n")
    rc, _, err = _run(capsys, main_cli.main, [*base, f"run_dir={tmp_path / 'new_run'}",
                                              f"generate.output={a_file / 'out.jsonl'}"])
    _assert_user_error(rc, err, f"generate.output={a_file / 'out.jsonl'}: {a_file} is a file, expected a directory")
    assert not (tmp_path / "new_run").exists()


def test_main_without_a_config_says_it_runs_the_defaults(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(capsys, main_cli.main, [])
    assert rc == 0, err
    assert err.startswith("no --config: running the defaults, stage 'generate' with the tiny built-in model on the "
                          "bundled prompts into runs/default/"), err
    assert len((tmp_path / "runs" / "default" / "samples.jsonl").read_text().splitlines()) == 8


def test_a_generate_run_that_fails_midway_leaves_no_partial_samples(capsys, tmp_path, monkeypatch):
    from rlhf_jax.errors import UserError
    from rlhf_jax.models.generation import Generator

    def fails_after_one(self, prompts, *args):
        yield {"prompt": prompts[0], "ids": [1]}
        raise UserError("the disk went away")

    monkeypatch.setattr(Generator, "generate", fails_after_one)
    run_dir = tmp_path / "failed"
    rc, _, err = _run(capsys, main_cli.main, ["--config", REPO / "configs" / "generate.yaml", f"run_dir={run_dir}"])
    assert rc == 2 and err.strip().endswith("error: the disk went away"), err
    assert not list(run_dir.glob("*.partial")) and not (run_dir / "samples.jsonl").exists()


def test_a_run_that_an_os_error_stops_before_any_progress_leaves_no_run_dir(capsys, tmp_path, monkeypatch):
    from rlhf_jax.models.generation import Generator

    def denied(self, *args):
        raise PermissionError(13, "Permission denied", "/data/out.jsonl")

    monkeypatch.setattr(Generator, "generate", denied)
    run_dir = tmp_path / "denied"
    rc, _, err = _run(capsys, main_cli.main, ["--config", REPO / "configs" / "generate.yaml", f"run_dir={run_dir}"])
    _assert_user_error(rc, err, "/data/out.jsonl", "Permission denied")
    assert not run_dir.exists()


def _out_of_memory(*args, **kwargs):
    """XLA's own RESOURCE_EXHAUSTED, as a step too large for the device raises it (here, 400 TB on the host)."""
    import jax
    import jax.numpy as jnp

    jax.jit(lambda: jnp.ones((10 ** 14,), jnp.float32))().block_until_ready()
    raise AssertionError("allocated 400 TB")


def test_out_of_device_memory_is_one_line_with_exit_5_and_the_way_to_a_fit(capsys, tmp_path, monkeypatch, hf_dir,
                                                                           prompt_file):
    from rlhf_jax.models.generation import Generator
    from rlhf_jax.stages import dispatch

    monkeypatch.setattr(dispatch, "run", _out_of_memory)
    rc, _, err = _run(capsys, main_cli.main, ["--config", REPO / "configs" / "generate.yaml", f"run_dir={tmp_path}"])
    assert rc == 5 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: out of device memory (RESOURCE_EXHAUSTED: Out of memory allocating") and \
        "--dry-run` plans each step's memory" in err, err
    monkeypatch.setattr(Generator, "generate", _out_of_memory)
    rc, _, err = _run(capsys, generate_cli.main, _gen_argv(hf_dir, prompt_file))
    assert rc == 5 and len(err.strip().splitlines()) == 1 and "a smaller --batch-size" in err, err
    monkeypatch.undo()
    rc, _, err = _run(capsys, generate_cli.main, _gen_argv(hf_dir, prompt_file, "--batch-size", str(8 * 10 ** 10)))
    assert rc == 5 and err.startswith("error: out of host memory (Unable to allocate ") and \
        len(err.strip().splitlines()) == 1 and "a smaller --batch-size" in err, err


def test_main_unknown_key_suggests_the_right_one(capsys, tmp_path):
    rc, out, err = _run(capsys, main_cli.main,
                        ["--config", REPO / "configs" / "generate.yaml", f"run_dir={tmp_path / 'r'}", "optim.lrr=1"])
    _assert_user_error(rc, err, "did you mean 'optim.lr'")
    assert out == ""
    assert not (tmp_path / "r").exists(), "a config error must come before any run-dir work"


def test_main_unknown_option_and_a_section_set_as_a_value_are_one_line(capsys, tmp_path):
    rc, out, err = _run(capsys, main_cli.main, ["--dryrun", f"run_dir={tmp_path / 'r'}"])
    assert rc == 2 and err == "error: unknown option '--dryrun'; overrides are written section.key=value\n", err
    rc, out, err = _run(capsys, main_cli.main, ["optim=3", f"run_dir={tmp_path / 'r'}"])
    _assert_user_error(rc, err, "override 'optim' names a section; set its fields")
    assert not (tmp_path / "r").exists()


def test_main_out_of_range_value(capsys, tmp_path):
    rc, out, err = _run(capsys, main_cli.main, ["--config", REPO / "configs" / "generate.yaml",
                                                f"run_dir={tmp_path / 'r'}", "sampling.top_p=2"])
    _assert_user_error(rc, err, "sampling.top_p")
    assert out == ""


def test_main_output_that_is_a_directory_fails_before_generating(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    rc, out, err = _run(capsys, main_cli.main, ["--config", REPO / "configs" / "generate.yaml",
                                                f"run_dir={tmp_path / 'r'}", f"generate.output={tmp_path / 'out'}"])
    _assert_user_error(rc, err, "generate.output", "is a directory")
    assert not (tmp_path / "r" / "tiny_model").exists()


def test_module_entry_point_help():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "rlhf_jax.main", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "generate" in text
    for section in ("model", "mesh", "sampling"):
        assert f"\n{section}: " in text, section
    assert "sampling.max_new_tokens" in text


@pytest.mark.parametrize("joined, status, fast", [(True, 2, True), (True, 5, True), (True, 0, False),
                                                  (True, 3, False), (True, 4, False), (False, 2, False)])
def test_only_a_process_of_several_stopped_by_its_own_error_skips_the_exit_handlers(monkeypatch, joined, status,
                                                                                     fast):
    """JAX's exit handler waits for every process: one stopped alone (a user error, out of memory) would wait for
    processes that wait for it. Statuses every process reaches together (done, diverged, interrupted and saved)
    and a single process exit as usual."""
    from rlhf_jax.runtime import signals as signals_lib

    class Fast(Exception):
        pass

    def exit_now(code):
        raise Fast(code)

    monkeypatch.setattr(signals_lib, "_exit_now", exit_now)
    monkeypatch.setattr(signals_lib, "_joined_others", lambda: joined)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(Fast if fast else SystemExit) as caught:
            signals_lib.exit_process(status)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert caught.value.args[0] == status if fast else caught.value.code == status

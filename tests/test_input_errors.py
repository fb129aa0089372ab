"""Bad config and data input, through the real CLIs in-process: exit status 2, exactly one stderr line
`error: ...` naming the file, line, key or flag, and nothing written."""

import errno
import json
import os
from pathlib import Path

import pytest

from rlhf_jax import generate
from rlhf_jax import main as train_cli
from rlhf_jax.data import __main__ as data_cli
from rlhf_jax.data import prepare as prepare_mod
from rlhf_jax.data.pipeline import open_split


def _one_error(capsys, main, argv, *fragments) -> str:
    """Run a CLI that must refuse its input; returns the error line after checking its shape and fragments."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert out == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _summary(capsys, argv) -> dict:
    rc = data_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prepare_argv(fmt, path, data_dir, name="ds", *extra):
    return ["--format", fmt, "--input", path, "--data-dir", data_dir, "--name", name, *extra]


# ---------------------------------------------------------------------------------------------------------------------
# python -m rlhf_jax.main --config


def test_duplicate_config_key_names_key_and_line(capsys, tmp_path):
    run_dir = tmp_path / "run"
    path = tmp_path / "cfg.yaml"
    path.write_text(f"run_dir: {run_dir}\noptim:\n  lr: 0.1\n  b1: 0.5\n  lr: 0.2\n")
    _one_error(capsys, train_cli.main, ["--config", path], str(path), "duplicate key 'lr'", "at line 5")
    assert not run_dir.exists()


@pytest.mark.parametrize("make, problem", [
    (lambda p: p.write_text(""), "holds no settings"),
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: None, "does not exist"),
])
def test_unusable_config_file_says_why(capsys, tmp_path, monkeypatch, make, problem):
    monkeypatch.chdir(tmp_path)  # the default run_dir is relative: it must not appear
    path = tmp_path / "cfg.yaml"
    make(path)
    _one_error(capsys, train_cli.main, ["--config", path], f"config file {str(path)!r}: {problem}")
    assert sorted(os.listdir(tmp_path)) == (["cfg.yaml"] if path.exists() else [])


# ---------------------------------------------------------------------------------------------------------------------
# python -m rlhf_jax.generate: each flag out of range is named


@pytest.mark.parametrize("flag, value, message", [
    ("--top-p", "1.5", "--top-p must be in (0, 1], got 1.5"),
    ("--top-p", "0", "--top-p must be in (0, 1], got 0.0"),
    ("--batch-size", "0", "--batch-size must be >= 1, got 0"),
    ("--max-prompt-tokens", "0", "--max-prompt-tokens must be >= 1, got 0"),
    ("--max-new-tokens", "0", "--max-new-tokens must be >= 1, got 0"),
    ("--temperature", "-1", "--temperature must be 0 (greedy) or a finite number >= 1e-06, got -1.0"),
    ("--temperature", "nan", "--temperature must be 0 (greedy) or a finite number >= 1e-06, got nan"),
    ("--temperature", "1e-300", "--temperature must be 0 (greedy) or a finite number >= 1e-06, got 1e-300"),
    ("--temperature", "inf", "--temperature must be 0 (greedy) or a finite number >= 1e-06, got inf"),
    ("--top-k", "-1", "--top-k must be >= 0, got -1"),
    ("--seed", str(2 ** 32), f"--seed must be from 0 to 2^32 - 1, got {2 ** 32}"),
])
def test_generate_names_the_bad_flag(capsys, tmp_path, flag, value, message):
    argv = ["--model", tmp_path / "no_model", "--prompt-file", tmp_path / "no_prompts.txt", flag, value]
    assert _one_error(capsys, generate.main, argv) == f"error: {message}"


# ---------------------------------------------------------------------------------------------------------------------
# python -m rlhf_jax.data


@pytest.mark.parametrize("fraction, shown", [("1", "1.0"), ("-0.1", "-0.1"), ("nan", "nan")])
def test_data_eval_fraction_names_the_flag(capsys, tmp_path, fraction, shown):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p"}])
    argv = _prepare_argv("jsonl_prompts", path, tmp_path / "d", "ds", "--eval-fraction", fraction)
    line = _one_error(capsys, data_cli.main, argv)
    assert line == f"error: --eval-fraction must be in [0, 1), got {shown}"
    assert not (tmp_path / "d").exists()


def test_every_example_in_the_eval_split_says_so(capsys, tmp_path):
    from rlhf_jax.data.prepare import is_eval_prompt

    prompt = next(f"prompt {i}" for i in range(1000) if is_eval_prompt(f"prompt {i}", 0.05))
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": prompt, "response": f"r{i}"} for i in range(3)])
    argv = _prepare_argv("jsonl_sft", path, tmp_path / "d", "ds", "--eval-fraction", "0.05")
    _one_error(capsys, data_cli.main, argv,
               f"every valid example of {path} fell into the eval split (3 examples); lower the eval fraction")


def test_sigterm_while_preparing_leaves_nothing_behind(capsys, tmp_path, monkeypatch):
    """A scheduler's stop (SIGTERM) mid-build: exit 4 in one line, no partial dataset, no --data-dir of ours."""
    import os
    import signal

    from rlhf_jax.data import prepare

    def terminated(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(prepare._Builder, "download_and_prepare", terminated)
    handler = signal.getsignal(signal.SIGTERM)
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}", "response": "r"} for i in range(3)])
    rc = data_cli.main([str(a) for a in _prepare_argv("jsonl_sft", path, tmp_path / "d", "ds")])
    out, err = capsys.readouterr()
    assert rc == 4 and err.splitlines() == [f"interrupted: nothing was written to {tmp_path / 'd'} (a dataset already "
                                            "there is as it was); rerun the same command"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]
    assert signal.getsignal(signal.SIGTERM) == handler  # put back


def test_json_array_file_says_so(capsys, tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompt": f"p{i}"} for i in range(3)], indent=2))
    for extra in ([], ["--skip-invalid"]):  # a whole file in the wrong layout is no row to skip
        _one_error(capsys, data_cli.main, _prepare_argv("jsonl_prompts", path, tmp_path / "d", "ds", *extra),
                   f"{path}: is a JSON array; expected JSON lines (one object per line)")
    assert not (tmp_path / "d").exists()


def test_one_json_object_over_several_lines_and_a_directory_say_so(capsys, tmp_path):
    path = tmp_path / "row.json"
    path.write_text(json.dumps({"prompt": "p"}, indent=2))
    _one_error(capsys, data_cli.main, _prepare_argv("jsonl_prompts", path, tmp_path / "d", "ds"),
               f"{path}: is one JSON object over several lines; expected JSON lines (one object per line)")
    folder = tmp_path / "rows.jsonl"
    folder.mkdir()
    _one_error(capsys, data_cli.main, _prepare_argv("jsonl_prompts", folder, tmp_path / "d", "ds"),
               f"{folder}: is a directory, expected a file")
    assert not (tmp_path / "d").exists()


def test_a_dataset_name_too_long_for_a_directory_is_one_line(capsys, tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p"}])
    _one_error(capsys, data_cli.main, _prepare_argv("jsonl_prompts", path, tmp_path / "d", "a" * 240),
               f"dataset name {'a' * 20}... has 240 characters; at most 100")
    assert not (tmp_path / "d").exists()


def test_json_error_column_counts_the_byte_order_mark(capsys, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n\xef\xbb\xbf{"prompt": ]\n')
    line = _one_error(capsys, data_cli.main, _prepare_argv("jsonl_prompts", path, tmp_path / "d"))
    assert line == f"error: {path}:2: invalid JSON (Expecting value at column 13)"
    assert not (tmp_path / "d").exists()


IDENTICAL = [
    ("jsonl_rankings", {"prompt": "q", "responses": ["a", "b", "a"], "ranks": [0, 1, 2]},
     "field 'responses[0]' and 'responses[2]' are identical"),
    ("jsonl_rankings", {"prompt": "q", "chosen": "a", "rejected": "a"}, "fields 'chosen' and 'rejected' are identical"),
    ("hh_rlhf", {"chosen": "\n\nHuman: q\n\nAssistant: same", "rejected": "\n\nHuman: q\n\nAssistant: same"},
     "fields 'chosen' and 'rejected' are identical"),
]
GOOD = {"jsonl_rankings": {"prompt": "q", "chosen": "a", "rejected": "b"},
        "hh_rlhf": {"chosen": "\n\nHuman: q\n\nAssistant: yes", "rejected": "\n\nHuman: q\n\nAssistant: no"}}


@pytest.mark.parametrize("fmt, bad, message", IDENTICAL)
def test_identical_responses_are_an_invalid_row(capsys, tmp_path, fmt, bad, message):
    path = _write_jsonl(tmp_path / "r.jsonl", [GOOD[fmt], bad, GOOD[fmt]])
    line = _one_error(capsys, data_cli.main, _prepare_argv(fmt, path, tmp_path / "d"))
    assert line == f"error: {path}:2: {message}"
    assert not (tmp_path / "d").exists()
    summary = _summary(capsys, _prepare_argv(fmt, path, tmp_path / "d", "ds", "--skip-invalid"))
    assert summary["skipped"] == {"identical_responses": 1} and summary["rows"] == 2


def test_non_dense_ranks_are_counted_in_the_summary(capsys, tmp_path):
    path = _write_jsonl(tmp_path / "r.jsonl", [{"prompt": "a", "responses": ["x", "y", "z"], "ranks": [0, 2, 2]},
                                               {"prompt": "b", "responses": ["x", "y", "z"], "ranks": [2, 1, 1]},
                                               {"prompt": "c", "responses": ["x", "y", "z"], "ranks": [1, 0, 0]},
                                               {"prompt": "d", "chosen": "x", "rejected": "y",
                                                "metadata": {"source": "m"}}])
    summary = _summary(capsys, _prepare_argv("jsonl_rankings", path, tmp_path / "d"))
    assert summary["non_dense_ranks"] == 2 and summary["rows"] == 4
    assert summary["metadata_not_kept"] == 1  # a dropped field is counted, not silent
    _, meta = open_split(tmp_path / "d", "ds", "train")
    assert meta["non_dense_ranks"] == 2


def _no_space(self, rows):
    """A disk that fills up after the first example."""
    for i, row in enumerate(rows):
        if i == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        yield i, row


def test_failed_overwrite_leaves_the_old_dataset_intact(capsys, tmp_path, monkeypatch):
    data_dir = tmp_path / "d"
    old = _write_jsonl(tmp_path / "old.jsonl", [{"prompt": f"old {i}"} for i in range(40)])
    new = _write_jsonl(tmp_path / "new.jsonl", [{"prompt": f"new {i}"} for i in range(5)])
    _summary(capsys, _prepare_argv("jsonl_prompts", old, data_dir, "ds", "--eval-fraction", "0.5"))

    with monkeypatch.context() as m:
        m.setattr(prepare_mod._Builder, "_generate_examples", _no_space)
        line = _one_error(capsys, data_cli.main, _prepare_argv("jsonl_prompts", new, data_dir, "ds", "--overwrite"))
    assert line == f"error: {data_dir / 'ds'}: cannot write (No space left on device); nothing was changed"
    assert os.listdir(data_dir) == ["ds"]  # no temporary build left beside it
    source, meta = open_split(data_dir, "ds", "train")
    assert meta["inputs"] == [str(old)] and source[0]["prompt"].decode().startswith("old")

    _summary(capsys, _prepare_argv("jsonl_prompts", new, data_dir, "ds", "--overwrite"))
    source, meta = open_split(data_dir, "ds", "train")
    assert meta["inputs"] == [str(new)] and len(source) == 5
    with pytest.raises(Exception, match="no split 'eval'"):  # replaced whole: no stale split of the old one
        open_split(data_dir, "ds", "eval")
    assert os.listdir(data_dir) == ["ds"]


def _denied(self, *args, **kwargs):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))


@pytest.mark.parametrize("fail, reason", [
    (lambda m: m.setattr(prepare_mod._Builder, "_generate_examples", _no_space), "No space left on device"),
    (lambda m: m.setattr(Path, "mkdir", _denied), "Permission denied"),  # root ignores chmod: fake the refusal
])
def test_unwritable_data_dir_is_one_line_and_leaves_nothing(capsys, tmp_path, monkeypatch, fail, reason):
    data_dir = tmp_path / "new" / "d"
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}"} for i in range(5)])
    fail(monkeypatch)
    line = _one_error(capsys, data_cli.main, _prepare_argv("jsonl_prompts", path, data_dir))
    assert line == f"error: {data_dir / 'ds'}: cannot write ({reason}); nothing was changed"
    assert sorted(os.listdir(tmp_path)) == ["p.jsonl"]


def test_data_dir_that_is_a_file_says_so(capsys, tmp_path):
    data_dir = tmp_path / "d"
    data_dir.write_text("not a directory\n")
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p"}])
    line = _one_error(capsys, data_cli.main, _prepare_argv("jsonl_prompts", path, data_dir))
    assert line == f"error: {data_dir}: is a file; --data-dir must be a directory"
    assert data_dir.read_text() == "not a directory\n"


@pytest.mark.parametrize("fields, message", [
    (["prompt=a", "prompt=q"], "--field prompt=q: prompt is already read from 'a'; give each field once"),
    (["prompt=q", "response=q"], "--field: prompt and response would both read the rows' 'q'; map them to different "
                                 "fields"),
    (["prompt=response"], "--field: prompt and response would both read the rows' 'response'; map them to "
                          "different fields"),
])
def test_field_flags_that_conflict_are_one_line(capsys, tmp_path, fields, message):
    """Each conflict would import quietly: the last mapping winning, or a prompt that is its own response."""
    path = _write_jsonl(tmp_path / "p.jsonl", [{"q": "What is 2+2?", "a": "4", "response": "4"}])
    flags = [x for f in fields for x in ("--field", f)]
    _one_error(capsys, data_cli.main, _prepare_argv("jsonl_sft", path, tmp_path / "d", "ds", *flags), message)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("pair", ["prompt", "=question", "prompt="])
def test_a_field_flag_without_both_names_is_one_line(capsys, tmp_path, pair):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"question": "p"}])
    line = _one_error(capsys, data_cli.main, _prepare_argv("jsonl_prompts", path, tmp_path / "d", "ds", "--field",
                                                           pair))
    assert line == f"error: --field expects CANONICAL=NAME (e.g. prompt=question), got {pair!r}"
    assert not (tmp_path / "d").exists()

"""User code that fails, flags named as typed, a full disk, a second signal, quiet imports, rank ranges and
progress in log files: each ends in one clear line (or a few plain ones) and leaves nothing half-written."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import random
import resource
import signal
import subprocess
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp
import numpy as np
import pytest

from rlhf_jax import convert, evaluate, generate
from rlhf_jax import main as main_cli
from rlhf_jax.data import __main__ as data_cli
from rlhf_jax.errors import UserError, naming_flags
from rlhf_jax.eval.inputs import gold_scores
from rlhf_jax.models.checkpoint import load_model, save_model
from rlhf_jax.models.tiny import build_tiny_model
from rlhf_jax.models.transformer import init_params, make_model
from rlhf_jax.runtime.progress import Lines, progress
from rlhf_jax.stages.label import _check_ceiling, _check_ranks

from cli_helpers import run_quietly

# A failed save leaves Orbax's pending coroutines unawaited; Python reports them at collection.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

HERE = Path(__file__).stem  # user functions below are named to the CLIs as f"{HERE}:NAME"
WORDS = ["red", "cat", "sun", "blue", "dog", "tree", "moon", "fish", "bird", "star"]


def gold_raises(prompts, responses):
    return [1 / 0 for _ in responses]


def gold_none(prompts, responses):
    return None


def gold_words(prompts, responses):
    return ["good" for _ in responses]


def gold_nan(prompts, responses):
    return [float("nan")] + [1.0] * (len(responses) - 1)


def gold_short(prompts, responses):
    return [1.0]


def gold_long_then_none(prompts, responses):  # a short repr shows only the good values
    return [1.0] + [None]


def gold_wants_a_seed(prompts, responses, seed):  # a signature the scorer is not called with
    return [seed] * len(responses)


def labeler_raises(prompts, responses, seed):
    raise RuntimeError("the labeling service is down")


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("user_errors")


@pytest.fixture(scope="module")
def tiny(workdir) -> Path:
    return build_tiny_model(workdir / "tiny", seed=0)


@pytest.fixture(scope="module")
def reward_model(workdir, tiny) -> Path:
    policy = load_model(tiny, need_tokenizer=True)
    params = jax.device_get(init_params(make_model(policy.cfg, "scalar"), jax.random.key(1)))
    return save_model(workdir / "rm", params, policy.cfg, "scalar", policy.tokenizer_dir)


@pytest.fixture(scope="module")
def data_dir(workdir) -> Path:
    """An sft dataset `rep` and a prompts dataset `prompts`."""
    rng = random.Random(0)
    sft, prompts = workdir / "rep.jsonl", workdir / "prompts.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"Repeat: {w}", "response": f" {w}"}) + "\n"
                           for w in (" ".join(rng.sample(WORDS, 3)) for _ in range(64))))
    prompts.write_text("".join(json.dumps({"prompt": f"Say {w}:"}) + "\n" for w in WORDS[:8]))
    root = workdir / "data"
    for fmt, src, name in (("jsonl_sft", sft, "rep"), ("jsonl_prompts", prompts, "prompts")):
        rc, _, err = run_quietly(data_cli.main, ["--format", fmt, "--input", src, "--data-dir", root, "--name", name])
        assert rc == 0, err
    return root


def _eval(tiny, reward_model, out, *flags):
    prompts = tiny.parent / "eval_prompts.txt"
    prompts.write_text("Say red:\nSay blue:\n")
    return run_quietly(evaluate.main, ["--policy", tiny, "--reference", tiny, "--reward-model", reward_model,
                                       "--prompts", prompts, "--out", out, "--max-new-tokens", "4",
                                       "--max-prompt-tokens", "16", *flags])


# ------------------------------------------------------------------------------------------ user code that fails


def test_a_gold_scorer_may_return_a_models_scores_and_any_float64(tmp_path):
    """(n, 1) logits and values beyond float32 were accepted before the reward functions' check was shared."""
    assert gold_scores(lambda p, r: np.array([[0.5], [2.0]]), "m:f", ["p", "q"], [" a", " b"], [True, False],
                       [None, None]).tolist() == [0.5, 2.0]
    assert gold_scores(lambda p, r: [1e39, 0.0], "m:f", ["p", "q"], [" a", " b"], [True, False],
                       [None, None]).tolist() == [1e39, 0.0]


@pytest.mark.parametrize("fn, returned", [
    (gold_raises, f"raised ZeroDivisionError: division by zero ({__file__}:"),
    (gold_none, "returned None; expected 2 numbers, one per response"),
    (gold_words, "returned a list whose value for response 0 is 'good'; expected 2 numbers, one per response"),
    (gold_short, "returned 1 values for 2 responses ([1.0])"),
    (gold_nan, "returned 1 values for 2 responses that are not finite in float64 (the first: nan for response 0)"),
    (gold_long_then_none, "returned a list whose value for response 1 is None; expected 2 numbers, one per response"),
])
def test_a_gold_scorer_that_fails_is_one_line_naming_it_and_what_it_returned(fn, returned):
    spec = f"{HERE}:{fn.__name__}"
    with pytest.raises(UserError) as caught:
        gold_scores(fn, spec, ["p", "q"], [" a", " b"], [True, False], [None, None])
    assert str(caught.value).startswith(f"eval.gold={spec}: {returned}")


def test_evaluate_with_a_raising_gold_scorer_names_the_flag_and_writes_nothing(workdir, tiny, reward_model):
    out = workdir / "eval_out"
    rc, _, err = _eval(tiny, reward_model, out, "--gold", f"{HERE}:gold_raises")
    assert rc == 2 and "Traceback" not in err, err
    assert _last_line(err).startswith(f"error: --gold {HERE}:gold_raises: raised ZeroDivisionError: division by "
                                      f"zero ({__file__}:")
    assert not out.exists()


def test_user_codes_own_words_are_not_rewritten_into_flags_and_a_bad_signature_points_at_the_function():
    """evaluate.FLAGS maps `seed` to --seed: the scorer's TypeError keeps its 'seed', and since the call failed
    before the function ran, the line named is the function's own, not the caller's."""
    spec = f"{HERE}:gold_wants_a_seed"
    with pytest.raises(UserError) as caught:
        gold_scores(gold_wants_a_seed, spec, ["p"], [" a"], [True], [None])
    line = gold_wants_a_seed.__code__.co_firstlineno
    assert str(naming_flags(caught.value, evaluate.FLAGS)) == (
        f"--gold {spec}: raised TypeError: gold_wants_a_seed() missing 1 required positional argument: 'seed' "
        f"({__file__}:{line})")


def test_messages_name_the_flags_of_their_keys_and_paths_and_only_xlas_own_oom_is_exit_5():
    """A config key the CLI filled from a flag is written as the flag; a path given by a flag, or a file inside it,
    gets the flag in front; an error that only mentions RESOURCE_EXHAUSTED past its first line is not an OOM."""
    from rlhf_jax import generate
    from rlhf_jax.errors import OutOfMemory, out_of_memory_in_one_line

    assert str(naming_flags(UserError("'mesh.shape' expects a list of int"), generate.FLAGS)).startswith(
        "--mesh-shape expects")
    for path in ("/x", "/x/config.json"):
        assert str(naming_flags(UserError(f"{path}: does not exist"), {}, [("--model", "/x")])) == (
            f"--model {path}: does not exist")
    with pytest.raises(OutOfMemory), out_of_memory_in_one_line():
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9 bytes")
    with pytest.raises(RuntimeError, match="^a callback failed"), out_of_memory_in_one_line():
        raise RuntimeError("a callback failed\n  while reporting RESOURCE_EXHAUSTED elsewhere")


@pytest.mark.parametrize("ranks, returned", [
    (None, "returned None; expected 1 lists of ranks, one per prompt"),
    ("ab", "returned 'ab'; expected 1 lists of ranks, one per prompt"),
    ([["1", "0"]], "prompt 0: returned ['1', '0']; expected 2 integer ranks in [0, 2)"),
    ([[float("nan"), 0]], "prompt 0: returned [nan, 0]; expected 2 integer ranks in [0, 2)"),
    ([None], "prompt 0: returned None; expected 2 integer ranks"),
])
def test_a_labeler_that_returns_no_ranks_is_one_line_naming_it(ranks, returned):
    with pytest.raises(UserError) as caught:
        _check_ranks(ranks, [[" a", " b"]], "m:f")
    assert str(caught.value).startswith(f"label.labeler=m:f: {returned}")


@pytest.mark.parametrize("ceiling", ["high", float("nan"), 1.5])
def test_a_labeler_ceiling_that_is_no_accuracy_is_one_line(ceiling):
    with pytest.raises(UserError, match=f"^{HERE}:labeler_ceiling: returned .*; expected an accuracy in"):
        _check_ceiling(ceiling, sys.modules[__name__])
    assert _check_ceiling(None, sys.modules[__name__]) is None and _check_ceiling(0.75, sys.modules[__name__]) == 0.75


def test_the_label_stage_with_a_raising_labeler_writes_nothing(workdir, tiny, data_dir):
    run_dir = workdir / "label_run"
    rc, _, err = run_quietly(main_cli.main, [
        "stage=label", f"run_dir={run_dir}", f"model.path={tiny}", f"data.dir={data_dir}", "data.name=prompts",
        f"label.labeler={HERE}:labeler_raises", "label.responses=2", "label.dataset=labeled",
        "sampling.max_new_tokens=4", "sampling.max_prompt_tokens=16"])
    assert rc == 2 and "Traceback" not in err, err
    assert _last_line(err).startswith(f"error: label.labeler={HERE}:labeler_raises: raised RuntimeError: the "
                                      f"labeling service is down ({__file__}:")
    assert not run_dir.exists() and not (data_dir / "labeled").exists()


SEEN_ENDED = []


def labeler_seeing_ended(prompts, responses, seed, ended):
    assert [len(e) for e in ended] == [len(r) for r in responses]  # per prompt, one per response
    SEEN_ENDED.extend(e for per_prompt in ended for e in per_prompt)
    return [list(range(len(r))) for r in responses]


def test_a_labeler_that_takes_ended_is_told_what_rankings_jsonl_records(workdir, tiny, data_dir):
    """The random tiny model never ends within 4 tokens: the labeler hears that every sample was cut, and the
    rankings it returned are written with the same flags."""
    run_dir = workdir / "label_ended"
    rc, _, err = run_quietly(main_cli.main, [
        "stage=label", f"run_dir={run_dir}", f"model.path={tiny}", f"data.dir={data_dir}", "data.name=prompts",
        f"label.labeler={HERE}:labeler_seeing_ended", "label.responses=2", "label.dataset=labeled_ended",
        "sampling.max_new_tokens=4", "sampling.max_prompt_tokens=16"])
    assert rc == 0, err[-2000:]
    rows = [json.loads(line) for line in (run_dir / "rankings.jsonl").read_text().splitlines()]
    assert [e for row in rows for e in row["ended"]] == SEEN_ENDED == [False] * len(SEEN_ENDED) and rows


# ------------------------------------------------------------------------------------------------ flags and dirs


def test_evaluate_errors_name_the_flags_typed(workdir, tiny, reward_model):
    rc, _, err = _eval(tiny, reward_model, workdir / "e_limit", "--limit", "-1")
    assert rc == 2 and err.strip() == "error: --limit must be >= 0, got -1"
    rc, _, err = _eval(tiny, reward_model, workdir / "e_batch", "--batch-size", "3")
    assert rc == 2 and err.strip() == "error: --batch-size 3 is not divisible by the 8 data-parallel devices of the mesh"
    a_file = workdir / "a_file"
    a_file.write_text("x")
    rc, _, err = _eval(tiny, reward_model, a_file / "out")
    assert rc == 2 and err.strip() == f"error: --out {a_file / 'out'}: cannot create (Not a directory)"
    rc, _, err = _eval(tiny, workdir / "no_rm", workdir / "e_rm")
    assert rc == 2 and err.strip() == f"error: --reward-model {workdir / 'no_rm'}: does not exist"


def test_convert_errors_name_the_flag_of_the_path(workdir):
    rc, _, err = run_quietly(convert.main, ["--to-hf", "--checkpoint", workdir / "no_ckpt", "--out", workdir / "hf"])
    assert rc == 2 and err.strip() == f"error: --checkpoint {workdir / 'no_ckpt'}: does not exist"
    rc, _, err = run_quietly(convert.main, ["--to-hf", "--out", workdir / "hf"])
    assert rc == 2 and err.strip() == "error: --to-hf needs --checkpoint CKPT_DIR"
    assert not (workdir / "hf").exists()


def test_generate_names_the_batch_size_flag(workdir, tiny):
    prompts = workdir / "gen_prompts.txt"
    prompts.write_text("Say red:\n")
    rc, out, err = run_quietly(generate.main, ["--model", tiny, "--prompt-file", prompts, "--batch-size", "3"])
    assert rc == 2 and out == ""
    assert err.strip() == "error: --batch-size 3 is not divisible by the 8 data-parallel devices of the mesh"


def test_a_reward_model_given_as_a_policy_is_named_by_its_flag_or_key(workdir, tiny, reward_model, data_dir):
    prompts = workdir / "gen_prompts.txt"
    prompts.write_text("Say red:\n")
    rc, out, err = run_quietly(generate.main, ["--model", reward_model, "--prompt-file", prompts, "--batch-size", "8"])
    assert rc == 2 and out == "" and err.strip() == (
        f"error: --model {reward_model}: a reward/value model (scalar head), expected a policy")
    run_dir = workdir / "sft_from_rm"
    rc, _, err = run_quietly(main_cli.main, ["stage=sft", f"run_dir={run_dir}", f"model.path={reward_model}",
                                             f"data.dir={data_dir}", "data.name=rep", "train.steps=1"])
    assert rc == 2 and _last_line(err) == (f"error: model.path={reward_model}: a reward/value model (scalar head), "
                                           "expected a policy")
    assert not run_dir.exists()
    missing = workdir / "no_such_model"  # the key that gave the path, as dpo.reference's and the others' errors
    for stage in ("sft", "generate"):
        rc, _, err = run_quietly(main_cli.main, [f"stage={stage}", f"run_dir={run_dir}", f"model.path={missing}",
                                                 f"data.dir={data_dir}", "data.name=rep", "train.steps=1"])
        assert rc == 2 and _last_line(err) == f"error: model.path={missing}: does not exist", (stage, err)


def test_an_unusable_run_dir_names_the_key_and_the_reason(workdir, tiny):
    a_file = workdir / "another_file"
    a_file.write_text("x")
    config = Path(__file__).resolve().parents[1] / "configs" / "generate.yaml"
    rc, _, err = run_quietly(main_cli.main, ["--config", config, f"run_dir={a_file}/run", f"model.path={tiny}"])
    assert rc == 2 and err.strip() == f"error: run_dir={a_file}/run: cannot create (Not a directory)"


# ------------------------------------------------------------------------------------------------------- data


def test_ranks_outside_the_responses_are_refused_naming_file_row_and_field(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": "q", "responses": ["a", "b"], "ranks": [0, 1]}) + "\n"
                    + json.dumps({"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 2, 3]}) + "\n")
    rc, out, err = run_quietly(data_cli.main, ["--format", "jsonl_rankings", "--input", path, "--data-dir",
                                               tmp_path / "d", "--name", "r"])
    assert rc == 2 and out == ""
    assert err.strip() == (f"error: {path}:2: field 'ranks' must hold ranks in [0, 3) for its 3 responses "
                           "(0 = best), got 3")
    assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------------------------- output and imports


def test_importing_without_torch_prints_nothing():
    """transformers advises at import that PyTorch is missing; the package runs without it, so every command
    would print that line."""
    hide_torch = ("import importlib.util as u; real = u.find_spec; "
                  "u.find_spec = lambda name, *a, **k: None if name == 'torch' else real(name, *a, **k); "
                  "import rlhf_jax.models.tokenizer")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_")}
    done = subprocess.run([sys.executable, "-c", hide_torch], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_progress_in_a_log_file_is_a_plain_line_per_tenth(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with progress(200, "sft", "step", initial=50) as bar:
        assert isinstance(bar, Lines)
        for _ in range(150):
            bar.set_postfix({"loss": "0.4100"}, rate="7470")
            bar.update(1)
    lines = err.getvalue().splitlines()
    assert "\r" not in err.getvalue() and len(lines) == 8
    assert lines[0].startswith("sft: 30% (60/200 step, ") and lines[0].endswith("s) loss=0.4100 rate=7470")
    assert lines[-1].startswith("sft: 100% (200/200 step, ")
    with progress(200, "sft", "step", enabled=False) as quiet:
        quiet.update(200)
    assert err.getvalue().splitlines() == lines


def test_the_prepare_stage_prints_no_bar_frames(tmp_path):
    """TFDS draws its own bars while it builds a dataset; the stage's summary says what was written."""
    import tensorflow_datasets as tfds

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(5)))
    tfds.enable_progress_bar()  # as in a fresh process (other tests' preparing turned them off)
    rc, _, err = run_quietly(main_cli.main, ["stage=prepare", f"run_dir={tmp_path / 'run'}", f"data.dir={tmp_path}",
                                             "prepare.format=jsonl_prompts", f"prepare.inputs=[{path}]",
                                             "prepare.name=p"])
    assert rc == 0 and "\r" not in err and "Generating" not in err, err


def test_progress_on_a_terminal_is_a_live_bar(monkeypatch):
    from tqdm import tqdm

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    with progress(10, "eval", "response") as bar:
        assert isinstance(bar, tqdm)


# ----------------------------------------------------------------------------------------- full disk, signals


def _train_args(tiny, data_dir, run_dir, steps):
    return ["stage=sft", f"run_dir={run_dir}", f"model.path={tiny}", f"data.dir={data_dir}", "data.name=rep",
            "data.max_prompt_tokens=16", "data.max_response_tokens=8", "train.batch_size=8", "train.log_every=1",
            "train.save_every=1", "train.keep_checkpoints=5", "optim.lr=1e-3", "data.eval_split=none",
            f"train.steps={steps}"]


def _steps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_a_full_disk_during_an_async_save_is_one_line_and_leaves_no_partial_checkpoint(tiny, data_dir, workdir,
                                                                                         monkeypatch, capfd, caplog):
    """Files stop growing at 200 KB from step 3's save on, so Orbax's background writes fail as on a full
    disk (in C++, where no Python patch reaches): one line naming step 3 and the OS reason, no Orbax tracebacks,
    steps 1 and 2 kept and step 3's partial directory removed."""
    run_dir = workdir / "disk_full"
    real_save, limits = ocp.CheckpointManager.save, resource.getrlimit(resource.RLIMIT_FSIZE)

    def save(self, step, *args, **kwargs):
        if step == 3:
            resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, limits[1]))
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), never kills
    try:
        rc, _, err = run_quietly(main_cli.main, _train_args(tiny, data_dir, run_dir, 5))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    leaked = capfd.readouterr().err + "".join(f"{r.levelname}: {r.getMessage()}\n" for r in caplog.records
                                              if r.levelno >= logging.ERROR)  # orbax logs its threads' failures
    assert rc == 2 and "Traceback" not in err + leaked and "ERROR" not in err + leaked, err + leaked
    # A save's files may stay under the limit (Orbax's layout varies), so the first that fails is step 3 or later.
    failed = int(re.search(r"saving step (\d+) failed", _last_line(err)).group(1))
    assert failed >= 3
    assert _last_line(err) == (f"error: {(run_dir / 'checkpoints').resolve()}: saving step {failed} failed "
                               f"({os.strerror(errno.EFBIG)}); step {failed - 1} is the last complete checkpoint")
    assert "\r" not in err  # the training loop's progress, redirected, is plain lines
    assert _steps(run_dir) == [str(k) for k in range(1, failed)]


def test_a_second_signal_during_a_save_stops_in_one_line_with_exit_4(tiny, data_dir, workdir, monkeypatch):
    """SIGTERM twice while step 2's state is handed to Orbax: the save in hand is finished (Orbax cannot abandon
    one halfway), then the run stops with exit 4 and one line, and the handlers are restored."""
    run_dir = workdir / "signalled_twice"
    real_async_save = ocp.StandardCheckpointHandler.async_save
    saves = []

    def async_save(self, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_async_save(self, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", async_save)
    before = signal.getsignal(signal.SIGTERM)
    rc, _, err = run_quietly(main_cli.main, _train_args(tiny, data_dir, run_dir, 4))
    assert rc == 4 and "Traceback" not in err, err
    assert _last_line(err) == ("interrupted again: stopped at once; rerun the same command to resume from the last "
                               "complete checkpoint")
    assert signal.getsignal(signal.SIGTERM) is before
    assert _steps(run_dir) == ["1", "2"]

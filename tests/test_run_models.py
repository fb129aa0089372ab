"""The models a run reads: a reward model must share the policy's tokenizer and be a reward model (exports record
their role); a resumed run refuses a model replaced at its path (fingerprints recorded in its checkpoints) and
applies a changed fixed KL coefficient; evaluation passes over a checkpoint it cannot restore, as training does,
and leaves nothing half-made in --out."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import evaluate
from rlhf_jax import main as main_cli
from rlhf_jax.data import __main__ as data_cli
from rlhf_jax.errors import UserError
from rlhf_jax.models.checkpoint import load_model, model_fingerprint, save_model
from rlhf_jax.models.tiny import build_tiny_model
from rlhf_jax.training import state as training_state

from cli_helpers import run_quietly

# A failed restore leaves Orbax's pending read coroutines unawaited; Python reports them at collection.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

WORDS = ["red", "cat", "sun", "blue", "dog", "tree", "moon", "fish"]


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1].split("\r")[-1]


def _scalar_export(model_dir: Path, out: Path, role: str, seed: int = 1) -> Path:
    """A scalar-head export of `model_dir` (random head) with its tokenizer, recording `role`."""
    loaded = load_model(model_dir)
    params = training_state.with_head(loaded.params, loaded.cfg, "lm", "scalar", jax.random.key(seed))
    return save_model(out, jax.tree.map(np.asarray, params), loaded.cfg, "scalar", loaded.tokenizer_dir,
                      extra={"role": role, "reward_norm": {"gain": 1.0, "bias": 0.0}})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_models")
    tiny = build_tiny_model(root / "tiny", seed=0)
    corpus = resources.files("rlhf_jax").joinpath("assets/corpus.txt").read_text().upper().splitlines()
    other = build_tiny_model(root / "other_tokenizer", seed=0, corpus=corpus)
    src = root / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Tell me about the {a} {b}"}) + "\n" for a in WORDS for b in WORDS))
    assert data_cli.main(["--format", "jsonl_prompts", "--input", str(src), "--data-dir", str(root / "data"),
                          "--name", "asks"]) == 0
    demos = root / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": f"Name a {a}", "response": f" the {a} {b}"}) + "\n"
                             for a in WORDS for b in WORDS))
    assert data_cli.main(["--format", "jsonl_sft", "--input", str(demos), "--data-dir", str(root / "data"),
                          "--name", "demos"]) == 0
    prompt_file = root / "prompts.txt"
    prompt_file.write_text("".join(f"Tell me about the {w}\n" for w in WORDS))
    return {"root": root, "tiny": tiny, "other": other, "data": root / "data", "prompt_file": prompt_file,
            "rm": _scalar_export(tiny, root / "rm", "reward"),
            "rm_other": _scalar_export(other, root / "rm_other_tokenizer", "reward"),
            "value": _scalar_export(tiny, root / "value", "value")}


def _ppo_args(inputs, run_dir, *extra) -> list[str]:
    return ["stage=ppo", f"run_dir={run_dir}", f"model.path={inputs['tiny']}", f"ppo.reward_model={inputs['rm']}",
            f"data.dir={inputs['data']}", "data.name=asks", "data.max_prompt_tokens=12", "sampling.max_new_tokens=6",
            "train.batch_size=8", "ppo.minibatches=1", "train.log_every=1", "train.save_every=1",
            "ppo.samples_every=0", "ppo.kl_coef=0.02", *extra]


def _eval(inputs, out, *args):
    argv = ["--reference", inputs["tiny"], "--reward-model", inputs["rm"], "--prompts", inputs["prompt_file"],
            "--out", out, "--max-new-tokens", "6", "--batch-size", "8", "--max-prompt-tokens", "12", *args]
    return run_quietly(evaluate.main, argv)


# ------------------------------------------------------------------------------------------------ tokenizers


def test_a_reward_model_with_another_tokenizer_is_refused_by_ppo_and_eval(inputs):
    assert load_model(inputs["other"]).cfg.vocab_size == load_model(inputs["tiny"]).cfg.vocab_size == 512
    run_dir = inputs["root"] / "ppo_other_tokenizer"
    rc, _, err = run_quietly(main_cli.main, _ppo_args(inputs, run_dir, "train.steps=1",
                                                      f"ppo.reward_model={inputs['rm_other']}"))
    line = _last_line(err)
    assert rc == 2 and "Traceback" not in err, err
    assert line.startswith(f"error: ppo.reward_model={inputs['rm_other']}: its tokenizer differs from the policy's (")
    differ, of = line.split("(")[-1].split(" ids differ")[0].split(" of ")
    assert 0 < int(differ) <= int(of) == 512, line
    assert not run_dir.exists()

    out = inputs["root"] / "eval_other_tokenizer"
    rc, _, err = _eval(inputs, out, "--policy", inputs["tiny"], "--reward-model", inputs["rm_other"])
    line = _last_line(err)  # the CLI names its flag (--reward-model PATH), a config the key
    assert rc == 2 and line.startswith("error: ") and "reward" in line.split(": ")[1], err
    assert f"{inputs['rm_other']}: its tokenizer differs from the reference's (" in line, err
    assert not out.exists()


def test_eval_refuses_a_policy_with_another_tokenizer_before_sampling_any(inputs, monkeypatch):
    """The second policy reads other tokens: refused before the reference or the first policy samples a token."""
    from rlhf_jax.eval.evaluate import Evaluator

    sampled = []
    monkeypatch.setattr(Evaluator, "responses", lambda self, *a, **k: sampled.append(1) or pytest.fail("sampled"))
    out = inputs["root"] / "eval_other_policy"
    rc, _, err = _eval(inputs, out, "--policy", inputs["tiny"], "--policy", inputs["other"])
    assert rc == 2 and "Traceback" not in err, err
    assert f"{inputs['other']}: its tokenizer differs from the reference's (" in _last_line(err), err
    assert sampled == [] and not out.exists()


def test_policies_whose_paths_end_alike_get_names_that_tell_them_apart(inputs, tmp_path):
    from rlhf_jax.eval.policies import policy_sources

    for run in ("a", "b"):
        shutil.copytree(inputs["tiny"], tmp_path / run / "ppo" / "export")
    paths = [str(tmp_path / "a" / "ppo" / "export"), str(tmp_path / "b" / "ppo" / "export"), str(inputs["tiny"])]
    assert [s.name for s in policy_sources(paths)] == ["a/ppo/export", "b/ppo/export",
                                                       "/".join(Path(inputs["tiny"]).resolve().parts[-2:])]
    with pytest.raises(UserError, match="^eval.policies: a/ppo/export is given twice$"):
        policy_sources(paths[:2] + [str(tmp_path / "a" / "ppo" / ".." / "ppo" / "export")])


def test_a_reward_model_with_fewer_positions_than_a_response_needs_is_refused(inputs, tmp_path):
    """Past its positions a model reads NaN: every reward would be NaN, silently."""
    short = tmp_path / "rm_10_positions"
    shutil.copytree(inputs["rm"], short)
    meta = json.loads((short / "model.json").read_text())
    meta["config"]["max_position_embeddings"] = 10
    (short / "model.json").write_text(json.dumps(meta))
    run_dir = tmp_path / "ppo"
    rc, _, err = run_quietly(main_cli.main, _ppo_args(inputs, run_dir, "train.steps=1", f"ppo.reward_model={short}"))
    assert rc == 2 and _last_line(err) == (f"error: ppo.reward_model={short}: data.max_prompt_tokens + "
                                           "sampling.max_new_tokens = 18 exceeds the model's 10 positions"), err
    assert not run_dir.exists()
    rc, _, err = _eval(inputs, tmp_path / "eval", "--policy", inputs["tiny"], "--reward-model", short)
    assert rc == 2 and _last_line(err).startswith(f"error: --reward-model {short}: the longest prompt ("), err
    assert "exceeds the model's 10 positions" in _last_line(err)


def test_tokenizers_are_compared_by_vocabulary_and_end_of_text(inputs, tmp_path):
    from rlhf_jax.models.tokenizer import check_same_tokenizer

    tiny = inputs["tiny"]
    same = tmp_path / "same"  # other bytes, the same vocabulary: what convert --to-hf makes of a reward model
    shutil.copytree(tiny, same)
    config = json.loads((same / "tokenizer_config.json").read_text())
    (same / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    check_same_tokenizer(same, tiny, "x", "the policy")
    check_same_tokenizer(None, tiny, "x", "the policy")  # a model without tokenizer files: nothing to compare

    eos = tmp_path / "eos"
    shutil.copytree(tiny, eos)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (eos / name).exists():
            (eos / name).write_text(json.dumps({**json.loads((eos / name).read_text()), "eos_token": "<|pad|>"}))
    with pytest.raises(UserError, match=r"^ppo.reward_model=E: its tokenizer differs from the policy's \(its EOS id "
                                        r"is 1, the policy's 0\)$"):
        check_same_tokenizer(eos, tiny, "ppo.reward_model=E", "the policy")

    # another chat template wrote the prompts a reward model was trained on: it matters with data.chat_template only
    templated = tmp_path / "templated"
    shutil.copytree(tiny, templated)
    template = {**config, "chat_template": "{{ messages[0].content }}"}
    (templated / "tokenizer_config.json").write_text(json.dumps(template))
    check_same_tokenizer(templated, tiny, "ppo.reward_model=T", "the policy")
    with pytest.raises(UserError, match=r"^ppo.reward_model=T: its tokenizer's chat template differs from the policy's "
                                        r"\(with data.chat_template the prompts it reads are written by the policy's"):
        check_same_tokenizer(templated, tiny, "ppo.reward_model=T", "the policy", chat_template=True)


# ------------------------------------------------------------------------------------------------ roles


def test_a_value_model_is_refused_where_a_reward_model_is_read(inputs, tmp_path):
    value = inputs["value"]
    run_dir = tmp_path / "ppo"
    rc, _, err = run_quietly(main_cli.main, _ppo_args(inputs, run_dir, "train.steps=1", f"ppo.reward_model={value}"))
    assert rc == 2 and _last_line(err) == (f"error: ppo.reward_model={value}: a value model (a ppo run's "
                                           "export_value), expected a reward model"), err
    rc, _, err = _eval(inputs, tmp_path / "eval", "--policy", inputs["tiny"], "--reward-model", value)
    line = _last_line(err)
    assert rc == 2 and line.startswith("error: ") and "reward" in line.split(": ")[1], err
    assert line.endswith(f"{value}: a value model (a ppo run's export_value), expected a reward model"), err
    rc, _, err = run_quietly(main_cli.main, _ppo_args(inputs, run_dir, "train.steps=1", f"model.path={value}"))
    assert rc == 2 and _last_line(err) == (f"error: model.path={value}: a value model (a ppo run's export_value), "
                                           "expected a policy"), err
    assert not run_dir.exists() and not (tmp_path / "eval").exists()

    # The role goes through convert in both directions (config.json keeps it as an extra key).
    from rlhf_jax import convert

    assert convert.main(["--to-hf", "--checkpoint", str(value), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["role"] == "value"
    assert load_model(tmp_path / "hf").extra["role"] == "value"
    assert convert.main(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert json.loads((tmp_path / "back" / "model.json").read_text())["role"] == "value"


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_a_wrong_reference_is_refused_before_anything_compiles(inputs, tmp_path, monkeypatch, stage):
    """It was read after the models were placed and the state's program compiled: minutes at real size."""
    from rlhf_jax.stages import grpo, ppo

    def compiled(*args, **kwargs):
        raise AssertionError("the stage built its programs before checking its reference")

    monkeypatch.setattr(ppo if stage == "ppo" else grpo, "build_models", compiled)
    argv = [a.replace("stage=ppo", f"stage={stage}").replace("ppo.", f"{stage}.") for a in _ppo_args(
        inputs, tmp_path / "run", "train.steps=1", f"ppo.reference={inputs['rm']}") if "kl_coef" not in a]
    if stage == "grpo":
        argv += ["grpo.group_size=2", "train.batch_size=4"]
    rc, _, err = run_quietly(main_cli.main, [a for a in argv if "samples_every" not in a or stage == "ppo"])
    assert rc == 2 and _last_line(err) == (f"error: {stage}.reference={inputs['rm']}: a reward/value model (scalar "
                                           "head), expected a policy"), err


def test_exports_record_their_role(tmp_path):
    """A language model exports as a policy, a scalar head as a reward model unless it is ppo's value model."""
    from rlhf_jax.models.transformer import make_model

    tiny = build_tiny_model(tmp_path / "tiny", seed=0)
    loaded = load_model(tiny)
    for head, role, expected in (("lm", None, "policy"), ("scalar", None, "reward"), ("scalar", "value", "value")):
        params = training_state.with_head(loaded.params, loaded.cfg, "lm", head, jax.random.key(0))
        out = training_state.export(tmp_path / f"{head}_{expected}", params, loaded, make_model(loaded.cfg, head),
                                    role=role, chat_template=False)
        assert json.loads((out / "model.json").read_text())["role"] == expected


def test_a_model_trained_on_templated_prompts_is_flagged_where_it_reads_bare_ones(inputs, tmp_path):
    """An export records whether its prompts were in the chat template (data.chat_template); evaluating or sampling
    it the other way (evaluate or generate without --chat-template) warns in one line, once per model. The record
    survives convert in both directions."""
    from rlhf_jax import convert
    from rlhf_jax import generate as generate_cli
    from rlhf_jax.models.checkpoint import CHAT_TEMPLATE
    from rlhf_jax.models.transformer import make_model

    loaded = load_model(inputs["tiny"])
    chat, bare = (training_state.export(tmp_path / name, loaded.params, loaded, make_model(loaded.cfg),
                                        chat_template=flag) for name, flag in (("chat", True), ("bare", False)))
    assert json.loads((chat / "model.json").read_text())[CHAT_TEMPLATE] is True
    warning = lambda who: (f"warning: {who}: trained on prompts wrapped in its tokenizer's chat template, given "
                           "bare prompts here: set data.chat_template: true (evaluate, generate: --chat-template) to "
                           "give it prompts as it learned them")
    rc, _, err = _eval(inputs, tmp_path / "eval", "--policy", chat, bare, "--limit", "4")
    assert rc == 0 and err.splitlines().count(warning(f"the policy {chat}")) == 1, err
    assert str(bare) not in err and "chat template" not in err.replace(warning(f"the policy {chat}"), ""), err
    rc, _, err = run_quietly(generate_cli.main, ["--model", str(chat), "--prompt-file", str(inputs["prompt_file"]),
                                                 "--max-new-tokens", "2", "--batch-size", "8"])
    assert rc == 0 and warning(chat) in err.splitlines(), err

    # A tokenizer without a chat template, asked for one: one line naming the model, before anything is written
    rc, _, err = _eval(inputs, tmp_path / "eval_chat", "--policy", bare, "--chat-template")
    assert rc == 2 and err.strip().splitlines()[-1] == (f"error: --reference {inputs['tiny']}: its tokenizer has no "
                                                        "chat template (--chat-template asks for one)"), err
    rc, _, err = run_quietly(main_cli.main, _ppo_args(inputs, tmp_path / "ppo_chat", "train.steps=1",
                                                      "data.chat_template=true"))
    assert rc == 2 and err.strip().splitlines()[-1] == (f"error: model.path={inputs['tiny']}: its tokenizer has no "
                                                        "chat template (data.chat_template asks for one)"), err
    assert not (tmp_path / "eval_chat").exists() and not (tmp_path / "ppo_chat").exists()

    # A run's checkpoints are what the run trained, whatever its base model's export says.
    from rlhf_jax.eval.policies import PolicySource, policy_meta

    run = tmp_path / "run"
    run.mkdir()
    for flag in (True, False):
        (run / "config.json").write_text(json.dumps({"stage": "sft", "model": {"path": str(bare if flag else chat)},
                                                     "data": {"chat_template": flag}}))
        assert policy_meta(PolicySource("run", run, 1)).extra[CHAT_TEMPLATE] is flag

    assert convert.main(["--to-hf", "--checkpoint", str(chat), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())[CHAT_TEMPLATE] is True
    assert convert.main(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert json.loads((tmp_path / "back" / "model.json").read_text())[CHAT_TEMPLATE] is True


# ------------------------------------------------------------------------------------------------ fingerprints


def test_a_fingerprint_follows_the_weights_not_their_files_place_or_time(inputs, tmp_path):
    """An export is fingerprinted by its weights' digest (recorded in model.json) and its other files: the same
    weights exported again (Orbax names its data files at random, and a rerun of a finished stage exports again)
    are the same model; one bit of one weight is another. Without a digest (older exports) the files decide."""
    copy = tmp_path / "copy"
    shutil.copytree(inputs["rm"], copy)  # new mtimes, another path
    assert model_fingerprint(copy) == model_fingerprint(inputs["rm"])
    loaded = load_model(inputs["rm"])
    again = save_model(tmp_path / "again", loaded.params, loaded.cfg, loaded.head, loaded.tokenizer_dir,
                       extra=loaded.extra)
    assert model_fingerprint(again) == model_fingerprint(inputs["rm"])
    params = jax.tree.map(np.array, loaded.params)
    params["score"].reshape(-1).view(np.uint32)[0] ^= 1  # the last bit of one weight
    other = save_model(tmp_path / "other", params, loaded.cfg, loaded.head, loaded.tokenizer_dir, extra=loaded.extra)
    assert model_fingerprint(other) != model_fingerprint(inputs["rm"])

    meta = json.loads((copy / "model.json").read_text())
    del meta["weights_digest"]  # an export from before the digest
    (copy / "model.json").write_text(json.dumps(meta))
    before = model_fingerprint(copy)
    weights = next(p for p in (copy / "params").rglob("*") if p.is_file() and p.stat().st_size > 1000)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    assert model_fingerprint(copy) != before


def test_the_weights_digest_is_the_same_however_the_weights_are_sharded_and_sensitive_to_their_order():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from rlhf_jax.models.checkpoint import weights_digest

    rng = np.random.default_rng(0)
    params = {"embed": rng.normal(size=(64, 16)).astype(np.float32), "norm": rng.normal(size=16).astype(np.float32)}
    mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
    sharded = {k: jax.device_put(v, NamedSharding(mesh, PartitionSpec("fsdp"))) for k, v in params.items()}
    assert len(sharded["embed"].sharding.device_set) == 8
    assert weights_digest(sharded) == weights_digest(params)
    swapped = {**params, "embed": params["embed"][[1, 0, *range(2, 64)]]}  # two rows swapped: the same bit sum
    assert weights_digest(swapped) != weights_digest(params)


def test_model_changes_judge_models_by_their_files():
    from rlhf_jax.training.resume import config_changes, model_changes

    record = lambda sft, rm, files: {"model.path": {"path": sft, "fingerprint": "1"},
                                     "ppo.reward_model": {"path": rm, "fingerprint": files}}
    old, moved = record("/a/sft", "/a/rm", "2"), record("/b/sft", "/a/rm", "3")
    changed, same = model_changes(old, moved)
    assert changed == ["ppo.reward_model=/a/rm"] and same == {"model.path"}
    config = lambda sft, rm: {"model": {"path": sft}, "ppo": {"reward_model": rm}}
    refused, allowed = config_changes(config("/a/sft", "/a/rm"), config("/b/sft", "/b/rm"), same)
    assert refused == ["ppo.reward_model='/a/rm' (now '/b/rm')"]  # another reward model is another run
    assert allowed == ["model.path='/a/sft' (now '/b/sft')"]  # the same model, moved
    assert model_changes({}, moved) == ([], set())  # a checkpoint from before fingerprints: paths decide


@pytest.fixture(scope="module")
def ppo_run(inputs):
    """A 2-iteration PPO run (fixed KL 0.02) whose policy, reference and reward model are copies that the tests
    may replace and must put back."""
    root = inputs["root"]
    policy, rm = root / "ppo_policy", root / "ppo_rm"
    shutil.copytree(inputs["tiny"], policy)
    shutil.copytree(inputs["rm"], rm)
    run_dir = root / "ppo_run"
    args = lambda *extra: _ppo_args({**inputs, "tiny": policy, "rm": rm}, run_dir, *extra)
    rc, _, err = run_quietly(main_cli.main, args("train.steps=2"))
    assert rc == 0, err[-2000:]
    return {"dir": run_dir, "policy": policy, "rm": rm, "args": args}


def _replace_with(path: Path, other: Path) -> Path:
    """Put `other`'s files at `path`; returns where the original went."""
    kept = path.with_name(path.name + ".kept")
    path.rename(kept)
    shutil.copytree(other, path)
    return kept


@pytest.mark.parametrize("key", ["model.path", "ppo.reward_model"])
def test_resume_refuses_a_model_replaced_at_its_path(ppo_run, inputs, key):
    run_dir = ppo_run["dir"]
    path, other = ((ppo_run["policy"], build_tiny_model(inputs["root"] / "tiny_seed_1", seed=1))
                   if key == "model.path" else (ppo_run["rm"], _scalar_export(inputs["tiny"], inputs["root"] / "rm2",
                                                                              "reward", seed=2)))
    config, ckpts = (run_dir / "config.json").read_text(), sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    kept = _replace_with(path, other)
    try:
        rc, _, err = run_quietly(main_cli.main, ppo_run["args"]("train.steps=3"))
    finally:
        shutil.rmtree(path)
        kept.rename(path)
    assert rc == 2 and "Traceback" not in err, err
    assert _last_line(err) == (f"error: cannot resume {(run_dir / 'checkpoints').resolve()} (step 2): {key}="
                               f"{path.resolve()}: not the model or dataset the run started from (its files changed "
                               "since); restore it or use a new run_dir")
    assert (run_dir / "config.json").read_text() == config
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ckpts


@pytest.fixture(scope="module")
def sft_run(inputs):
    """An sft run from a copy of the tiny model, with checkpoints at steps 1, 2 and 3."""
    start = inputs["root"] / "sft_start"
    shutil.copytree(inputs["tiny"], start)
    run_dir = inputs["root"] / "sft_run"
    args = ["stage=sft", f"run_dir={run_dir}", f"model.path={start}", f"data.dir={inputs['data']}",
            "data.name=demos", "data.max_prompt_tokens=8", "data.max_response_tokens=8", "train.batch_size=8",
            "train.save_every=1", "train.keep_checkpoints=5", "data.eval_split=none"]
    rc, _, err = run_quietly(main_cli.main, [*args, "train.steps=3"])
    assert rc == 0, err[-2000:]
    return {"dir": run_dir, "start": start, "args": args}


def test_sft_records_its_start_model(sft_run, inputs):
    start = sft_run["start"]
    kept = _replace_with(start, build_tiny_model(inputs["root"] / "sft_other_start", seed=1))
    try:
        rc, _, err = run_quietly(main_cli.main, [*sft_run["args"], "train.steps=4"])
    finally:
        shutil.rmtree(start)
        kept.rename(start)
    assert rc == 2 and f"model.path={start.resolve()}: not the model or dataset the run started from" in \
        _last_line(err), err


def test_a_training_stage_never_takes_over_another_stages_run_dir(sft_run, tmp_path):
    """A generate or eval run there keeps its config and curves (TensorBoard would hide its points from step 1)."""
    (tmp_path / "config.json").write_text(json.dumps({"stage": "generate"}))
    args = [a for a in sft_run["args"] if not a.startswith("run_dir=")]
    rc, _, err = run_quietly(main_cli.main, [*args, f"run_dir={tmp_path}", "train.steps=1"])
    assert rc == 2 and _last_line(err) == (f"error: run_dir={tmp_path}: holds a run of stage 'generate'; give the "
                                           "sft stage a directory of its own"), err
    assert not (tmp_path / "checkpoints").exists()


def test_sft_records_its_dataset(sft_run, inputs, tmp_path):
    """A dataset prepared again under the same data.name from other rows is another run's data: refused, as a
    model replaced at its path is. The same rows prepared again are the same dataset (its files are)."""
    from rlhf_jax.data.prepare import dataset_dir, prepare

    demos = dataset_dir(inputs["data"], "demos")
    rows = tmp_path / "other.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"Q{i}", "response": f" A{i}"}) + "\n" for i in range(16)))
    kept = demos.parent.rename(tmp_path / "demos_kept")
    try:
        prepare("jsonl_sft", [str(rows)], inputs["data"], "demos")
        rc, _, err = run_quietly(main_cli.main, [*sft_run["args"], "train.steps=4"])
    finally:
        shutil.rmtree(demos.parent)
        kept.rename(demos.parent)
    assert rc == 2 and f"data.name={demos.resolve()}: not the model or dataset the run started from" in \
        _last_line(err), err
    # in another process too: protobuf wrote each example's features in an order of that process's own
    subprocess.run([sys.executable, "-m", "rlhf_jax.data", "--format", "jsonl_sft", "--input", str(rows),
                    "--data-dir", str(tmp_path / "again"), "--name", "demos"], check=True, capture_output=True)
    assert model_fingerprint(dataset_dir(tmp_path / "again", "demos")) == model_fingerprint(
        prepare("jsonl_sft", [str(rows)], tmp_path / "once", "demos")["dataset"])

def test_a_finished_run_reruns_to_its_end_and_another_shape_of_state_is_refused(sft_run, tmp_path):
    """The same command again resumes at its last step and finishes; a setting that changes the saved state's
    shapes (LoRA adapters instead of whole weights) is one line naming its key and a parameter, the run left as it
    was; and a state with a non-finite value is never saved."""
    from rlhf_jax.config import load_config
    from rlhf_jax.errors import DivergedError
    from rlhf_jax.training.run import Run

    run_dir = sft_run["dir"]
    rc, _, err = run_quietly(main_cli.main, [*sft_run["args"], "train.steps=3"])
    assert rc == 0 and f"resumed from {run_dir / 'checkpoints'} at step 3" in err, err[-2000:]
    config = (run_dir / "config.json").read_text()
    rc, _, err = run_quietly(main_cli.main, [*sft_run["args"], "train.steps=4", "lora.rank=4"])
    assert rc == 2 and "(step 3) with this config: lora.rank=0 (now 4), parameter" in _last_line(err), err
    assert (run_dir / "config.json").read_text() == config
    run = Run(load_config(None, [*sft_run["args"], "train.steps=4"]), tmp_path / "run", "sft")
    with pytest.raises(DivergedError, match="diverged at step 1: the parameters hold non-finite values"):
        run.save(1, {"w": jnp.array([1.0, jnp.nan])}, None)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_a_value_model_of_its_own_keeps_its_normalisation_through_the_run(inputs, tmp_path):
    """ppo.value_model (a later round's export_value) brings its own reward_norm, not the reward model's: the
    value head is read with it and exported with it."""
    loaded = load_model(_scalar_export(inputs["tiny"], tmp_path / "value_src", "value", seed=3))
    norm = {"gain": 3.0, "bias": -2.0}  # the reward model's is gain 1, bias 0
    value = save_model(tmp_path / "value", jax.tree.map(np.asarray, loaded.params), loaded.cfg, "scalar",
                       loaded.tokenizer_dir, extra={"role": "value", "reward_norm": norm})
    run_dir = tmp_path / "run"
    rc, _, err = run_quietly(main_cli.main, _ppo_args(inputs, run_dir, f"ppo.value_model={value}", "train.steps=1",
                                                      "train.save_every=0"))
    assert rc == 0, err[-2000:]
    assert load_model(run_dir / "export_value").extra["reward_norm"] == norm


# ------------------------------------------------------------------------------------------------ KL on resume


def test_a_changed_fixed_kl_coef_is_applied_on_resume(ppo_run, tmp_path):
    """ppo.kl_target 0: the resumed iterations use the new ppo.kl_coef. Moving the reward model (the same
    files) is allowed."""
    moved = tmp_path / "rm_moved"
    shutil.copytree(ppo_run["rm"], moved)
    rc, _, err = run_quietly(main_cli.main, [*ppo_run["args"]("train.steps=3", "ppo.kl_coef=0.05"),
                                             f"ppo.reward_model={moved}"])
    assert rc == 0, err[-2000:]
    warning = next(x for x in err.splitlines() if x.startswith("warning: resuming with changed settings"))
    assert "ppo.kl_coef=0.02 (now 0.05)" in warning and "beta is now ppo.kl_coef=0.05 (was 0.02)" in warning
    assert f"ppo.reward_model='{ppo_run['rm']}' (now '{moved}')" in warning
    lines = (ppo_run["dir"] / "metrics.jsonl").read_text().splitlines()
    betas = {m["step"]: m["beta"] for m in map(json.loads, lines)}
    assert betas[2] == pytest.approx(0.02) and betas[3] == pytest.approx(0.05)
    assert json.loads((ppo_run["dir"] / "export_value" / "model.json").read_text())["role"] == "value"
    assert json.loads((ppo_run["dir"] / "export" / "model.json").read_text())["role"] == "policy"


@flax.struct.dataclass
class _State:
    kl: object


def test_the_adaptive_kl_controller_continues_from_the_restored_beta():
    from rlhf_jax.config import config_from_dict
    from rlhf_jax.rl.ppo_math import KLController
    from rlhf_jax.stages.ppo import kl_on_resume

    state = _State(kl=KLController(jnp.asarray(0.125, jnp.float32)))
    adaptive = config_from_dict({"stage": "ppo", "ppo": {"kl_coef": 0.05, "kl_target": 6.0}})
    kept, note = kl_on_resume(adaptive)(state, {"ppo": {"kl_coef": 0.02, "kl_target": 6.0}})
    assert float(kept.kl.beta) == 0.125
    assert note == ("ppo.kl_coef is not applied: the adaptive KL controller (ppo.kl_target) continues from the "
                    "restored beta 0.125")
    assert kl_on_resume(adaptive)(state, {"ppo": {"kl_coef": 0.05, "kl_target": 6.0}})[1] == ""
    fixed = config_from_dict({"stage": "ppo", "ppo": {"kl_coef": 0.05, "kl_target": 0.0}})
    applied, note = kl_on_resume(fixed)(state, {"ppo": {"kl_coef": 0.02, "kl_target": 6.0}})
    assert float(applied.kl.beta) == np.float32(0.05) and note == "beta is now ppo.kl_coef=0.05 (was 0.125)"


# ------------------------------------------------------------------------------------------------ evaluation


@pytest.fixture(scope="module")
def truncated_run(sft_run):
    """The sft run with its step 3 truncated, as a crash mid-write leaves it."""
    run_dir = sft_run["dir"]
    for path in (run_dir / "checkpoints" / "3" / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 64 and "ocdbt" in str(path.parent):
            path.write_bytes(path.read_bytes()[:16])
    return run_dir


def test_all_steps_skips_a_checkpoint_it_cannot_restore(inputs, truncated_run, tmp_path):
    out = tmp_path / "all"
    rc, _, err = _eval(inputs, out, "--policy", truncated_run, "--all-steps")
    assert rc == 0 and "Traceback" not in err, err[-3000:]
    warning = next(x for x in err.splitlines() if x.startswith("warning: checkpoint step 3"))
    assert warning.startswith(f"warning: checkpoint step 3 in {truncated_run / 'checkpoints'} cannot be restored (")
    assert warning.endswith("; skipped")
    assert [p["step"] for p in json.loads((out / "report.json").read_text())["policies"]] == [1, 2]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_the_latest_step_falls_back_to_the_one_before(inputs, truncated_run, tmp_path):
    out = tmp_path / "latest"
    rc, _, err = _eval(inputs, out, "--policy", truncated_run)
    assert rc == 0 and "Traceback" not in err, err[-3000:]
    assert "cannot be restored (" in err and "; falling back to step 2" in err
    (policy,) = json.loads((out / "report.json").read_text())["policies"]
    assert policy["step"] == 2 and policy["name"].endswith("sft_run@2")


def test_a_named_step_that_cannot_be_restored_stops_and_leaves_no_output(inputs, truncated_run, tmp_path):
    """The first policy is evaluated, the second cannot be restored: one line, and --out is never made."""
    out = tmp_path / "named"
    rc, _, err = _eval(inputs, out, "--policy", inputs["tiny"], truncated_run / "checkpoints" / "3")
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    checkpoints = truncated_run / "checkpoints"
    assert _last_line(err).startswith(f"error: checkpoint step 3 in {checkpoints} cannot be restored (")
    assert not out.exists()

"""Prepared datasets and grain pipelines: CLI summary, token layout, comparisons grouped by prompt, determinism,
exact resume, host sharding, packing, eval padding, and bad input that writes nothing."""

import dataclasses
import json

import numpy as np
import pytest

from rlhf_jax.config import DataSection
from rlhf_jax.data.__main__ import main as data_main
from rlhf_jax.data.pipeline import Tokenize, eval_batches, train_dataset
from rlhf_jax.errors import UserError
from rlhf_jax.models.tiny import bundled_prompts
from rlhf_jax.models.tokenizer import PAD_ID, train_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = bundled_prompts() * 4 + ["a b c d e f g h i j k l m n o p q r s t u v w x y z"]
    return train_tiny_tokenizer(corpus, 300, tmp_path_factory.mktemp("tok"))


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prepare(capsys, *args):
    rc = data_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """One prepared dataset of each kind (prepared through the CLI)."""
    root = tmp_path_factory.mktemp("data")
    sft = _write_jsonl(root / "sft.jsonl", [{"prompt": f"Question {i}: what is {i} plus {i}?",
                                             "response": f"It is {2 * i}. " * (1 + i % 7)} for i in range(40)])
    rankings = _write_jsonl(root / "rank.jsonl", [
        {"prompt": f"Rank answers for item {i}", "responses": [f"answer {j} for {i}" for j in range(2 + i % 4)],
         "ranks": list(range(2 + i % 4))[::-1] if i % 2 else list(range(2 + i % 4))} for i in range(30)])
    prompts = _write_jsonl(root / "prompts.jsonl", [{"prompt": f"Tell me about {i}"} for i in range(20)])
    summaries = {}
    for fmt, path, name in (("jsonl_sft", sft, "sft"), ("jsonl_rankings", rankings, "rank"),
                            ("jsonl_prompts", prompts, "prompts")):
        rc = data_main(["--format", fmt, "--input", str(path), "--data-dir", str(root / "prepared"), "--name", name,
                        "--eval-fraction", "0.2"])
        assert rc == 0
        summaries[name] = root / "prepared"
    return root / "prepared"


def _spec(data_dir, name, **kw):
    return DataSection(dir=str(data_dir), name=name, **{"max_prompt_tokens": 16, "max_response_tokens": 12, **kw})


def test_a_remapped_field_no_row_holds_is_one_line_and_writes_nothing(capsys, tmp_path):
    """metadata is optional: --field metadata=answer over rows whose column is `solution` would import every
    prompt without its metadata, silently."""
    path = _write_jsonl(tmp_path / "gsm.jsonl", [{"question": f"q{i}", "solution": f"#### {i}"} for i in range(4)])
    rc, out, err = _prepare(capsys, "--format", "jsonl_prompts", "--input", path, "--data-dir", tmp_path / "d",
                            "--name", "gsm", "--field", "prompt=question", "--field", "metadata=answer")
    assert rc == 2 and not out and err.strip() == (f"error: --field metadata=answer: no row of {path} has a field "
                                                   "'answer'; its rows have: question, solution")
    assert not (tmp_path / "d" / "gsm").exists()
    # a required field: the first row says it, with the rename and the fields it has
    rc, out, err = _prepare(capsys, "--format", "jsonl_prompts", "--input", path, "--data-dir", tmp_path / "d",
                            "--name", "gsm", "--field", "prompt=questin")
    assert rc == 2 and err.strip() == (f"error: {path}:1: missing field 'questin' (--field prompt=questin); the row "
                                       "has 'question', 'solution'")
    rc, out, err = _prepare(capsys, "--format", "jsonl_prompts", "--input", path, "--data-dir", tmp_path / "d",
                            "--name", "gsm")
    assert rc == 2 and err.strip() == (f"error: {path}:1: missing field 'prompt'; the row has 'question', 'solution' "
                                       "(--field prompt=NAME reads it from another)")
    wide = _write_jsonl(tmp_path / "wide.jsonl", [{f"c{i:02d}": i for i in range(25)}])
    rc, out, err = _prepare(capsys, "--format", "jsonl_sft", "--input", wide, "--data-dir", tmp_path / "d",
                            "--name", "wide", "--field", "response=c00")
    assert rc == 2 and err.strip().endswith("'c18', 'c19' and 5 more (--field prompt=NAME reads it from another)"), err
    assert not (tmp_path / "d" / "gsm").exists() and not (tmp_path / "d" / "wide").exists()
    rc, out, err = _prepare(capsys, "--format", "jsonl_prompts", "--input", path, "--data-dir", tmp_path / "d",
                            "--name", "gsm", "--field", "prompt=question", "--field", "metadata=solution")
    assert rc == 0 and json.loads(out)["without_metadata"] == 0 and not err, err


def test_prompts_missing_their_metadata_are_counted_and_warned_when_others_have_it(capsys, tmp_path):
    """A reference answer missing from a few rows reaches the reward function as None: one line says how many."""
    rows = [{"question": f"q{i}", **({"answer": f"#### {i}"} if i % 3 else {})} for i in range(9)]
    path = _write_jsonl(tmp_path / "gsm.jsonl", rows)
    rc, out, err = _prepare(capsys, "--format", "jsonl_prompts", "--input", path, "--data-dir", tmp_path / "d",
                            "--name", "gsm", "--field", "prompt=question", "--field", "metadata=answer")
    assert rc == 0 and json.loads(out)["without_metadata"] == 3, err
    assert err.strip() == ("warning: 3 of 9 examples have no 'answer' field (metadata): a reward function or gold "
                           "scorer gets None as their metadata"), err
    path = _write_jsonl(tmp_path / "plain.jsonl", [{"prompt": f"p{i}"} for i in range(4)])
    rc, out, err = _prepare(capsys, "--format", "jsonl_prompts", "--input", path, "--data-dir", tmp_path / "d",
                            "--name", "plain")
    assert rc == 0 and json.loads(out)["without_metadata"] == 4 and not err, err  # none has any: nothing to say
    rc, out, err = _prepare(capsys, "--format", "jsonl_prompts", "--input", tmp_path / "gsm.jsonl", "--data-dir",
                            tmp_path / "d", "--name", "answers_left_out", "--field", "prompt=question")
    assert rc == 0 and json.loads(out)["without_metadata"] == 9, err  # the answers are in the rows, not imported
    assert err.strip() == ("warning: no example has a 'metadata' field (metadata), and the rows' fields 'answer' were "
                           "not imported: --field metadata=answer keeps one as each prompt's metadata, what a reward "
                           "function or gold scorer gets (else None)"), err


def test_repeated_prompts_are_counted_and_those_with_other_metadata_warned(capsys, tmp_path):
    """Kept (each is sampled as often as it appears), but a prompt with two reference answers has one of its copies
    score the right answer wrong: one line says so."""
    rows = [{"prompt": "2+2?", "metadata": "4"}, {"prompt": "3+3?", "metadata": "6"},
            {"prompt": "2+2?", "metadata": "4"}, {"prompt": "3+3?", "metadata": "7"}, {"prompt": "1+1?"}]
    path = _write_jsonl(tmp_path / "dups.jsonl", rows)
    rc, out, err = _prepare(capsys, "--format", "jsonl_prompts", "--input", path, "--data-dir", tmp_path / "d",
                            "--name", "dups")
    summary = json.loads(out)
    assert rc == 0 and summary["repeated_prompts"] == 2 and sum(summary["examples"].values()) == 5, err
    assert err.strip().splitlines()[-1] == ("warning: 1 prompts appear more than once with different metadata (the "
                                            "first: '3+3?'): a reward function or gold scorer checks each copy "
                                            "against its own"), err
    hh = _write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.",
                                               "rejected": "\n\nHuman: Hi\n\nAssistant: No."}] * 2)
    rc, out, err = _prepare(capsys, "--format", "hh_rlhf_prompts", "--input", hh, "--data-dir", tmp_path / "d",
                            "--name", "hh")  # a format whose fields are not renamed: nothing is unread
    assert rc == 0 and json.loads(out)["repeated_prompts"] == 1 and err == "", err
    sft = _write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "2+2?", "response": " 4", "id": i} for i in range(2)])
    rc, out, err = _prepare(capsys, "--format", "jsonl_sft", "--input", sft, "--data-dir", tmp_path / "d",
                            "--name", "sft")  # demonstrations: repeats are fine, metadata no verifier's
    assert rc == 0 and "repeated_prompts" not in json.loads(out) and err == "", err
    same = _write_jsonl(tmp_path / "same.jsonl", rows[:3])
    rc, out, err = _prepare(capsys, "--format", "jsonl_prompts", "--input", same, "--data-dir", tmp_path / "d",
                            "--name", "same")
    assert rc == 0 and json.loads(out)["repeated_prompts"] == 1 and "metadata" not in err, err  # the same answer


def test_cli_prints_one_json_summary(capsys, tmp_path):
    path = _write_jsonl(tmp_path / "x.jsonl", [{"prompt": f"p{i}", "response": "r"} for i in range(50)])
    rc, out, err = _prepare(capsys, "--format", "jsonl_sft", "--input", path, "--data-dir", tmp_path / "d",
                            "--name", "x", "--eval-fraction", "0.3")
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["kind"] == "sft" and summary["skipped_total"] == 0
    assert summary["examples"]["train"] + summary["examples"]["eval"] == 50 and summary["examples"]["eval"] > 0
    rc, _, err = _prepare(capsys, "--format", "jsonl_sft", "--input", path, "--data-dir", tmp_path / "d", "--name", "x")
    assert rc == 2 and "already prepared" in err and len(err.strip().splitlines()) == 1


def test_sft_layout_left_padded_prompt_right_padded_response(datasets, tokenizer):
    spec = _spec(datasets, "sft")
    batch = next(iter(train_dataset(spec, "train", tokenizer, global_batch=4, seed=0)))
    P, R = 16, 12
    assert batch["ids"].shape == (4, P + R) and batch["ids"].dtype == np.int32
    for ids, mask, resp, pos, seg in zip(batch["ids"], batch["mask"], batch["response_mask"], batch["positions"],
                                         batch["segment_ids"]):
        prompt_mask, response_mask = mask[:P], mask[P:]
        n_prompt, n_resp = prompt_mask.sum(), response_mask.sum()
        assert prompt_mask[P - n_prompt:].all() and not prompt_mask[:P - n_prompt].any()  # left padding
        assert response_mask[:n_resp].all() and not response_mask[n_resp:].any()  # right padding
        assert (ids[~mask] == PAD_ID).all()
        np.testing.assert_array_equal(resp, np.concatenate([np.zeros(P, bool), response_mask]))
        np.testing.assert_array_equal(pos[mask], np.arange(mask.sum()))
        np.testing.assert_array_equal(seg, mask.astype(np.int32))
        real_resp = ids[P:P + n_resp]
        if n_resp < R:
            assert real_resp[-1] == tokenizer.eos_token_id  # untruncated responses end with EOS


def test_truncation_keeps_prompt_end_and_response_start(tokenizer):
    spec = DataSection(max_prompt_tokens=4, max_response_tokens=3)
    tok = Tokenize(tokenizer, "sft", spec, 0)
    prompt, response = "one two three four five six seven", "alpha beta gamma delta"
    out = tok({"prompt": prompt.encode(), "response": response.encode()})
    full_prompt = tokenizer(prompt)["input_ids"]
    full_response = tokenizer(response, add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(out["ids"][:4], full_prompt[-4:])
    np.testing.assert_array_equal(out["ids"][4:], full_response[:3])
    assert out["truncated"]
    short = tok({"prompt": b"hi", "response": b"ok"})
    assert not short["truncated"]


def test_a_packed_example_is_the_unpacked_one_without_padding(tokenizer):
    """pack: an example's real tokens, its response tokens (the first one too: it is a target) and its cut flag
    are those of the padded layout."""
    for prompt, response in (("one two three", "alpha beta"), ("one two three four five six seven", "a")):
        example = {"prompt": prompt.encode(), "response": response.encode()}
        padded = Tokenize(tokenizer, "sft", DataSection(max_prompt_tokens=4, max_response_tokens=3), 0)(example)
        packed = Tokenize(tokenizer, "sft", DataSection(max_prompt_tokens=4, max_response_tokens=3, pack=True),
                          0)(example)
        real = padded["mask"]
        np.testing.assert_array_equal(packed["ids"], padded["ids"][real])
        np.testing.assert_array_equal(packed["response_mask"], padded["response_mask"][real])
        assert packed["response_mask"].sum() == padded["response_mask"].sum() > 0
        assert set(packed["truncated"].tolist()) == {bool(padded["truncated"])}
    assert padded["truncated"] and padded["response_mask"].sum() < 3  # the long prompt was cut, the response not


def test_a_rankings_example_is_cut_when_its_prompt_or_any_response_is(tokenizer):
    spec = DataSection(max_prompt_tokens=4, max_response_tokens=3)
    tok = Tokenize(tokenizer, "rankings", spec, 3)
    row = lambda prompt, responses: tok({"prompt": prompt.encode(), "responses": [r.encode() for r in responses],
                                         "better": [0], "worse": [1]})["truncated"]
    assert not row("hi", ["a", "b", "c"])
    assert row("one two three four five six", ["a", "b", "c"])  # the prompt
    assert row("hi", ["alpha beta gamma delta", "b", "c"])  # the first response only
    assert row("hi", ["a", "alpha beta gamma delta", "c"])


def test_a_response_cut_at_the_sampling_limit_is_trained_without_the_eos_it_never_sampled(tmp_path, tokenizer):
    """`ended: false` (the label step's samples that ran to sampling.max_new_tokens) has no EOS appended, as PPO
    scores a rollout that never ended at its last token; every other response ends with its EOS, also in a row
    that does not say (datasets written before the field), and one text seen both ways is two responses."""
    path = _write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "p", "responses": ["a b", "c d", "e"], "ranks": [0, 1, 2], "ended": [True, False, True]},
        {"prompt": "p", "responses": ["c d", "e"], "ranks": [1, 0]},
        {"prompt": "q", "chosen": "a b", "rejected": "c d"}])
    rc = data_main(["--format", "jsonl_rankings", "--input", str(path), "--data-dir", str(tmp_path / "d"),
                    "--name", "r"])
    assert rc == 0
    spec = _spec(tmp_path / "d", "r", max_response_tokens=8)
    [batch] = list(eval_batches(spec, "train", tokenizer, batch_size=2))
    eos = tokenizer.eos_token_id
    ids = tokenizer(["a b", "c d", "e"], add_special_tokens=False)["input_ids"]
    expected = {"p": [ids[0] + [eos], ids[1], ids[2] + [eos], ids[1] + [eos]], "q": [ids[0] + [eos], ids[1] + [eos]]}
    for prompt_ids, response_ids, response_mask in zip(batch["prompt_ids"], batch["response_ids"],
                                                       batch["response_mask"]):
        prompt = tokenizer.decode(prompt_ids[prompt_ids != PAD_ID])
        got = [r[m].tolist() for r, m in zip(response_ids, response_mask) if m.any()]
        assert got == expected[prompt], prompt


def test_rankings_layout_with_variable_k(datasets, tokenizer):
    spec = _spec(datasets, "rank")
    batch = next(iter(train_dataset(spec, "train", tokenizer, global_batch=8, seed=1)))
    K = 5  # the dataset's largest K (2 + i % 4)
    assert batch["response_ids"].shape == (8, K, 12) and batch["pairs"].shape == (8, K, K)
    assert batch["pairs"].dtype == np.int32 and "ranks" not in batch
    for pairs, rmask in zip(batch["pairs"], batch["response_mask"]):
        used = rmask.any(axis=1)
        k = used.sum()
        assert used[:k].all() and not used[k:].any() and k >= 2
        assert not pairs[k:].any() and not pairs[:, k:].any()
        # a full ranking of k responses (ascending or descending): every unordered pair once, in one direction
        np.testing.assert_array_equal((pairs + pairs.T)[:k, :k], 1 - np.eye(k, dtype=np.int32))
        upper = np.triu(np.ones((k, k), np.int32), 1)
        assert np.array_equal(pairs[:k, :k], upper) or np.array_equal(pairs[:k, :k], upper.T)
    for short in (3, K - 1):  # one slot short of the largest K is refused before any batch is read
        with pytest.raises(UserError, match=f"data.max_responses={short} but the dataset has prompts with {K} "):
            train_dataset(dataclasses.replace(spec, max_responses=short), "train", tokenizer, 8, 1)


def _comparison_rows():
    """Pairwise rows, several per prompt, interleaved: Q0 has a repeated pair and a contradicting one; Q1's last
    row compares a response with itself (an invalid row, skipped with --skip-invalid)."""
    rows = [{"prompt": "Q0", "chosen": "a", "rejected": "b"}, {"prompt": "Q1", "chosen": "x", "rejected": "y"},
            {"prompt": "Q0", "chosen": "a", "rejected": "b"}, {"prompt": "Q0", "chosen": "b", "rejected": "c"},
            {"prompt": "Q0", "chosen": "c", "rejected": "b"}, {"prompt": "Q1", "chosen": "y", "rejected": "y"}]
    return rows


def test_comparisons_of_a_prompt_become_one_example_with_pair_counts(capsys, tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "pairs.jsonl", _comparison_rows())
    rc, out, err = _prepare(capsys, "--format", "jsonl_rankings", "--input", path, "--data-dir", tmp_path / "d",
                            "--name", "cmp", "--skip-invalid")
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["examples"] == {"train": 2} and summary["max_responses"] == 3
    assert summary["skipped"] == {"identical_responses": 1}  # Q1's y-vs-y row
    assert {k: summary[k] for k in ("rows", "prompts", "pairs", "inconsistent_pairs", "prompts_without_pairs")} == {
        "rows": 5, "prompts": 2, "pairs": 5, "inconsistent_pairs": 1, "prompts_without_pairs": 0}
    [batch] = list(eval_batches(_spec(tmp_path / "d", "cmp"), "train", tokenizer, batch_size=2))
    assert batch["pairs"].shape == (2, 3, 3)
    np.testing.assert_array_equal(batch["pairs"][0], [[0, 2, 0], [0, 0, 1], [0, 1, 0]])  # Q0: a, b, c
    np.testing.assert_array_equal(batch["pairs"][1], [[0, 1, 0], [0, 0, 0], [0, 0, 0]])  # Q1: x, y
    np.testing.assert_array_equal(batch["response_mask"].any(-1), [[True, True, True], [True, True, False]])


def test_grouped_prompts_stay_in_one_split(tmp_path):
    from rlhf_jax.data.pipeline import open_split
    from rlhf_jax.data.prepare import prepare

    rows = [{"prompt": f"prompt {i % 40}", "chosen": f"good {i}", "rejected": f"bad {i % 3}"} for i in range(200)]
    summary = prepare("jsonl_rankings", [_write_jsonl(tmp_path / "in.jsonl", rows)], tmp_path / "d", "s",
                      eval_fraction=0.3)
    assert summary["rows"] == 200 and summary["prompts"] == 40 and summary["pairs"] == 200
    prompts, pairs = [], 0
    for split in ("train", "eval"):
        source, meta = open_split(tmp_path / "d", "s", split)
        examples = [source[i] for i in range(len(source))]
        prompts += [e["prompt"] for e in examples]
        pairs += sum(len(e["better"]) for e in examples)
        assert all(len(e["better"]) == 5 and len(e["responses"]) == 5 + 3 for e in examples)
        assert meta["examples"][split] == len(source) and meta["rankings_layout"] == "pairs"
    assert len(prompts) == len(set(prompts)) == 40 and pairs == 200  # every prompt once, in one split
    assert summary["examples"]["eval"] > 0


@pytest.mark.parametrize("damage, what", [
    ("dataset_info.json", r"Failed to load JSON"), ("metadata.json", "metadata.json names no dataset kind"),
    ("p-train.array_record-00000-of-00001", "file p-train.array_record-00000-of-00001 is missing")])
def test_a_damaged_prepared_dataset_is_one_line(tmp_path, damage, what):
    from rlhf_jax.data.pipeline import open_split
    from rlhf_jax.data.prepare import dataset_dir, prepare

    prepare("jsonl_prompts", [_write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b"}])],
            tmp_path / "d", "p")
    path = dataset_dir(tmp_path / "d", "p")
    open_split(tmp_path / "d", "p", "train")
    if damage.endswith(".json"):
        (path / damage).write_text('{"damaged' if damage == "dataset_info.json" else "{}")
    else:
        (path / damage).unlink()
    with pytest.raises(UserError, match=rf"^{path}: a damaged prepared dataset \({what}.*\); prepare it again "
                                        r"\(python -m rlhf_jax.data ... --name p --overwrite\)$"):
        open_split(tmp_path / "d", "p", "train")


def test_rankings_prepared_in_the_old_layout_must_be_prepared_again(tmp_path, tokenizer):
    from rlhf_jax.data.prepare import dataset_dir, prepare

    prepare("jsonl_rankings", [_write_jsonl(tmp_path / "in.jsonl", _comparison_rows())], tmp_path / "d", "old",
            skip_invalid=True)
    meta_path = dataset_dir(tmp_path / "d", "old") / "metadata.json"
    meta = json.loads(meta_path.read_text())
    del meta["rankings_layout"]  # what a dataset prepared before grouping by prompt looks like
    meta_path.write_text(json.dumps(meta))
    for make in (lambda spec: iter(train_dataset(spec, "train", tokenizer, 2, seed=0)),
                 lambda spec: next(eval_batches(spec, "train", tokenizer, 2))):
        with pytest.raises(UserError, match="older layout.*prepare it again") as e:
            make(_spec(tmp_path / "d", "old"))
        assert "\n" not in str(e.value) and str(dataset_dir(tmp_path / "d", "old")) in str(e.value)


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_same_seed_same_batches_and_epochs_reshuffle(datasets, tokenizer):
    spec = _spec(datasets, "prompts")
    a = _take(iter(train_dataset(spec, "train", tokenizer, 4, seed=3)), 6)
    b = _take(iter(train_dataset(spec, "train", tokenizer, 4, seed=3)), 6)
    c = _take(iter(train_dataset(spec, "train", tokenizer, 4, seed=4)), 6)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["prompt_ids"], y["prompt_ids"])
    assert any(not np.array_equal(x["prompt_ids"], z["prompt_ids"]) for x, z in zip(a, c))

    # Two epochs of one iterator, one row per batch: each epoch sees every example once, in a new order.
    from rlhf_jax.data.pipeline import open_split

    n = len(open_split(spec.dir, spec.name, "train")[0])
    one_by_one = iter(train_dataset(spec, "train", tokenizer, 1, seed=3))
    rows = [tuple(batch["prompt_ids"][0]) for batch in _take(one_by_one, 2 * n)]
    first, second = rows[:n], rows[n:]
    assert len(set(first)) == n and sorted(first) == sorted(second)
    assert first != second


def test_restored_iterator_continues_exactly(datasets, tokenizer):
    spec = _spec(datasets, "sft")
    ds = train_dataset(spec, "train", tokenizer, 4, seed=5)
    it = iter(ds)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = _take(it, 12)  # crosses an epoch boundary (32 train examples / 4)
    resumed = iter(train_dataset(spec, "train", tokenizer, 4, seed=5))
    resumed.set_state(state)
    for x, y in zip(expected, _take(resumed, 12)):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_hosts_together_see_the_global_batch_in_order(datasets, tokenizer):
    """Host h reads the h-th block of each global batch: the blocks in host order are the one-host batch, row for
    row (so sampling, which depends on a row's place in the batch, is the same for any host count), and every
    host's iterator position is the one-host position."""
    spec = _spec(datasets, "prompts")
    one = iter(train_dataset(spec, "train", tokenizer, 8, seed=2, process_index=0, process_count=1))
    hosts = [iter(train_dataset(spec, "train", tokenizer, 8, seed=2, process_index=h, process_count=2))
             for h in range(2)]
    whole, parts = _take(one, 3), [_take(it, 3) for it in hosts]
    for step in range(3):
        assert parts[0][step]["prompt_ids"].shape[0] == 4
        np.testing.assert_array_equal(np.concatenate([parts[h][step]["prompt_ids"] for h in range(2)]),
                                      whole[step]["prompt_ids"])
    assert hosts[0].get_state() == hosts[1].get_state() == one.get_state()


def test_eval_batches_split_each_global_batch_into_host_blocks(datasets, tokenizer):
    spec = _spec(datasets, "prompts")
    whole = list(eval_batches(spec, "eval", tokenizer, batch_size=4, process_index=0, process_count=1))
    parts = [list(eval_batches(spec, "eval", tokenizer, batch_size=4, process_index=h, process_count=2))
             for h in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for b, batch in enumerate(whole):
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([parts[h][b][key] for h in range(2)]), batch[key])


def test_packing_keeps_examples_apart(datasets, tokenizer):
    spec = _spec(datasets, "sft", pack=True, max_prompt_tokens=48, max_response_tokens=48)
    batch = next(iter(train_dataset(spec, "train", tokenizer, 4, seed=0)))
    assert batch["ids"].shape == (4, 96)
    assert batch["segment_ids"].max() >= 2  # at least one row holds several examples
    for seg, pos, mask, resp in zip(batch["segment_ids"], batch["positions"], batch["mask"], batch["response_mask"]):
        for s in set(seg[seg > 0].tolist()):
            np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
        assert not resp[~mask].any()


def test_packed_hosts_read_their_own_examples(datasets, tokenizer):
    """With packing each host packs its own share of the examples: two hosts' batches are not the same rows."""
    spec = _spec(datasets, "sft", pack=True, max_prompt_tokens=48, max_response_tokens=48)
    first = [next(iter(train_dataset(spec, "train", tokenizer, 4, seed=0, process_index=h, process_count=2)))
             for h in range(2)]
    rows = [{tuple(r[m].tolist()) for r, m in zip(b["ids"], b["mask"])} for b in first]
    assert first[0]["ids"].shape == (2, 96) and not rows[0] & rows[1]


def test_eval_batches_cover_the_split_once(datasets, tokenizer):
    spec = _spec(datasets, "prompts")
    batches = list(eval_batches(spec, "eval", tokenizer, batch_size=3))
    n_valid = sum(int(b["valid"].sum()) for b in batches)
    from rlhf_jax.data.pipeline import open_split

    source, meta = open_split(datasets, "prompts", "eval")
    assert n_valid == len(source) == meta["examples"]["eval"]
    assert all(b["prompt_ids"].shape == (3, 16) for b in batches)


BAD_ROWS = [
    ("jsonl_sft", '{"prompt": "p"}\n', "missing"),
    ("jsonl_sft", '{"prompt": 3, "response": "r"}\n', "prompt"),
    ("jsonl_sft", '{"prompt": "  ", "response": "r"}\n', "prompt"),
    ("jsonl_sft", '{"prompt": "p", "response": ""}\n', "response"),
    ("jsonl_rankings", '{"prompt": "p", "responses": ["a"], "ranks": [0]}\n', "responses"),
    ("jsonl_rankings", '{"prompt": "p", "responses": ["a", "b"], "ranks": [0]}\n', "ranks"),
    ("jsonl_sft", '{"prompt": "p", "response": \n', "JSON"),
]


@pytest.mark.parametrize("fmt,bad_line,fragment", BAD_ROWS)
def test_bad_row_fails_with_file_and_line_and_writes_nothing(capsys, tmp_path, fmt, bad_line, fragment):
    good = ('{"prompt": "p", "response": "r"}\n' if fmt == "jsonl_sft"
            else '{"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1]}\n')
    path = tmp_path / "in.jsonl"
    path.write_text(good + good + bad_line + good)
    rc, out, err = _prepare(capsys, "--format", fmt, "--input", path, "--data-dir", tmp_path / "d", "--name", "x")
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert f"{path}:3" in err and fragment.lower() in err.lower()
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").rglob("*.array_record*"))
    rc, out, err = _prepare(capsys, "--format", fmt, "--input", path, "--data-dir", tmp_path / "d", "--name", "x",
                            "--skip-invalid")
    assert rc == 0, err
    summary = json.loads(out)
    # the three good ranking rows share prompt "p": one example with their 3 (repeated) pairs
    assert summary["examples"]["train"] == (3 if fmt == "jsonl_sft" else 1) and summary["skipped_total"] == 1
    assert fmt == "jsonl_sft" or (summary["rows"] == 3 and summary["pairs"] == 3)


def test_invalid_utf8_is_reported(capsys, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"prompt": "p", "response": "r"}\n{"prompt": "\xff\xfe", "response": "r"}\n')
    rc, out, err = _prepare(capsys, "--format", "jsonl_sft", "--input", path, "--data-dir", tmp_path / "d",
                            "--name", "x")
    assert rc == 2 and f"{path}:2" in err and "utf-8" in err.lower()
    assert not any((tmp_path / "d").rglob("*.array_record*")) if (tmp_path / "d").exists() else True


def test_chat_template_wraps_the_prompt(tokenizer):
    tokenizer.chat_template = ("{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    try:
        tok = Tokenize(tokenizer, "prompts", DataSection(max_prompt_tokens=64, chat_template=True), 0)
        out = tok({"prompt": b"hello there"})
        expected = tokenizer("<|user|>hello there<|assistant|>", add_special_tokens=False)["input_ids"]
        np.testing.assert_array_equal(out["prompt_ids"][out["prompt_mask"]], expected)
    finally:
        tokenizer.chat_template = None
    with pytest.raises(Exception, match="no chat template"):
        Tokenize(tokenizer, "prompts", DataSection(chat_template=True), 0)


def test_a_tokenizer_without_eos_is_one_line_for_responses(tokenizer):
    eos = tokenizer.eos_token
    tokenizer.eos_token = None
    try:
        with pytest.raises(UserError, match="has no EOS token, which ends every response"):
            Tokenize(tokenizer, "rankings", DataSection(), 2)
        Tokenize(tokenizer, "prompts", DataSection(), 0)  # prompts need none
    finally:
        tokenizer.eos_token = eos
    assert tokenizer.eos_token_id is not None


def test_a_packed_row_counts_its_cut_examples():
    """Each packed example's flag repeats at its positions: the row counts examples, not positions or rows."""
    from rlhf_jax.data.pipeline import _packed_layout

    seg = np.array([1, 1, 2, 2, 2, 3, 0, 0])
    row = _packed_layout({"ids": np.arange(8), "response_mask": np.ones(8), "ids_segment_ids": seg,
                          "ids_positions": np.zeros(8), "truncated": np.array([1, 1, 0, 0, 0, 1, 0, 0])})
    assert row["truncated"] == 2


def test_the_first_prompts_are_read_up_to_the_limit(datasets):
    from rlhf_jax.data.pipeline import open_split, stored_prompts

    source, _ = open_split(str(datasets), "prompts", "train")
    every = stored_prompts(source)
    assert len(every) == len(source) > 3 and stored_prompts(source, 0) == every
    assert stored_prompts(source, 2) == every[:2] and stored_prompts(source, 10 ** 6) == every


def test_batches_that_do_not_split_over_the_hosts_and_packed_rankings_are_refused(datasets, tokenizer):
    with pytest.raises(UserError, match="global batch 10 is not divisible by 4 hosts"):
        train_dataset(_spec(datasets, "sft"), "train", tokenizer, 10, seed=0, process_index=0, process_count=4)
    with pytest.raises(UserError, match="data.pack applies to sft datasets only"):
        train_dataset(_spec(datasets, "rank", pack=True), "train", tokenizer, 8, seed=0)


def test_packed_batches_follow_the_seed_and_evaluation_reads_them_unpacked(datasets, tokenizer):
    spec = _spec(datasets, "sft", pack=True, max_prompt_tokens=48, max_response_tokens=48)
    first = lambda seed: next(iter(train_dataset(spec, "train", tokenizer, 4, seed=seed)))["ids"]
    np.testing.assert_array_equal(first(0), first(0))
    assert not np.array_equal(first(0), first(1))
    batch = next(eval_batches(spec, "eval", tokenizer, 4))  # one example per row, as unpacked training lays it out
    unpacked = next(eval_batches(dataclasses.replace(spec, pack=False), "eval", tokenizer, 4))
    assert set(batch) == set(unpacked) and "segment_ids" in batch
    for key in batch:
        np.testing.assert_array_equal(batch[key], unpacked[key])
    assert batch["ids"].shape == (4, 96) and (batch["segment_ids"] <= 1).all()


def test_the_stored_k_is_the_largest_of_either_split(tmp_path, tokenizer):
    """The prompt with the most responses held out: K counts it, so evaluation reads it (the training split alone
    has 3)."""
    from rlhf_jax.data.pipeline import open_split
    from rlhf_jax.data.prepare import prepare

    rows = [{"prompt": f"item {i}", "responses": [f"answer {j} of {i}" for j in range(5 if i == 0 else 3)],
             "ranks": list(range(5 if i == 0 else 3))} for i in range(6)]
    path = _write_jsonl(tmp_path / "r.jsonl", rows)
    prepare("jsonl_rankings", [str(path)], tmp_path / "d", "r", eval_prompts={"item 0"})
    _, metadata = open_split(str(tmp_path / "d"), "r", "eval")
    assert metadata["max_responses"] == 5
    batch = next(eval_batches(_spec(tmp_path / "d", "r"), "eval", tokenizer, 8))
    assert batch["response_ids"].shape[1] == 5 and batch["response_mask"][0].any(axis=1).sum() == 5


def test_the_eval_split_of_a_prompt_is_its_documented_hash():
    """The hash split is part of a prepared dataset's identity (docs/data.md): a prompt is held out when the 8-byte
    BLAKE2b digest of its UTF-8 text, read big-endian, is below eval_fraction x 2^64; about that share of prompts."""
    import hashlib

    from rlhf_jax.data.prepare import is_eval_prompt

    prompts = [f"prompt {i} \u00e9" for i in range(2000)]
    digest = lambda p: hashlib.blake2b(p.encode("utf-8"), digest_size=8).digest()
    expected = [p for p in prompts if int.from_bytes(digest(p), "big") < 0.25 * 2 ** 64]
    assert [p for p in prompts if is_eval_prompt(p, 0.25)] == expected
    assert 0.22 < len(expected) / len(prompts) < 0.28


def test_prepared_records_are_written_the_same_in_every_process(tmp_path):
    """Protobuf wrote each example's features (a map) in an order of the writing process's own, so the same rows
    prepared again gave other files, and a run on them would not resume (it fingerprints the dataset's files).
    Written deterministically, every record lists its features sorted by name."""
    import json

    from rlhf_jax.data.prepare import dataset_dir, prepare

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Q", "responses": ["a", "b", "c"], "ranks": [2, 0, 1]}) + "\n")
    prepare("jsonl_rankings", [str(rows)], tmp_path / "data", "ranked")
    from array_record.python.array_record_module import ArrayRecordReader

    (record_file,) = dataset_dir(tmp_path / "data", "ranked").glob("*.array_record*")
    (data,) = ArrayRecordReader(str(record_file)).read_all()
    names = ["better", "ended", "prompt", "responses", "worse"]  # each a map entry's key: field 1, its length
    offsets = [data.index(b"\n" + bytes([len(name)]) + name.encode()) for name in names]
    assert offsets == sorted(offsets), dict(zip(names, offsets))

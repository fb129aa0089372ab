"""The bundled arithmetic task: its reward checks exactly the answer's first word against the right number (brute
force over the whole table), its writers are as accurate as they claim, its data is a function of the seed, and
`stage: task` with task.name=arithmetic writes the three datasets and a base model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import safetensors.numpy

from rlhf_jax import main as main_cli
from rlhf_jax.errors import UserError
from rlhf_jax.models.tiny import build_tiny_model
from rlhf_jax.models.tokenizer import load_tokenizer
from rlhf_jax.tasks import arithmetic

from cli_helpers import run_quietly


# ------------------------------------------------------------------------------------------------ the reward


def test_answers_of_the_whole_table_match_python_arithmetic():
    table = arithmetic.problems()
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    expected = {(a, op, b) for a in range(10) for b in range(10) for op in ("plus", "minus") if op == "plus" or a >= b}
    assert set(table) == expected and len(table) == len(expected)
    for a, op, b in table:
        prompt = arithmetic.prompt_for(17, (a, op, b))
        assert prompt == f"Problem 17: {words[a]} {op} {words[b]} is"
        assert arithmetic.answer(prompt) == (a + b if op == "plus" else a - b)


def test_reward_is_one_exactly_when_the_first_word_is_the_right_number():
    """Every problem against every number word (and a few other texts), compared with a loop of its own."""
    table = arithmetic.problems()
    for a, op, b in table:
        prompt = arithmetic.prompt_for(1, (a, op, b))
        right = a + b if op == "plus" else a - b
        texts = [f" {w}." for w in arithmetic.NUMBERS] + [" ", "", f" {right}"]
        expected = [1.0 if i == right else 0.0 for i in range(len(arithmetic.NUMBERS))] + [0.0, 0.0, 0.0]
        assert arithmetic.reward([prompt] * len(texts), texts) == expected


@pytest.mark.parametrize("response, expected", [
    (" seven.", 1.0),
    (" seven", 1.0),
    ("seven", 1.0),
    (" Seven.", 1.0),  # case does not count
    (" SEVEN!", 1.0),
    (" seven. eight. nine", 1.0),  # only the first word counts
    (" seven eight", 1.0),
    ("  \n seven,", 1.0),  # leading spaces and punctuation after it
    (" seventeen.", 0.0),  # a whole word, not a prefix
    (" sevens", 0.0),
    (" eight.", 0.0),
    (" eight seven", 0.0),
    (" it is seven", 0.0),  # the first word is the answer
    (" 7", 0.0),  # words only
    (" 7 seven", 1.0),  # digits are no word, so 'seven' is the first word
    ("", 0.0),  # empty
    (" .", 0.0),
])
def test_reward_reads_the_first_word(response, expected):
    assert arithmetic.reward(["Problem 3: three plus four is"], [response]) == [expected]
    assert arithmetic.first_word(" Seven. x") == "seven" and arithmetic.first_word(" 7.") == ""


def test_reward_reads_the_last_problem_of_the_prompt():
    assert arithmetic.reward(["Problem 9: nine minus nine is", "PROBLEM 9: Nine Minus Two is ", "two plus two is"],
                             [" zero", " seven", " four"]) == [1.0, 1.0, 1.0]
    # as a GRPO run with data.chat_template decodes its prompt (the template's words after it), and a few-shot one
    assert arithmetic.reward(["user\nProblem 17: three plus four is\nassistant\n",
                              "one plus one is two. Problem 2: three minus one is"], [" seven", " two"]) == [1.0, 1.0]
    assert arithmetic.reward([], []) == [] and arithmetic.gold is arithmetic.reward
    for bad in ("Review #1 of the pizza:", "Problem 1: three plus four", "Problem 1: three times four is",
                "Problem 1: twenty plus one is", "Problem 1: one plus twenty is", "Problem 1: three plus four isle"):
        with pytest.raises(UserError, match="rlhf_jax.tasks.arithmetic: prompt .* holds no problem"):
            arithmetic.reward([bad], [" seven"])


def test_answers_above_nine_are_their_english_words():
    """The words come from the module's own list elsewhere: here each answer from 10 to 18 is written out."""
    cases = {"five plus five": "ten", "six plus five": "eleven", "six plus six": "twelve", "six plus seven": "thirteen",
             "five plus nine": "fourteen", "eight plus seven": "fifteen", "eight plus eight": "sixteen",
             "nine plus eight": "seventeen", "nine plus nine": "eighteen"}
    prompts = [f"Problem 4: {problem} is" for problem in cases]
    assert arithmetic.reward(prompts, [f" {word}." for word in cases.values()]) == [1.0] * len(cases)


def test_labeler_ranks_every_right_response_above_every_wrong_one():
    prompts = ["Problem 1: two plus two is"] * 200
    responses = [[" five.", " four.", " three", " four", " x"]] * 200
    ranks = arithmetic.label(prompts, responses, seed=0)
    assert ranks == arithmetic.label(prompts, responses, seed=0)
    for rank in ranks:
        assert sorted(rank) == [0, 1, 2, 3, 4] and {rank[1], rank[3]} == {0, 1}
    assert 0.3 < np.mean([r[1] == 0 for r in ranks]) < 0.7  # ties broken at random


# ------------------------------------------------------------------------------------------------ the writers


def _accuracy(rows: list[dict]) -> float:
    return float(np.mean(arithmetic.reward([r["prompt"] for r in rows], [r["response"] for r in rows])))


def test_the_writers_are_as_accurate_as_they_claim_and_miss_by_one_or_two():
    n = 6000
    demos, corpus = arithmetic.demonstrations(n, seed=1), arithmetic.corpus(n, seed=0)
    careful, sloppy = arithmetic.CAREFUL_SHARE, arithmetic.WRITER_ACCURACY
    for rows, claimed in ((demos, sloppy), (corpus, careful + (1 - careful) * sloppy)):
        sigma = math.sqrt(claimed * (1 - claimed) / n)
        assert abs(_accuracy(rows) - claimed) < 4 * sigma, (_accuracy(rows), claimed)
    misses = [arithmetic.VALUE[arithmetic.first_word(r["response"])] - arithmetic.answer(r["prompt"])
              for r in demos if arithmetic.reward([r["prompt"]], [r["response"]]) == [0.0]]
    assert set(misses) == {-2, -1, 1, 2}
    assert all(r["response"] == f" {arithmetic.first_word(r['response'])}." for r in demos + corpus)
    assert {arithmetic.answer(r["prompt"]) for r in demos} == set(range(19))  # every answer of the table is asked


def test_a_miss_stays_in_the_table_reflected_at_its_ends():
    """Off by one of -2, -1, 1, 2, and a miss past 0 or 18 lands as far on the other side of the answer."""
    rng = np.random.default_rng(0)
    for right, misses in ((0, {1, 2}), (1, {0, 2, 3}), (2, {0, 1, 3, 4}), (17, {15, 16, 18}), (18, {16, 17})):
        assert {arithmetic._written(rng, right, 0.0) for _ in range(400)} == misses, right


def test_prompts_go_up_to_every_number_of_every_problem(monkeypatch):
    """At most 999 prompts per problem (numbers 1..999), all of them reachable: with a table of two problems, 1998
    distinct prompts and not one more."""
    numbers = {int(r["prompt"].split()[1][:-1]) for r in arithmetic.prompts(20_000, 0)}
    assert min(numbers) == 1 and max(numbers) == 999
    monkeypatch.setattr(arithmetic, "problems", lambda: [(1, "plus", 1), (2, "minus", 1)])
    rows = arithmetic.prompts(1998, 0)
    assert len({r["prompt"] for r in rows}) == 1998
    with pytest.raises(UserError, match="task.prompts=1999: the arithmetic task has at most 1998 distinct prompts"):
        arithmetic.prompts(1999, 0)


def test_generation_is_a_function_of_the_seed():
    for generate in (arithmetic.corpus, arithmetic.demonstrations, arithmetic.prompts):
        assert generate(300, 5) == generate(300, 5) and generate(300, 5) != generate(300, 6)
    prompts = [r["prompt"] for r in arithmetic.prompts(2000, 2)]
    assert len(set(prompts)) == 2000 and all(arithmetic.answer(p) >= 0 for p in prompts)
    with pytest.raises(UserError, match="task.prompts=200000: the arithmetic task has at most 154845"):
        arithmetic.prompts(200_000, 0)


# ------------------------------------------------------------------------------------------------ the stage


def test_task_stage_writes_the_three_datasets_and_a_base_model(tmp_path):
    run_dir = tmp_path / "task"
    argv = ["stage=task", f"run_dir={run_dir}", f"data.dir={tmp_path}/data", "seed=4", "task.name=arithmetic",
            "task.corpus=300", "task.demonstrations=200", "task.prompts=100", "task.eval_fraction=0.2"]
    rc, out, err = run_quietly(main_cli.main, argv)
    assert rc == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["task"] == "arithmetic"
    for name, n in (("corpus", 300), ("demos", 200), ("prompts", 100)):
        counts = summary["datasets"][name]
        assert sum(counts.values()) == n and abs(counts["eval"] - 0.2 * n) < 4 * math.sqrt(n * 0.2 * 0.8), counts
        metadata = json.loads(next((tmp_path / "data" / name).glob("*/metadata.json")).read_text())
        assert metadata["examples"] == counts and metadata["kind"] == ("prompts" if name == "prompts" else "sft")
    written = {name: [json.loads(line) for line in (run_dir / f"{name}.jsonl").read_text().splitlines()]
               for name in ("corpus", "demos", "prompts")}
    assert written == {"corpus": arithmetic.corpus(300, 4), "demos": arithmetic.demonstrations(200, 5),
                       "prompts": arithmetic.prompts(100, 6)}  # the demonstrations are the sloppy writer's
    tokenizer = load_tokenizer(run_dir / "base_model")
    ids = tokenizer(" seventeen.")["input_ids"]
    assert tokenizer.decode(ids) == " seventeen." and len(ids) <= 3  # trained on the task's text, prompts too
    assert len(tokenizer("Problem 17: three plus four is")["input_ids"]) <= 8
    # the base model's weights are the stage's seed's
    same, other = (build_tiny_model(tmp_path / f"seed{seed}", seed=seed, corpus=[r["prompt"] + r["response"] for r in
                                                                              written["corpus"]]) for seed in (4, 5))
    weights = lambda path: safetensors.numpy.load_file(path / "model.safetensors")  # noqa: E731
    base = weights(run_dir / "base_model")
    assert all(np.array_equal(base[k], v) for k, v in weights(same).items())
    assert not all(np.array_equal(base[k], v) for k, v in weights(other).items())

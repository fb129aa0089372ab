"""A bundled task whose answers a program checks: sums and differences of small numbers written in words,
"Problem 17: three plus four is" -> " seven." `reward` marks a response 1.0 when its first word is the right
number and 0.0 otherwise, so a policy can be trained on the verified answer itself (grpo.reward_function) and
evaluated by it (eval.gold): the success rate is the mean reward.

Everything is generated from a seed, offline. The demonstrations for SFT are written by a sloppy writer, right
WRITER_ACCURACY of the time and otherwise off by one or two, so the SFT policy is right only part of the time; the
pretraining corpus mixes a careful writer's text (always right) with the sloppy writer's, so the base model has
seen every answer and a reward that checks the answers has something to bring back. The problems form a small
table (operands 0..MAX_OPERAND); the number in each prompt only makes prompts distinct, so held-out prompts (the
hash split) are new texts of problems that training prompts also ask.
"""

from __future__ import annotations

import re

import numpy as np

from rlhf_jax.errors import UserError

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen"]
VALUE = {word: value for value, word in enumerate(NUMBERS)}
MAX_OPERAND = 9  # answers of a + b then reach 18, the last word of NUMBERS
OPERATIONS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b}
WRITER_ACCURACY = 0.45  # the sloppy writer's share of right answers (the SFT demonstrations)
CAREFUL_SHARE = 0.5  # share of the pretraining corpus written by the careful writer (always right)
NEAR_MISSES = (-2, -1, 1, 2)  # the sloppy writer's errors: the answer off by one of these, kept in 0..18

# "three plus four is" at the end of a prompt: the problem a reward checks.
PROBLEM = re.compile(r"([a-z]+) (plus|minus) ([a-z]+) is\b")  # the last one is asked (a chat template may follow)
WORD = re.compile(r"[a-z]+")


def problems() -> list[tuple[int, str, int]]:
    """Every problem of the table: (a, operation, b) with a, b in 0..MAX_OPERAND and no negative difference."""
    return [(a, op, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1) for op in OPERATIONS
            if OPERATIONS[op](a, b) >= 0]


def prompt_for(number: int, problem: tuple[int, str, int]) -> str:
    """'Problem 17: three plus four is'; the number only makes prompts distinct (the hash split holds some out)."""
    a, op, b = problem
    return f"Problem {number}: {NUMBERS[a]} {op} {NUMBERS[b]} is"


def answer(prompt: str) -> int:
    """The right answer to the last problem of a prompt (a UserError for a prompt of no problem)."""
    match = ([None] + list(PROBLEM.finditer(prompt.lower())))[-1]
    if match is None or match[1] not in VALUE or match[3] not in VALUE:
        raise UserError(f"rlhf_jax.tasks.arithmetic: prompt {prompt!r} holds no problem of the task "
                        "('... three plus four is')")
    return OPERATIONS[match[2]](VALUE[match[1]], VALUE[match[3]])


def first_word(response: str) -> str:
    """The response's answer word: its first run of letters, lowercased ('' when it has none), so
    ' Seven. And more' answers 'seven' and ' 7' or ' ' answers nothing."""
    found = WORD.search(response.lower())
    return found[0] if found else ""


def reward(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 for each response whose first word (first_word) is the right answer's word, else 0.0; text after
    that word does not count. Usable as `grpo.reward_function` and `eval.gold`
    (rlhf_jax.tasks.arithmetic:reward)."""
    return [float(first_word(response) == NUMBERS[answer(prompt)]) for prompt, response in zip(prompts, responses)]


gold = reward  # the verified success is the gold score too


def label(prompts: list[str], responses: list[list[str]], seed: int) -> list[list[int]]:
    """A labeler that checks the answers (`label.labeler`): per prompt, ranks (0 = best) that put every right
    response above every wrong one, in a random order among the right ones and among the wrong ones (a labeler
    must order them; a reward model learns no preference between them on average)."""
    rng = np.random.default_rng(seed)
    ranks = []
    for prompt, texts in zip(prompts, responses):
        right = np.asarray(reward([prompt] * len(texts), texts))
        order = np.lexsort((rng.random(len(texts)), -right))  # by rightness first, then at random
        rank = np.empty(len(texts), int)
        rank[order] = np.arange(len(texts))
        ranks.append(rank.tolist())
    return ranks


def _written(rng: np.random.Generator, right: int, accuracy: float) -> int:
    """An answer as a writer right `accuracy` of the time writes it; a miss is `right` off by one of NEAR_MISSES,
    reflected to the other side when it would leave 0..18."""
    if rng.random() < accuracy:
        return right
    value = right + int(rng.choice(NEAR_MISSES))
    return value if 0 <= value < len(NUMBERS) else 2 * right - value


def _rows(n: int, seed: int, accuracy_of_row) -> list[dict]:
    rng = np.random.default_rng(seed)
    table = problems()
    rows = []
    for _ in range(n):
        a, op, b = problem = table[int(rng.integers(len(table)))]
        prompt = prompt_for(int(rng.integers(1, 1000)), problem)
        written = _written(rng, OPERATIONS[op](a, b), accuracy_of_row(rng))
        rows.append({"prompt": prompt, "response": f" {NUMBERS[written]}."})
    return rows


def corpus(n: int, seed: int) -> list[dict]:
    """Pretraining text as sft rows: each row by the careful writer (CAREFUL_SHARE of them) or the sloppy one."""
    return _rows(n, seed, lambda rng: 1.0 if rng.random() < CAREFUL_SHARE else WRITER_ACCURACY)


def demonstrations(n: int, seed: int) -> list[dict]:
    """The sloppy writer's demonstrations for SFT: right WRITER_ACCURACY of the time, otherwise a near miss."""
    return _rows(n, seed, lambda rng: WRITER_ACCURACY)


def prompts(n: int, seed: int) -> list[dict]:
    """Distinct prompts for the policy stages and (their held-out split) evaluation; at most 999 per problem."""
    rng = np.random.default_rng(seed)
    table = problems()
    if n > 999 * len(table):
        raise UserError(f"task.prompts={n}: the arithmetic task has at most {999 * len(table)} distinct prompts")
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < n:
        chosen.add((int(rng.integers(1, 1000)), int(rng.integers(len(table)))))
    return [{"prompt": prompt_for(number, table[i])} for number, i in sorted(chosen)]

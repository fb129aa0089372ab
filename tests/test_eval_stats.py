import math

import numpy as np
import pytest

from rlhf_jax.eval import stats as eval_stats


def brute_force_win_rate(policy, reference):
    outcomes = []
    for p, r in zip(policy, reference):
        outcomes.append(1.0 if p > r else 0.5 if p == r else 0.0)
    n = len(outcomes)
    mean = sum(outcomes) / n
    z = 1.959964  # Wilson score interval, written out
    center = (mean + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n))
    return outcomes, mean, [max(center - half, 0.0), min(center + half, 1.0)]


def score_table(n=200, seed=0):
    """Scores on a coarse grid, so that about a fifth of the prompts are ties."""
    rng = np.random.default_rng(seed)
    reference = rng.integers(0, 5, n) / 2.0
    policy = rng.integers(0, 6, n) / 2.0
    return policy, reference


def test_win_rate_matches_brute_force():
    policy, reference = score_table()
    outcomes, mean, ci = brute_force_win_rate(policy.tolist(), reference.tolist())
    got = eval_stats.win_rate(policy, reference)
    assert got["n"] == 200
    assert (got["wins"], got["ties"], got["losses"]) == (outcomes.count(1.0), outcomes.count(0.5),
                                                         outcomes.count(0.0))
    assert got["ties"] > 10  # the table does exercise ties
    assert got["win_rate"] == pytest.approx(mean, abs=1e-12)
    assert got["win_rate_ci"] == pytest.approx(ci, abs=1e-12)
    assert got["win_rate_ci"][0] < got["win_rate"] < got["win_rate_ci"][1]


def test_win_rate_ci_stays_in_the_unit_interval_and_honest_at_small_n():
    got = eval_stats.win_rate([1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0])
    assert got["win_rate"] == 0.875  # three wins and a tie
    assert got["win_rate_ci"] == pytest.approx(brute_force_win_rate([1, 1, 1, 0], [0, 0, 0, 0])[2])
    lo, hi = eval_stats.win_rate([2.0], [1.0])["win_rate_ci"]  # one won prompt proves little
    assert lo < 0.5 and hi == pytest.approx(1.0)
    lo, hi = eval_stats.win_rate([0.0, 0.0], [1.0, 3.0])["win_rate_ci"]
    assert lo == 0.0 and 0.5 < hi < 1.0


def test_self_against_self_is_exactly_half():
    scores = np.random.default_rng(1).normal(size=37)
    got = eval_stats.win_rate(scores, scores.copy(), same_responses=True)
    assert got["win_rate"] == 0.5
    assert got["win_rate_ci"] == [0.5, 0.5]
    assert (got["wins"], got["ties"], got["losses"], got["n"]) == (0, 37, 0, 37)
    # other responses that a coarse scorer (a 0/1 verifier) ties on every prompt: 0.5, but not a certain 0.5
    coarse = eval_stats.win_rate(np.ones(5), np.ones(5))
    assert coarse["win_rate"] == 0.5 and coarse["win_rate_ci"] == pytest.approx(eval_stats.wilson_interval(0.5, 5))
    assert coarse["win_rate_ci"][0] < 0.3


@pytest.mark.parametrize("policy,reference,match", [
    ([1.0, 2.0], [1.0], "paired"),
    ([], [], "no prompts"),
    ([[1.0]], [[1.0]], "one score per prompt"),
    ([1.0, float("nan"), float("inf")], [0.0, 0.0, float("nan")], r"3 non-finite scores \(2 policy, 1 reference\)"),
])
def test_win_rate_refuses_bad_scores(policy, reference, match):
    with pytest.raises(ValueError, match=match):
        eval_stats.win_rate(policy, reference)


def naive_kl(logp, ref, mask):
    k1, k3 = [], []
    for row_p, row_r, row_m in zip(logp, ref, mask):
        s1 = s3 = 0.0
        for p, r, m in zip(row_p, row_r, row_m):
            if m:
                d = r - p
                s1 += p - r
                s3 += math.exp(d) - 1 - d
        k1.append(s1)
        k3.append(s3)
    return k1, k3


def test_sequence_kl_matches_naive_loop():
    rng = np.random.default_rng(2)
    logp_BN = np.log(rng.uniform(0.05, 1.0, (5, 9))).astype(np.float32)
    ref_BN = np.log(rng.uniform(0.05, 1.0, (5, 9))).astype(np.float32)
    mask_BN = np.arange(9)[None, :] < np.array([9, 4, 0, 1, 7])[:, None]
    ref_BN[~mask_BN] = -np.inf  # padding may hold anything
    k1, k3 = naive_kl(logp_BN.astype(np.float64), ref_BN.astype(np.float64), mask_BN)
    got = eval_stats.sequence_kl(logp_BN, ref_BN, mask_BN.astype(np.int32))
    assert got["kl_per_sequence"] == pytest.approx(k1, abs=1e-9)
    assert got["kl_per_sequence"][2] == 0.0  # an empty response
    assert got["kl"] == pytest.approx(sum(k1) / 5, abs=1e-9)
    assert got["kl_k3"] == pytest.approx(sum(k3) / 5, abs=1e-9)
    assert got["kl_k3"] >= 0.0


def test_sequence_kl_of_identical_models_is_zero():
    logp_BN = np.log(np.full((3, 4), 0.25))
    got = eval_stats.sequence_kl(logp_BN, logp_BN, np.ones((3, 4)))
    assert got == {"kl": 0.0, "kl_k3": 0.0, "kl_per_sequence": [0.0, 0.0, 0.0]}


def test_sequence_kl_refuses_bad_input():
    with pytest.raises(ValueError, match="shapes"):
        eval_stats.sequence_kl(np.zeros((2, 3)), np.zeros((2, 4)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="no sequences"):
        eval_stats.sequence_kl(np.zeros((0, 3)), np.zeros((0, 3)), np.ones((0, 3)))
    with pytest.raises(ValueError, match="1 real tokens"):
        eval_stats.sequence_kl(np.array([[0.0, np.nan]]), np.zeros((1, 2)), np.ones((1, 2)))


def test_a_prompt_file_whose_name_holds_a_colon_is_read_as_a_file(tmp_path):
    """DIR:SPLIT names a dataset's split; an existing file of that name is a prompt file."""
    from rlhf_jax.eval.inputs import load_prompts

    path = tmp_path / "prompts:v1.txt"
    path.write_text("first\nsecond\n")
    assert load_prompts(str(path)) == (["first", "second"], [None, None])


def test_prompts_come_with_their_metadata_up_to_the_limit_from_a_dataset_or_a_jsonl_file(tmp_path):
    import json

    from rlhf_jax.data.__main__ import main as data_main
    from rlhf_jax.eval.inputs import load_prompts

    rows = [{"prompt": "one", "metadata": {"answer": 1}}, {"prompt": "two"}, {"prompt": "three", "metadata": [3]}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert data_main(["--format", "jsonl_prompts", "--input", str(tmp_path / "p.jsonl"), "--data-dir",
                      str(tmp_path), "--name", "p"]) == 0
    assert load_prompts(f"{tmp_path / 'p'}:train") == (["one", "two", "three"], [{"answer": 1}, None, [3]])
    assert load_prompts(f"{tmp_path / 'p'}:train", limit=2) == (["one", "two"], [{"answer": 1}, None])
    assert load_prompts(str(tmp_path / "p.jsonl"), limit=2) == (["one", "two"], [{"answer": 1}, None])  # the file


def test_response_stats_count_real_tokens_and_ended_rows():
    """Response length is each row's real tokens (its EOS included) averaged over rows, a row without any
    counting 0; eos_rate the share of rows that ended; the scores' mean and spread are the arrays' own."""
    from rlhf_jax.eval.evaluate import Samples, _response_stats

    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
    samples = Samples(np.zeros((3, 5), np.int32), mask, np.array([True, False, True]))
    stats = _response_stats({"samples": samples, "score": np.array([1.0, 2.0, 6.0]), "gold": np.array([0.5, 1.5, 1.0])})
    assert stats == pytest.approx({"score_mean": 3.0, "score_std": np.std([1.0, 2.0, 6.0]), "gold_score_mean": 1.0,
                                   "response_length": 8 / 3, "eos_rate": 2 / 3})
    assert _response_stats({"samples": samples})["score_mean"] is None

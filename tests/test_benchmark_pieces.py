"""The benchmark scripts run by hand (with their peers' environments), so a product change that breaks them shows
in no other test: their pieces that call the product's APIs are checked here."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import grpo  # noqa: E402  benchmarks/grpo.py


def test_the_grpo_benchmarks_rewards_go_through_the_stages_reward_function():
    rewards_fn = grpo.RewardFunction(grpo.even_token_share, "benchmarks/grpo.py:even_token_share", grpo.IdTokenizer(),
                                     (grpo.EOS,))
    prompt_ids_RP, prompt_mask_RP = np.array([[0, 7, 8], [0, 7, 8]]), np.array([[False, True, True]] * 2)
    tokens_RN = np.array([[2, 3, 4, grpo.EOS, 0], [5, 7, 6, 9, 11]])
    mask_RN = np.array([[True, True, True, True, False], [True] * 5])
    rewards = rewards_fn(prompt_ids_RP, prompt_mask_RP, tokens_RN, mask_RN)
    assert rewards_fn.problem is None
    np.testing.assert_allclose(rewards, [2 / 3, 1 / 5])  # the EOS and what follows it are not the response's
    assert rewards_fn.texts(prompt_ids_RP, prompt_mask_RP, tokens_RN, mask_RN) == (["7 8", "7 8"],
                                                                                  ["2 3 4", "5 7 6 9 11"],
                                                                                  [True, False], [None, None])

"""Statistics for comparing policies against a reference policy on the same prompts (pure numpy).

Win rates are paired per prompt: both policies answered the same prompt with the same seed, so each prompt
gives one outcome (1 win, 0.5 tie, 0 loss) and the interval is that of the mean outcome.
"""

from __future__ import annotations

import numpy as np

# Two-sided 95% quantile of the standard normal.
Z_95 = 1.959964


def win_rate(policy_scores, reference_scores, same_responses: bool = False) -> dict:
    """How often the policy's response scores higher than the reference's on the same prompt.

    Returns {"win_rate", "win_rate_ci": [lo, hi], "wins", "ties", "losses", "n"}; a tie (exactly equal scores)
    counts half. The CI is the 95% Wilson score interval of the mean outcome: it stays honest at small n and
    near 0 or 1 (one won prompt gives [0.21, 1], not a point), and when a coarse scorer ties every prompt.
    Only when the two wrote the same responses (`same_responses`: a policy against itself, exactly 0.5) is it
    the point [0.5, 0.5]. Raises ValueError for empty, mismatched or non-finite scores.
    """
    policy_B, reference_B = _paired_scores(policy_scores, reference_scores)
    outcome_B = np.where(policy_B > reference_B, 1.0, np.where(policy_B == reference_B, 0.5, 0.0))
    n = outcome_B.size
    mean = float(outcome_B.mean())
    ties = int((outcome_B == 0.5).sum())
    ci = [mean, mean] if same_responses else wilson_interval(mean, n)
    return {"win_rate": mean, "win_rate_ci": ci, "wins": int((outcome_B == 1.0).sum()), "ties": ties,
            "losses": int((outcome_B == 0.0).sum()), "n": n}


def wilson_interval(p: float, n: int, z: float = Z_95) -> list[float]:
    """Wilson score interval of a proportion p observed over n trials (ties counted half)."""
    denominator = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z / denominator * np.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n))
    return [float(max(center - half, 0.0)), float(min(center + half, 1.0))]


def _paired_scores(policy_scores, reference_scores) -> tuple[np.ndarray, np.ndarray]:
    policy_B = np.asarray(policy_scores, dtype=np.float64)
    reference_B = np.asarray(reference_scores, dtype=np.float64)
    if policy_B.ndim != 1 or reference_B.ndim != 1:
        raise ValueError(f"win rate needs one score per prompt, got shapes {policy_B.shape} and {reference_B.shape}")
    if policy_B.size != reference_B.size:
        raise ValueError(f"win rate needs paired scores, got {policy_B.size} policy and {reference_B.size} "
                         "reference scores")
    if policy_B.size == 0:
        raise ValueError("win rate of no prompts")
    # Any comparison with NaN is False, so a NaN would silently count as a loss.
    bad_policy = int((~np.isfinite(policy_B)).sum())
    bad_reference = int((~np.isfinite(reference_B)).sum())
    if bad_policy or bad_reference:
        raise ValueError(f"win rate: {bad_policy + bad_reference} non-finite scores ({bad_policy} policy, "
                         f"{bad_reference} reference) out of {policy_B.size} prompts")
    return policy_B, reference_B


def sequence_kl(logprobs_BN, ref_logprobs_BN, mask_BN) -> dict:
    """KL(policy || reference) per sequence, estimated on the policy's own samples.

    `logprobs_BN` / `ref_logprobs_BN` are the log-probabilities of the sampled tokens under each model and
    `mask_BN` marks the real (response) tokens. Per sequence it sums k1 = logp - logp_ref (unbiased, can be
    negative on one sample) and k3 = exp(d) - 1 - d with d = logp_ref - logp (unbiased and never negative).
    Returns {"kl": mean k1 sum, "kl_k3": mean k3 sum, "kl_per_sequence": list of k1 sums}. Positions outside the
    mask are ignored even when not finite (e.g. -inf at padding); a non-finite value at a real token raises.
    """
    logp_BN = np.asarray(logprobs_BN, dtype=np.float64)
    ref_BN = np.asarray(ref_logprobs_BN, dtype=np.float64)
    real_BN = np.asarray(mask_BN).astype(bool)
    if logp_BN.ndim != 2 or logp_BN.shape != ref_BN.shape or logp_BN.shape != real_BN.shape:
        raise ValueError(f"sequence KL needs equal [batch, tokens] arrays, got shapes {logp_BN.shape}, "
                         f"{ref_BN.shape} and mask {real_BN.shape}")
    if logp_BN.shape[0] == 0:
        raise ValueError("sequence KL of no sequences")
    bad = int((real_BN & ~(np.isfinite(logp_BN) & np.isfinite(ref_BN))).sum())
    if bad:
        raise ValueError(f"sequence KL: {bad} real tokens have non-finite log-probabilities")
    # Zero the padding first so that -inf there cannot turn into NaN below.
    logp_BN = np.where(real_BN, logp_BN, 0.0)
    ref_BN = np.where(real_BN, ref_BN, 0.0)
    d_BN = ref_BN - logp_BN
    k1_B = (-d_BN).sum(axis=1)
    k3_B = (np.expm1(d_BN) - d_BN).sum(axis=1)  # expm1 keeps precision when d is near 0
    return {"kl": float(k1_B.mean()), "kl_k3": float(k3_B.mean()), "kl_per_sequence": [float(v) for v in k1_B]}

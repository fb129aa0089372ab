"""Length buckets: a batch trimmed to its bucket keeps every real token where it was (prompts lose left padding,
responses right padding), and the model sees the same thing: the sampler draws the same tokens with the same
log-probs, and the SFT and ranking losses are those of the full width, to float32 rounding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from rlhf_jax.config import DataSection
from rlhf_jax.data import buckets
from rlhf_jax.models.sampling import SamplingParams, sample
from rlhf_jax.models.transformer import PAD_ID, ModelConfig, init_params, make_model
from rlhf_jax.training import steps
from test_train import data_dir, tiny, workdir  # noqa: F401

P, R, V = 40, 24, 64
CFG = ModelConfig(family="llama", vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=64, max_position_embeddings=128)
SPEC = DataSection(max_prompt_tokens=P, max_response_tokens=R, prompt_buckets=(16, 32), response_buckets=(16,))


def test_default_widths_are_powers_of_two_up_to_the_limit_and_the_smallest_fit_is_chosen():
    assert buckets.widths(300) == (64, 128, 256, 300)
    assert buckets.widths(256) == (64, 128, 256)
    assert buckets.widths(40) == (40,)  # below 64: one width (another compile would cost more than it saves)
    assert buckets.widths(40, (8, 24)) == (8, 24, 40)
    assert [buckets.fit(n, (16, 32, 40)) for n in (0, 1, 16, 17, 33, 40)] == [16, 16, 16, 32, 40, 40]


def _left(lengths, width=P, seed=0):
    rng = np.random.default_rng(seed)
    ids, mask = np.full((len(lengths), width), PAD_ID, np.int32), np.zeros((len(lengths), width), bool)
    for row, n in enumerate(lengths):
        ids[row, width - n:], mask[row, width - n:] = rng.integers(3, V, n), True
    return ids, mask


def _right(lengths, width=R, seed=1):
    ids, mask = _left(lengths, width, seed)
    return ids[:, ::-1].copy(), mask[:, ::-1].copy()


def _real_rows(ids, mask):
    return [tuple(row[m]) for row, m in zip(ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, mask.shape[-1]))]


def test_each_layout_keeps_its_real_tokens_in_the_smallest_width_and_asks_every_host():
    asked = []
    trim = buckets.Trimmer(SPEC, agree=lambda needed: asked.append(tuple(needed)) or needed)
    prompt_ids, prompt_mask = _left([5, 17, 3])
    out = trim({"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "truncated": np.zeros(3, bool)})
    assert out["prompt_ids"].shape == (3, 32) and asked[-1] == (17, 0)
    assert _real_rows(out["prompt_ids"], out["prompt_mask"]) == _real_rows(prompt_ids, prompt_mask)

    response_ids, response_mask = _right([2, 9, 4, 1, 0, 3])
    rankings = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids.reshape(3, 2, R),
                "response_mask": response_mask.reshape(3, 2, R), "pairs": np.ones((3, 2, 2), np.int32)}
    out = trim(rankings)
    assert out["response_ids"].shape == (3, 2, 16) and asked[-1] == (17, 9)
    assert _real_rows(out["response_ids"], out["response_mask"]) == _real_rows(response_ids, response_mask)
    np.testing.assert_array_equal(out["pairs"], rankings["pairs"])

    mask = np.concatenate([prompt_mask, response_mask[:3]], axis=1)
    sft = {"ids": np.concatenate([prompt_ids, response_ids[:3]], axis=1), "mask": mask,
           "response_mask": np.concatenate([np.zeros_like(prompt_mask), response_mask[:3]], axis=1),
           "positions": np.maximum(mask.cumsum(1) - 1, 0), "segment_ids": mask.astype(np.int32)}
    out = trim(sft)
    assert out["ids"].shape == (3, 32 + 16) and asked[-1] == (17, 9)
    for key in sft:  # the real tokens' ids, positions, segments and loss weights
        np.testing.assert_array_equal(out[key][out["mask"]], sft[key][sft["mask"]])
    # a host whose rows are short still pads to what the longest host needs
    wide = buckets.Trimmer(SPEC, agree=lambda needed: np.maximum(needed, [33, 20]))(sft)
    assert wide["ids"].shape == (3, 40 + 24)
    # packed sft rows are left as they are; data.pack is sft's, so a config that sets it still trims the rankings
    packed = buckets.Trimmer(dataclasses.replace(SPEC, pack=True))
    assert packed(sft)["ids"].shape == sft["ids"].shape
    assert packed(rankings)["response_ids"].shape == (3, 2, 16)


def test_a_trimmed_batch_samples_the_same_tokens_and_logprobs():
    model = make_model(CFG)
    params = init_params(model, jax.random.key(0))
    prompt_ids, prompt_mask = _left([5, 12, 3, 9])
    out = buckets.Trimmer(SPEC)({"prompt_ids": prompt_ids, "prompt_mask": prompt_mask})
    assert out["prompt_ids"].shape[1] == 16
    p = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=20, eos_ids=(1, 2))
    run = jax.jit(lambda ids, mask: sample(model, params, ids, mask, jax.random.key(3), p))
    full, short = run(prompt_ids, prompt_mask), run(out["prompt_ids"], out["prompt_mask"])
    np.testing.assert_array_equal(np.asarray(short.tokens_BN), np.asarray(full.tokens_BN))
    np.testing.assert_array_equal(np.asarray(short.mask_BN), np.asarray(full.mask_BN))
    np.testing.assert_allclose(np.asarray(short.logprobs_BN), np.asarray(full.logprobs_BN), atol=1e-6)


@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_a_trimmed_batch_has_the_full_widths_loss(head):
    model = make_model(CFG, head=head)
    params = init_params(model, jax.random.key(1))
    prompt_ids, prompt_mask = _left([5, 12, 3, 9])
    response_ids, response_mask = _right([3, 7, 1, 4, 6, 2, 5, 8])
    if head == "lm":
        mask = np.concatenate([prompt_mask, response_mask[:4]], axis=1)
        batch = {"ids": np.concatenate([prompt_ids, response_ids[:4]], axis=1), "mask": mask,
                 "response_mask": np.concatenate([np.zeros_like(prompt_mask), response_mask[:4]], axis=1),
                 "positions": np.maximum(mask.cumsum(1) - 1, 0), "segment_ids": mask.astype(np.int32)}
        loss = lambda b: steps.sft_sums(model, params, b, jnp.asarray(b["response_mask"]))["nll_sum"]
    else:
        batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
                 "response_ids": response_ids.reshape(4, 2, R), "response_mask": response_mask.reshape(4, 2, R)}
        loss = lambda b: steps.completion_rewards(model, params, b)
    trimmed = buckets.Trimmer(SPEC)(batch)
    assert max(x.shape[-1] for x in trimmed.values()) < max(x.shape[-1] for x in batch.values())
    np.testing.assert_allclose(np.asarray(jax.jit(loss)(trimmed)), np.asarray(jax.jit(loss)(batch)), rtol=1e-6,
                               atol=1e-6)


def test_an_sft_run_in_buckets_logs_the_full_widths_losses(tiny, data_dir, workdir, monkeypatch):
    """End to end: the stage trims its batches to their buckets and trains as at full width."""
    from test_train import MESH_STEPS, _mesh_args, _train_on_mesh

    widths = []
    trim = buckets.Trimmer.__call__
    monkeypatch.setattr(buckets.Trimmer, "__call__", lambda self, batch: widths.append(
        (out := trim(self, batch))["ids"].shape[1]) or out)
    args = [*_mesh_args("sft", tiny, data_dir), "data.max_prompt_tokens=40", "data.max_response_tokens=24",
            "data.prompt_buckets=[16,32]", "data.response_buckets=[16]"]
    full = _train_on_mesh([*args, "data.prompt_buckets=[]", "data.response_buckets=[]"], workdir / "full",
                          (8, 1, 1))  # below 64 tokens the default is one width
    assert set(widths) == {40 + 24}
    widths.clear()
    bucketed = _train_on_mesh(args, workdir / "bucketed", (8, 1, 1))
    assert widths and max(widths) < 40 + 24, widths
    assert len(full) == MESH_STEPS and all(abs(bucketed[s] - full[s]) <= 1e-5 for s in full), (full, bucketed)

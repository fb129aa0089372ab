"""Training objectives against brute force: the ranking loss over the enumerated pairs of K-way rankings and over
pair lists with repeats and contradictions, one forward per completion, next-token NLL against a loop, exact
gradient accumulation, and a zero learning rate."""

import itertools
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from rlhf_jax.config import OptimSection
from rlhf_jax.data.rankings import pairs_from_ranks
from rlhf_jax.models.transformer import ModelConfig, Transformer, init_params, make_model
from rlhf_jax.training import steps
from rlhf_jax.training.losses import last_token_values, next_token_nll, ranking_loss


CFG = ModelConfig(family="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=48, eos_token_ids=(1,))


def _random_rankings(rng, batch, k_max):
    """Rewards and ranks (with ties and empty slots, -1) for prompts with K in 2..k_max."""
    rewards = rng.normal(size=(batch, k_max)).astype(np.float32)
    ranks = np.full((batch, k_max), -1, np.int32)
    for b in range(batch):
        k = rng.integers(2, k_max + 1)
        ranks[b, :k] = rng.integers(0, max(2, k - 1), size=k)  # few distinct ranks: ties are common
    return rewards, ranks


def _pairs_of_ranks(ranks):
    """pairs_BKK of rankings (-1 = empty slot), through pairs_from_ranks."""
    B, K = ranks.shape
    pairs = np.zeros((B, K, K), np.int32)
    for b in range(B):
        better, worse = pairs_from_ranks(ranks[b][ranks[b] >= 0])
        np.add.at(pairs[b], (better, worse), 1)
    return pairs


def _brute_force(rewards, ranks):
    per_prompt, correct, pairs, margins = [], 0, 0, 0.0
    for r, rk in zip(rewards, ranks):
        k = int((rk >= 0).sum())
        losses = []
        for i, j in itertools.permutations(range(k), 2):
            if rk[i] < rk[j]:  # i preferred; ties give no pair
                d = float(r[i] - r[j])
                losses.append(-math.log(1 / (1 + math.exp(-d))))
                correct += d > 0
                pairs += 1
                margins += d
        if losses:
            per_prompt.append(sum(losses) / len(losses))  # one batch element, weight 1/(number of pairs)
    return float(np.mean(per_prompt)), correct / pairs, margins / pairs, len(per_prompt)


def _check_metrics(sums, expected):
    loss, acc, margin, prompts = expected
    metrics = steps.rm_metrics(sums)
    assert int(sums["prompts"]) == prompts
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]), acc, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["margin"]), margin, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_ranking_loss_equals_brute_force_enumeration(seed):
    rng = np.random.default_rng(seed)
    rewards, ranks = _random_rankings(rng, batch=7, k_max=9)
    ranks[0, :3] = [0, 0, -1] if seed % 2 else ranks[0, :3]  # sometimes a prompt whose responses all tie
    ranks[0, 2:] = -1 if seed % 2 else ranks[0, 2:]
    sums = ranking_loss(jnp.asarray(rewards), jnp.asarray(_pairs_of_ranks(ranks)))
    _check_metrics(sums, _brute_force(rewards, ranks))


def test_pairs_from_ranks_enumerates_ordered_pairs_without_ties():
    better, worse = pairs_from_ranks([2, 0, 3, 1])
    assert len(better) == 6  # a K = 4 ranking is C(4, 2) comparisons
    assert sorted(zip(better.tolist(), worse.tolist())) == [(0, 2), (1, 0), (1, 2), (1, 3), (3, 0), (3, 2)]
    better, worse = pairs_from_ranks([0, 1, 1])  # the tie between the last two gives no pair
    assert sorted(zip(better.tolist(), worse.tolist())) == [(0, 1), (0, 2)]
    assert better.dtype == worse.dtype == np.int32


def _brute_force_pair_lists(rewards, pair_lists):
    """The loss over explicit (better, worse) lists, repeats and contradictions included, by a plain loop."""
    per_prompt, correct, n, margins = [], 0, 0, 0.0
    for r, pairs in zip(rewards, pair_lists):
        if not pairs:
            continue
        losses = []
        for i, j in pairs:
            d = float(r[i] - r[j])
            losses.append(math.log1p(math.exp(-d)))
            correct += d > 0
            n += 1
            margins += d
        per_prompt.append(sum(losses) / len(losses))
    return float(np.mean(per_prompt)), correct / n, margins / n, len(per_prompt)


@pytest.mark.parametrize("seed", range(4))
def test_ranking_loss_over_pair_lists_with_repeats_and_contradictions(seed):
    rng = np.random.default_rng(seed)
    B, K = 6, 5
    rewards = rng.normal(size=(B, K)).astype(np.float32)
    pair_lists = []
    for b in range(B):
        k = rng.integers(2, K + 1)
        pairs = [tuple(rng.choice(k, 2, replace=False).tolist()) for _ in range(rng.integers(1, 8))]
        pairs += [pairs[0], pairs[0][::-1]]  # a repeated pair and a contradicting one
        pair_lists.append(pairs if b != 1 else [])  # one prompt without pairs: not counted
    pairs_BKK = np.zeros((B, K, K), np.int32)
    for b, pairs in enumerate(pair_lists):
        for i, j in pairs:
            pairs_BKK[b, i, j] += 1
    weight = np.ones(B, np.float32)
    weight[-1] = 0.0  # a padding row of an eval batch
    sums = ranking_loss(jnp.asarray(rewards), jnp.asarray(pairs_BKK), jnp.asarray(weight))
    _check_metrics(sums, _brute_force_pair_lists(rewards[:-1], pair_lists[:-1]))
    assert int(sums["pairs"]) == sum(len(p) for p in pair_lists[:-1])


def _rm_batch(rng, B=3, K=5, P=6, R=7):
    prompt_mask = np.ones((B, P), bool)
    prompt_mask[0, :2] = False
    response_mask = np.zeros((B, K, R), bool)
    ranks = np.full((B, K), -1, np.int32)
    for b in range(B):
        k = rng.integers(2, K + 1)
        ranks[b, :k] = rng.permutation(k)
        for j in range(k):
            response_mask[b, j, :rng.integers(1, R + 1)] = True
    return {"prompt_ids": rng.integers(2, 64, (B, P)).astype(np.int32), "prompt_mask": prompt_mask,
            "response_ids": rng.integers(2, 64, (B, K, R)).astype(np.int32), "response_mask": response_mask,
            "pairs": _pairs_of_ranks(ranks)}


def test_the_best_responses_are_the_rank_0_ones():
    """The reward normalisation's reference responses: each ranking's top response (several when the top ties),
    never one that won somewhere and lost elsewhere."""
    from rlhf_jax.stages.train import best_responses

    ranks = np.array([[0, 1, 2, -1], [0, 0, 1, -1], [2, 0, 1, 3]])
    expected = np.array([[True, False, False, False], [True, True, False, False], [False, True, False, False]])
    np.testing.assert_array_equal(best_responses(_pairs_of_ranks(ranks)), expected)


def test_tied_rewards_are_not_a_correct_ranking():
    """Accuracy counts a pair as right only when the preferred response scores strictly higher (ties in bf16)."""
    from rlhf_jax.training.losses import ranking_loss

    pairs = np.zeros((1, 3, 3), np.int32)
    pairs[0, 0, 1] = pairs[0, 0, 2] = 1
    sums = ranking_loss(jnp.asarray([[1.0, 1.0, 0.5]]), jnp.asarray(pairs))
    assert float(sums["correct"]) == 1.0 and float(sums["pairs"]) == 2.0
    assert float(sums["margin_sum"]) == pytest.approx(0.5)


def test_rm_eval_sums_count_the_real_rows_only():
    model = make_model(CFG, head="scalar")
    params = init_params(model, jax.random.key(8))
    batch = _rm_batch(np.random.default_rng(9), B=2)
    fn = jax.jit(lambda b: steps.rm_eval_sums(params, b, model=model))
    one = fn({**batch, "valid": np.array([True, False])})
    first = fn({**{k: v[:1] for k, v in batch.items()}, "valid": np.array([True])})
    for key in ("loss_sum", "prompts", "pairs", "correct", "margin_sum"):
        assert float(one[key]) == pytest.approx(float(first[key]), rel=1e-5), key


def test_the_rm_step_divides_by_the_prompts_that_have_pairs():
    """SGD at lr 1: the step is minus the gradient of the summed ranking loss over the prompts with a pair (a
    prompt whose K responses left no pair adds nothing, to the loss or its denominator)."""
    import optax

    model = make_model(CFG, head="scalar")
    params = init_params(model, jax.random.key(6))
    batch = _rm_batch(np.random.default_rng(7), B=4)
    batch["pairs"][2] = False
    opt = optax.sgd(1.0)
    new_state, metrics = jax.jit(lambda s, b: steps.rm_step(s, b, jax.random.key(0), {}, model=model, optimizer=opt,
                                                            schedule=optax.constant_schedule(1.0)))(
        steps.init_state(params, opt), batch)
    assert float(metrics["prompts"]) == 3
    direct = jax.jit(jax.grad(lambda p: steps.rm_sums(model, p, batch)["loss_sum"] / 3))(params)
    jax.tree.map(lambda new, old, g: np.testing.assert_allclose(new, old - g, atol=1e-6), new_state.params, params,
                 direct)


def test_one_forward_pass_per_completion(monkeypatch):
    model = make_model(CFG, head="scalar")
    params = init_params(model, jax.random.key(0))
    batch = _rm_batch(np.random.default_rng(0))
    calls = []
    original = Transformer.apply

    def counting_apply(self, variables, tokens, *args, **kwargs):
        calls.append(tokens.shape)
        return original(self, variables, tokens, *args, **kwargs)

    monkeypatch.setattr(Transformer, "apply", counting_apply)
    rewards = jax.jit(lambda p, b: steps.completion_rewards(model, p, b))(params, batch)  # counted while tracing
    B, K, R = batch["response_ids"].shape
    assert calls == [(B, batch["prompt_ids"].shape[1]), (B * K, R)]  # each prompt's pass once, then every response
    monkeypatch.setattr(Transformer, "apply", original)
    # and each reward is that of the completion scored on its own, unpadded (a few: each length compiles anew)
    for b, k in ((0, 0), (1, K - 1), (B - 1, 1)):
        ids = np.concatenate([batch["prompt_ids"][b][batch["prompt_mask"][b]],
                              batch["response_ids"][b, k][batch["response_mask"][b, k]]])[None]
        values, _ = jax.jit(model.apply)({"params": params}, ids, np.arange(ids.shape[1])[None],
                                         np.ones_like(ids, bool))
        assert batch["response_mask"][b, k].any()
        np.testing.assert_allclose(float(rewards[b, k]), float(values[0, -1]), atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 6, 128])  # 4: a remainder chunk; 128: one chunk of the whole row
def test_next_token_nll_equals_loop(chunk):
    """The chunked head + cross-entropy against a loop over every (row, position), value and gradients."""
    rng = np.random.default_rng(1)
    B, T, D, V = 3, 6, 5, 11
    hidden = rng.normal(size=(B, T, D)).astype(np.float32)
    w_DV = rng.normal(size=(D, V)).astype(np.float32)
    ids = rng.integers(0, V, (B, T))
    segments = np.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    # a mask, and weights of any size (each target's NLL scaled by its own, zeros left out)
    for weights in (rng.random((B, T)) > 0.3, np.where(rng.random((B, T)) > 0.3, rng.random((B, T)) * 2, 0.0)):
        def nll(hidden, w_DV):
            return next_token_nll(hidden, lambda x: jnp.einsum("bcd,dv->bcv", x, w_DV), jnp.asarray(ids),
                                  jnp.asarray(weights), jnp.asarray(segments), chunk)

        def loop(hidden, w_DV):
            total, count = 0.0, 0.0
            for b in range(B):
                for t in range(T - 1):
                    if weights[b, t + 1] and segments[b, t] == segments[b, t + 1]:
                        total -= float(weights[b, t + 1]) * jax.nn.log_softmax(hidden[b, t] @ w_DV)[ids[b, t + 1]]
                        count += float(weights[b, t + 1])
            return total, count

        (total, count), (exp_total, exp_count) = nll(hidden, w_DV), loop(hidden, w_DV)
        np.testing.assert_allclose(float(total), float(exp_total), rtol=1e-5)
        assert float(count) == pytest.approx(exp_count, rel=1e-6)
        # a cotangent other than 1: the loss divided by a token count, as the training steps take it
        grads = jax.grad(lambda h, w: nll(h, w)[0] / 7, argnums=(0, 1))(hidden, w_DV)
        exp_grads = jax.grad(lambda h, w: loop(h, w)[0] / 7, argnums=(0, 1))(hidden, w_DV)
        for got, expected in zip(grads, exp_grads):
            np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_next_token_nll_skips_the_head_of_chunks_without_a_target():
    """Responses after left-padded prompts, in chunks of 4 positions: the head runs (counted on the host as it
    runs) only on the chunks that hold a target, once each for value and gradient (no chunk's logits formed
    again in the backward pass), and value and gradients are those of one chunk of everything."""
    rng = np.random.default_rng(2)
    B, T, D, V, P = 3, 16, 5, 11, 9  # targets from column 9 on: positions 8.. predict them; chunks 0 and 1 skip
    hidden, w_DV = rng.normal(size=(B, T, D)).astype(np.float32), rng.normal(size=(D, V)).astype(np.float32)
    ids, segments = jnp.asarray(rng.integers(0, V, (B, T))), jnp.ones((B, T), jnp.int32)
    weights = jnp.asarray(np.arange(T)[None].repeat(B, 0) >= P)
    calls = []

    def counted(x, w):
        jax.debug.callback(lambda: calls.append(1))
        return jnp.einsum("bcd,dv->bcv", x, w)

    nll = jax.jit(jax.value_and_grad(lambda h, w, chunk: next_token_nll(h, lambda x: counted(x, w), ids, weights,
                                                                        segments, chunk)[0], argnums=(0, 1)),
                  static_argnums=2)
    total, grads = nll(hidden, w_DV, 4)
    jax.effects_barrier()
    calls_4, calls[:] = len(calls), []
    whole, whole_grads = nll(hidden, w_DV, T)
    jax.effects_barrier()
    assert len(calls) == 1 and calls_4 == 2  # one chunk of everything; 2 of the 4 chunks
    np.testing.assert_allclose(float(total), float(whole), rtol=1e-6)
    for got, expected in zip(grads, whole_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)
    assert not np.asarray(grads[0])[:, :P - 1].any() and np.asarray(grads[0])[:, P - 1:-1].all()


def test_next_token_nll_forms_no_gradient_for_a_frozen_head():
    """Differentiated by the hidden states only (a LoRA run's frozen head), the loss forms the head's logits and
    the hidden states' gradient, two matmuls, and never the head weight's gradient, the third; the hidden states'
    gradient is the same either way."""
    rng = np.random.default_rng(3)
    hidden, w_DV = rng.normal(size=(2, 8, 5)).astype(np.float32), rng.normal(size=(5, 11)).astype(np.float32)
    ids, weights, segments = rng.integers(0, 11, (2, 8)), np.ones((2, 8), bool), np.ones((2, 8), np.int32)
    loss = lambda h, w: next_token_nll(h, lambda x: jnp.einsum("bcd,dv->bcv", x, w), ids, weights, segments, 4)[0]
    both, hidden_only = jax.grad(loss, argnums=(0, 1)), jax.grad(loss, argnums=0)
    matmuls = lambda f: str(jax.make_jaxpr(f)(hidden, w_DV)).count("dot_general")
    assert (matmuls(both), matmuls(hidden_only)) == (3, 2)
    np.testing.assert_allclose(np.asarray(jax.jit(hidden_only)(hidden, w_DV)),
                               np.asarray(jax.jit(both)(hidden, w_DV)[0]), rtol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_the_lm_heads_sft_step_copies_no_weight_or_gradient_transposed(tied):
    """The head multiplies its weight in the weight's own layout, the positions flattened into one axis: the
    compiled SFT step (forward, chunked loss, backward, AdamW) holds no (D, V) array (a tied head's embedding
    transposed, which XLA's CPU backend copied every step when the head was its transpose) and no (V, B*T) one (the
    logits' gradient transposed, copied for the weight's gradient when the head was a (B, T, D) einsum). A tied
    head's loss is the untied one's with lm_head = embed.T."""
    cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": tied, "vocab_size": 72})
    model = make_model(cfg)
    params = init_params(model, jax.random.key(0))
    optimizer = steps.make_optimizer(OptimSection(lr=1e-3, schedule="constant"), 10)
    step = lambda m, p: steps.sft_step(steps.init_state(p, optimizer), batch, jax.random.key(0), {}, model=m,
                                       optimizer=optimizer, schedule=lambda _: 1e-3)
    loss = lambda m, p: step(m, p)[1]["loss"]
    batch = _sft_batch(np.random.default_rng(0))  # 8 rows of 10 positions: one chunk of the loss
    hlo = jax.jit(lambda p: step(model, p)).lower(params).compile().as_text()  # the new state: backward included
    D, V, rows = cfg.d_model, cfg.vocab_size, batch["ids"].size
    assert f"[{V},{rows}]" not in hlo
    assert (f"[{D},{V}]" in hlo) != tied  # an untied head's own weight; a tied one's transpose never
    if tied:
        untied = make_model(ModelConfig(**{**cfg.__dict__, "tie_embeddings": False}))
        untied_params = {**params, "lm_head": params["embed"].T}
        assert float(loss(model, params)) == pytest.approx(float(loss(untied, untied_params)), rel=1e-6)


def test_next_token_nll_never_holds_the_whole_logits():
    """Value and gradient at T = 256 positions in chunks of 16 need several times less temporary memory than in
    one chunk (which holds float32 logits and their gradient for every position)."""
    B, T, D, V = 4, 256, 32, 2048
    args = (jnp.zeros((B, T, D)), jnp.zeros((D, V)), jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), bool),
            jnp.ones((B, T), jnp.int32))

    def temp_bytes(chunk):
        loss = lambda h, w, *rest: next_token_nll(h, lambda x: jnp.einsum("bcd,dv->bcv", x, w), *rest, chunk)[0]
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    whole, chunked = temp_bytes(T), temp_bytes(16)
    assert whole >= B * T * V * 4 and chunked * 4 < whole, (chunked, whole)


def test_last_token_values_reads_the_last_real_token():
    values = jnp.arange(12.0).reshape(2, 6)
    mask = jnp.array([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(np.asarray(last_token_values(values, mask)), [4.0, 11.0])


def _sft_batch(rng, B=8, T=10):
    mask = np.ones((B, T), bool)
    mask[::2, :3] = False
    return {"ids": rng.integers(2, 64, (B, T)).astype(np.int32), "mask": mask,
            "response_mask": mask & (np.arange(T) >= 5), "positions": np.maximum(mask.cumsum(1) - 1, 0),
            "segment_ids": mask.astype(np.int32)}


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_gradient_accumulation_equals_one_large_batch(stage):
    rng = np.random.default_rng(2)
    head = "lm" if stage == "sft" else "scalar"
    model = make_model(CFG, head=head)
    params = init_params(model, jax.random.key(1))
    optim = OptimSection(lr=1e-2, warmup_steps=0, schedule="constant")
    batch = _sft_batch(rng) if stage == "sft" else _rm_batch(rng, B=8)
    step = steps.sft_step if stage == "sft" else steps.rm_step
    results = []
    for accum in (1, 2, 4):
        opt = steps.make_optimizer(optim, 10)
        state = steps.init_state(params, opt)
        fn = jax.jit(lambda s, b: step(s, b, jax.random.key(0), {}, model=model, optimizer=opt,
                                       schedule=steps.lr_schedule(optim, 10), accum=accum))
        new_state, metrics = fn(state, batch)
        results.append((new_state.params, float(metrics["loss"]), float(metrics["grad_norm"])))
    for p, loss, gnorm in results[1:]:
        np.testing.assert_allclose(loss, results[0][1], rtol=1e-5)
        np.testing.assert_allclose(gnorm, results[0][2], rtol=1e-4)
        # Adam moves every weight by about lr = 1e-2; summing in another order changes the last bits of a weight
        # whose gradient is near Adam's eps
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p, results[0][0])


def _packed_sft_batch(rng, B=4, T=12):
    """Rows packing two or three examples each (segments 1, 2, 3, then 0 padding), responses in each's second half."""
    segment_ids = np.zeros((B, T), np.int32)
    for row, ends in enumerate([(4, 9, 12), (6, 12), (3, 7, 10), (5, 11)]):
        for seg, (start, end) in enumerate(zip((0, *ends), ends), 1):
            segment_ids[row, start:end] = seg
    mask = segment_ids > 0
    position = np.zeros((B, T), np.int32)
    response = np.zeros((B, T), bool)
    for row in range(B):
        for seg in set(segment_ids[row]) - {0}:
            cols = np.flatnonzero(segment_ids[row] == seg)
            position[row, cols] = np.arange(len(cols))
            response[row, cols[len(cols) // 2:]] = True
    return {"ids": rng.integers(2, 64, (B, T)).astype(np.int32), "mask": mask, "response_mask": response,
            "positions": position, "segment_ids": segment_ids}


@pytest.mark.parametrize("loss_on_prompt", [False, True])
def test_the_sft_loss_of_packed_rows_is_the_mean_nll_of_their_targets(loss_on_prompt):
    """Each token of an example predicts the next one of the same example: a segment's first token is nobody's
    target and its last predicts nothing; the loss is the mean NLL over those targets (responses only, or every
    token), counted as a loop here."""
    model = make_model(CFG)
    params = init_params(model, jax.random.key(4))
    batch = _packed_sft_batch(np.random.default_rng(5))
    logp = np.asarray(jax.nn.log_softmax(model.apply({"params": params}, batch["ids"], batch["positions"],
                                                     batch["mask"], segment_ids_BT=batch["segment_ids"])[0], -1))
    weights = batch["mask"] if loss_on_prompt else batch["response_mask"]
    nll, count = 0.0, 0
    for row, t in itertools.product(range(4), range(1, 12)):
        seg = batch["segment_ids"][row]
        if weights[row, t] and seg[t] == seg[t - 1] != 0:
            nll, count = nll - logp[row, t - 1, batch["ids"][row, t]], count + 1
    optim = OptimSection(lr=1e-3, schedule="constant")
    opt = steps.make_optimizer(optim, 5)
    step = jax.jit(lambda s, b: steps.sft_step(s, b, jax.random.key(0), {}, model=model, optimizer=opt,
                                               schedule=steps.lr_schedule(optim, 5), loss_on_prompt=loss_on_prompt))
    _, metrics = step(steps.init_state(params, opt), batch)
    assert float(metrics["target_tokens"]) == count
    assert float(metrics["loss"]) == pytest.approx(nll / count, rel=1e-5)
    # the held-out sums count only the batch's real rows: a filler row (`valid` False) adds nothing
    eval_sums = lambda b: jax.jit(lambda p, b: steps.sft_eval_sums(p, b, model=model, loss_on_prompt=loss_on_prompt))(
        params, b)
    both = eval_sums({**batch, "valid": np.ones(4, bool)})
    one = eval_sums({**batch, "valid": np.array([True, False, False, False])})
    first = eval_sums({k: v[:1] for k, v in {**batch, "valid": np.ones(4, bool)}.items()})
    assert float(both["target_tokens"]) == count and float(both["nll_sum"]) == pytest.approx(nll, rel=1e-5)
    assert float(one["target_tokens"]) == float(first["target_tokens"])
    assert float(one["nll_sum"]) == pytest.approx(float(first["nll_sum"]), rel=1e-5)


def test_gradients_are_clipped_to_grad_clip_before_adamw():
    """optim.grad_clip: the optimizer is AdamW on gradients scaled down to that global norm. Adam's first step does
    not see a gradient's scale, so two steps of different norms (20 and 0.2) tell it apart from AdamW alone."""
    import optax

    params = {"w": jnp.ones((3, 4)), "scale": jnp.ones(4)}
    grads = [jax.tree.map(lambda x: x * g / np.sqrt(16.0), {"w": jnp.ones((3, 4)), "scale": jnp.ones(4)})
             for g in (20.0, 0.2)]
    optim = OptimSection(lr=0.1, schedule="constant", grad_clip=1.0, weight_decay=0.0)

    def run(opt):
        state, p = opt.init(params), params
        for g in grads:
            updates, state = opt.update(g, state, p)
            p = optax.apply_updates(p, updates)
        return p

    ours = run(steps.make_optimizer(optim, 10))
    adamw = lambda: optax.adamw(0.1, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=0.0)
    jax.tree.map(np.testing.assert_allclose, ours, run(optax.chain(optax.clip_by_global_norm(1.0), adamw())))
    unclipped = run(adamw())
    assert not np.allclose(ours["w"], unclipped["w"], rtol=1e-3)


def test_zero_learning_rate_moves_nothing():
    model = make_model(CFG)
    params = init_params(model, jax.random.key(2))
    optim = OptimSection(lr=0.0, weight_decay=0.1)
    opt = steps.make_optimizer(optim, 5)
    state = steps.init_state(params, opt)
    step = jax.jit(lambda st, b, r: steps.sft_step(st, b, r, {}, model=model, optimizer=opt,
                                                  schedule=steps.lr_schedule(optim, 5)))
    new_state, metrics = step(state, _sft_batch(np.random.default_rng(3)), jax.random.key(0))
    assert float(metrics["grad_norm"]) > 0
    jax.tree.map(np.testing.assert_array_equal, new_state.params, params)


def test_lr_schedules_warm_up_then_decay():
    for schedule in ("constant", "linear", "cosine"):
        fn = steps.lr_schedule(OptimSection(lr=1.0, warmup_steps=4, schedule=schedule), 20)
        np.testing.assert_allclose([float(fn(s)) for s in (0, 2, 4)], [0.0, 0.5, 1.0], atol=1e-6)
        end = float(fn(20))
        assert end == pytest.approx(1.0 if schedule == "constant" else 0.0, abs=1e-6)


def test_bfloat16_compute_keeps_float32_master_weights():
    optim = OptimSection(lr=1e-3, schedule="constant")
    batch = _sft_batch(np.random.default_rng(4))
    results = {}
    for dtype in ("float32", "bfloat16"):
        model = make_model(CFG, dtype=dtype)
        opt = steps.make_optimizer(optim, 5)
        state = steps.init_state(init_params(make_model(CFG), jax.random.key(3)), opt)
        step = jax.jit(lambda s, b: steps.sft_step(s, b, jax.random.key(0), {}, model=model, optimizer=opt,
                                                   schedule=steps.lr_schedule(optim, 5)))
        new_state, metrics = step(state, batch)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new_state.params))
        results[dtype] = float(metrics["loss"])
    np.testing.assert_allclose(results["bfloat16"], results["float32"], rtol=2e-2)


def test_each_micro_batch_draws_its_own_dropout_mask():
    """With gradient accumulation, the micro-batches of one step get different dropout keys (as the rows of one
    large batch get different masks): two identical micro-batches do not give twice one micro-batch's gradient."""
    params = {"w": jnp.ones((64,))}
    batch = {"x": jnp.ones((4, 64))}

    def loss_sums(p, micro, rngs):  # the gradient is the dropout draw itself
        keep = jax.random.bernoulli(rngs["dropout"], 0.5, (64,)).astype(jnp.float32)
        return jnp.sum(p["w"] * keep * micro["x"].sum(0)), ()

    rng = jax.random.key(3)
    one, _ = steps.accumulate(loss_sums, params, {"x": batch["x"][:2]}, 1, rng=rng)
    two, _ = steps.accumulate(loss_sums, params, batch, 2, rng=rng, reduce_aux=lambda aux: ())
    assert not np.array_equal(np.asarray(two["w"]), 2 * np.asarray(one["w"]))
    again, _ = steps.accumulate(loss_sums, params, batch, 2, rng=rng, reduce_aux=lambda aux: ())
    np.testing.assert_array_equal(np.asarray(two["w"]), np.asarray(again["w"]))  # the same keys on a rerun

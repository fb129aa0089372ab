"""The sampler's early exit (a while loop that stops once every row has ended) gives bitwise what the fixed-length
scan gave, and its top-p by threshold search keeps the tokens the full sort kept (bar cutoffs within float32
rounding of top_p): the scan and the sort are copied here as oracles."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from rlhf_jax.models import sampling
from rlhf_jax.models.sampling import (
    SampleOutput, SamplingParams, _filter_logits, categorical_from_uniforms, draw_uniforms, is_eos, sample)
from rlhf_jax.models.tiny import tiny_config
from rlhf_jax.models.transformer import KVCache, init_params, make_model, param_logical_axes, positions_from_mask
from rlhf_jax.runtime import sharding

VOCAB, N = 128, 16


# ---- the oracles: the sampler as it was (a scan over all N - 1 steps, top-p by a sort) ----

def _sort_filter(logits_BV, top_k, top_p):
    if top_k > 0:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        cutoff_B1 = jnp.min(jnp.where(mass_before_BV < top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return logits_BV


def _scan_draw(logits_BV, u_B2, p):
    if p.temperature == 0.0:
        token_B = jnp.argmax(logits_BV, axis=-1)
        scaled_BV = logits_BV
    else:
        scaled_BV = (logits_BV - jnp.max(logits_BV, axis=-1, keepdims=True)) / p.temperature  # the shift: as now
        token_B = categorical_from_uniforms(_sort_filter(scaled_BV, p.top_k, p.top_p), u_B2[:, 0], u_B2[:, 1])
    logprob_B = jnp.take_along_axis(jax.nn.log_softmax(scaled_BV, axis=-1), token_B[:, None], axis=-1)[:, 0]
    return token_B.astype(jnp.int32), logprob_B


def _scan_sample(model, params, prompt_ids_BP, prompt_mask_BP, rng, p):
    B, P = prompt_ids_BP.shape
    N = p.max_new_tokens
    variables = {"params": params}
    # slots for the prompt and the N - 1 tokens fed back: the sampler's cache holds no slot it never writes
    cache = KVCache.zeros(model.cfg, B, P + N - 1, model.dtype)
    key_mask_BS = jnp.concatenate([prompt_mask_BP.astype(bool), jnp.zeros((B, N - 1), bool)], axis=1)
    positions_BP = positions_from_mask(prompt_mask_BP)
    logits_B1V, cache = model.apply(variables, prompt_ids_BP, positions_BP, key_mask_BS, cache, 0, head_last=1)
    u_NB2 = draw_uniforms(rng, B, p)
    token_B, logprob_B = _scan_draw(logits_B1V[:, 0], u_NB2[0], p)
    done_B = is_eos(token_B, p.eos_ids)
    position_B = prompt_mask_BP.astype(jnp.int32).sum(-1)

    def step(carry, t):
        cache, key_mask_BS, token_B, position_B, done_B = carry
        slot = P + t
        key_mask_BS = jax.lax.dynamic_update_slice(key_mask_BS, jnp.ones((B, 1), bool), (0, slot))
        logits_B1V, cache = model.apply(variables, token_B[:, None], position_B[:, None], key_mask_BS, cache, slot)
        new_B, logprob_B = _scan_draw(logits_B1V[:, 0], u_NB2[t + 1], p)
        live_B = ~done_B
        new_B = jnp.where(live_B, new_B, p.pad_id)
        logprob_B = jnp.where(live_B, logprob_B, 0.0)
        done_B = done_B | is_eos(new_B, p.eos_ids)
        return (cache, key_mask_BS, new_B, position_B + 1, done_B), (new_B, logprob_B, live_B)

    carry = (cache, key_mask_BS, token_B, position_B, done_B)
    _, (tokens_NB, logprobs_NB, live_NB) = jax.lax.scan(step, carry, jnp.arange(N - 1))
    return SampleOutput(jnp.concatenate([token_B[:, None], tokens_NB.T], axis=1),
                        jnp.concatenate([logprob_B[:, None], logprobs_NB.T], axis=1),
                        jnp.concatenate([jnp.ones((B, 1), bool), live_NB.T], axis=1))


# ---- a tiny random model, left-padded prompts, and a model that counts its forward passes ----

@pytest.fixture(scope="module")
def tiny():
    model = make_model(tiny_config(VOCAB, eos_id=1, pad_id=0))
    return model, init_params(model, jax.random.key(0))


def _prompts(batch=4, width=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (batch, width)).astype(np.int32)
    pads = [0, 3, 7, 11, 1, 5, 9, 2][:batch]  # prompts of different lengths, left-padded
    mask = np.arange(width)[None, :] >= np.asarray(pads)[:, None]
    return np.where(mask, ids, 0), mask


class _Counting:
    """The model, counting (on the host, as they run) the forward passes: the prefill plus one per decode step."""

    def __init__(self, model):
        self.model, self.cfg, self.dtype, self.calls = model, model.cfg, model.dtype, 0
        self.scan_layers = model.scan_layers

    def apply(self, *args, **kwargs):
        jax.debug.callback(self._count)
        return self.model.apply(*args, **kwargs)

    def _count(self):
        self.calls += 1


def _assert_equal(got, want, bitwise=True):
    """Equal outputs; not `bitwise`: the same tokens and masks, log-probs to float32 rounding (a softmax over more
    masked slots sums its exponentials in another order)."""
    for name, g, w in zip(SampleOutput._fields, jax.device_get(got), jax.device_get(want)):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        if g.dtype.kind == "f" and not bitwise:
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(g.view(np.uint8) if g.dtype.kind == "f" else g,
                                          w.view(np.uint8) if w.dtype.kind == "f" else w, err_msg=name)


def _ends(out, eos_ids):
    """The column of each row's first EOS (N if none)."""
    tokens = np.asarray(out.tokens_BN)
    return [int(np.flatnonzero(np.isin(row, eos_ids))[0]) if np.isin(row, eos_ids).any() else tokens.shape[1]
            for row in tokens]


CASES = {  # name: (temperature, top_k, top_p, eos: "none" | "early" (every row ends by column 3))
    "eos_early": (1.0, 0, 1.0, "early"),
    "no_eos": (1.0, 0, 1.0, "none"),
    "greedy": (0.0, 0, 1.0, "early"),
    "top_k_top_p": (0.7, 10, 0.9, "early"),
    "top_p": (1.3, 0, 0.5, "none"),
}


@pytest.mark.parametrize("segment_min", [None, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_while_loop_equals_the_scan_and_stops_when_every_row_has_ended(tiny, case, segment_min, monkeypatch):
    """Also in decode segments (`segment_min` 4: the 15 steps in 3 loops of 5, each over the slots written by its
    end) where the oracle attends over every slot in every step."""
    if segment_min is not None:
        monkeypatch.setattr(sampling, "DECODE_SEGMENT_MIN", segment_min)
        assert sampling.decode_segments(N - 1) == [5, 10, 15]
    model, params = tiny
    temperature, top_k, top_p, eos = CASES[case]
    ids, mask = _prompts()
    p = SamplingParams(max_new_tokens=N, temperature=temperature, top_k=top_k, top_p=top_p, pad_id=-1)
    rng = jax.random.key(11)
    if eos == "early":
        # EOS ids taken from the oracle's own draws at columns 1-3: rows draw the same tokens up to their first
        # EOS whatever the EOS set, so every row now ends by column 3
        free = jax.device_get(jax.jit(lambda pr, i, m: _scan_sample(model, pr, i, m, rng, p))(params, ids, mask))
        p = SamplingParams(max_new_tokens=N, temperature=temperature, top_k=top_k, top_p=top_p, pad_id=-1,
                           eos_ids=tuple(sorted({int(t) for t in free.tokens_BN[:, 1:4].ravel()})))
    want = jax.jit(lambda pr, i, m: _scan_sample(model, pr, i, m, rng, p))(params, ids, mask)
    counting = _Counting(model)
    got = jax.jit(lambda pr, i, m: sample(counting, pr, i, m, rng, p))(params, ids, mask)
    _assert_equal(got, want, bitwise=segment_min is None)
    jax.effects_barrier()
    steps = counting.calls - 1  # less the prefill
    last_end = max(_ends(want, p.eos_ids))
    assert steps == min(last_end, N - 1)  # step t writes column t + 1: the last row's EOS column, then it stops
    if eos == "early":
        assert 1 <= steps <= 3 and (~np.asarray(want.mask_BN[:, 4:])).all()
    else:
        assert steps == N - 1


def test_one_new_token_takes_no_step(tiny):
    model, params = tiny
    ids, mask = _prompts()
    p = SamplingParams(max_new_tokens=1, temperature=1.0)
    counting = _Counting(model)
    got = jax.jit(lambda pr, i, m: sample(counting, pr, i, m, jax.random.key(2), p))(params, ids, mask)
    _assert_equal(got, jax.jit(lambda pr, i, m: _scan_sample(model, pr, i, m, jax.random.key(2), p))(params, ids, mask))
    jax.effects_barrier()
    assert counting.calls == 1


@pytest.mark.parametrize("segment_min", [None, 4])
@pytest.mark.parametrize("eos", ["early", "none"])
def test_sharded_over_8_devices_equals_the_scan(tiny, eos, segment_min, monkeypatch):
    if segment_min is not None:  # 3 decode segments, their caches grown over the mesh
        monkeypatch.setattr(sampling, "DECODE_SEGMENT_MIN", segment_min)
    model, params = tiny
    ids, mask = _prompts(batch=8, seed=3)
    mesh = sharding.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    param_sh = sharding.param_shardings(param_logical_axes(model), shapes, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    placed = sharding.place(params, param_sh)
    ids_s, mask_s = jax.device_put(ids, batch_sh), jax.device_put(mask, batch_sh)
    assert len(ids_s.sharding.device_set) == 8
    p = SamplingParams(max_new_tokens=N, temperature=0.8, top_k=20, top_p=0.95, pad_id=-1,
                       eos_ids=tuple(range(3, 60)) if eos == "early" else ())
    rng = jax.random.key(5)
    run = lambda fn: jax.jit(lambda pr, i, m: fn(model, pr, i, m, rng, p), in_shardings=(param_sh, batch_sh, batch_sh),
                             out_shardings=batch_sh)(placed, ids_s, mask_s)
    got, want = run(sample), run(_scan_sample)
    _assert_equal(got, want, bitwise=segment_min is None)
    if eos == "early":
        assert max(_ends(want, p.eos_ids)) < N - 1  # the loop had steps left to skip
    one_device = jax.jit(lambda pr, i, m: sample(model, pr, i, m, rng, p))(params, ids, mask)
    np.testing.assert_array_equal(np.asarray(got.tokens_BN), np.asarray(one_device.tokens_BN))


@pytest.mark.parametrize("scan", [False, True])
def test_a_groups_prefill_runs_once_and_the_rows_draw_what_they_drew_alone(tiny, scan):
    """Rows in runs of G sharing a prompt (`group=G`): the prefill runs on one row per run, its cache copied to the
    run's rows (a tuple per layer, or stacked over layers by a scanned model); every row draws the tokens it draws
    with its own prefill, with the same log-probs."""
    from rlhf_jax.models.layer_stack import stack_layers

    model, params = tiny
    if scan:
        model = make_model(model.cfg, scan_layers=True)
        params = stack_layers(params, model.cfg.n_layers)
    G = 3
    ids, mask = (np.repeat(x, G, axis=0) for x in _prompts())
    p = SamplingParams(max_new_tokens=N, temperature=0.9, top_k=40, pad_id=-1, eos_ids=tuple(range(3, 12)))
    run = lambda group: jax.device_get(jax.jit(lambda pr, i, m: sample(model, pr, i, m, jax.random.key(7), p, group))(
        params, ids, mask))
    alone, shared = run(1), run(G)
    np.testing.assert_array_equal(shared.tokens_BN, alone.tokens_BN)
    np.testing.assert_array_equal(shared.mask_BN, alone.mask_BN)
    np.testing.assert_allclose(shared.logprobs_BN, alone.logprobs_BN, atol=1e-5)
    rows = alone.tokens_BN.reshape(-1, G, N)
    assert any(len({tuple(r) for r in run_}) == G for run_ in rows)  # a run's rows drew different responses


# ---- top-p by threshold search against the sort ----

def _logits(kind, seed=0, batch=16, vocab=1000):
    x = np.random.default_rng(seed).normal(size=(batch, vocab)).astype(np.float32) * 3
    if kind == "ties":
        x = np.round(x * 2) / 2  # about 40 distinct values per row
    elif kind == "few_ties":
        x = np.round(x / 3).astype(np.float32)  # a handful of values, ties everywhere
    elif kind == "neg_inf":
        x[np.random.default_rng(seed + 1).random(x.shape) < 0.3] = -np.inf
    elif kind == "edges":
        x[0] = 0.5  # every logit tied
        x[1, 1:] = -np.inf  # one finite logit
        x[2, ::2] = -0.0  # -0.0 and 0.0 tie
        x[2, 1::2] = 0.0
        x[3, :500] = -np.inf
        x[3, 500:] = np.round(x[3, 500:])
        x[4] = np.where(x[4] > 0, x[4] + 1e4, x[4] - 1e4)  # far apart
    return jnp.asarray(x)


def _exact_mass_above(row):
    """(distinct values ascending, float64 mass of the logits strictly above each) of one row of logits."""
    x = row.astype(np.float64)
    p = np.exp(x - x.max())
    vals, inv = np.unique(x, return_inverse=True)
    mass = np.bincount(inv, p / p.sum(), minlength=len(vals))
    return vals, np.cumsum(mass[::-1])[::-1] - mass


TOL = 3e-7  # float32 sums of 1000 probabilities: a cutoff whose mass is this close to top_p can go either way


@pytest.mark.parametrize("kind", ["normal", "ties", "few_ties", "neg_inf", "edges"])
@pytest.mark.parametrize("top_k", [0, 50])
def test_threshold_top_p_keeps_the_sorts_tokens(kind, top_k):
    """The same kept set as the sort on every row, except (top_p near 1 only) rows where some logit's exact mass
    above is within float32 rounding of top_p: both sums round differently there, and the new one is checked
    against the exact (float64) cutoff instead."""
    filter_new, filter_sort = (jax.jit(f, static_argnums=(1, 2)) for f in (_filter_logits, _sort_filter))
    cut = False
    for seed in range(3):
        logits = filter_sort(_logits(kind, seed), top_k, 1.0)  # the top-k stage alone (-inf where dropped)
        for top_p in (0.1, 0.5, 0.9, 0.999, 0.9999999):
            got, want = np.asarray(filter_new(logits, top_k, top_p)), np.asarray(filter_sort(logits, top_k, top_p))
            top_p32, close = float(np.float32(top_p)), 0
            cut |= bool((np.isfinite(got).sum(-1) < np.isfinite(np.asarray(logits)).sum(-1)).any())
            for row in range(logits.shape[0]):
                vals, above = _exact_mass_above(np.asarray(logits[row]))
                # the new cutoff c: exact mass above c < top_p and, at the next smaller value, >= top_p (within TOL)
                i = np.searchsorted(vals, got[row][np.isfinite(got[row])].min())
                assert above[i] < top_p32 + TOL, (kind, top_k, top_p, row)
                assert i == 0 or vals[i - 1] == -np.inf or above[i - 1] >= top_p32 - TOL, (kind, top_k, top_p, row)
                if np.any(np.abs(above[np.isfinite(vals)] - top_p32) < TOL):
                    close += 1
                    continue
                np.testing.assert_array_equal(got[row], want[row], err_msg=f"{kind} {top_k} {top_p} row {row}")
            assert close == 0 if top_p <= 0.9 else close <= (4 if top_p == 0.999 else 16), (kind, top_k, top_p, close)
    assert cut, "top_p never dropped a token that top-k kept"


def test_threshold_top_p_at_a_mass_exactly_equal_to_top_p():
    """Four tokens of probability exactly 1/4 (their logits differ by less than exp resolves) at three distinct
    values: a value whose mass above equals top_p is dropped, as the sort drops it; ties at the cutoff all stay."""
    row = np.full(1000, -np.inf, np.float32)
    row[[7, 300, 301, 999]] = [2e-10, 1e-10, 1e-10, 0.0]
    logits = jnp.asarray(np.stack([row, np.roll(row, 5)]))
    for top_p, kept in [(0.25, 1), (0.2500001, 3), (0.5, 3), (0.75, 3), (0.7500001, 4)]:
        got, want = _filter_logits(logits, 0, top_p), _sort_filter(logits, 0, top_p)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(top_p))
        assert (np.isfinite(np.asarray(got)).sum(-1) == kept).all(), top_p


def test_threshold_top_p_keeps_every_token_when_the_nucleus_needs_the_least_likely():
    """A row whose top_p mass is reached only with its smallest logit keeps every token (the search starts below
    the smallest key); with top-k first, its smallest kept logit too."""
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]], jnp.float32))
    for top_k, top_p in ((0, 0.9), (0, 0.85), (3, 0.9)):
        got = np.asarray(_filter_logits(logits, top_k, top_p))
        assert np.isfinite(got).all(), (top_k, top_p, got)
        np.testing.assert_array_equal(got, np.asarray(_sort_filter(logits, top_k, top_p)))
    assert np.isfinite(np.asarray(_filter_logits(logits, 0, 0.75))).sum(-1).tolist() == [2, 2]

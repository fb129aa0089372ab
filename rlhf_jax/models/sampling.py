"""Prefill plus `lax.while_loop` decode loops over a functional KV cache, which stop once every row has ended;
static shapes throughout. A long generation decodes in segments (`decode_segments`), each a loop over a cache
that holds only the slots written by its end, so that no step reads the keys and values of slots still empty.

Prompts are left-padded so that every row's next token lands in the same cache slot; positions come from the
attention mask. Log-probs are always of the UNFILTERED logits / temperature (greedy: logits), which is what a
teacher-forced recomputation gives; top-k / top-p only restrict what is drawn.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.errors import UserError
from rlhf_jax.models.transformer import PAD_ID, KVCache, Transformer, positions_from_mask
from rlhf_jax.runtime.loops import bounded_while_loop


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    eos_ids: tuple[int, ...] = ()
    pad_id: int = PAD_ID  # fills tokens after EOS; the masks carry the truth
    vocab: int | None = None  # ids the tokenizer has (`tokenizer_vocab`); None: every row of the model's vocabulary


class SampleOutput(NamedTuple):
    tokens_BN: jax.Array  # generated ids; pad_id after the first EOS
    logprobs_BN: jax.Array  # log-prob of each token under logits / temperature; 0 where masked
    mask_BN: jax.Array  # True for real tokens (the first EOS included)


# Decode steps per segment: at least DECODE_SEGMENT_MIN, at most DECODE_SEGMENTS_MAX segments. Each segment
# compiles the decode step anew; shorter generations (the attention over their empty slots costs little) are one.
DECODE_SEGMENT_MIN = 128
DECODE_SEGMENTS_MAX = 4


class _Carry(NamedTuple):
    t: jax.Array  # decode steps taken; step t writes column t + 1
    cache: KVCache
    key_mask_BS: jax.Array
    token_B: jax.Array
    position_B: jax.Array
    done_B: jax.Array
    out: SampleOutput  # preallocated: pad_id / 0 / False where no step reaches


def tokenizer_vocab(tokenizer, cfg) -> int | None:
    """`SamplingParams.vocab` of a model (`cfg`) read with `tokenizer`: its number of ids where the model's
    vocabulary has more rows (Qwen2.5: 151,936 rows for 151,665 ids), else None."""
    n = len(tokenizer)
    return n if n < cfg.vocab_size else None


def vocab_logits(logits_xV: jax.Array, vocab: int | None) -> jax.Array:
    """-inf past the first `vocab` ids: rows a model pads its vocabulary with are no tokens, so they are never
    drawn and a sample's log-probs are over the ids it can be (sampler and scoring alike)."""
    if vocab is None or vocab >= logits_xV.shape[-1]:
        return logits_xV
    return jnp.where(jnp.arange(logits_xV.shape[-1]) < vocab, logits_xV, -jnp.inf)


def _filter_logits(logits_BV: jax.Array, top_k: int, top_p: float) -> jax.Array:
    if top_k > 0:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p < 1.0:
        # Keep the smallest prefix (by logit) whose mass reaches top_p, ties at the cutoff all kept: the cutoff is
        # the smallest logit x whose mass of strictly larger logits, M(x), is < top_p. M falls as x rises, so a
        # bisection over the logits' ordered bit patterns finds it in 32 masked sums over the vocabulary, where a
        # sort of the whole vocabulary every decode step costs far more.
        probs_BV = jax.nn.softmax(logits_BV, axis=-1)
        keys_BV = _ordered_keys(logits_BV)
        mass_above = lambda k_B: jnp.sum(jnp.where(keys_BV > k_B[:, None], probs_BV, 0.0), axis=-1)

        def halve(_, bounds):  # invariant: M(hi) < top_p, and M(lo) >= top_p unless lo is still below every key
            lo_B, hi_B = bounds
            mid_B = lo_B + (hi_B - lo_B) // 2
            below_B = mass_above(mid_B) < top_p
            return jnp.where(below_B, lo_B, mid_B), jnp.where(below_B, mid_B, hi_B)

        # M(largest key) = 0; starting lo one under the smallest key (-inf's key is far above 0: no wrap-around)
        # lets a row that needs every token keep them all. A uint32 range halves to width 1 in 32 steps.
        bounds = (jnp.min(keys_BV, axis=-1) - 1, jnp.max(keys_BV, axis=-1))
        _, hi_B = jax.lax.fori_loop(0, 32, halve, bounds)
        # no logit's key lies between hi and the cutoff (the smallest logit at or above hi): comparing with hi is
        # comparing with the cutoff
        logits_BV = jnp.where(keys_BV < hi_B[:, None], -jnp.inf, logits_BV)
    return logits_BV


def _ordered_keys(x: jax.Array) -> jax.Array:
    """uint32 keys in the order of the float32 values (-0.0 made +0.0 so that the two tie, as they compare)."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x).astype(jnp.float32), jnp.uint32)
    # negative floats: flip every bit (larger magnitude sorts lower); others: set the sign bit (above negatives)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def categorical_from_uniforms(logits_BV: jax.Array, u_block_B: jax.Array, u_within_B: jax.Array) -> jax.Array:
    """token_B: one draw per row from softmax(logits_BV) (-inf never drawn), by inverse CDF in two levels: `u_block_B`
    picks a block of about sqrt(V) tokens by its mass, `u_within_B` a token by its share of that block. Two uniforms
    per row instead of a Gumbel per logit, whose random bits cost a large part of a small decode step. One float32
    uniform for both would resolve only 2^-23 of the whole mass, so tokens below about 1e-7 would never be drawn; a
    second one resolves 2^-23 of the block's mass."""
    B, V = logits_BV.shape
    S = 1 << (((V - 1).bit_length() + 1) // 2)  # the power of two at or above sqrt(V)
    weights_BV = jnp.exp(logits_BV - jnp.max(logits_BV, axis=-1, keepdims=True))
    weights_BGS = jnp.pad(weights_BV, ((0, 0), (0, -V % S))).reshape(B, -1, S)
    block_B = _inverse_cdf(weights_BGS.sum(-1), u_block_B)
    within_BS = jnp.take_along_axis(weights_BGS, block_B[:, None, None], axis=1)[:, 0]
    token_B = _inverse_cdf(within_BS, u_within_B)
    return block_B * S + token_B


def _inverse_cdf(weights_BK: jax.Array, u_B: jax.Array) -> jax.Array:
    """index_B: the first index whose cumulative weight exceeds u x the total, never one of weight 0 (rounding at
    u near 1 falls back to the last index of positive weight)."""
    ends_BK = jnp.cumsum(weights_BK, axis=-1)
    index_B = jnp.sum(ends_BK <= (u_B * ends_BK[:, -1])[:, None], axis=-1)
    last_B = jnp.max(jnp.where(weights_BK > 0, jnp.arange(weights_BK.shape[1]), 0), axis=-1)
    return jnp.minimum(index_B, last_B)


def _draw(logits_BV: jax.Array, u_B2: jax.Array, p: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """(token_B, logprob_B) from one step's float32 logits and its two uniforms per row (`draw_uniforms`)."""
    logits_BV = vocab_logits(logits_BV, p.vocab)
    if p.temperature == 0.0:
        token_B = jnp.argmax(logits_BV, axis=-1)
        scaled_BV = logits_BV
    else:
        # shifted first: at a tiny temperature the top token stays exactly at 0 (exp 1), however large the rest
        scaled_BV = (logits_BV - jnp.max(logits_BV, axis=-1, keepdims=True)) / p.temperature
        token_B = categorical_from_uniforms(_filter_logits(scaled_BV, p.top_k, p.top_p), u_B2[:, 0], u_B2[:, 1])
    logprob_B = jnp.take_along_axis(jax.nn.log_softmax(scaled_BV, axis=-1), token_B[:, None], axis=-1)[:, 0]
    return token_B.astype(jnp.int32), logprob_B


def draw_uniforms(rng: jax.Array, B: int, p: SamplingParams) -> jax.Array:
    """u_NB2: the uniforms of every decode step, drawn before the loop (random bits inside it cost several small
    loops per step); step t reads row t, so a loop that stops early draws the same tokens up to there."""
    return jax.random.uniform(rng, (p.max_new_tokens, B, 2), jnp.float32)


def is_eos(token_B: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    """Whether each token (any shape) is one of the EOS ids."""
    if not eos_ids:
        return jnp.zeros(token_B.shape, bool)
    return jnp.any(token_B[..., None] == jnp.asarray(eos_ids, jnp.int32), axis=-1)


def decode_segments(steps: int) -> list[int]:
    """The decode step count at which each segment ends, for a generation of `steps` decode steps (the new tokens
    after the first, which the prefill draws): as many segments of equal length as fit DECODE_SEGMENT_MIN steps
    each, at most DECODE_SEGMENTS_MAX; [] for none."""
    n = min(DECODE_SEGMENTS_MAX, max(1, steps // DECODE_SEGMENT_MIN))
    return [-(-steps * i // n) for i in range(1, n + 1)] if steps else []


def _grow(carry: _Carry, slots: int) -> _Carry:
    """The carry with its cache and key mask padded with empty slots to `slots` (keys' slots are their last axis,
    values' and the mask's their second to last)."""
    pad = lambda x, axis: jnp.pad(x, [(0, slots - x.shape[axis]) if a == x.ndim + axis else (0, 0)
                                      for a in range(x.ndim)])
    cache = KVCache(jax.tree.map(lambda k: pad(k, -1), carry.cache.k),
                    jax.tree.map(lambda v: pad(v, -2), carry.cache.v))
    return carry._replace(cache=cache, key_mask_BS=pad(carry.key_mask_BS, -1))


def sample(model: Transformer, params, prompt_ids_BP: jax.Array, prompt_mask_BP: jax.Array, rng: jax.Array,
           p: SamplingParams, group: int = 1) -> SampleOutput:
    """Generate `p.max_new_tokens` tokens after left-padded prompts. Pure; call it under jit. `group` > 1: the
    rows come in runs of `group` consecutive rows with the same prompt (GRPO's samples of one prompt), whose
    prefill runs once per run, its cache then copied to the run's rows."""
    B, P = prompt_ids_BP.shape
    N = p.max_new_tokens
    if p.top_k > model.cfg.vocab_size:
        raise UserError(f"sampling.top_k={p.top_k} exceeds the model's vocabulary of {model.cfg.vocab_size} tokens")
    variables = {"params": params}
    ends = decode_segments(N - 1)
    slots = P + (ends[0] if ends else 0)  # step t writes slot P + t
    key_mask_BS = jnp.concatenate([prompt_mask_BP.astype(bool), jnp.zeros((B, slots - P), bool)], axis=1)
    positions_BP = positions_from_mask(prompt_mask_BP)
    cache = KVCache.zeros(model.cfg, B // group, slots, model.dtype, stacked=model.scan_layers)
    logits_B1V, cache = model.apply(variables, prompt_ids_BP[::group], positions_BP[::group], key_mask_BS[::group],
                                    cache, 0, head_last=1)
    if group > 1:  # per prompt -> per row; a cache array holds its rows at axis -4 (after a stacked layer axis)
        logits_B1V = jnp.repeat(logits_B1V, group, axis=0)
        cache = jax.tree.map(lambda x: jnp.repeat(x, group, axis=x.ndim - 4), cache)

    u_NB2 = draw_uniforms(rng, B, p)
    token_B, logprob_B = _draw(logits_B1V[:, 0], u_NB2[0], p)
    done_B = is_eos(token_B, p.eos_ids)
    position_B = prompt_mask_BP.astype(jnp.int32).sum(-1)  # where the first new token sits

    # Column 0 is the prefill's draw; the rest stay pad_id / 0 / False unless a step writes them, which is what
    # a step of a row that has ended would write.
    out = SampleOutput(jnp.full((B, N), p.pad_id, token_B.dtype).at[:, 0].set(token_B),
                       jnp.zeros((B, N), logprob_B.dtype).at[:, 0].set(logprob_B),
                       jnp.zeros((B, N), bool).at[:, 0].set(True))

    def step(carry: _Carry) -> _Carry:
        slot = P + carry.t
        key_mask_BS = jax.lax.dynamic_update_slice(carry.key_mask_BS, jnp.ones((B, 1), bool), (0, slot))
        logits_B1V, cache = model.apply(variables, carry.token_B[:, None], carry.position_B[:, None], key_mask_BS,
                                        carry.cache, slot)
        token_B, logprob_B = _draw(logits_B1V[:, 0], u_NB2[carry.t + 1], p)
        live_B = ~carry.done_B
        token_B = jnp.where(live_B, token_B, p.pad_id)
        logprob_B = jnp.where(live_B, logprob_B, 0.0)
        done_B = carry.done_B | is_eos(token_B, p.eos_ids)
        write = lambda buf_BN, x_B: jax.lax.dynamic_update_slice(buf_BN, x_B[:, None].astype(buf_BN.dtype),
                                                                 (0, carry.t + 1))
        out = SampleOutput(*map(write, carry.out, (token_B, logprob_B, live_B)))
        return _Carry(carry.t + 1, cache, key_mask_BS, token_B, carry.position_B + 1, done_B, out)

    carry = _Carry(jnp.zeros((), jnp.int32), cache, key_mask_BS, token_B, position_B, done_B, out)
    for start, end in zip([0] + ends, ends):
        # once every row has ended the remaining steps would write nothing
        running = lambda carry, end=end: (carry.t < end) & ~jnp.all(carry.done_B)
        carry = bounded_while_loop(running, step, _grow(carry, P + end), end - start)
    return carry.out


def response_logits(model: Transformer, params, prompt_ids_BP, prompt_mask_BP, tokens_BN, mask_BN,
                    temperature: float = 1.0, rngs=None, vocab: int | None = None) -> jax.Array:
    """`vocab_logits` / temperature of every response token (what the sampler drew from), from one teacher-forced
    pass over [left-padded prompt | right-padded response]; the LM head runs only on the positions that
    predict response tokens (and the last one)."""
    ids_BT = jnp.concatenate([prompt_ids_BP, tokens_BN], axis=1)
    mask_BT = jnp.concatenate([prompt_mask_BP.astype(bool), mask_BN.astype(bool)], axis=1)
    N = tokens_BN.shape[1]
    # the head on positions P-1 .. T-1 (N + 1 of them); the last predicts nothing of the response
    logits_BMV, _ = model.apply({"params": params}, ids_BT, positions_from_mask(mask_BT), mask_BT, head_last=N + 1,
                                rngs=rngs)
    return vocab_logits(logits_BMV[:, :-1], vocab) / (temperature if temperature > 0 else 1.0)


def teacher_forced_logprobs(model: Transformer, params, prompt_ids_BP, prompt_mask_BP, tokens_BN, mask_BN,
                            temperature: float = 1.0, vocab: int | None = None) -> jax.Array:
    """Log-probs of given response tokens under logits / temperature over the first `vocab` ids (0 at padding)."""
    logits_BNV = response_logits(model, params, prompt_ids_BP, prompt_mask_BP, tokens_BN, mask_BN, temperature,
                                 vocab=vocab)
    logprobs_BN = jnp.take_along_axis(jax.nn.log_softmax(logits_BNV, -1), tokens_BN[..., None], -1)[..., 0]
    return jnp.where(mask_BN, logprobs_BN, 0.0)

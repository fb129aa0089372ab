"""The PPO math of stage 3 against naive loops: GAE against a float64 loop, the score at exactly the last real
token, nothing from padding, the no-EOS penalty, KL estimators, whitening over real tokens only, the clipped
policy and value losses (and their gradients) token by token, exact micro-batch accumulation, the adaptive KL
controller, explained variance and entropy. Every function runs eagerly and under jit."""

import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from rlhf_jax.rl import ppo_math as P

B, N = 6, 9
EOS_AT = [0, 3, 5, N - 1, None, 2]  # index of the first EOS per row; None: the response never ended


def _mask(eos_at=EOS_AT, n=N):
    """Right-padded response mask: real up to and including the first EOS; all real with no EOS."""
    m = np.zeros((len(eos_at), n), bool)
    for b, e in enumerate(eos_at):
        m[b, : n if e is None else e + 1] = True
    return m


def _garbage(x, mask, value):
    """x with every padding position overwritten, to prove padding is never read."""
    return np.where(mask, x, np.float32(value)).astype(np.float32)


@pytest.fixture(params=["eager", "jit"])
def jit(request):
    """Runs a function as is or jitted (static arguments by name)."""
    if request.param == "eager":
        return lambda f, **_: f
    return lambda f, static=(): jax.jit(f, static_argnames=static)


# --- GAE -------------------------------------------------------------------------------------------------------

def _gae_loop(rewards, values, mask, gamma, lam):
    """Textbook GAE per row in float64 Python: the episode is the real tokens; V after the last one is 0."""
    adv = np.zeros(rewards.shape, np.float64)
    for b in range(rewards.shape[0]):
        T = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(T)):
            next_v = float(values[b, t + 1]) if t + 1 < T else 0.0
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            last = delta + gamma * lam * last
            adv[b, t] = last
    ret = np.where(mask, adv + values.astype(np.float64), 0.0)
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.5, 0.7)])
def test_gae_matches_a_float64_loop(gamma, lam, jit):
    rng = np.random.default_rng(0)
    mask = _mask()
    rewards = rng.normal(size=(B, N)).astype(np.float32)
    values = rng.normal(size=(B, N)).astype(np.float32)
    adv_ref, ret_ref = _gae_loop(rewards, values, mask, gamma, lam)
    f = jit(P.gae, static=("gamma", "lam"))
    # garbage at padding (huge, inf, nan) must change nothing
    for pad in (0.0, 1e30, np.inf, np.nan):
        adv, ret = f(_garbage(rewards, mask, pad), _garbage(values, mask, -pad), mask, gamma=gamma, lam=lam)
        np.testing.assert_allclose(adv, adv_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret, ret_ref, rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(adv)[~mask] == 0) and np.all(np.asarray(ret)[~mask] == 0)
    # returns are advantages + values, taken before any whitening of the advantages
    np.testing.assert_allclose(np.asarray(ret)[mask], (np.asarray(adv) + values)[mask], rtol=1e-6, atol=1e-6)


def test_gae_last_real_token_bootstraps_from_zero():
    """A single reward at the last real token with V = 0: the advantage at t is (gamma lam)^(T-1-t) * score,
    and a nonzero value after the last real token (padding) is never bootstrapped from."""
    mask = _mask([3], n=6)
    rewards = np.zeros((1, 6), np.float32)
    rewards[0, 3] = 2.0
    values = np.zeros((1, 6), np.float32)
    values[0, 4:] = 100.0  # padding
    adv, ret = P.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    np.testing.assert_allclose(adv[0], [2 * 0.45 ** 3, 2 * 0.45 ** 2, 2 * 0.45, 2.0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(ret, adv)


# --- where the score lands, EOS and padding --------------------------------------------------------------------

@pytest.mark.parametrize("eos_at", [0, 1, 4, N - 2, N - 1, None])
def test_score_lands_on_exactly_the_last_real_token(eos_at, jit):
    mask = _mask([eos_at, None, 0])
    expected_last = N - 1 if eos_at is None else eos_at
    last = jit(P.last_token_index)(mask)
    np.testing.assert_array_equal(last, [expected_last, N - 1, 0])
    scores = np.array([3.0, -5.0, 7.0], np.float32)
    rewards = np.asarray(jit(P.token_rewards)(scores, np.zeros((3, N), np.float32), mask, 0.1))
    for b, idx in enumerate([expected_last, N - 1, 0]):
        expected = np.zeros(N, np.float32)
        expected[idx] = scores[b]
        np.testing.assert_array_equal(rewards[b], expected)


def test_row_without_real_tokens_gets_no_score():
    mask = np.zeros((2, N), bool)
    mask[1, :3] = True
    np.testing.assert_array_equal(P.last_token_index(mask), [-1, 2])
    rewards = np.asarray(P.token_rewards(np.array([9.0, 1.0], np.float32), np.ones((2, N), np.float32), mask, 0.5))
    np.testing.assert_array_equal(rewards[0], 0.0)
    np.testing.assert_allclose(rewards[1], [-0.5, -0.5, 0.5] + [0.0] * (N - 3))


def test_token_rewards_against_a_loop(jit):
    rng = np.random.default_rng(1)
    mask = _mask()
    kl = rng.normal(size=(B, N)).astype(np.float32)
    scores = rng.normal(size=B).astype(np.float32)
    beta = 0.07
    expected = np.zeros((B, N), np.float64)
    for b in range(B):
        T = int(mask[b].sum())
        for t in range(T):
            expected[b, t] = -beta * kl[b, t] + (scores[b] if t == T - 1 else 0.0)
    out = jit(P.token_rewards)(scores, _garbage(kl, mask, np.nan), mask, jnp.float32(beta))
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_tokens_after_eos_carry_nothing(jit):
    """Padding log-probs, values and rewards set to garbage: no KL, reward, advantage or return there, and the
    real positions are identical to a run with clean padding."""
    rng = np.random.default_rng(2)
    mask = _mask()
    logp = -rng.exponential(size=(B, N)).astype(np.float32)
    ref = -rng.exponential(size=(B, N)).astype(np.float32)
    values = rng.normal(size=(B, N)).astype(np.float32)
    scores = rng.normal(size=B).astype(np.float32)

    def pipeline(logp, ref, values, estimator):
        kl = P.kl_per_token(logp, ref, mask, estimator)
        rewards = P.token_rewards(scores, kl, mask, 0.05)
        adv, ret = P.gae(rewards, values, mask, 1.0, 0.95)
        return kl, rewards, adv, ret

    f = jit(pipeline, static=("estimator",))
    for estimator in ("k1", "k3"):
        clean = f(logp, ref, values, estimator)
        dirty = f(_garbage(logp, mask, -1e30), _garbage(ref, mask, 50.0), _garbage(values, mask, np.nan),
                  estimator)
        for c, d in zip(clean, dirty):
            assert np.all(np.asarray(d)[~mask] == 0)
            np.testing.assert_array_equal(c, d)


@pytest.mark.parametrize("penalty", [None, -1.0, 0.0, 3.5])
def test_no_eos_penalty_applies_exactly_when_there_is_no_eos(penalty, jit):
    scores = np.array([0.3, -2.0, 1.5, 4.0], np.float32)
    ended = np.array([True, False, True, False])
    out = np.asarray(jit(P.score_with_eos_penalty, static=("penalty",))(scores, ended, penalty=penalty))
    for b in range(4):
        assert out[b] == (scores[b] if penalty is None or ended[b] else np.float32(penalty))


# --- KL estimators ---------------------------------------------------------------------------------------------

def test_kl_estimators_against_hand_formulas(jit):
    rng = np.random.default_rng(3)
    mask = _mask()
    logp = (-rng.exponential(3.0, size=(B, N))).astype(np.float32)
    ref = (-rng.exponential(3.0, size=(B, N))).astype(np.float32)
    f = jit(P.kl_per_token, static=("estimator",))
    k1 = np.asarray(f(logp, ref, mask, estimator="k1"))
    k3 = np.asarray(f(logp, ref, mask, estimator="k3"))
    for b in range(B):
        for t in range(N):
            if not mask[b, t]:
                assert k1[b, t] == 0 and k3[b, t] == 0
                continue
            lp, lr = float(logp[b, t]), float(ref[b, t])
            r = math.exp(lr - lp)  # p_ref / p
            assert k1[b, t] == pytest.approx(lp - lr, rel=1e-5, abs=1e-6)
            assert k3[b, t] == pytest.approx((r - 1) - math.log(r), rel=1e-5, abs=1e-6)
    assert np.all(k3 >= 0)
    assert np.any(k1 < 0)  # k1 is negative on some tokens: the test would catch an abs() or a swap
    # k3 is exactly 0 when the policies agree, and stays >= 0 for tiny differences (no cancellation)
    tiny = logp + np.float32(1e-7)
    assert np.all(np.asarray(f(logp, logp, mask, estimator="k3")) == 0)
    assert np.all(np.asarray(f(tiny, logp, mask, estimator="k3")) >= 0)
    with pytest.raises(ValueError, match="k2"):
        P.kl_per_token(logp, ref, mask, "k2")


# --- whitening -------------------------------------------------------------------------------------------------

def test_masked_mean_and_var_against_numpy(jit):
    rng = np.random.default_rng(4)
    mask = _mask()
    x = rng.normal(2.0, 3.0, size=(B, N)).astype(np.float32)
    real = x[mask].astype(np.float64)
    xg = _garbage(x, mask, 1e30)
    assert float(jit(P.masked_mean)(xg, mask)) == pytest.approx(real.mean(), rel=1e-5)
    assert float(jit(P.masked_var)(xg, mask)) == pytest.approx(real.var(), rel=1e-5)
    assert float(jit(P.masked_var, static=("unbiased",))(xg, mask, unbiased=True)) == pytest.approx(
        real.var(ddof=1), rel=1e-5)
    assert float(P.masked_mean(xg, mask, denominator=100.0)) == pytest.approx(real.sum() / 100, rel=1e-5)
    assert float(P.masked_mean(xg, np.zeros_like(mask))) == 0.0


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_uses_real_tokens_only(shift_mean, jit):
    rng = np.random.default_rng(5)
    mask = _mask()
    x = rng.normal(2.0, 3.0, size=(B, N)).astype(np.float32)
    real = x[mask].astype(np.float64)
    expected = (real - real.mean()) / math.sqrt(real.var() + 1e-8) + (0.0 if shift_mean else real.mean())
    f = jit(P.whiten, static=("shift_mean",))
    for pad in (0.0, 1e30, -1e30, np.inf, np.nan):
        out = np.asarray(f(_garbage(x, mask, pad), mask, shift_mean=shift_mean))
        np.testing.assert_allclose(out[mask], expected, rtol=1e-5, atol=1e-5)
        assert np.all(out[~mask] == 0)
    # reward scaling (shift_mean=False): unit variance, the mean kept; whitening: mean 0 too
    assert out[mask].std() == pytest.approx(1.0, rel=1e-4)
    assert out[mask].mean() == pytest.approx(0.0 if shift_mean else real.mean(), abs=1e-4)


# --- policy loss -----------------------------------------------------------------------------------------------

def _policy_loop(logp, old, adv, mask, eps):
    """Per-token float64 loss, its derivative w.r.t. logp, and the stats."""
    n = int(mask.sum())
    loss, grad, clipped, sq, ratios = 0.0, np.zeros(logp.shape), 0, 0.0, []
    for b, t in zip(*np.nonzero(mask)):
        d = float(logp[b, t]) - float(old[b, t])
        r = math.exp(d)
        a = float(adv[b, t])
        u, c = -a * r, -a * min(max(r, 1 - eps), 1 + eps)
        loss += max(u, c) / n
        if c > u:
            clipped += 1  # the clipped term wins: constant in logp, no gradient
        else:
            grad[b, t] = -a * r / n  # d(-a exp(logp - old)) / dlogp
        sq += d * d
        ratios.append(r)
    return loss, grad, {"approx_kl": 0.5 * sq / n, "clip_frac": clipped / n, "ratio_max": max(ratios),
                        "ratio_min": min(ratios)}


def _policy_inputs(seed, spread=0.4):
    rng = np.random.default_rng(seed)
    mask = _mask()
    old = -rng.exponential(2.0, size=(B, N)).astype(np.float32)
    logp = (old + rng.normal(0.0, spread, size=(B, N))).astype(np.float32)
    adv = rng.normal(size=(B, N)).astype(np.float32)
    return logp, old, adv, mask


def test_ratio_is_exactly_one_on_the_first_minibatch(jit):
    logp, _, adv, mask = _policy_inputs(6)
    loss, stats = jit(P.policy_loss)(_garbage(logp, mask, np.inf), logp, adv, mask, 0.2)
    assert float(stats["ratio_max"]) == 1.0 and float(stats["ratio_min"]) == 1.0
    assert float(stats["clip_frac"]) == 0.0 and float(stats["approx_kl"]) == 0.0
    assert float(loss) == pytest.approx(-adv[mask].mean(), rel=1e-5)


@pytest.mark.parametrize("eps", [0.1, 0.2])
def test_policy_loss_and_gradient_against_a_token_loop(eps, jit):
    logp, old, adv, mask = _policy_inputs(7)
    loss_ref, grad_ref, stats_ref = _policy_loop(logp, old, adv, mask, eps)
    assert 0 < stats_ref["clip_frac"] < 1  # clipped and unclipped tokens both present

    def f(logp, old, adv, mask):
        return P.policy_loss(logp, old, adv, mask, eps)

    g = jit(jax.value_and_grad(f, has_aux=True))
    (loss, stats), grad = g(_garbage(logp, mask, np.inf), _garbage(old, mask, -np.inf), adv, mask)
    assert float(loss) == pytest.approx(loss_ref, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-5, atol=1e-7)
    for k, v in stats_ref.items():
        assert float(stats[k]) == pytest.approx(v, rel=1e-5, abs=1e-7), k


def test_policy_and_value_loss_accumulate_exactly_over_micro_batches(jit):
    """With denominator = the minibatch's real-token count, micro-batch losses, gradients and mean stats add up
    to those of the whole minibatch; ratio_max/min combine by max/min."""
    logp, old, adv, mask = _policy_inputs(8)
    rng = np.random.default_rng(8)
    values, old_values, returns = (rng.normal(size=(B, N)).astype(np.float32) for _ in range(3))

    def total(logp, values, lo, hi, denominator):
        s = slice(lo, hi)
        pl, ps = P.policy_loss(logp[s], old[s], adv[s], mask[s], 0.2, denominator)
        vl, vs = P.value_loss(values[s], old_values[s], returns[s], mask[s], 0.2, denominator)
        return pl + 0.1 * vl, {**ps, **vs}

    g = jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True), static=("lo", "hi"))
    (full, full_stats), full_grads = g(logp, values, lo=0, hi=B, denominator=None)
    denominator = jnp.float32(mask.sum())
    parts = [g(logp, values, lo=lo, hi=lo + 2, denominator=denominator) for lo in range(0, B, 2)]
    assert sum(float(p[0][0]) for p in parts) == pytest.approx(float(full), rel=1e-5)
    for i in range(2):
        np.testing.assert_allclose(sum(np.asarray(p[1][i]) for p in parts), full_grads[i], rtol=1e-5, atol=1e-7)
    for k in ("approx_kl", "clip_frac", "value_clip_frac"):
        assert sum(float(p[0][1][k]) for p in parts) == pytest.approx(float(full_stats[k]), rel=1e-5, abs=1e-7)
    assert max(float(p[0][1]["ratio_max"]) for p in parts) == float(full_stats["ratio_max"])
    assert min(float(p[0][1]["ratio_min"]) for p in parts) == float(full_stats["ratio_min"])


# --- value loss ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("clip", [0.05, 0.2])
def test_value_loss_clipping_against_a_loop(clip, jit):
    rng = np.random.default_rng(9)
    mask = _mask()
    old = rng.normal(size=(B, N)).astype(np.float32)
    values = (old + rng.normal(0.0, 0.3, size=(B, N))).astype(np.float32)
    returns = rng.normal(size=(B, N)).astype(np.float32)
    n = int(mask.sum())
    loss_ref, grad_ref, clipped = 0.0, np.zeros((B, N)), 0
    for b, t in zip(*np.nonzero(mask)):
        v, vo, r = float(values[b, t]), float(old[b, t]), float(returns[b, t])
        vc = min(max(v, vo - clip), vo + clip)
        u, c = (v - r) ** 2, (vc - r) ** 2
        loss_ref += 0.5 * max(u, c) / n
        if c > u:
            clipped += 1
            grad_ref[b, t] = (v - r) / n if vo - clip < v < vo + clip else 0.0
        else:
            grad_ref[b, t] = (v - r) / n
    assert 0 < clipped < n

    def f(values, old, returns, mask):
        return P.value_loss(values, old, returns, mask, clip)

    (loss, stats), grad = jit(jax.value_and_grad(f, has_aux=True))(
        _garbage(values, mask, 1e30), _garbage(old, mask, np.nan), _garbage(returns, mask, -1e30), mask)
    assert float(loss) == pytest.approx(loss_ref, rel=1e-5)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-5, atol=1e-7)
    assert float(stats["value_clip_frac"]) == pytest.approx(clipped / n, rel=1e-6)


def test_explained_variance(jit):
    rng = np.random.default_rng(10)
    mask = _mask()
    returns = rng.normal(size=(B, N)).astype(np.float32)
    ev = jit(P.explained_variance)
    assert float(ev(_garbage(returns, mask, 1e30), returns, mask)) == pytest.approx(1.0, abs=1e-6)
    mean_guess = np.full((B, N), returns[mask].mean(), np.float32)
    assert float(ev(mean_guess, returns, mask)) == pytest.approx(0.0, abs=1e-5)
    values = rng.normal(size=(B, N)).astype(np.float32)
    r, v = returns[mask].astype(np.float64), values[mask].astype(np.float64)
    assert float(ev(values, _garbage(returns, mask, np.nan), mask)) == pytest.approx(1 - np.var(r - v) / np.var(r),
                                                                                    rel=1e-5)
    assert float(ev(values, np.ones((B, N), np.float32), mask)) == 0.0  # constant returns: no nan


# --- entropy ---------------------------------------------------------------------------------------------------

def test_entropy(jit):
    V = 11
    mask = _mask()
    ent = jit(P.entropy_from_logits)
    # uniform: log V, whatever the logits at padding
    logits = np.full((B, N, V), 3.0, np.float32)
    logits[~mask] = np.random.default_rng(11).normal(size=(int((~mask).sum()), V)) * 50
    assert float(ent(logits, mask)) == pytest.approx(math.log(V), rel=1e-6)
    # random, with -inf (masked vocabulary) entries, against a loop
    logits = np.random.default_rng(12).normal(0.0, 2.0, size=(B, N, V)).astype(np.float32)
    logits[..., -3:] = -np.inf
    total = 0.0
    for b, t in zip(*np.nonzero(mask)):
        z = logits[b, t, :-3].astype(np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        total -= float(np.sum(p * np.log(p)))
    assert float(ent(logits, mask)) == pytest.approx(total / mask.sum(), rel=1e-5)
    grad = jax.grad(P.entropy_from_logits)(jnp.asarray(logits), mask)
    assert np.all(np.isfinite(grad))
    # a one-hot distribution has entropy 0
    one_hot = np.broadcast_to(np.where(np.arange(V) == 2, 0.0, -np.inf), (B, N, V)).astype(np.float32)
    assert float(ent(one_hot, mask)) == 0.0


# --- adaptive KL controller ------------------------------------------------------------------------------------

def test_adaptive_kl_controller_follows_its_formula(jit):
    target, horizon, n = 6.0, 10000.0, 512
    update = jit(lambda c, kl: c.update(kl, target, horizon, n))
    ctl = P.KLController.create(0.15)
    beta = 0.15
    for kl in (6.0, 7.0, 5.5, 100.0, 0.0, 6.9, 4.9, -3.0):
        ctl = update(ctl, jnp.float32(kl))
        beta *= 1 + min(max(kl / target - 1, -0.2), 0.2) * n / horizon
        assert ctl.beta.dtype == jnp.float32
        assert float(ctl.beta) == pytest.approx(beta, rel=1e-6)
    # the error is clipped at +-0.2
    assert float(P.update_beta(1.0, 1e6, target, horizon, n)) == pytest.approx(1 + 0.2 * n / horizon, rel=1e-6)
    assert float(P.update_beta(1.0, 0.0, target, horizon, n)) == pytest.approx(1 - 0.2 * n / horizon, rel=1e-6)
    assert float(P.update_beta(1.0, 6.6, target, horizon, n)) == pytest.approx(1 + 0.1 * n / horizon, rel=1e-5)


@pytest.mark.parametrize("target", [None, 0.0])
def test_fixed_kl_coefficient(target):
    ctl = P.KLController.create(0.05)
    for kl in (0.0, 3.0, 1e4):
        ctl = ctl.update(jnp.float32(kl), target, 10000.0, 512)
    assert float(ctl.beta) == np.float32(0.05)
    leaves = jax.tree_util.tree_leaves(ctl)
    assert len(leaves) == 1 and leaves[0].dtype == jnp.float32

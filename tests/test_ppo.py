"""One PPO iteration as one compiled program on tiny random models: the first minibatch's ratio is exactly 1,
a learning rate of 0 moves nothing, one compilation serves every iteration, tokens after EOS carry nothing, and
1 device and a mesh of 8 agree."""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import main as main_cli
from rlhf_jax.config import OptimSection, PPOSection
from rlhf_jax.data.prepare import dataset_dir
from rlhf_jax.models.checkpoint import TrainCheckpoints, model_fingerprint
from rlhf_jax.models.sampling import SamplingParams
from rlhf_jax.models.transformer import PAD_ID, ModelConfig, init_params, make_model
from rlhf_jax.rl import ppo
from rlhf_jax.runtime import sharding
from rlhf_jax.runtime.clock import LapClock
from rlhf_jax.stages import ppo as ppo_stage
from rlhf_jax.stages.policy_common import rollout_sampling
from rlhf_jax.training import state as training_state, steps

from cli_helpers import run_quietly
from compile_helpers import subprocess_env


CFG = ModelConfig(family="llama", vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=64, max_position_embeddings=64, eos_token_ids=(1,))
B, P, N = 8, 6, 8


class PPO(NamedTuple):
    """An iteration's static parts as the tests vary them: models (with optimizers and sampling), settings and
    the runtime; `replace` routes each field to its part."""

    models: ppo.PPOModels
    settings: ppo.PPOSettings
    runtime: ppo.Runtime = ppo.Runtime()

    def replace(self, **changes) -> "PPO":
        parts = {}
        for name, part in (("models", self.models), ("settings", self.settings), ("runtime", self.runtime)):
            mine = {k: v for k, v in changes.items() if k in {f.name for f in dataclasses.fields(part)}}
            parts[name] = dataclasses.replace(part, **mine)
        return PPO(**parts)

    @property
    def kw(self) -> dict:
        return {"models": self.models, "settings": self.settings, "runtime": self.runtime}

    def __getattr__(self, name):  # models.policy, models.sampling, ...
        return getattr(self.models, name)


def _models(lr: float = 1e-3, **ppo_kw) -> PPO:
    optim = OptimSection(lr=lr, schedule="constant", grad_clip=1.0)
    return PPO(ppo.PPOModels(policy=make_model(CFG), value=make_model(CFG, "scalar"), reward=make_model(CFG, "scalar"),
                             policy_opt=steps.make_optimizer(optim, 100), value_opt=steps.make_optimizer(optim, 100),
                             sampling=SamplingParams(N, temperature=0.7, eos_ids=(1,), pad_id=PAD_ID)),
               ppo.PPOSettings(**{"minibatches": 2, "epochs": 2, **ppo_kw}, reward_gain=2.0, reward_bias=-0.5))


def _setup(models: PPO, seed: int = 0):
    policy = init_params(models.policy, jax.random.key(seed))
    reward = init_params(models.reward, jax.random.key(seed + 1))
    state = ppo.init_state(policy, reward, models.models, models.settings, jax.random.key(seed + 2))
    # Copies: the state is donated, so the frozen trees must not share its buffers.
    frozen = ppo.Frozen(ref_params=jax.tree.map(jnp.copy, policy), reward_params=jax.tree.map(jnp.copy, reward))
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, P + 1, B)
    mask = np.arange(P)[None, :] >= (P - lengths)[:, None]
    ids = np.where(mask, rng.integers(2, CFG.vocab_size, (B, P)), PAD_ID).astype(np.int32)
    return state, frozen, jnp.asarray(ids), jnp.asarray(mask)


def _copy(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def test_first_minibatch_ratio_is_exactly_one_and_metrics_are_finite():
    models = _models()
    state, frozen, ids, mask = _setup(models)
    step = jax.jit(lambda s, f, i, m: ppo.iteration(s, f, i, m, **models.kw))
    state, metrics = step(state, frozen, ids, mask)
    metrics = {k: float(v) for k, v in metrics.items()}
    assert metrics["first_ratio_max"] == 1.0 and metrics["first_ratio_min"] == 1.0, metrics
    assert metrics["first_clip_frac"] == 0.0
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    assert 1 <= metrics["response_length"] <= N and 0 <= metrics["eos_rate"] <= 1
    assert abs(metrics["kl"]) < 1e-5  # the reference is the policy itself before the update
    assert metrics["beta"] == pytest.approx(0.02)
    assert int(state.policy.step) == int(state.value.step) == 4  # 2 epochs x 2 minibatches


def test_learning_rate_zero_moves_nothing():
    models = _models(lr=0.0)
    state, frozen, ids, mask = _setup(models)
    before_policy, before_value = _copy(state.policy.params), _copy(state.value.params)
    state, _ = jax.jit(lambda s, f, i, m: ppo.iteration(s, f, i, m, **models.kw))(state, frozen, ids, mask)
    for before, after in ((before_policy, state.policy.params), (before_value, state.value.params)):
        for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
            np.testing.assert_array_equal(x, np.asarray(y))


def _timed_iterations(models: PPO, n: int = 3):
    """(state, metrics of the last, laps of each, wall seconds of each) of n iterations of one jitted program."""
    state, frozen, ids, mask = _setup(models)
    step = jax.jit(lambda s, f, i, m: ppo.iteration(s, f, i, m, **models.kw), donate_argnums=0)
    laps, walls = [], []
    for _ in range(n):
        began = time.perf_counter()
        state, metrics = step(state, frozen, ids, mask)
        jax.block_until_ready(metrics)
        walls.append(time.perf_counter() - began)
        laps.append((float(metrics["rollout_s"]), float(metrics["update_s"])))
    assert step._cache_size() == 1
    return state, metrics, laps, walls


def test_one_compilation_serves_every_iteration_and_the_laps_time_each_phase():
    """With the lap clock on, as in the stage: one compilation, the state moves, and the laps read inside the
    program are positive and fit in each iteration's wall time (their speed is the benchmark's business)."""
    models = _models(epochs=2).replace(clock=LapClock())
    start = _copy(_setup(models)[0].policy.params)
    state, metrics, laps, walls = _timed_iterations(models)
    moved = [not np.array_equal(x, np.asarray(y)) for x, y in zip(jax.tree.leaves(start),
                                                                  jax.tree.leaves(state.policy.params))]
    assert any(moved)
    assert float(metrics["kl"]) != 0.0  # the policy has left the reference
    assert all(0 < r and 0 < u and r + u <= wall for (r, u), wall in zip(laps, walls)), (laps, walls)


def _rollout(models, state, frozen, ids, mask, rng=9):
    return jax.jit(lambda s, f, i, m, r: ppo.rollout(s, f, i, m, r, models.models, models.settings)[:3])(
        state, frozen, ids, mask, jax.random.key(rng))


def _forced_logprobs(models, params, batch):
    from rlhf_jax.models.sampling import teacher_forced_logprobs

    return np.asarray(teacher_forced_logprobs(models.policy, params, batch.prompt_ids_BP, batch.prompt_mask_BP,
                                              batch.tokens_BN, batch.mask_BN, models.sampling.temperature))


def _raw_last_token_scores(models, params, batch, upto=None):
    """The reward model's raw head at the last real token of [prompt | response[:upto]], row by row."""
    tokens, mask = np.asarray(batch.tokens_BN)[:, :upto], np.asarray(batch.mask_BN)[:, :upto]
    ids = np.concatenate([np.asarray(batch.prompt_ids_BP), tokens], 1)
    real = np.concatenate([np.asarray(batch.prompt_mask_BP), mask], 1)
    values = np.asarray(jax.jit(lambda p, i, m: models.reward.apply(
        {"params": p}, i, jnp.maximum(jnp.cumsum(m, 1) - 1, 0), m)[0])(params, ids, real))
    last = real.shape[1] - 1 - np.argmax(real[:, ::-1], axis=1)
    return values[np.arange(len(values)), last]


# The rollout checks share two compiled rollouts that between them cover every setting they check: a reward model
# normalised with gain 2 and bias 20, a value model with the same normalisation (as when initialised from it), the
# no-EOS penalty (-3) with EOS ids 1..8 so that some rows end and some do not, a reference that differs from the
# policy, and the k1 estimator with raw rewards or the k3 estimator with whitened rewards.
ROLLOUT_VARIANTS = {"k1": {"kl_estimator": "k1", "whiten_rewards": False},
                    "k3, whitened": {"kl_estimator": "k3", "whiten_rewards": True}}
EOS_IDS = tuple(range(1, 9))


class Rolled(NamedTuple):
    models: PPO
    state: ppo.PPOState
    frozen: ppo.Frozen
    batch: ppo.Rollout
    kl_B: np.ndarray
    scores_B: np.ndarray
    mismatch: float


@functools.cache
def _rolled(variant: str) -> Rolled:
    models = _models(no_eos_penalty=-3.0, **ROLLOUT_VARIANTS[variant]).replace(
        reward_gain=2.0, reward_bias=20.0, value_gain=2.0, value_bias=20.0, samples=B,
        sampling=SamplingParams(N, temperature=0.7, eos_ids=EOS_IDS, pad_id=PAD_ID))
    state, frozen, ids, mask = _setup(models, seed=6)
    frozen = frozen._replace(ref_params=jax.tree.map(lambda x: x * 1.3, frozen.ref_params))
    batch, kl_B, stats = _rollout(models, state, frozen, ids, mask)
    return Rolled(models, state, frozen, batch, np.asarray(kl_B), np.asarray(stats["samples"]["score"]),
                  float(stats["logprob_mismatch"]))


@pytest.mark.parametrize("variant", ROLLOUT_VARIANTS)
def test_the_value_model_from_the_reward_model_starts_at_normalised_scores(variant):
    """At initialisation (value = reward model, whose normalisation is gain 2, bias 20) the rollout's old value
    at response position t is the normalised RM score of the prefix that ends just before token t: the value
    is read at the right position and in the units of the returns."""
    r = _rolled(variant)
    old_values, real = np.asarray(r.batch.old_values_BN), np.asarray(r.batch.mask_BN)
    for t in range(N):
        expected = 2.0 * _raw_last_token_scores(r.models, r.frozen.reward_params, r.batch, upto=t) + 20.0
        np.testing.assert_allclose(old_values[real[:, t], t], expected[real[:, t]], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("variant", ROLLOUT_VARIANTS)
def test_scores_are_normalised_and_the_no_eos_penalty_replaces_them(variant):
    """Rows that ended score gain x (RM head at their last token) + bias; rows that never ended score exactly
    ppo.no_eos_penalty, in those normalised units."""
    r = _rolled(variant)
    tokens, real = np.asarray(r.batch.tokens_BN), np.asarray(r.batch.mask_BN)
    ended = np.any(real & np.isin(tokens, EOS_IDS), axis=1)
    assert 0 < ended.sum() < B, ended  # both kinds of rows
    expected = 2.0 * _raw_last_token_scores(r.models, r.frozen.reward_params, r.batch) + 20.0
    np.testing.assert_allclose(r.scores_B[ended], expected[ended], rtol=1e-5)
    np.testing.assert_array_equal(r.scores_B[~ended], -3.0)


@pytest.mark.parametrize("variant", ROLLOUT_VARIANTS)
def test_rollout_kl_uses_the_configured_estimator_and_logprob_mismatch_is_rounding(variant):
    """Against a reference that differs from the policy: the rollout's per-sequence KL is the sum over real
    tokens of k1 = logp - logp_ref or of k3 = expm1(d) - d (d = logp_ref - logp), from teacher-forced log-probs
    at the sampling temperature; the sampler's own log-probs agree with the training forward (float32)."""
    r = _rolled(variant)
    logp = _forced_logprobs(r.models, r.state.policy.params, r.batch)
    d = _forced_logprobs(r.models, r.frozen.ref_params, r.batch) - logp
    per_token = -d if r.models.settings.kl_estimator == "k1" else np.expm1(d) - d
    expected = np.where(np.asarray(r.batch.mask_BN), per_token, 0.0).sum(1)
    np.testing.assert_allclose(r.kl_B, expected, rtol=1e-4, atol=1e-5)
    assert 0 <= r.mismatch < 1e-5


@pytest.mark.parametrize("variant", ROLLOUT_VARIANTS)
def test_rollout_advantages_follow_a_plain_loop_with_whitened_rewards(variant):
    """ppo.whiten_rewards at the iteration level: rewards (-beta x KL per token, the score at the last real token)
    scaled to unit variance over real tokens with their mean kept when whitened, then GAE (gamma 1, lambda 0.95)
    in a plain loop; returns = advantages + values; advantages whitened after."""
    r = _rolled(variant)
    real = np.asarray(r.batch.mask_BN)
    d = _forced_logprobs(r.models, r.frozen.ref_params, r.batch) - _forced_logprobs(r.models, r.state.policy.params,
                                                                                   r.batch)
    kl = -d if r.models.settings.kl_estimator == "k1" else np.expm1(d) - d
    rewards = np.where(real, -0.02 * kl, 0.0)
    last = real.sum(1) - 1
    rewards[np.arange(B), last] += r.scores_B
    if r.models.settings.whiten_rewards:  # lm-human-preferences' whiten(shift_mean=False): unit variance, mean kept
        mean = rewards[real].mean()
        rewards = np.where(real, (rewards - mean) / rewards[real].std() + mean, 0.0)
    values = np.asarray(r.batch.old_values_BN)
    advantages = np.zeros((B, N))
    for b in range(B):
        running = 0.0
        for t in reversed(range(real[b].sum())):
            next_value = values[b, t + 1] if t + 1 < real[b].sum() else 0.0
            running = rewards[b, t] + next_value - values[b, t] + 0.95 * running
            advantages[b, t] = running
    np.testing.assert_allclose(np.asarray(r.batch.returns_BN)[real], (advantages + values)[real], rtol=1e-4,
                               atol=1e-4)
    whitened = (advantages[real] - advantages[real].mean()) / advantages[real].std()
    np.testing.assert_allclose(np.asarray(r.batch.advantages_BN)[real], whitened, rtol=1e-3, atol=1e-3)


def test_rollouts_sample_the_config_ending_at_the_policys_stop_ids_over_its_tokenizers_ids(tmp_path):
    """What the ppo, grpo and rloo stages sample with (`policy_sampling`): a model of 96 vocabulary rows read with
    a tokenizer of 40 ids (as Qwen2.5's 151,936 for 151,665) draws from those 40 only."""
    from hf_fixtures import VOCAB, make_tokenizer
    from rlhf_jax.config import load_config
    from rlhf_jax.stages.policy_common import policy_sampling

    tokenizer = make_tokenizer(tmp_path, pad_is_eos=False)
    cfg = load_config(None, ["stage=ppo", "sampling.max_new_tokens=12", "sampling.temperature=0.7"])
    for vocab_size, vocab in ((VOCAB, len(tokenizer)), (len(tokenizer), None)):
        p = policy_sampling(cfg, tokenizer, dataclasses.replace(CFG, vocab_size=vocab_size, eos_token_ids=(1, 7)))
        assert p == SamplingParams(12, 0.7, 0, 1.0, (1, 7), PAD_ID, vocab) and len(tokenizer) == 40


def test_value_lr_sets_the_value_models_learning_rate():
    """ppo.value_lr through the stage's own model building: a value learning rate of 1e-9 leaves the value
    model all but still while the policy (optim.lr 1e-3) moves; without it both move alike."""
    from rlhf_jax.config import Config

    def moved(value_lr):
        cfg = Config(optim=OptimSection(lr=1e-3, schedule="constant"), ppo=PPOSection(value_lr=value_lr))
        built = ppo_stage.build_models(cfg, make_model(CFG), make_model(CFG, "scalar"), make_model(CFG, "scalar"),
                                       10, rollout_sampling(cfg, (1,)))
        models = _models().replace(policy_opt=built[0].policy_opt, value_opt=built[0].value_opt)
        state, frozen, ids, mask = _setup(models)
        before = _copy((state.policy.params, state.value.params))
        state, _ = jax.jit(lambda s, f, i, m: ppo.iteration(s, f, i, m, **models.kw))(state, frozen, ids, mask)
        return [max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(after),
                                                                               jax.tree.leaves(old)))
                for after, old in zip((state.policy.params, state.value.params), before)]

    policy_step, value_step = moved(1e-9)
    assert policy_step > 1e-4 and value_step < 1e-7, (policy_step, value_step)
    policy_step, value_step = moved(0.0)
    assert value_step > 1e-4, value_step


def test_minibatch_rows_are_a_fresh_permutation_every_epoch():
    models = _models(epochs=3, minibatches=2)
    orders = np.asarray(ppo.minibatch_orders(jax.random.key(0), 16, models.settings))
    assert orders.shape == (3, 2, 8)
    for epoch in orders:
        assert sorted(epoch.reshape(-1).tolist()) == list(range(16))
    assert len({tuple(epoch.reshape(-1)) for epoch in orders}) == 3
    again = np.asarray(ppo.minibatch_orders(jax.random.key(1), 16, models.settings))
    assert not np.array_equal(orders, again)  # the next iteration's key gives other orders


def test_adaptive_kl_controller_runs_inside_the_iteration():
    models = _models(kl_target=1e-6, kl_horizon=100.0)
    state, frozen, ids, mask = _setup(models)
    step = jax.jit(lambda s, f, i, m: ppo.iteration(s, f, i, m, **models.kw))
    state, m1 = step(state, frozen, ids, mask)
    state, m2 = step(state, frozen, ids, mask)
    kl = float(m1["kl"])
    expected = 0.02 * (1 + np.clip(kl / 1e-6 - 1, -0.2, 0.2) * B / 100.0)
    assert float(m2["beta"]) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("variant", ROLLOUT_VARIANTS)
def test_rollout_carries_nothing_after_eos(variant):
    batch = _rolled(variant).batch
    pad = ~np.asarray(batch.mask_BN)
    for name in ("old_logprobs_BN", "old_values_BN", "advantages_BN", "returns_BN"):
        assert np.all(np.asarray(getattr(batch, name))[pad] == 0.0), name
    # every row is real up to its first EOS and padding after it
    tokens, real = np.asarray(batch.tokens_BN), np.asarray(batch.mask_BN)
    for row_tokens, row_mask in zip(tokens, real):
        eos = np.nonzero(np.isin(row_tokens[row_mask], EOS_IDS))[0]
        assert len(eos) <= 1 and (not len(eos) or eos[0] == row_mask.sum() - 1)


def test_sampler_logprobs_equal_the_training_forward_at_temperature():
    """The rollout takes old log-probs from a teacher-forced pass (the LM head in chunks); in float32 the
    sampler's own agree."""
    from rlhf_jax.models.sampling import sample
    from rlhf_jax.rl.scoring import response_token_stats

    models = _models()
    state, _, ids, mask = _setup(models, seed=5)
    out = jax.jit(lambda w: sample(models.policy, w, ids, mask, jax.random.key(1), models.sampling))(
        state.policy.params)
    forced = jax.jit(lambda w: response_token_stats(models.policy, w, ids, mask, out.tokens_BN, out.mask_BN, 0.7))(
        state.policy.params)
    np.testing.assert_allclose(np.asarray(out.logprobs_BN), np.asarray(forced.logprobs_BN), atol=1e-5)


def _sharded_program(models, mesh):
    """The iteration as the stage jits it (ppo_stage.jit_iteration), and its inputs."""
    state, frozen, ids, mask = _setup(models)
    policy_sh = training_state.state_shardings(models.policy, models.policy_opt, mesh)
    value_sh = training_state.state_shardings(models.value, models.value_opt, mesh)
    repl = sharding.replicated(mesh)
    state_sh = ppo.PPOState(policy=policy_sh, value=value_sh, kl=ppo.L.KLController(repl), rng=repl)
    step = ppo_stage.jit_iteration(models.models, models.settings, state_sh,
                                   ppo.Frozen(policy_sh.params, value_sh.params), mesh)
    return step, (state, frozen, ids, mask, None)


def _sharded_iteration(models, mesh):
    """(metrics, per-device temporary bytes) of one iteration compiled as the stage compiles it."""
    step, args = _sharded_program(models, mesh)
    compiled = step.lower(*args).compile()
    return ({k: float(v) for k, v in compiled(*args)[1].items()}, compiled.memory_analysis().temp_size_in_bytes)


_MESH_TEST_MODELS = _models(minibatches=1, epochs=3)  # 8 rows: one per device


@functools.cache
def _one_device_iteration():
    """The baseline both mesh shapes compare with, compiled once."""
    return _sharded_iteration(_MESH_TEST_MODELS, sharding.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"),
                                                                    jax.devices()[:1]))


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_mesh_of_8_agrees_with_one_device(shape):
    """Metrics agree, and the minibatches stay split over the data-parallel devices: gathering a minibatch's
    permuted rows must not leave the whole minibatch on every device, so with 8 data-parallel devices the largest
    per-device buffers (the rollout's and the update's logits) shrink to about an eighth of one device's."""
    models = _MESH_TEST_MODELS
    one, one_temps = _one_device_iteration()
    many, many_temps = _sharded_iteration(models, sharding.make_mesh(shape, ("data", "fsdp", "tensor")))
    for key, value in one.items():
        assert many[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    if shape == (8, 1, 1):
        assert many_temps < one_temps / 4, (one_temps, many_temps)


# ------------------------------------------------------------------------------------------------ the stage


@pytest.fixture(scope="module")
def ppo_inputs(tmp_path_factory):
    """A tiny policy (HF dir), a reward model export made from it (random scalar head, with a normalisation),
    and a prompts dataset prepared through the data CLI."""
    from rlhf_jax.data import __main__ as data_cli
    from rlhf_jax.models.checkpoint import load_model, save_model
    from rlhf_jax.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("ppo")
    tiny = build_tiny_model(root / "tiny", seed=0)
    loaded = load_model(tiny)
    params = training_state.with_head(loaded.params, loaded.cfg, "lm", "scalar", jax.random.key(1))
    rm = save_model(root / "rm", jax.tree.map(np.asarray, params), loaded.cfg, "scalar", tiny,
                    extra={"reward_norm": {"gain": 2.0, "bias": 0.5}})
    words = ["red", "cat", "sun", "blue", "dog", "tree", "moon", "fish"]
    src = root / "prompts.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Tell me about the {a} {b}"}) + "\n" for a in words for b in words))
    assert data_cli.main(["--format", "jsonl_prompts", "--input", str(src), "--data-dir", str(root / "data"),
                          "--name", "asks"]) == 0
    demos = root / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": f"Name a {a}", "response": f" the {a} {b}"}) + "\n"
                             for a in words for b in words))
    assert data_cli.main(["--format", "jsonl_sft", "--input", str(demos), "--data-dir", str(root / "data"),
                          "--name", "demos"]) == 0
    return {"root": root, "tiny": tiny, "rm": rm, "data": root / "data"}


def _ppo_args(inputs, run_dir, *extra):
    return ["stage=ppo", f"run_dir={run_dir}", f"model.path={inputs['tiny']}", f"ppo.reward_model={inputs['rm']}",
            f"data.dir={inputs['data']}", "data.name=asks", "data.max_prompt_tokens=12", "sampling.max_new_tokens=8",
            "sampling.temperature=0.7", "train.batch_size=16", "ppo.minibatches=2", "train.log_every=1",
            "train.save_every=2", "optim.lr=1e-3", *extra]


METRIC_KEYS = {"score_mean", "score_std", "kl", "beta", "entropy", "response_length", "eos_rate", "policy_loss",
               "value_loss", "approx_kl", "clip_frac", "value_clip_frac", "ratio_max", "value_explained_var",
               "ptx_loss", "rollout_s", "update_s", "episodes_per_s"}


KILL_STEPS = 30  # enough iterations that the killed run is still going when its step-5 checkpoint appears


def test_ppo_stage_runs_and_resumes_bitwise_after_sigkill(ppo_inputs, tmp_path):
    """The straight run logs every key each iteration, writes samples and exports; the same command killed -9
    after its step-5 checkpoint and rerun resumes there and ends bitwise where the straight run ends."""
    from rlhf_jax.models.checkpoint import load_model

    def args(run_dir):
        return _ppo_args(ppo_inputs, run_dir, f"train.steps={KILL_STEPS}", "train.save_every=5",
                         "ppo.samples_every=10", "train.log_every=1")

    straight = ppo_inputs["root"] / "straight"
    rc, out, err = run_quietly(main_cli.main, args(straight))
    assert rc == 0, err[-2000:]
    lines = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, KILL_STEPS + 1)) and all(m["stage"] == "ppo" for m in lines)
    assert all(METRIC_KEYS <= set(m) | {"episodes_per_s"} for m in lines), set(lines[0])
    assert all(m["episodes_per_s"] > 0 for m in lines[1:])  # the first step's window is its compilation
    # The first minibatch's old log-probs come from the update's own forward: exactly 1 on a mesh too.
    assert lines[0]["first_ratio_max"] == 1.0 == lines[0]["first_ratio_min"] and lines[0]["first_clip_frac"] == 0.0
    assert abs(lines[0]["kl"]) < 1e-5
    assert json.loads(out.strip().splitlines()[-1])["steps"] == KILL_STEPS
    samples = [json.loads(x) for x in (straight / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [10] * 4 + [20] * 4 + [30] * 4  # ppo.samples_every=10, 4 rows each
    assert all("about the" in s["prompt"] and isinstance(s["response"], str)
               and np.isfinite(s["score"]) and np.isfinite(s["kl"]) for s in samples)
    policy, value = load_model(straight / "export"), load_model(straight / "export_value")
    assert policy.head == "lm" and value.head == "scalar"

    killed = tmp_path / "killed"
    env = subprocess_env()
    with open(tmp_path / "killed.err", "w") as log:  # a file: a full pipe could block the run
        proc = subprocess.Popen([sys.executable, "-m", "rlhf_jax.main", *map(str, args(killed))], env=env,
                                cwd=Path(__file__).resolve().parents[1], stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 180
            while not (killed / "checkpoints" / "5").exists():  # Orbax renames a finished step into place
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.err").read_text()
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    assert not (killed / "export").exists(), "the killed run finished: raise KILL_STEPS"
    rc, _, err = run_quietly(main_cli.main, args(killed))
    assert rc == 0 and "resumed from" in err, err[-2000:]
    for name in ("export", "export_value"):
        for a, b in zip(jax.tree.leaves(load_model(straight / name).params),
                        jax.tree.leaves(load_model(killed / name).params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    deterministic = lambda run: [{k: m[k] for k in ("step", "score_mean", "kl", "beta", "policy_loss")}
                                 for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert deterministic(killed) == deterministic(straight)
    # samples.jsonl holds each sampled iteration once, as in the straight run
    assert (killed / "samples.jsonl").read_text() == (straight / "samples.jsonl").read_text()


@pytest.mark.parametrize("overrides, fragment", [
    (["ppo.reward_model="], "needs ppo.reward_model"),
    (["ppo.minibatches=3"], "train.batch_size=16 must split into ppo.minibatches=3 minibatches"),
    (["ppo.minibatches=4"], "train.batch_size=16 must split into ppo.minibatches=4 minibatches divisible by the 8"),
    (["ppo.ptx_coef=1"], "ppo.ptx_coef > 0 needs ppo.ptx_dataset"),
    (["ppo.ptx_coef=1", "ppo.ptx_dataset=asks"], "ppo.ptx_dataset='asks' is a 'prompts' dataset"),
    (["ppo.ptx_coef=1", "ppo.ptx_dataset=nosuch"], "ppo.ptx_dataset='nosuch': "),  # named, not only its path
    (["ppo.reward_model={tiny}"], "a language model, expected a scalar-head"),
    (["sampling.top_k=5"], "stage 'ppo' trains on its own samples and needs plain sampling (temperature > 0, "
                           "top_k 0, top_p 1); got sampling.top_k=5"),
    (["sampling.top_p=0.9", "sampling.temperature=0"], "got sampling.temperature=0.0, sampling.top_p=0.9"),
    (["ppo.clip_ratio=0"], "'ppo.clip_ratio' must be > 0"),
])
def test_ppo_bad_config_fails_in_one_line(ppo_inputs, overrides, fragment):
    run_dir = ppo_inputs["root"] / f"bad_{len(list(ppo_inputs['root'].glob('bad_*')))}"
    argv = _ppo_args(ppo_inputs, run_dir, "train.steps=2", *[o.format(tiny=ppo_inputs["tiny"]) for o in overrides])
    rc, _, err = run_quietly(main_cli.main, argv)
    lines = err.strip().splitlines()
    assert rc == 2 and lines[-1].startswith("error: ") and fragment in lines[-1], err
    assert "Traceback" not in err
    assert not (run_dir / "checkpoints").exists()


def test_a_lora_value_models_base_is_the_reward_models_without_its_head():
    """The value model starts from the reward model: with LoRA its frozen base is the reward model's weights (held
    once, `value_base` None), never the policy's base, which differs wherever the reward model was trained."""
    reward = {"embed": np.full(3, 2.0), "layer_0": {"w": np.ones(2)}, "score": np.zeros(1)}
    policy_base = {"embed": np.full(3, 5.0), "layer_0": {"w": np.zeros(2)}}
    frozen = ppo.Frozen(ref_params={}, reward_params=reward, policy_base=policy_base, value_base=None)
    assert frozen.bases() == (policy_base, {"embed": reward["embed"], "layer_0": reward["layer_0"]})
    own = {"embed": np.zeros(3)}
    assert ppo.Frozen(ref_params={}, reward_params=reward, value_base=own).bases()[1] is own  # a copy of its own


def test_ema_of_the_policy_follows_its_formula():
    models = _models(ema_decay=0.9)
    state, frozen, ids, mask = _setup(models)
    start = _copy(state.policy.params)
    state, _ = jax.jit(lambda s, f, i, m: ppo.iteration(s, f, i, m, **models.kw))(state, frozen, ids, mask)
    for e, x0, x1 in zip(jax.tree.leaves(state.ema), jax.tree.leaves(start), jax.tree.leaves(state.policy.params)):
        np.testing.assert_allclose(np.asarray(e), 0.9 * x0 + 0.1 * np.asarray(x1), rtol=1e-6, atol=1e-7)
    assert _setup(_models())[0].ema is None  # off by default


def _ptx_rows(n: int, T: int = 10) -> dict:
    """n rows of the sft batch layout, of random lengths, for PPO-ptx."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, T + 1, n)
    ptx_mask = np.arange(T)[None, :] < lengths[:, None]
    return {"ids": jnp.asarray(np.where(ptx_mask, rng.integers(2, CFG.vocab_size, (n, T)), PAD_ID), jnp.int32),
            "mask": jnp.asarray(ptx_mask), "positions": jnp.asarray(np.maximum(np.cumsum(ptx_mask, 1) - 1, 0)),
            "segment_ids": jnp.asarray(ptx_mask.astype(np.int32)), "response_mask": jnp.asarray(ptx_mask)}


def test_gradient_accumulation_inside_a_minibatch_equals_the_whole_minibatch():
    """optim.grad_accum_steps=2 splits each minibatch (and its ptx slice) in two: the iteration ends where the
    unsplit one does, and the first minibatch's ratio is still exactly 1."""
    ends = []
    for accum in (1, 2):
        models = _models(ptx_coef=0.5).replace(accum=accum)
        state, frozen, ids, mask = _setup(models)
        state, metrics = jax.jit(lambda s, f, i, m, x: ppo.iteration(s, f, i, m, x, **models.kw))(
            state, frozen, ids, mask, _ptx_rows(8))
        ends.append((state, {k: float(v) for k, v in metrics.items()}))
    (whole, whole_metrics), (split, split_metrics) = ends
    assert split_metrics["first_ratio_max"] == 1.0 == split_metrics["first_ratio_min"]
    for key, value in whole_metrics.items():
        assert split_metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    for a, b in zip(jax.tree.leaves((whole.policy.params, whole.value.params)),
                    jax.tree.leaves((split.policy.params, split.value.params))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_first_step_reusing_the_rollout_forward_equals_a_direct_gradient():
    """The first optimizer step's backward runs through the rollout's own forward of its first micro-batch
    (`FirstForward`), and the step's other micro-batch through its own; with plain SGD at lr 1 the step moves
    the params by exactly minus the gradient of the minibatch loss (ptx included) computed directly on the
    rollout's rows. (Without accumulation the step is the first micro-batch alone: accum 1 and 2 agree in
    test_gradient_accumulation_inside_a_minibatch_equals_the_whole_minibatch.)"""
    accum = 2
    import optax

    sgd = optax.sgd(1.0)
    models = _models(ptx_coef=0.5, epochs=1, minibatches=1).replace(policy_opt=sgd, value_opt=sgd, accum=accum)
    state, frozen, ids, mask = _setup(models)
    ptx = _ptx_rows(8)
    params = (_copy(state.policy.params), _copy(state.value.params))
    _, sample_rng, update_rng = jax.random.split(state.rng, 3)
    order = ppo.minibatch_orders(update_rng, B, models.settings)[0]
    batch = jax.jit(lambda s, f, i, m, r, o: ppo.rollout(s, f, i, m, r, models.models, models.settings, first_order_MMb=o)[0])(
        state, frozen, ids, mask, sample_rng, order)
    rows = order[0]
    tokens = jnp.sum(batch.mask_BN, dtype=jnp.float32)
    direct = jax.jit(jax.grad(ppo._minibatch_loss, has_aux=True), static_argnums=(2, 3))(
        params, (jax.tree.map(lambda x: x[rows], batch), ptx), models.models, models.settings, tokens,
        ppo.ptx_target_tokens(ptx))[0]
    state, _ = jax.jit(lambda s, f, i, m, x: ppo.iteration(s, f, i, m, x, **models.kw))(
        state, frozen, ids, mask, ptx)
    moved = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, (state.policy.params,
                                                                              state.value.params))
    for got, want in zip(jax.tree.leaves(moved), jax.tree.leaves(direct)):
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-6)
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(direct)) > 1e-3  # a gradient that moves things


def test_each_minibatch_adds_the_lm_loss_of_its_own_ptx_slice():
    """Minibatch m of an epoch takes the m-th slice of the ptx batch (the two halves differ here): at lr 0 the
    iteration's ptx_loss is the mean of each slice's own LM loss, which one slice for every minibatch would miss."""
    models = _models(lr=0.0, ptx_coef=0.5, epochs=2, minibatches=2)
    state, frozen, ids, mask = _setup(models)
    ptx = _ptx_rows(8)
    halves = [jax.tree.map(lambda x, m=m: x[4 * m:4 * (m + 1)], ptx) for m in range(2)]
    losses = [float(jax.jit(lambda p, x: ppo.ptx_loss(models.policy, p, x))(state.policy.params, h)) for h in halves]
    assert abs(losses[0] - losses[1]) > 1e-3, losses
    _, metrics = jax.jit(lambda s, f, i, m, x: ppo.iteration(s, f, i, m, x, **models.kw))(state, frozen, ids, mask, ptx)
    assert float(metrics["ptx_loss"]) == pytest.approx(np.mean(losses), rel=1e-5)


def test_every_iteration_draws_new_samples_and_minibatch_orders():
    """The state's key moves on every iteration: at lr 0, on the same prompts, the next iteration samples other
    responses (a key left as it was would sample the same ones and shuffle minibatches the same way)."""
    models = _models(lr=0.0)
    state, frozen, ids, mask = _setup(models)
    step = jax.jit(lambda s, f, i, m: ppo.iteration(s, f, i, m, **models.kw))
    keys, lengths, scores = [], [], []
    for _ in range(2):
        keys.append(np.asarray(jax.random.key_data(state.rng)))
        state, metrics = step(state, frozen, ids, mask)
        lengths.append(float(metrics["response_length"]))
        scores.append(float(metrics["score_mean"]))
    keys.append(np.asarray(jax.random.key_data(state.rng)))
    assert len({k.tobytes() for k in keys}) == 3
    assert (lengths[0], scores[0]) != (lengths[1], scores[1])


def test_ptx_adds_exactly_coef_times_the_lm_loss_gradient():
    """PPO-ptx: the minibatch gradient with ptx_coef c equals the one without ptx plus c x the gradient of the
    LM loss on the ptx rows, computed separately."""
    models = _models(ptx_coef=2.5)
    state, frozen, ids, mask = _setup(models)
    batch, _, _ = jax.jit(lambda s, f, i, m, r: ppo.rollout(s, f, i, m, r, models.models, models.settings)[:3])(
        state, frozen, ids, mask, jax.random.key(4))
    ptx = _ptx_rows(4)
    grad = jax.jit(jax.grad(ppo._minibatch_loss, has_aux=True), static_argnums=(2, 3))
    params, tokens = (state.policy.params, state.value.params), jnp.sum(batch.mask_BN, dtype=jnp.float32)
    (with_ptx, _), stats = grad(params, (batch, ptx), models.models, models.settings, tokens,
                                ppo.ptx_target_tokens(ptx))
    (without, _), _ = grad(params, (batch, None), models.models, models.settings, tokens, None)
    lm_grad = jax.jit(jax.grad(lambda p: ppo.ptx_loss(models.policy, p, ptx)))(state.policy.params)
    for a, b, c in zip(jax.tree.leaves(with_ptx), jax.tree.leaves(without), jax.tree.leaves(lm_grad)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b) + 2.5 * np.asarray(c), rtol=1e-4, atol=1e-6)
    assert float(stats["ptx_loss"]) > 0


def test_the_objective_is_the_clipped_loss_minus_the_entropy_bonus_plus_the_value_loss():
    """The minibatch gradient equals that of the objective written out here from a plain forward pass of the
    policy, its logits at the sampling temperature: the clipped policy loss (clip_ratio 0.1) minus entropy_coef x
    the mean entropy, plus vf_coef x the clipped value loss (clip_value 0.3: a swap of the two ranges shows). Old
    log-probs and values are moved off the current ones so that both clips bite."""
    c_ent, c_vf, eps, eps_v = 0.3, 0.7, 0.1, 0.3
    models = _models(entropy_coef=c_ent, vf_coef=c_vf, clip_ratio=eps, clip_value=eps_v)
    state, frozen, ids, mask = _setup(models)
    batch = _rollout(models, state, frozen, ids, mask)[0]
    noise = np.random.default_rng(1).normal(size=(2, B, N)).astype(np.float32)
    batch = batch._replace(old_logprobs_BN=batch.old_logprobs_BN + 0.3 * noise[0] * batch.mask_BN,
                           old_values_BN=batch.old_values_BN + 0.5 * noise[1] * batch.mask_BN)
    tokens = jnp.sum(batch.mask_BN, dtype=jnp.float32)
    mask_BN = batch.mask_BN.astype(jnp.float32)
    mean = lambda x_BN: jnp.sum(x_BN * mask_BN) / tokens

    def written_out(params):
        policy_params, value_params = params
        ids_BT = jnp.concatenate([batch.prompt_ids_BP, batch.tokens_BN], 1)
        real_BT = jnp.concatenate([batch.prompt_mask_BP, batch.mask_BN], 1).astype(bool)
        positions_BT = jnp.maximum(jnp.cumsum(real_BT, 1) - 1, 0)
        logits_BTV = models.policy.apply({"params": policy_params}, ids_BT, positions_BT, real_BT)[0]
        logp_BNV = jax.nn.log_softmax(logits_BTV[:, P - 1:P + N - 1] / models.sampling.temperature)
        logp_BN = jnp.take_along_axis(logp_BNV, jnp.maximum(batch.tokens_BN, 0)[..., None], -1)[..., 0]
        entropy_BN = -jnp.sum(jnp.exp(logp_BNV) * logp_BNV, -1)
        ratio_BN = jnp.exp(logp_BN - batch.old_logprobs_BN)
        adv_BN = batch.advantages_BN
        pg = mean(jnp.maximum(-adv_BN * ratio_BN, -adv_BN * jnp.clip(ratio_BN, 1 - eps, 1 + eps)))
        values_BN = ppo.response_values(models.value, value_params, *ppo._inputs(batch))
        v_clipped_BN = jnp.clip(values_BN, batch.old_values_BN - eps_v, batch.old_values_BN + eps_v)
        vf = 0.5 * mean(jnp.maximum((values_BN - batch.returns_BN) ** 2, (v_clipped_BN - batch.returns_BN) ** 2))
        return pg - c_ent * mean(entropy_BN) + c_vf * vf, (ratio_BN, values_BN)

    params = (state.policy.params, state.value.params)
    (want, (ratio_BN, values_BN)) = jax.jit(jax.grad(written_out, has_aux=True))(params)
    (got, stats) = jax.jit(jax.grad(ppo._minibatch_loss, has_aux=True), static_argnums=(2, 3))(
        params, (batch, None), models.models, models.settings, tokens, None)
    real = np.asarray(batch.mask_BN, bool)
    ratio = np.asarray(ratio_BN)[real]
    assert (ratio > 1 + eps).any() and (ratio < 1 - eps).any()  # the policy clip bites both ways
    drift = np.abs(np.asarray(values_BN - batch.old_values_BN))[real]
    assert (drift > eps_v).any() and (drift < eps_v).any() and (drift > eps).sum() > (drift > eps_v).sum()
    assert float(stats["entropy"]) > 0.5
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)


def test_ppo_stage_with_ptx(ppo_inputs):
    run_dir = ppo_inputs["root"] / "ptx"
    argv = _ppo_args(ppo_inputs, run_dir, "train.steps=2", "ppo.ptx_coef=1.0", "ppo.ptx_dataset=demos",
                     "ppo.ptx_batch_size=16", "data.max_response_tokens=8")
    rc, _, err = run_quietly(main_cli.main, argv)
    assert rc == 0, err[-2000:]
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(m["ptx_loss"] > 0 for m in metrics)
    # its dataset is fingerprinted with the others, so that a resume refuses another one put under its name
    ckpts = TrainCheckpoints(run_dir / "checkpoints", 5)
    read = ckpts.stored(ckpts.latest_step())[2]["models"]
    ckpts.close()
    assert read["ppo.ptx_dataset"] == {"path": str(dataset_dir(ppo_inputs["data"], "demos").resolve()),
                                       "fingerprint": model_fingerprint(dataset_dir(ppo_inputs["data"], "demos"))}


def test_an_unused_ptx_dataset_is_announced(capsys):
    from rlhf_jax.config import Config, DataSection, TrainSection

    cfg = Config(stage="ppo", data=DataSection(name="prompts"), train=TrainSection(steps=2),
                 ppo=PPOSection(reward_model="rm", ptx_dataset="corpus"))
    ppo_stage.check_config(cfg)
    assert "warning: ppo.ptx_dataset='corpus' is not used: ppo.ptx_coef is 0" in capsys.readouterr().err

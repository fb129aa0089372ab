"""DPO on K-way rankings: the loss (sigmoid, label smoothing, IPO) against a loop over every pair of every prompt,
its gradient at policy == reference against the closed form, the response log-probs against a per-sequence loop,
accumulation, and the stage end to end (metrics, exports, resume, a precomputed reference equal to the live one,
one-line user errors).

The stage runs share a tiny model and a rankings dataset:
  good  K = 2..5 responses with 0..5 copies of "good" plus 2 random words; more "good" ranks better, 48 rows,
        25% held out
  rep   sft: the wrong kind of dataset for dpo
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import main as main_cli
from rlhf_jax.data import __main__ as data_cli
from rlhf_jax.data.pipeline import open_split
from rlhf_jax.models.checkpoint import check_role, load_model
from rlhf_jax.models.tiny import build_tiny_model
from rlhf_jax.models.transformer import ModelConfig, Transformer, init_params, make_model
from rlhf_jax.rl import dpo
from rlhf_jax.training import steps

from cli_helpers import run_quietly

CFG = ModelConfig(family="llama", vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=48, eos_token_ids=(1,))
LOSSES = [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)]


def _tiny(seed: int) -> tuple[Transformer, dict]:
    """The model and its random params (initialised under jit: op by op, every primitive compiles on its own)."""
    model = make_model(CFG)
    return model, jax.jit(lambda key: init_params(model, key))(jax.random.key(seed))


def _logprobs(model: Transformer, params, batch: dict) -> jax.Array:
    return jax.jit(lambda p, b: dpo.response_logprobs(model, p, b))(params, batch)


# ------------------------------------------------------------------------------------------------ the loss


def _pair_loss(h: float, beta: float, loss: str, eps: float) -> float:
    if loss == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    log_sigmoid = lambda x: -math.log1p(math.exp(-x))
    return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)


def _brute_force(policy, ref, pair_lists, weights, beta, loss, eps) -> dict:
    """Metrics by a plain loop over the (better, worse) list of every prompt, repeats included."""
    per_prompt, chosen, rejected, correct, n = [], [], [], 0, 0
    for b, pairs in enumerate(pair_lists):
        if not pairs or not weights[b]:
            continue
        losses = []
        for i, j in pairs:
            h = float((policy[b, i] - ref[b, i]) - (policy[b, j] - ref[b, j]))
            losses.append(_pair_loss(h, beta, loss, eps))
            r_i, r_j = beta * float(policy[b, i] - ref[b, i]), beta * float(policy[b, j] - ref[b, j])
            chosen.append(r_i)
            rejected.append(r_j)
            correct += r_i > r_j
            n += 1
        per_prompt.append(sum(losses) / len(losses))
    return {"loss": float(np.mean(per_prompt)), "reward_chosen": float(np.mean(chosen)),
            "reward_rejected": float(np.mean(rejected)), "reward_margin": float(np.mean(chosen) - np.mean(rejected)),
            "reward_accuracy": correct / n, "pairs": n, "prompts": len(per_prompt)}


def _random_pair_lists(rng, B: int, K: int) -> list[list[tuple[int, int]]]:
    """Per prompt: random pairs among its k responses, with a repeated and a contradicting pair; prompt 1 has none."""
    out = []
    for b in range(B):
        k = int(rng.integers(2, K + 1))
        pairs = [tuple(rng.choice(k, 2, replace=False).tolist()) for _ in range(rng.integers(1, 6))]
        pairs += [pairs[0], pairs[0][::-1]]
        out.append(pairs if b != 1 else [])
    return out


def _pairs_BKK(pair_lists, K: int) -> np.ndarray:
    pairs = np.zeros((len(pair_lists), K, K), np.int32)
    for b, lst in enumerate(pair_lists):
        for i, j in lst:
            pairs[b, i, j] += 1
    return pairs


@pytest.mark.parametrize("loss, eps", LOSSES)
@pytest.mark.parametrize("seed", range(3))
def test_dpo_loss_equals_a_loop_over_every_pair(loss, eps, seed):
    rng = np.random.default_rng(seed)
    B, K, beta = 7, 5, [0.1, 0.5, 2.0][seed]
    policy = rng.normal(-20, 3, (B, K)).astype(np.float32)
    ref = policy + rng.normal(0, 2, (B, K)).astype(np.float32)
    pair_lists = _random_pair_lists(rng, B, K)
    weights = np.ones(B, np.float32)
    weights[-1] = 0.0  # a padding row of an eval batch
    sums = dpo.dpo_loss(jnp.asarray(policy), jnp.asarray(ref), jnp.asarray(_pairs_BKK(pair_lists, K)), beta, loss,
                        eps, jnp.asarray(weights))
    got = {k: float(v) for k, v in dpo.dpo_metrics(sums).items()}
    expected = _brute_force(policy, ref, pair_lists, weights, beta, loss, eps)
    assert got["pairs"] == expected["pairs"] and got["prompts"] == expected["prompts"] == B - 2
    for key in ("loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert 0 < got["reward_accuracy"] < 1


def test_dpo_loss_without_weights_counts_every_prompt_with_a_pair():
    rng = np.random.default_rng(5)
    policy, ref = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32)
    pair_lists = [[(0, 1)], [], [(2, 0), (2, 0), (1, 0)], [(1, 2)]]
    sums = dpo.dpo_loss(jnp.asarray(policy), jnp.asarray(ref), jnp.asarray(_pairs_BKK(pair_lists, 3)), 0.3)
    expected = _brute_force(policy, ref, pair_lists, np.ones(4), 0.3, "sigmoid", 0.0)
    np.testing.assert_allclose(float(dpo.dpo_metrics(sums)["loss"]), expected["loss"], rtol=1e-5)
    assert float(sums["prompts"]) == 3 and float(sums["pairs"]) == 5
    # policy == reference: every h is 0, no pair counts as correct (chosen > rejected is strict)
    at_reference = dpo.dpo_metrics(dpo.dpo_loss(jnp.asarray(policy), jnp.asarray(policy),
                                                jnp.asarray(_pairs_BKK(pair_lists, 3)), 0.3))
    assert float(at_reference["reward_accuracy"]) == 0.0 and float(at_reference["reward_margin"]) == 0.0
    np.testing.assert_allclose(float(at_reference["loss"]), math.log(2), rtol=1e-6)


# ------------------------------------------------------------------------------------------------ the log-probs


def _rankings_batch(rng, B=3, K=4, P=6, R=5, vocab=64) -> dict:
    """Left-padded prompts of several lengths, K slots with 1..R tokens, the last slot of row 0 empty."""
    prompt_mask = np.zeros((B, P), bool)
    response_mask = np.zeros((B, K, R), bool)
    for b in range(B):
        prompt_mask[b, P - rng.integers(1, P + 1):] = True
        for k in range(K):
            response_mask[b, k, :rng.integers(1, R + 1)] = True
    response_mask[0, K - 1] = False
    response_mask[1, 0] = True  # a response of all R tokens
    pair_lists = [[(0, 1), (0, 2), (1, 2), (0, 1)], [(3, 0), (1, 2), (2, 1)], [(2, 3)]]
    return {"prompt_ids": rng.integers(2, vocab, (B, P)).astype(np.int32), "prompt_mask": prompt_mask,
            "response_ids": rng.integers(2, vocab, (B, K, R)).astype(np.int32), "response_mask": response_mask,
            "pairs": _pairs_BKK(pair_lists[:B], K)}


def test_response_logprobs_equal_a_per_sequence_loop(monkeypatch):
    model, params = _tiny(0)
    batch = _rankings_batch(np.random.default_rng(0))
    calls = []
    original = Transformer.apply

    def counting_apply(self, variables, tokens, *args, **kwargs):
        calls.append(tokens.shape)
        return original(self, variables, tokens, *args, **kwargs)

    monkeypatch.setattr(Transformer, "apply", counting_apply)
    logps = np.asarray(_logprobs(model, params, batch))
    B, K, R = batch["response_ids"].shape
    assert calls == [(B, batch["prompt_ids"].shape[1]), (B * K, R)]  # each prompt's pass once, then every response
    monkeypatch.setattr(Transformer, "apply", original)

    # Each unpadded sequence [prompt | response] from position 0, in rows right-padded to one length (one
    # compilation; causal attention keeps the padding after a sequence out of it)
    slots = list(itertools.product(range(B), range(K)))
    prompts = [batch["prompt_ids"][b][batch["prompt_mask"][b]] for b, _ in slots]
    responses = [batch["response_ids"][b, k][batch["response_mask"][b, k]] for b, k in slots]
    T = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = np.zeros((len(slots), T), np.int32)
    for n, (prompt, response) in enumerate(zip(prompts, responses)):
        ids[n, :len(prompt) + len(response)] = np.concatenate([prompt, response])
    logits, _ = jax.jit(model.apply)({"params": params}, ids, np.broadcast_to(np.arange(T), ids.shape),
                                     ids > 0)
    log_softmax = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))
    for n, ((b, k), prompt, response) in enumerate(zip(slots, prompts, responses)):
        if not len(response):
            assert logps[b, k] == 0.0
            continue
        # token t of the response is predicted at the position before it
        expected = sum(log_softmax[n, len(prompt) + t - 1, response[t]] for t in range(len(response)))
        np.testing.assert_allclose(logps[b, k], expected, rtol=1e-5, atol=1e-4, err_msg=f"row {b} slot {k}")


# ------------------------------------------------------------------------------------------------ gradients


def _dldh_at_zero(beta: float, loss: str, eps: float) -> float:
    """dL/dh at h = 0. sigmoid: d/dh [-(1-eps) log s(beta h) - eps log s(-beta h)] = -(1-eps) beta s(-beta h)
    + eps beta s(beta h) = -beta (1 - 2 eps) / 2; ipo: d/dh (h - 1/(2 beta))^2 = 2 (h - 1/(2 beta)) = -1/beta."""
    return -1.0 / beta if loss == "ipo" else -beta * (1 - 2 * eps) / 2


@pytest.mark.parametrize("loss, eps", LOSSES[1:])  # label smoothing 0.2 covers the general sigmoid formula
def test_gradient_at_the_reference_is_the_closed_form(loss, eps):
    beta = 0.25
    model, params = _tiny(1)
    batch = _rankings_batch(np.random.default_rng(1))
    batch["pairs"][2] = 0  # a prompt without pairs: no gradient
    ref = _logprobs(model, params, batch)  # policy == reference

    def mean_loss(p):
        sums = dpo.dpo_loss(dpo.response_logprobs(model, p, batch), ref, batch["pairs"], beta, loss, eps)
        return sums["loss_sum"] / sums["prompts"]

    grads = jax.jit(jax.grad(mean_loss))(params)
    # d logpi_bk / d params for every slot, from response_logprobs alone
    slot_grads = jax.jit(jax.jacrev(lambda p: dpo.response_logprobs(model, p, batch)))(params)
    c = _dldh_at_zero(beta, loss, eps)
    B, K = ref.shape
    prompts = [b for b in range(B) if batch["pairs"][b].sum()]
    coef = np.zeros((B, K))
    for b in prompts:
        n_b = batch["pairs"][b].sum()
        for i, j in itertools.product(range(K), range(K)):
            # each pair adds dL/dh * (grad logpi_i - grad logpi_j), mean per prompt, mean over prompts
            coef[b, i] += batch["pairs"][b, i, j] * c / n_b / len(prompts)
            coef[b, j] -= batch["pairs"][b, i, j] * c / n_b / len(prompts)
    expected = jax.tree.map(lambda g: np.tensordot(coef, np.asarray(g), axes=2), slot_grads)
    assert float(optax.tree.norm(grads)) > 1e-4
    jax.tree.map(lambda a, e: np.testing.assert_allclose(np.asarray(a), e, rtol=1e-4, atol=1e-6), grads, expected)


# ------------------------------------------------------------------------------------------------ the step


def _run_step(model, params, batch, accum: int, frozen, ref_logps=None, settings=dpo.DPOSettings(beta=0.5)):
    opt = optax.sgd(1.0)  # the new params are the old minus the gradient (and the program compiles fast)
    if ref_logps is not None:
        batch = {**batch, "ref_logps": ref_logps}
    fn = jax.jit(lambda p, b, f: dpo.dpo_step(steps.init_state(p, opt), b, jax.random.key(0), {}, f, model=model,
                                              optimizer=opt, schedule=optax.constant_schedule(1.0), accum=accum,
                                              settings=settings))
    new_state, metrics = fn(params, batch, frozen)
    return new_state.params, {k: float(v) for k, v in metrics.items()}


def test_accumulation_and_precomputed_reference_equal_one_batch():
    rng = np.random.default_rng(4)
    one = _rankings_batch(rng, B=2)
    batch = jax.tree.map(lambda *x: np.concatenate(x), *[_rankings_batch(rng, B=2) for _ in range(2)], one)
    batch["pairs"][1] = 0  # a prompt without pairs
    model, params = _tiny(3)
    _, reference = _tiny(4)
    ref_logps = _logprobs(model, reference, batch)
    whole, metrics = _run_step(model, params, batch, 1, reference)
    assert metrics["prompts"] == 5 and metrics["grad_norm"] > 0
    # SGD at lr 1: the step is minus the gradient of the summed loss over the 5 prompts that have pairs (not 6)
    direct = jax.jit(jax.grad(lambda p: dpo.dpo_sums(model, p, batch, reference, dpo.DPOSettings(beta=0.5))[
        "loss_sum"] / 5))(params)
    jax.tree.map(lambda new, old, g: np.testing.assert_allclose(new, old - g, atol=1e-6), whole, params, direct)
    for accum, frozen, logps in ((2, reference, None), (2, None, ref_logps)):
        new_params, got = _run_step(model, params, batch, accum, frozen, logps)
        for key in ("loss", "grad_norm", "reward_chosen", "reward_margin", "reward_accuracy", "pairs", "prompts"):
            np.testing.assert_allclose(got[key], metrics[key], rtol=1e-5, atol=1e-6, err_msg=(accum, key))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), new_params, whole)


def test_the_stage_builds_its_step_from_the_dpo_section():
    from rlhf_jax.config import load_config
    from rlhf_jax.stages import dpo_parts

    cfg = load_config(None, ["stage=dpo", "dpo.beta=0.3", "dpo.label_smoothing=0.1", "optim.grad_accum_steps=2"])
    step, eval_sums = dpo_parts.step_fns(cfg, make_model(CFG), optax.sgd(1.0), optax.constant_schedule(1.0))
    expected = dpo.DPOSettings(beta=0.3, loss="sigmoid", label_smoothing=0.1)
    assert step.keywords["settings"] == eval_sums.keywords["settings"] == expected
    assert step.keywords["accum"] == 2
    ipo = load_config(None, ["stage=dpo", "dpo.loss=ipo", "dpo.beta=2"])
    assert dpo_parts.settings(ipo) == dpo.DPOSettings(beta=2.0, loss="ipo", label_smoothing=0.0)


# ------------------------------------------------------------------------------------------------ the stage

WORDS = ["red", "cat", "sun", "blue", "dog", "tree", "moon", "fish", "bird", "star"]
TRAIN_KEYS = {"loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "grad_norm", "lr",
              "pairs", "prompts", "tokens_per_s", "truncated_examples"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dpo")


@pytest.fixture(scope="module")
def tiny(workdir) -> Path:
    return build_tiny_model(workdir / "tiny", seed=0)


@pytest.fixture(scope="module")
def data_dir(workdir) -> Path:
    rng = random.Random(0)
    rankings = []
    for i in range(48):
        counts = rng.sample(range(6), rng.randint(2, 5))
        responses = [" " + " ".join(rng.sample(["good"] * c + rng.sample(WORDS, 2), c + 2)) for c in counts]
        order = sorted(counts, reverse=True)
        rankings.append({"prompt": f"Review {i}: {' '.join(rng.sample(WORDS, 2))}", "responses": responses,
                         "ranks": [order.index(c) for c in counts]})
    sft = [{"prompt": f"Repeat: {w}", "response": f" {w}"} for w in WORDS]
    root = workdir / "data"
    for fmt, name, rows in (("jsonl_rankings", "good", rankings), ("jsonl_sft", "rep", sft)):
        src = workdir / f"{name}.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
        rc, _, err = run_quietly(data_cli.main, ["--format", fmt, "--input", src, "--data-dir", root, "--name", name,
                                                 "--eval-fraction", 0.25])
        assert rc == 0, err
    return root


def test_rankings_batches_carry_the_stored_index_of_each_example(tiny, data_dir):
    """Over two epochs of shuffled batches, each `example_index` names the stored example the row holds."""
    from rlhf_jax.config import DataSection
    from rlhf_jax.data.pipeline import Tokenize, eval_batches, train_dataset
    from rlhf_jax.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny)
    spec = DataSection(dir=str(data_dir), name="good", max_prompt_tokens=16, max_response_tokens=12)
    source, _ = open_split(data_dir, "good", "train")
    tokenize = Tokenize(tokenizer, "rankings", spec, 5)
    data = iter(train_dataset(spec, "train", tokenizer, 8, seed=0))
    seen = []
    for _ in range(2 * len(source) // 8):
        batch = next(data)
        for row, index in enumerate(batch["example_index"]):
            np.testing.assert_array_equal(batch["response_ids"][row], tokenize(source[int(index)])["response_ids"])
        seen.extend(batch["example_index"].tolist())
    assert sorted(seen[:len(source)]) == list(range(len(source)))  # the first epoch: each example once
    assert max(seen) < len(source) and seen[len(source):2 * len(source)] != seen[:len(source)]  # reshuffled
    rows = np.concatenate([b["example_index"][b["valid"]] for b in eval_batches(spec, "train", tokenizer, 8)])
    np.testing.assert_array_equal(rows, np.arange(len(source)))


def _dpo_args(tiny: Path, data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["stage=dpo", f"run_dir={run_dir}", f"model.path={tiny}", f"data.dir={data_dir}", "data.name=good",
            "data.max_prompt_tokens=16", "data.max_response_tokens=12", "train.batch_size=8", "train.log_every=1",
            "train.eval_every=2", "train.save_every=2", "optim.lr=3e-3", "optim.schedule=constant", "dpo.beta=0.5",
            *extra]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _by_step(run_dir: Path, key: str) -> dict[int, float]:
    return {m["step"]: m[key] for m in _metrics(run_dir) if key in m}


@pytest.fixture(scope="module")
def live_run(tiny, data_dir, workdir) -> dict:
    """4 steps with the reference held live, then the same command with 6 steps: resumed at step 4."""
    run_dir = workdir / "live"
    first = run_quietly(main_cli.main, _dpo_args(tiny, data_dir, run_dir, "train.steps=4"))
    metrics_after_first = _metrics(run_dir) if first[0] == 0 else []
    second = run_quietly(main_cli.main, _dpo_args(tiny, data_dir, run_dir, "train.steps=6"))
    return {"dir": run_dir, "first": first, "second": second, "first_metrics": metrics_after_first}


def test_dpo_stage_logs_its_metrics_exports_a_policy_and_resumes(live_run, tiny, data_dir):
    for rc, _, err in (live_run["first"], live_run["second"]):
        assert rc == 0, err[-3000:]
    run_dir = live_run["dir"]
    assert re.search(r"resumed from .* at step 4\b", live_run["second"][2]), live_run["second"][2][-2000:]
    train_lines = [m for m in _metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in train_lines] == [1, 2, 3, 4, 5, 6]  # each step once, the first 4 kept
    assert [m for m in _metrics(run_dir) if m["step"] <= 4] == live_run["first_metrics"]
    for m in train_lines:  # a first step of a start or resume has no rate: its window is its compilation
        assert TRAIN_KEYS - ({"tokens_per_s"} if m["step"] in (1, 5) else set()) <= set(m), set(m)
        assert m["stage"] == "dpo" and m["prompts"] == 8 and m["pairs"] >= 8
        assert m["reward_margin"] == pytest.approx(m["reward_chosen"] - m["reward_rejected"], abs=1e-5)
    assert train_lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference: h = 0
    assert train_lines[0]["reward_chosen"] == pytest.approx(0.0, abs=1e-6) and train_lines[-1]["reward_margin"] > 0
    assert train_lines[-1]["loss"] < train_lines[0]["loss"]
    evals = [m for m in _metrics(run_dir) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [2, 4, 6]
    assert {"eval_" + k for k in ("loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy",
                                  "pairs", "prompts")} <= set(evals[0])
    held_out, _ = open_split(data_dir, "good", "eval")
    assert evals[0]["eval_prompts"] == len(held_out) > 0  # the whole held-out split, each prompt once
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stage"] == "dpo" and summary["steps"] == 6 and "eval_reward_accuracy" in summary
    base = load_model(tiny)
    for name in ("export", "best"):
        loaded = load_model(run_dir / name)
        assert loaded.head == "lm" and loaded.extra["role"] == "policy" and loaded.cfg == base.cfg
        check_role(loaded, name, "policy")
        assert jax.tree.structure(loaded.params) == jax.tree.structure(base.params)


def test_the_precomputed_tables_key_follows_what_the_log_probs_depend_on(tmp_path):
    """Tables are scored again when the reference's files, the dataset's, the data or model settings or the splits
    change (a resume allows some of those with a warning: the key is what rescores), not for DPO's own settings."""
    from rlhf_jax.config import load_config
    from rlhf_jax.stages.dpo_parts import tables_key

    for name in ("ref", "data/ds/1.0.0"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "file").write_text("a")
    base = ["stage=dpo", f"dpo.reference={tmp_path / 'ref'}", f"data.dir={tmp_path / 'data'}", "data.name=ds",
            "model.path=m"]
    key = lambda *more, splits=("train",): tables_key(load_config(None, [*base, *more]), tmp_path, splits)
    same = key()
    assert key("dpo.beta=0.5", "optim.lr=0.1", "train.steps=9") == same
    changed = [key("data.max_response_tokens=7"), key("data.chat_template=true"), key("model.dtype=bfloat16"),
               key(splits=("train", "eval"))]
    (tmp_path / "ref" / "file").write_text("b")  # the reference trained again
    changed.append(key())
    (tmp_path / "data" / "ds" / "1.0.0" / "file").write_text("b")  # the dataset prepared again
    changed.append(key())
    assert len({same, *changed}) == len(changed) + 1


def test_precomputed_reference_gives_the_live_losses_and_a_resumed_run_reads_its_tables(live_run, tiny, data_dir,
                                                                                        workdir, monkeypatch):
    """The same 4 + 6 steps with dpo.precompute_reference: the losses of the live run. The resumed run reads the
    tables the first one stored in the run directory and scores nothing; tables of another key are not read."""
    from rlhf_jax.stages import dpo_parts

    run_dir = workdir / "precomputed"
    args = lambda steps: _dpo_args(tiny, data_dir, run_dir, f"train.steps={steps}", "dpo.precompute_reference=true")
    rc, _, err = run_quietly(main_cli.main, args(4))
    assert rc == 0, err[-3000:]
    stored = run_dir / dpo_parts.TABLES
    assert dpo_parts.stored_tables(stored, "another key") is None
    with monkeypatch.context() as patch:
        patch.setattr(dpo_parts, "score_split", lambda *a, **k: pytest.fail("scored the reference again"))
        rc, _, err = run_quietly(main_cli.main, args(6))
    assert rc == 0, err[-3000:]
    assert f"the reference's log-probs from {stored}" in err and "resumed from" in err
    for key in ("loss", "reward_chosen", "reward_rejected", "eval_loss", "eval_reward_margin"):
        live, pre = _by_step(live_run["dir"], key), _by_step(run_dir, key)
        assert sorted(pre) == sorted(live) and len(set(live.values())) > 1, key
        for step in live:
            assert abs(pre[step] - live[step]) <= 1e-5, (key, step, pre, live)


def _assert_user_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_wrong_dataset_kind_and_reference_architecture_are_one_line_errors(tiny, data_dir, workdir):
    rc, _, err = run_quietly(main_cli.main, _dpo_args(tiny, data_dir, workdir / "bad_kind", "train.steps=2",
                                                      "data.name=rep"))
    _assert_user_error(rc, err, "data.name='rep' is a 'sft' dataset", "stage 'dpo' needs one of kind 'rankings'")
    other = build_tiny_model(workdir / "tiny_gpt2", seed=0, family="gpt2")
    rc, _, err = run_quietly(main_cli.main, _dpo_args(tiny, data_dir, workdir / "bad_reference", "train.steps=2",
                                                      f"dpo.reference={other}"))
    _assert_user_error(rc, err, f"dpo.reference={other}", "architecture differs")
    assert not (workdir / "bad_kind").exists() and not (workdir / "bad_reference").exists()


def test_a_reference_trained_on_templated_prompts_is_warned_of(tiny, data_dir, workdir):
    """dpo.reference is checked as model.path is: its export records that it trained on prompts in the chat
    template, which this run gives bare (data.chat_template false)."""
    from rlhf_jax.models.checkpoint import load_model
    from rlhf_jax.models.transformer import make_model
    from rlhf_jax.training import state as training_state

    loaded = load_model(tiny)
    reference = training_state.export(workdir / "chat_reference", loaded.params, loaded, make_model(loaded.cfg),
                                      chat_template=True)
    rc, _, err = run_quietly(main_cli.main, _dpo_args(tiny, data_dir, workdir / "chat_reference_run", "train.steps=1",
                                                      f"dpo.reference={reference}"))
    assert rc == 0 and f"warning: dpo.reference={reference}: trained on prompts wrapped in its tokenizer's chat " \
                       "template, given bare prompts here" in err, err


def test_resume_refuses_a_reference_replaced_at_its_path(tiny, data_dir, workdir):
    """dpo.reference is one of the models a run records: replaced by another model at the same path, the run
    does not resume against it."""
    reference = workdir / "reference_copy"
    shutil.copytree(tiny, reference)
    run_dir = workdir / "with_reference"
    args = lambda steps: _dpo_args(tiny, data_dir, run_dir, f"train.steps={steps}", f"dpo.reference={reference}",
                                   "train.eval_every=0")
    rc, _, err = run_quietly(main_cli.main, args(2))
    assert rc == 0, err[-2000:]
    shutil.rmtree(reference)
    build_tiny_model(reference, seed=1)
    rc, _, err = run_quietly(main_cli.main, args(3))
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert f"dpo.reference={reference.resolve()}: not the model or dataset the run started from" in \
        err.strip().splitlines()[-1]

"""LoRA in the training stages, end to end through the CLI: only the adapters (and a scalar head) train and are
checkpointed; export/ is the base with the adapters merged, and export_adapter/ loads with peft on the HF base
model with export/'s logits; a resumed run is bitwise the straight one; dpo's reference is the base without the
adapter; a LoRA model's logits at initialisation are the base model's exactly, and its in-block update equals
the merged weights.

The tiny model and the datasets are test_train's (its module fixtures, built here again)."""

from __future__ import annotations

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from cli_helpers import run_quietly
from hf_fixtures import VOCAB
from compile_helpers import jit_forward
from rlhf_jax import main as main_cli
from rlhf_jax.models import lora
from rlhf_jax.models.checkpoint import TrainCheckpoints, load_model
from rlhf_jax.models.transformer import ModelConfig, forward, init_params, make_model
from test_ppo import ppo_inputs  # noqa: F401
from test_train import _assert_trees_equal, _metrics, _rm_args, _sft_args, data_dir, tiny, workdir  # noqa: F401

TARGETS = ("q", "v", "gate", "down")  # k, o and up stay untouched: their weights must come out exactly as they went in


def _lora_args(*extra: str) -> list[str]:
    return ["lora.rank=4", "lora.alpha=8", f"lora.targets=[{','.join(TARGETS)}]", "optim.lr=1e-2",
            "train.eval_every=0", "train.log_every=1", *extra]


def _run(argv: list[str]) -> str:
    rc, out, err = run_quietly(main_cli.main, argv)
    assert rc == 0, err[-3000:]
    return out


def _peft_adapters(adapter_dir) -> dict:
    """{"layer_<i>": {target: {"a_IR", "b_RO"}}} read back from PEFT's file."""
    tensors = load_file(str(adapter_dir / lora.ADAPTER_WEIGHTS))
    out: dict = {}
    for name, x in tensors.items():
        if ".lora_" not in name:  # a whole weight of modules_to_save
            continue
        parts = name.split(".")
        i, module, kind = int(parts[4]), parts[6], parts[7]
        target = next(t for t, m in lora.HF_MODULES.items() if m.endswith(module))
        ab = out.setdefault(f"layer_{i}", {}).setdefault(target, {})
        ab["a_IR" if kind == "lora_A" else "b_RO"] = x.T
    return out


@pytest.fixture(scope="module")
def lora_sft(tiny, data_dir, workdir):
    """LoRA on TARGETS, with the norms and the LM head trained whole (lora.also_train)."""
    run_dir = workdir / "sft_lora"
    argv = _sft_args(tiny, data_dir, run_dir, *_lora_args("train.steps=4", "train.save_every=2",
                                                          "lora.also_train=[norms,lm_head]"))
    _run(argv)
    return {"dir": run_dir, "argv": argv}


def test_lora_sft_trains_and_checkpoints_only_the_adapters(lora_sft):
    ckpts = TrainCheckpoints(lora_sft["dir"] / "checkpoints", 2)
    params = json.dumps(ckpts.stored(ckpts.latest_step())[1][0])  # {param path: shape}
    assert "_lora" in params and "lm_head" in params and "final_norm/scale" in params, params[:300]
    assert "embed" not in params and "qkv" not in params, params[:300]
    losses = [m["loss"] for m in _metrics(lora_sft["dir"]) if "loss" in m]
    assert losses[-1] < losses[0], losses


@pytest.mark.filterwarnings("error:You have requested `ensure_weight_tying`:UserWarning")  # PEFT's: an untied model
def test_lora_exports_are_the_merged_model_and_a_peft_adapter_with_its_logits(lora_sft, tiny):
    import peft
    import torch
    import transformers

    base, exported = load_model(tiny), load_model(lora_sft["dir"] / "export")
    adapter_dir = lora_sft["dir"] / "export_adapter"
    config = json.loads((adapter_dir / lora.ADAPTER_CONFIG).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == str(tiny)
    assert config["modules_to_save"] == ["norm", "lm_head"]
    adapters = _peft_adapters(adapter_dir)
    assert sorted(adapters["layer_0"]) == sorted(TARGETS)
    assert all(np.abs(ab["b_RO"]).max() > 0 for layer in adapters.values() for ab in layer.values())  # trained
    spec = lora.LoraSpec(4, 8.0, TARGETS, also_train=("norms", "lm_head"))
    saved = load_file(str(adapter_dir / lora.ADAPTER_WEIGHTS))
    np.testing.assert_array_equal(saved["base_model.model.lm_head.weight"], exported.params["lm_head"].T)
    np.testing.assert_array_equal(saved["base_model.model.model.layers.1.post_attention_layernorm.weight"],
                                  exported.params["layer_1"]["mlp_norm"]["scale"])
    assert np.abs(exported.params["lm_head"] - base.params["lm_head"]).max() > 0  # trained whole
    trained_base = lora.join(lora.also_trained(exported.params, spec), base.params)
    expected = jax.device_get(lora.merge(trained_base, adapters, base.cfg, spec))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), exported.params, expected)
    # what nothing trains is the base, bit for bit
    K = base.cfg.q_per_kv
    _assert_trees_equal(exported.params["embed"], base.params["embed"])
    np.testing.assert_array_equal(exported.params["layer_0"]["attn"]["qkv"][:, :, K],
                                  base.params["layer_0"]["attn"]["qkv"][:, :, K])  # k
    np.testing.assert_array_equal(exported.params["layer_1"]["attn"]["o"], base.params["layer_1"]["attn"]["o"])

    ids = np.random.default_rng(0).integers(3, base.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        hf_base = transformers.AutoModelForCausalLM.from_pretrained(tiny).eval()
        theirs = peft.PeftModel.from_pretrained(hf_base, adapter_dir).eval()(input_ids=torch.tensor(ids)).logits
    ours = jit_forward(make_model(exported.cfg), exported.params, jnp.asarray(ids), jnp.ones(ids.shape, bool))
    np.testing.assert_allclose(theirs.numpy(), np.asarray(ours), atol=1e-4)


def test_lora_sft_resumes_bitwise(lora_sft, workdir):
    run_dir = workdir / "sft_lora_resumed"
    shutil.copytree(lora_sft["dir"], run_dir)
    for done in ("checkpoints/4", "export", "export_adapter", "summary.json"):
        shutil.rmtree(run_dir / done) if (run_dir / done).is_dir() else (run_dir / done).unlink()
    argv = [a if not a.startswith("run_dir=") else f"run_dir={run_dir}" for a in lora_sft["argv"]]
    _run(argv)
    _assert_trees_equal(load_model(run_dir / "export").params, load_model(lora_sft["dir"] / "export").params)


def test_lora_losses_on_a_mesh_of_8_are_one_devices(tiny, data_dir, workdir):
    """Adapters are replicated while the frozen base is sharded by its logical axes (fsdp and tensor): the same
    LoRA training (also_train norms) gives one device's losses step for step."""
    from test_train import MESH_STEPS, _mesh_args, _train_on_mesh

    args = [*_mesh_args("sft", tiny, data_dir), *_lora_args("lora.also_train=[norms]")]
    one = _train_on_mesh(args, workdir / "lora_mesh_1", (1, 1, 1), devices=jax.devices()[:1])
    eight = _train_on_mesh(args, workdir / "lora_mesh_8", (2, 2, 2))
    assert len(set(one.values())) == MESH_STEPS, one
    for step, loss in one.items():
        assert abs(eight[step] - loss) <= 1e-5, (step, one, eight)


def test_lora_rm_trains_adapters_and_its_scalar_head_and_exports_a_peft_classifier(tiny, data_dir, workdir):
    """export_adapter/ of a reward model is a sequence-classification adapter: on transformers' classifier of the
    base, peft gives export/'s rewards with the normalisation's gain (folded into `score`) applied."""
    import peft
    import torch
    import transformers

    run_dir = workdir / "rm_lora"
    _run(_rm_args(tiny, data_dir, run_dir, *_lora_args("train.steps=3", "train.save_every=3", "rm.normalize=bias_gain")))
    ckpts = TrainCheckpoints(run_dir / "checkpoints", 2)
    params = json.dumps(ckpts.stored(3)[1][0])
    assert "score" in params and "_lora" in params and "embed" not in params, params[:300]
    base, exported = load_model(tiny), load_model(run_dir / "export")
    assert exported.head == "scalar"
    _assert_trees_equal(exported.params["embed"], base.params["embed"])
    assert np.abs(exported.params["layer_0"]["mlp"]["wo"] - base.params["layer_0"]["mlp"]["wo"]).max() > 0

    adapter_dir = run_dir / "export_adapter"
    config = json.loads((adapter_dir / lora.ADAPTER_CONFIG).read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"], config
    norm = exported.extra["reward_norm"]
    saved_norm = json.loads((adapter_dir / "reward_norm.json").read_text())
    assert saved_norm["gain"] == 1.0 and saved_norm["folded_gain"] == norm["gain"] != 1.0, (saved_norm, norm)
    assert saved_norm["bias"] == norm["bias"]
    ids = np.random.default_rng(0).integers(3, base.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        hf_base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1).eval()
        hf_base.config.pad_token_id = 0  # never in `ids`: every row's last token is its last position
        theirs = peft.PeftModel.from_pretrained(hf_base, adapter_dir).eval()(input_ids=torch.tensor(ids)).logits
    ours = jit_forward(make_model(exported.cfg, "scalar"), exported.params, jnp.asarray(ids), jnp.ones(ids.shape, bool))
    np.testing.assert_allclose(theirs.numpy()[:, 0], np.asarray(ours)[:, -1] * norm["gain"], rtol=1e-4, atol=1e-4)


def test_lora_dpo_reference_is_the_base_without_the_adapter(tiny, data_dir, workdir):
    run_dir = workdir / "dpo_lora"
    argv = _rm_args(tiny, data_dir, run_dir, *_lora_args("train.steps=3", "train.save_every=0"))
    _run([a if a != "stage=rm" else "stage=dpo" for a in argv])
    rows = [m for m in _metrics(run_dir) if "loss" in m]
    np.testing.assert_allclose(rows[0]["loss"], np.log(2.0), rtol=1e-5)  # the policy starts as its reference
    # the implicit rewards measure the adapter against the base: a reference that had the adapter too reads 0
    assert abs(rows[-1]["reward_margin"]) > 1e-4, rows[-1]


def test_lora_dpo_reference_keeps_the_also_trained_weights_as_they_were(tiny, data_dir, workdir):
    """With the norms trained whole too, the reference is the base with the norms as they were: the first loss
    is exactly log 2, and the rewards move away from 0 as the norms and adapters train. The reference's log-probs
    scored once before training (dpo.precompute_reference) are the same: every step's losses and margins agree
    (a live reference that read the norms as trained so far would drift from them)."""
    rows = {}
    for precompute in (False, True):
        run_dir = workdir / f"dpo_lora_norms_{precompute}"
        _run([a if a != "stage=rm" else "stage=dpo" for a in _rm_args(
            tiny, data_dir, run_dir, *_lora_args("train.steps=3", "train.save_every=0", "lora.also_train=[norms]",
                                                 f"dpo.precompute_reference={str(precompute).lower()}"))])
        rows[precompute] = [m for m in _metrics(run_dir) if "loss" in m]
    np.testing.assert_allclose(rows[False][0]["loss"], np.log(2.0), rtol=1e-5)
    assert abs(rows[False][-1]["reward_margin"]) > 1e-4, rows[False][-1]
    assert [m["step"] for m in rows[True]] == [m["step"] for m in rows[False]]
    for live, stored in zip(rows[False], rows[True]):
        for key in ("loss", "reward_margin"):
            assert stored[key] == pytest.approx(live[key], rel=1e-5, abs=1e-6), (key, live, stored)


# ------------------------------------------------------------------------------------------------ the model


CFG = ModelConfig(family="qwen3", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  d_ff=48)


def test_a_fresh_lora_model_is_the_base_exactly_and_a_trained_one_its_merge():
    spec = lora.LoraSpec(rank=3, alpha=6.0, targets=lora.TARGETS)
    plain, adapted = make_model(CFG), make_model(CFG, lora=spec)
    base = jax.device_get(init_params(plain, jax.random.key(0)))
    fresh = lora.with_adapters(base, lora.init_adapters(CFG, spec, jax.random.key(1)))
    ids = jax.random.randint(jax.random.key(2), (2, 10), 0, VOCAB)
    mask = jnp.arange(10)[None] >= jnp.array([[0], [3]])  # one left-padded row
    run = jax.jit(lambda model, p: forward(model, p, ids, mask), static_argnums=0)
    np.testing.assert_array_equal(np.asarray(run(adapted, fresh)), np.asarray(run(plain, base)))
    leaves, tree = jax.tree.flatten(lora.adapters(fresh))
    keys = jax.random.split(jax.random.key(3), len(leaves))
    trained = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    params = lora.with_adapters(base, trained)
    in_block, merged = run(adapted, params), run(plain, lora.merged(params, CFG, spec))
    assert np.abs(np.asarray(in_block) - np.asarray(run(plain, base))).max() > 1e-2
    np.testing.assert_allclose(np.asarray(in_block), np.asarray(merged), atol=1e-5)
    trainable, frozen = lora.split(params, spec)
    assert lora.adapters(trainable) == lora.adapters(params) and "embed" in frozen and "embed" not in trainable
    _assert_trees_equal(lora.join(trainable, frozen), params)


# ------------------------------------------------------------------------------------------------ ppo


def test_lora_ppo_starts_at_its_reference_moves_away_from_it_and_exports(ppo_inputs):
    """The policy's reference is its base without the adapter: the KL is exactly 0 before the first update and
    grows after (a reference that had the adapter would stay at 0); the value model shares the reward model's
    base; only adapters and the value head are checkpointed."""
    from test_ppo import _ppo_args

    run_dir = ppo_inputs["root"] / "lora"
    _run(_ppo_args(ppo_inputs, run_dir, "train.steps=3", "train.save_every=3", "lora.rank=4", "lora.alpha=8",
                   "optim.lr=3e-2", "ppo.ema_decay=0.5", "lora.also_train=[norms]"))
    rows = [m for m in _metrics(run_dir) if "kl" in m]
    assert rows[0]["kl"] == 0.0 and max(abs(m["kl"]) for m in rows[1:]) > 1e-3, [m["kl"] for m in rows]  # k1: +-
    assert all(m["first_ratio_max"] == 1.0 for m in rows)
    policy, reward, value = (load_model(d) for d in (ppo_inputs["tiny"], ppo_inputs["rm"], run_dir / "export_value"))
    meta = TrainCheckpoints(run_dir / "checkpoints", 2).manager.item_metadata(3).state
    saved = " ".join(jax.tree_util.keystr(path) for path, _ in
                     jax.tree_util.tree_leaves_with_path(getattr(meta, "tree", meta)))
    assert "_lora" in saved and "score" in saved and "embed" not in saved and "'qkv'" not in saved, saved[:300]
    _assert_trees_equal(value.params["embed"], reward.params["embed"])
    assert np.abs(value.params["layer_0"]["mlp"]["wo"] - reward.params["layer_0"]["mlp"]["wo"]).max() > 0
    exported, adapters = load_model(run_dir / "export"), _peft_adapters(run_dir / "export_adapter")
    spec = lora.LoraSpec(4, 8.0, lora.TARGETS, also_train=("norms",))
    expected = lora.merge(lora.join(lora.also_trained(exported.params, spec), policy.params), adapters, policy.cfg,
                          spec)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), exported.params,
                 jax.device_get(expected))
    assert (run_dir / "export_ema").is_dir()
    value_adapter = json.loads((run_dir / "export_value_adapter" / lora.ADAPTER_CONFIG).read_text())
    assert value_adapter["task_type"] == "SEQ_CLS" and value_adapter["base_model_name_or_path"] == str(
        ppo_inputs["rm"]), value_adapter


def test_lora_ppo_holds_one_copy_of_the_policy_base(ppo_inputs):
    """The iteration's arguments (as lowered for the stage's program; the default mesh replicates params): with
    LoRA the policy base, the reward model and small adapters; the full fine-tuning program holds the policy twice
    (trained and reference), a value model and their moments."""
    from rlhf_jax.config import load_config
    from rlhf_jax.plan.programs import ppo_iteration_program
    from rlhf_jax.runtime import sharding

    policy = load_model(ppo_inputs["tiny"])
    mesh = sharding.mesh_from_config(load_config(None).mesh)
    args = lambda *extra: ppo_iteration_program(
        load_config(None, ["stage=ppo", "train.batch_size=16", "ppo.minibatches=2", "data.max_prompt_tokens=12",
                           "sampling.max_new_tokens=8", *extra]), policy.cfg, mesh).args_info
    nbytes = lambda info: sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(info))
    full, adapted = nbytes(args()), nbytes(args("lora.rank=4"))
    weights = sum(x.size * 4 for x in jax.tree.leaves(policy.params))  # float32
    assert weights * 2 <= adapted < weights * 2.2, (adapted, weights)  # policy base + reward model (+ adapters)
    assert full > weights * 5, (full, weights)  # two policies, value, reward, two optimizers' moments


def test_lora_grpo_reference_is_the_base_and_exports(ppo_inputs):
    from test_grpo import _args

    run_dir = ppo_inputs["root"] / "grpo_lora"
    _run(_args(ppo_inputs, run_dir, "grpo", f"grpo.reward_model={ppo_inputs['rm']}", "grpo.kl_coef=0.1",
               "train.steps=3", "train.save_every=0", "lora.rank=4", "lora.alpha=8", "optim.lr=3e-2"))
    rows = [m for m in _metrics(run_dir) if "kl" in m]
    assert rows[0]["kl"] == 0.0 and max(abs(m["kl"]) for m in rows[1:]) > 1e-3, [m["kl"] for m in rows]
    assert all(m["first_ratio_max"] == 1.0 for m in rows)
    policy, exported = load_model(ppo_inputs["tiny"]), load_model(run_dir / "export")
    expected = lora.merge(policy.params, _peft_adapters(run_dir / "export_adapter"), policy.cfg,
                          lora.LoraSpec(4, 8.0, lora.TARGETS))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), exported.params,
                 jax.device_get(expected))


# ------------------------------------------------------------------------------------------------ how well it learns


def test_lora_sft_on_the_demo_task_reaches_nine_tenths_of_full_finetunings_improvement(demo_run, tmp_path):
    """The demo's SFT (200 steps from the pretrained model, the demo's settings) in full fine-tuning and with
    LoRA (rank 16 on every projection, the norms trained whole, a learning rate 20 times higher, warmed up over
    50 steps): the best held-out loss's improvement over the starting model's, averaged over two seeds (data order
    and adapter initialisation). Warmed up over the full runs' 20 steps, a LoRA run could spike and end 10-20%
    short of full fine-tuning where another, different only in float32 rounding, matched it."""
    run = demo_run["dir"]
    common = ["stage=sft", f"model.path={run / 'pretrain' / 'export'}", f"data.dir={run / 'data'}", "data.name=demos",
              "data.max_prompt_tokens=16", "data.max_response_tokens=16", "train.batch_size=32",
              "train.save_every=0", "train.eval_every=25", "optim.warmup_steps=20", "optim.lr=1e-3"]
    best = {}
    for name, extra in (("start", ["train.steps=1", "optim.lr=0"]),
                        *((f"full_{seed}", ["train.steps=200", f"seed={seed}"]) for seed in (0, 1)),
                        *((f"lora_{seed}", ["train.steps=200", f"seed={seed}", "optim.lr=2e-2", "optim.warmup_steps=50",
                                            "lora.rank=16", "lora.alpha=32", "lora.also_train=[norms]"])
                          for seed in (0, 1))):
        _run([*common, f"run_dir={tmp_path / name}", *extra])
        best[name] = min(m["eval_loss"] for m in _metrics(tmp_path / name) if "eval_loss" in m)
    improvement = lambda kind: best["start"] - np.mean([best[f"{kind}_{seed}"] for seed in (0, 1)])
    full, adapted = improvement("full"), improvement("lora")
    print(f"improvement: full {full:.4f}, lora {adapted:.4f} ({adapted / full:.0%}); {best}")
    assert full > 0.05 and adapted >= 0.9 * full, best


def test_evaluation_reads_a_lora_runs_checkpoint_as_its_merged_policy(lora_sft):
    from rlhf_jax.eval.policies import load_policy, policy_sources

    source, = policy_sources([str(lora_sft["dir"])])
    assert source.step == 4
    policy = load_policy(source, {})
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), policy.params,
                 load_model(lora_sft["dir"] / "export").params)


def test_evaluation_merges_a_lora_checkpoint_on_a_bf16_base_in_float32_as_export_does(tiny, data_dir, workdir):
    """Merged in bfloat16, base + delta would be rounded where export/ keeps float32: other logits than export/'s."""
    from rlhf_jax.eval.policies import load_policy, policy_sources

    run_dir = workdir / "sft_lora_bf16"
    _run(_sft_args(tiny, data_dir, run_dir, *_lora_args("train.steps=2", "train.save_every=2",
                                                        "model.param_dtype=bfloat16")))
    source, = policy_sources([str(run_dir)])
    policy, export = load_policy(source, {}).params, load_model(run_dir / "export").params
    assert jax.tree.leaves(export)[0].dtype == np.float32
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), b), policy, export)


def test_whole_weights_in_bf16_are_warned_about_and_indeed_barely_train(tiny, data_dir, workdir):
    """AdamW steps of about lr (1e-5) are below half a bfloat16 step of nearly every weight: the warning says so,
    and the run shows it (float32 params move most weights in the same two steps)."""
    base = jax.tree.leaves(load_model(tiny).params)
    moved = {}
    for dtype in ("bfloat16", "float32"):
        run_dir = workdir / f"sft_whole_{dtype}"
        rc, _, err = run_quietly(main_cli.main, _sft_args(tiny, data_dir, run_dir, "train.steps=2", "optim.lr=1e-5",
                                                          "train.eval_every=0", f"model.param_dtype={dtype}"))
        assert rc == 0, err[-2000:]
        assert ("warning: model.param_dtype=bfloat16: AdamW moves a weight by about optim.lr (1e-05)" in err) == (
            dtype == "bfloat16"), err[-2000:]
        after = jax.tree.leaves(load_model(run_dir / "export").params)
        start = [np.asarray(jnp.asarray(b, dtype), np.float32) for b in base]
        moved[dtype] = (sum(int(np.sum(a != b)) for a, b in zip(after, start)) /
                        sum(b.size for b in start))
    assert moved["bfloat16"] < moved["float32"] / 4, moved  # measured: 12% against 78% (unused tokens' rows stay)

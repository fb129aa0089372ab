"""A scanned layer stack (`model.scan_layers`): the loop's logits, cached decode and gradients from params stacked
on a layer axis, in every family (layers that mix sliding and full attention scan their flags); checkpoints and
exports keep one subtree per layer; one compiled body whatever the depth; a stage trains as unscanned."""

import dataclasses
import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from test_families import _left_padded_batch, random_params
from test_families import tiny as tiny_cfg
from test_train import MESH_STEPS, _mesh_args, _train_on_mesh, data_dir, one_device_losses, tiny, workdir  # noqa: F401
from compile_helpers import jit_forward
from rlhf_jax.config import load_config
from rlhf_jax.models import lora
from rlhf_jax.models.architecture import FULL, SLIDING
from rlhf_jax.models.checkpoint import load_model
from rlhf_jax.models.hf_weights import params_to_hf
from rlhf_jax.models.layer_stack import STACKED, stack_layers, unstack_layers
from rlhf_jax.models.sampling import SamplingParams, sample
from rlhf_jax.models.transformer import (
    SCAN_LAYERS_ABOVE, KVCache, forward, init_params, make_model, param_logical_axes, params_for, positions_from_mask,
)

# gemma3: 3 layers sliding/full/sliding with a local RoPE base; gemma2: soft-caps and mixed layers; mistral: every
# layer slides (a static flag); qwen3: QK norms, full then sliding.
FAMILIES = ["gemma3", "gemma2", "mistral", "qwen3"]


def _pair(family: str, **changes):
    cfg = tiny_cfg(family, **changes)
    loop, scanned = make_model(cfg, scan_layers=False), make_model(cfg, scan_layers=True)
    params = random_params(cfg)
    return cfg, loop, scanned, params, params_for(scanned, params)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_scanned_stack_gives_the_loops_logits(family):
    _, loop, scanned, params, stacked = _pair(family)
    ids, mask = _left_padded_batch(seed=1)
    run = jax.jit(forward, static_argnums=0)
    np.testing.assert_allclose(np.asarray(run(scanned, stacked, ids, mask))[mask],
                               np.asarray(run(loop, params, ids, mask))[mask], atol=1e-6)


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_cached_decode_and_sampling_through_the_stacked_cache(family):
    """Prefill past the window, then one slot at a time: the scanned stack writes the cache the loop writes and
    gives its logits, which are the uncached pass's; the sampler draws the loop's tokens."""
    cfg, loop, scanned, params, stacked = _pair(family)
    ids, mask = _left_padded_batch(seed=2)
    step = jax.jit(lambda model, p, *args: model.apply({"params": p}, *args), static_argnums=0)
    positions = np.asarray(positions_from_mask(mask))
    outs = {}
    for name, model, p in (("loop", loop, params), ("scanned", scanned, stacked)):
        cache = KVCache.zeros(cfg, *ids.shape, stacked=model.scan_layers)
        key_mask = np.concatenate([mask[:, :7], np.zeros_like(mask[:, 7:])], axis=1)
        logits, cache = step(model, p, ids[:, :7], positions[:, :7], key_mask, cache, 0)
        steps = [np.asarray(logits)]
        for t in range(7, ids.shape[1]):
            key_mask[:, t] = mask[:, t]
            logits, cache = step(model, p, ids[:, t:t + 1], positions[:, t:t + 1], key_mask, cache, t)
            steps.append(np.asarray(logits))
        outs[name] = np.concatenate(steps, axis=1), cache
    np.testing.assert_allclose(outs["scanned"][0][mask], outs["loop"][0][mask], atol=1e-6)
    full = np.asarray(jax.jit(forward, static_argnums=0)(loop, params, ids, mask))  # no cache: the oracle of both
    np.testing.assert_allclose(outs["scanned"][0][mask], full[mask], atol=1e-5)
    for a, b in zip(outs["scanned"][1], map(np.stack, outs["loop"][1])):  # keys and values of order 1, float32 rounding
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)

    p = SamplingParams(max_new_tokens=6, temperature=1.0, eos_ids=(1,))
    draw = jax.jit(lambda model, w: sample(model, w, ids, mask, jax.random.key(3), p), static_argnums=0)
    a, b = draw(loop, params), draw(scanned, stacked)
    np.testing.assert_array_equal(np.asarray(a.tokens_BN), np.asarray(b.tokens_BN))
    np.testing.assert_allclose(np.asarray(a.logprobs_BN), np.asarray(b.logprobs_BN), atol=1e-5)


@pytest.mark.parametrize("remat", [False, True])
def test_gradients_are_the_loops_stacked(remat):
    cfg = tiny_cfg("gemma3")
    params = random_params(cfg)
    ids, mask = _left_padded_batch(seed=3)
    loss = lambda model, p: jnp.sum(jnp.where(mask[..., None], forward(model, p, ids, mask), 0.0) ** 2) / 1e3
    grad = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)
    scanned = make_model(cfg, remat=remat, scan_layers=True)
    g_loop = stack_layers(jax.device_get(grad(make_model(cfg), params)), cfg.n_layers)
    g_scan = jax.device_get(grad(scanned, params_for(scanned, params)))
    assert jax.tree.structure(g_scan) == jax.tree.structure(g_loop)
    for path, a in jax.tree_util.tree_leaves_with_path(g_scan):
        b = g_loop
        for k in path:
            b = b[k.key]
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_lora_adapters_scan_with_their_layers_and_leave_in_the_per_layer_layout():
    """A LoRA model's adapters stack like the weights they adapt; merging and PEFT's export read either layout."""
    cfg = tiny_cfg("qwen3", n_layers=3, layer_types=(FULL, SLIDING, FULL))
    spec = lora.LoraSpec(rank=2, alpha=4, targets=("q", "v", "down"), also_train=("norms",))
    loop, scanned = make_model(cfg, lora=spec, scan_layers=False), make_model(cfg, lora=spec, scan_layers=True)
    adapters = jax.tree.map(lambda x: x + 0.1, lora.init_adapters(cfg, spec, jax.random.key(1)))  # B != 0
    params = lora.with_adapters(random_params(cfg), jax.device_get(adapters))
    stacked = params_for(scanned, params)
    ids, mask = _left_padded_batch(seed=4)
    np.testing.assert_allclose(np.asarray(jit_forward(scanned, stacked, ids, mask))[mask],
                               np.asarray(jit_forward(loop, params, ids, mask))[mask], atol=1e-6)
    trainable, frozen = lora.split(stacked, spec)
    assert set(trainable) == {STACKED, "final_norm"} and "attn_norm" in trainable[STACKED]
    assert jax.tree.structure(lora.adapters(stacked)) == jax.tree.structure(lora.adapters(params))
    merged = lora.merged(stacked, cfg, spec)
    assert "layer_0" in merged and STACKED not in merged
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(lora.merged(params, cfg, spec))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_layouts_convert_both_ways_and_match_the_models_own():
    cfg = tiny_cfg("gemma3")
    scanned = make_model(cfg, scan_layers=True)
    params = random_params(cfg)
    stacked = params_for(scanned, params)
    assert STACKED in stacked and "layer_0" not in stacked
    assert stacked[STACKED]["attn"]["qkv"].shape == (cfg.n_layers, *params["layer_0"]["attn"]["qkv"].shape)
    np.testing.assert_array_equal(stacked[STACKED]["mlp"]["wo"][2], params["layer_2"]["mlp"]["wo"])
    shapes = jax.eval_shape(lambda: init_params(scanned, jax.random.key(0)))
    assert jax.tree.map(np.shape, shapes) == jax.tree.map(np.shape, stacked)
    back = unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert params_for(make_model(cfg, scan_layers=False), stacked).keys() == params.keys()
    # the layer axis is never split over the mesh; the rest keeps its names
    assert tuple(param_logical_axes(scanned)[STACKED]["attn"]["qkv"]) == (
        STACKED, "embed", "kv_heads", None, "head_dim")


def test_hf_weights_of_a_scanned_models_params_are_the_loops():
    cfg = tiny_cfg("qwen3")
    params = random_params(cfg)
    stacked = params_for(make_model(cfg, scan_layers=True), params)
    hf_loop, hf_scanned = params_to_hf(params, cfg), params_to_hf(stacked, cfg)
    assert hf_scanned.keys() == hf_loop.keys()
    for name, x in hf_loop.items():
        np.testing.assert_array_equal(hf_scanned[name], x)


def test_deeper_models_scan_by_default():
    deep = tiny_cfg("qwen3", n_layers=SCAN_LAYERS_ABOVE + 1, layer_types=())
    assert make_model(deep).scan_layers and not make_model(tiny_cfg("qwen3", n_layers=SCAN_LAYERS_ABOVE,
                                                                     layer_types=())).scan_layers
    assert not make_model(deep, scan_layers=False).scan_layers
    assert load_config(None, ["model.scan_layers=true"]).model.scan_layers is True
    assert load_config(None, []).model.scan_layers is None


def _program_lines(n_layers: int, scan: bool) -> int:
    cfg = tiny_cfg("gemma3", n_layers=n_layers, layer_types=(SLIDING, FULL) * (n_layers // 2))
    model = make_model(cfg, scan_layers=scan)
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    ids, mask = jnp.zeros((2, 8), jnp.int32), jnp.ones((2, 8), bool)
    grad = jax.jit(jax.grad(lambda p: forward(model, p, ids, mask).sum()))
    return len(grad.lower(shapes).as_text().splitlines())


def test_one_compiled_body_whatever_the_depth():
    """What the compiler is given (and so its time) does not grow with depth when the layers scan; the loop's
    program grows with every layer."""
    assert _program_lines(32, scan=True) == _program_lines(4, scan=True)
    assert _program_lines(12, scan=False) > 2 * _program_lines(4, scan=False)


def test_a_scanned_stage_trains_as_the_loop_and_exports_per_layer(tiny, data_dir, workdir, one_device_losses):
    """SFT with model.scan_layers=true on a (2, 2, 2) mesh logs one unscanned device's losses, and its export is an
    ordinary checkpoint (one subtree per layer) that loads anywhere."""
    run_dir = workdir / "scanned_sft"
    losses = _train_on_mesh([*_mesh_args("sft", tiny, data_dir), "model.scan_layers=true"], run_dir, (2, 2, 2))
    reference = one_device_losses("sft")
    assert len(losses) == MESH_STEPS and all(abs(losses[s] - reference[s]) <= 1e-5 for s in reference), (
        losses, reference)
    assert json.loads((run_dir / "config.json").read_text())["model"]["scan_layers"] is True
    exported = load_model(run_dir / "export")
    assert "layer_0" in exported.params and STACKED not in exported.params


def test_generation_scans_a_deep_checkpoint_and_writes_what_the_loop_writes(tmp_path, monkeypatch):
    """A checkpoint of more than SCAN_LAYERS_ABOVE layers (one subtree per layer on disk) is stacked on load by
    the generator, which then samples the loop's tokens and log-probs."""
    from rlhf_jax.models import transformer
    from rlhf_jax.models.checkpoint import save_model
    from rlhf_jax.models.generation import Generator
    from rlhf_jax.models.tiny import build_tiny_model
    from rlhf_jax.runtime import sharding

    small = load_model(build_tiny_model(tmp_path / "tiny"), need_tokenizer=True)
    cfg = dataclasses.replace(small.cfg, n_layers=SCAN_LAYERS_ABOVE + 1)
    params = jax.device_get(init_params(make_model(cfg, scan_layers=False), jax.random.key(5)))
    deep = load_model(save_model(tmp_path / "deep", params, cfg, "lm", small.tokenizer_dir), need_tokenizer=True)
    assert "layer_0" in deep.params
    mesh = sharding.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    prompts = ["the cat sat", "a long road home", "x"]

    def generated():
        gen = Generator(deep, mesh, SamplingParams(max_new_tokens=6, temperature=1.0))
        return gen.model.scan_layers, list(gen.generate(prompts, batch_size=4, max_prompt_tokens=16, seed=1,
                                                        progress=False))

    scanned, records = generated()
    monkeypatch.setattr(transformer, "SCAN_LAYERS_ABOVE", 64)
    looped, expected = generated()
    assert scanned and not looped
    assert [r["ids"] for r in records] == [r["ids"] for r in expected]
    np.testing.assert_allclose(sum((r["logprobs"] for r in records), []),
                               sum((r["logprobs"] for r in expected), []), atol=1e-5)

"""The sharding report: one row per parameter kind, bytes that add up, and a warning per replicated fallback."""

import math

import jax
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax.models.transformer import ModelConfig, init_params, make_model, param_logical_axes
from rlhf_jax.runtime import sharding

AXES = ("data", "fsdp", "tensor")

# vocab 257 divides by no mesh axis; everything else divides by 8.
GPT2 = ModelConfig("gpt2", vocab_size=257, d_model=32, n_layers=2, n_heads=8, n_kv_heads=8, head_dim=4, d_ff=64,
                   max_position_embeddings=64)
# 4 KV heads: tensor=8 cannot split them (Qwen2.5-7B's case), tensor<=4 can.
LLAMA = ModelConfig("llama", vocab_size=256, d_model=32, n_layers=3, n_heads=8, n_kv_heads=4, head_dim=4, d_ff=64)


def _report(cfg, mesh_shape, **kw):
    model = make_model(cfg)
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    mesh = sharding.make_mesh(mesh_shape, AXES)
    axes = param_logical_axes(model)
    return sharding.sharding_report(axes, shapes, mesh, **kw), axes, shapes, mesh


@pytest.mark.parametrize("mesh_shape", [(1, 1, 8), (2, 1, 4)])
def test_undivided_vocab_warns_once_naming_embed_and_lm_head(mesh_shape):
    report, *_ = _report(GPT2, mesh_shape)
    tensor = mesh_shape[2]
    assert report.fallbacks == [f"warning: sharding: 'vocab' dim 257 of embed, lm_head is not divisible by mesh "
                                f"axis tensor={tensor}; replicated along tensor"]


def test_four_kv_heads_on_tensor_8_warn():
    report, *_ = _report(LLAMA, (1, 1, 8))
    assert report.fallbacks == ["warning: sharding: 'kv_heads' dim 4 of layer_*/attn/qkv is not divisible by mesh "
                                "axis tensor=8; replicated along tensor"]


@pytest.mark.parametrize("mesh_shape", [(2, 1, 4), (2, 2, 2), (1, 8, 1), (8, 1, 1)])
def test_no_warnings_when_everything_divides(mesh_shape):
    report, *_ = _report(LLAMA, mesh_shape)
    assert report.fallbacks == []


def test_size_one_axis_and_axis_taken_elsewhere_are_not_fallbacks():
    mesh = sharding.make_mesh((8, 1, 1), AXES)
    assert sharding.resolve_spec(("vocab", "embed"), (257, 7), mesh) == (P(None, None), [])
    mesh = sharding.make_mesh((1, 1, 8), AXES)
    assert sharding.resolve_spec(("heads", "mlp"), (8, 8), mesh) == (P("tensor", None), [])
    spec, fallbacks = sharding.resolve_spec(("heads", "mlp"), (7, 8), mesh)
    assert spec == P(None, "tensor")
    assert fallbacks == [sharding.Fallback("heads", 7, "tensor", (("tensor", 8),))]


@pytest.mark.parametrize("cfg,mesh_shape", [(GPT2, (2, 1, 4)), (LLAMA, (2, 2, 2)), (LLAMA, (1, 1, 8))])
def test_bytes_add_up(cfg, mesh_shape):
    report, axes, shapes, mesh = _report(cfg, mesh_shape)
    leaves = jax.tree.leaves(shapes)
    assert sum(k.count for k in report.kinds) == len(leaves)
    assert report.bytes_total == sum(x.size * x.dtype.itemsize for x in leaves)
    assert report.bytes_per_device == sum(k.bytes_per_device for k in report.kinds)
    for kind in report.kinds:
        ways = math.prod(mesh.shape[a] for e in kind.spec if e for a in ((e,) if isinstance(e, str) else e))
        assert kind.bytes_per_device * ways == kind.bytes_total
    # Independently: what each device holds under the shardings that place the params.
    shards = jax.tree.leaves(sharding.param_shardings(axes, shapes, mesh))
    held = sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for s, x in zip(shards, leaves))
    assert report.bytes_per_device == held


def test_split_dim_divides_bytes_by_its_ways():
    report, *_ = _report(LLAMA, (2, 1, 4))
    rows = {k.kind: k for k in report.kinds}
    wo = rows["layer_*/mlp/wo"]
    assert (wo.count, wo.spec) == (3, P("tensor", None))
    assert wo.bytes_total == 3 * 64 * 32 * 4 and wo.bytes_per_device == wo.bytes_total // 4
    norm = rows["final_norm/scale"]
    assert norm.spec == P(None) and norm.bytes_per_device == norm.bytes_total


def test_dtype_overrides_leaf_dtype():
    as_f32, *_ = _report(LLAMA, (2, 1, 4))
    as_bf16, *_ = _report(LLAMA, (2, 1, 4), dtype="bfloat16")
    assert as_bf16.bytes_total * 2 == as_f32.bytes_total
    assert as_bf16.bytes_per_device * 2 == as_f32.bytes_per_device


@pytest.mark.parametrize("cfg,mesh_shape", [(GPT2, (1, 1, 8)), (LLAMA, (2, 2, 2)), (LLAMA, (1, 1, 8))])
def test_report_spec_agrees_with_param_shardings(cfg, mesh_shape):
    report, axes, shapes, mesh = _report(cfg, mesh_shape)
    rows = {(k.kind, k.shape): k.spec for k in report.kinds}
    placed, _ = jax.tree_util.tree_flatten_with_path(sharding.param_shardings(axes, shapes, mesh))
    for (path, named), x in zip(placed, jax.tree.leaves(shapes)):
        assert rows[sharding.param_kind(path), x.shape] == named.spec, path


def test_param_kind_collapses_layer_indices():
    path = (jax.tree_util.DictKey("layer_12"), jax.tree_util.DictKey("attn"), jax.tree_util.DictKey("qkv"))
    assert sharding.param_kind(path) == "layer_*/attn/qkv"
    assert sharding.param_kind((jax.tree_util.SequenceKey(3), jax.tree_util.DictKey("fc1"))) == "*/fc1"


def test_printed_report_is_a_table_then_each_warning_once(capsys):
    report, *_ = _report(GPT2, (2, 1, 4))
    sharding.print_sharding_report(report)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "sharding: params over mesh data=2 fsdp=1 tensor=4 (8 devices)"
    assert len(err) == 2 + len(report.kinds) + 1 + 1  # header, column names, kinds, total, one warning
    assert err[-2].split()[:2] == ["total", str(sum(k.count for k in report.kinds))]
    assert [line for line in err if line.startswith("warning:")] == report.fallbacks
    # Layers collapse: each kind appears once however many layers there are.
    assert sum("layer_*/attn/qkv " in line for line in err) == 1
    assert not any("layer_0" in line for line in err)


def test_a_mesh_short_of_cpu_devices_says_how_many_each_process_makes(monkeypatch):
    """XLA's device count flag is per process: with 2 processes, 8 each make 16."""
    devices = jax.devices()
    with pytest.raises(sharding.MeshError, match=r"needs 16 devices, found 8 \(on CPU, XLA_FLAGS="
                       r"--xla_force_host_platform_device_count=16 makes 16\)$"):
        sharding.make_mesh((16, 1, 1), ("data", "fsdp", "tensor"), devices)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(sharding.MeshError, match=r"needs 16 devices, found 8 \(on CPU, XLA_FLAGS="
                       r"--xla_force_host_platform_device_count=8 in each of the 2 processes makes 16\)$"):
        sharding.make_mesh((16, 1, 1), ("data", "fsdp", "tensor"), devices)


def test_mesh_presets_set_the_shape_and_check_the_device_count():
    from rlhf_jax.config import config_from_dict
    from rlhf_jax.typed_yaml import ConfigError

    mesh = sharding.mesh_from_config(config_from_dict({"mesh": {"preset": "8xH100"}}).mesh)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(sharding.MeshError, match=r"mesh.preset 2x8xH100 needs 16 devices, found 8 \(1 processes\) "
                       r"\(on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=16 makes 16\)"):
        sharding.mesh_from_config(config_from_dict({"mesh": {"preset": "2x8xH100"}}).mesh)
    with pytest.raises(ConfigError, match="mesh.preset.*not both"):
        config_from_dict({"mesh": {"preset": "8xH100", "shape": [2, 4, 1]}})
    with pytest.raises(ConfigError, match="mesh.preset.*unknown"):
        config_from_dict({"mesh": {"preset": "v9-1"}})
    for name, (shape, axes) in sharding.MESH_PRESETS.items():  # every preset splits params over fsdp
        assert len(shape) == len(axes) and shape[axes.index("fsdp")] > 1, name


def test_fsdp_splits_the_model_width_tensor_the_heads_mlp_and_vocab_and_batches_split_over_both_batch_axes():
    """The split a real model gets on a data x fsdp x tensor mesh: weights over fsdp on their model-width side
    and over tensor on their heads / mlp / vocabulary side; activations' rows over data and fsdp together."""
    mesh = sharding.make_mesh((1, 2, 4), ("data", "fsdp", "tensor"))
    cfg = ModelConfig("llama", vocab_size=512, d_model=64, n_layers=1, n_heads=4, n_kv_heads=4, head_dim=16, d_ff=128)
    model = make_model(cfg)
    specs = jax.tree.map(lambda axes, x: sharding.logical_to_spec(tuple(axes), x.shape, mesh),
                         param_logical_axes(model), jax.eval_shape(lambda: init_params(model, jax.random.key(0))),
                         is_leaf=lambda x: isinstance(x, P))
    layer = specs["layer_0"]
    assert layer["mlp"]["wi"] == P("fsdp", None, "tensor") and layer["mlp"]["wo"] == P("tensor", "fsdp")
    assert layer["attn"]["qkv"] == P("fsdp", "tensor", None, None) and layer["attn"]["o"] == P("tensor", None, "fsdp")
    assert specs["embed"] == P("tensor", "fsdp") and specs["lm_head"] == P("fsdp", "tensor")
    mesh = sharding.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"))
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
    sharding.check_batch_size(8, mesh, "train.batch_size")
    with pytest.raises(sharding.MeshError, match="train.batch_size"):
        sharding.check_batch_size(4, mesh, "train.batch_size")

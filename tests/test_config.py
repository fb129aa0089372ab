import dataclasses
import json

import pytest

from rlhf_jax.config import (
    Config,
    MeshSection,
    OptimSection,
    SamplingSection,
    config_from_dict,
    config_help,
    config_to_dict,
    load_config,
)
from rlhf_jax.typed_yaml import ConfigError


def _error(overrides=(), path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def _write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_when_no_file():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.stage == "generate"
    assert cfg.mesh.shape == (-1, 1, 1)
    assert cfg.mesh.axes == ("data", "fsdp", "tensor")
    assert cfg.optim.lr == 1e-5 and cfg.optim.schedule == "cosine"
    assert cfg.sampling.top_p == 1.0


def test_yaml_file_with_nested_sections(tmp_path):
    path = _write(tmp_path, """
stage: generate
seed: 3
model:
  dtype: bfloat16
  remat: block
sampling:
  temperature: 0
  top_k: 40
optim:
  lr: 3e-4
""")
    cfg = load_config(path)
    assert cfg.stage == "generate" and cfg.seed == 3
    assert cfg.model.dtype == "bfloat16" and cfg.model.remat == "block"
    assert cfg.model.param_dtype == "float32"  # untouched keys keep defaults
    assert cfg.sampling.temperature == 0.0 and isinstance(cfg.sampling.temperature, float)
    assert cfg.sampling.top_k == 40
    # YAML 1.1 reads 3e-4 as a string; float fields still accept it.
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)


def test_overrides_apply_on_top_of_file(tmp_path):
    path = _write(tmp_path, "optim:\n  lr: 0.1\nmesh:\n  shape: [1, 1, 1]\n")
    cfg = load_config(path, ["optim.lr=1e-5", "mesh.shape=[2,2,2]", "optim.lr=2e-5"])
    assert cfg.optim.lr == 2e-5 and isinstance(cfg.optim.lr, float)  # last one wins
    assert cfg.mesh.shape == (2, 2, 2)
    assert len(cfg.mesh.axes) == 3


def test_override_value_types():
    cfg = load_config(None, [
        "optim.lr=1e-5",
        "sampling.temperature=1",  # ints are fine for float fields
        "model.remat=block",
        "mesh.shape=[4, 2]",
        "mesh.axes=[data, tensor]",
        "run_dir=2024",  # string fields take the text as written
        "model.path=",
    ])
    assert cfg.optim.lr == 1e-5
    assert cfg.sampling.temperature == 1.0 and isinstance(cfg.sampling.temperature, float)
    assert cfg.model.remat == "block"
    assert cfg.mesh.shape == (4, 2) and cfg.mesh.axes == ("data", "tensor")
    assert cfg.run_dir == "2024" and cfg.model.path == ""
    # a '#' is text, not a YAML comment (a token or a path may hold one); quotes are YAML's
    cfg = load_config(None, ["run_dir=out #1", "label.token=ab #c", "model.path='a b'"])
    assert (cfg.run_dir, cfg.label.token, cfg.model.path) == ("out #1", "ab #c", "a b")


def test_empty_section_means_defaults(tmp_path):
    assert load_config(_write(tmp_path, "optim:\n", "b.yaml")) == Config()


@pytest.mark.parametrize("override, suggestion", [
    ("optim.lrr=1e-5", "'optim.lr'"),
    ("stag=generate", "'stage'"),
    ("sampleing.temperature=0.5", "'sampling.temperature'"),
])
def test_unknown_override_key_suggests_closest(override, suggestion):
    message = _error([override])
    assert "unknown key" in message and suggestion in message
    assert repr(override.split("=")[0]) in message


@pytest.mark.parametrize("text, key, suggestion", [
    ("optim:\n  lrr: 0.1\n", "'optim.lrr'", "'optim.lr'"),
    ("stag: generate\n", "'stag'", "'stage'"),
    ("sampleing:\n  temperature: 0.5\n", "'sampleing.temperature'", "'sampling.temperature'"),
])
def test_unknown_yaml_key_suggests_closest(tmp_path, text, key, suggestion):
    path = _write(tmp_path, text)
    message = _error(path=path)
    assert key in message and suggestion in message and path in message


def test_integers_read_as_yaml_1_2_reads_them(tmp_path):
    """YAML 1.1 read `010` as octal 8 and `1:30` as base-60 90: a value changed without a word."""
    assert load_config(None, ["sampling.top_k=010"]).sampling.top_k == 10
    assert load_config(_write(tmp_path, "sampling:\n  top_k: 010\n"), []).sampling.top_k == 10
    assert load_config(None, ["sampling.top_k=0x10", "train.steps=+5"]).sampling.top_k == 16
    assert _error(["sampling.top_k=1:30"]) == "'sampling.top_k' expects an int, got '1:30'"


def test_a_dotted_key_in_a_file_is_told_to_nest(tmp_path):
    path = _write(tmp_path, "optim.lr: 0.001\n")
    assert _error(path=path) == (f"config file {path!r}: unknown key 'optim.lr': a YAML file nests it (optim: {{lr: "
                                 "...}); optim.lr=... is the command line's form")


def test_unknown_key_in_dict():
    with pytest.raises(ConfigError, match="did you mean 'optim.lr'"):
        config_from_dict({"optim": {"lrr": 1.0}})


def test_an_unknown_key_is_matched_within_its_section():
    # across all keys difflib would offer 'eval.reward_model'; the model section has nothing close, so it is listed
    assert _error(["model.d_modell=3"]) == ("unknown key 'model.d_modell' (the section 'model' has path, dtype, "
                                            "param_dtype, remat, scan_layers)")
    assert _error(["ppo.kl_coeff=0.1"]) == "unknown key 'ppo.kl_coeff' (did you mean 'ppo.kl_coef'?)"
    assert _error(["sampleing.temperature=1"]) == ("unknown key 'sampleing.temperature' (did you mean "
                                                   "'sampling.temperature'?)")


@pytest.mark.parametrize("override, key, fragment", [
    ("sampling.max_new_tokens=abc", "'sampling.max_new_tokens'", "expects an int, got 'abc'"),
    ("sampling.temperature=abc", "'sampling.temperature'", "expects a float, got 'abc'"),
    ("sampling.max_new_tokens=true", "'sampling.max_new_tokens'", "expects an int"),
    ("optim.lr=true", "'optim.lr'", "expects a float"),
    ("sampling.max_new_tokens=1.5", "'sampling.max_new_tokens'", "expects an int"),
    ("mesh.shape=[2,x]", "'mesh.shape'", "expects a list of int"),
    ("mesh.shape=4", "'mesh.shape'", "expects a list of int"),
    ("model.remat=true", "'model.remat'", "must be one of ['none', 'block']"),
    ("stage=sf", "'stage'", "did you mean 'sft'"),
    ("optim.lr=.inf", "'optim.lr'", "finite"),
    ("data.chat_template='true'", "'data.chat_template'", "got the string 'true' (quoted; write it without quotes)"),
    ("train.steps=\"5\"", "'train.steps'", "got the string '5' (quoted; write it without quotes)"),
])
def test_wrong_type(override, key, fragment):
    message = _error([override])
    assert key in message and fragment in message


@pytest.mark.parametrize("overrides, key, fragment", [
    (["sampling.top_p=1.5"], "'sampling.top_p'", "must be in (0, 1], got 1.5"),
    (["sampling.top_p=0"], "'sampling.top_p'", "(0, 1]"),
    (["sampling.temperature=-1"], "'sampling.temperature'", "must be 0 (greedy) or a finite number >= 1e-06"),
    (["sampling.temperature=1e-9"], "'sampling.temperature'", "or a finite number >= 1e-06, got 1e-09"),
    (["sampling.max_new_tokens=0"], "'sampling.max_new_tokens'", "> 0"),
    (["optim.b2=1"], "'optim.b2'", "[0, 1)"),
    (["optim.eps=0"], "'optim.eps'", "> 0"),
    (["optim.grad_accum_steps=0"], "'optim.grad_accum_steps'", ">= 1"),
    (["train.steps=10", "train.epochs=1"], "'train.epochs' = 1 and train.steps=10 are both set",
     "train.epochs=0 trains"),
    (["train.epochs=-1"], "'train.epochs'", ">= 0"),
    (["train.eval_batch_size=-2"], "'train.eval_batch_size'", ">= 0"),
    (["mesh.shape=[2,2]"], "'mesh.axes'", "one name per shape entry"),
    (["mesh.axes=[data, data, tensor]"], "'mesh.axes'", "unique"),
    (["mesh.axes=[data, fdsp, tensor]"], "'mesh.axes'", "must name axes among data, fsdp, tensor ('fdsp' is none of "
                                                        "them; did you mean 'fsdp'?)"),
    (["mesh.shape=[-1,-1,1]"], "'mesh.shape'", "at most one -1"),
    (["mesh.shape=[0,1,1]"], "'mesh.shape'", ">= 1 or -1"),
    (["rm.reference_examples=1"], "'rm.reference_examples'", "must be >= 2 (the normalisation takes the rewards'"),
    (["distributed.num_processes=2", "distributed.process_id=2"], "'distributed.process_id'",
     "must be below distributed.num_processes (2), got 2"),  # also under --check, before any launch
    (["distributed.initialization_timeout=0"], "'distributed.initialization_timeout'", "must be > 0, got 0"),
    (["seed=-1"], "'seed'", "must be from 0 to 2^32 - 1, got -1"),  # numpy's and jax's seeds: a traceback before
    (["seed=4294967296"], "'seed'", "must be from 0 to 2^32 - 1"),
    (["run_dir="], "'run_dir'", "must name a directory"),  # was the current directory
    (["optim.lr=" + "[" * 3000], "'optim.lr'", "nested too deeply"),
])
def test_bad_value(overrides, key, fragment):
    message = _error(overrides)
    assert key in message and fragment in message


def test_every_section_is_type_checked(tmp_path):
    """runtime.compile_cache: 123 passed --check and failed with a TypeError when the stage started."""
    path = tmp_path / "c.yaml"
    path.write_text("runtime: {compile_cache: 123}\n")
    with pytest.raises(ConfigError, match="'runtime.compile_cache' expects a string, got 123"):
        load_config(str(path))
    path.write_text("optim: {lr: " + "[" * 600 + "]" * 600 + "}\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(str(path))


def test_malformed_overrides():
    assert "key=value" in _error(["optim.lr"])
    assert "section" in _error(["optim=3"])


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    message = _error(path=path)
    assert message.startswith(f"config file {path!r}:")
    assert message == f"config file {path!r}: does not exist"


def test_directory_is_not_a_config_file(tmp_path):
    assert _error(path=str(tmp_path)) == f"config file {str(tmp_path)!r}: is a directory (expected a YAML file)"


@pytest.mark.parametrize("text", ["", "\n# nothing set yet\n", "~\n"])
def test_empty_file_is_refused(tmp_path, text):
    path = _write(tmp_path, text)
    assert _error(path=path) == f"config file {path!r}: holds no settings (expected a mapping of config keys)"


@pytest.mark.parametrize("text, key, line, first", [
    ("optim:\n  lr: 0.1\n  b1: 0.5\n  lr: 0.2\n", "'lr'", 4, 2),
    ("seed: 1\nstage: sft\nseed: 2\n", "'seed'", 3, 1),
    ("optim: {lr: 1, lr: 2}\n", "'lr'", 1, 1),
    ("sampling:\n  top_k: 1\nsampling:\n  top_p: 0.5\n", "'sampling'", 3, 1),
])
def test_duplicate_key_is_refused_with_its_line(tmp_path, text, key, line, first):
    path = _write(tmp_path, text)
    message = _error(path=path)
    assert message.startswith(f"config file {path!r}: ")
    assert f"duplicate key {key} (first at line {first}) at line {line}," in message


def test_merged_keys_may_be_overridden_once(tmp_path):
    path = _write(tmp_path, "sampling:\n  <<: {top_k: 3, top_p: 0.5}\n  top_k: 4\n")
    cfg = load_config(path)
    assert cfg.sampling.top_k == 4 and cfg.sampling.top_p == 0.5  # what `<<` is for
    path = _write(tmp_path, "sampling:\n  <<: {top_k: 3}\n  top_k: 4\n  top_k: 5\n", "twice.yaml")
    assert "duplicate key 'top_k' (first at line 3) at line 4," in _error(path=path)


@pytest.mark.parametrize("text", ["model: [unclosed\n", "a: b: c\n", "- 1\n- 2\n"])
def test_invalid_yaml(tmp_path, text):
    path = _write(tmp_path, text)
    assert _error(path=path).startswith(f"config file {path!r}:")


def test_section_must_be_mapping(tmp_path):
    message = _error(path=_write(tmp_path, "optim: 3\n"))
    assert "'optim'" in message and "mapping" in message


def test_round_trip():
    cfg = load_config(None, ["mesh.shape=[2,4]", "mesh.axes=[data,fsdp]", "optim.lr=3e-6"])
    d = config_to_dict(cfg)
    assert d["mesh"]["shape"] == [2, 4]  # tuples become lists
    assert json.loads(json.dumps(d)) == d
    assert config_from_dict(d) == cfg
    assert config_from_dict(config_to_dict(Config())) == Config()


def test_a_stored_config_never_holds_the_label_token():
    """Every config written to disk (config.json, pipeline markers, checkpoints) comes from config_to_dict."""
    d = config_to_dict(load_config(None, ["label.token=s3cret", "label.host=0.0.0.0"]))
    assert d["label"]["token"] == "" and d["label"]["host"] == "0.0.0.0" and "s3cret" not in json.dumps(d)


def test_direct_construction_validates_and_converts():
    with pytest.raises(ConfigError, match="'top_p'"):
        SamplingSection(top_p=1.5)
    assert dataclasses.replace(OptimSection(), lr="1e-4").lr == 1e-4
    assert MeshSection(shape=[2, 1, 1]).shape == (2, 1, 1)
    with pytest.raises(ConfigError, match=r"^'sampling\.top_k' "):
        Config(sampling={"top_k": -1})


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().seed = 1


def test_help_lists_every_section_and_key():
    text = config_help()
    for section in ("model", "mesh", "sampling", "generate", "optim"):
        assert f"\n{section}:" in text
    for key in ("stage", "run_dir", "seed", "optim.lr", "mesh.shape", "sampling.top_p",
                "generate.prompt_file", "model.remat"):
        assert key in text
    assert "default" in text


def test_shipped_configs_are_valid():
    from pathlib import Path

    from rlhf_jax import pipeline

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        if pipeline.is_pipeline(str(path)):
            assert pipeline.load(str(path))[1]
        else:
            load_config(str(path))

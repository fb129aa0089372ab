"""Memory planned before launch: `python -m rlhf_jax.main --config CFG [overrides] --dry-run`.

Every training program of the config (the sft and rm step, the whole ppo iteration; every such step of a
pipeline) is built exactly as its stage builds it (`trainers.Stage` and `loop.jit_step`; `ppo_stage`'s builders),
lowered on abstract inputs (jax.ShapeDtypeStruct with the run's shardings, params from jax.eval_shape) and
compiled for the configured mesh. Nothing is allocated on the devices, no weights and no tokenizer are read (only
a model's model.json or config.json) and nothing is written. Per stage it prints the per-device memory of the
compiled program (`compiled.memory_analysis()`: arguments, outputs, temporaries, the outputs aliasing donated
arguments, and the total that must fit), its FLOPs per step per device and the least step time at a peak rate.

FLOPs come from `compiled.cost_analysis()`, which counts the partitioned program of ONE device (per device, not
global) but counts the body of a while loop once; the matmul FLOPs of loop bodies (gradient accumulation, the
sampler, PPO's epochs and minibatches) are therefore recounted from the compiled HLO with each loop's known trip
count.

When a stage does not fit the given device memory, candidates are compiled (model.remat none, then block; with
optim.grad_accum_steps 1, 2, 4, ... while the micro-batch still splits over the data-parallel devices, assuming
memory does not grow with the accumulation) and the first that fits is suggested; the exit status is then
`NO_FIT` (5).

The figures are those of the backend the dry run compiles for: simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N) give XLA's CPU compiler's buffer assignment, which can differ
from a GPU's or TPU's (other fusion and scheduling; bf16 arithmetic widened to float32 on CPU), so plan on the
target devices for exact numbers. Only the models' architectures are read; a model that a pipeline step will make
(`{run_dir}/sft/export`) is taken to be that step's model, and a missing ppo reward or value model the policy's
architecture with a scalar head.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from rlhf_jax import pipeline
from rlhf_jax.config import Config
from rlhf_jax.errors import UserError
from rlhf_jax.models import checkpoint, hf
from rlhf_jax.models.tiny import tiny_config
from rlhf_jax.models.transformer import ModelConfig, init_params, make_model, param_logical_axes
from rlhf_jax.rl import ppo
from rlhf_jax.runtime import sharding
from rlhf_jax.stages import ppo as ppo_stage, train as trainers
from rlhf_jax.training import loop, steps

NO_FIT = 5  # exit status of a dry run in which some stage does not fit the device memory
PLANNED = ("sft", "rm", "ppo")
STAND_IN_STEPS = 1000  # schedule length when train.epochs needs the dataset's size (no shape depends on it)
GIB = 1024 ** 3
# A dry run never executes what it compiles: on CPU, skip the costly LLVM optimisation (the buffer assignment, and
# so every memory figure, is the same; checked in tests/test_plan.py).
CPU_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# --------------------------------------------------------------------------------------------- devices


class DeviceSpec(NamedTuple):
    """Nominal memory of one device (GiB) and its dense peak TFLOP/s for bf16 and float32 matmuls."""

    name: str
    memory_gib: float
    bf16_tflops: float
    fp32_tflops: float | None  # None: not published for full-precision float32 matmuls (TPUs)


# Matched against jax's device_kind (lower case, every substring present); the first match wins.
DEVICE_SPECS: list[tuple[tuple[str, ...], DeviceSpec]] = [
    (("h100", "pcie"), DeviceSpec("H100 PCIe", 80, 756, 51)),
    (("h100",), DeviceSpec("H100 SXM", 80, 989, 67)),
    (("h200",), DeviceSpec("H200", 140, 989, 67)),
    (("a100", "40gb"), DeviceSpec("A100 40GB", 40, 312, 19.5)),
    (("a100",), DeviceSpec("A100 80GB", 80, 312, 19.5)),
    (("tpu v3",), DeviceSpec("TPU v3 (one core)", 16, 61.5, None)),
    (("tpu v4",), DeviceSpec("TPU v4", 32, 275, None)),
    (("tpu v5 lite",), DeviceSpec("TPU v5e", 16, 197, None)),
    (("tpu v5e",), DeviceSpec("TPU v5e", 16, 197, None)),
    (("tpu v5",), DeviceSpec("TPU v5p", 95, 459, None)),
    (("tpu v6",), DeviceSpec("TPU v6e", 32, 918, None)),
]


def device_spec(kind: str) -> DeviceSpec | None:
    kind = kind.lower()
    return next((spec for keys, spec in DEVICE_SPECS if all(k in kind for k in keys)), None)


class Budget(NamedTuple):
    """What a verdict and a step time are measured against (None: unknown), and where each figure came from."""

    memory: int | None  # bytes per device
    memory_source: str
    peak: dict[str, float | None]  # compute dtype -> FLOP/s per device
    peak_source: str


def budget(device: jax.Device, memory_gib: float | None = None, peak_tflops: float | None = None) -> Budget:
    """--device-memory / --peak-tflops, else the device's own allocator limit and the table's figures."""
    spec = device_spec(device.device_kind)
    kind = device.device_kind if device.device_kind.lower() == device.platform else \
        f"{device.device_kind} ({device.platform})"
    if memory_gib is not None:
        memory, memory_source = int(memory_gib * GIB), "--device-memory"
    else:
        limit = (device.memory_stats() or {}).get("bytes_limit") if device.platform != "cpu" else None
        if limit:
            memory, memory_source = int(limit), f"what XLA may allocate on the {kind}"
        elif spec is not None:
            memory, memory_source = int(spec.memory_gib * GIB), f"{spec.name}'s {spec.memory_gib:g} GiB"
        else:
            memory, memory_source = None, f"unknown for {kind}: pass --device-memory GIB for a verdict"
    if peak_tflops is not None:
        peak = {"bfloat16": peak_tflops * 1e12, "float32": peak_tflops * 1e12}
        peak_source = f"--peak-tflops {peak_tflops:g}"
    elif spec is not None:
        peak = {"bfloat16": spec.bf16_tflops * 1e12,
                "float32": spec.fp32_tflops * 1e12 if spec.fp32_tflops else None}
        fp32 = f"{spec.fp32_tflops:g}" if spec.fp32_tflops else "unknown"
        peak_source = f"{spec.name}: {spec.bf16_tflops:g} TFLOP/s bf16, {fp32} float32"
    else:
        peak, peak_source = {}, f"unknown for {kind}: pass --peak-tflops T for step times"
    return Budget(memory, memory_source, peak, peak_source)


# --------------------------------------------------------------------------------------------- model configs


class ModelSource(NamedTuple):
    cfg: ModelConfig
    head: str
    via: tuple[str, ...] = ()  # the pipeline steps that will make it, when it is not there yet
    origin: str = ""  # where the architecture was read when not from the path itself

    def note(self, what: str, path: str) -> str:
        """'' when read from `path` itself, else one line saying where the architecture came from."""
        if not self.via:
            return f"{what}: {self.origin}" if self.origin else ""
        steps = f"step {self.via[0]} makes" if len(self.via) == 1 else f"steps {' <- '.join(self.via)} make"
        return f"{what} {path} is not made yet: taken as the {self.head}-head model {steps} from {self.origin}"


def tiny_model_config() -> ModelConfig:
    """The tiny built-in model's architecture (`tiny.build_tiny_model`: a 512-token BPE, EOS 0, pad 1)."""
    return tiny_config(512, 0, 1)


def read_model_config(path: str | os.PathLike) -> tuple[ModelConfig, str]:
    """(architecture, head) of a model directory from its model.json or config.json alone."""
    path = Path(path)
    if (path / "model.json").exists():
        cfg, head, _ = checkpoint.read_model_meta(path)
        return cfg, head
    if (path / "config.json").exists():
        gen = path / "generation_config.json"
        return hf.config_from_hf(hf.read_json(path / "config.json"), hf.read_json(gen) if gen.exists() else None,
                                 where=str(path / "config.json"))
    raise checkpoint.CheckpointError(f"{path}: expected a rlhf_jax checkpoint (model.json) or a HF checkpoint dir "
                                     "(config.json)")


# The models a pipeline step leaves in its directory, and their heads.
OUTPUTS = {"sft": {"export": "lm", "best": "lm"}, "rm": {"export": "scalar", "best": "scalar"},
           "ppo": {"export": "lm", "export_ema": "lm", "export_value": "scalar"}, "task": {"base_model": "lm"}}


def _same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


class Models:
    """Model configs of the steps of a config, from model.json / config.json only. A path that a pipeline step
    will write (`{run_dir}/sft/export`) and that does not exist yet is the model that step trains."""

    def __init__(self, steps: Sequence[pipeline.Step]):
        self.steps = list(steps)

    def resolve(self, path: str, run_dir: str, _seen: tuple[str, ...] = ()) -> ModelSource:
        if not path:
            tiny = Path(run_dir) / "tiny_model"
            if (tiny / "config.json").exists():
                return ModelSource(*read_model_config(tiny))
            return ModelSource(tiny_model_config(), "lm", origin="the tiny built-in model")
        if Path(path).exists():
            return ModelSource(*read_model_config(path))
        for step in self.steps:
            for out, head in OUTPUTS.get(step.cfg.stage, {}).items():
                if step.name not in _seen and _same_path(path, Path(step.cfg.run_dir) / out):
                    return self._produced(step, out, head, (*_seen, step.name))
        raise checkpoint.CheckpointError(f"{path}: does not exist")

    def _produced(self, step: pipeline.Step, out: str, head: str, seen: tuple[str, ...]) -> ModelSource:
        cfg = step.cfg
        if cfg.stage == "task":
            return ModelSource(tiny_model_config(), head, (step.name,), "a tiny model (vocabulary taken as 512)")
        if out == "export_value":
            source = self.resolve(cfg.ppo.value_model or cfg.ppo.reward_model, cfg.run_dir, seen)
        else:
            source = self.resolve(cfg.model.path, cfg.run_dir, seen)
        origin = source.origin or (cfg.ppo.value_model or cfg.ppo.reward_model if out == "export_value"
                                   else cfg.model.path)
        return ModelSource(source.cfg, head, (step.name, *source.via), origin)


def response_slots(cfg: Config, steps: Sequence[pipeline.Step]) -> int:
    """K of an rm step: data.max_responses, else the prepared dataset's largest K, else the responses of the
    pipeline's label step that writes the dataset."""
    if cfg.data.max_responses:
        return cfg.data.max_responses
    from rlhf_jax.data.prepare import dataset_dir

    if (dataset_dir(cfg.data.dir, cfg.data.name) / "dataset_info.json").exists():
        from rlhf_jax.data.pipeline import open_split, response_slots as slots

        _, metadata = open_split(cfg.data.dir, cfg.data.name, cfg.data.train_split)
        if slots("rankings", metadata, cfg.data):
            return slots("rankings", metadata, cfg.data)
    for step in steps:
        s = step.cfg
        if s.stage == "label" and s.label.dataset == cfg.data.name and _same_path(s.data.dir, cfg.data.dir):
            return s.label.responses
    raise UserError(f"data.max_responses: the rm dry run needs the response slots per prompt K, and dataset "
                    f"{cfg.data.name!r} is not prepared yet; set data.max_responses")


# --------------------------------------------------------------------------------------------- programs


def abstract(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying `shardings`: what a jitted function is lowered on."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_batch(shapes: dict, mesh) -> dict:
    """{key: ((shape), dtype)} -> abstract arrays split over the data-parallel axes."""
    batch_sh = sharding.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh) for k, (shape, dtype) in shapes.items()}


def sft_shapes(rows: int, cfg: Config) -> dict:
    T = cfg.data.max_prompt_tokens + cfg.data.max_response_tokens
    return {"ids": ((rows, T), jnp.int32), "mask": ((rows, T), bool), "response_mask": ((rows, T), bool),
            "positions": ((rows, T), jnp.int32), "segment_ids": ((rows, T), jnp.int32)}


def train_batch_shapes(cfg: Config, responses: int = 0) -> dict:
    """The sft / rm training batch of the data pipeline's layout (`data/pipeline.py`)."""
    B, P, R, K = cfg.train.batch_size, cfg.data.max_prompt_tokens, cfg.data.max_response_tokens, responses
    if cfg.stage == "sft":
        shapes = sft_shapes(B, cfg)
    else:
        shapes = {"prompt_ids": ((B, P), jnp.int32), "prompt_mask": ((B, P), bool),
                  "response_ids": ((B, K, R), jnp.int32), "response_mask": ((B, K, R), bool),
                  "pairs": ((B, K, K), jnp.int32)}
    return {**shapes, "truncated": ((B,), bool)}


def _rng(mesh):
    return jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=sharding.replicated(mesh))


def train_step_program(cfg: Config, model_cfg: ModelConfig, mesh, responses: int = 0,
                       total_steps: int | None = None) -> jax.stages.Lowered:
    """The sft / rm step as trainers.train builds and jits it, lowered on abstract inputs (`responses`: K of rm)."""
    loop.micro_batch_size(cfg, mesh)  # the stage's own batch / accumulation / mesh check
    model = make_model(model_cfg, "lm" if cfg.stage == "sft" else "scalar", cfg.model.dtype, cfg.model.param_dtype,
                       remat=cfg.model.remat == "block")
    total = total_steps or cfg.train.steps or STAND_IN_STEPS
    optimizer = steps.make_optimizer(cfg.optim, total)
    stage = trainers.Stage(cfg, model, optimizer, steps.lr_schedule(cfg.optim, total))
    state_sh = loop.state_shardings(model, optimizer, mesh)
    state = abstract(jax.eval_shape(lambda: steps.init_state(init_params(model, jax.random.key(0)), optimizer)),
                     state_sh)
    batch = abstract_batch(train_batch_shapes(cfg, responses), mesh)
    return loop.jit_step(stage.step, state_sh, mesh).lower(state, batch, _rng(mesh))


def ppo_iteration_program(cfg: Config, policy_cfg: ModelConfig, mesh, value_cfg: ModelConfig | None = None,
                          reward_cfg: ModelConfig | None = None, total_steps: int | None = None) -> jax.stages.Lowered:
    """One PPO iteration as ppo_stage.train_ppo builds and jits it, lowered on abstract inputs; the frozen
    reference and reward params are arguments. The value and reward models default to the policy's
    architecture with a scalar head."""
    ppo_stage.check_sizes(cfg, mesh)  # the stage's own check
    dtypes = dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat == "block")
    reward_cfg = reward_cfg or policy_cfg
    policy = make_model(policy_cfg, "lm", **dtypes)
    value, reward = make_model(value_cfg or reward_cfg, "scalar", **dtypes), make_model(reward_cfg, "scalar", **dtypes)
    total = total_steps or cfg.train.steps or STAND_IN_STEPS
    models = ppo_stage.build_models(cfg, policy, value, reward, total, policy_cfg.eos_token_ids or (0,))
    state_sh, frozen_sh = ppo_stage.iteration_shardings(cfg, models, mesh)
    key = jax.random.key(0)
    state = abstract(jax.eval_shape(lambda: ppo.init_state(init_params(policy, key), init_params(value, key), models,
                                                           jax.random.PRNGKey(0))), state_sh)
    frozen = abstract(ppo.Frozen(jax.eval_shape(lambda: init_params(policy, key)),
                                 jax.eval_shape(lambda: init_params(reward, key))), frozen_sh)
    B, P = cfg.train.batch_size, cfg.data.max_prompt_tokens
    prompts = abstract_batch({"ids": ((B, P), jnp.int32), "mask": ((B, P), bool)}, mesh)
    ptx = abstract_batch(sft_shapes(cfg.ppo.ptx_batch_size or B, cfg), mesh) if cfg.ppo.ptx_coef else None
    return ppo_stage.jit_iteration(models, state_sh, frozen_sh, mesh).lower(state, frozen, prompts["ids"],
                                                                            prompts["mask"], ptx)


# --------------------------------------------------------------------------------------------- measuring


class Footprint(NamedTuple):
    """Bytes per device of a compiled program (`compiled.memory_analysis()`)."""

    arguments: int
    outputs: int
    temporaries: int
    aliased: int  # outputs written into donated arguments: counted once
    code: int

    @property
    def total(self) -> int:
        """What must fit on each device at once."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


class Measured(NamedTuple):
    footprint: Footprint
    flops: float  # per device per step
    flops_note: str  # how the FLOPs were counted


def compile_program(lowered: jax.stages.Lowered, mesh) -> jax.stages.Compiled:
    cpu = mesh.devices.flat[0].platform == "cpu"
    return lowered.compile(CPU_COMPILE_OPTIONS if cpu else None)


def footprint(compiled: jax.stages.Compiled) -> Footprint:
    m = compiled.memory_analysis()
    return Footprint(m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes, m.alias_size_in_bytes,
                     m.generated_code_size_in_bytes)


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_ARRAY = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*\w+\[([\d,]*)\]\S*\s+([\w\-]+)\((.*)$")
_CALLEE = re.compile(r"\b(calls|to_apply|body|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def hlo_matmul_flops(hlo_text: str) -> tuple[float, float, int]:
    """(matmul FLOPs with every while loop's body counted by its known trip count, the same with each body
    counted once as XLA's cost analysis counts it, loops whose trip count is unknown) of a compiled module's
    HLO text. A dot's FLOPs: 2 x its output elements x its contracted elements."""
    shapes: dict[str, list[int]] = {}
    own: dict[str, float] = {}
    calls: dict[str, list[tuple[str, int]]] = {}
    unknown, comp, entry = 0, None, None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head and not line.startswith(" "):
            comp = head.group(1)
            entry = comp if line.startswith("ENTRY") else entry
            own.setdefault(comp, 0.0)
            calls.setdefault(comp, [])
            continue
        if comp is None:
            continue
        array = _ARRAY.match(line)
        if array:
            name, dims, op, rest = array.groups()
            shapes[name] = _dims(dims)
            if op == "dot":
                lhs = re.match(r"\s*(?:\w+\[[\d,]*\]\S*\s+)?%([\w.\-]+)", rest)
                contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
                if lhs and contracting and lhs.group(1) in shapes:
                    k = math.prod(shapes[lhs.group(1)][d] for d in _dims(contracting.group(1)))
                    own[comp] += 2.0 * math.prod(shapes[name]) * k
        trip = 1
        if " while(" in line:
            found = _TRIP.search(line)
            trip = int(found.group(1)) if found else 1
            unknown += found is None
        for kind, callee in _CALLEE.findall(line):
            calls[comp].append((callee, trip if kind == "body" else 1))
        for branches in _BRANCHES.findall(line):
            calls[comp] += [(b.strip().lstrip("%"), 1) for b in branches.split(",") if b.strip()]

    def total(name: str, with_trips: bool, memo: dict) -> float:
        if name not in memo:
            memo[name] = own.get(name, 0.0) + sum((n if with_trips else 1) * total(callee, with_trips, memo)
                                                  for callee, n in calls.get(name, []))
        return memo[name]

    if entry is None:
        return 0.0, 0.0, unknown
    return total(entry, True, {}), total(entry, False, {}), unknown  # recursion as deep as the calls nest


def flops_per_device(compiled: jax.stages.Compiled) -> tuple[float, str]:
    """FLOPs of one step on one device: XLA's cost analysis of the partitioned (per-device) program, with the
    matmuls of loop bodies counted as many times as the loops run."""
    costs = compiled.cost_analysis()
    costs = costs[0] if isinstance(costs, (list, tuple)) else costs
    xla = float((costs or {}).get("flops", 0.0))
    with_trips, once, unknown = hlo_matmul_flops(compiled.as_text() or "")
    if with_trips == once == 0.0:
        return xla, "XLA's cost analysis (loop bodies counted once)"
    note = "XLA's cost analysis, with the matmuls of loop bodies counted once per trip"
    if unknown:
        note += f"; {unknown} loop(s) of unknown trip count counted once"
    return xla + with_trips - once, note


def measure(lowered: jax.stages.Lowered, mesh) -> Measured:
    compiled = compile_program(lowered, mesh)
    flops, note = flops_per_device(compiled)
    return Measured(footprint(compiled), flops, note)


# --------------------------------------------------------------------------------------------- planning


class StagePlan(NamedTuple):
    step: str
    stage: str
    batch: str  # the step's shapes, in words
    measured: Measured | None  # None: not planned
    fits: bool | None  # None: no verdict (no memory known, or not planned)
    lines: list[str]  # notes and the verdict, one line each


class Program(NamedTuple):
    """A planned step before compiling: everything read and checked, nothing printed yet."""

    step: pipeline.Step
    build: Callable[[Config], jax.stages.Lowered]  # the step's config (or a candidate setting of it) -> program
    batch: str
    notes: list[str]
    models: list[tuple[ModelConfig, str]]  # (architecture, head) of each model it trains or reads
    mesh: jax.sharding.Mesh


class Planner:
    """Builds, compiles and judges the programs of one config's steps."""

    def __init__(self, steps: Sequence[pipeline.Step], budget: Budget, is_pipeline: bool, out=None):
        self.steps, self.budget, self.is_pipeline = list(steps), budget, is_pipeline
        self.models = Models(self.steps)
        self.out = out or sys.stdout
        self._reported: set = set()

    def key(self, step: pipeline.Step, name: str) -> str:
        """How to set `name` for this step on the command line."""
        return f"pipeline.{step.name}.{name}" if self.is_pipeline else name

    def program(self, step: pipeline.Step) -> Program:
        """The step's models (model.json / config.json), shapes and mesh, read and checked; a UserError for what
        the run itself would refuse."""
        cfg, notes, models = step.cfg, [], []
        mesh = sharding.mesh_from_config(cfg.mesh)

        def source(path: str, what: str, head: str) -> ModelConfig:
            try:
                found = self.models.resolve(path, cfg.run_dir)
            except checkpoint.CheckpointError:
                if head != "scalar" or not models:
                    raise
                found = ModelSource(models[0][0], "scalar", origin=f"{path} does not exist: the policy's "
                                    "architecture with a scalar head")
            if found.note(what, path):
                notes.append(found.note(what, path))
            if models and found.cfg.vocab_size != models[0][0].vocab_size:
                raise UserError(f"{what}: vocab_size {found.cfg.vocab_size} differs from the policy's "
                                f"{models[0][0].vocab_size} (it must read the policy's tokens)")
            models.append((found.cfg, head))
            return found.cfg

        B, P, R = cfg.train.batch_size, cfg.data.max_prompt_tokens, cfg.data.max_response_tokens
        if cfg.stage in ("sft", "rm"):
            model_cfg = source(cfg.model.path, "model", "lm" if cfg.stage == "sft" else "scalar")
            K = response_slots(cfg, self.steps) if cfg.stage == "rm" else 0
            batch = f"{B} x {P + R} tokens" if cfg.stage == "sft" else f"{B} x {K} x ({P}+{R}) tokens"
            return Program(step, lambda c: train_step_program(c, model_cfg, mesh, K), batch, notes, models, mesh)
        policy = source(cfg.model.path, "policy", "lm")
        reward = source(cfg.ppo.reward_model, "ppo.reward_model", "scalar")
        value = source(cfg.ppo.value_model, "ppo.value_model", "scalar") if cfg.ppo.value_model else reward
        batch = f"{B} x ({P}+{cfg.sampling.max_new_tokens} new) tokens"
        return Program(step, lambda c: ppo_iteration_program(c, policy, mesh, value, reward), batch, notes, models,
                       mesh)

    def report_sharding(self, cfg: Config, model_cfg: ModelConfig, head: str, mesh) -> None:
        """How the params split over the mesh, once per model (one line for a second head on the same body)."""
        body = (model_cfg, cfg.model.param_dtype, tuple(mesh.shape.items()))
        if (body, head) in self._reported:
            return
        model = make_model(model_cfg, head, cfg.model.dtype, cfg.model.param_dtype)
        shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
        report = sharding.sharding_report(param_logical_axes(model), shapes, mesh)
        name = f"{head}-head model (d_model {model_cfg.d_model}, {model_cfg.n_layers} layers, vocab " \
               f"{model_cfg.vocab_size})"
        if any(seen == body for seen, _ in self._reported):
            print(f"{name}: split as above, {gib(report.bytes_total)} of params, {gib(report.bytes_per_device)} "
                  "per device", file=self.out)
        else:
            print(f"{name}:", file=self.out)
            sharding.print_sharding_report(report, file=self.out)
        self._reported.add((body, head))

    def plan(self, program: Program) -> StagePlan:
        step, cfg = program.step, program.step.cfg
        for model_cfg, head in program.models:
            self.report_sharding(cfg, model_cfg, head, program.mesh)
        t0 = time.perf_counter()
        print(f"compiling {step.name} ({cfg.stage}) ...", file=sys.stderr, flush=True)
        measured = measure(program.build(cfg), program.mesh)
        print(f"compiled {step.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        memory = self.budget.memory
        if memory is None:
            return StagePlan(step.name, cfg.stage, program.batch, measured, None, program.notes)
        if measured.footprint.total <= memory:
            return StagePlan(step.name, cfg.stage, program.batch, measured, True, program.notes)
        return StagePlan(step.name, cfg.stage, program.batch, measured, False,
                         program.notes + [self._no_fit(program, measured.footprint)])

    def _no_fit(self, program: Program, found: Footprint) -> str:
        step, cfg, mesh, memory = program.step, program.step.cfg, program.mesh, self.budget.memory
        head = f"does not fit: needs {gib(found.total)} of {gib(memory)} per device"
        fixed = found.arguments + found.outputs - found.aliased  # does not shrink with accumulation or remat
        if fixed > memory:
            return (f"{head}; nothing fits: its arguments and outputs alone (params, optimizer state, frozen "
                    f"models, batch) take {gib(fixed)}; shard them over more devices (mesh)")
        tries = candidates(cfg, mesh)
        if not tries:
            return (f"{head}; nothing smaller to try (model.remat=block and {micro_rows(cfg, mesh)} row(s) per device "
                    "in a micro-batch at most): use more devices, a smaller batch or shorter sequences")
        best = None
        for remat, accum in tries:
            print(f"  {step.name} does not fit: compiling it with accumulation {accum}, remat {remat} ...",
                  file=sys.stderr, flush=True)
            total = measure(program.build(with_setting(cfg, remat, accum)), mesh).footprint.total
            if best is None or total < best[2]:
                best = (remat, accum, total)
            if total <= memory:
                setting = f"{self.key(step, 'optim.grad_accum_steps')}={accum} {self.key(step, 'model.remat')}={remat}"
                return f"{head}; fits with {setting} ({gib(total)})"
        return (f"{head}; no micro-batch fits, with or without model.remat=block (the least: {gib(best[2])} with "
                f"accumulation {best[1]}, remat {best[0]})")


def with_setting(cfg: Config, remat: str, accum: int) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=remat),
                               optim=dataclasses.replace(cfg.optim, grad_accum_steps=accum))


def micro_rows(cfg: Config, mesh, accum: int | None = None) -> int:
    """Rows per device of one micro-batch (of one minibatch, for ppo)."""
    ways = math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh))
    rows = cfg.train.batch_size // (cfg.ppo.minibatches if cfg.stage == "ppo" else 1)
    return rows // ((accum or cfg.optim.grad_accum_steps) * ways)


def _splits(cfg: Config, accum: int, mesh) -> bool:
    """Whether the step's batch splits into `accum` micro-batches over the data-parallel devices."""
    ways = math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh))
    if cfg.stage != "ppo":
        return cfg.train.batch_size % (accum * ways) == 0
    sizes = [cfg.train.batch_size] + ([cfg.ppo.ptx_batch_size or cfg.train.batch_size] if cfg.ppo.ptx_coef else [])
    m = cfg.ppo.minibatches
    return all(size % m == 0 and (size // m) % (accum * ways) == 0 for size in sizes)


def candidates(cfg: Config, mesh) -> list[tuple[str, int]]:
    """(remat, accum) to try in order: no remat then block, accumulation 1, 2, 4, ... while the micro-batch
    splits. Memory is taken not to grow with the accumulation: settings below one known not to fit (the
    config's own, or the same accumulation without remat) are skipped."""
    out = []
    for remat in ("none", "block"):
        accum = 1
        while _splits(cfg, accum, mesh):
            known_bad = (remat == cfg.model.remat and accum <= cfg.optim.grad_accum_steps) or \
                        (remat == "none" and cfg.model.remat == "block" and accum <= cfg.optim.grad_accum_steps)
            if not known_bad:
                out.append((remat, accum))
            accum *= 2
    return out


# --------------------------------------------------------------------------------------------- output


def gib(n: int) -> str:
    return sharding.format_bytes(int(n))


def si(flops: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g}"


def seconds(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def table(plans: Sequence[StagePlan], cfgs: dict[str, Config], b: Budget) -> list[str]:
    """One row per step: memory per device, FLOPs per step per device, the least step time, the verdict."""
    head = ("step", "stage", "batch", "accum", "remat", "arguments", "outputs", "temps", "aliased", "total",
            "FLOPs", "time >=", "fits")
    rows = [head]
    for p in plans:
        if p.measured is None:
            continue
        cfg, f = cfgs[p.step], p.measured.footprint
        peak = b.peak.get(cfg.model.dtype)
        rows.append((p.step, p.stage, p.batch, str(cfg.optim.grad_accum_steps), cfg.model.remat, gib(f.arguments),
                     gib(f.outputs), gib(f.temporaries), gib(f.aliased), gib(f.total), si(p.measured.flops),
                     seconds(p.measured.flops / peak) if peak else "-",
                     "-" if p.fits is None else ("yes" if p.fits else "NO")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    left = {0, 1, 2, 4}
    render = lambda r: "  ".join(c.ljust(w) if i in left else c.rjust(w)
                                        for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    lines = ["per device, per step:"] + [render(r) for r in rows] if len(rows) > 1 else []
    lines += [f"{p.step} ({p.stage}): not planned (only sft, rm and ppo steps are)" for p in plans
              if p.measured is None]
    return lines


def dry_run(steps: Sequence[pipeline.Step], is_pipeline: bool, label: str | None, device_memory: float | None = None,
            peak_tflops: float | None = None, out=None) -> int:
    """Plans every sft / rm / ppo step of validated `steps` (one config's, or a pipeline's) and prints the report;
    returns the exit status: 0 when every planned step fits (or there is no verdict), NO_FIT when one does not."""
    out = out or sys.stdout
    if not is_pipeline:  # a pipeline's steps were checked when it was loaded
        from rlhf_jax.stages import dispatch as stages

        for step in steps:
            stages.check(step.cfg)
    devices = jax.devices()
    b = budget(devices[0], device_memory, peak_tflops)
    planner = Planner(steps, b, is_pipeline, out)
    programs = {}
    for step in steps:  # every step read and checked before anything is compiled
        if step.cfg.stage in PLANNED:
            try:
                programs[step.name] = planner.program(step)
            except UserError as e:
                raise UserError(f"pipeline.{step.name}: {e}" if is_pipeline else str(e)) from None
    print(f"dry run of {label or 'the default config'}: each sft / rm / ppo step compiled for its mesh on abstract "
          f"inputs ({len(devices)} {devices[0].platform} devices; no parameter allocated, no weights read, nothing "
          "written)", file=out)
    memory = f"{gib(b.memory)} ({b.memory_source})" if b.memory else b.memory_source
    print(f"  device memory: {memory}", file=out)
    print(f"  peak: {b.peak_source}", file=out)
    plans = [planner.plan(programs[s.name]) if s.name in programs else StagePlan(s.name, s.cfg.stage, "", None,
                                                                                  None, []) for s in steps]
    for line in table(plans, {s.name: s.cfg for s in steps}, b):
        print(line if line.startswith("per device") else "  " + line, file=out)
    for p in plans:
        for line in p.lines:
            print(f"  {p.step}: {line}", file=out)
    notes = sorted({p.measured.flops_note for p in plans if p.measured is not None})
    if notes:
        print(f"  FLOPs per device: {'; '.join(notes)}", file=out)
        print("  time >= FLOPs / peak: a bound that ignores memory bandwidth (decoding is bandwidth-bound)", file=out)
    if b.memory is None and any(p.measured is not None for p in plans):
        print("no verdict: the device memory is unknown (pass --device-memory GIB)", file=out)
    if any(p.fits is False for p in plans):
        print(f"does not fit: {', '.join(p.step for p in plans if p.fits is False)} (exit status {NO_FIT})", file=out)
        return NO_FIT
    if any(p.fits for p in plans):
        print("every planned step fits", file=out)
    return 0

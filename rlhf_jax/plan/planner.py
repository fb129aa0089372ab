"""Planning the steps of one config: each step's models, shapes and mesh read and checked, its program compiled
and judged against the budget, its params' split over the mesh reported once per model, and, when it does not
fit, the candidate settings (model.remat, optim.grad_accum_steps) compiled until one fits."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Callable, NamedTuple, Sequence

import jax

from rlhf_jax import pipeline
from rlhf_jax.config import Config, LoraSection
from rlhf_jax.errors import UserError
from rlhf_jax.models import checkpoint
from rlhf_jax.models.transformer import ModelConfig, init_params, param_logical_axes
from rlhf_jax.plan.devices import Budget, gib
from rlhf_jax.plan.figures import Footprint, Measured, measure
from rlhf_jax.plan.models import Models, ModelSource, response_slots
from rlhf_jax.plan.programs import (
    group_iteration_program, ppo_iteration_program, reference_scoring_program, train_step_program)
from rlhf_jax.runtime import sharding
from rlhf_jax.training.state import check_positions, eval_batch_size, model_key, stage_model


class StagePlan(NamedTuple):
    step: str
    stage: str
    batch: str  # the step's shapes, in words
    measured: Measured | None  # None: not planned
    fits: bool | None  # None: no verdict (no memory known, or not planned)
    lines: list[str]  # notes and the verdict, one line each
    full_finetuning: Footprint | None = None  # a LoRA step's footprint without LoRA (lora.rank 0), to compare


class Program(NamedTuple):
    """A planned step before compiling: everything read and checked, nothing printed yet."""

    step: pipeline.Step
    build: Callable[[Config], jax.stages.Lowered]  # the step's config (or a candidate setting of it) -> program
    batch: str
    notes: list[str]
    models: list[tuple[ModelConfig, str]]  # (architecture, head) of each model it trains or reads
    mesh: jax.sharding.Mesh
    # a pass the stage runs before training (dpo.precompute_reference's scoring): config -> (program, the bytes
    # per device placed beside it, its rows)
    before: Callable[[Config], tuple[jax.stages.Lowered, int, int]] | None = None


class Planner:
    """Builds, compiles and judges the programs of one config's steps."""

    def __init__(self, steps: Sequence[pipeline.Step], budget: Budget, is_pipeline: bool, out=None):
        self.steps, self.budget, self.is_pipeline = list(steps), budget, is_pipeline
        self.models = Models(self.steps)
        self.out = out or sys.stdout
        self._reported: set = set()

    def key(self, step: pipeline.Step, name: str) -> str:
        """How to set `name` for this step on the command line (a repeated step's round{r}/NAME is set as NAME,
        for every round)."""
        return f"pipeline.{step.name.rpartition('/')[2]}.{name}" if self.is_pipeline else name

    def program(self, step: pipeline.Step) -> Program:
        """The step's models (model.json / config.json), shapes and mesh, read and checked; a UserError for what
        the run itself would refuse."""
        cfg, notes, models = step.cfg, [], []
        mesh = sharding.mesh_from_config(cfg.mesh)

        def source(path: str, what: str, head: str, kind: str | None = None, key: str = "") -> ModelConfig:
            """The architecture at `path` (config key `key`, default `what`), which the stage builds with `head`;
            `kind`: the head the checkpoint itself must have (a reward or value model's scalar one, a policy's LM
            one), as the stage checks."""
            try:
                found = self.models.resolve(path, cfg.run_dir)
            except UserError as e:
                if not (isinstance(e, checkpoint.CheckpointError) and head == "scalar" and models):
                    if path:  # named by its key, as the run names it (no path: the built-in tiny model's own)
                        e.args = (f"{key or what}={path}: {str(e).removeprefix(f'{path}: ')}",)
                    raise
                found = ModelSource(models[0][0], "scalar", origin=f"{path} does not exist: the policy's "
                                    "architecture with a scalar head")
            if kind is not None and found.head != kind:
                made = {"lm": "a language model", "scalar": "a scalar-head (reward/value) model"}
                raise UserError(f"{what}={path}: {made[found.head]}, expected {made[kind]}")
            if found.note(what, path):
                notes.append(found.note(what, path))
            if models and found.cfg.vocab_size != models[0][0].vocab_size:
                raise UserError(f"{what}: vocab_size {found.cfg.vocab_size} differs from the policy's "
                                f"{models[0][0].vocab_size} (it must read the policy's tokens)")
            models.append((found.cfg, head))
            return found.cfg

        B, P, R = cfg.train.batch_size, cfg.data.max_prompt_tokens, cfg.data.max_response_tokens
        if cfg.stage in ("sft", "rm", "dpo"):
            model_cfg = source(cfg.model.path, "model", "scalar" if cfg.stage == "rm" else "lm", key="model.path")
            check_positions(model_cfg, P + R, "data.max_prompt_tokens + data.max_response_tokens", model_key(cfg))
            eval_batch_size(cfg, mesh)  # as the stage checks it, before it loads anything
            K = response_slots(cfg, self.steps) if cfg.stage != "sft" else 0
            batch = f"{B} x {P + R} tokens" if cfg.stage == "sft" else f"{B} x {K} x ({P}+{R}) tokens"
            before = None
            if cfg.stage == "dpo" and cfg.dpo.precompute_reference:
                before = lambda c: reference_scoring_program(c, model_cfg, mesh, K)
            return Program(step, lambda c: train_step_program(c, model_cfg, mesh, K), batch, notes, models, mesh,
                           before)
        policy = source(cfg.model.path, "policy", "lm", "lm", key="model.path")
        sampled = "data.max_prompt_tokens + sampling.max_new_tokens"
        check_positions(policy, P + cfg.sampling.max_new_tokens, sampled, model_key(cfg))
        if cfg.stage in ("grpo", "rloo"):
            section = getattr(cfg, cfg.stage)
            reward = (source(section.reward_model, f"{cfg.stage}.reward_model", "scalar", "scalar")
                      if section.reward_model else None)
            batch = f"{B} x {section.group_size} x ({P}+{cfg.sampling.max_new_tokens} new) tokens"
            return Program(step, lambda c: group_iteration_program(c, policy, mesh, reward), batch, notes, models,
                           mesh)
        reward = source(cfg.ppo.reward_model, "ppo.reward_model", "scalar", "scalar")
        value = source(cfg.ppo.value_model, "ppo.value_model", "scalar", "scalar") if cfg.ppo.value_model else reward
        if cfg.ppo.ptx_coef:
            check_positions(policy, P + R, "data.max_prompt_tokens + data.max_response_tokens (the ptx rows)",
                            model_key(cfg))
        batch = f"{B} x ({P}+{cfg.sampling.max_new_tokens} new) tokens"
        return Program(step, lambda c: ppo_iteration_program(c, policy, mesh, value, reward), batch, notes, models,
                       mesh)

    def report_sharding(self, cfg: Config, model_cfg: ModelConfig, head: str, mesh) -> None:
        """How the params split over the mesh, once per model (one line for a second head on the same body)."""
        body = (model_cfg, cfg.model.param_dtype, tuple(mesh.shape.items()))
        if (body, head) in self._reported:
            return
        model = stage_model(cfg, model_cfg, head)
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
        measured = measure(program.build(cfg), program.mesh)  # the sampler's decode counted at its most steps
        print(f"compiled {step.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        full = None
        if cfg.lora.rank:
            print(f"compiling {step.name} ({cfg.stage}) without LoRA, to compare ...", file=sys.stderr, flush=True)
            full = measure(program.build(dataclasses.replace(cfg, lora=LoraSection())), program.mesh).footprint
        before_lines, before_fits = self._plan_before(program)
        plan = lambda fits, lines=(): StagePlan(step.name, cfg.stage, program.batch, measured,
                                                False if before_fits is False else fits,
                                                program.notes + before_lines + list(lines), full)
        memory = self.budget.memory
        if memory is None:
            return plan(None)
        if measured.footprint.total <= memory:
            return plan(True)
        return plan(False, [self._no_fit(program, measured.footprint)])

    def _plan_before(self, program: Program) -> tuple[list[str], bool | None]:
        """The pass before training, compiled: (its line, whether it fits; None when unknown or no such pass)."""
        if program.before is None:
            return [], None
        step, cfg, memory = program.step, program.step.cfg, self.budget.memory
        print(f"compiling {step.name}'s reference pass (dpo.precompute_reference) ...", file=sys.stderr, flush=True)
        lowered, resident, rows = program.before(cfg)
        scoring = measure(lowered, program.mesh).footprint.total
        peak = resident + scoring
        line = (f"dpo.precompute_reference: before training, the reference scores the data {rows} prompts at a "
                f"time: {gib(peak)} per device at its peak (the training state {gib(resident)}, the reference and "
                f"its pass {gib(scoring)})")
        if memory is None or peak <= memory:
            return [line], None if memory is None else True
        fix = f"{self.key(step, 'train.eval_batch_size')} (now {rows})"
        return [line, f"the reference pass does not fit: needs {gib(peak)} of {gib(memory)} per device; lower "
                      f"{fix} or set {self.key(step, 'dpo.precompute_reference')}=false"], False

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
        best = (cfg.model.remat, cfg.optim.grad_accum_steps, found.total)
        for remat, accum in tries:
            print(f"  {step.name} does not fit: compiling it with accumulation {accum}, remat {remat} ...",
                  file=sys.stderr, flush=True)
            total = measure(program.build(with_setting(cfg, remat, accum)), mesh).footprint.total
            if total < best[2]:
                best = (remat, accum, total)
            if total <= memory:
                setting = f"{self.key(step, 'optim.grad_accum_steps')}={accum} {self.key(step, 'model.remat')}={remat}"
                return f"{head}; fits with {setting} ({gib(total)})"
        return (f"{head}; no micro-batch fits, with or without model.remat=block (the least: {gib(best[2])} with "
                f"accumulation {best[1]}, remat {best[0]}; params, optimizer state, frozen models and batch take "
                f"{gib(fixed)}): {self._what_shrinks(step)}")

    def _what_shrinks(self, step: pipeline.Step) -> str:
        """The settings that shrink what a smaller micro-batch does not: a policy stage's rollout (every prompt of
        the batch at once), the sequences' length, each device's share of the weights, the trained parameters."""
        cfg = step.cfg
        rollout = cfg.stage in ("ppo", "grpo", "rloo")
        keys = (["train.batch_size", "data.max_prompt_tokens", "sampling.max_new_tokens"] if rollout
                else ["data.max_prompt_tokens", "data.max_response_tokens"])
        lora = "" if cfg.lora.rank else f", or train LoRA adapters ({self.key(step, 'lora.rank')})"
        return (f"lower {', '.join(self.key(step, k) for k in keys)}, split the weights over more devices "
                f"({self.key(step, 'mesh.shape')}: a larger fsdp axis){lora}")


def with_setting(cfg: Config, remat: str, accum: int) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=remat),
                               optim=dataclasses.replace(cfg.optim, grad_accum_steps=accum))


def micro_rows(cfg: Config, mesh, accum: int | None = None) -> int:
    """Rows per device of one micro-batch (of one minibatch, for ppo)."""
    ways = math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh))
    rows = cfg.train.batch_size // (cfg.ppo.minibatches if cfg.stage == "ppo" else 1)
    if cfg.stage in ("grpo", "rloo"):
        section = getattr(cfg, cfg.stage)
        rows = cfg.train.batch_size * section.group_size // section.minibatches
    return rows // ((accum or cfg.optim.grad_accum_steps) * ways)


def _splits(cfg: Config, accum: int, mesh) -> bool:
    """Whether the step's batch splits into `accum` micro-batches over the data-parallel devices."""
    ways = math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh))
    if cfg.stage in ("grpo", "rloo"):
        section = getattr(cfg, cfg.stage)
        rows, m = cfg.train.batch_size * section.group_size, section.minibatches
        shared = not section.share_prompts or cfg.train.batch_size % (m * accum) == 0  # a group per micro-batch
        return rows % m == 0 and (rows // m) % (accum * ways) == 0 and shared
    if cfg.stage != "ppo":
        return cfg.train.batch_size % (accum * ways) == 0
    sizes = [cfg.train.batch_size] + ([cfg.ppo.ptx_batch_size or cfg.train.batch_size] if cfg.ppo.ptx_coef else [])
    m = cfg.ppo.minibatches
    return all(size % m == 0 and (size // m) % (accum * ways) == 0 for size in sizes)


def candidates(cfg: Config, mesh) -> list[tuple[str, int]]:
    """(remat, accum) to try in order: no remat then block, each accumulation the batch splits into, fewest first.
    A larger micro-batch is taken to need no less memory: the config's own remat at its accumulation or fewer
    (known not to fit) is skipped. Whether remat helps is measured, not assumed (on some backends it
    does not)."""
    rows = cfg.train.batch_size * (getattr(cfg, cfg.stage).group_size if cfg.stage in ("grpo", "rloo") else 1)
    return [(remat, accum) for remat in ("none", "block") for accum in range(1, rows + 1)
            if _splits(cfg, accum, mesh) and not (remat == cfg.model.remat and accum <= cfg.optim.grad_accum_steps)]

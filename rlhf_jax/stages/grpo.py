"""The grpo and rloo stages: the policy (model.path, the SFT export) trained on groups of its own responses per
prompt, scored by a frozen reward model or by a reward function (MODULE:FUNCTION on the decoded texts), with the
initial policy as the KL reference; no value model. `cfg.stage` picks the algorithm and its config section
(cfg.grpo or cfg.rloo). Each iteration is one compiled program (`group.iteration`), the reward function
included (a host callback); this host loop only feeds prompts, logs and checkpoints, in the training loop every
stage writes out (resume, divergence and signal stops, corrupt checkpoints).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from rlhf_jax.config import Config
from rlhf_jax.data.buckets import Trimmer
from rlhf_jax.data.pipeline import parsed_metadata, stored_text, train_dataset
from rlhf_jax.errors import UserError
from rlhf_jax.models.sampling import SamplingParams
from rlhf_jax.models.tokenizer import ResponseCodec
from rlhf_jax.rl import group
from rlhf_jax.rl.ppo import Runtime
from rlhf_jax.runtime import distributed, plugins, sharding
from rlhf_jax.runtime.clock import LapClock
from rlhf_jax.runtime.metrics import drop_lines_after
from rlhf_jax.runtime.signals import heard
from rlhf_jax.stages.policy_common import (
    check_own_samples, check_reads_policy_tokens, check_reference, load_policy, open_prompts, reference_beyond_base,
    policy_sampling, reference_shardings, scalar_model, write_samples)
from rlhf_jax.training import steps
from rlhf_jax.training.loop import TrainingLoop
from rlhf_jax.training.run import Run, write_summary
from rlhf_jax.training.state import (
    check_duration, check_lora, export, export_adapter, frozen_shardings, initial_params,
    param_shardings, report_sharding, split_trainable, stage_model, state_shardings, total_steps)
from rlhf_jax.training.steps import whole_params


def section_of(cfg: Config):
    """(the algorithm's config section, its name): cfg.grpo or cfg.rloo, as cfg.stage says."""
    if cfg.stage not in group.ALGORITHMS:
        raise UserError(f"stage={cfg.stage!r}: expected one of {group.ALGORITHMS}")
    return getattr(cfg, cfg.stage), cfg.stage


def check_config(cfg: Config) -> None:
    """Everything that can be known wrong before loading a model (the reward function is imported)."""
    check_lora(cfg)
    section, name = section_of(cfg)
    if not (section.reward_model or section.reward_function):
        raise UserError(f"stage {name!r} needs {name}.reward_model (a reward model export from the rm stage) or "
                        f"{name}.reward_function (MODULE:FUNCTION scoring the decoded responses)")
    if not cfg.data.name:
        raise UserError(f"stage {name!r} needs data.name (a prompts dataset: python -m rlhf_jax.data --format "
                        "jsonl_prompts ...)")
    check_duration(cfg)
    rows, accum = cfg.train.batch_size * section.group_size, cfg.optim.grad_accum_steps
    if rows % section.minibatches or (rows // section.minibatches) % accum:
        micro = f" of optim.grad_accum_steps={accum} micro-batches each" if accum > 1 else ""
        raise UserError(f"{name}.minibatches={section.minibatches}: the {rows} responses of an iteration "
                        f"(train.batch_size={cfg.train.batch_size} x {name}.group_size={section.group_size}) do not "
                        f"split into {section.minibatches} minibatches{micro}")
    prompts, splits = cfg.train.batch_size, section.minibatches * accum
    if section.share_prompts and prompts % splits:
        raise UserError(f"{name}.share_prompts keeps each prompt's group in one micro-batch: "
                        f"train.batch_size={prompts} prompts do not split into {name}.minibatches x "
                        f"optim.grad_accum_steps = {splits} micro-batches; change one of them or set "
                        f"{name}.share_prompts: false")
    check_own_samples(cfg.sampling, name)
    if section.reward_function:
        fn, _ = plugins.function(section.reward_function, f"{name}.reward_function")
        plugins.check_signature(fn, f"{name}.reward_function={section.reward_function}", ("prompts", "responses"),
                                plugins.SCORER_KEYWORDS)


def check_sizes(cfg: Config, mesh) -> None:
    """Every minibatch of the B x G responses splits into optim.grad_accum_steps micro-batches over the
    data-parallel devices."""
    section, name = section_of(cfg)
    ways = math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh))
    rows, accum, M = cfg.train.batch_size * section.group_size, cfg.optim.grad_accum_steps, section.minibatches
    if rows % M or (rows // M) % (accum * ways):
        micro = f" of optim.grad_accum_steps={accum} micro-batches each" if accum > 1 else ""
        raise UserError(f"train.batch_size x {name}.group_size = {cfg.train.batch_size} x {section.group_size} = "
                        f"{rows} responses must split into {name}.minibatches={M} minibatches{micro} divisible by "
                        f"the {ways} data-parallel devices")


def train_group(cfg: Config, run_dir: Path, mesh: jax.sharding.Mesh | None = None) -> dict:
    check_config(cfg)
    section, name = section_of(cfg)
    source = open_prompts(cfg, name)
    mesh = mesh or sharding.mesh_from_config(cfg.mesh)
    check_sizes(cfg, mesh)
    total = total_steps(cfg, len(source))

    loaded, tokenizer, policy_model = load_policy(cfg, run_dir)
    sampling = policy_sampling(cfg, tokenizer, loaded.cfg)
    models_read, reward, reward_model, rewards_fn = {}, None, None, None
    if section.reward_model:
        key = f"{name}.reward_model"
        reward = scalar_model(section.reward_model, key, "reward")
        check_reads_policy_tokens(reward, loaded, key, section.reward_model, cfg)
        reward_model = stage_model(cfg, reward.cfg, "scalar")
        models_read[key] = section.reward_model
    else:
        rewards_fn = RewardFunction.load(section.reward_function, f"{name}.reward_function", tokenizer,
                                         sampling.eos_ids)
    if section.reference and not section.kl_coef:
        print(f"warning: {name}.reference={section.reference} is not read: with {name}.kl_coef=0 there is no KL to a "
              "reference", file=sys.stderr)
    elif section.reference:
        check_reference(section.reference, f"{name}.reference", loaded, cfg.data.chat_template)  # before compiling
        models_read[f"{name}.reference"] = section.reference

    models, settings = build_models(cfg, policy_model, reward_model, total, sampling,
                                    reward.extra.get("reward_norm") if reward is not None else None)
    state_sh, frozen_sh = iteration_shardings(cfg, models, mesh)
    report_sharding(policy_model, mesh)
    policy_params, policy_base = split_trainable(policy_model, initial_params(loaded, policy_model, cfg.seed))
    init = jax.jit(lambda p, key: group.init_state(p, models, key),
                   in_shardings=(state_sh.policy.params, sharding.replicated(mesh)), out_shardings=state_sh)
    state = init(policy_params, jax.random.PRNGKey(cfg.seed))
    # The frozen params are separate buffers: the state is donated every iteration. A LoRA policy's reference is
    # its own base.
    frozen = group.Frozen(policy_base=sharding.place(policy_base, frozen_sh.policy_base))
    if frozen_sh.ref_params is not None:
        reference = reference_beyond_base(section.reference, f"{name}.reference", loaded, policy_model,
                                          policy_params, cfg.seed)
        frozen = frozen._replace(ref_params=sharding.place(reference, frozen_sh.ref_params))
    if reward is not None:
        frozen = frozen._replace(reward_params=sharding.place(initial_params(reward, reward_model, cfg.seed),
                                                              frozen_sh.reward_params))
    # Every process reads every prompt of a batch: the B prompts are replicated (the B x G rows are split).
    trim = Trimmer(cfg.data, distributed.max_over_processes)
    data_iter = iter(train_dataset(cfg.data, cfg.data.train_split, tokenizer, cfg.train.batch_size, cfg.seed,
                                   process_index=0, process_count=1))

    run = Run(cfg, run_dir, name, models=models_read)
    state, start = run.resume(state, data_iter, total)
    if distributed.is_primary():  # process 0 writes the run's files
        drop_lines_after(run_dir / "samples.jsonl", start)  # written again by the iterations after `start`
    iteration = jit_iteration(models, settings, state_sh, frozen_sh, mesh, LapClock(), rewards_fn)

    try:
        with TrainingLoop(run, start, total, name, rate_name="episodes_per_s") as loop:
            for step in loop:
                batch = trim(next(data_iter))  # to its length bucket
                prompts = replicated(batch, mesh)
                args = (state, frozen, prompts["prompt_ids"], prompts["prompt_mask"])
                if rewards_fn is None:
                    state, metrics = iteration(*args)
                else:  # the reward function runs inside: stop signals are heard while it does
                    rewards_fn.set_batch(source, batch)
                    state, metrics = heard(lambda: jax.block_until_ready(iteration(*args)))
                    rewards_fn.raise_if_failed(metrics, step)  # before anything of this iteration is logged or saved
                samples = metrics.pop("samples", None)
                # every process holds the whole batch: process 0 counts it, once (the loop adds up the processes')
                mine = distributed.is_primary()
                loop.log(step, metrics, items=len(batch["prompt_ids"]) * settings.group_size * mine,
                         truncated=batch["truncated"].sum() * mine)
                if samples is not None and step % section.samples_every == 0 and distributed.is_primary():
                    write_samples(run_dir / "samples.jsonl", step, distributed.to_host(samples), tokenizer)
                loop.save_when_due(step, state, data_iter)
    finally:
        run.close()
    out = export(run_dir / "export", whole_params(state.policy.params, frozen.policy_base), loaded, policy_model,
                 role="policy", chat_template=cfg.data.chat_template)
    exports = {"export": str(out)}
    if policy_model.lora is not None:
        exports["adapter_export"] = str(export_adapter(run_dir / "export_adapter",
                                                       whole_params(state.policy.params, frozen.policy_base), loaded,
                                                       policy_model, cfg.model.path))
    return write_summary(run_dir, name, total, exports, loop.last)


def replicated(batch: dict, mesh) -> dict:
    """A batch every process holds whole -> global arrays replicated over the mesh."""
    repl = sharding.replicated(mesh)
    return {k: jax.make_array_from_process_local_data(repl, np.asarray(v)) for k, v in batch.items()}


SAMPLES = 8  # rollout rows (the first group's, up to this many) written every samples_every iterations


# The iteration's program, built the same way by train_group and by a dry run.


def build_models(cfg: Config, policy_model, reward_model, total: int, sampling: SamplingParams,
                 reward_norm: dict | None = None) -> tuple[group.GroupModels, group.GroupSettings]:
    """The static parts of an iteration: the models with the optimizer over `total` iterations' updates, and the
    settings. `sampling`: the rollouts' (`policy_sampling`); `reward_model` is None with a reward function;
    `reward_norm` ({gain, bias}) is its export's."""
    section, name = section_of(cfg)
    updates = total * section.epochs * section.minibatches
    norm = reward_norm or {}
    models = group.GroupModels(
        policy=policy_model, policy_opt=steps.make_optimizer(cfg.optim, updates), reward=reward_model,
        sampling=sampling)
    shared = ("group_size", "epochs", "minibatches", "clip_ratio", "kl_coef", "clip_ratio_high", "scale_by_std",
              "loss_average", "share_prompts", "no_eos_penalty")
    rows = cfg.train.batch_size * section.group_size
    settings = group.GroupSettings(
        algorithm=name, **{key: getattr(section, key) for key in shared if hasattr(section, key)},
        reward_gain=float(norm.get("gain", 1.0)), reward_bias=float(norm.get("bias", 0.0)),
        accum=cfg.optim.grad_accum_steps,
        samples=min(SAMPLES, section.group_size, rows) if section.samples_every else 0)
    return models, settings


def iteration_shardings(cfg: Config, models: group.GroupModels, mesh) -> tuple[group.GroupState, group.Frozen]:
    """NamedShardings of the iteration's state and of its frozen params (the reference, when kl_coef > 0, and
    the reward model, when there is one)."""
    section, _ = section_of(cfg)
    policy_sh = state_shardings(models.policy, models.policy_opt, mesh)
    reward_sh = None if models.reward is None else param_shardings(models.reward, mesh)
    frozen_sh = group.Frozen(
        ref_params=(reference_shardings(section.reference, models.policy, policy_sh.params, mesh)
                    if section.kl_coef > 0 else None),
        reward_params=reward_sh, policy_base=frozen_shardings(models.policy, mesh))
    return group.GroupState(policy=policy_sh, rng=sharding.replicated(mesh)), frozen_sh


def jit_iteration(models: group.GroupModels, settings: group.GroupSettings, state_sh: group.GroupState,
                  frozen_sh: group.Frozen, mesh, clock: LapClock | None = None,
                  rewards_fn: group.RewardsFn | None = None):
    """`(state, frozen, prompt_ids, prompt_mask) -> (state, metrics)` jitted over the mesh: the B prompts
    replicated (their B x G rows split over the data-parallel axes inside), metrics replicated, the state
    donated; `clock` times the rollout and the update inside the program."""
    repl = sharding.replicated(mesh)
    runtime = Runtime(clock=clock, batch_sharding=sharding.batch_sharding(mesh))
    return sharding.jit(lambda st, fr, ids, mask: group.iteration(st, fr, ids, mask, models=models, settings=settings,
                                                                  rewards_fn=rewards_fn, runtime=runtime), mesh,
                        in_shardings=(state_sh, frozen_sh, repl, repl), out_shardings=(state_sh, repl),
                        donate_argnums=0)


# --------------------------------------------------------------------------------------------- the reward function


class RewardFunction:
    """The user's MODULE:FUNCTION as the iteration's host callback: it calls the function with each row's stored
    prompt (`set_batch`) and response (decoded up to its first EOS, special tokens skipped), and where it takes
    them `ended` (whether each response ended, or ran to the length limit) and `metadata` (the prompts'), and
    checks that it returned one finite number per response. A problem cannot leave a callback as a clean error (it
    would surface as an XLA traceback), so it is recorded, the callback returns zeros, and the host loop raises it
    as one line once the iteration has returned (`raise_if_failed`), before anything is logged or saved."""

    def __init__(self, fn: Callable, who: str, tokenizer, eos_ids: Sequence[int]):
        self.fn, self.who, self.tokenizer, self.eos_ids = fn, who, tokenizer, tuple(eos_ids)
        self.responses = ResponseCodec(tokenizer)
        self.problem: str | None = None
        self.batch: tuple | None = None  # set_batch's

    @classmethod
    def load(cls, spec: str, key: str, tokenizer, eos_ids: Sequence[int]) -> "RewardFunction":
        return cls(plugins.function(spec, key)[0], f"{key}={spec}", tokenizer, eos_ids)

    def set_batch(self, source, batch: dict) -> None:
        """The prompts of the iteration about to run, read from the stored split `source` by the batch's
        `example_index`: the function gets each as it was written, with its metadata, instead of the text the
        model read (a chat template's words around it, a long prompt cut)."""
        examples = [source[int(i)] for i in batch["example_index"]]
        self.batch = (np.asarray(batch["prompt_ids"]), np.asarray(batch["prompt_mask"], bool),
                      [stored_text(e["prompt"]) for e in examples], [parsed_metadata(e["metadata"]) for e in examples])

    def texts(self, prompt_ids_RP, prompt_mask_RP, tokens_RN, mask_RN) -> tuple[list, list[str], list[bool], list]:
        """(prompts, responses, whether each ended, the prompts' metadata) as the function sees them: one of each
        per row; without a batch set (a program run outside the stage), each prompt as its ids decode, no
        metadata."""
        prompt_ids_RP, prompt_mask_RP = np.asarray(prompt_ids_RP), np.asarray(prompt_mask_RP, bool)
        if self.batch is not None:
            prompts, metadata = self._stored_prompts(prompt_ids_RP, prompt_mask_RP)
        else:
            prompts, metadata, decoded = [], [None] * len(prompt_ids_RP), {}
            for ids, mask in zip(prompt_ids_RP, prompt_mask_RP):
                key = tuple(ids[mask].tolist())  # a prompt repeats G times: decoded once
                if key not in decoded:
                    decoded[key] = self.tokenizer.decode(list(key), skip_special_tokens=True)
                prompts.append(decoded[key])
        responses, ended = [], []
        for tokens, mask in zip(np.asarray(tokens_RN), np.asarray(mask_RN, bool)):
            ids = tokens[mask].tolist()
            ended.append(bool(ids) and ids[-1] in self.eos_ids)  # the mask ends at the first EOS, included
            responses.append(self.responses.decode(ids[:-1] if ended[-1] else ids))
        return prompts, responses, ended, metadata

    def _stored_prompts(self, prompt_ids_RP, prompt_mask_RP) -> tuple[list[str], list]:
        """Row r's prompt is the batch's prompt r // G (`group.repeat_prompts`): checked by its ids, so that rows
        in another order can never be scored against another prompt."""
        ids_BP, mask_BP, texts, metadata = self.batch
        B, R = len(ids_BP), len(prompt_ids_RP)
        of_row = np.arange(R) // max(R // B, 1)
        same = (R % B == 0 and R >= B and prompt_ids_RP.shape == (R, ids_BP.shape[1])
                and np.array_equal(prompt_mask_RP, mask_BP[of_row])
                and np.array_equal(np.where(prompt_mask_RP, prompt_ids_RP, 0), np.where(mask_BP, ids_BP, 0)[of_row]))
        if not same:
            raise RuntimeError(f"the {R} rows scored are not the {B} prompts of the batch, each repeated")
        return [texts[b] for b in of_row], [metadata[b] for b in of_row]

    def __call__(self, prompt_ids_RP, prompt_mask_RP, tokens_RN, mask_RN) -> np.ndarray:
        R = len(tokens_RN)
        if self.problem is not None:  # a failed run stops at the end of this iteration
            return np.zeros(R, np.float32)
        try:
            prompts, responses, ended, metadata = self.texts(prompt_ids_RP, prompt_mask_RP, tokens_RN, mask_RN)
            offered = dict(zip(plugins.SCORER_KEYWORDS, (ended, metadata)))
            returned = plugins.call(self.fn, self.who, prompts, responses, **offered)
            return plugins.scores(returned, R, self.who, np.float32)
        except UserError as e:
            self.problem = str(e)
        except BaseException as e:  # noqa: BLE001 - nothing may escape the callback (XLA's traceback follows)
            self.problem = f"{self.who}: the responses could not be prepared ({type(e).__name__}: {e})"
        return np.zeros(R, np.float32)

    def raise_if_failed(self, metrics: dict, step: int) -> None:
        """Waits for the iteration that returned `metrics`; raises the problem its reward function met, if any
        (on every process: the callback runs on one)."""
        jax.block_until_ready(metrics)
        problems = [p for p in distributed.all_gather_json(self.problem) if p]
        if problems:
            raise UserError(f"{problems[0]} (iteration {step})")

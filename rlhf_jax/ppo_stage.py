"""The ppo stage: the policy (model.path, the SFT export) against a frozen reward model (ppo.reward_model), with
a value model initialised from it (or from ppo.value_model) and the initial policy as the KL reference. Each
iteration is one compiled program (`ppo.iteration`); this host loop only feeds prompts, logs and checkpoints,
through the same loop pieces as sft and rm (resume, divergence and signal stops, corrupt checkpoints).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import numpy as np

from rlhf_jax import loop, ppo, sharding, steps
from rlhf_jax.checkpoint import LoadedModel, load_model
from rlhf_jax.config import Config
from rlhf_jax.data.pipeline import open_split, train_dataset
from rlhf_jax.errors import UserError
from rlhf_jax.model import make_model, param_logical_axes
from rlhf_jax.ppo_losses import KLController
from rlhf_jax.sampling import SamplingParams
from rlhf_jax.tokenizer import PAD_ID


def _check_config(cfg: Config) -> None:
    """Everything that can be known wrong before loading a model."""
    if not cfg.ppo.reward_model:
        raise UserError("stage 'ppo' needs ppo.reward_model (a reward model export from the rm stage)")
    if not cfg.data.name:
        raise UserError("stage 'ppo' needs data.name (a prompts dataset: python -m rlhf_jax.data --format "
                        "jsonl_prompts ...)")
    if cfg.train.batch_size % cfg.ppo.minibatches:
        raise UserError(f"ppo.minibatches={cfg.ppo.minibatches} does not divide train.batch_size="
                        f"{cfg.train.batch_size} (the rollout batch)")
    if cfg.optim.grad_accum_steps != 1:
        raise UserError("optim.grad_accum_steps is not supported by the ppo stage yet; use ppo.minibatches")
    if cfg.ppo.ptx_coef:
        raise UserError("ppo.ptx_coef (PPO-ptx) is not supported yet; set it to 0")


def _scalar_model(path: str, key: str) -> LoadedModel:
    loaded = load_model(path)
    if loaded.head != "scalar":
        raise UserError(f"{key}={path}: a language model, expected a scalar-head (reward/value) export")
    return loaded


def train_ppo(cfg: Config, run_dir: Path, mesh: jax.sharding.Mesh | None = None) -> dict:
    _check_config(cfg)
    source, metadata = open_split(cfg.data.dir, cfg.data.name, cfg.data.train_split)
    if metadata["kind"] != "prompts":
        raise UserError(f"data.name={cfg.data.name!r} is a {metadata['kind']!r} dataset; stage 'ppo' needs one of "
                        "kind 'prompts'")
    mesh = mesh or sharding.make_mesh(cfg.mesh.shape, cfg.mesh.axes)
    minibatch = cfg.train.batch_size // cfg.ppo.minibatches
    ways = math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh))
    if minibatch % ways:
        raise UserError(f"the minibatch (train.batch_size / ppo.minibatches = {cfg.train.batch_size} / "
                        f"{cfg.ppo.minibatches} = {minibatch}) is not divisible by the {ways} data-parallel devices")
    total = loop.total_steps(cfg, len(source))

    loaded, tokenizer, policy_model = loop.load_for_training(cfg, run_dir, "lm")
    loop.check_positions(loaded.cfg, cfg.data.max_prompt_tokens + cfg.sampling.max_new_tokens,
                         "data.max_prompt_tokens + sampling.max_new_tokens")
    reward = _scalar_model(cfg.ppo.reward_model, "ppo.reward_model")
    value = _scalar_model(cfg.ppo.value_model, "ppo.value_model") if cfg.ppo.value_model else reward
    for other, key in ((reward, "ppo.reward_model"), (value, "ppo.value_model")):
        if other.cfg.vocab_size != loaded.cfg.vocab_size:
            raise UserError(f"{key}: vocab_size {other.cfg.vocab_size} differs from the policy's "
                            f"{loaded.cfg.vocab_size} (it must read the policy's tokens)")
    dtypes = dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat == "block")
    value_model, reward_model = make_model(value.cfg, "scalar", **dtypes), make_model(reward.cfg, "scalar", **dtypes)

    updates = total * cfg.ppo.epochs * cfg.ppo.minibatches
    value_optim = dataclasses.replace(cfg.optim, lr=cfg.ppo.value_lr or cfg.optim.lr)
    norm = reward.extra.get("reward_norm") or {}
    eos = loaded.cfg.eos_token_ids or (tokenizer.eos_token_id,)
    s = cfg.sampling
    models = ppo.PPOModels(
        policy=policy_model, value=value_model, reward=reward_model,
        policy_opt=steps.make_optimizer(cfg.optim, updates), value_opt=steps.make_optimizer(value_optim, updates),
        sampling=SamplingParams(s.max_new_tokens, s.temperature, s.top_k, s.top_p, tuple(eos), PAD_ID),
        ppo=cfg.ppo, reward_gain=float(norm.get("gain", 1.0)), reward_bias=float(norm.get("bias", 0.0)))

    repl = sharding.replicated(mesh)
    policy_sh = loop.state_shardings(policy_model, models.policy_opt, mesh)
    value_sh = loop.state_shardings(value_model, models.value_opt, mesh)
    state_sh = ppo.PPOState(policy=policy_sh, value=value_sh, kl=KLController(repl), rng=repl,
                            ema=policy_sh.params if cfg.ppo.ema_decay else None)
    reward_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), reward.params)
    reward_sh = sharding.param_shardings(param_logical_axes(reward_model), reward_shapes, mesh)
    loop.report_sharding(policy_model, mesh)

    policy_params = loop.initial_params(loaded, policy_model, cfg.seed)
    value_params = loop.initial_params(value, value_model, cfg.seed)
    init = jax.jit(lambda p, v, key: ppo.init_state(p, v, models, key),
                   in_shardings=(policy_sh.params, value_sh.params, repl), out_shardings=state_sh)
    state = init(policy_params, value_params, jax.random.PRNGKey(cfg.seed))
    # The reference and the reward model are separate buffers: the state is donated every iteration.
    frozen = ppo.Frozen(ref_params=sharding.place(policy_params, policy_sh.params),
                        reward_params=sharding.place(loop.initial_params(reward, reward_model, cfg.seed),
                                                     reward_sh))
    data_iter = iter(train_dataset(cfg.data, cfg.data.train_split, tokenizer, cfg.train.batch_size, cfg.seed))

    run = loop.Run(cfg, run_dir, "ppo")
    state, start = run.resume(state, data_iter)
    batch_sh = sharding.batch_sharding(mesh)
    iteration = jax.jit(lambda st, fr, ids, mask: ppo.iteration(st, fr, ids, mask, models=models),
                        in_shardings=(state_sh, ppo.Frozen(policy_sh.params, reward_sh), batch_sh, batch_sh),
                        out_shardings=(state_sh, repl), donate_argnums=0)
    step_fn = lambda st, batch, rng: iteration(st, frozen, batch["prompt_ids"], batch["prompt_mask"])
    try:
        state, last = loop.drive(run, state, start=start, total=total, data_iter=data_iter, step_fn=step_fn,
                                 mesh=mesh, desc="ppo", count_tokens=lambda b: len(b["prompt_ids"]),
                                 rate_name="episodes_per_s", cadence=loop.Cadence(cfg, total, False))
    finally:
        run.close()
    out = loop.export(run_dir / "export", state.policy.params, loaded, policy_model)
    value_out = loop.export(run_dir / "export_value", state.value.params, value, value_model)
    exports = {"export": str(out), "value_export": str(value_out)}
    if state.ema is not None:
        exports["ema_export"] = str(loop.export(run_dir / "export_ema", state.ema, loaded, policy_model))
    summary = {"stage": "ppo", "steps": total, **exports,
               **{k: round(v, 6) for k, v in last.items() if isinstance(v, float) and np.isfinite(v)}}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return summary

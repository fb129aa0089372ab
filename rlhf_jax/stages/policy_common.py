"""What the stages that train a policy against something share: the prompts and the policy they start from, the
reward and value models they load, the frozen reference policy, the plain sampling that on-policy training needs,
and the samples they write."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from rlhf_jax.config import Config
from rlhf_jax.data.pipeline import open_split
from rlhf_jax.errors import UserError
from rlhf_jax.models.checkpoint import LoadedModel, check_role, load_model, model_meta, warn_prompt_form
from rlhf_jax.models.sampling import SamplingParams, tokenizer_vocab
from rlhf_jax.models.tokenizer import PAD_ID, PromptEncoder, ResponseCodec, check_same_tokenizer
from rlhf_jax.models import lora
from rlhf_jax.models.transformer import without_adapters
from rlhf_jax.training.state import (check_positions, initial_params, load_for_training, model_key,
                                     param_shardings)


def open_prompts(cfg: Config, stage: str):
    """The training split of data.name, which must be a prompts dataset."""
    source, metadata = open_split(cfg.data.dir, cfg.data.name, cfg.data.train_split)
    if metadata["kind"] != "prompts":
        raise UserError(f"data.name={cfg.data.name!r} is a {metadata['kind']!r} dataset; stage {stage!r} needs one of "
                        "kind 'prompts'")
    return source


def load_policy(cfg: Config, run_dir: Path):
    """(loaded, tokenizer, model) of model.path: a policy, with positions for a prompt and its sampled tokens."""
    loaded, tokenizer, model = load_for_training(cfg, run_dir, "lm")
    check_role(loaded, f"model.path={cfg.model.path}", "policy")
    check_positions(loaded.cfg, cfg.data.max_prompt_tokens + cfg.sampling.max_new_tokens,
                    "data.max_prompt_tokens + sampling.max_new_tokens", model_key(cfg))
    return loaded, tokenizer, model


def rollout_sampling(cfg: Config, eos_ids: Sequence[int], vocab: int | None = None) -> SamplingParams:
    """How an on-policy stage's rollouts sample: `sampling.*`, responses ending at `eos_ids`, drawn from the first
    `vocab` ids (`SamplingParams.vocab`)."""
    s = cfg.sampling
    return SamplingParams(s.max_new_tokens, s.temperature, s.top_k, s.top_p, tuple(eos_ids), PAD_ID, vocab)


def policy_sampling(cfg: Config, tokenizer, model_cfg) -> SamplingParams:
    """`rollout_sampling` of the policy `model_cfg` read with `tokenizer`: a response ends at the policy's EOS ids
    and at the token its training data ends responses with (with data.chat_template, the template's turn end), and
    is drawn from the ids the tokenizer has (none of the rows a model pads its vocabulary with)."""
    encoder = PromptEncoder(tokenizer, cfg.data.max_prompt_tokens, cfg.data.chat_template)
    return rollout_sampling(cfg, encoder.stop_ids(model_cfg.eos_token_ids), tokenizer_vocab(tokenizer, model_cfg))


def check_reads_policy_tokens(other: LoadedModel, policy: LoadedModel, key: str, path: str, cfg: Config) -> None:
    """A reward or value model must read the policy's tokens (its vocabulary and tokenizer) and as many as a
    prompt and its response hold: past its positions a model reads NaN, and every reward with it."""
    if other.cfg.vocab_size != policy.cfg.vocab_size:
        raise UserError(f"{key}: vocab_size {other.cfg.vocab_size} differs from the policy's "
                        f"{policy.cfg.vocab_size} (it must read the policy's tokens)")
    check_same_tokenizer(other.tokenizer_dir, policy.tokenizer_dir, f"{key}={path}", "the policy",
                         cfg.data.chat_template)
    warn_prompt_form(other, cfg.data.chat_template, f"{key}={path}")
    check_positions(other.cfg, cfg.data.max_prompt_tokens + cfg.sampling.max_new_tokens,
                    f"{key}={path}: data.max_prompt_tokens + sampling.max_new_tokens")


def check_own_samples(s, stage: str) -> None:
    """A stage that trains on its own samples must draw them from the distribution its ratio and KL use:
    top-k, top-p and greedy decoding each draw from another one."""
    changed = [f"{key}={value}" for key, value, plain in (("sampling.temperature", s.temperature, s.temperature > 0),
                                                          ("sampling.top_k", s.top_k, s.top_k == 0),
                                                          ("sampling.top_p", s.top_p, s.top_p == 1.0)) if not plain]
    if changed:
        raise UserError(f"stage {stage!r} trains on its own samples and needs plain sampling (temperature > 0, "
                        f"top_k 0, top_p 1); got {', '.join(changed)}")


def scalar_model(path: str, key: str, *roles: str) -> LoadedModel:
    """A scalar-head model of one of `roles` (when its export records one)."""
    loaded = load_model(path, key=key)
    if loaded.head != "scalar":
        raise UserError(f"{key}={path}: a language model, expected a scalar-head (reward/value) export")
    check_role(loaded, f"{key}={path}", *roles)
    return loaded


def reference_params(path: str, key: str, loaded: LoadedModel, policy_model, policy_params: dict,
                     seed: int) -> dict:
    """The frozen reference's host params: the starting policy's when `path` is empty, else those of the policy
    at `path` (config key `key`), which must have the starting policy's shape and tokenizer (such as the SFT
    model when a later round starts from the previous round's policy)."""
    if not path:
        return policy_params
    check_reference(path, key, loaded)
    return initial_params(load_model(path, key=key), policy_model, seed)


def check_reference(path: str, key: str, loaded: LoadedModel, chat_template: bool | None = None) -> None:
    """A reference at `path` (config key `key`) is a policy of the starting policy's shape and tokenizer: checked
    from its metadata, before any weights load or program compiles; with `chat_template` (data.chat_template), its
    chat template and the prompts' form too."""
    if not path:
        return
    where = f"{key}={path}"
    reference = model_meta(path, key=key)
    if reference.head != "lm":
        raise UserError(f"{where}: a reward/value model (scalar head), expected a policy")
    check_role(reference, where, "policy")
    if reference.cfg != loaded.cfg:
        raise UserError(f"{where}: its architecture differs from model.path's (the reference must be the policy's "
                        "starting point, such as the SFT export)")
    check_same_tokenizer(reference.tokenizer_dir, loaded.tokenizer_dir, where, "the policy", bool(chat_template))
    if chat_template is not None:
        warn_prompt_form(reference, chat_template, where)


def reference_beyond_base(path: str, key: str, loaded: LoadedModel, policy_model, policy_params: dict,
                          seed: int) -> dict:
    """The host params the frozen reference holds beyond the policy's frozen base (`ppo.Frozen.ref_params`): all
    of `reference_params` in full fine-tuning or with `path` (its adapters dropped); for a LoRA policy's own
    reference, only the initial values of what lora.also_train trains (`policy_params`: what trains)."""
    if policy_model.lora is None:
        return reference_params(path, key, loaded, policy_model, policy_params, seed)
    if not path:
        return lora.also_trained(policy_params, policy_model.lora)
    return lora.without_adapters(reference_params(path, key, loaded, policy_model, policy_params, seed))


def reference_shardings(path: str, policy_model, trainable_sh, mesh):
    """NamedShardings of `reference_beyond_base`'s params; `trainable_sh`: those of what the policy trains."""
    if policy_model.lora is not None and not path:
        return lora.also_trained(trainable_sh, policy_model.lora)
    return param_shardings(without_adapters(policy_model), mesh)


def write_samples(path: Path, step: int, samples: dict, tokenizer) -> None:
    """Appends one JSON line per sampled row: prompt, response and every per-row number of `samples` (such as
    score and kl) beside the token arrays prompt_ids, prompt_mask, tokens and mask."""
    numbers = [k for k in samples if k not in ("prompt_ids", "prompt_mask", "tokens", "mask")]
    responses = ResponseCodec(tokenizer)
    with open(path, "a") as f:
        for row in range(len(samples["tokens"])):
            prompt = samples["prompt_ids"][row][samples["prompt_mask"][row]].tolist()
            response = samples["tokens"][row][samples["mask"][row]].tolist()
            f.write(json.dumps({"step": step, "prompt": tokenizer.decode(prompt),
                                "response": responses.decode(response),
                                **{k: round(float(samples[k][row]), 6) for k in numbers}}) + "\n")

"""The config sections of the policy-optimisation algorithms: PPO (InstructGPT's stage 3), DPO on rankings, and
GRPO and RLOO on groups of samples per prompt. Re-exported by `rlhf_jax.config`."""

from dataclasses import dataclass
from typing import Literal

from rlhf_jax.typed_yaml import check, coerce, opt


@dataclass(frozen=True)
class PPOSection:
    reward_model: str = opt("", "reward model export (scalar head; its reward_norm is applied)")
    value_model: str = opt("", 'value model init: "" = the reward model, or another scalar-head export')
    reference: str = opt("", 'the KL reference policy: "" = model.path (a later round of a pipeline continues '
                             "from its last policy and keeps the SFT model here)")
    value_lr: float = opt(0.0, "value model learning rate; 0 = optim.lr")
    ema_decay: float = opt(0.0, "EMA of the policy weights per iteration (InstructGPT 0.992), exported as "
                                 "export_ema/; 0 = off")
    kl_coef: float = opt(0.02, "beta of the per-token KL penalty (InstructGPT 0.02); the initial beta when adaptive")
    kl_target: float = opt(0.0, "adaptive KL controller target (nats per sequence); 0 = fixed kl_coef")
    kl_horizon: float = opt(10000.0, "adaptive KL controller horizon in episodes")
    kl_estimator: Literal["k1", "k3"] = opt("k1", "per-token KL estimator: k1 = logp - logp_ref, k3 = exp(d) - d - 1")
    no_eos_penalty: float | None = opt(None, "score of a response that never emitted EOS, in the reward model's "
                                              "normalised units (after its reward_norm gain and bias; with "
                                              "rm.normalize bias_gain, reference responses score mean 0, std 1); "
                                              "null = keep its score")
    gamma: float = opt(1.0, "GAE discount")
    lam: float = opt(0.95, "GAE lambda")
    clip_ratio: float = opt(0.2, "policy ratio clip epsilon")
    clip_value: float = opt(0.2, "value prediction clip around the rollout's values")
    vf_coef: float = opt(0.1, "value loss coefficient")
    entropy_coef: float = opt(0.0, "entropy bonus coefficient (none by default)")
    whiten_rewards: bool = opt(False, "scale rewards to unit variance over real tokens (mean kept)")
    epochs: int = opt(1, "passes over each rollout batch (InstructGPT 1)")
    minibatches: int = opt(1, "minibatches per epoch; each one optimizer step of policy and value")
    ptx_coef: float = opt(0.0, "PPO-ptx: weight of the per-token mean pretraining LM loss; 0 = off (InstructGPT's "
                                "27.8 was for its own loss scaling: tune it, see docs/stages/ppo.md)")
    ptx_dataset: str = opt("", "PPO-ptx: prepared sft dataset for the LM loss (on every real token)")
    ptx_batch_size: int = opt(0, "PPO-ptx: sequences of ptx_dataset per iteration, split over the minibatches; "
                                  "0 = train.batch_size")
    samples_every: int = opt(10, "iterations between writing a few prompts, responses, scores and KL to "
                                  "samples.jsonl; 0 = never")

    def __post_init__(self):
        coerce(self)
        for name in ("value_lr", "kl_coef", "kl_target", "clip_value", "vf_coef", "entropy_coef", "ptx_coef"):
            check(self, name, getattr(self, name) >= 0, "must be >= 0")
        check(self, "clip_ratio", self.clip_ratio > 0, "must be > 0 (0 clips every ratio to 1)")
        check(self, "kl_horizon", self.kl_horizon > 0, "must be > 0")
        check(self, "ema_decay", 0 <= self.ema_decay < 1, "must be in [0, 1)")
        check(self, "gamma", 0 <= self.gamma <= 1, "must be in [0, 1]")
        check(self, "lam", 0 <= self.lam <= 1, "must be in [0, 1]")
        check(self, "epochs", self.epochs >= 1, "must be >= 1")
        check(self, "ptx_batch_size", self.ptx_batch_size >= 0, "must be >= 0")
        check(self, "samples_every", self.samples_every >= 0, "must be >= 0")
        check(self, "minibatches", self.minibatches >= 1, "must be >= 1")


@dataclass(frozen=True)
class DPOSection:
    beta: float = opt(0.1, "strength of the implicit KL constraint: the implicit reward is beta * log(pi / ref)")
    loss: Literal["sigmoid", "ipo"] = opt("sigmoid", "sigmoid: -log sigmoid(beta * margin) (Rafailov et al. 2023); "
                                                     "ipo: (margin - 1 / (2 beta))^2 (Azar et al. 2023)")
    label_smoothing: float = opt(0.0, "sigmoid: the assumed probability that a pair's preference is flipped "
                                      "(conservative DPO, for noisy labels); 0 = off")
    reference: str = opt("", 'the frozen reference policy: "" = model.path (the SFT export)')
    precompute_reference: bool = opt(False, "score every training response with the reference once before "
                                            "training, so that the reference is not held during training (the "
                                            "scores are kept in the run directory for a resumed run)")

    def __post_init__(self):
        coerce(self)
        check(self, "beta", self.beta > 0, "must be > 0")
        check(self, "label_smoothing", 0 <= self.label_smoothing < 0.5, "must be in [0, 0.5)")
        check(self, "label_smoothing", not (self.label_smoothing and self.loss == "ipo"),
               "applies to dpo.loss=sigmoid only")


@dataclass(frozen=True)
class GroupSection:
    """What GRPO and RLOO share: a group of samples per prompt, scored by a reward model or a reward function."""

    reward_model: str = opt("", "reward model export scoring each response (its reward_norm applied); set this "
                                "or reward_function")
    reward_function: str = opt("", "MODULE:FUNCTION called with (prompts, responses): the stored prompts, the "
                                   "decoded responses (cut at EOS), and ended (of each response) and metadata (of "
                                   "each prompt) where it names those keywords; returns one float per response; "
                                   "set this or reward_model")
    group_size: int = opt(8, "responses sampled per prompt (k)")
    reference: str = opt("", 'the KL reference policy: "" = model.path (a later round of a pipeline continues '
                             "from its last policy and keeps the SFT model here)")
    epochs: int = opt(1, "passes over each rollout batch")
    minibatches: int = opt(1, "minibatches per epoch, each one optimizer step")
    share_prompts: bool = opt(True, "run each prompt's prefill and forward passes once for its group (its keys and "
                                    "values read by the group's responses) instead of once per response: the same "
                                    "samples and log-probs for fewer FLOPs; minibatches and micro-batches then hold "
                                    "whole groups, so train.batch_size must divide into minibatches x "
                                    "optim.grad_accum_steps")
    samples_every: int = opt(10, "iterations between writing a few prompts, responses and rewards to samples.jsonl; "
                                 "0 = never")
    no_eos_penalty: float | None = opt(None, "reward of a response that never emitted EOS (ran to "
                                              "sampling.max_new_tokens), replacing the reward model's or function's "
                                              "(DAPO's overlong punishment); null = keep its reward")

    def __post_init__(self):
        coerce(self)
        check(self, "group_size", self.group_size >= 2, "must be >= 2 (a group of one has no baseline)")
        check(self, "epochs", self.epochs >= 1, "must be >= 1")
        check(self, "minibatches", self.minibatches >= 1, "must be >= 1")
        check(self, "samples_every", self.samples_every >= 0, "must be >= 0")
        check(self, "reward_function", not (self.reward_function and self.reward_model),
               f"and reward_model ({self.reward_model}) are both set; set one of them (reward_model=\"\" clears it)")
        check(self, "reward_function", not self.reward_function or ":" in self.reward_function,
               "expects MODULE:FUNCTION")


@dataclass(frozen=True)
class GRPOSection(GroupSection):
    scale_by_std: bool = opt(True, "divide each group's advantages by its reward std (GRPO); false drops that half of "
                                   "Dr. GRPO (with loss_average: token, close to all of it)")
    clip_ratio: float = opt(0.2, "policy ratio clip epsilon (the lower bound, 1 - eps)")
    clip_ratio_high: float = opt(0.0, "upper clip epsilon (DAPO's clip-higher, e.g. 0.28); 0 = clip_ratio")
    kl_coef: float = opt(0.04, "weight of the k3 KL to the reference as a loss term; 0 = no KL (and no reference)")
    loss_average: Literal["sequence", "token"] = opt(
        "sequence", "sequence: mean over each response's tokens, then over responses (GRPO); token: mean over every "
                    "token of the minibatch (DAPO)")

    def __post_init__(self):
        super().__post_init__()
        check(self, "clip_ratio", self.clip_ratio > 0, "must be > 0")
        check(self, "clip_ratio_high", self.clip_ratio_high >= 0, "must be >= 0")
        check(self, "kl_coef", self.kl_coef >= 0, "must be >= 0")


@dataclass(frozen=True)
class RLOOSection(GroupSection):
    group_size: int = opt(4, "responses sampled per prompt (k)")
    kl_coef: float = opt(0.05, "beta of the per-sequence KL penalty subtracted from each reward")
    clip_ratio: float = opt(0.0, "PPO clipping of the ratio with this epsilon; 0 = plain REINFORCE")

    def __post_init__(self):
        super().__post_init__()
        check(self, "kl_coef", self.kl_coef >= 0, "must be >= 0")
        check(self, "clip_ratio", self.clip_ratio >= 0, "must be >= 0")

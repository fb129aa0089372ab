"""The run's configuration schema: one frozen dataclass per section of a config YAML, with each key's type,
default, help text and checks, and the entry points that load a `Config` (a YAML file plus `a.b=value`
overrides), turn it back into a plain dict and list its keys for --help. The typed loading itself is
`rlhf_jax.typed_yaml`, which raises the one-line `ConfigError`s.
"""

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from rlhf_jax import typed_yaml
from rlhf_jax.config.algorithms import DPOSection, GroupSection, GRPOSection, PPOSection, RLOOSection
from rlhf_jax.typed_yaml import FieldError, check, coerce, opt, section

# Below it, a temperature is greedy decoding in all but name (and at 1e-300 it is 0 in float32): set 0 instead.
MIN_TEMPERATURE = 1e-6

__all__ = [
    "Config",
    "ModelSection",
    "MeshSection",
    "DistributedSection",
    "SamplingSection",
    "GenerateSection",
    "DataSection",
    "TrainSection",
    "RMSection",
    "PPOSection",
    "DPOSection",
    "GroupSection",
    "GRPOSection",
    "RLOOSection",
    "PrepareSection",
    "TaskSection",
    "LabelSection",
    "EvalSection",
    "OptimSection",
    "LoraSection",
    "load_config",
    "apply_override",
    "config_from_dict",
    "config_to_dict",
    "config_help",
]

Dtype = Literal["float32", "bfloat16"]


@dataclass(frozen=True)
class ModelSection:
    path: str = opt("", 'HF or rlhf_jax checkpoint dir; "" builds the tiny built-in model')
    dtype: Dtype = opt("float32", "compute dtype (params stay in param_dtype)")
    param_dtype: Dtype = opt("float32", "dtype parameters are stored in; bfloat16 halves their memory but rounds "
                                        "away AdamW's small steps of weights that train whole (suits LoRA's base)")
    remat: Literal["none", "block"] = opt("none", "'block' recomputes each block's activations in the backward pass; "
                                                  "scanned layers under 'none' keep matmul outputs, recompute the rest")
    scan_layers: bool | None = opt(None, "run the layers as one scan over params stacked on a layer axis (compile "
                                         "time flat in depth; unrolled, decoding and training run 5-10% faster on "
                                         "CPU); null: when the model has more than 8 layers")

    def __post_init__(self):
        coerce(self)


@dataclass(frozen=True)
class MeshSection:
    shape: tuple[int, ...] = opt((-1, 1, 1), "devices per mesh axis; one -1 takes all remaining devices")
    axes: tuple[str, ...] = opt(("data", "fsdp", "tensor"), "mesh axis names, one per shape entry")
    preset: str = opt("", "a named topology instead of shape (v5e-16, v5p-64, 8xH100, 2x8xH100; see "
                            "rlhf_jax/runtime/sharding.py MESH_PRESETS); its device count is checked at start")

    def __post_init__(self):
        coerce(self)
        from rlhf_jax.runtime.sharding import MESH_AXES, MESH_PRESETS  # the tables live with the mesh code

        check(self, "preset", not self.preset or self.preset in MESH_PRESETS,
               f"unknown; expected one of {sorted(MESH_PRESETS)}")
        check(self, "preset", not self.preset or (self.shape, self.axes) == ((-1, 1, 1), ("data", "fsdp", "tensor")),
               "set mesh.preset or mesh.shape/mesh.axes, not both")
        check(self, "shape", len(self.shape) > 0, "must not be empty")
        check(self, "shape", all(n == -1 or n >= 1 for n in self.shape), "entries must be >= 1 or -1")
        check(self, "shape", self.shape.count(-1) <= 1, "may contain at most one -1")
        check(self, "axes", len(self.axes) == len(self.shape),
               f"must have one name per shape entry ({len(self.shape)})")
        check(self, "axes", all(self.axes), "names must be non-empty")
        check(self, "axes", len(set(self.axes)) == len(self.axes), "names must be unique")
        for name in self.axes:  # another name would split nothing: every device would hold and run everything
            close = difflib.get_close_matches(name, MESH_AXES, n=1)
            check(self, "axes", name in MESH_AXES, f"must name axes among {', '.join(MESH_AXES)} ({name!r} is none "
                  f"of them{f'; did you mean {close[0]!r}?' if close else ''})")


@dataclass(frozen=True)
class DistributedSection:
    coordinator_address: str = opt("", "host:port of process 0 (else $JAX_COORDINATOR_ADDRESS; SLURM and TPU VMs "
                                        "are detected); empty with one process")
    num_processes: int = opt(0, "processes in the run (else $JAX_NUM_PROCESSES); 0: from the environment")
    process_id: int = opt(-1, "this process's index (else $JAX_PROCESS_ID); -1: from the environment")
    initialization_timeout: int = opt(300, "seconds a process waits for every process to join before it stops")

    def __post_init__(self):
        coerce(self)
        check(self, "num_processes", self.num_processes >= 0, "must be >= 0")
        check(self, "process_id", self.process_id >= -1, "must be >= -1")
        check(self, "initialization_timeout", self.initialization_timeout > 0, "must be > 0")
        check(self, "process_id", self.num_processes == 0 or self.process_id < self.num_processes,
              f"must be below distributed.num_processes ({self.num_processes})")


@dataclass(frozen=True)
class RuntimeSection:
    compile_cache: str = opt("~/.cache/rlhf_jax/xla", "directory of XLA's compilation cache, kept across runs (a "
                                                      "program compiles once per machine; 10 GiB at most, the least "
                                                      "recently used go first); empty = off; "
                                                      "$JAX_COMPILATION_CACHE_DIR (and _MAX_SIZE, bytes) win when set")

    def __post_init__(self):
        coerce(self)


@dataclass(frozen=True)
class SamplingSection:
    max_new_tokens: int = opt(64, "tokens to generate per prompt")
    temperature: float = opt(1.0, "softmax temperature; 0 means greedy (otherwise at least 1e-6)")
    top_k: int = opt(0, "keep only the k most likely tokens; 0 = off")
    top_p: float = opt(1.0, "nucleus sampling probability mass; 1 = off")
    batch_size: int = opt(8, "prompts generated together")
    max_prompt_tokens: int = opt(128, "prompts are truncated to this many tokens")

    def __post_init__(self):
        coerce(self)
        check(self, "max_new_tokens", self.max_new_tokens > 0, "must be > 0")
        check(self, "temperature", self.temperature == 0 or MIN_TEMPERATURE <= self.temperature < math.inf,
              f"must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}")
        check(self, "top_k", self.top_k >= 0, "must be >= 0")
        check(self, "top_p", 0 < self.top_p <= 1, "must be in (0, 1]")
        check(self, "batch_size", self.batch_size > 0, "must be > 0")
        check(self, "max_prompt_tokens", self.max_prompt_tokens > 0, "must be > 0")


@dataclass(frozen=True)
class GenerateSection:
    prompt_file: str = opt("", 'text file with one prompt per line; "" = bundled demo prompts')
    output: str = opt("", 'JSONL output path; "" = <run_dir>/samples.jsonl')

    def __post_init__(self):
        coerce(self)


@dataclass(frozen=True)
class DataSection:
    dir: str = opt("data", "directory of prepared datasets (python -m rlhf_jax.data --data-dir)")
    name: str = opt("", "prepared dataset name (python -m rlhf_jax.data --name)")
    train_split: str = opt("train", "split trained on")
    eval_split: str = opt("eval", "held-out split")
    max_prompt_tokens: int = opt(256, "prompts are truncated from the left to this many tokens")
    max_response_tokens: int = opt(256, "responses (EOS included) are truncated from the right to this many")
    max_responses: int = opt(0, "rankings: response slots per prompt; 0 = the dataset's largest K")
    chat_template: bool = opt(False, "wrap prompts in the tokenizer's chat template")
    pack: bool = opt(False, "sft: pack several examples into each sequence")
    prompt_buckets: tuple[int, ...] = opt((), "widths a batch's prompts are padded to (the smallest that holds its "
                                              "longest prompt; each compiles once); empty = powers of two from 64 "
                                              "up to max_prompt_tokens, which is always one")
    response_buckets: tuple[int, ...] = opt((), "the same for the responses of unpacked sft and rankings batches, "
                                                "up to max_response_tokens")

    def __post_init__(self):
        coerce(self)
        check(self, "max_prompt_tokens", self.max_prompt_tokens > 0, "must be > 0")
        check(self, "max_response_tokens", self.max_response_tokens > 0, "must be > 0")
        for key, limit in (("prompt_buckets", self.max_prompt_tokens),
                           ("response_buckets", self.max_response_tokens)):
            widths = getattr(self, key)
            check(self, key, all(0 < w <= limit for w in widths) and list(widths) == sorted(set(widths)),
                  f"must be increasing widths in [1, {limit}]")
        check(self, "max_responses", self.max_responses == 0 or self.max_responses >= 2, "must be 0 or >= 2")


@dataclass(frozen=True)
class TrainSection:
    steps: int = opt(0, "optimizer steps (set this or train.epochs)")
    epochs: float = opt(0.0, "passes over the training split instead of train.steps (InstructGPT: sft 16, rm 1)")
    batch_size: int = opt(16, "global batch: sequences (sft), prompts with all their responses (rm, dpo), "
                                   "prompts per iteration (ppo; grpo and rloo sample group_size of each)")
    eval_every: int = opt(50, "steps between held-out evaluations; 0 = only at the end")
    eval_batches: int = opt(0, "batches per evaluation; 0 = the whole eval split")
    eval_batch_size: int = opt(0, "rows per evaluation forward; 0 = the training micro-batch "
                                   "(batch_size / optim.grad_accum_steps)")
    save_every: int = opt(50, "steps between checkpoints; 0 = only at the end")
    keep_checkpoints: int = opt(2, "checkpoints kept: the newest, and the newest of the save cadence (one a stop "
                                   "signal saved goes once a newer one is saved); the best model is exported "
                                   "separately")
    log_every: int = opt(10, "steps between metric fetches and log lines")
    loss_on_prompt: bool = opt(False, "sft: train on prompt tokens too")

    def __post_init__(self):
        coerce(self)
        for name in ("batch_size", "log_every", "keep_checkpoints"):
            check(self, name, getattr(self, name) > 0, "must be > 0")
        for name in ("steps", "epochs", "eval_every", "eval_batches", "eval_batch_size", "save_every"):
            check(self, name, getattr(self, name) >= 0, "must be >= 0")
        if self.steps and self.epochs:
            raise FieldError("epochs", f"= {self.epochs:g} and train.steps={self.steps} are both set; set one of them "
                             "(the other to 0: train.epochs=0 trains for train.steps)")


@dataclass(frozen=True)
class RMSection:
    normalize: Literal["none", "bias", "bias_gain"] = opt(
        "bias", "after training, shift (and scale) rewards so reference responses score mean 0 (and std 1)")
    reference_dataset: str = opt(
        "", "prepared sft dataset whose responses are the reference; "
            "\"\" = the best responses (never dispreferred) of data.eval_split")
    reference_examples: int = opt(512, "reference responses scored for the normalisation")
    init: Literal["previous", "sft"] = opt(
        "previous", "in a pipeline's later rounds: start from the previous round's reward model, or from model.path "
                    "as written (the SFT model)")

    def __post_init__(self):
        coerce(self)
        check(self, "reference_examples", self.reference_examples >= 2 or self.normalize == "none",
              "must be >= 2 (the normalisation takes the rewards' mean and spread)")


@dataclass(frozen=True)
class PrepareSection:
    format: str = opt("", "input format (python -m rlhf_jax.data --help lists them)")
    inputs: tuple[str, ...] = opt((), "input files or http(s) URLs")
    name: str = opt("", "dataset name written to data.dir")
    eval_fraction: float = opt(0.0, "share of prompts held out as split 'eval'")
    skip_invalid: bool = opt(False, "skip bad rows (counted by reason) instead of stopping")

    def __post_init__(self):
        coerce(self)
        check(self, "eval_fraction", 0 <= self.eval_fraction < 1, "must be in [0, 1)")


@dataclass(frozen=True)
class TaskSection:
    name: Literal["sentiment", "arithmetic"] = opt("sentiment", "the bundled task to generate (rlhf_jax/tasks/)")
    corpus: int = opt(4000, "pretraining texts (dataset 'corpus')")
    demonstrations: int = opt(2000, "SFT demonstrations (dataset 'demos')")
    prompts: int = opt(2000, "prompts for PPO and evaluation (dataset 'prompts')")
    eval_fraction: float = opt(0.1, "share of each dataset held out (split 'eval')")

    def __post_init__(self):
        coerce(self)
        for name in ("corpus", "demonstrations", "prompts"):
            check(self, name, getattr(self, name) >= 1, "must be >= 1")
        check(self, "eval_fraction", 0 <= self.eval_fraction < 1, "must be in [0, 1)")


@dataclass(frozen=True)
class LabelSection:
    labeler: str = opt("", "MODULE:FUNCTION ranking responses: f(prompts, responses_per_prompt, seed) -> ranks "
                            "(0 = best), told ended (per prompt, whether each response ended) where it names that "
                            "keyword; a sibling labeler_ceiling(prompts, responses) is recorded when present; "
                            "'people': people rank them on a web page served by the step")
    responses: int = opt(4, "responses sampled per prompt from each policy and ranked together (InstructGPT "
                            "K = 4..9)")
    policies: tuple[str, ...] = opt((), "more model dirs whose samples are ranked with model.path's (identical "
                                         "responses merged)")
    prompts: int = opt(0, "prompts of data.name's train split to label (the rankings' train split); 0 = all")
    eval_prompts: int = opt(0, "prompts of data.name's eval split to label (the rankings' held-out split); 0 = all")
    dataset: str = opt("rankings", "name of the prepared rankings dataset written to data.dir")
    host: str = opt("127.0.0.1", "labeler=people: address the ranking page is served on; any but loopback needs "
                                 "label.token")
    port: int = opt(8000, "labeler=people: port of the ranking page; 0 picks a free one")
    token: str = opt("", "labeler=people: a secret every request must carry (labelers open /?token=TOKEN): at least "
                         "16 letters, digits and . _ ~ -; never written to disk (stored configs leave it empty)")
    target: int = opt(0, "labeler=people: rankings to collect (every labeler's) before the dataset is written; 0 = "
                         "until every prompt is ranked by someone")
    overlap: float = opt(0.1, "labeler=people: fraction of prompts every labeler ranks, to measure their "
                              "agreement; the others are ranked once")
    finish: bool = opt(False, "labeler=people: write the dataset from the rankings stored so far, serving nothing")
    include: tuple[str, ...] = opt((), "rankings.jsonl files of earlier label steps prepared into the dataset with "
                                       "this step's (a pipeline's later rounds set it)")

    def __post_init__(self):
        coerce(self)
        check(self, "responses", self.responses >= 2, "must be >= 2")
        check(self, "prompts", self.prompts >= 0, "must be >= 0")
        check(self, "eval_prompts", self.eval_prompts >= 0, "must be >= 0")
        check(self, "policies", all(self.policies), "entries must be non-empty model dirs")
        check(self, "host", bool(self.host), "must not be empty")
        check(self, "port", 0 <= self.port <= 65535, "must be in [0, 65535]")
        check(self, "target", self.target >= 0, "must be >= 0")
        check(self, "overlap", 0 <= self.overlap <= 1, "must be in [0, 1]")


@dataclass(frozen=True)
class EvalSection:
    policies: tuple[str, ...] = opt((), "policies to evaluate: export/best/HF dirs, or training run dirs (their "
                                         "latest checkpoint, eval.step or every step with eval.all_steps)")
    reference: str = opt("", "the baseline policy every one is compared with (e.g. the sft export)")
    reward_model: str = opt("", "reward model export scoring the responses (its reward_norm applied); may be left "
                                 "out when eval.gold scores them")
    prompts: str = opt("", "a prompt file (.txt, .jsonl) or a prepared prompts dataset dir, DIR[:SPLIT] "
                            "(default split: eval)")
    rankings: str = opt("", "optional prepared rankings dataset DIR[:SPLIT] (default eval) for RM accuracy")
    gold: str = opt("", "optional MODULE:FUNCTION scoring f(prompts, responses) -> scores (a programmatic "
                         "ground truth), told ended (of each response) and metadata (of each prompt) where it names "
                         "those keywords")
    step: int = opt(0, "checkpoint step of the run dirs in eval.policies; 0 = the latest")
    all_steps: bool = opt(False, "evaluate every saved step of the run dirs in eval.policies")
    limit: int = opt(0, "evaluate on the first N prompts; 0 = all")
    samples: int = opt(4, "prompts shown with both responses in report.md")
    runs: tuple[str, ...] = opt((), "run dirs whose metrics.jsonl training curves are plotted")
    rounds: tuple[str, ...] = opt((), "report dirs of a pipeline's earlier rounds: the report adds a table and plots "
                                      "per round (a pipeline's rounds set it)")
    out: str = opt("", 'report directory; "" = run_dir')

    def __post_init__(self):
        coerce(self)
        check(self, "step", self.step >= 0, "must be >= 0")
        check(self, "limit", self.limit >= 0, "must be >= 0")
        check(self, "samples", self.samples >= 0, "must be >= 0")
        check(self, "all_steps", not (self.all_steps and self.step), "cannot be combined with eval.step")


@dataclass(frozen=True)
class OptimSection:
    lr: float = opt(1e-5, "peak learning rate")
    schedule: Literal["constant", "linear", "cosine"] = opt("cosine", "learning-rate decay after warmup")
    warmup_steps: int = opt(0, "steps of linear warmup from 0 to lr")
    weight_decay: float = opt(0.0, "decoupled (AdamW) weight decay")
    b1: float = opt(0.9, "Adam first-moment decay")
    b2: float = opt(0.95, "Adam second-moment decay")
    eps: float = opt(1e-8, "Adam denominator epsilon")
    grad_clip: float = opt(1.0, "clip gradients to this global norm; 0 = off")
    grad_accum_steps: int = opt(1, "micro-batches accumulated per optimizer step")

    def __post_init__(self):
        coerce(self)
        check(self, "lr", self.lr >= 0, "must be >= 0")
        check(self, "warmup_steps", self.warmup_steps >= 0, "must be >= 0")
        check(self, "weight_decay", self.weight_decay >= 0, "must be >= 0")
        check(self, "b1", 0 <= self.b1 < 1, "must be in [0, 1)")
        check(self, "b2", 0 <= self.b2 < 1, "must be in [0, 1)")
        check(self, "eps", self.eps > 0, "must be > 0")
        check(self, "grad_clip", self.grad_clip >= 0, "must be >= 0")
        check(self, "grad_accum_steps", self.grad_accum_steps >= 1, "must be >= 1")


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
LORA_ALSO_TRAIN = ("norms", "embed", "lm_head")


@dataclass(frozen=True)
class LoraSection:
    rank: int = opt(0, "LoRA rank of the trained model's adapters; 0 = full fine-tuning (every weight trains)")
    alpha: float = opt(16.0, "LoRA scale numerator: each adapter adds x @ A @ B * alpha / rank")
    targets: tuple[str, ...] = opt(LORA_TARGETS, "projections adapted: any of q, k, v, o (attention), gate, up, "
                                                 "down (MLP)")
    dropout: float = opt(0.0, "dropout on each adapter's input in training steps (sft, rm, dpo)")
    also_train: tuple[str, ...] = opt((), "whole weights trained beside the adapters (PEFT's modules_to_save): any "
                                          "of norms (every RMSNorm scale), embed, lm_head")

    def __post_init__(self):
        coerce(self)
        check(self, "rank", self.rank >= 0, "must be >= 0")
        check(self, "alpha", self.alpha > 0, "must be > 0")
        check(self, "targets", bool(self.targets) and all(t in LORA_TARGETS for t in self.targets),
              f"must be a non-empty list of {', '.join(LORA_TARGETS)}")
        check(self, "targets", len(set(self.targets)) == len(self.targets), "must not repeat a target")
        check(self, "dropout", 0 <= self.dropout < 1, "must be in [0, 1)")
        check(self, "also_train", all(m in LORA_ALSO_TRAIN for m in self.also_train),
              f"entries must be among {', '.join(LORA_ALSO_TRAIN)}")


@dataclass(frozen=True)
class Config:
    stage: Literal["generate", "sft", "rm", "ppo", "dpo", "grpo", "rloo", "eval", "task", "label", "prepare"] = opt(
        "generate", "stage to run: generate (sample), sft (fine-tune on demonstrations), rm (ranking reward model), "
                    "ppo (optimise the policy against the reward model), dpo (optimise the policy on the rankings "
                    "directly), grpo / rloo (optimise the policy on groups of samples per prompt, scored by a "
                    "reward model or a reward function), eval (win rate, score and KL report), "
                    "task (generate a bundled task's data and base model), label (sample K responses per prompt "
                    "and rank them with a programmatic labeler), prepare (import a dataset into data.dir, as "
                    "python -m rlhf_jax.data does); a YAML with a `pipeline:` mapping chains stages")
    run_dir: str = opt("runs/default", "directory for checkpoints, logs and outputs")
    seed: int = opt(0, "random seed for init, sampling and data order")
    model: ModelSection = section(ModelSection, "which model to load and how to run it")
    mesh: MeshSection = section(MeshSection, "device mesh for sharding")
    distributed: DistributedSection = section(DistributedSection, "joining several processes (multi-host runs)")
    runtime: RuntimeSection = section(RuntimeSection, "how programs are compiled and cached")
    sampling: SamplingSection = section(SamplingSection, "text generation settings")
    generate: GenerateSection = section(GenerateSection, "inputs and outputs of the generate stage")
    data: DataSection = section(DataSection, "prepared dataset and how it is tokenized")
    train: TrainSection = section(TrainSection, "training loop of every training stage (sft, rm, dpo, ppo, grpo, rloo)")
    rm: RMSection = section(RMSection, "reward model specifics")
    ppo: PPOSection = section(PPOSection, "PPO specifics (stage 3)")
    dpo: DPOSection = section(DPOSection, "DPO on rankings (stage dpo)")
    grpo: GRPOSection = section(GRPOSection, "GRPO on groups of samples per prompt (stage grpo)")
    rloo: RLOOSection = section(RLOOSection, "RLOO, REINFORCE with a leave-one-out baseline (stage rloo)")
    optim: OptimSection = section(OptimSection, "optimizer and learning-rate schedule")
    lora: LoraSection = section(LoraSection, "train low-rank adapters instead of every weight (sft, rm, dpo, ppo, "
                                             "grpo, rloo)")
    eval: EvalSection = section(EvalSection, "evaluation of policies against a reference (stage eval)")
    task: TaskSection = section(TaskSection, "the bundled task generated by stage task")
    label: LabelSection = section(LabelSection, "ranking of sampled responses by a programmatic labeler or by "
                                                "people (stage label)")
    prepare: PrepareSection = section(PrepareSection, "a dataset to import into data.dir (stage prepare)")

    def __post_init__(self):
        coerce(self)
        check(self, "run_dir", bool(self.run_dir.strip()), "must name a directory")
        check(self, "seed", 0 <= self.seed < 2 ** 32, "must be from 0 to 2^32 - 1")
        if self.stage == "rm" and self.lora.rank and "lm_head" in self.lora.also_train:
            raise FieldError("lora.also_train", "cannot name lm_head for stage rm: a reward model has no LM head (its "
                                                "scalar head trains whole)")


# The config sections each stage reads (the top-level keys, seed and the like, always count): what decides whether a
# pipeline step is still finished, and which keys a resumed run compares.
_COMMON = ("model", "mesh", "distributed", "runtime", "data")
_TRAINING = (*_COMMON, "train", "optim", "lora")
STAGE_SECTIONS = {
    "task": ("task", "data"), "prepare": ("prepare", "data"),
    "generate": (*_COMMON, "sampling", "generate"), "eval": (*_COMMON, "sampling", "eval"),
    "label": (*_COMMON, "sampling", "label"),
    "sft": _TRAINING, "rm": (*_TRAINING, "rm"), "dpo": (*_TRAINING, "dpo"), "ppo": (*_TRAINING, "sampling", "ppo"),
    "grpo": (*_TRAINING, "sampling", "grpo", "rloo"), "rloo": (*_TRAINING, "sampling", "grpo", "rloo"),
}


def config_from_dict(d: Mapping) -> Config:
    """Build a validated Config from nested mappings (missing keys take defaults)."""
    return typed_yaml.from_dict(Config, d)


SECRETS = (("label", "token"),)  # (section, key): left empty in every config written to disk


def config_to_dict(cfg: Config) -> dict:
    """Nested plain dict (tuples become lists), JSON-serialisable and accepted by config_from_dict; the SECRETS are
    left empty (every stored config, summary and pipeline marker comes from here)."""
    data = typed_yaml.to_dict(cfg)
    for name, key in SECRETS:
        data[name][key] = ""
    return data


def apply_override(data: dict, item: str) -> None:
    """Set one `a.b=value` override in a nested config mapping (the key checked against the schema)."""
    typed_yaml.apply_override(Config, data, item)


def load_config(path: str | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (None = all defaults) and apply `a.b=value` overrides, last one wins."""
    return typed_yaml.load(Config, path, overrides)


def config_help() -> str:
    """Every config key with its type, default and a short description."""
    lines = ["Config keys (set in a YAML file or override with key=value, e.g. optim.lr=1e-5):", ""]
    return "\n".join(lines + typed_yaml.key_help(Config))

"""Pairs/s of TRL's DPOTrainer on the shapes of benchmarks/dpo.py, for a side-by-side comparison.

Runs in its own environment (see benchmarks/requirements-trl.txt), never imports rlhf_jax:

  python3 -m venv .venv-trl && .venv-trl/bin/pip install -r benchmarks/requirements-trl.txt
  .venv-trl/bin/python benchmarks/trl_dpo.py --warmup 2 --steps 5

transformers' LlamaForCausalLM with the tiny config of benchmarks/dpo.py (vocab 2048, d 256, 4 layers, 4 heads
of 64, 2 KV heads, MLP 688, untied embeddings, float32, torch on CPU with one thread per core), loaded from
`--model` (the HF export benchmarks/dpo.py writes of its own initial weights) or, without it, initialised here.
The data: `--prompts` rankings of 4 responses per prompt, each ranking given as its 6 ordered (chosen, rejected)
pairs, one dataset row per pair since DPO in TRL is pairwise: 64-token prompts and responses of 63 tokens to which
TRL appends EOS (64), token ids written as decimal numbers for a word-level tokenizer built here. One optimizer
step takes the pairs of `--prompts` rankings (per_device_train_batch_size = 6 x prompts, no accumulation); the
reference model (TRL's copy of the policy) scores every pair live in each step; the sigmoid loss with beta 0.1;
AdamW (lr 1e-5, b1 0.9, b2 0.95, no weight decay) after global-norm clipping at 1, a constant learning rate: the
settings of benchmarks/dpo.py. Two of TRL's defaults are turned off to match them: bf16 autocast (float32 here)
and gradient checkpointing (neither side recomputes activations at these sizes).

A step is one optimizer step of DPOTrainer.train (collating the batch, the policy's forward and backward over the
chosen and rejected sequences, the reference's forward, the loss, clipping, AdamW). One `train` call runs every
measurement; a callback reads the clock at step ends. The first `--warmup` steps are not reported; then `--steps`
are timed and one JSON line printed. With `--serve` (how benchmarks/dpo.py drives it, alternating with its own
measurement) the script prints a JSON line once warm, then reads a number k per line of stdin, times k steps and
prints one JSON line for them, until it reads 0 or stdin ends.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from importlib.metadata import version

import numpy as np
import torch
import transformers
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from trl import DPOConfig, DPOTrainer

PAD, EOS, K = 0, 1, 4


def tokenizer_for(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """Word level: token i is the decimal number i (0 and 1 the pad and EOS tokens), split at spaces."""
    vocab = {"<pad>": PAD, "</s>": EOS, **{str(i): i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


def tiny_llama() -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=64, intermediate_size=688,
                                   max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                                   tie_word_embeddings=False, bos_token_id=None, eos_token_id=EOS,
                                   pad_token_id=PAD)
    return transformers.LlamaForCausalLM(cfg)


def pair_rows(prompts: int, prompt_len: int, response_len: int, vocab_size: int, seed: int) -> list[dict]:
    """Each prompt's 4 responses ranked 0 (best) .. 3, as its 6 (chosen, rejected) rows of text. The responses
    leave room for the EOS TRL appends. benchmarks/dpo.py draws the same ids from the same seed."""
    rng = np.random.default_rng(seed)
    prompt_ids = rng.integers(2, vocab_size, (prompts, prompt_len))
    response_ids = rng.integers(2, vocab_size, (prompts, K, response_len - 1))
    text = lambda ids: " ".join(map(str, ids))
    return [{"prompt": text(prompt_ids[b]), "chosen": " " + text(response_ids[b, i]),
             "rejected": " " + text(response_ids[b, j])}
            for b in range(prompts) for i, j in itertools.combinations(range(K), 2)]


class Clock(transformers.TrainerCallback):
    """Measurements of `commands` steps each (the first the warm-up), read at step ends: after each, hands
    (steps, seconds) to `report` and reads the next count; a count of 0 (or none left) stops the training."""

    def __init__(self, commands, report):
        self.commands, self.report = iter(commands), report

    def on_train_begin(self, args, state, control, **kwargs):
        self._next(control)

    def on_step_end(self, args, state, control, **kwargs):
        self.done += 1
        if self.done == self.k:
            self.report(self.k, time.perf_counter() - self.t0)
            self._next(control)

    def _next(self, control):
        self.k, self.done = next(self.commands, 0), 0
        if self.k <= 0:
            control.should_training_stop = True
        self.t0 = time.perf_counter()  # after reading the command: the wait for it is not timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    ap.add_argument("--prompts", type=int, default=8, help="rankings (of 4 responses, 6 pairs) per step")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--response-len", type=int, default=64, help="response tokens, EOS included")
    ap.add_argument("--model", default="", help="a transformers Llama directory (default: initialised here)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--serve", action="store_true", help="time k steps per number k read from stdin")
    args = ap.parse_args()
    if args.warmup < 1:
        ap.error("--warmup must be at least 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pairs = args.prompts * K * (K - 1) // 2
    tokenizer = tokenizer_for(2048)
    rows = pair_rows(args.prompts, args.prompt_len, args.response_len, 2048, args.seed)
    # A few distinct batches, so that an epoch is more than one step (as with any real dataset).
    rows = rows + pair_rows(3 * args.prompts, args.prompt_len, args.response_len, 2048, args.seed + 1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or os.path.join(tmp, "model")
        if not args.model:
            tiny_llama().save_pretrained(model_dir)
        config = DPOConfig(
            output_dir=os.path.join(tmp, "out"), per_device_train_batch_size=pairs, gradient_accumulation_steps=1,
            learning_rate=1e-5, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0,
            max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0, max_steps=10**9, beta=0.1,
            loss_type=["sigmoid"], max_length=None, precompute_ref_log_probs=False, logging_strategy="no",
            save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
            dataloader_num_workers=0, seed=args.seed, model_init_kwargs={"dtype": torch.float32},
            # float32 as on our side (TRL's default is bf16 autocast, slow on a CPU without bf16 matmuls), and no
            # activation recomputation (TRL's default; our side keeps its activations at these sizes too).
            bf16=False, fp16=False, gradient_checkpointing=False)
        settings = {"framework": f"trl {version('trl')}", "transformers": transformers.__version__,
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "prompts": args.prompts,
                    "k": K, "pairs_per_step": pairs, "prompt": args.prompt_len, "response": args.response_len,
                    "dtype": "float32", "bf16": config.bf16, "gradient_checkpointing": config.gradient_checkpointing,
                    "optim": str(config.optim), "precompute_ref_log_probs": False}

        def report(k: int, seconds: float):
            warmup = not measurements
            if args.serve or not warmup:  # --serve says when the warm-up is done
                print(json.dumps({**settings, "steps": k, **({"warmup": True} if warmup else {}),
                                  "step_s": round(seconds / k, 4), "pairs_per_s": round(pairs * k / seconds, 2)}),
                      flush=True)
            measurements.append(seconds)

        measurements: list[float] = []
        if args.serve:
            commands = itertools.chain([args.warmup], (int(line) for line in sys.stdin))
        else:
            commands = [args.warmup, args.steps, 0]
        trainer = DPOTrainer(model=model_dir, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[Clock(commands, report)])
        first = trainer.train_dataset[0]
        lengths = (len(first["prompt_ids"]), len(first["chosen_ids"]), len(first["rejected_ids"]))
        if lengths != (args.prompt_len, args.response_len, args.response_len):
            raise SystemExit(f"tokenized (prompt, chosen, rejected) lengths {lengths}: expected "
                             f"({args.prompt_len}, {args.response_len}, {args.response_len})")
        trainer.train()


if __name__ == "__main__":
    main()

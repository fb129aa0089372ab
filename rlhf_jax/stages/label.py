"""The label stage: collects rankings the way InstructGPT's labelers did, from a programmatic labeler. For the
prompts of data.name (a prompts dataset) it samples label.responses responses each from the policy (model.path)
with the compiled sampler, has label.labeler rank them, and prepares the result as the rankings dataset
label.dataset in data.dir, ready for the rm stage: rankings of the train split's prompts for training, of the
eval split's prompts held out (split 'eval'), so held-out rankings share no prompt with training.

Identical responses of one prompt are merged first (comparing a text with itself teaches nothing) and empty ones
(an immediate EOS) dropped; a prompt left with fewer than 2 distinct responses is dropped; both are counted.
When the labeler's module also has `labeler_ceiling(prompts, responses)`, the best accuracy any reward model can
reach on the held-out rankings is stored in the dataset's metadata (evaluation reports it beside the RM's
accuracy).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.config import Config
from rlhf_jax.data.pipeline import has_split, open_split, stored_prompts
from rlhf_jax.data.prepare import prepare
from rlhf_jax.errors import UserError
from rlhf_jax.models.checkpoint import load_model
from rlhf_jax.models.generation import Generator
from rlhf_jax.models.sampling import SamplingParams
from rlhf_jax.models.tokenizer import PAD_ID
from rlhf_jax.runtime import distributed, plugins as imports, sharding
from rlhf_jax.runtime.fsio import write_json_atomically, write_text_atomically


def check_config(cfg: Config) -> None:
    """What can be known wrong before reading any file."""
    if not cfg.label.labeler:
        raise UserError("stage 'label' needs label.labeler (MODULE:FUNCTION ranking the responses of each prompt)")
    if not cfg.model.path:
        raise UserError("stage 'label' needs model.path (the policy whose samples are ranked, e.g. the sft export)")
    if not cfg.data.name:
        raise UserError("stage 'label' needs data.name (a prompts dataset)")
    imports.function(cfg.label.labeler, "label.labeler")


def run_label(cfg: Config, run_dir: Path) -> dict:
    check_config(cfg)
    lab, s = cfg.label, cfg.sampling
    labeler, module = imports.function(lab.labeler, "label.labeler")
    source, metadata = open_split(cfg.data.dir, cfg.data.name, cfg.data.train_split)
    if metadata["kind"] != "prompts":
        raise UserError(f"data.name={cfg.data.name!r} is a {metadata['kind']!r} dataset; stage 'label' needs one of "
                        "kind 'prompts'")
    held_out = []
    if has_split(cfg.data, cfg.data.eval_split):
        held_out = stored_prompts(open_split(cfg.data.dir, cfg.data.name, cfg.data.eval_split)[0], lab.eval_prompts)
    prompts = stored_prompts(source, lab.prompts) + held_out
    n = len(prompts)
    mesh = sharding.mesh_from_config(cfg.mesh)
    generator = Generator(load_model(cfg.model.path, need_tokenizer=True), mesh,
                          SamplingParams(s.max_new_tokens, s.temperature, s.top_k, s.top_p, pad_id=PAD_ID),
                          cfg.model.dtype, cfg.data.chat_template)
    K = lab.responses
    repeated = [p for p in prompts for _ in range(K)]  # K independent samples of each prompt
    texts = [r["text"] for r in generator.generate(repeated, s.batch_size, s.max_prompt_tokens, cfg.seed)]
    kept_prompts, kept_responses, empty = group_responses(prompts, texts, K)
    if not kept_prompts:
        raise UserError(f"label: no prompt has 2 distinct non-empty samples of {K}; raise sampling.temperature")
    # process 0 alone asks the labeler (it may be a paid service or a person) and writes the dataset
    summary = distributed.on_primary(lambda: _write_rankings(cfg, run_dir, n, kept_prompts, kept_responses, labeler,
                                                             empty, module, held_out))
    print(json.dumps(summary))
    return summary


def _write_rankings(cfg: Config, run_dir: Path, n: int, kept_prompts, kept_responses, labeler, empty: int, module,
                    held_out) -> dict:
    """The labeler's rankings, their file, its prepared dataset and the summary (process 0 alone, with several
    processes)."""
    lab = cfg.label
    ranks = imports.call(labeler, f"label.labeler={lab.labeler}", kept_prompts, kept_responses, cfg.seed)
    _check_ranks(ranks, kept_responses, lab.labeler)
    path = run_dir / "rankings.jsonl"
    write_text_atomically(path, "".join(json.dumps({"prompt": p, "responses": r, "ranks": [int(x) for x in k]}) + "\n"
                                        for p, r, k in zip(kept_prompts, kept_responses, ranks)))
    extra = {"labeler": lab.labeler}
    ceiling_fn = getattr(module, "labeler_ceiling", None)
    held_out = set(held_out)
    eval_rows = [i for i, p in enumerate(kept_prompts) if p in held_out]
    ceiling = None
    if callable(ceiling_fn) and eval_rows:
        ceiling = _check_ceiling(imports.call(ceiling_fn, f"{module.__name__}:labeler_ceiling",
                                              [kept_prompts[i] for i in eval_rows],
                                              [kept_responses[i] for i in eval_rows]), module)
    if ceiling is not None:
        extra["labeler_ceiling"] = ceiling
    tfds.disable_progress_bar()  # the summary below says what was written
    prepared = prepare("jsonl_rankings", [str(path)], cfg.data.dir, lab.dataset, overwrite=True,
                       extra_metadata=extra, eval_prompts=held_out)
    summary = {"stage": "label", "dataset": prepared["dataset"], "prompts": n, "labeled_prompts": len(kept_prompts),
               "dropped_prompts": n - len(kept_prompts), "empty_responses_dropped": empty,
               "responses": sum(len(r) for r in kept_responses), "examples": prepared["examples"],
               "pairs": prepared.get("pairs"), **{k: v for k, v in extra.items() if k != "labeler"}}
    write_json_atomically(run_dir / "summary.json", summary)
    return summary


def group_responses(prompts: list[str], texts: list[str], K: int) -> tuple[list[str], list[list[str]], int]:
    """(prompts kept, the distinct non-empty responses of each, empty responses dropped) from K samples per
    prompt in prompt order; a prompt with fewer than 2 such responses is not kept."""
    kept_prompts, kept_responses = [], []
    for i, prompt in enumerate(prompts):
        distinct = list(dict.fromkeys(t for t in texts[i * K:(i + 1) * K] if t.strip()))
        if len(distinct) >= 2:
            kept_prompts.append(prompt)
            kept_responses.append(distinct)
    return kept_prompts, kept_responses, sum(not t.strip() for t in texts)


def _check_ranks(ranks, responses: list[list[str]], spec: str) -> None:
    """One list of integer ranks in [0, K) per prompt (0 = best); anything else is one line naming the labeler
    and what it returned."""
    if not isinstance(ranks, (list, tuple, np.ndarray)) or len(ranks) != len(responses):
        raise UserError(f"label.labeler={spec}: returned {imports.shown(ranks)}; expected {len(responses)} "
                        "lists of ranks, one per prompt")
    for i, (rank, texts) in enumerate(zip(ranks, responses)):
        if not (isinstance(rank, (list, tuple, np.ndarray)) and len(rank) == len(texts)
                and all(isinstance(r, (int, np.integer)) and not isinstance(r, bool) and 0 <= r < len(texts)
                        for r in rank)):
            raise UserError(f"label.labeler={spec}: prompt {i}: returned {imports.shown(rank)}; expected "
                            f"{len(texts)} integer ranks in [0, {len(texts)}), one per response (0 = best)")


def _check_ceiling(ceiling, module) -> float | None:
    """labeler_ceiling's answer: None (no pairs) or an accuracy in [0, 1]."""
    if ceiling is None:
        return None
    if not isinstance(ceiling, (int, float, np.integer, np.floating)) or not 0 <= ceiling <= 1:
        raise UserError(f"{module.__name__}:labeler_ceiling: returned {imports.shown(ceiling)}; expected an "
                        "accuracy in [0, 1] or None")
    return float(ceiling)

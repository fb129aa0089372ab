"""The label stage: collects rankings the way InstructGPT's labelers did. For the prompts of data.name (a prompts
dataset) it samples label.responses responses each from the policy (model.path) and from every model of
label.policies with the compiled sampler, has them ranked, and prepares the result as the rankings dataset
label.dataset in data.dir, ready for the rm stage: rankings of the train split's prompts for training, of the eval
split's prompts held out (split 'eval'), so held-out rankings share no prompt with training.

Identical responses of one prompt are merged first (comparing a text with itself teaches nothing; a text sampled
both ended and cut counts as ended) and empty ones (an immediate EOS) dropped; a prompt left with fewer than 2
distinct responses is dropped; both are counted. Each response keeps whether it ended: one cut at
sampling.max_new_tokens is trained without an EOS.

label.labeler=MODULE:FUNCTION ranks them at once. When the labeler's module also has
`labeler_ceiling(prompts, responses)`, the best accuracy any reward model can reach on the held-out rankings is
stored in the dataset's metadata (evaluation reports it beside the RM's accuracy).

label.labeler=people stores the task in RUN_DIR/label.db (each response shuffled within its prompt, with the
policy and step that wrote it) and serves the ranking page (rlhf_jax/label/) until label.target rankings are
stored; then each (prompt, labeler) ranking becomes a row of the dataset, ties giving no pair. A rerun keeps the
stored task and rankings and serves again; Ctrl-C or SIGTERM stops it (exit 4), and label.finish=true writes the
dataset from what is stored without serving.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.config import Config
from rlhf_jax.data.pipeline import has_split, open_split, stored_prompts
from rlhf_jax.data.prepare import prepare
from rlhf_jax.errors import Interrupted, UserError
from rlhf_jax.label import agreement, server, store as label_store
from rlhf_jax.label.service import Goal
from rlhf_jax.models.checkpoint import load_model, model_fingerprint, model_meta
from rlhf_jax.models.generation import Generator
from rlhf_jax.models.sampling import SamplingParams
from rlhf_jax.models.tokenizer import PAD_ID
from rlhf_jax.runtime import distributed, plugins as imports, sharding
from rlhf_jax.runtime.fsio import write_json_atomically, write_text_atomically

PEOPLE = "people"
DB = "label.db"


def check_config(cfg: Config) -> None:
    """What can be known wrong before reading any file."""
    if not cfg.label.labeler:
        raise UserError("stage 'label' needs label.labeler (MODULE:FUNCTION ranking the responses of each prompt, "
                        f"or {PEOPLE!r})")
    if not cfg.model.path:
        raise UserError("stage 'label' needs model.path (the policy whose samples are ranked, e.g. the sft export)")
    if not cfg.data.name:
        raise UserError("stage 'label' needs data.name (a prompts dataset)")
    if cfg.label.labeler == PEOPLE:
        server.check_binding(cfg.label.host, cfg.label.token)
    else:
        labeler, _ = imports.function(cfg.label.labeler, "label.labeler")
        imports.check_signature(labeler, f"label.labeler={cfg.label.labeler}", ("prompts", "responses", "seed"),
                                ("ended",))


def run_label(cfg: Config, run_dir: Path) -> dict:
    check_config(cfg)
    for path in cfg.label.include:
        if not Path(path).is_file():
            raise UserError(f"label.include: {path}: no such file (expected the rankings.jsonl of an earlier label "
                            "step)")
    if cfg.label.labeler == PEOPLE:
        return _label_by_people(cfg, run_dir)
    lab = cfg.label
    labeler, module = imports.function(lab.labeler, "label.labeler")
    prompts, held_out = _prompts(cfg)
    n, K = len(prompts), lab.responses * (1 + len(lab.policies))
    kept_prompts, kept_responses, kept_ended, empty, duplicates = group_responses(prompts,
                                                                                  sample_responses(cfg, prompts))
    if not kept_prompts:
        raise UserError(f"label: no prompt has 2 distinct non-empty samples of {K}; raise sampling.temperature")
    # process 0 alone asks the labeler (it may be a paid service or a person) and writes the dataset
    summary = distributed.on_primary(lambda: _write_rankings(cfg, run_dir, n, kept_prompts, kept_responses,
                                                             kept_ended, labeler, (empty, duplicates), module,
                                                             held_out))
    print(json.dumps(summary))
    return summary


def _prompts(cfg: Config) -> tuple[list[str], list[str]]:
    """(every prompt to label: the train split's, then the held-out ones; the held-out ones)."""
    lab = cfg.label
    source, metadata = open_split(cfg.data.dir, cfg.data.name, cfg.data.train_split)
    if metadata["kind"] != "prompts":
        raise UserError(f"data.name={cfg.data.name!r} is a {metadata['kind']!r} dataset; stage 'label' needs one of "
                        "kind 'prompts'")
    held_out = []
    if has_split(cfg.data, cfg.data.eval_split):
        held_out = stored_prompts(open_split(cfg.data.dir, cfg.data.name, cfg.data.eval_split)[0], lab.eval_prompts)
    return stored_prompts(source, lab.prompts) + held_out, held_out


class Sample(NamedTuple):
    text: str
    source: dict  # {"policy": path, "step": training step or None}
    ended: bool  # with a stop id; False: cut at sampling.max_new_tokens


def sample_responses(cfg: Config, prompts: list[str]) -> list[list[Sample]]:
    """Per prompt, label.responses samples of model.path then of each of label.policies; one model on the mesh at
    a time."""
    s, K = cfg.sampling, cfg.label.responses
    mesh = sharding.mesh_from_config(cfg.mesh)
    sharding.check_batch_size(s.batch_size, mesh, "sampling.batch_size")  # before a model loads
    paths = (cfg.model.path, *cfg.label.policies)
    keys = ["model.path"] + ["label.policies"] * len(cfg.label.policies)
    wheres = [f"model.path={paths[0]}"] + [f"label.policies: {path}" for path in paths[1:]]
    for path, key, where in zip(paths, keys, wheres):  # every model's kind before the first one samples
        if model_meta(path, need_tokenizer=True, key=key).head != "lm":
            raise UserError(f"{where}: a reward/value model (scalar head), expected a policy")
    if s.max_prompt_tokens != cfg.data.max_prompt_tokens:  # the rm step reads the stored prompts with the latter
        print(f"warning: sampling.max_prompt_tokens={s.max_prompt_tokens} cuts the prompts responses are sampled "
              f"after, data.max_prompt_tokens={cfg.data.max_prompt_tokens} those the reward model trains on; set them "
              "equal", file=sys.stderr)
    samples: list[list[Sample]] = [[] for _ in prompts]
    repeated = [p for p in prompts for _ in range(K)]  # K independent samples of each prompt
    unfinished = 0
    for i, (path, key, where) in enumerate(zip(paths, keys, wheres)):
        generator = Generator(load_model(path, need_tokenizer=True, key=key), mesh,
                              SamplingParams(s.max_new_tokens, s.temperature, s.top_k, s.top_p, pad_id=PAD_ID),
                              cfg.model.dtype, cfg.data.chat_template, where=where)
        source = {"policy": str(path), "step": source_step(path)}
        for j, record in enumerate(generator.generate(repeated, s.batch_size, s.max_prompt_tokens, cfg.seed + i)):
            samples[j // K].append(Sample(record["text"], source, record["ended"]))
            unfinished += not record["ended"]
        del generator
    if unfinished:  # ranked and trained as cut (no EOS), as PPO scores a rollout that never ended
        print(f"{unfinished} of {len(repeated) * len(paths)} samples ran to sampling.max_new_tokens="
              f"{s.max_new_tokens} without ending; they are ranked and trained on as cut responses", file=sys.stderr)
    return samples


def source_step(path: str) -> int | None:
    """The training step of a model dir where its run recorded it: an export/ is its run's last step."""
    summary = Path(path).resolve().parent / "summary.json"
    if Path(path).resolve().name != "export" or not summary.is_file():
        return None
    steps = json.loads(summary.read_text()).get("steps")
    return steps if isinstance(steps, int) else None


def _label_by_people(cfg: Config, run_dir: Path) -> dict:
    """The task stored once (a rerun keeps it and what people answered), served until label.target rankings are
    stored, then written as the rankings dataset."""
    db = run_dir / DB
    if not db.exists():
        prompts, held_out = _prompts(cfg)
        samples = sample_responses(cfg, prompts)
        distributed.on_primary(lambda: _store_task(cfg, db, prompts, set(held_out), samples))
    summary = distributed.on_primary(lambda: _serve_and_write(cfg, run_dir, db))
    print(json.dumps(summary))
    return summary


def _store_task(cfg: Config, db: Path, prompts: list[str], held_out: set[str], samples: list[list[Sample]]) -> None:
    """label.db: the prompts with at least 2 distinct non-empty responses, in a seeded order, each with its
    responses merged and shuffled."""
    task, empty, duplicates = [], 0, 0
    for i, (prompt, prompt_samples) in enumerate(zip(prompts, samples)):
        merged, dropped = merge_responses(prompt_samples)
        empty += dropped
        duplicates += len(prompt_samples) - dropped - len(merged)
        if len(merged) >= 2:
            order = np.random.default_rng([cfg.seed, i]).permutation(len(merged))
            task.append((prompt, prompt in held_out, [merged[j] for j in order]))
    if not task:
        raise UserError("label: no prompt has 2 distinct non-empty samples; raise sampling.temperature")
    task = [task[j] for j in np.random.default_rng(cfg.seed).permutation(len(task))]
    label_store.create(db, task, {"models": [cfg.model.path, *cfg.label.policies], **task_settings(cfg),
                                  "prompts": len(prompts), "dropped_prompts": len(prompts) - len(task),
                                  "empty_responses_dropped": empty, "duplicate_responses_merged": duplicates})


def task_settings(cfg: Config) -> dict:
    """What a stored task was sampled with: a rerun serves it only where these are the same (the models by their
    files, so a moved run's paths do not count; a model no longer there, None, by nothing)."""
    s = cfg.sampling
    return {"data": cfg.data.name, "responses_per_model": cfg.label.responses, "seed": cfg.seed,
            "model_fingerprints": [model_fingerprint(p) if Path(p).is_dir() else None
                                   for p in (cfg.model.path, *cfg.label.policies)],
            "label.prompts": cfg.label.prompts, "label.eval_prompts": cfg.label.eval_prompts,
            "data.chat_template": cfg.data.chat_template,
            "sampling": {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_k": s.top_k,
                         "top_p": s.top_p, "max_prompt_tokens": s.max_prompt_tokens}}


def check_task(cfg: Config, task: label_store.Store) -> None:
    """Refuses a stored task sampled with other settings (models retrained, more responses): people would rank
    samples of models the run no longer uses."""
    def same(key, now, stored) -> bool:
        if key != "model_fingerprints":
            return now == stored
        return len(now) == len(stored) and all(None in (a, b) or a == b for a, b in zip(now, stored))

    changed = [key for key, value in task_settings(cfg).items()
               if key in task.meta and not same(key, value, task.meta[key])]
    if changed:
        what = ", ".join("the models' files" if key == "model_fingerprints" else key for key in changed)
        raise UserError(f"label: {task.path} holds a task sampled with other settings ({what} differ); rerun with "
                        f"those, or delete it to sample anew (what people ranked in it is lost)")


def merge_responses(samples: list[Sample]) -> tuple[list[tuple[str, list[dict], bool]], int]:
    """(the distinct non-empty texts in first-seen order, each with the sources that wrote it and whether any
    sample of it ended; empty ones dropped)."""
    merged: dict[str, tuple[list[dict], list[bool]]] = {}
    empty = 0
    for text, source, ended in samples:
        if not text.strip():
            empty += 1
            continue
        sources, ends = merged.setdefault(text, ([], []))
        if source not in sources:
            sources.append(source)
        ends.append(ended)
    return [(text, sources, any(ends)) for text, (sources, ends) in merged.items()], empty


def _serve_and_write(cfg: Config, run_dir: Path, db: Path) -> dict:
    lab = cfg.label
    task = label_store.Store(db)
    try:
        check_task(cfg, task)
        target = lab.target  # 0: every prompt ranked by someone (label.service.Goal)
        task.set_meta("target", target)
        task.set_meta("overlap", lab.overlap)
        if not lab.finish and not server.serve(task, lab.host, lab.port, lab.token, target, lab.overlap):
            raise Interrupted(f"label: stopped with {Goal(task, target)} in {db}; rerun to "
                              "continue labeling, or rerun with label.finish=true to write the dataset from them")
        return _write_people_rankings(cfg, run_dir, task)
    finally:
        task.close()


def _write_people_rankings(cfg: Config, run_dir: Path, task: label_store.Store) -> dict:
    """One row per (prompt, labeler) ranking: the prompt's responses in the order shown and each one's level as
    its rank (a tie gives no pair); the held-out prompts' rankings become the eval split."""
    rankings = task.rankings()
    if not rankings:
        raise UserError(f"{task.path}: no rankings stored yet, so there is no dataset to write; rerun without "
                        "label.finish to serve the ranking page")
    rows = []
    for ranking in rankings:
        prompt = task.prompts[ranking.prompt_id]
        level = {rid: i for i, ids in enumerate(ranking.levels) for rid in ids}
        rows.append({"prompt": prompt.text, "responses": [r.text for r in prompt.responses],
                     "ranks": [level[r.id] for r in prompt.responses], "ended": [r.ended for r in prompt.responses],
                     "labeler": ranking.labeler})
    path = run_dir / "rankings.jsonl"
    write_text_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))
    figures = agreement.stats(rankings, task.skips())
    extra = {"labeler": PEOPLE, "labelers": len(figures["labelers"]), "labeler_agreement": figures["agreement"]}
    tfds.disable_progress_bar()  # the summary below says what was written
    prepared = prepare("jsonl_rankings", [str(path), *cfg.label.include], cfg.data.dir, cfg.label.dataset,
                       overwrite=True, extra_metadata=extra,
                       eval_prompts={p.text for p in task.prompts.values() if p.held_out})
    summary = {"stage": "label", "labeler": PEOPLE, "dataset": prepared["dataset"],
               "prompts": task.meta.get("prompts", len(task.prompts)), "task_prompts": len(task.prompts),
               "labeled_prompts": len({r.prompt_id for r in rankings}), "rankings": len(rankings),
               "labelers": len(figures["labelers"]), "skips": sum(task.skips().values()),
               "dropped_prompts": task.meta.get("dropped_prompts"),
               "empty_responses_dropped": task.meta.get("empty_responses_dropped"),
               "duplicate_responses_merged": task.meta.get("duplicate_responses_merged"),
               "examples": prepared["examples"], "pairs": prepared.get("pairs"),
               "labeler_agreement": figures["agreement"], "tied_pairs_excluded": figures["tied_pairs_excluded"],
               "flags": figures["flags"]}
    write_json_atomically(run_dir / "summary.json", summary)
    return summary


def _write_rankings(cfg: Config, run_dir: Path, n: int, kept_prompts, kept_responses, kept_ended, labeler,
                    dropped: tuple[int, int], module, held_out) -> dict:
    """The labeler's rankings, their file, its prepared dataset and the summary (process 0 alone, with several
    processes)."""
    lab = cfg.label
    ranks = imports.call(labeler, f"label.labeler={lab.labeler}", kept_prompts, kept_responses, cfg.seed,
                         ended=kept_ended)
    _check_ranks(ranks, kept_responses, lab.labeler)
    path = run_dir / "rankings.jsonl"
    write_text_atomically(path, "".join(json.dumps({"prompt": p, "responses": r, "ranks": [int(x) for x in k],
                                                    "ended": e}) + "\n"
                                        for p, r, k, e in zip(kept_prompts, kept_responses, ranks, kept_ended)))
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
    prepared = prepare("jsonl_rankings", [str(path), *lab.include], cfg.data.dir, lab.dataset, overwrite=True,
                       extra_metadata=extra, eval_prompts=held_out)
    summary = {"stage": "label", "dataset": prepared["dataset"], "prompts": n, "labeled_prompts": len(kept_prompts),
               "dropped_prompts": n - len(kept_prompts), "empty_responses_dropped": dropped[0],
               "duplicate_responses_merged": dropped[1],
               "responses": sum(len(r) for r in kept_responses), "examples": prepared["examples"],
               "pairs": prepared.get("pairs"), **{k: v for k, v in extra.items() if k != "labeler"}}
    write_json_atomically(run_dir / "summary.json", summary)
    return summary


def group_responses(prompts: list[str], samples: list[list[Sample]]
                    ) -> tuple[list[str], list[list[str]], list[list[bool]], int, int]:
    """(prompts kept, the distinct non-empty responses of each, whether each ended, empty responses dropped,
    duplicates merged) from the samples of each prompt; a prompt with fewer than 2 such responses is not kept."""
    kept_prompts, kept_responses, kept_ended, empty, duplicates = [], [], [], 0, 0
    for prompt, prompt_samples in zip(prompts, samples):
        merged, dropped = merge_responses(prompt_samples)
        empty += dropped
        duplicates += len(prompt_samples) - dropped - len(merged)
        if len(merged) >= 2:
            kept_prompts.append(prompt)
            kept_responses.append([text for text, _, _ in merged])
            kept_ended.append([ended for _, _, ended in merged])
    return kept_prompts, kept_responses, kept_ended, empty, duplicates


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

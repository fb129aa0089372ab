"""Evaluation of policies the way InstructGPT judged them (preference rates by the reward model and a gold scorer, KL
from the reference, held-out ranking accuracy); `python -m rlhf_jax.evaluate` and `stage: eval` run it. The
evaluator here samples and scores every policy on the same prompts and seeds with programs compiled once per
architecture; the policies are found and restored by `eval.policies`, the prompts and gold scorer read by
`eval.inputs`."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import Config
from rlhf_jax.data.pipeline import eval_batches
from rlhf_jax.errors import UserError, about
from rlhf_jax.eval import stats as eval_stats
from rlhf_jax.eval.inputs import gold_scores, load_gold, load_prompts, open_dataset, split_spec
from rlhf_jax.eval.policies import SCALAR_NOT_POLICY, PolicySource, policy_meta, policy_sources, restorable_policy
from rlhf_jax.models.checkpoint import LoadedModel, check_role, load_model, warn_prompt_form
from rlhf_jax.models.sampling import SamplingParams, sample, teacher_forced_logprobs, tokenizer_vocab
from rlhf_jax.models.tokenizer import (PAD_ID, PromptEncoder, ResponseCodec, check_chat_template,
                                      check_same_tokenizer, load_tokenizer)
from rlhf_jax.models.transformer import make_model, param_logical_axes, params_for
from rlhf_jax.rl.scoring import reward_scores
from rlhf_jax.runtime import distributed, sharding
from rlhf_jax.runtime.metrics import MetricsWriter
from rlhf_jax.runtime.progress import progress
from rlhf_jax.training.run import refuse_another_stages_run
from rlhf_jax.training.state import check_positions, eval_sums
from rlhf_jax.training.steps import rm_eval_sums, rm_metrics


# ------------------------------------------------------------------------------------------------ programs


class Samples(NamedTuple):
    tokens: np.ndarray  # (n, N) response tokens, PAD_ID after the first EOS
    mask: np.ndarray  # (n, N) real response tokens (EOS included)
    ended: np.ndarray  # (n,) produced an EOS


class Programs:
    """The compiled sampler, teacher-forced log-probs and reward scores for fixed (batch, prompt, response)
    shapes, compiled once per model architecture and reused by every policy of it."""

    def __init__(self, mesh, p: SamplingParams, dtype: str):
        self.mesh, self.p, self.dtype = mesh, p, dtype
        self.batch_sh, self.repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
        self._jits: dict = {}
        self._models: dict = {}

    def place(self, loaded: LoadedModel):
        key = (loaded.cfg, loaded.head)
        if key not in self._models:  # one model object per architecture: the compiled programs are keyed by it
            self._models[key] = make_model(loaded.cfg, loaded.head, dtype=self.dtype)
        model = self._models[key]
        params = params_for(model, jax.tree.map(lambda x: np.asarray(x).astype(self.dtype), loaded.params))
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        return model, sharding.place(params, sharding.param_shardings(param_logical_axes(model), shapes, self.mesh))

    def _jit(self, kind: str, model, fn):
        key = (kind, model)
        if key not in self._jits:
            self._jits[key] = sharding.jit(functools.partial(fn, model), self.mesh, out_shardings=self.batch_sh)
        return self._jits[key]

    def _batch(self, *arrays):
        return [jax.device_put(x, self.batch_sh) for x in arrays]

    def sample(self, model, params, ids, mask, rng) -> Samples:
        fn = self._jit("sample", model, functools.partial(sample, p=self.p))
        out = distributed.to_host(fn(params, *self._batch(ids, mask), rng))
        ended = np.any(out.mask_BN & np.isin(out.tokens_BN, self.p.eos_ids), axis=1)
        return Samples(out.tokens_BN, out.mask_BN, ended)

    def logprobs(self, model, params, ids, mask, samples: Samples) -> np.ndarray:
        fn = self._jit("logprobs", model, functools.partial(teacher_forced_logprobs, temperature=self.p.temperature,
                                                                 vocab=self.p.vocab))
        return np.asarray(distributed.to_host(fn(params, *self._batch(ids, mask, samples.tokens, samples.mask))),
                          np.float64)

    def scores(self, model, params, gain: float, bias: float, ids, mask, samples: Samples) -> np.ndarray:
        fn = self._jit("scores", model, functools.partial(_reward_scores, gain=gain, bias=bias))
        return np.asarray(distributed.to_host(fn(params, *self._batch(ids, mask, samples.tokens, samples.mask))),
                          np.float64)


def _reward_scores(model, params, ids, mask, tokens, tokens_mask, *, gain: float, bias: float):
    return reward_scores(model, params, gain, bias, ids, mask, tokens, tokens_mask)


def prompt_batches(encoder: PromptEncoder, prompts: list[str], batch_size: int):
    """(start, n real rows, ids, mask) of fixed-shape batches; filler rows keep one real token."""
    ids_all, mask_all, cut = encoder.batch(prompts)
    if cut and distributed.is_primary():
        print(encoder.cut_warning(cut, len(prompts)), file=sys.stderr)
    width = ids_all.shape[1]
    for start in range(0, len(prompts), batch_size):
        n = min(batch_size, len(prompts) - start)
        ids = np.full((batch_size, width), PAD_ID, np.int32)
        mask = np.zeros((batch_size, width), bool)
        ids[:n], mask[:n] = ids_all[start:start + n], mask_all[start:start + n]
        mask[n:, -1] = True
        yield start, n, ids, mask


# ------------------------------------------------------------------------------------------------- the run


class Evaluator:
    """The reward model, the reference and the prompt batches, placed and encoded once; `responses` samples one
    policy on every prompt (the same seed per batch for every policy) and scores what it wrote."""

    def __init__(self, cfg: Config, prompts: list[str], gold_fn: Callable | None, mesh, metadata: list | None = None):
        e, s = cfg.eval, cfg.sampling
        self.prompts, self.gold_fn, self.gold_spec = prompts, gold_fn, e.gold
        self.metadata = metadata or [None] * len(prompts)  # of each prompt, for the gold scorer
        self.chat_template = cfg.data.chat_template
        reward = load_model(e.reward_model, key="eval.reward_model") if e.reward_model else None
        if reward is not None and reward.head != "scalar":
            raise UserError(f"eval.reward_model={e.reward_model}: a language model, expected a reward model "
                            "export (scalar head)")
        if reward is not None:
            check_role(reward, f"eval.reward_model={e.reward_model}", "reward")
        self.reference = load_model(e.reference, need_tokenizer=True, key="eval.reference")
        if self.reference.head != "lm":
            raise UserError(f"eval.reference={e.reference}: {SCALAR_NOT_POLICY}")
        # named as the command line and a config both read them
        warn_prompt_form(self.reference, cfg.data.chat_template, f"the reference {e.reference}")
        if reward is not None:
            self.check_vocab(reward, f"eval.reward_model={e.reward_model}")
            warn_prompt_form(reward, cfg.data.chat_template, f"the reward model {e.reward_model}")
        self.tokenizer = load_tokenizer(self.reference.tokenizer_dir, self.reference.cfg.family)
        check_chat_template(self.tokenizer, cfg.data.chat_template, f"eval.reference={e.reference}")
        encoder = PromptEncoder(self.tokenizer, s.max_prompt_tokens, cfg.data.chat_template)
        eos = encoder.stop_ids(self.reference.cfg.eos_token_ids)
        vocab = tokenizer_vocab(self.tokenizer, self.reference.cfg)
        self.programs = Programs(mesh, SamplingParams(s.max_new_tokens, s.temperature, s.top_k, s.top_p, eos,
                                                      PAD_ID, vocab), cfg.model.dtype)
        self.batches = list(prompt_batches(encoder, prompts, s.batch_size))
        self.width = width = self.batches[0][2].shape[1]
        for what, model in (("", self.reference), (f"eval.reward_model={e.reward_model}: ", reward)):
            if model is not None:
                check_positions(model.cfg, width + s.max_new_tokens, f"{what}the longest prompt ({width} tokens) + "
                                f"sampling.max_new_tokens ({s.max_new_tokens})")
        norm = (reward.extra.get("reward_norm") if reward is not None else None) or {}
        self.gain, self.bias = float(norm.get("gain", 1.0)), float(norm.get("bias", 0.0))
        self.reward = reward  # None: the gold scorer alone judges the responses
        self.reward_model, self.reward_params = self.programs.place(reward) if reward is not None else (None, None)
        self.ref_model, self.ref_params = self.programs.place(self.reference)
        self.rng = jax.random.key(cfg.seed)

    def check_vocab(self, other: LoadedModel, what: str) -> None:
        """The models must read the same tokens: the same vocabulary size, and tokenizers that agree."""
        if other.cfg.vocab_size != self.reference.cfg.vocab_size:
            raise UserError(f"{what}: vocab_size {other.cfg.vocab_size} differs from the reference's "
                            f"{self.reference.cfg.vocab_size} (the models must read the same tokens)")
        check_same_tokenizer(other.tokenizer_dir, self.reference.tokenizer_dir, what, "the reference",
                             self.chat_template)

    def responses(self, model, params, bar, policy: bool = True, name: str = "reference") -> dict:
        """Samples, texts, RM (and gold) scores of every prompt; for a policy also its and the reference's
        log-probs of its samples (for the KL). The bar shows `name` and the tokens it has sampled so far."""
        programs, parts = self.programs, []
        for start, n, ids, mask in self.batches:
            smp = programs.sample(model, params, ids, mask, jax.random.fold_in(self.rng, start))
            part = {"samples": smp}
            if self.reward_model is not None:
                part["score"] = programs.scores(self.reward_model, self.reward_params, self.gain, self.bias, ids,
                                                mask, smp)
            if policy:
                part["logprobs"] = programs.logprobs(model, params, ids, mask, smp)
                part["ref_logprobs"] = programs.logprobs(self.ref_model, self.ref_params, ids, mask, smp)
            parts.append(jax.tree.map(lambda x: x[:n], part))
            bar.update(n)
            bar.set_postfix(model=name, tokens=int(sum(p["samples"].mask.sum() for p in parts)))
        joined = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
        smp = joined["samples"]
        responses = ResponseCodec(self.tokenizer)
        joined["texts"] = [responses.decode(t[m].tolist()) for t, m in zip(smp.tokens, smp.mask)]
        if self.gold_fn is not None:
            joined["gold"] = gold_scores(self.gold_fn, self.gold_spec, self.prompts, joined["texts"],
                                         smp.ended.tolist(), self.metadata)
        return joined


def check_config(cfg: Config) -> None:
    """What can be known wrong before reading any file."""
    for key in ("policies", "reference", "prompts"):
        if not getattr(cfg.eval, key):
            raise UserError(f"stage 'eval' needs eval.{key}")
    if not (cfg.eval.reward_model or cfg.eval.gold):
        raise UserError("stage 'eval' needs eval.reward_model or eval.gold: something to score the responses")
    if cfg.eval.rankings and not cfg.eval.reward_model:
        raise UserError("eval.rankings measures the reward model's accuracy: set eval.reward_model too")
    load_gold(cfg.eval.gold)


def run_eval(cfg: Config, run_dir: Path) -> dict:
    """Every check that can fail (flags, files, kinds) runs before the first sample."""
    check_config(cfg)
    e, s = cfg.eval, cfg.sampling
    refuse_another_stages_run(run_dir, "eval")  # its metrics go there
    out_dir = Path(e.out or run_dir)
    mesh = sharding.mesh_from_config(cfg.mesh)
    sharding.check_batch_size(s.batch_size, mesh, "sampling.batch_size")
    gold_fn = load_gold(e.gold)
    filtered = s.temperature == 0 or s.top_k > 0 or s.top_p < 1
    if filtered and distributed.is_primary():  # the log-probs are the full distributions', not the filtered ones
        print("warning: sampling is greedy or filtered (a temperature of 0, top-k or top-p): the KL columns "
              "compare the unfiltered distributions, not the ones the responses were drawn from", file=sys.stderr)
    prompts, prompt_metadata = load_prompts(e.prompts, e.limit)
    with warnings.catch_warnings(record=True) as caught, about("eval.policies"):
        warnings.simplefilter("always")
        sources = policy_sources(e.policies, e.step, e.all_steps)
    for message in dict.fromkeys(str(w.message) for w in caught):  # each once (a run's steps are listed twice)
        print(f"warning: {message}", file=sys.stderr)
    models = [("eval.reference", e.reference), ("eval.reward_model", e.reward_model),
              *(("eval.policies", str(x.path)) for x in sources if x.step is None)]
    check_outputs(out_dir, run_dir, models)
    earlier_rounds = [round_row(read_round(path)) for path in e.rounds]
    ev = Evaluator(cfg, prompts, gold_fn, mesh, prompt_metadata)
    metas = {}
    for source in sources:  # a policy that reads other tokens or positions stops the run before the first sample
        with about("eval.policies"):
            metas[source.path] = meta = policy_meta(source)  # a run's checkpoints share one
            ev.check_vocab(meta, str(source.path))
            check_positions(meta.cfg, ev.width + s.max_new_tokens, f"{source.path}: the longest prompt "
                            f"({ev.width} tokens) + sampling.max_new_tokens ({s.max_new_tokens})")
    for path, meta in metas.items():
        warn_prompt_form(meta, cfg.data.chat_template, f"the policy {path}")
    rm_accuracy, labels = _rm_accuracy(cfg, e.rankings, ev.reward_model, ev.reward_params, ev.tokenizer, mesh)
    base_models: dict = {}
    rows, samples, logged = [], [], []
    with progress(len(prompts) * (len(sources) + 1), "eval", "response", enabled=distributed.is_primary()) as bar:
        ref = ev.responses(ev.ref_model, ev.ref_params, bar, policy=False)
        for source in sources:
            with about("eval.policies"):
                found = restorable_policy(source, base_models)
            if found is None:
                bar.total -= len(prompts)
                continue
            source, loaded = found
            model, params = ev.programs.place(loaded)
            pol = ev.responses(model, params, bar, name=source.name)
            del params, loaded
            row = _policy_row(source, pol, ref, rm_accuracy)
            rows.append(row)
            # a run's checkpoints as one curve over their steps (`dpo` at 100, 170); a model directory at step 0
            logged.append((source.name.rsplit("@", 1)[0] if source.step is not None else source.name,
                           source.step or 0, {k: v for k, v in row.items() if isinstance(v, float)}))
            samples += [_sample_row(source.name, prompts[i], ref, pol, i) for i in range(min(e.samples, len(prompts)))]
    if not rows:
        raise UserError(f"eval.policies: no checkpoint of {', '.join(map(str, e.policies))} can be restored")
    # Written only once every policy is evaluated: a failed evaluation leaves nothing half-made.
    # a rerun replaces every eval line: models given as directories log at step 0
    with MetricsWriter(run_dir, "eval", resume_step=-1) as metrics:
        for policy, step, values in logged:
            metrics.write(step, values, policy)
    result = {"reference": {"path": str(e.reference), **_response_stats(ref)}, "reward_model": e.reward_model or None,
              "kl_of_sampled_distributions": not filtered,
              "prompts": len(prompts), "seed": cfg.seed, "gold": e.gold or None, "rm_accuracy": rm_accuracy,
              "labeler_ceiling": labels.get("labeler_ceiling"), "labeler_agreement": labels.get("labeler_agreement"),
              "sampling": dataclasses.asdict(s), "policies": rows}
    if e.rounds:
        result["rounds"] = [*earlier_rounds, round_row(result)]
    from rlhf_jax.eval.report import headline, verdict, write_report  # matplotlib only when a report is written

    written = distributed.on_primary(lambda: [str(p) for p in write_report(out_dir, result, samples,
                                                                            [Path(r) for r in e.runs])])
    for line in headline(result):
        print(line, file=sys.stderr)
    last = rows[-1]  # the headline numbers of the last policy (the final checkpoint of a run)
    summary = {"stage": "eval", "policies": len(rows), "prompts": len(prompts), "report": str(out_dir / "report.md"),
               "files": written,
               **{k: last[k] for k in ("win_rate", "gold_win_rate", "kl") if last.get(k) is not None},
               "verdict": verdict(result)}
    print(json.dumps(summary))
    for line in summary["verdict"]:
        print(line, file=sys.stderr)
    return summary


def check_outputs(out_dir: Path, run_dir: Path, models: list[tuple[str, str | None]]) -> None:
    """The report and metrics go to directories that are not, and are not inside, a model read here (a model
    directory's fingerprint covers its files); `eval.out` is not a file."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"eval.out={out_dir}: a file, expected the report's directory")
    for key, out in {"eval.out": out_dir, "run_dir": run_dir}.items():
        for what, model in models:
            if model and (out.resolve() == Path(model).resolve() or Path(model).resolve() in out.resolve().parents):
                raise UserError(f"{key}={out}: is or is inside the model directory {what}={model}; what is written "
                                "there would change the model's files: write it elsewhere")


def read_round(path: str) -> dict:
    """An earlier round's report.json (in its eval step's directory)."""
    try:
        report = json.loads((Path(path) / "report.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"eval.rounds: {path}/report.json cannot be read ({type(e).__name__}); that round's eval "
                        "step must have finished") from None
    policies = report.get("policies") if isinstance(report, dict) else None
    if not (isinstance(policies, list) and policies and all(isinstance(p, dict) for p in policies)):
        raise UserError(f"eval.rounds: {path}/report.json has no evaluated policies (expected an eval report)")
    return report


def round_row(report: dict) -> dict:
    """One round in the rounds table: its last policy's gold score, RM score and KL, its RM's accuracy, and every
    evaluated checkpoint (the round's KL frontier)."""
    last = report["policies"][-1]
    return {"gold_score_mean": last.get("gold_score_mean"), "score_mean": last.get("score_mean"), "kl": last.get("kl"),
            "rm_accuracy": report.get("rm_accuracy"),
            "checkpoints": [{k: p.get(k) for k in ("name", "kl", "score_mean", "gold_score_mean")}
                            for p in report["policies"]]}


def _sample_row(name: str, prompt: str, ref: dict, pol: dict, i: int) -> dict:
    row = {"policy": name, "prompt": prompt, "reference_response": ref["texts"][i], "policy_response": pol["texts"][i],
           "reference_score": float(ref["score"][i]) if "score" in ref else None,
           "policy_score": float(pol["score"][i]) if "score" in pol else None}
    if "gold" in pol:
        row.update(reference_gold=float(ref["gold"][i]), policy_gold=float(pol["gold"][i]))
    return row


def _response_stats(r: dict) -> dict:
    smp = r["samples"]
    scored = "score" in r  # by a reward model
    return {"score_mean": float(r["score"].mean()) if scored else None,
            "score_std": float(r["score"].std()) if scored else None,
            "gold_score_mean": float(r["gold"].mean()) if "gold" in r else None,
            "response_length": float(smp.mask.sum(1).mean()), "eos_rate": float(smp.ended.mean())}


def _policy_row(source: PolicySource, pol: dict, ref: dict, rm_accuracy: float | None) -> dict:
    try:
        return _measures(source, pol, ref, rm_accuracy)
    except ValueError as e:  # non-finite scores or log-probs: a model that diverged
        raise UserError(f"{source.path}: {e}") from None


def _measures(source: PolicySource, pol: dict, ref: dict, rm_accuracy: float | None) -> dict:
    same = bool(np.array_equal(pol["samples"].tokens, ref["samples"].tokens))  # then every prompt ties, surely
    wins = eval_stats.win_rate(pol["score"], ref["score"], same) if "score" in pol else {"win_rate": None,
                                                                                          "win_rate_ci": None}
    kl = eval_stats.sequence_kl(pol["logprobs"], pol["ref_logprobs"], pol["samples"].mask)
    row = {"name": source.name, "path": str(source.path), "step": source.step, **_response_stats(pol),
           "win_rate": wins["win_rate"], "win_rate_ci": wins["win_rate_ci"], "gold_win_rate": None,
           "gold_win_rate_ci": None, "kl": kl["kl"], "kl_k3": kl["kl_k3"], "rm_accuracy": rm_accuracy}
    if "gold" in pol:
        gold = eval_stats.win_rate(pol["gold"], ref["gold"], same)
        row.update(gold_win_rate=gold["win_rate"], gold_win_rate_ci=gold["win_rate_ci"])
    return row


def _rm_accuracy(cfg: Config, rankings: str, model, params, tokenizer, mesh) -> tuple[float | None, dict]:
    """(held-out pairs the reward model orders correctly (tied rankings make no pair) over a rankings split, what
    the dataset records of its labels: the best accuracy a programmatic labeler allows, people's agreement)."""
    if not rankings:
        return None, {}
    path, split = split_spec(rankings)
    _, metadata = open_dataset(path, split, "eval.rankings")
    if metadata["kind"] != "rankings":
        raise UserError(f"eval.rankings={rankings}: a {metadata['kind']!r} dataset, expected one of kind 'rankings'")
    spec = dataclasses.replace(cfg.data, dir=str(path.parent), name=path.name)
    fn = sharding.jit(functools.partial(rm_eval_sums, model=model), mesh, out_shardings=sharding.replicated(mesh))
    sums = eval_sums(fn, params, eval_batches(spec, split, tokenizer, cfg.sampling.batch_size), mesh)
    has_pairs = sums and float(sums["pairs"]) > 0  # no pair: no accuracy, rather than 0 of 0 read as 0.0
    accuracy = float(rm_metrics({k: jnp.asarray(v) for k, v in sums.items()})["accuracy"]) if has_pairs else None
    return accuracy, {k: metadata.get(k) for k in ("labeler_ceiling", "labeler_agreement")}

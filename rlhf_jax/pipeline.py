"""The pipeline: several stages from one YAML config, each in its own directory under the pipeline's run_dir,
each step reading what the steps before it exported.

    run_dir: runs/demo                # every other top-level key is shared by all steps
    seed: 0
    pipeline:                         # steps in order: name -> that stage's own config body
      sft: {stage: sft, model: {path: gpt2}, data: {name: tldr_sft}, train: {epochs: 1}}
      rm:  {stage: rm, model: {path: "{run_dir}/sft/export"}, data: {name: tldr_rankings}}

`{run_dir}` in any string is the pipeline's run_dir; step NAME runs in `{run_dir}/NAME`. A finished step leaves
`pipeline_step.json` (its resolved config, its summary and a fingerprint of the steps before it) and is skipped
on a rerun; a finished step with other settings (in the config sections its stage reads, STAGE_SECTIONS), or one
that followed other steps before it (one was added or removed, or ran again and came out differently), stops the
run in one line. An interrupted step resumes when the
same command is rerun (training stages from their checkpoints; the others redo their work, which they write
whole).
Overrides: `key=value` sets a key for every step (also where a step sets it itself), `pipeline.NAME.key=value`
for step NAME alone; the later of two on one key wins. Every step's
config is validated before the first one runs, and so is every `{run_dir}/NAME/...` a step reads: NAME must be
that step or an earlier one (paths under data.dir are datasets, not steps). Step names are simple names (letters,
digits, `_`, `-`, and `.` but not first), so a step's directory is always inside run_dir.
The run holds an OS lock on `{run_dir}/.lock` while it runs: a second run on the same run_dir is refused. Finished
steps are recorded relative to run_dir, so a run_dir moved elsewhere still has them finished.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple, Sequence

import yaml

# STAGE_SECTIONS: a key changed in a section a stage does not read (a shared override such as optim.lr reaches every
# step) leaves a finished step finished, and the steps after it unaffected by it
from rlhf_jax.config import STAGE_SECTIONS, Config, apply_override, config_from_dict, config_to_dict
from rlhf_jax.errors import UserError
from rlhf_jax.runtime.fsio import make_run_dir, remove_made, run_dir_lock, write_json_atomically
from rlhf_jax.typed_yaml import ConfigError, read_yaml_mapping

MARKER = "pipeline_step.json"
STARTED = "pipeline_step_started.json"  # the steps before it, as a step that has not finished started after them
# What a finished step's one-line summary shows, when its stage reports it.
SUMMARY_KEYS = ("steps", "loss", "eval_loss", "accuracy", "eval_accuracy", "labeled_prompts", "labeler_ceiling",
                "score_mean", "kl", "win_rate", "gold_win_rate")
STEP_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
REFERENCE = re.compile(r"\{run_dir\}/+([^/:]+)")  # `{run_dir}/NAME...`: what step NAME made
OUTPUT_KEYS = ("data.dir", "eval.out", "generate.output")  # where a step writes, not what it reads
ROUND_KEYS = ("rounds", "repeat")  # the pipeline's own keys: how many times which steps run
# How a label step serves its page, not what it makes: a finished step stays finished when they change.
SERVING_KEYS = ("label.host", "label.port", "label.token", "label.finish")
# How a step runs, not what it makes: the devices' layout, the compile cache, the processes, the log's cadence. A
# finished step stays finished when they change (a run carried on to other machines); a resumed one lists them.
LAYOUT_KEYS = ("mesh", "runtime", "distributed", "train.log_every")


class Step(NamedTuple):
    name: str
    cfg: Config


def is_pipeline(path: str | None) -> bool:
    """Whether a config file is a pipeline (a top-level `pipeline:` mapping)."""
    return path is not None and "pipeline" in read_yaml_mapping(path)


def load(path: str, overrides: Sequence[str] = ()) -> tuple[Path, list[Step]]:
    """(the pipeline's run_dir, its validated steps in order)."""
    data = read_yaml_mapping(path)
    bodies = data.pop("pipeline")
    if not isinstance(bodies, Mapping) or not bodies:
        raise ConfigError(f"config file {path!r}: 'pipeline' expects a mapping of step names to stage configs")
    bodies = {str(name): copy.deepcopy(body) for name, body in bodies.items()}
    for name in bodies:
        if not STEP_NAME.fullmatch(name):
            raise ConfigError(f"pipeline: step name {name!r}: expected a simple name (letters, digits, '_', '-' "
                              "and '.', not first), since the step runs in {run_dir}/NAME")
    for name, body in bodies.items():
        if not isinstance(body, Mapping):
            raise ConfigError(f"pipeline.{name}: expects a stage config with its `stage`")
    for item in overrides:  # in order, the later winning
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. optim.lr=1e-5")
        if key.startswith("pipeline."):
            name, rest = _step_key(key, bodies)
            _step_error(name, lambda: apply_override(bodies[name], f"{rest}={value}"))
        elif key in ROUND_KEYS:
            try:
                data[key] = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ConfigError(f"override {key!r}: invalid YAML value {value!r} ({e.problem})") from None
        else:
            apply_override(data, item)
            if key != "run_dir":  # a key for every step: also over the value a step sets itself
                for name in bodies:
                    _step_error(name, lambda: apply_override(bodies[name], item))
    run_dir = data.pop("run_dir", "runs/pipeline")
    if not isinstance(run_dir, str) or not run_dir.strip():
        raise ConfigError(f"'run_dir' expects the pipeline's directory, got {run_dir!r}")
    run_dir = str(Path(run_dir))  # as Path spells it: one spelling per run_dir
    rounds, repeat = _rounds(data.pop("rounds", None), data.pop("repeat", None), list(bodies))
    config_from_dict(data)  # the shared keys' schema, also where every step sets the section itself
    for name, body in bodies.items():
        if "stage" not in body:
            raise ConfigError(f"pipeline.{name}: expects a stage config with its `stage`")
        if body.get("run_dir") is not None:
            raise ConfigError(f"pipeline.{name}.run_dir: a step runs in {run_dir}/{name}; set the pipeline's run_dir")
        # the schema before anything below reads a section (a list or a number where a section belongs)
        _step_error(name, lambda: config_from_dict({**_merge(data, body), "run_dir": f"{run_dir}/{name}"}))
    _check_references(data, bodies)
    steps = []
    for name, merged in _in_rounds({name: _merge(data, body) for name, body in bodies.items()}, rounds, repeat):
        merged = _substitute(merged, run_dir)
        merged["run_dir"] = f"{run_dir}/{name}"
        steps.append(Step(name, _step_error(name, lambda: config_from_dict(merged))))
    from rlhf_jax.stages import dispatch as stages  # after the schema: its errors come before heavier imports

    for step in steps:
        _step_error(step.name, lambda: stages.check(step.cfg))
    return Path(run_dir), steps


def _step_key(key: str, bodies: Mapping) -> tuple[str, str]:
    """(step name, its key) of an override `pipeline.NAME.KEY`; the longest step name that fits (names may hold
    dots)."""
    rest = key[len("pipeline."):]
    for name in sorted(bodies, key=len, reverse=True):
        if rest.startswith(name + "."):
            return name, rest[len(name) + 1:]
    if rest in bodies:
        raise ConfigError(f"override {key!r} names a step; set its keys, e.g. '{key}.train.steps=...'")
    raise ConfigError(f"override {key!r}: no step {rest.partition('.')[0]!r}; steps: {list(bodies)}")


def _rounds(rounds, repeat, names: list[str]) -> tuple[int, list[str]]:
    """(rounds, the repeated steps) from the top-level `rounds: R` and `repeat: [NAME, ...]` (consecutive steps)."""
    if rounds is None and repeat is None:
        return 1, []
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ConfigError(f"rounds: expected a whole number >= 1, got {rounds!r}")
    if not isinstance(repeat, list) or not repeat or not all(isinstance(n, str) for n in repeat):
        raise ConfigError(f"repeat: expected a list of the step names repeated each round, got {repeat!r}")
    unknown = [n for n in repeat if n not in names]
    if unknown:
        raise ConfigError(f"repeat: no step {unknown[0]!r}; steps: {', '.join(names)}")
    first = names.index(repeat[0])
    if names[first:first + len(repeat)] != repeat:
        raise ConfigError(f"repeat: {repeat} must name consecutive steps in the pipeline's order "
                          f"({', '.join(names)})")
    return rounds, repeat


def _in_rounds(merged: dict[str, dict], rounds: int, repeat: list[str]) -> list[tuple[str, dict]]:
    """(step name, merged body) in running order: the steps before the repeated ones once, the repeated ones once
    per round as `round{r}/NAME` (running in `{run_dir}/round{r}/NAME`), the steps after them once.

    In round r a repeated step reads this round's results of the repeated steps (`{run_dir}/NAME` becomes
    `{run_dir}/round{r}/NAME`), and each round's labels are a dataset of their own (label.dataset + `_round{r}`);
    from round 2 on, the label step samples round r-1's policy (PPO's, else GRPO's or RLOO's, else DPO's) and adds
    the rankings of every earlier round, the rm step starts from round r-1's reward model (unless rm.init is sft),
    a ppo, grpo or rloo step continues from round r-1's policy (and PPO's value model) with the KL reference kept
    at its first model.path, a dpo step trains from its model.path on every round's rankings, and the eval step
    writes its report in its own directory, with the earlier rounds' in it. Steps after the repeated ones read
    the last round's results."""
    if not repeat:
        return list(merged.items())
    stage = {name: merged[name].get("stage") for name in repeat}
    one = {kind: next((n for n in repeat if stage[n] == kind), None) for kind in ("label", "rm")}
    # the policy whose samples the next round's label step ranks: PPO's, else GRPO's or RLOO's, else DPO's
    one["policy"] = next((n for kinds in (("ppo",), ("grpo", "rloo"), ("dpo",)) for n in repeat
                          if stage[n] in kinds), None)
    datasets = {str(_get(merged[n], "label.dataset") or "rankings") for n in repeat if stage[n] == "label"}
    first = list(merged).index(repeat[0])
    out = [(name, merged[name]) for name in list(merged)[:first]]
    for r in range(1, rounds + 1):
        for name in repeat:
            body = _this_round(merged[name], r, repeat, datasets)
            if r > 1:
                _continue_from(body, name, stage[name], f"{{run_dir}}/round{r - 1}", one, merged[name])
            earlier = [f"{{run_dir}}/round{q}/{name}" for q in range(1, r)]
            if stage[name] == "label" and earlier:
                _set(body, "label.include", [f"{path}/rankings.jsonl" for path in earlier])
            if stage[name] == "eval":  # each round's report in its own directory, with the earlier rounds'
                _set(body, "eval.rounds", earlier)
                _set(body, "eval.out", "")
            out.append((f"round{r}/{name}", body))
    out += [(name, _this_round(merged[name], rounds, repeat, datasets))
            for name in list(merged)[first + len(repeat):]]
    return out


def _this_round(body: dict, r: int, repeat: list[str], datasets: set[str]) -> dict:
    """`body` reading round r's results: `{run_dir}/NAME` of a repeated step and the label datasets."""
    data_dir = str(_get(body, "data.dir") or "data")

    def rewrite(text: str) -> str:
        text = REFERENCE.sub(lambda m: f"{{run_dir}}/round{r}/{m.group(1)}" if m.group(1) in repeat
                             else m.group(0), text)
        for name in datasets:
            path = f"{data_dir}/{name}"
            if text == path or text.startswith(path + ":"):
                text = f"{path}_round{r}" + text[len(path):]
        return text

    out = _map_strings(body, rewrite)
    for key in ("data.name", "label.dataset"):
        if _get(out, key) in datasets:
            _set(out, key, f"{_get(out, key)}_round{r}")
    if body.get("stage") == "label" and not _get(out, "label.dataset"):
        _set(out, "label.dataset", f"rankings_round{r}")
    return out


def _continue_from(body: dict, name: str, stage: str, previous: str, one: dict, written: dict) -> None:
    """A later round's step starts from the previous round's models (see `_in_rounds`)."""
    if stage == "label" and one["policy"]:
        _set(body, "model.path", f"{previous}/{one['policy']}/export")
    elif stage == "rm" and _get(written, "rm.init") != "sft":
        _set(body, "model.path", f"{previous}/{one['rm']}/export")
    elif stage in ("ppo", "grpo", "rloo"):  # on-policy RL continues; DPO retrains on every round's rankings
        _set(body, f"{stage}.reference", _get(written, f"{stage}.reference") or _get(written, "model.path"))
        _set(body, "model.path", f"{previous}/{name}/export")
        if stage == "ppo":
            _set(body, "ppo.value_model", f"{previous}/{name}/export_value")


def _get(body: Mapping, key: str):
    for part in key.split("."):
        body = body.get(part) if isinstance(body, Mapping) else None
    return body


def _set(body: dict, key: str, value) -> None:
    *sections, last = key.split(".")
    for part in sections:
        if not isinstance(body.get(part), dict):  # absent, or null (a section of defaults)
            body[part] = {}
        body = body[part]
    body[last] = value


def _step_error(name: str, build):
    try:
        return build()
    except UserError as e:
        raise ConfigError(f"pipeline.{name}: {e}") from None


def _check_references(shared: Mapping, bodies: Mapping[str, Mapping]) -> None:
    """Every `{run_dir}/NAME...` a step reads names a step that has run by then: this step or an earlier one (a
    later one has not made it yet, and a typo would otherwise fail only after the steps before it had trained).
    A shared key applies to every step, so it needs only name some step."""
    names = list(bodies)
    for i, (name, body) in enumerate([("", shared), *bodies.items()]):
        data_dir = str(_get(_merge(shared, body), "data.dir") or "data")
        for key, text in _strings(body):
            if key in OUTPUT_KEYS:
                continue
            for match in REFERENCE.finditer(text):
                target, path = match.group(1), text[match.start():]
                if path == data_dir or path.startswith((data_dir + "/", data_dir + ":")):
                    continue  # a dataset
                where = f"pipeline.{name}.{key}" if name else f"{key} (shared by every step)"
                if target not in names:
                    raise ConfigError(f"{where}: {text!r} names step {target!r}, which this pipeline does not have "
                                      f"(steps: {', '.join(names)})")
                if name and names.index(target) >= i:
                    raise ConfigError(f"{where}: {text!r} names step {target!r}, which runs after {name} (its "
                                      "results would not exist yet)")


def _strings(value, key: str = ""):
    """(dotted key, string) for every string in a config body."""
    if isinstance(value, str):
        yield key, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _strings(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v, key)


def _merge(base: Mapping, over: Mapping) -> dict:
    """`over` on top of `base`, section by section."""
    out = dict(copy.deepcopy(base))
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) \
            else copy.deepcopy(value)
    return out


def _substitute(value, run_dir: str):
    return _map_strings(value, lambda text: text.replace("{run_dir}", run_dir))


def _map_strings(value, fn):
    """`value` (a config body or summary) with `fn` applied to every string in it."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    return value


def run(path: str, overrides: Sequence[str] = ()) -> list[dict]:
    """Runs every step not finished yet, in order, holding run_dir's lock; returns their summaries. A run that
    stops on a user error leaves no run_dir behind if it created it and no step has written to it."""
    from rlhf_jax.runtime import compile_cache, distributed

    run_dir, steps = load(path, overrides)
    from rlhf_jax.stages.dispatch import settings_of  # after the schema: its errors come before heavier imports

    # before anything touches a device (the steps share the top-level `distributed` section)
    distributed.initialize(steps[0].cfg.distributed)
    compile_cache.use(steps[0].cfg.runtime.compile_cache)  # before the first program: check_same's gather compiles
    distributed.check_same({f"pipeline.{step.name}.{key}": value for step in steps
                            for key, value in settings_of(step.cfg).items()}, "settings")
    created = distributed.on_primary(lambda: make_run_dir(run_dir))
    try:
        with run_dir_lock(run_dir):
            return _run_steps(run_dir, steps)
    except UserError:
        if created and distributed.is_primary() and run_dir.is_dir() and \
                {p.name for p in run_dir.iterdir()} <= {".lock"}:
            remove_made(created)
        raise


def _run_steps(run_dir: Path, steps: list[Step]) -> list[dict]:
    from rlhf_jax.runtime import distributed
    from rlhf_jax.stages import dispatch as stages

    summaries, records, started = [], [], time.perf_counter()
    for i, step in enumerate(steps, 1):  # a finished step's changed settings stop the run before any step runs
        config = _relative(config_to_dict(step.cfg), str(run_dir))
        distributed.on_primary(lambda: _check_settings(step, config, tuple(steps[i:])))
    for i, step in enumerate(steps, 1):
        step_dir, where = Path(step.cfg.run_dir), f"[{i}/{len(steps)}] {step.name}"
        upstream = _fingerprint(records)
        older = tuple(_fingerprint(records, form) for form in OLDER_FORMS)
        config = _relative(config_to_dict(step.cfg), str(run_dir))
        # one answer for all processes
        done = distributed.on_primary(lambda: _finished(step, config, upstream, older, tuple(steps[i:])))
        if done is not None:
            summary = _substitute(done["summary"], str(run_dir))
            print(f"{where}: finished earlier, skipped ({_one_line(summary)})", file=sys.stderr)
            summaries.append(summary)
            records.append(done)
            continue
        created = distributed.on_primary(lambda: _check_started(step, upstream, older))
        print(f"{where}: stage {step.cfg.stage} in {step_dir}", file=sys.stderr)
        t0 = time.perf_counter()
        try:
            summary = json.loads(json.dumps(stages.run(step.cfg) or {}))
        except BaseException:  # a step that made nothing leaves nothing, as a stage run alone
            if created and distributed.is_primary() and step_dir.is_dir() and \
                    {p.name for p in step_dir.iterdir()} <= {STARTED, ".lock"}:
                shutil.rmtree(step_dir, ignore_errors=True)
                if step_dir.parent != run_dir and not any(step_dir.parent.iterdir()):  # a round's first step
                    step_dir.parent.rmdir()
            raise
        # config and summary relative to run_dir as it is now: read back alike from any working directory
        relative_summary = _relative(summary, str(run_dir))
        if distributed.is_primary():
            write_json_atomically(step_dir / MARKER, {"config": config, "summary": relative_summary,
                                                      "upstream": upstream})
        records.append({"config": config, "summary": relative_summary})
        print(f"{where}: done in {time.perf_counter() - t0:.0f} s ({_one_line(summary)}); "
              f"{time.perf_counter() - started:.0f} s so far", file=sys.stderr)
        summaries.append(summary)
    if distributed.is_primary():
        write_json_atomically(run_dir / "pipeline.json", {"steps": [s.name for s in steps], "summaries": summaries})
    print(f"pipeline finished in {time.perf_counter() - started:.0f} s: {run_dir}", file=sys.stderr)
    for line in summaries[-1].get("verdict", ()):  # an evaluation's last word, also when every step was skipped
        print(line, file=sys.stderr)
    return summaries


OLDER_FORMS = ("layout", "serving", "full")  # how older markers fingerprinted the steps before them


def _fingerprint(records: list[dict], form: str = "read") -> str:
    """What the steps so far were run with and came out as: the configs' parts their stages read (`_read_part`)
    and their summaries, relative to run_dir (timings left out, so a step that reran to the same results leaves
    the steps after it valid). Older markers' forms: "layout", the LAYOUT_KEYS counted; "serving", the label step's
    serving keys too; "full", every section (before STAGE_SECTIONS)."""
    part = {"read": _read_part, "layout": functools.partial(_read_part, layout=True),
            "serving": functools.partial(_read_part, serving=True, layout=True), "full": dict}[form]
    results = [{"config": part(r["config"]),
                "summary": {k: v for k, v in r["summary"].items() if not (k.endswith("_s") or k == "seconds")}}
               for r in records]
    return hashlib.sha256(json.dumps(results, sort_keys=True).encode()).hexdigest()


def _read_part(config: Mapping, serving: bool = False, layout: bool = False) -> dict:
    """The part of a step's config (a dict) that its stage reads: the top-level keys and its STAGE_SECTIONS, less
    the label section's SERVING_KEYS (how its page is served, not what it makes) unless `serving`, and the
    LAYOUT_KEYS unless `layout`."""
    sections = STAGE_SECTIONS.get(config.get("stage"))
    part = {k: v for k, v in config.items() if sections is None or not isinstance(v, Mapping) or k in sections}
    left_out = (() if serving else SERVING_KEYS) + (() if layout else LAYOUT_KEYS)
    for key in left_out:
        section, _, name = key.partition(".")
        if not name:
            part.pop(section, None)
        elif isinstance(part.get(section), Mapping):
            part[section] = {k: v for k, v in part[section].items() if k != name}
    return part


def _check_started(step: Step, upstream: str, older: tuple[str, ...] = ()) -> bool:
    """Refuses a step that started earlier after other steps before it (one reran and came out differently, as
    after a `delete ... to run it again`) and saved checkpoints, which it would resume from; then records the steps
    it starts after. Returns whether it created the step's directory."""
    step_dir = Path(step.cfg.run_dir)
    try:
        before = json.loads((step_dir / STARTED).read_text())["upstream"]
    except (OSError, ValueError, KeyError, TypeError):
        before = None  # never started here, or before these records were kept
    checkpoints = step_dir / "checkpoints"
    resumable = (checkpoints.is_dir() and any(checkpoints.iterdir())) or (step_dir / "label.db").exists()
    if before not in (None, upstream, *older) and resumable:
        raise UserError(f"pipeline.{step.name}: started earlier after other steps before it, which came out "
                        f"differently since; what it saved (checkpoints, a labeling task) is of that run: delete "
                        f"{step_dir} to run it again")
    created = not step_dir.exists()
    step_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomically(step_dir / STARTED, {"upstream": upstream})
    return created


def _marker(step: Step) -> tuple[dict, str] | None:
    """(a finished step's marker, the pipeline's run_dir it recorded); None when it has not finished or its marker
    cannot be read (the step runs again)."""
    marker = Path(step.cfg.run_dir) / MARKER
    if not marker.exists():
        return None
    try:
        recorded = json.loads(marker.read_text())
        _ = recorded["summary"], recorded["upstream"]  # both there, or the marker cannot be read
        # the pipeline's run_dir when the step ran: "{run_dir}" in markers written relative to it, older ones'
        # paths are made relative to the run_dir they recorded
        return recorded, recorded["config"]["run_dir"].removesuffix(f"/{step.name}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _check_settings(step: Step, config: dict, later: tuple[Step, ...] = ()) -> None:
    """Refuses a step finished earlier with other settings (relative to run_dir, in the sections its stage reads),
    naming the finished steps after it (`later`), which would be refused in turn once it ran again."""
    found = _marker(step)
    if found is None:
        return
    recorded, root = found
    changed = _changes(_read_part(_relative(recorded["config"], root)), _read_part(config),
                       _read_part({**config_to_dict(Config()), "stage": step.cfg.stage}))
    if changed:
        raise UserError(f"pipeline.{step.name}: finished earlier with other settings ({', '.join(changed[:3])}); "
                        f"{_delete_to_rerun(step, later)}")


def _delete_to_rerun(step: Step, later: tuple[Step, ...]) -> str:
    """What to delete to run `step` again: its directory and those of the finished steps after it."""
    stale = [step.cfg.run_dir] + [s.cfg.run_dir for s in later if _marker(s) is not None]
    also = f" and the {len(stale) - 1} finished steps after it" if len(stale) > 2 else \
        " and the finished step after it" if len(stale) == 2 else ""
    return f"delete {' '.join(stale)} to run it{also} again"


def _finished(step: Step, config: dict, upstream: str, older: tuple[str, ...], later: tuple[Step, ...] = ()
              ) -> dict | None:
    """The record of a step finished earlier with the same config (`_check_settings`) after the same earlier
    steps: the config it ran with and its summary, relative to run_dir; None when it has not finished. The steps
    after it are fingerprinted with the config it recorded, not today's: a version that added keys to the config
    (at their defaults) counts the same steps. `later`: the steps after it, named in a refusal when they finished
    too (rerun after this one, they would be refused in turn)."""
    found = _marker(step)
    if found is None:
        return None
    (recorded, root), step_dir = found, Path(step.cfg.run_dir)
    summary, after = recorded["summary"], recorded["upstream"]
    _check_settings(step, config, later)
    if after not in (upstream, *older):
        raise UserError(f"pipeline.{step.name}: finished earlier after other steps before it (one was added or "
                        f"removed, or ran again and came out differently); {_delete_to_rerun(step, later)}")
    if after != upstream:  # an older marker's fingerprint (every section): recorded as this one computes it
        write_json_atomically(step_dir / MARKER, {**recorded, "upstream": upstream})
    return {"config": _relative(recorded["config"], root), "summary": _relative(summary, root)}


def _relative(value, run_dir: str):
    """`value` with every path in or at `run_dir` (as written, absolute, or with its links resolved) written
    `{run_dir}/...`: how finished steps are compared, so a run_dir moved elsewhere still has them finished."""
    roots = sorted({run_dir, os.path.abspath(run_dir), os.path.realpath(run_dir)}, key=len, reverse=True)

    def relative(text: str) -> str:
        root = next((r for r in roots if text == r or text.startswith(r + "/")), None)
        return text if root is None else "{run_dir}" + text[len(root):]

    return _map_strings(value, relative)


def _changes(before: Mapping, now: Mapping, defaults: Mapping | None = None, prefix: str = "") -> list[str]:
    """'key: old -> new' for each difference; a key `before` lacks (added to the config since) at its value in
    `defaults` is none."""
    out, defaults = [], defaults or {}
    for key in sorted(set(before) | set(now)):
        a, b, default = before.get(key), now.get(key), defaults.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _changes(a, b, default if isinstance(default, Mapping) else {}, f"{prefix}{key}.")
        elif a != b and not (key not in before and key in defaults and b == default):
            out.append(f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def _one_line(summary: Mapping) -> str:
    parts = [f"{k} {round(v, 4) if isinstance(v, float) else v}" for k, v in summary.items() if k in SUMMARY_KEYS]
    return ", ".join(parts) or "ok"

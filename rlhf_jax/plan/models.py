"""The model architectures a dry run plans with, read from model.json / config.json alone (never weights or a
tokenizer): a model directory, the tiny built-in model, or the model a pipeline step will make and that is not
there yet (`{run_dir}/sft/export`); and the response slots K of an rm step."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple, Sequence

from rlhf_jax import pipeline
from rlhf_jax.config import Config
from rlhf_jax.errors import UserError
from rlhf_jax.models import checkpoint
from rlhf_jax.models.hf_config import config_from_hf, read_json
from rlhf_jax.models.tiny import tiny_config
from rlhf_jax.models.transformer import ModelConfig


class ModelSource(NamedTuple):
    cfg: ModelConfig
    head: str
    via: tuple[str, ...] = ()  # the pipeline steps that will make it, when it is not there yet
    origin: str = ""  # where the architecture was read when not from the path itself

    def note(self, what: str, path: str) -> str:
        """'' when read from `path` itself, else one line saying where the architecture came from."""
        if not self.via:
            return f"{what}: {self.origin}" if self.origin else ""
        steps = f"step {self.via[0]} makes" if len(self.via) == 1 else f"steps {' <- '.join(self.via)} make"
        return f"{what} {path} is not made yet: taken as the {self.head}-head model {steps} from {self.origin}"


def tiny_model_config() -> ModelConfig:
    """The tiny built-in model's architecture (`tiny.build_tiny_model`: a 512-token BPE, EOS 0, pad 1)."""
    return tiny_config(512, 0, 1)


def read_model_config(path: str | os.PathLike) -> tuple[ModelConfig, str]:
    """(architecture, head) of a model directory from its model.json or config.json alone."""
    path = Path(path)
    if (path / "model.json").exists():
        cfg, head, _ = checkpoint.read_model_meta(path)
        return cfg, head
    if (path / "config.json").exists():
        gen = path / "generation_config.json"
        return config_from_hf(read_json(path / "config.json"), read_json(gen) if gen.exists() else None,
                              where=str(path / "config.json"))
    raise checkpoint.CheckpointError(f"{path}: expected a rlhf_jax checkpoint (model.json) or a HF checkpoint dir "
                                     "(config.json)")


# The models a pipeline step leaves in its directory, and their heads.
OUTPUTS = {"sft": {"export": "lm", "best": "lm"}, "rm": {"export": "scalar", "best": "scalar"},
           "ppo": {"export": "lm", "export_ema": "lm", "export_value": "scalar"}, "task": {"base_model": "lm"},
           "dpo": {"export": "lm", "best": "lm"}, "grpo": {"export": "lm"}, "rloo": {"export": "lm"}}


def _same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


class Models:
    """Model configs of the steps of a config, from model.json / config.json only. A path that a pipeline step
    will write (`{run_dir}/sft/export`) and that does not exist yet is the model that step trains."""

    def __init__(self, steps: Sequence[pipeline.Step]):
        self.steps = list(steps)

    def resolve(self, path: str, run_dir: str, _seen: tuple[str, ...] = ()) -> ModelSource:
        if not path:
            tiny = Path(run_dir) / "tiny_model"
            if (tiny / "config.json").exists():
                return ModelSource(*read_model_config(tiny))
            return ModelSource(tiny_model_config(), "lm", origin="the tiny built-in model")
        if Path(path).exists():
            return ModelSource(*read_model_config(path))
        for step in self.steps:
            for out, head in OUTPUTS.get(step.cfg.stage, {}).items():
                if step.name not in _seen and _same_path(path, Path(step.cfg.run_dir) / out):
                    return self._produced(step, out, head, (*_seen, step.name))
        raise checkpoint.CheckpointError(f"{path}: does not exist")

    def _produced(self, step: pipeline.Step, out: str, head: str, seen: tuple[str, ...]) -> ModelSource:
        cfg = step.cfg
        if cfg.stage == "task":
            return ModelSource(tiny_model_config(), head, (step.name,), "a tiny model (vocabulary taken as 512)")
        if out == "export_value":
            source = self.resolve(cfg.ppo.value_model or cfg.ppo.reward_model, cfg.run_dir, seen)
        else:
            source = self.resolve(cfg.model.path, cfg.run_dir, seen)
        origin = source.origin or (cfg.ppo.value_model or cfg.ppo.reward_model if out == "export_value"
                                   else cfg.model.path)
        return ModelSource(source.cfg, head, (step.name, *source.via), origin)


def response_slots(cfg: Config, steps: Sequence[pipeline.Step]) -> int:
    """K of an rm or dpo step: data.max_responses, else the prepared dataset's largest K, else the responses of the
    pipeline's label step that writes the dataset."""
    if cfg.data.max_responses:
        return cfg.data.max_responses
    from rlhf_jax.data.prepare import dataset_dir

    if (dataset_dir(cfg.data.dir, cfg.data.name) / "dataset_info.json").exists():
        from rlhf_jax.data.pipeline import open_split, response_slots as slots

        _, metadata = open_split(cfg.data.dir, cfg.data.name, cfg.data.train_split)
        if slots("rankings", metadata, cfg.data):
            return slots("rankings", metadata, cfg.data)
    for step in steps:
        s = step.cfg
        if s.stage == "label" and s.label.dataset == cfg.data.name and _same_path(s.data.dir, cfg.data.dir):
            # every policy's samples, and with earlier rounds' rankings every round's, share a prompt's element
            return s.label.responses * (1 + len(s.label.policies)) * (1 + len(s.label.include))
    raise UserError(f"data.max_responses: the {cfg.stage} dry run needs the response slots per prompt K, and dataset "
                    f"{cfg.data.name!r} is not prepared yet; set data.max_responses")
